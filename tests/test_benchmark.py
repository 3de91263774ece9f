"""The main job prints the comparison table."""

import numpy as np
import pytest

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


def test_partial_labels_keep_a_stratified_share():
    y = np.repeat(np.arange(5), 20)
    y_partial = benchmark.partial_labels(y, 0.1, random_state=0)
    kept = y_partial != -1
    assert kept.sum() == 10
    np.testing.assert_array_equal(np.bincount(y_partial[kept]), [2] * 5)
    np.testing.assert_array_equal(y_partial[kept], y[kept])
    np.testing.assert_array_equal(benchmark.partial_labels(y, 1.0), y)


def test_dqn_row_is_left_out_without_torch(monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "_has_torch", lambda: False)
    benchmark.main(["--bits", "8", "--methods", "PQ", "DQN", "--R", "10"])
    out = capsys.readouterr()
    assert "| PQ |" in out.out and "| DQN |" not in out.out
    assert "sklearn-hash[deep]" in out.err


def test_dqn_row_with_partial_labels(monkeypatch, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("skorch")
    seen = {}
    original = benchmark.METHODS["DQN"]

    def spy(n_bits, seed):
        model = original(n_bits, seed).set_params(max_epochs=3)
        fit = model.fit

        def fit_spy(X, y):
            seen["unlabelled"] = float(np.mean(np.asarray(y) == -1))
            return fit(X, y)

        model.fit = fit_spy
        return model

    monkeypatch.setitem(benchmark.METHODS, "DQN", spy)
    benchmark.main(["--bits", "16", "--methods", "DQN", "--R", "10",
                    "--labelled-fraction", "0.2"])
    out = capsys.readouterr().out
    assert seen["unlabelled"] == pytest.approx(0.8, abs=0.01)
    dqn = next(line for line in out.splitlines() if line.startswith("| DQN |"))
    assert 0 < float(dqn.strip("|").split("|")[1]) <= 1
    assert "DQN with 20% of the labels" in out


def test_partial_labels_below_one_per_class_fall_back_to_random_rows():
    y = np.repeat(np.arange(50), 32)
    y_partial = benchmark.partial_labels(y, 0.01, random_state=0)
    kept = y_partial != -1
    assert kept.sum() == 16  # 1% of 1600: fewer than the 50 classes
    np.testing.assert_array_equal(y_partial[kept], y[kept])
