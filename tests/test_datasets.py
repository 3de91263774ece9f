"""sklearn_hash.datasets: the ESC-10 data shipped with the package, and the .npz loader."""

import doctest
import zipfile
from importlib import resources

import numpy as np
import pytest

from sklearn_hash import datasets
from sklearn_hash.datasets import (
    get_esc10_attribution_path,
    load_esc10,
    load_npz,
    load_retrieval_split,
    retrieval_split,
)


@pytest.fixture(scope="module")
def esc10():
    return load_esc10()


def test_shapes_and_dtypes(esc10):
    assert esc10.data.shape == (400, 1024) and esc10.data.dtype == np.float32
    assert np.isfinite(esc10.data).all()
    assert esc10.target.shape == (400,) and esc10.target.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(esc10.target), [40] * 10)
    assert esc10.fold.dtype == np.int64
    # 5 folds of 80 clips, 8 of each class per fold.
    for fold in range(1, 6):
        np.testing.assert_array_equal(np.bincount(esc10.target[esc10.fold == fold]), [8] * 10)
    assert esc10.filenames.shape == (400,) and str(esc10.filenames[0]).endswith(".wav")
    # A clip's file name starts with its fold.
    assert all(int(str(name).split("-")[0]) == fold
               for name, fold in zip(esc10.filenames, esc10.fold))
    assert esc10.target_names.tolist() == [
        "dog", "rooster", "rain", "sea_waves", "crackling_fire", "crying_baby", "sneezing",
        "clock_tick", "helicopter", "chainsaw",
    ]
    assert esc10.major_category.shape == (400,) and set(esc10.major_category) <= set(range(5))
    assert len(esc10.major_category_names) == 5 and esc10.major_category_names[0] == "animals"
    # major category = ESC-50 class // 10, and dogs are animals.
    np.testing.assert_array_equal(esc10.major_category, esc10.esc50_target // 10)
    assert set(esc10.major_category[esc10.target == 0]) == {0}
    assert esc10.feature_names[0] == "yamnet_0" and len(esc10.feature_names) == 1024
    assert esc10.frame is None


def test_descr_names_the_licence_and_the_attribution_file(esc10):
    assert "CC BY 3.0" in esc10.DESCR
    assert "Creative Commons Attribution 3.0" in esc10.DESCR
    assert "https://creativecommons.org/licenses/by/3.0/" in esc10.DESCR
    assert str(get_esc10_attribution_path()) in esc10.DESCR
    assert "Piczak" in esc10.DESCR


def test_attribution_file_is_installed_with_the_package(esc10):
    # Found through importlib.resources, i.e. where the installed package is.
    package_files = resources.files("sklearn_hash.datasets").joinpath("data")
    attribution = package_files.joinpath("ESC10_ATTRIBUTION.txt")
    assert attribution.is_file()
    assert get_esc10_attribution_path().read_text() == attribution.read_text()
    text = attribution.read_text(encoding="utf-8")
    assert "Creative Commons Attribution 3.0" in text
    # Every clip of the data is attributed: "1-100032-A-0.wav" is listed as "[1-100032-A.ogg]".
    for name in esc10.filenames:
        clip = str(name).rsplit("-", 1)[0]
        assert f"[{clip}.ogg]" in text, clip
    assert package_files.joinpath("esc10_yamnet.npz").is_file()


def test_return_X_y(esc10):
    X, y = load_esc10(return_X_y=True)
    np.testing.assert_array_equal(X, esc10.data)
    np.testing.assert_array_equal(y, esc10.target)


def test_as_frame(esc10):
    pd = pytest.importorskip("pandas")
    bunch = load_esc10(as_frame=True)
    assert isinstance(bunch.data, pd.DataFrame) and bunch.data.shape == (400, 1024)
    assert list(bunch.data.columns) == esc10.feature_names
    assert isinstance(bunch.target, pd.Series) and bunch.target.name == "target"
    assert isinstance(bunch.frame, pd.DataFrame) and bunch.frame.shape == (400, 1025)
    assert list(bunch.frame.columns) == esc10.feature_names + ["target"]
    np.testing.assert_array_equal(bunch.data.to_numpy(), esc10.data)
    assert bunch.data.dtypes.iloc[0] == np.float32
    np.testing.assert_array_equal(bunch.target.to_numpy(), esc10.target)
    np.testing.assert_array_equal(bunch.fold, esc10.fold)  # the other arrays stay numpy
    X, y = load_esc10(return_X_y=True, as_frame=True)
    assert isinstance(X, pd.DataFrame) and isinstance(y, pd.Series)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="return_X_y"):
        load_esc10(return_X_y="yes")
    with pytest.raises(TypeError):
        load_esc10(True)  # keyword-only, as scikit-learn's loaders


