"""ESC-10 YAMNet embeddings shipped with the package, and loaders for other ``.npz`` files.

Every loader returns a :class:`~sklearn.utils.Bunch` shaped like
scikit-learn's (``load_iris``): ``data``, ``target``, ``frame``,
``target_names``, ``feature_names``, ``DESCR``, plus the audio datasets'
``fold``, ``filenames``, ``major_category`` and ``major_category_names``.
"""

import os
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch
from sklearn.utils._optional_dependencies import check_pandas_support
from sklearn.utils._param_validation import validate_params

DATA_MODULE = "sklearn_hash.datasets.data"
ESC10_FILE = "esc10_yamnet.npz"
ESC10_ATTRIBUTION_FILE = "ESC10_ATTRIBUTION.txt"

_ESC10_DESCR = """\
.. _esc10_dataset:

ESC-10 environmental sounds, YAMNet embeddings
----------------------------------------------

**Data Set Characteristics:**

:Number of Instances: 400 five-second clips (40 per class)
:Number of Attributes: 1024 (float32): the YAMNet embedding of each clip, the
    mean of its frame embeddings (global average pooling)
:Classes: 10 - dog, rooster, rain, sea waves, crackling fire, crying baby,
    sneezing, clock tick, helicopter, chainsaw (``target`` 0..9 in that order)
:Folds: 5 official cross-validation folds of 80 clips, 8 clips of each class
    per fold (``fold``, 1..5); clips cut from the same recording share a fold
:Major categories: ESC-50's five (``major_category``, 0..4): animals, natural
    soundscapes and water, human non-speech, interior/domestic, exterior/urban
:Source: ESC-50, K. J. Piczak, "ESC: Dataset for Environmental Sound
    Classification", ACM Multimedia 2015, https://github.com/karolpiczak/ESC-50

ESC-10 is the ten-class subset of ESC-50; the clips come from Freesound
recordings. The embeddings were computed from the 16 kHz clips with YAMNet,
a CNN trained on AudioSet. ``esc50_target`` gives each clip's ESC-50 class.

Retrieval protocol used by ``python -m sklearn_hash.benchmark``: queries =
fold 1 (80 clips), database = folds 2-5 (320 clips), relevant = same class,
so each query has 32 relevant items in the database.

**Licence.** The ESC-10 subset is licensed under the
Creative Commons Attribution 3.0 Unported licence (CC BY 3.0,
https://creativecommons.org/licenses/by/3.0/). The rest of ESC-50 is CC BY-NC
3.0 and is not shipped. The attribution of every clip (its Freesound source,
author and licence) is in the file ``ESC10_ATTRIBUTION.txt`` installed beside
the data, in the package folder ``sklearn_hash/datasets/data/``; here:
{attribution}

.. rubric:: References

- K. J. Piczak. "ESC: Dataset for Environmental Sound Classification".
  Proceedings of the 23rd ACM International Conference on Multimedia, 2015.
- YAMNet, the AudioSet-trained embedding model:
  https://github.com/tensorflow/models/tree/master/research/audioset/yamnet
"""


def _data_path(name):
    """Path of a file shipped in ``sklearn_hash/datasets/data``."""
    return Path(str(resources.files(DATA_MODULE).joinpath(name)))


def get_esc10_attribution_path():
    """Path of ``ESC10_ATTRIBUTION.txt``, the clips' sources, authors and licences.

    Returns
    -------
    path : pathlib.Path
        The attribution file installed with the package; redistribute it
        with the ESC-10 data.

    Examples
    --------
    >>> from sklearn_hash.datasets import get_esc10_attribution_path
    >>> get_esc10_attribution_path().name
    'ESC10_ATTRIBUTION.txt'
    """
    return _data_path(ESC10_ATTRIBUTION_FILE)


def _as_frame(caller_name, bunch):
    """Put ``data`` and ``target`` into pandas, as scikit-learn's loaders do."""
    pd = check_pandas_support(f"{caller_name} with as_frame=True")
    data = pd.DataFrame(bunch.data, columns=bunch.feature_names, copy=False)
    target = pd.Series(bunch.target, name="target")
    frame = pd.concat([data, target], axis=1)
    bunch.frame = frame
    bunch.data = frame[bunch.feature_names]
    bunch.target = frame["target"]
    return bunch


