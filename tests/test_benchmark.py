"""The main job prints the comparison table."""

import numpy as np

from sklearn_hash import benchmark


def test_main_job_prints_the_table(capsys):
    assert benchmark.main(["--bits", "8", "16", "--methods", "ITQ", "SH", "--R", "20"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("mAP@20 on load_digits")
    assert "| method | 8 bits | 16 bits |" in lines
    itq = next(line for line in lines if line.startswith("| ITQ |"))
    scores = [float(cell) for cell in itq.strip("|").split("|")[1:]]
    assert len(scores) == 2 and all(0 < s <= 1 for s in scores)
    assert any(line.startswith("| exact float (cosine) |") for line in lines)
    assert "ITQ" in out.err  # progress goes to stderr


def test_infeasible_cells_are_marked(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "small.npz"
    np.savez(path, X=rng.normal(size=(200, 6)), y=rng.integers(0, 3, 200),
             fold=np.repeat([1, 2, 3, 4], 50))
    benchmark.main(["--data", str(path), "--bits", "4", "8", "--methods", "ITQ", "--R", "10"])
    itq = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| ITQ |"))
    assert itq.endswith("| n/a |")  # 8 bits > 6 features


def test_split_uses_the_query_fold(tmp_path):
    path = tmp_path / "f.npz"
    X = np.arange(40, dtype=float).reshape(20, 2)
    np.savez(path, X=X, y=np.arange(20) % 2, fold=np.repeat([1, 2], 10))
    X_db, y_db, X_q, y_q, name = benchmark.load_retrieval_split(path, query_fold=1)
    assert X_db.shape == (10, 2) and X_q.shape == (10, 2) and name == "f.npz"
    np.testing.assert_allclose(np.linalg.norm(X_db, axis=1), 1.0)
