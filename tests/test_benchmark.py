"""The main job prints the comparison table, and refuses bad input in one line."""

import subprocess
import sys

import numpy as np
import pytest

from sklearn_hash import benchmark


def test_main_job_prints_the_table(capsys):
    assert benchmark.main(["--bits", "8", "16", "--methods", "ITQ", "SH", "--R", "20"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    # The default dataset is ESC-10, shipped with the package: fold 1 against folds 2-5.
    assert lines[0].startswith("mAP@20 on ESC-10")
    assert "(database 320, queries 80, seed 0)" in lines[0]
    assert "DQN" not in lines[0]  # the label share is named only when DQN runs
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


def test_default_R_is_the_number_of_relevant_items(capsys):
    benchmark.main(["--bits", "8", "--methods", "ITQ"])
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith("mAP@32 on ESC-10")
    assert "R = 32" in out.err
    # 32 = relevant clips per query in the database (8 per class in each of folds 2-5).
    esc10 = benchmark.load_esc10()
    in_database = esc10.fold != 1
    assert all((esc10.target[in_database] == label).sum() == 32
               for label in esc10.target[~in_database])


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    y = np.arange(60) % 3
    fold = np.repeat([1, 2, 3], 20)
    paths = {}
    paths["good"] = tmp_path / "good.npz"
    np.savez(paths["good"], X=X, y=y, fold=fold)
    paths["no_y"] = tmp_path / "no_y.npz"
    np.savez(paths["no_y"], X=X, fold=fold)
    paths["no_x"] = tmp_path / "no_x.npz"
    np.savez(paths["no_x"], y=y)
    X_nan = X.copy()
    X_nan[[3, 7]] = np.nan
    paths["nan"] = tmp_path / "nan.npz"
    np.savez(paths["nan"], X=X_nan, y=y, fold=fold)
    paths["no_fold"] = tmp_path / "no_fold.npz"
    np.savez(paths["no_fold"], X=X, y=y)
    paths["text"] = tmp_path / "text.npz"
    paths["text"].write_text("hello")
    paths["missing"] = tmp_path / "missing.npz"
    return paths


BAD_INPUT = [
    (["--data", "{missing}"], "No such file"),
    (["--data", "{text}"], "not an .npz file"),
    (["--data", "{no_y}"], "has no 'y' array"),
    (["--data", "{no_x}"], "has no 'X' array"),
    (["--data", "{nan}"], "2 rows of X hold NaN or infinity (rows 3, 7)"),
    (["--bits", "0"], "argument --bits: must be a positive integer, got 0"),
    (["--bits", "8", "-16"], "argument --bits: must be a positive integer, got -16"),
    (["--bits", "eight"], "argument --bits: invalid int value"),
    (["--labelled-fraction", "0"], "argument --labelled-fraction: must be in (0, 1]"),
    (["--labelled-fraction", "1.5"], "argument --labelled-fraction: must be in (0, 1]"),
    (["--labelled-fraction", "nan"], "argument --labelled-fraction: must be in (0, 1]"),
    (["--R", "0"], "argument --R: must be between 1 and the database size (320), got 0"),
    (["--R", "321"], "argument --R: must be between 1 and the database size (320), got 321"),
    (["--data", "{good}", "--R", "41"], "between 1 and the database size (40)"),
    (["--query-fold", "6"], "argument --query-fold: fold 6 is not in ESC-10"),
    (["--data", "{good}", "--query-fold", "0"], "its folds are 1 2 3"),
    (["--data", "{no_fold}", "--query-fold", "2"], "has no fold array"),
    (["--methods", "LSH"], "argument --methods: invalid choice"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line_and_status_2(files, capsys, argv, message):
    argv = [arg.format(**files) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv + ["--methods", "ITQ"] if "--methods" not in argv else argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    assert err.startswith("python -m sklearn_hash.benchmark: error: ")
    assert message in err
    assert "Traceback" not in err


def test_bad_input_from_the_command_line(files):
    # The real command: exit status 2, one line on stderr, no traceback, nothing on stdout.
    for argv in (["--bits", "0"], ["--data", str(files["nan"])],
                 ["--data", str(files["missing"])]):
        done = subprocess.run([sys.executable, "-m", "sklearn_hash.benchmark", *argv],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
        assert done.stdout == ""


def test_default_R_is_capped_by_a_small_database(files, capsys):
    assert benchmark.main(["--data", str(files["good"]), "--bits", "2", "--methods", "ITQ"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mAP@40 on good.npz (database 40, queries 20, seed 0)")


def test_file_without_folds_uses_a_stratified_fifth(files, capsys):
    assert benchmark.main(["--data", str(files["no_fold"]), "--bits", "2", "--methods", "ITQ",
                           "--R", "5"]) == 0
    assert "(database 48, queries 12, seed 0)" in capsys.readouterr().out
