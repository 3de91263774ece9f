"""Storage of an index: arrays that grow in amortised O(batch), and index directories.

In memory, an index's codes, labels and ids are :class:`ChunkedRows`: a list
of sealed chunks (arrays never written again: the segments of a loaded
index, memory-mapped) followed by one growable tail whose capacity doubles.
Appending k rows costs O(k) amortised; rows never move between chunks, so
indices and memory maps stay valid.

On disk, an index is a directory (format 2)::

    index.json            the manifest: format, class, parameters and fitted
                          state (JSON), sizes, and the files below
    state-<id>/*.npy      the fitted arrays of the searcher and its quantizer
    seg-<id>/*.npy        one segment: the rows added between two saves
    removed-<id>.npy      database indices of removed items

Files are written under fresh names and never modified; ``index.json`` is
replaced atomically (``os.replace``) once everything it names is on disk,
and only then are the files it no longer names deleted. An interrupted save
leaves the previous index loadable, and saving an index onto the directory
it was loaded from (memory-mapped) writes only the rows added since: a
new segment.
"""

import json
import os
import re
import uuid
from pathlib import Path

import numpy as np

# Version of the directory layout; load refuses newer ones.
INDEX_FORMAT = 2
_MANIFEST = "index.json"
_OWNED = re.compile(r"^(state-[0-9a-f]{32}|seg-[0-9a-f]{32}|removed-[0-9a-f]{32}\.npy|"
                    r"index\.json\.tmp-[0-9a-f]{32})$")


class GrowableArray:
    """A 1-D or 2-D array in memory whose capacity doubles as rows are appended."""

    def __init__(self, row_shape, dtype, initial=None):
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self._buffer = np.empty((0, *self.row_shape), dtype=self.dtype)
        self._size = 0
        if initial is not None:
            self.append(initial)

    def __len__(self):
        return self._size

    @property
    def array(self):
        """The rows held, a view (valid until the next append)."""
        return self._buffer[: self._size]

    def is_view(self, array):
        """Whether ``array`` is (a view of) the rows held."""
        return isinstance(array, np.ndarray) and array.base is self._buffer

    def checkpoint(self):
        """A function that undoes every append made after this call.

        Appends write past the rows held (or into a new buffer), so the
        rows held then are intact: undoing restores the buffer and size.
        """
        buffer, size = self._buffer, self._size

        def restore():
            self._buffer, self._size = buffer, size

        return restore

    def append(self, rows):
        rows = np.asarray(rows, dtype=self.dtype)
        needed = self._size + rows.shape[0]
        if needed > self._buffer.shape[0]:
            capacity = max(needed, 2 * self._buffer.shape[0], 16)
            buffer = np.empty((capacity, *self.row_shape), dtype=self.dtype)
            buffer[: self._size] = self._buffer[: self._size]
            self._buffer = buffer
        self._buffer[self._size : needed] = rows
        self._size = needed


