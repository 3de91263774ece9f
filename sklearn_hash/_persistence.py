"""Fitted estimators as JSON and ``.npy`` arrays, without pickle.

``encode(value, arrays)`` turns an estimator (its parameters and fitted
attributes), nested estimators, numbers, strings, tuples and arrays into
JSON-able data; arrays go into the ``arrays`` dict (written as ``.npy``
files) and are referred to by name. ``decode(data, arrays)`` rebuilds the
value. Only the package's own estimators (and the scikit-learn classes in
``_ALLOWED``) can be rebuilt, by name: reading an index never imports or
runs anything the files name, unlike unpickling.

An estimator whose state holds more than plain values (the deep model's
network) defines ``_get_persistent_state()`` returning its fitted state as
such values and ``_set_persistent_state(state)`` to restore it.
"""

import json
import math
import uuid
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator


def _allowed():
    from . import (
        AGH,
        ITQ,
        DeepQuantizationNetwork,
        IVFQuantizedNeighbors,
        ProductQuantizer,
        QuantizedNeighbors,
        SpectralHashing,
    )

    classes = [AGH, ITQ, DeepQuantizationNetwork, IVFQuantizedNeighbors, ProductQuantizer,
               QuantizedNeighbors, SpectralHashing]
    try:
        from . import OPQ

        classes.append(OPQ)
    except ImportError:
        pass
    return {cls.__name__: cls for cls in classes}


def _tagged(tag, value):
    return {"__tag__": tag, "value": value}


def encode(value, arrays, name="x"):
    """JSON-able form of ``value``; arrays are stored in ``arrays`` under unique names."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject and value.ndim == 1 and all(isinstance(v, str) for v in value):
            return _tagged("str_array", list(value))  # feature_names_in_
        if value.dtype.hasobject:
            raise TypeError(f"{name} is an array of dtype object, which cannot be saved "
                            f"without pickle.")
        key = f"{name}"
        while key in arrays:
            key += "_"
        arrays[key] = value
        return _tagged("ndarray", key)
    if isinstance(value, np.generic):
        return _tagged("scalar", [value.dtype.str, encode(value.item(), arrays, name)])
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        value = float(value)
        return value if math.isfinite(value) else _tagged("float", repr(value))
    if isinstance(value, np.dtype):
        return _tagged("dtype", value.str)
    if isinstance(value, type) and value in (np.float32, np.float64):
        return _tagged("dtype_type", np.dtype(value).str)
    if isinstance(value, tuple):
        return _tagged("tuple", [encode(v, arrays, f"{name}.{i}") for i, v in enumerate(value)])
    if isinstance(value, list):
        return [encode(v, arrays, f"{name}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{name} is a dict with non-string keys, which cannot be saved.")
        return _tagged("dict", {k: encode(v, arrays, f"{name}.{k}") for k, v in value.items()})
    if isinstance(value, BaseEstimator):
        cls = type(value)
        if _allowed().get(cls.__name__) is not cls:
            raise TypeError(
                f"{name} is a {cls.__module__}.{cls.__name__}; an index can be saved only "
                f"with sklearn_hash's own estimators (their classes are rebuilt by name, "
                f"never unpickled)."
            )
        params = value.get_params(deep=False)
        if hasattr(value, "_get_persistent_state"):
            state = value._get_persistent_state()
        else:
            state = {k: v for k, v in vars(value).items()
                     if k not in params and not k.startswith("__")}
        state = {k: v for k, v in state.items() if k not in getattr(value, "_TRANSIENT", ())}
        return _tagged("estimator", {
            "class": cls.__name__,
            "params": {k: encode(v, arrays, f"{name}.{k}") for k, v in params.items()},
            "state": {k: encode(v, arrays, f"{name}.{k}") for k, v in state.items()},
        })
    raise TypeError(f"{name} is a {type(value).__name__}, which an index cannot save "
                    f"without pickle.")


def decode(data, arrays):
    """Rebuild a value written by :func:`encode`; ``arrays`` maps names to arrays."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode(v, arrays) for v in data]
    if not isinstance(data, dict) or "__tag__" not in data:
        raise ValueError(f"unexpected entry in the index manifest: {str(data)[:80]!r}.")
    tag, value = data["__tag__"], data.get("value")
    if tag == "ndarray":
        if value not in arrays:
            raise ValueError(f"the manifest names an array {value!r} that the index "
                             f"does not hold.")
        return arrays[value]
    if tag == "str_array":
        return np.asarray(value, dtype=object)
    if tag == "scalar":
        return np.dtype(value[0]).type(decode(value[1], arrays))
    if tag == "float":
        return float(value)
    if tag == "dtype":
        return np.dtype(value)
    if tag == "dtype_type":
        return np.dtype(value).type
    if tag == "tuple":
        return tuple(decode(v, arrays) for v in value)
    if tag == "dict":
        return {k: decode(v, arrays) for k, v in value.items()}
    if tag == "estimator":
        cls = _allowed().get(value.get("class"))
        if cls is None:
            raise ValueError(f"the index names an estimator class {value.get('class')!r}, "
                             f"which is not one of sklearn_hash's; refusing to build it.")
        params = {k: decode(v, arrays) for k, v in value["params"].items()}
        # A parameter added since the index was saved: the value it was trained under.
        params = {**getattr(cls, "_PARAMS_ADDED", {}), **params}
        estimator = cls(**params)
        try:  # a manifest edited by hand must not load an estimator fit() would refuse
            if hasattr(estimator, "_validate_params"):
                estimator._validate_params()
        except (TypeError, ValueError) as error:
            raise ValueError(f"the index's saved parameters of {cls.__name__} are invalid: "
                             f"{error}") from None
        state = {k: decode(v, arrays) for k, v in value["state"].items()}
        if hasattr(estimator, "_set_persistent_state"):
            estimator._set_persistent_state(state)
        else:
            vars(estimator).update(state)
        return estimator
    raise ValueError(f"unknown entry {tag!r} in the index manifest; was it written by a "
                     f"newer sklearn_hash?")