def _read_npz(path):
    """The arrays of a dataset file as a Bunch (without DESCR)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such file: {str(path)!r}.")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise ValueError(
            f"Cannot read {str(path)!r}: it is not an .npz file (a zip archive of "
            f"named .npy arrays, as written by numpy.savez)."
        )
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not named arrays")
        with loaded as npz:
            arrays = {key: npz[key] for key in npz.files}
        for key, value in arrays.items():
            if not isinstance(value, np.ndarray):  # NpzFile gives raw bytes for those
                raise ValueError(f"its member {key!r} is not a .npy array")
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"Cannot read {str(path)!r} as an .npz file of arrays without pickled "
            f"objects ({exc})."
        ) from None
    for key in ("X", "y"):
        if key not in arrays:
            raise ValueError(
                f"{path.name} has no {key!r} array; a dataset file needs X of shape "
                f"(n_samples, n_features) and y of shape (n_samples,). Found: "
                f"{sorted(arrays) or 'no arrays'}."
            )
    X, y = arrays["X"], arrays["y"]
    if X.ndim != 2 or X.shape[0] == 0 or X.dtype.kind not in "fiu":
        raise ValueError(
            f"{path.name}: X must be a non-empty 2-D numeric array of shape "
            f"(n_samples, n_features); got shape {X.shape} and dtype {X.dtype}."
        )
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"{path.name}: y must be 1-D with one label per row of X ({X.shape[0]}); "
            f"got shape {y.shape}."
        )
    n = X.shape[0]

    def per_row(key):
        value = arrays.get(key)
        if value is None:
            return None
        if value.shape != (n,):
            raise ValueError(f"{path.name}: {key} must have shape ({n},); got {value.shape}.")
        return value

    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    prefix = path.stem.split("_", 1)[-1] if "_" in path.stem else "x"
    bunch = Bunch(
        data=X,
        target=y,
        frame=None,
        fold=per_row("fold"),
        filenames=per_row("filenames"),
        target_names=arrays.get("categories"),
        major_category=per_row("major_category"),
        major_category_names=arrays.get("major_categories"),
        feature_names=[f"{prefix}_{j}" for j in range(X.shape[1])],
        filename=str(path),
    )
    if "esc50_target" in arrays:
        bunch.esc50_target = per_row("esc50_target")
    return bunch


@validate_params(
    {"return_X_y": ["boolean"], "as_frame": ["boolean"]},
    prefer_skip_nested_validation=True,
)
def load_esc10(*, return_X_y=False, as_frame=False):
    """Load the ESC-10 environmental sounds as YAMNet embeddings (classification).

    400 five-second clips of 10 classes (40 each), in 5 folds of 80 clips
    (8 per class per fold), each clip a 1024-d YAMNet embedding. The data
    ships inside the package under the Creative Commons Attribution 3.0
    licence; ``DESCR`` says where the attribution file is.

    =================   ==============
    Classes                         10
    Samples per class               40
    Samples total                  400
    Dimensionality                1024
    Features            real, float32
    =================   ==============

    Parameters
    ----------
    return_X_y : bool, default=False
        If True, returns ``(data, target)`` instead of a Bunch object.
    as_frame : bool, default=False
        If True, the data is a pandas DataFrame with one column per
        embedding dimension (``yamnet_0`` ... ``yamnet_1023``), the target a
        pandas Series, and ``frame`` a DataFrame holding both.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object, with the following attributes.

        data : {ndarray, dataframe} of shape (400, 1024)
            The embeddings, float32. A DataFrame if ``as_frame=True``.
        target : {ndarray, Series} of shape (400,)
            The class of each clip, int64 in 0..9. A Series if
            ``as_frame=True``.
        frame : DataFrame of shape (400, 1025)
            Only present when ``as_frame=True``: ``data`` and ``target``.
        fold : ndarray of shape (400,)
            The official cross-validation fold of each clip, 1..5.
        filenames : ndarray of shape (400,)
            The clip's file name in ESC-50 (``{fold}-{freesound id}-{take}-{esc50 class}.wav``).
        target_names : ndarray of shape (10,)
            The class names, indexed by ``target``.
        major_category : ndarray of shape (400,)
            ESC-50's major category of each clip, 0..4.
        major_category_names : ndarray of shape (5,)
            The major categories' names, indexed by ``major_category``.
        esc50_target : ndarray of shape (400,)
            The clip's class among the 50 of ESC-50.
        feature_names : list of str
            ``yamnet_0`` ... ``yamnet_1023``.
        DESCR : str
            The description of the dataset, its licence and the location of
            its attribution file.
        filename : str
            Path of the ``.npz`` file the data was read from.

    (data, target) : tuple if ``return_X_y`` is True
        A tuple of two ndarrays (DataFrame and Series with ``as_frame=True``):
        the embeddings of shape (400, 1024) and the classes of shape (400,).

    See Also
    --------
    load_npz : The same Bunch from another ``.npz`` file (e.g. ESC-50).
    retrieval_split : Queries and database by fold, centred and normalised.

    Notes
    -----
    The ESC-10 subset of ESC-50 is licensed CC BY 3.0; keep
    ``ESC10_ATTRIBUTION.txt`` (:func:`get_esc10_attribution_path`) with any
    copy of the data.

    Examples
    --------
    >>> from sklearn_hash.datasets import load_esc10
    >>> esc10 = load_esc10()
    >>> esc10.data.shape, esc10.data.dtype
    ((400, 1024), dtype('float32'))
    >>> esc10.target_names[:3].tolist()
    ['dog', 'rooster', 'rain']
    >>> import numpy as np
    >>> np.bincount(esc10.fold)[1:]
    array([80, 80, 80, 80, 80])
    >>> "CC BY 3.0" in esc10.DESCR
    True
    """
    bunch = _read_npz(_data_path(ESC10_FILE))
    bunch.DESCR = _ESC10_DESCR.format(attribution=get_esc10_attribution_path())
    bunch.data_module = DATA_MODULE
    if as_frame:
        bunch = _as_frame("load_esc10", bunch)
    if return_X_y:
        return bunch.data, bunch.target
    return bunch


@validate_params(
    {"path": [str, os.PathLike], "return_X_y": ["boolean"], "as_frame": ["boolean"]},
    prefer_skip_nested_validation=True,
)
def load_npz(path, *, return_X_y=False, as_frame=False):
    """Load a dataset ``.npz`` file, such as the ESC-50 embeddings of ``shared/data``.

    The file holds ``X`` (n_samples, n_features) and ``y`` (n_samples,), and
    optionally ``fold``, ``filenames``, ``categories``, ``major_category``,
    ``major_categories`` and ``esc50_target`` (the layout of the project's
    evaluation data); it is read without unpickling.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``.npz`` file.
    return_X_y : bool, default=False
        If True, returns ``(data, target)`` instead of a Bunch object.
    as_frame : bool, default=False
        If True, ``data`` is a DataFrame, ``target`` a Series and ``frame``
        a DataFrame holding both, as in :func:`load_esc10`.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        The Bunch of :func:`load_esc10`, read from ``path``; keys whose
        arrays the file lacks (``fold``, ``filenames``, ``target_names``,
        ``major_category``, ``major_category_names``) are None. Feature
        names are ``{suffix}_{j}``, the suffix being the part of the file
        name after its first underscore (``yamnet`` for ``esc50_yamnet.npz``).
    (data, target) : tuple if ``return_X_y`` is True
        ``X`` and ``y``.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is not a readable ``.npz`` without pickled objects, or
        lacks ``X`` or ``y``, or their shapes disagree.

    See Also
    --------
    load_esc10 : The ESC-10 embeddings shipped with the package.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_hash.datasets import load_npz
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "toy_data.npz")
    >>> np.savez(path, X=np.eye(4), y=[0, 0, 1, 1], fold=[1, 2, 1, 2])
    >>> toy = load_npz(path)
    >>> toy.data.shape, toy.fold.tolist(), toy.feature_names[:2]
    ((4, 4), [1, 2, 1, 2], ['data_0', 'data_1'])
    """
    bunch = _read_npz(path)
    names = {key: bunch[key] for key in ("fold", "filenames", "major_category")}
    described = ", ".join(key for key, value in names.items() if value is not None)
    bunch.DESCR = (
        f"Dataset read from {path}: {bunch.data.shape[0]} samples x "
        f"{bunch.data.shape[1]} features, {len(np.unique(bunch.target))} classes"
        + (f"; also {described}." if described else ".")
    )
    if as_frame:
        bunch = _as_frame("load_npz", bunch)
    if return_X_y:
        return bunch.data, bunch.target
    return bunch


def retrieval_split(dataset, *, query_fold=1, random_state=0):
    """Database and queries of a dataset, centred and L2-normalised.

    The retrieval protocol of the project: with a ``fold`` array, the rows of
    ``query_fold`` are the queries and all other rows the database (ESC-10
    and ESC-50: fold 1 against folds 2-5); without one, a stratified 20% of
    the rows are the queries. Both are centred on the database mean and
    scaled to unit L2 norm, so that L2 ranks as cosine does.

    Parameters
    ----------
    dataset : Bunch
        A Bunch of :func:`load_esc10` or :func:`load_npz` (numpy arrays,
        not ``as_frame``), or any object with ``data``, ``target`` and
        ``fold`` (None when there are no folds).
    query_fold : int, default=1
        Fold of the queries, when the dataset has folds.
    random_state : int, RandomState instance or None, default=0
        Seed of the stratified 80/20 split used without folds.

    Returns
    -------
    X_db : ndarray of shape (n_database, n_features), float64
    y_db : ndarray of shape (n_database,)
    X_query : ndarray of shape (n_queries, n_features), float64
    y_query : ndarray of shape (n_queries,)

    Raises
    ------
    ValueError
        If ``query_fold`` selects no row or every row.

    Examples
    --------
    >>> from sklearn_hash.datasets import load_esc10, retrieval_split
    >>> X_db, y_db, X_q, y_q = retrieval_split(load_esc10(), query_fold=1)
    >>> X_db.shape, X_q.shape
    ((320, 1024), (80, 1024))
    """
    def field(name):
        if isinstance(dataset, dict) and name in dataset:
            return dataset[name]
        return getattr(dataset, name, None)

    if field("data") is None or field("target") is None:
        raise TypeError(f"dataset must have data and target (a Bunch from load_esc10 or "
                        f"load_npz, or an object with those attributes); got "
                        f"{type(dataset).__name__}.")
    X = np.asarray(field("data"), dtype=np.float64)
    y = np.asarray(field("target"))
    fold = field("fold")
    lengths = {"data": len(X), "target": len(y)}
    if fold is not None:
        fold = np.asarray(fold)
        lengths["fold"] = len(fold)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"dataset's data, target and fold must have one entry per row; got "
                         + ", ".join(f"{k}: {v}" for k, v in lengths.items()) + ".")
    if fold is not None:
        is_query = fold == query_fold
        if not is_query.any() or is_query.all():
            raise ValueError(
                f"query_fold={query_fold} must select some but not all rows; "
                f"folds present: {sorted(set(fold.tolist()))}."
            )
        X_db, y_db, X_q, y_q = X[~is_query], y[~is_query], X[is_query], y[is_query]
    else:
        X_db, X_q, y_db, y_q = train_test_split(
            X, y, test_size=0.2, stratify=y, random_state=random_state
        )
    mean = X_db.mean(axis=0)

    def normalise(A):
        A = A - mean
        return A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)

    return normalise(X_db), y_db, normalise(X_q), y_q


def load_retrieval_split(path=None, *, query_fold=1, random_state=0):
    """Database and queries of a dataset file, centred and L2-normalised.

    :func:`load_npz` then :func:`retrieval_split`.

    Parameters
    ----------
    path : str, pathlib.Path or None, default=None
        ``.npz`` with ``X`` and ``y`` (optionally ``fold``); None for
        scikit-learn's ``load_digits`` (1797 images of 8 x 8 pixels, no
        folds: a stratified 80/20 split), a small stand-in used by tests.
    query_fold : int, default=1
        Fold used as queries when the file has ``fold``.
    random_state : int, default=0
        Seed of the stratified 80/20 split used without folds.

    Returns
    -------
    X_db, y_db, X_query, y_query : ndarrays
        As :func:`retrieval_split` returns them.
    name : str
        The file's name, or ``"load_digits"``.
    """
    if path is None:
        X, y = load_digits(return_X_y=True)
        dataset, name = Bunch(data=X, target=y, fold=None), "load_digits"
    else:
        dataset, name = load_npz(path), Path(path).name
    return (*retrieval_split(dataset, query_fold=query_fold, random_state=random_state), name)
