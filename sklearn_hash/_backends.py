"""Back-ends: each way of searching owns its stored codes and its kernel calls.

A searcher (:class:`~sklearn_hash.QuantizedNeighbors`,
:class:`~sklearn_hash.IVFQuantizedNeighbors`) turns its queries into what a
back-end reads (packed bits, distance tables) and hands them over with the
restriction of the search: ``allowed``, a uint8 mask over database indices
(removed items and the caller's filter folded in; ``None``: every item),
and ``exclude``, one database index per query never returned (the query
itself when the database queries itself). The back-end runs its kernel and
returns exact ``(distances, indices)``, ties by ascending index, padded
with distance ``inf`` (``2**31 - 1`` for Hamming) and index -1 where fewer
candidates exist.

Codes are checked once, when they enter the back-end (``add``, and
``add_segment`` when an index is loaded), never when searching: a search
reads only the codes it scans.

- :class:`HammingScan`: packed binary codes, exhaustive popcount scan.
- :class:`MultiIndexHashing`: the same codes and answers, searched through
  substring hash tables (sub-linear where neighbours are near).
- :class:`TableScan`: codeword indices, exhaustive scan by table lookups
  (ADC or SDC: the searcher builds the tables).
- :class:`FastScan`: 4-bit codeword indices in a block layout, scanned with
  8-bit in-register tables as a filter and re-scored exactly (the answers
  of :class:`TableScan`).
- :class:`InvertedLists`: residual codeword indices grouped by coarse cell
  (IVFADC, and the inverted multi-index's K x K cells), stored as runs of
  added items, each grouped by cell; 4-bit codes are also kept in the
  fast-scan block layout, cell by cell, and each probed cell is filtered
  by fast-scan and re-scored exactly (the answers of the float tables).

Every back-end also answers range queries (``radius``: the items below a
threshold, CSR, indices ascending), for ``radius_neighbors``; those of
4-bit codes by the same fast-scan filter, with the float tables' answers.
Appends can be undone (``checkpoint``), for an ``add`` that fails part way.
"""

import itertools

import numpy as np

from ._kernels._adc import (
    adc_kneighbors,
    adc_radius,
    check_chunk_table,
    ivf_adc_kneighbors,
    ivf_adc_radius,
)
from ._kernels._fastscan import (
    BLOCK_ROWS,
    block_bytes,
    check_4bit_codes,
    fastscan_kneighbors,
    ivf_fastscan_kneighbors,
    ivf_fastscan_radius,
    pack_blocks,
    pack_cell_blocks,
    unpack_block_rows,
)
from ._kernels._fastscan import simd_path as fastscan_simd_path  # noqa: F401 (for the searchers)
from ._kernels._hamming import hamming_kneighbors, hamming_radius
from ._kernels._simd import max_simd_level
from ._storage import ChunkedRows, GrowableArray, _map_of, release_pages


def _merge(parts, k):
    """Merge per-chunk top-k results (global indices) into one top-k, ties by index.

    Each part is ``(distances, indices, *carried)``: arrays of one shape,
    the carried ones (if any) taken along with their entries.
    """
    if len(parts) == 1:
        return tuple(parts[0])
    columns = [np.concatenate(arrays, axis=1) for arrays in zip(*parts)]
    distances, indices = columns[:2]
    order = np.lexsort((indices, indices < 0, distances), axis=1)[:, :k]
    return tuple(np.take_along_axis(a, order, axis=1) for a in columns)