class ChunkedRows:
    """Rows of one width and dtype: sealed chunks, then a growable tail.

    Parameters
    ----------
    row_shape : tuple
        Shape of one row (``()`` for scalars).
    dtype : dtype
    chunks : sequence of ndarray
        Sealed chunks, in row order; they may be read-only memory maps and
        are never written.
    """

    def __init__(self, row_shape, dtype, chunks=()):
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self._sealed = [c for c in chunks if len(c)]
        self._tail = GrowableArray(self.row_shape, self.dtype)
        self._len = sum(len(c) for c in self._sealed)

    def __len__(self):
        return self._len

    def append(self, rows):
        """Append rows (cast to the dtype: the caller has checked them)."""
        rows = np.asarray(rows)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {rows.shape[1:]} cannot join rows of shape "
                             f"{self.row_shape}.")
        self._tail.append(rows)
        self._len += rows.shape[0]
        self._addresses = None

    def checkpoint(self):
        """A function that undoes every append made after this call."""
        sealed, length, tail = list(self._sealed), self._len, self._tail.checkpoint()

        def restore():
            self._sealed, self._len, self._addresses = sealed, length, None
            tail()

        return restore

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_addresses", None)  # addresses of this process's memory
        return state

    def addresses(self):
        """``(starts, pointers)``: chunk c holds rows ``starts[c]:starts[c + 1]`` at address
        ``pointers[c]`` (int64, intp), as the kernels read them; kept until the next append."""
        if getattr(self, "_addresses", None) is None:
            chunks = self.chunks()
            starts = np.zeros(len(chunks) + 1, dtype=np.int64)
            np.cumsum([len(c) for c in chunks], out=starts[1:])
            pointers = np.array([c.ctypes.data for c in chunks], dtype=np.intp)
            self._addresses = (starts, pointers)
        return self._addresses

    def chunks(self):
        """The chunks holding the rows, in order (views; valid until the next append)."""
        tail = self._tail.array
        return self._sealed + ([tail] if len(tail) else [])

    def to_array(self):
        """All rows as one array (a view when they sit in one chunk)."""
        chunks = self.chunks()
        if len(chunks) == 1:
            return chunks[0]
        if not chunks:
            return np.empty((0, *self.row_shape), dtype=self.dtype)
        return np.concatenate(chunks)

    def take(self, indices):
        """Rows at the given indices (any order), reading only those rows."""
        indices = np.asarray(indices, dtype=np.int64)
        chunks = self.chunks()
        if len(chunks) == 1:
            return chunks[0][indices]
        out = np.empty((indices.size, *self.row_shape), dtype=self.dtype)
        offset = 0
        for chunk in chunks:
            inside = np.flatnonzero((indices >= offset) & (indices < offset + len(chunk)))
            out[inside] = chunk[indices[inside] - offset]
            offset += len(chunk)
        return out

    def slice(self, start, stop):
        """Rows ``start:stop`` as one array."""
        parts, offset = [], 0
        for chunk in self.chunks():
            lo, hi = max(start - offset, 0), min(stop - offset, len(chunk))
            if lo < hi:
                parts.append(chunk[lo:hi])
            offset += len(chunk)
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty((0, *self.row_shape), dtype=self.dtype)
        return np.concatenate(parts)