def save_index(searcher, path):
    """Write ``searcher`` to the index directory ``path`` (see ``IndexMixin.save``)."""
    from ._storage import (
        INDEX_FORMAT,
        array_entry,
        check_new_dir_target,
        commit_manifest,
        new_name,
        write_array,
    )
    from ._version import __version__

    path = Path(path)
    check_new_dir_target(path)
    labels = searcher._labels
    if labels is not None and labels.dtype.hasobject:
        raise ValueError(
            "Labels of dtype object cannot be stored as .npy without pickle; use "
            "numeric or string labels (e.g. y.astype(str))."
        )
    # The searcher's fitted state, without its storage.
    arrays = {}
    state = encode(searcher, arrays, "searcher")
    path.mkdir(parents=True, exist_ok=True)
    n = searcher.n_samples_fit_

    # Segments already in this directory (written by this index) are kept.
    saved = searcher._saved
    segments, start = [], 0
    if saved is not None and saved["path"] == str(path.resolve()):
        try:
            on_disk = json.loads((path / "index.json").read_text()).get("uuid")
        except (OSError, ValueError):
            on_disk = None
        if on_disk == saved["uuid"]:
            segments, start = list(saved["segments"]), saved["n_rows"]
    files = [s["dir"] for s in segments]

    if start < n:
        seg_dir = new_name("seg")
        (path / seg_dir).mkdir()
        seg_arrays = searcher._index.segment_arrays(start, n)
        if labels is not None:
            seg_arrays["labels"] = labels.slice(start, n)
        if searcher._vectors is not None:
            seg_arrays["vectors"] = searcher._vectors.slice(start, n)
        for name, array in seg_arrays.items():
            write_array(path / seg_dir / f"{name}.npy", array)
        segments.append({"dir": seg_dir, "start": start, "stop": n,
                         "arrays": {k: array_entry(a) for k, a in seg_arrays.items()}})
        files.append(seg_dir)

    state_dir = new_name("state")
    (path / state_dir).mkdir()
    for name, array in arrays.items():
        write_array(path / state_dir / f"{name}.npy", array)
    files.append(state_dir)

    removed = None
    if searcher._n_removed:
        removed_file = new_name("removed", ".npy")
        ids = np.flatnonzero(searcher._live.array == 0).astype(np.int64)
        write_array(path / removed_file, ids)
        removed = {"file": removed_file, "count": int(ids.size)}
        files.append(removed_file)

    manifest = {
        "format": INDEX_FORMAT,
        "sklearn_hash_version": __version__,
        "uuid": uuid.uuid4().hex,
        "class": type(searcher).__name__,
        "n_samples": int(n),
        "labels": None if labels is None else {"row_shape": list(labels.row_shape),
                                                "dtype": labels.dtype.str},
        "estimator": state,
        "state_dir": state_dir,
        "state_arrays": {k: array_entry(a) for k, a in arrays.items()},
        "segments": segments,
        "removed": removed,
        "files": files,
    }
    commit_manifest(path, manifest)
    searcher._saved = {"path": str(path.resolve()), "uuid": manifest["uuid"],
                       "segments": segments, "n_rows": int(n)}
    return path