class _FlatScan:
    """Codes in database order (chunked); searched chunk by chunk, merged exactly."""

    def __init__(self, width, dtype):
        self.codes = ChunkedRows((width,), dtype)

    def __len__(self):
        return len(self.codes)

    def add(self, codes):
        codes = self._check(codes)
        self.codes.append(codes)

    def checkpoint(self):
        """A function that undoes the ``add`` calls made after this call (and resets caches)."""
        state, codes = dict(self.__dict__), self.codes.checkpoint()

        def restore():
            self.__dict__.clear()
            self.__dict__.update(state)
            codes()

        return restore

    def add_segment(self, arrays):
        codes = self._check(arrays["codes"])
        self.codes = ChunkedRows(self.codes.row_shape, self.codes.dtype,
                                 [*self.codes.chunks(), codes])

    def segment_arrays(self, start, stop):
        return {"codes": self.codes.slice(start, stop)}

    def compact(self, keep):
        codes = self.codes.to_array()[keep]
        self.codes = ChunkedRows(self.codes.row_shape, self.codes.dtype)
        self.codes.append(codes)

    def on_remove(self, indices):
        pass

    def _chunks(self, allowed, exclude):
        """Each chunk with its offset and the search's restriction in its own rows."""
        offset = 0
        for chunk in self.codes.chunks():
            n = len(chunk)
            sub_allowed = None if allowed is None else allowed[offset : offset + n]
            sub_exclude = None
            if exclude is not None:
                inside = (exclude >= offset) & (exclude < offset + n)
                sub_exclude = np.where(inside, exclude - offset, -1).astype(np.int64)
            yield offset, chunk, sub_allowed, sub_exclude
            offset += n

    def search(self, queries, k, *, allowed=None, exclude=None, n_threads=1):
        parts = []
        for offset, chunk, sub_allowed, sub_exclude in self._chunks(allowed, exclude):
            d, i = self._kernel(queries, chunk, k, sub_allowed, sub_exclude, n_threads)
            if offset:
                i[i >= 0] += offset
            parts.append((d, i))
        if not parts:
            return self._kernel(queries, self.codes.to_array(), k, None, None, n_threads)
        return _merge(parts, k)

    def radius(self, queries, threshold, *, allowed=None, exclude=None, n_threads=1):
        """Every item within ``threshold`` of each query, as CSR (offsets, distances, indices).

        Each query's items come in ascending index order.
        """
        parts = []
        for offset, chunk, sub_allowed, sub_exclude in self._chunks(allowed, exclude):
            offsets, d, i = self._radius_kernel(queries, chunk, threshold, sub_allowed,
                                                sub_exclude, n_threads)
            parts.append((offsets, d, i + offset))
        if not parts:  # no items: the kernel's empty answer, in its dtypes
            return self._radius_kernel(queries, self.codes.to_array(), threshold, None, None,
                                       n_threads)
        if len(parts) == 1:
            return parts[0]
        n_queries = len(queries)
        counts = sum(np.diff(o) for o, _, _ in parts) if parts else np.zeros(n_queries, np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # Chunk by chunk within each query: ascending indices.
        rows = np.concatenate([np.repeat(np.arange(n_queries), np.diff(o)) for o, _, _ in parts])
        order = np.argsort(rows, kind="stable")
        return (offsets, np.concatenate([d for _, d, _ in parts])[order],
                np.concatenate([i for _, _, i in parts])[order])


class HammingScan(_FlatScan):
    """Binary codes packed in uint64 words, searched by Hamming distance.

    Parameters
    ----------
    n_bits : int
        Bits per code; the unused high bits of the last word must be zero.
    simd : bool or str
        Popcount path of the kernel (see ``hamming_kneighbors``).
    """

    def __init__(self, n_bits, simd=True):
        self.n_bits = n_bits
        self.simd = simd
        super().__init__((n_bits + 63) // 64, np.uint64)

    def _check(self, codes):
        codes = np.asarray(codes)
        n_words = self.codes.row_shape[0]
        if codes.ndim != 2 or codes.shape[1] != n_words or codes.dtype != np.uint64:
            raise ValueError(f"packed binary codes must be a (n, {n_words}) uint64 array; got "
                             f"{codes.ndim}-D {codes.dtype} of shape {codes.shape}.")
        spare = 64 * n_words - self.n_bits
        if spare and len(codes):
            high = ~np.uint64(0) << np.uint64(64 - spare)
            if np.any(codes[:, -1] & high):
                raise ValueError(f"packed {self.n_bits}-bit codes have bits set beyond bit "
                                 f"{self.n_bits}; they are not codes of this index.")
        return np.ascontiguousarray(codes)

    def _kernel(self, queries, chunk, k, allowed, exclude, n_threads):
        return hamming_kneighbors(queries, chunk, k, n_threads=n_threads, simd=self.simd,
                                  exclude=exclude, allowed=allowed)

    def _radius_kernel(self, queries, chunk, threshold, allowed, exclude, n_threads):
        # threshold: largest distance returned, in bits.
        return hamming_radius(queries, chunk, threshold, n_threads=n_threads, simd=self.simd,
                              exclude=exclude, allowed=allowed)


def mih_substrings(n_bits, n_items, m=None):
    """Bit bounds of the substrings of multi-index hashing.

    ``m=None`` follows Norouzi et al.: ``m = n_bits / log2(n_items)``
    substrings (rounded), at least enough that none is longer than 24 bits
    (its dense table has ``2**bits + 1`` entries) and at most ``n_bits``.
    """
    if m is None:
        m = int(round(n_bits / max(np.log2(max(n_items, 2)), 1.0)))
    m = int(min(max(m, -(-n_bits // 24), 1), n_bits))
    sizes = np.full(m, n_bits // m)
    sizes[: n_bits % m] += 1
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


class MultiIndexHashing(HammingScan):
    """Binary codes searched exactly by multi-index hashing (Norouzi et al. 2012).

    The codes are cut into m substrings, each indexing the items in a dense
    hash table; a search probes the buckets within growing substring
    distances and verifies candidates, stopping when the pigeonhole bound
    proves the k best found are the k best overall (ties by index): the
    answers are those of :class:`HammingScan`. Items added after the tables
    were built are scanned exhaustively (and the results merged exactly)
    until they are more than a quarter of the indexed ones; the tables are
    then rebuilt (O(n log n), amortised O(1) per item).

    Parameters
    ----------
    n_bits : int
    n_substrings : int or None
        ``None``: chosen from ``n_bits`` and the number of items.
    """

    # Costs in units of one exhaustively scanned 64-bit word: a probed bucket
    # and a verified code, fitted to the work counted and the times measured
    # by ``bench_sublinear.py`` (ITQ codes of the YAMNet mixture, small
    # clusters, uniform; k = 1, 10, 100). On 1M codes a scanned code costs
    # 0.2 ns (one thread, AVX-512 popcounts), a bucket ~30 ns, a verified
    # code ~3 ns; on 4M codes 0.37 ns, ~130 ns (tables of 2**21 offsets miss
    # the cache) and ~5 ns. The larger bucket cost is kept: it errs toward
    # the scan, whose cost is never far off.
    PROBE_COST = 350
    CANDIDATE_COST = 15

    def __init__(self, n_bits, n_substrings=None, simd=True, auto=False):
        super().__init__(n_bits, simd)
        self.n_substrings = n_substrings
        self.auto = auto
        self._built = 0
        self._tables = None
        self._choices = {}

    def _prefers_tables(self, queries, k, n_threads):
        """The measured rule of ``algorithm="auto"``: is hashing cheaper than a scan here?

        Hashing searches up to 16 of the queries, counting the buckets it
        probes and the codes it verifies (on clustered codes, many; where
        codes have exact duplicates, few); it is chosen when that work,
        weighed by the measured costs, is less than scanning every code
        (mean over the sample: a batch costs the sum of its queries). Decided once per k until the index
        doubles; the tables built to count are those a hashing search uses.
        """
        n = len(self.codes)
        key = k
        if key in self._choices and self._choices[key][0] * 2 > n:
            return self._choices[key][1]
        if n < 65536:
            choice = False
        else:
            work = self._hash_search(queries[:16], k, None, None, n_threads, count=True)[2]
            cost = work[:, 0] * self.PROBE_COST + work[:, 1] * self.CANDIDATE_COST
            choice = bool(cost.mean() < n * ((self.n_bits + 63) // 64))
        self._choices[key] = (n, choice)
        return choice

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tables"], state["_built"] = None, 0  # rebuilt on first search
        state["_choices"] = {}
        return state

    def _build(self):
        from ._kernels._mih import substrings

        codes = np.ascontiguousarray(self.codes.to_array())
        bounds = mih_substrings(self.n_bits, len(codes), self.n_substrings)
        values = substrings(codes, bounds)
        offsets, ids, table_codes = [], [], []
        for i in range(len(bounds) - 1):
            order = np.argsort(values[:, i], kind="stable").astype(np.int64)
            counts = np.bincount(values[:, i], minlength=1 << int(bounds[i + 1] - bounds[i]))
            offsets.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
            ids.append(order)
            table_codes.append(codes[order])  # a bucket's codes side by side
        self._tables = (codes, bounds, (offsets, ids, table_codes),
                        *(np.array([a.ctypes.data for a in arrays], dtype=np.intp)
                          for arrays in (offsets, ids, table_codes)))
        self._built = len(codes)

    def compact(self, keep):
        super().compact(keep)
        self._tables, self._built, self._choices = None, 0, {}

    def search(self, queries, k, *, allowed=None, exclude=None, n_threads=1):
        if self.auto and (allowed is not None or not self._prefers_tables(queries, k, n_threads)):
            # A filter can leave few items near the query: scanning is safer.
            return super().search(queries, k, allowed=allowed, exclude=exclude,
                                  n_threads=n_threads)
        return self._hash_search(queries, k, allowed, exclude, n_threads)[:2]

    def _hash_search(self, queries, k, allowed, exclude, n_threads, count=False):
        """Search by the tables (built or rebuilt first when stale); with count, the work too."""
        from ._kernels._mih import mih_kneighbors

        n = len(self.codes)
        if self._tables is None or n - self._built > max(self._built // 4, 1024):
            self._build()
        codes, bounds, _, offsets_at, ids_at, codes_at = self._tables
        built = self._built
        work = np.zeros((len(queries), 2), dtype=np.int64) if count else None
        d, i = mih_kneighbors(
            queries, codes, bounds, offsets_at, ids_at, codes_at, k, n_threads=n_threads,
            exclude=None if exclude is None else np.where(exclude < built, exclude, -1),
            allowed=None if allowed is None else np.ascontiguousarray(allowed[:built]),
            work=work,
        )
        if built == n:
            return d, i, work
        # The items added since the build: scanned, then merged exactly.
        tail = np.ascontiguousarray(self.codes.slice(built, n))
        sub_exclude = None
        if exclude is not None:
            sub_exclude = np.where(exclude >= built, exclude - built, -1).astype(np.int64)
        d2, i2 = self._kernel(queries, tail, k,
                              None if allowed is None else allowed[built:], sub_exclude,
                              n_threads)
        i2[i2 >= 0] += built
        return (*_merge([(d, i), (d2, i2)], k), work)


class TableScan(_FlatScan):
    """Codeword indices (uint8 or uint16), searched by sums of table entries.

    Parameters
    ----------
    n_subspaces, n_codewords : int
        Shape of a query's table; every codeword index is below ``n_codewords``.
    """

    def __init__(self, n_subspaces, n_codewords):
        self.n_subspaces = n_subspaces
        self.n_codewords = n_codewords
        super().__init__(n_subspaces, np.uint8 if n_codewords <= 256 else np.uint16)

    def _check(self, codes):
        return check_codeword_indices(codes, self.n_subspaces, self.n_codewords,
                                      self.codes.dtype)

    def _kernel(self, tables, chunk, k, allowed, exclude, n_threads):
        return adc_kneighbors(tables, chunk, k, n_threads=n_threads, exclude=exclude,
                              allowed=allowed, check_codes=False)

    def _radius_kernel(self, tables, chunk, threshold, allowed, exclude, n_threads):
        # threshold: table sums strictly below it are returned.
        return adc_radius(tables, chunk, threshold, n_threads=n_threads, exclude=exclude,
                          allowed=allowed)


def check_codeword_indices(codes, n_subspaces, n_codewords, dtype):
    """Codes as ``dtype``, after checking their shape and range (once, on entry)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype.kind not in "iu" or codes.shape[1] != n_subspaces:
        raise ValueError(
            f"codes must be a 2-D array of integer codeword indices with {n_subspaces} "
            f"columns (one per subspace); got {codes.ndim}-D {codes.dtype} of shape "
            f"{codes.shape}."
        )
    if codes.size:
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= n_codewords:
            raise ValueError(f"codeword indices must be in [0, {n_codewords - 1}]; got "
                             f"values in [{low}, {high}].")
    return np.ascontiguousarray(codes, dtype=dtype)


class _CellRun:
    """Items grouped by cell: a run of consecutive database indices.

    ``ids`` holds the items ``first, ..., first + n - 1`` ordered by (cell,
    id), and ``codes`` their codes in that order; ``cells`` lists the cells
    present, ascending, and cell ``cells[t]``'s items are the rows
    ``starts[t]:starts[t + 1]``. A sealed run (loaded, memory-mapped) is
    never rewritten.

    With fast-scan, the run also has its cells' block layout
    (``pack_cell_blocks``: ``blocks``, and ``block_at``, each cell's first
    block or -1 for a cell left out), built by InvertedLists, never saved
    nor pickled. A run whose codes are in memory (not memory-mapped) then
    keeps code rows only for the cells left out (``loose``, each cell's from
    row ``loose_at[t]``): the search reads the others from their blocks, and
    ``codes`` decodes them when asked (saving, merging, reconstructing).
    That halves and more the memory of the codes, whose rows take a byte
    per codeword index against half a byte in the blocks.
    """

    def __init__(self, codes, ids, cells, starts, first, sealed=False):
        self._codes, self.ids, self.cells, self.starts = codes, ids, cells, starts
        self.first = int(first)
        self.sealed = sealed
        self.blocks = self.block_at = None
        self.loose = self.loose_at = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_codes"] = self.codes  # whole: the blocks are not pickled
        state["blocks"] = state["block_at"] = state["loose"] = state["loose_at"] = None
        return state

    def __len__(self):
        return len(self.ids)

    @property
    def codes(self):
        """The codes of the run's items, grouped by cell (decoded when not kept as rows)."""
        if self._codes is not None:
            return self._codes
        return self.codes_of(np.arange(len(self), dtype=np.int64))

    def codes_of(self, rows):
        """The codes of the run's rows ``rows`` (positions in the cell order)."""
        if self._codes is not None:
            return self._codes[rows]
        rows = np.asarray(rows, dtype=np.int64)
        t = np.searchsorted(self.starts, rows, side="right") - 1  # each row's cell
        offset = rows - self.starts[t]
        packed = self.block_at[t] >= 0
        codes = np.empty((len(rows), self.loose.shape[1]), dtype=self.loose.dtype)
        codes[packed] = unpack_block_rows(
            self.blocks, self.block_at[t[packed]] * BLOCK_ROWS + offset[packed],
            codes.shape[1])
        codes[~packed] = self.loose[self.loose_at[t[~packed]] + offset[~packed]]
        return codes

    def pack(self, min_rows):
        """Build the blocks, then drop the code rows of the cells packed (unless mapped)."""
        codes = self.codes
        self.blocks, self.block_at = pack_cell_blocks(codes, self.starts, min_rows)
        if _map_of(codes) is not None:  # on disk, never read for those cells: nothing to save
            return
        sizes = np.diff(self.starts)
        left_out = self.block_at < 0
        self.loose_at = np.where(left_out, np.cumsum(np.where(left_out, sizes, 0))
                                 - sizes, -1).astype(np.int64)
        self.loose = np.ascontiguousarray(codes[np.repeat(left_out, sizes)])
        self._codes = None

    def unpack(self):
        """Drop the blocks, keeping every code as a row again."""
        self._codes = self.codes
        self.blocks = self.block_at = self.loose = self.loose_at = None

    def code_rows_at(self, row_bytes):
        """Address of each cell's first code row, 0 for a cell whose rows are not kept."""
        begin = self.starts[:-1]
        if self._codes is not None:
            return self._codes.ctypes.data + begin * row_bytes
        return np.where(self.loose_at >= 0, self.loose.ctypes.data + self.loose_at * row_bytes,
                        0)

    @classmethod
    def grouped(cls, codes, ids, row_cells, first):
        """A run from rows in id order, with each row's cell."""
        order = np.argsort(row_cells, kind="stable")  # ids stay ascending within a cell
        return cls._from_sorted(codes[order], ids[order], row_cells[order], first)

    @classmethod
    def _from_sorted(cls, codes, ids, sorted_cells, first):
        bounds = np.flatnonzero(np.diff(sorted_cells)) + 1
        cells = sorted_cells[np.concatenate([[0], bounds])] if len(ids) else sorted_cells[:0]
        starts = np.concatenate([[0], bounds, [len(ids)]]) if len(ids) else np.zeros(1)
        return cls(np.ascontiguousarray(codes), np.ascontiguousarray(ids, dtype=np.int64),
                   cells.astype(np.int64), starts.astype(np.int64), first)

    def row_cells(self):
        return np.repeat(self.cells, np.diff(self.starts))

    def then(self, other):
        """This run followed by the next one (larger ids), grouped by cell: O(n)."""
        row_cells = np.concatenate([self.row_cells(), other.row_cells()])
        # Two sorted runs: the stable sort merges them, keeping ids ascending per cell.
        order = np.argsort(row_cells, kind="stable")
        return _CellRun._from_sorted(np.concatenate([self.codes, other.codes])[order],
                                     np.concatenate([self.ids, other.ids])[order],
                                     row_cells[order], self.first)


class InvertedLists:
    """Residual codes grouped by coarse cell, stored as runs of added items.

    Each ``add`` groups its batch by cell into a run; runs of similar size
    are merged (the last two, while the older is no larger than the newer),
    so there are O(log n) runs and an item is regrouped O(log n) times: no
    Python object per cell, which lets an index have millions of cells (the
    inverted multi-index). A loaded index's runs are memory-mapped and
    sealed: never merged or copied. An item's database index never changes,
    and within a cell the indices ascend across runs.

    The kernel reads a table of chunk addresses: for each cell, one chunk
    per run holding items of that cell.

    With ``fast_scan`` (4-bit codes: 16 codewords), each run also keeps its
    codes in the fast-scan block layout, every cell from a block boundary
    of its own (``pack_cell_blocks``; cells of a run holding fewer than
    ``FAST_SCAN_MIN_ROWS`` items are left out and scored with float
    lookups), and the search runs ``ivf_fastscan_kneighbors``: 8-bit
    quantized tables filter each probed cell, the float tables re-score what
    passes, and the answers are those of the float-table scan
    (``ivf_adc_kneighbors``), bit for bit. Blocks are packed when a run is
    made (an ``add`` packs its own items, and a merge of runs the merged
    run, which the merge copies anyway; a loaded segment when it is
    loaded); they are never saved. A run whose codes are in memory then
    keeps code rows only for the cells left out (``_CellRun.pack``): the
    others are decoded from their blocks to be saved, merged or
    reconstructed. A memory-mapped run keeps its rows on disk, which the
    search does not read for the cells in blocks.

    Parameters
    ----------
    n_lists, n_subspaces, n_codewords : int
    fast_scan : bool, default=False
        Search by fast-scan; needs ``n_codewords == 16``.
    simd : bool or {"avx512", "avx2", "portable"}, default=True
        Shuffle path of the fast-scan kernel (see ``fastscan_kneighbors``).
    """

    # A run's cell with fewer items is scored with float lookups: quantizing
    # the probe's table and reading whole blocks costs more than scoring them.
    # Measured per probe, 32 x 4-bit codes, 2 threads (benchmarks/bench_ivf.py
    # --parts cells): float / fast-scan 0.66x at 32 codes, 0.86x at 64, 1.54x
    # at 128, 6.1x at 1,024.
    FAST_SCAN_MIN_ROWS = 96

    def __init__(self, n_lists, n_subspaces, n_codewords, fast_scan=False, simd=True):
        if fast_scan and n_codewords != 16:
            raise ValueError(f"fast-scan searches 4-bit codes (16 codewords per subspace, "
                             f"subspace_bits=4); these codes have {n_codewords}.")
        max_simd_level(simd)  # a clear error for an unknown path
        self.n_lists = n_lists
        self.n_subspaces = n_subspaces
        self.n_codewords = n_codewords
        self.fast_scan = bool(fast_scan)
        self.simd = simd
        self.code_dtype = np.dtype(np.uint8 if n_codewords <= 256 else np.uint16)
        self.runs = []
        self.list_of = GrowableArray((), np.int32)  # the cell of each database index
        self.sizes = np.zeros(n_lists, dtype=np.int64)
        self.live_sizes = np.zeros(n_lists, dtype=np.int64)
        self._layout = None
        self._where = {}

    def __len__(self):
        return len(self.list_of)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_layout"] = None  # addresses of this process's arrays
        state["_where"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        for run in self.runs:  # packed now: a search never changes a run (threads share it)
            self._pack(run)

    def _check_cells(self, cells, n):
        cells = np.asarray(cells, dtype=np.int64)
        if cells.shape != (n,) or (cells.size and (cells.min() < 0 or cells.max() >= self.n_lists)):
            raise ValueError(f"cells must be one number in [0, {self.n_lists - 1}] per code.")
        return cells

    def _changed(self):
        self._layout = None
        self._where = {}

    def checkpoint(self):
        """A function that undoes the ``add`` and ``merge_since`` calls made after this call.

        Runs are never changed once made (merging makes a new one), so the
        list of runs is restored as it was; so are the cells of the items
        and the cells' sizes.
        """
        # add() replaces the sizes' arrays rather than writing into them: kept, not copied.
        runs, sizes, live = list(self.runs), self.sizes, self.live_sizes
        list_of = self.list_of.checkpoint()

        def restore():
            self.runs, self.sizes, self.live_sizes = runs, sizes, live
            list_of()
            self._changed()

        return restore

    def add(self, codes, lists):
        """Append items (the next database indices) with their cells."""
        codes = check_codeword_indices(codes, self.n_subspaces, self.n_codewords,
                                       self.code_dtype)
        lists = self._check_cells(lists, codes.shape[0])
        first = len(self.list_of)
        if len(codes):
            ids = np.arange(first, first + len(codes), dtype=np.int64)
            self.runs.append(_CellRun.grouped(codes, ids, lists, first))
            self._merge_last(lambda older, newer: len(older) <= len(newer))
            self._pack(self.runs[-1])
        counts = np.bincount(lists, minlength=self.n_lists)
        self.list_of.append(lists.astype(np.int32))
        self.sizes = self.sizes + counts  # new arrays: see checkpoint()
        self.live_sizes = self.live_sizes + counts
        self._changed()

    def merge_since(self, first):
        """Merge the trailing runs holding items from database index ``first`` on into one.

        An ``add`` of a large batch arrives in chunks, each its own run; once
        the batch is in, its runs become one (then merged on by the usual
        rule), so a cell is one chunk for the kernel rather than one per run:
        its candidates are sorted together, and an index right after ``fit``
        is laid out as a loaded one.
        """
        merged = self._merge_last(lambda older, newer: older.first + len(older) > first)
        merged += self._merge_last(lambda older, newer: len(older) <= len(newer))
        if merged:
            self._pack(self.runs[-1])
            self._changed()

    def _merge_last(self, rule):
        """Merge the last two runs while the older is unsealed and ``rule(older, newer)``.

        Returns how many merges were made.
        """
        runs, merges = self.runs, 0
        while len(runs) >= 2 and not runs[-2].sealed and rule(runs[-2], runs[-1]):
            runs[-2:] = [runs[-2].then(runs[-1])]
            merges += 1
        return merges

    def add_segment(self, arrays):
        """Add a saved segment: codes grouped by cell, their ids and the cells' offsets."""
        codes, ids, offsets = arrays["codes"], arrays["ids"], arrays["offsets"]
        codes = check_codeword_indices(codes, self.n_subspaces, self.n_codewords,
                                       self.code_dtype)
        first = len(self.list_of)
        offsets = np.asarray(offsets)
        if (offsets.shape != (self.n_lists + 1,) or offsets[0] != 0
                or offsets[-1] != len(codes) or np.any(np.diff(offsets) < 0)
                or ids.shape != (len(codes),)):
            raise ValueError(f"a segment's offsets must rise from 0 to its {len(codes)} codes "
                             f"over {self.n_lists} cells, with one id per code.")
        counts = np.diff(offsets)
        row_cells = np.repeat(np.arange(self.n_lists, dtype=np.int64), counts)
        local = np.asarray(ids) - first
        if len(ids) and (local.min() < 0 or local.max() >= len(ids)
                         or np.bincount(local, minlength=len(ids)).max() > 1):
            raise ValueError(f"a segment's ids must be the indices {first} to "
                             f"{first + len(ids) - 1}, each once.")
        if len(ids) > 1 and np.any((np.diff(ids) <= 0) & (np.diff(row_cells) == 0)):
            raise ValueError("a segment's ids must ascend within each cell.")
        list_of = np.empty(len(codes), dtype=np.int32)
        list_of[local] = row_cells
        if len(codes):
            cells = np.flatnonzero(counts).astype(np.int64)
            starts = np.concatenate([offsets[cells], [len(codes)]]).astype(np.int64)
            self.runs.append(_CellRun(codes, ids, cells, starts, first, sealed=True))
            self._pack(self.runs[-1])
        # Validating and packing read these whole; a search reads few of their pages
        # again (with fast-scan, only rows before a query's heap is full, small cells).
        release_pages(ids)
        if self.fast_scan:
            release_pages(codes)
        self.list_of.append(list_of)
        self.sizes += counts
        self.live_sizes += counts
        self._changed()

    def _rows_between(self, start, stop):
        """(codes, ids, cells) of the items ``start:stop``, grouped by cell."""
        parts = []
        for run in self.runs:
            if run.first >= stop or run.first + len(run) <= start:
                continue
            row_cells = run.row_cells()
            if start <= run.first and run.first + len(run) <= stop:
                parts.append((run.codes, run.ids, row_cells))
            else:
                inside = (run.ids >= start) & (run.ids < stop)
                parts.append((run.codes[inside], run.ids[inside], row_cells[inside]))
        if not parts:
            return (np.empty((0, self.n_subspaces), dtype=self.code_dtype),
                    np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
        codes, ids, cells = (np.concatenate(p) for p in zip(*parts))
        order = np.argsort(cells, kind="stable")  # runs in id order: ids ascend per cell
        return codes[order], ids[order], cells[order]

    def segment_arrays(self, start, stop):
        """Items ``start:stop`` grouped by cell, as a segment."""
        codes, ids, cells = self._rows_between(start, stop)
        counts = np.bincount(cells, minlength=self.n_lists)
        return {"codes": codes, "ids": ids,
                "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}

    def grouped(self):
        """Every item's code and id, grouped by cell (ids ascending within a cell)."""
        codes, ids, _ = self._rows_between(0, len(self))
        return codes, ids

    def on_remove(self, indices):
        np.subtract.at(self.live_sizes, self.list_of.array[indices], 1)

    def compact(self, keep):
        """Keep the items where ``keep`` is True, renumbered in order."""
        new_id = np.cumsum(keep) - 1
        codes, ids, cells = self._rows_between(0, len(self))
        kept = keep[ids]
        codes, ids, cells = codes[kept], new_id[ids[kept]], cells[kept]
        list_of = self.list_of.array[keep]
        self.__init__(self.n_lists, self.n_subspaces, self.n_codewords, self.fast_scan,
                      self.simd)
        if len(ids):
            self.runs.append(_CellRun._from_sorted(codes, ids, cells, 0))
            self._pack(self.runs[-1])
        self.list_of.append(list_of)
        self.sizes = np.bincount(list_of, minlength=self.n_lists).astype(np.int64)
        self.live_sizes = self.sizes.copy()

    def rows(self, indices):
        """Codes and cells of the items with the given database indices."""
        indices = np.asarray(indices, dtype=np.int64)
        lists = self.list_of.array[indices]
        codes = np.empty((len(indices), self.n_subspaces), dtype=self.code_dtype)
        firsts = np.array([run.first for run in self.runs], dtype=np.int64)
        which = np.searchsorted(firsts, indices, side="right") - 1
        for r in np.unique(which):
            run = self.runs[r]
            if r not in self._where:  # row of each of the run's items
                where = np.empty(len(run), dtype=np.int64)
                where[run.ids - run.first] = np.arange(len(run))
                self._where[r] = where
            at = np.flatnonzero(which == r)
            codes[at] = run.codes_of(self._where[r][indices[at] - run.first])
        return codes, lists

    def set_fast_scan(self, fast_scan, simd=None):
        """Switch the search between fast-scan and float lookups (same answers).

        Parameters
        ----------
        fast_scan : bool
            Search by fast-scan (4-bit codes only); the blocks are packed
            now when missing. Switched off, every code is kept as a row
            again and the blocks are dropped. Not while another thread
            searches the index.
        simd : bool or {"avx512", "avx2", "portable"}, default=None
            Shuffle path; ``None`` keeps the current one.

        Returns
        -------
        self : InvertedLists
        """
        if fast_scan and self.n_codewords != 16:
            raise ValueError(f"fast-scan searches 4-bit codes (16 codewords per subspace, "
                             f"subspace_bits=4); these codes have {self.n_codewords}.")
        if simd is not None:
            max_simd_level(simd)  # a clear error for an unknown path
            self.simd = simd
        self.fast_scan = bool(fast_scan)
        for run in self.runs:
            if not self.fast_scan and run.blocks is not None:
                run.unpack()  # the float lookups read every code from its row
            self._pack(run)
        self._layout = None
        return self

    def _pack(self, run):
        """The run's fast-scan blocks, unless built already (or fast-scan is off)."""
        if self.fast_scan and run.blocks is None:
            run.pack(self.FAST_SCAN_MIN_ROWS)

    def _chunk_layout(self):
        """Addresses of every cell's chunks (one per run), for the kernel.

        With fast-scan, also the address of each chunk's first block (0 for
        a chunk scored with float lookups).
        """
        if self._layout is None:
            row_bytes = self.n_subspaces * self.code_dtype.itemsize
            cells, codes_at, ids_at, blocks_at, sizes = [], [], [], [], []
            # Read only: the runs are packed when they are made (add, merge, load,
            # unpickling, set_fast_scan), never here, so that threads searching at
            # once never change what another one reads. A run without blocks is
            # scored from its rows.
            held = []  # the arrays whose addresses the layout holds, kept alive with it
            for run in self.runs:
                cells.append(run.cells)
                begin = run.starts[:-1]
                codes_at.append(run.code_rows_at(row_bytes))
                ids_at.append(run.ids.ctypes.data + begin * 8)
                sizes.append(np.diff(run.starts))
                held += [run._codes, run.loose, run.ids, run.blocks]
                if self.fast_scan and run.blocks is not None:
                    blocks_at.append(np.where(
                        run.block_at >= 0,
                        run.blocks.ctypes.data + run.block_at * run.blocks.shape[1], 0))
                else:
                    blocks_at.append(np.zeros(len(run.cells), dtype=np.intp))
            if cells:
                cells = np.concatenate(cells)
                order = np.argsort(cells, kind="stable")  # a cell's chunks in run order
                cells = cells[order]
                codes_at = np.concatenate(codes_at)[order]
                ids_at = np.concatenate(ids_at)[order]
                blocks_at = np.concatenate(blocks_at)[order]
                sizes = np.concatenate(sizes)[order]
            else:
                cells = sizes = np.empty(0, dtype=np.int64)
                codes_at = ids_at = blocks_at = np.empty(0, dtype=np.intp)
            offsets = np.searchsorted(cells, np.arange(self.n_lists + 1))
            self._layout = (offsets.astype(np.int64), np.asarray(codes_at, dtype=np.intp),
                            np.asarray(ids_at, dtype=np.intp),
                            np.asarray(sizes, dtype=np.int64),
                            np.asarray(blocks_at, dtype=np.intp), held)
            # Checked once here; the searches pass check_chunks=False.
            check_chunk_table(*self._layout[:4],
                              chunk_blocks=self._layout[4] if self.fast_scan else None)
        return self._layout

    def search(self, list_tables, query_tables, coarse, probes, table_rows, n_visit, k, *,
               allowed=None, exclude=None, n_threads=1, second_rows=None, split=0):
        """Scan each query's probed lists (see ``ivf_adc_kneighbors``).

        With ``fast_scan``, by ``ivf_fastscan_kneighbors``: the same answers.
        """
        return self._scan(ivf_fastscan_kneighbors, ivf_adc_kneighbors, list_tables,
                          query_tables, coarse, probes, table_rows, n_visit, k, allowed,
                          exclude, n_threads, second_rows, split)

    def radius(self, list_tables, query_tables, coarse, probes, table_rows, n_visit, threshold,
               *, allowed=None, exclude=None, n_threads=1, second_rows=None, split=0):
        """Every code of each query's probed lists below ``threshold`` (``ivf_adc_radius``).

        Returns CSR ``(offsets, distances, indices)``, indices ascending per
        query. With ``fast_scan``, by ``ivf_fastscan_radius``: the same answers.
        """
        return self._scan(ivf_fastscan_radius, ivf_adc_radius, list_tables, query_tables,
                          coarse, probes, table_rows, n_visit, threshold, allowed, exclude,
                          n_threads, second_rows, split)

    def _scan(self, fast_kernel, float_kernel, list_tables, query_tables, coarse, probes,
              table_rows, n_visit, last, allowed, exclude, n_threads, second_rows, split):
        """One of the pairs of IVF kernels over the chunk layout; ``last``: their k or threshold.

        The fast-scan kernel reads the blocks, the float kernel the code rows
        (and the codes' width); both take the rest alike.
        """
        offsets, codes_at, ids_at, sizes, blocks_at, keep = self._chunk_layout()
        if exclude is None:
            exclude = np.full(len(query_tables), -1, dtype=np.int64)
        head = (list_tables, query_tables, coarse, probes, table_rows, n_visit, offsets,
                codes_at, ids_at)
        options = {"allowed": allowed, "n_threads": n_threads, "second_rows": second_rows,
                   "split": split, "check_chunks": False}
        if self.fast_scan:
            result = fast_kernel(*head, blocks_at, sizes, exclude, last, simd=self.simd,
                                 **options)
        else:
            result = float_kernel(*head, sizes, self.code_dtype.itemsize, exclude, last,
                                  **options)
        del keep  # the arrays read stayed alive, referenced by the layout, during the scan
        return result


# ---------------------------------------------------------------- 4-bit fast-scan

class _BlockRows:
    """The codes of block layouts read as rows, unpacked on demand (read-only).

    What :class:`FastScan` offers in place of :class:`ChunkedRows`: the
    searchers read ``codes_``, the items' own codes (a database querying
    itself) and the rows to save through the same calls (``to_array``,
    ``slice``, ``take``), each unpacking only the rows asked.
    """

    def __init__(self, n_subspaces, block_chunks, sizes):
        self.row_shape = (n_subspaces,)
        self.dtype = np.dtype(np.uint8)
        self._blocks, self._sizes = block_chunks, sizes
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def __len__(self):
        return int(self._starts[-1])

    def take(self, indices):
        """Rows at the given indices (any order)."""
        indices = np.asarray(indices, dtype=np.int64).ravel()
        out = np.empty((indices.size, *self.row_shape), dtype=self.dtype)
        chunk = np.searchsorted(self._starts, indices, side="right") - 1
        for c in np.unique(chunk):
            inside = np.flatnonzero(chunk == c)
            out[inside] = unpack_block_rows(self._blocks[c], indices[inside] - self._starts[c],
                                            self.row_shape[0])
        return out

    def slice(self, start, stop):
        """Rows ``start:stop`` as one array."""
        return self.take(np.arange(start, max(start, stop)))

    def to_array(self):
        return self.slice(0, len(self))


class FastScan(_FlatScan):
    """4-bit codeword indices (16 codewords per subspace), searched by fast-scan.

    The codes are kept once, in the block layout of the fast-scan kernel
    (blocks of 128 codes, nibbles transposed; half a byte per codeword
    index), one block array per chunk of rows: sealed chunks (those an
    index was loaded from) and a growable tail. ``codes`` reads them as
    rows (:class:`_BlockRows`), for ``codes_``, persistence and the items
    querying themselves. Adding a batch packs only the new rows (and
    re-packs the last, partly filled block): O(batch) amortised. An index
    saves its codes as rows (a byte per codeword index); loading packs them
    into blocks in memory and leaves the saved rows on disk.

    The search (``fastscan_kneighbors``) filters with 8-bit quantized tables
    and re-scores with the float tables every item that can reach the top k,
    reading its codes from the blocks: its answers are the exact ADC answers
    of :class:`TableScan` (same float32 distances, same indices, ties by
    index), only faster.

    Parameters
    ----------
    n_subspaces : int
        Codeword indices per code; each below 16.
    simd : bool or str, default=True
        Shuffle path of the kernel (see ``fastscan_kneighbors``).
    """

    n_codewords = 16

    def __init__(self, n_subspaces, simd=True):
        self.n_subspaces = n_subspaces
        self.simd = simd
        self._sealed_blocks = []   # block layouts of the sealed chunks
        self._sealed_sizes = []    # their rows
        self._tail_blocks = GrowableArray((block_bytes(n_subspaces),), np.uint8)
        self._tail_rows = 0

    def __len__(self):
        return sum(self._sealed_sizes) + self._tail_rows

    @property
    def codes(self):
        """The codes as rows, unpacked from the blocks on demand."""
        return _BlockRows(self.n_subspaces, *self._blocks_and_sizes())

    def _blocks_and_sizes(self):
        """The block chunks and their rows, in row order (the tail a view until an add)."""
        if not self._tail_rows:
            return list(self._sealed_blocks), list(self._sealed_sizes)
        return ([*self._sealed_blocks, self._tail_blocks.array],
                [*self._sealed_sizes, self._tail_rows])

    def _check(self, codes):
        codes = np.asarray(codes)
        if codes.ndim == 2 and codes.dtype.kind in "iu":
            check_4bit_codes(codes)
        return check_codeword_indices(codes, self.n_subspaces, 16, np.uint8)

    def add(self, codes):
        codes = self._check(codes)
        if not len(codes):
            return
        tail, n_part = self._tail_blocks, self._tail_rows % BLOCK_ROWS
        if n_part:  # the last block, partly filled, is packed again with the new rows
            last = unpack_block_rows(tail.array[-1:], np.arange(n_part, dtype=np.int64),
                                     self.n_subspaces)
            codes = np.concatenate([last, codes])
        blocks = pack_blocks(np.ascontiguousarray(codes))
        if n_part:
            tail.array[-1] = blocks[0]
            blocks = blocks[1:]
        tail.append(blocks)
        self._tail_rows += len(codes) - n_part

    def add_segment(self, arrays):
        codes = self._check(arrays["codes"])
        sealed, sizes = self._blocks_and_sizes()
        if len(codes):
            sealed, sizes = [*sealed, pack_blocks(codes)], [*sizes, len(codes)]
        self.__init__(self.n_subspaces, self.simd)
        self._sealed_blocks, self._sealed_sizes = sealed, sizes

    def segment_arrays(self, start, stop):
        return {"codes": self.codes.slice(start, stop)}

    def checkpoint(self):
        state = dict(self.__dict__)
        blocks = self._tail_blocks
        restore_blocks = blocks.checkpoint()
        # add() re-packs the last block, partly filled, in place: kept to be put back.
        last = (len(blocks) - 1, blocks.array[-1].copy(), blocks._buffer) if len(blocks) else None

        def restore():
            self.__dict__.clear()
            self.__dict__.update(state)
            restore_blocks()
            if last is not None:
                at, row, buffer = last
                buffer[at] = row

        return restore

    def compact(self, keep):
        codes = self.codes.take(np.flatnonzero(keep))
        self.__init__(self.n_subspaces, self.simd)
        self.add(codes)

    def search(self, tables, k, *, allowed=None, exclude=None, n_threads=1):
        if np.shape(tables)[1:] != (self.n_subspaces, 16):
            raise ValueError(f"tables must have shape (n_queries, {self.n_subspaces}, 16) for "
                             f"these codes; got {np.shape(tables)}.")
        blocks, sizes = self._blocks_and_sizes()
        return fastscan_kneighbors(
            tables, blocks, sizes, k, n_threads=n_threads, simd=self.simd, exclude=exclude,
            allowed=allowed,
        )

    def radius(self, queries, threshold, *, allowed=None, exclude=None, n_threads=1):
        """Every item whose table sum is below ``threshold`` (CSR, indices ascending).

        The chunks are searched as one inverted list by ``ivf_fastscan_radius``
        (a zero list table, the query's table as its query term): the blocks
        are filtered by fast-scan with 8-bit tables quantized for the
        threshold and what passes is re-scored with the float table, so the
        answers are those of :class:`TableScan`'s float scan.
        """
        tables = np.ascontiguousarray(queries, dtype=np.float32)
        n_queries = len(tables)
        blocks, sizes = self._blocks_and_sizes()
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        ids = [np.arange(a, b, dtype=np.int64) for a, b in itertools.pairwise(starts)]
        zeros = np.zeros((n_queries, 1), dtype=np.int64)
        return ivf_fastscan_radius(
            np.zeros((1, *tables.shape[1:]), dtype=np.float32), tables,
            np.zeros((n_queries, 1), dtype=np.float32), zeros, zeros,
            np.ones(n_queries, dtype=np.int64), np.array([0, len(blocks)], dtype=np.int64),
            np.zeros(len(blocks), dtype=np.intp),  # no code rows: read from the blocks
            np.array([i.ctypes.data for i in ids], dtype=np.intp),
            np.array([b.ctypes.data for b in blocks], dtype=np.intp),
            np.diff(starts),
            np.full(n_queries, -1, dtype=np.int64) if exclude is None else exclude,
            threshold, allowed=allowed, n_threads=n_threads, simd=self.simd,
        )