def check_new_dir_target(path):
    """Refuse to save into an existing directory that is not an index of ours."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; cannot save an index there.")
    if path.is_dir() and not (path / _MANIFEST).is_file():
        foreign = [p.name for p in path.iterdir() if not _OWNED.match(p.name)]
        if foreign:
            raise ValueError(
                f"{path} is a non-empty directory without {_MANIFEST} (it holds "
                f"{foreign[0]!r}): not an index written by save; refusing to write "
                f"into it. Choose a new or empty directory."
            )


def new_name(prefix, suffix=""):
    return f"{prefix}-{uuid.uuid4().hex}{suffix}"


def write_array(path, array):
    """Write one ``.npy`` file (no pickle) and flush it to disk."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def commit_manifest(path, manifest):
    """Atomically make ``manifest`` the directory's index, then drop what it no longer names."""
    tmp = path / new_name("index.json.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / _MANIFEST)
    _fsync_dir(path)
    named = set(manifest["files"])
    for entry in path.iterdir():
        if _OWNED.match(entry.name) and entry.name not in named:
            if entry.is_dir():
                for child in entry.iterdir():
                    child.unlink()
                entry.rmdir()
            else:
                entry.unlink()


def read_json_manifest(file, kind):
    """A JSON object with an integer ``format``, or a ValueError naming ``file``."""
    try:
        manifest = json.loads(Path(file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); the index directory is "
                         f"damaged.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), int):
        raise ValueError(f"{file} is not {kind} manifest (no integer 'format').")
    return manifest


def read_manifest(path):
    """The manifest of an index directory, checked for format and completeness."""
    path = Path(path)
    file = path / _MANIFEST
    if not file.is_file():
        hint = (" It holds searcher.pkl: an index saved by sklearn_hash < 0.2 with "
                "pickle, which this version never loads; rebuild it and save again."
                if (path / "searcher.pkl").exists() else "")
        raise ValueError(f"{file} not found: {path} is not an index directory written "
                         f"by save.{hint}")
    manifest = read_json_manifest(file, "an sklearn_hash index")
    if manifest["format"] > INDEX_FORMAT:
        raise ValueError(
            f"{file} has index format {manifest['format']}, written by a newer "
            f"sklearn_hash ({manifest.get('sklearn_hash_version', '?')}); this version "
            f"reads format {INDEX_FORMAT} at most. Upgrade sklearn_hash."
        )
    if manifest["format"] < INDEX_FORMAT:
        raise ValueError(
            f"{file} has index format {manifest['format']}, which stored the searcher "
            f"with pickle; this version never unpickles. Rebuild the index and save it "
            f"again."
        )
    for key in ("class", "estimator", "n_samples", "segments", "files", "state_dir"):
        if key not in manifest:
            raise ValueError(f"{file} lacks the entry {key!r}; the index directory is "
                             f"damaged.")
    return manifest


def load_array(file, expected_shape, expected_dtype, mmap_mode):
    """Load one ``.npy`` file of the index, checking it against the manifest."""
    try:
        array = np.load(file, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{file} is missing: the index directory is incomplete "
                         f"(expected an array of shape {tuple(expected_shape)}).") from None
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{file} cannot be read as a .npy array of shape "
                         f"{tuple(expected_shape)} ({exc}); it is truncated or damaged.") from None
    if list(array.shape) != list(expected_shape) or array.dtype.str != expected_dtype:
        raise ValueError(f"{file} has shape {array.shape} and dtype {array.dtype.str}; the "
                         f"manifest expects {tuple(expected_shape)} and {expected_dtype}.")
    if array.ndim > 1 and not array.flags.c_contiguous:
        raise ValueError(f"{file} holds a Fortran-ordered array; the index writes and reads "
                         f"C order only (the directory was not written by save).")
    return array


def _map_of(array):
    """The ``np.memmap`` holding array (itself, or the map it views), or None."""
    while array is not None and getattr(array, "_mmap", None) is None:
        array = getattr(array, "base", None)  # a view of a map, e.g. np.asarray(memmap)
    return array


def _advise(mapped, name):
    """Apply the ``madvise`` advice ``name`` to a memory map, where the system has it."""
    import mmap

    advice = getattr(mmap, name, None)
    if mapped is None or advice is None:
        return
    try:
        mapped._mmap.madvise(advice)
    except (OSError, ValueError):  # e.g. a closed map
        pass


def expect_random_reads(array):
    """Tell the system a memory-mapped array is read at random places.

    A page fault from a cold cache then reads that page alone instead of
    reading around it (Linux reads ahead up to megabytes by default): a
    search reads a few rows of re-ranking vectors per query. The price: a
    bulk read of the whole array from a cold cache (saving the index to
    another directory, ``compact``) also goes a page at a time. A no-op for
    in-memory arrays and where ``madvise`` is unavailable.
    """
    _advise(_map_of(array), "MADV_RANDOM")


def release_pages(array):
    """Let the system drop the resident pages of a memory-mapped array (read back on use).

    For arrays read whole once (validated, or packed into another layout)
    and then rarely: the process's resident memory stops counting them.
    Read-only maps only (dropping a copy-on-write page would lose its
    changes); a no-op for in-memory arrays and where ``madvise`` is
    unavailable.
    """
    mapped = _map_of(array)
    if mapped is not None and getattr(mapped, "mode", None) == "r":
        _advise(mapped, "MADV_DONTNEED")


def array_entry(array):
    return {"shape": list(array.shape), "dtype": array.dtype.str}