def load_index(cls, path, mmap_mode):
    """Read an index directory written by :func:`save_index` (no pickle)."""
    from ._storage import (ChunkedRows, GrowableArray, expect_random_reads, load_array,
                           read_manifest)

    path = Path(path)
    manifest = read_manifest(path)
    if manifest["class"] != cls.__name__:
        raise ValueError(f"{path / 'index.json'} holds a {manifest['class']}; use "
                         f"{manifest['class']}.load, not {cls.__name__}.load.")
    state_dir = path / manifest["state_dir"]
    arrays = {name: load_array(state_dir / f"{name}.npy", e["shape"], e["dtype"], None)
              for name, e in manifest.get("state_arrays", {}).items()}
    searcher = decode(manifest["estimator"], arrays)
    if type(searcher) is not cls:
        raise ValueError(f"{path / 'index.json'} describes a {type(searcher).__name__}, not a "
                         f"{cls.__name__}.")
    labels = manifest.get("labels")
    n = manifest["n_samples"]
    searcher._index = searcher._new_index()
    searcher._labels = None if labels is None else ChunkedRows(labels["row_shape"],
                                                               labels["dtype"])
    searcher._live, searcher._n_removed, searcher._fit_y_cache = None, 0, None
    searcher.refine_storage_ = searcher._kept_rows()  # also for indexes saved before it
    keeps_vectors = searcher.refine_storage_ is not None
    if keeps_vectors:
        row_shape, row_dtype = searcher._rerank_step().layout
    label_chunks, vector_chunks, expected_start = [], [], 0
    for segment in manifest["segments"]:
        if segment["start"] != expected_start or segment["stop"] < segment["start"]:
            raise ValueError(f"{path / 'index.json'}: segment {segment['dir']} covers items "
                             f"{segment['start']}:{segment['stop']}, expected to start at "
                             f"{expected_start}; the index directory is damaged.")
        seg = {name: load_array(path / segment["dir"] / f"{name}.npy", e["shape"], e["dtype"],
                                mmap_mode)
               for name, e in segment["arrays"].items()}
        size = segment["stop"] - segment["start"]
        codes_rows = len(seg["codes"])
        if codes_rows != size or ("labels" in seg) != (labels is not None) or (
                "labels" in seg and len(seg["labels"]) != size) or (
                ("vectors" in seg) != keeps_vectors) or (
                "vectors" in seg and (seg["vectors"].shape != (size, *row_shape)
                                      or seg["vectors"].dtype != row_dtype)):
            raise ValueError(f"{path / segment['dir']} holds arrays of inconsistent lengths "
                             f"for its {size} items; the index directory is damaged.")
        searcher._index.add_segment(seg)
        if labels is not None:
            label_chunks.append(seg["labels"])
        if keeps_vectors:
            vector_chunks.append(seg["vectors"])
            expect_random_reads(seg["vectors"])  # re-ranking reads a few rows per query
        expected_start = segment["stop"]
    if expected_start != n or len(searcher._index) != n:
        raise ValueError(f"{path / 'index.json'} declares {n} items but its segments hold "
                         f"{expected_start}; the index directory is damaged.")
    if labels is not None:
        searcher._labels = ChunkedRows(labels["row_shape"], labels["dtype"], label_chunks)
    searcher._vectors = (ChunkedRows(row_shape, row_dtype, vector_chunks)
                         if keeps_vectors else None)
    searcher.n_samples_fit_ = n
    removed = manifest.get("removed")
    if removed:
        ids = load_array(path / removed["file"], [removed["count"]], np.dtype(np.int64).str, None)
        if ids.size and (ids.min() < 0 or ids.max() >= n or np.unique(ids).size != ids.size):
            raise ValueError(f"{path / removed['file']} must hold distinct indices in "
                             f"[0, {n - 1}].")
        searcher._live = GrowableArray((), np.uint8, np.ones(n, dtype=np.uint8))
        searcher._live.array[ids] = 0
        searcher._n_removed = int(ids.size)
        searcher._index.on_remove(ids)
    searcher._after_load()
    searcher._saved = {"path": str(path.resolve()), "uuid": manifest.get("uuid"),
                       "segments": manifest["segments"], "n_rows": n}
    return searcher