def test_load_npz_reads_any_file_in_the_layout(tmp_path):
    path = tmp_path / "toy_mfcc.npz"
    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.savez(path, X=X, y=np.array([0, 1, 0, 1, 0, 1]), fold=np.array([1, 1, 2, 2, 3, 3]))
    toy = load_npz(path)
    np.testing.assert_array_equal(toy.data, X)
    assert toy.data.dtype == np.float32
    np.testing.assert_array_equal(toy.fold, [1, 1, 2, 2, 3, 3])
    assert toy.feature_names == ["mfcc_0", "mfcc_1"]
    assert toy.filenames is None and toy.target_names is None and toy.major_category is None
    assert "6 samples x 2 features" in toy.DESCR
    X2, y2 = load_npz(str(path), return_X_y=True)
    np.testing.assert_array_equal(y2, [0, 1, 0, 1, 0, 1])


def test_load_npz_of_the_shipped_file_matches_load_esc10(esc10):
    bunch = load_npz(datasets._esc10._data_path("esc10_yamnet.npz"))
    for key in ("data", "target", "fold", "filenames", "target_names", "major_category",
                "major_category_names", "esc50_target"):
        np.testing.assert_array_equal(bunch[key], esc10[key])


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(y=[0, 1]), "has no 'X' array"),
        (dict(X=np.ones((2, 2))), "has no 'y' array"),
        (dict(X=np.ones(3), y=[0, 1, 2]), "2-D"),
        (dict(X=np.ones((3, 2)), y=[0, 1]), "one label per row"),
        (dict(X=np.ones((3, 2)), y=[0, 1, 2], fold=[1, 2]), "fold must have shape"),
    ],
)
def test_load_npz_bad_files(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        load_npz(path)


def test_load_npz_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file"):
        load_npz(tmp_path / "missing.npz")
    text = tmp_path / "notes.npz"
    text.write_text("not arrays")
    with pytest.raises(ValueError, match="not an .npz file"):
        load_npz(text)
    broken = tmp_path / "broken.npz"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("X.npy", b"garbage")
        archive.writestr("y.npy", b"garbage")
    with pytest.raises(ValueError, match="Cannot read"):
        load_npz(broken)
    with pytest.raises(ValueError, match="Cannot read"):
        load_npz(tmp_path)  # a folder
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, X=np.array([{"a": 1}, None], dtype=object), y=[0, 1])
    with pytest.raises(ValueError, match="pickled"):
        load_npz(pickled)


def test_retrieval_split_by_fold(esc10):
    X_db, y_db, X_q, y_q = retrieval_split(esc10, query_fold=1)
    assert X_db.shape == (320, 1024) and X_q.shape == (80, 1024)
    assert X_db.dtype == np.float64
    np.testing.assert_array_equal(y_q, esc10.target[esc10.fold == 1])
    np.testing.assert_allclose(np.linalg.norm(X_db, axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(X_q, axis=1), 1.0)
    # 32 relevant database items per query.
    assert all((y_db == label).sum() == 32 for label in y_q)
    with pytest.raises(ValueError, match="query_fold=7 must select some but not all rows"):
        retrieval_split(esc10, query_fold=7)


def test_retrieval_split_refuses_malformed_datasets(esc10):
    # an IndexError from inside (lengths) and an AttributeError (a dict, None) before
    short = {"data": esc10.data, "target": esc10.target[:-1], "fold": esc10.fold}
    with pytest.raises(ValueError, match="data: 400, target: 399, fold: 400"):
        retrieval_split(short)
    for dataset in ({"target": esc10.target}, None):
        with pytest.raises(TypeError, match="dataset must have data and target"):
            retrieval_split(dataset)
    as_dict = {"data": esc10.data, "target": esc10.target, "fold": esc10.fold}
    for got, expected in zip(retrieval_split(as_dict), retrieval_split(esc10)):
        np.testing.assert_array_equal(got, expected)


def test_load_retrieval_split_without_folds_is_stratified(tmp_path):
    X_db, y_db, X_q, y_q, name = load_retrieval_split(None)
    assert name == "load_digits" and len(X_q) == 360
    path = tmp_path / "nofold.npz"
    np.savez(path, X=np.random.default_rng(0).normal(size=(50, 3)), y=np.arange(50) % 5)
    X_db, y_db, X_q, y_q, name = load_retrieval_split(path)
    assert name == "nofold.npz" and len(X_q) == 10
    np.testing.assert_array_equal(np.bincount(y_q), [2] * 5)


def test_docstring_examples():
    module = datasets._esc10
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
