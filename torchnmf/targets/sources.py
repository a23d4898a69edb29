r"""Row sources: matrices that are read a block of rows at a time.

A *row source* describes an ``(N, C)`` matrix that need not be in memory:

- ``shape``: ``(N, C)``;
- ``dtype``: the torch dtype of the blocks it returns;
- ``is_sparse``: whether blocks come as sparse CSR tensors (else dense);
- ``read(start, stop)``: rows ``start:stop`` as a new torch tensor on the CPU;
- ``blocks(block_rows)``: ``(start, stop, block)`` for consecutive row blocks
  covering the matrix once, read lazily (a source with blocks of its own,
  :class:`BlockRows`, yields those); a block may be overwritten once two more
  have been read, so a consumer that keeps blocks copies them.

:func:`open_rows` opens one from a file (a memory-mapped ``.npy``, a sparse
``.npz`` or a list or directory of ``.npz`` shards, ``.mtx``, an AnnData
``.h5ad`` opened backed), an in-memory array or tensor (a ``numpy.memmap``
included), or a sequence of row blocks.  The streamed target kind
(:mod:`torchnmf.targets.streamed`) reads only through this interface, so a
user's own class with these members works as well.
"""
import contextlib
import mmap
import numbers
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "RowSource",
    "ArrayRows",
    "TensorRows",
    "ScipyRows",
    "ShardRows",
    "H5adRows",
    "BlockRows",
    "RowRange",
    "open_rows",
    "is_row_source",
]


def _torch_dtype_of(np_dtype, name):
    """The torch dtype a numpy dtype's blocks are returned in."""
    np_dtype = np.dtype(np_dtype)
    if np_dtype.hasobject or np_dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {np_dtype}")
    if np_dtype.kind == "f":  # half as float32, long double as float64 (torch has neither)
        return torch.float32 if np_dtype.itemsize <= 4 else torch.float64
    return torch.get_default_dtype()


def _dense_block(array, dtype):
    """A contiguous torch copy of a numpy array (a memmap slice is read here) in ``dtype``,
    converted by numpy first: torch takes neither big-endian nor long double arrays."""
    target = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype, np.float64)
    tensor = torch.from_numpy(np.array(array, dtype=target, order="C"))
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _csr(crow, col, values, shape):
    """A torch CSR tensor from trusted parts (sorted, in range)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _csr_block(indptr, indices, data, n_columns, dtype):
    """A torch CSR tensor from the CSR arrays of a row range (``indptr`` not yet shifted)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    crow = torch.from_numpy(indptr - indptr[0])
    col = torch.from_numpy(np.array(indices, dtype=np.int64))
    values = _dense_block(data, dtype)
    return _csr(crow, col, values, (len(indptr) - 1, n_columns))


def _sorted_unique(indptr, indices):
    """Whether every row's column indices rise strictly (``indptr`` not yet shifted)."""
    rising = np.diff(indices) > 0
    ends = np.asarray(indptr[1:-1], dtype=np.int64) - int(indptr[0]) - 1  # a row's last entry
    rising[ends[(ends >= 0) & (ends < rising.size)]] = True  # the next row may start lower
    return bool(rising.all())


def _coalesced_csr_block(indptr, indices, data, n_columns, dtype):
    """:func:`_csr_block` of unsorted CSR arrays, duplicates summed (as scipy's
    ``sum_duplicates``): the statistics read each stored entry as a value of its own."""
    counts = np.diff(np.asarray(indptr, dtype=np.int64))
    rows = np.repeat(np.arange(len(counts)), counts)
    coo = torch.sparse_coo_tensor(
        torch.from_numpy(np.vstack([rows, np.asarray(indices, dtype=np.int64)])),
        _dense_block(data, dtype), (len(counts), n_columns), check_invariants=True,
    ).coalesce()
    crow = torch.searchsorted(coo.indices()[0], torch.arange(len(counts) + 1))
    return _csr(crow, coo.indices()[1].clone(), coo.values(), (len(counts), n_columns))


class RowSource:
    """Base class of row sources: ``blocks`` from ``read``."""

    is_sparse = False

    def blocks(self, block_rows):
        N = self.shape[0]
        for start in range(0, N, block_rows):
            stop = min(start + block_rows, N)
            yield start, stop, self.read(start, stop)

    def _check_range(self, start, stop):
        N = self.shape[0]
        if not (0 <= start <= stop <= N):
            raise ValueError(f"rows {start}:{stop} are outside 0:{N}")

    def __repr__(self):
        kind = "sparse" if self.is_sparse else "dense"
        return f"{type(self).__name__}({self.shape[0]} x {self.shape[1]}, {kind}, {self.dtype})"


class ArrayRows(RowSource):
    """A dense 2-D numpy array or ``numpy.memmap``; a block is read (copied) on demand."""

    def __init__(self, array, name="V"):
        if array.ndim != 2:
            raise ValueError(f"{name} must be a matrix (2-D), got shape {array.shape}")
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = _torch_dtype_of(array.dtype, name)

    def read(self, start, stop):
        self._check_range(start, stop)
        view = self.array[start:stop]
        block = _dense_block(view, self.dtype)
        _release_pages(self.array, view)
        return block

    def blocks(self, block_rows):
        """Consecutive blocks, copied into a ring of three buffers kept for the next
        pass: a block stays valid until two more have been read, and one pass
        runs at a time (fresh allocations of this size cost more than the copy
        itself on many machines)."""
        N, C = self.shape
        same_dtype = np.dtype(self.array.dtype) == torch.empty((), dtype=self.dtype).numpy().dtype
        if same_dtype and _read_only_map(self.array):
            yield from self._mapped_blocks(block_rows)
            return
        rows = min(block_rows, N)
        ring = None
        if same_dtype:
            ring = getattr(self, "_ring", None)
            if ring is None or ring[0].shape[0] != rows:
                ring = self._ring = [np.empty((rows, C), dtype=self.array.dtype) for _ in range(3)]
        for index, start in enumerate(range(0, N, block_rows)):
            stop = min(start + block_rows, N)
            if ring is None:
                yield start, stop, self.read(start, stop)
                continue
            view = self.array[start:stop]
            buffer = ring[index % 3][:stop - start]
            np.copyto(buffer, view)
            _release_pages(self.array, view)
            yield start, stop, torch.from_numpy(buffer)

    def _mapped_blocks(self, block_rows):
        """Blocks of a read-only memory map without a copy: each block's pages are
        faulted in here (by the reading thread, from the page cache or the disk)
        and the tensor views the mapping; a block's pages leave the resident set
        two blocks later (the file is read-only, so the view stays valid)."""
        N = self.shape[0]
        behind = []
        for start in range(0, N, block_rows):
            stop = min(start + block_rows, N)
            view = self.array[start:stop]
            _prefault(view)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                block = torch.from_numpy(np.asarray(view))
            behind.append(view)
            if len(behind) > 2:
                _release_pages(self.array, behind.pop(0))
            yield start, stop, block
        for view in behind:
            _release_pages(self.array, view)


def _read_only_map(array):
    return (isinstance(array, np.memmap) and getattr(array, "mode", None) == "r"
            and array.flags.c_contiguous and getattr(array, "_mmap", None) is not None)


def _prefault(view):
    """Touch one value per page of a C-contiguous memory-mapped view (numpy releases
    the GIL in the reduction, so the consumer thread keeps computing)."""
    flat = np.asarray(view).reshape(-1)
    step = max(1, mmap.PAGESIZE // flat.itemsize)
    if flat.size:
        flat[::step].sum()


def _release_pages(array, view):
    """Drop the pages of a read-only memory map that ``view`` touched from the
    process's resident set (they stay in the page cache), so that streaming a
    memmap never makes the process hold the file."""
    raw = getattr(array, "_mmap", None)
    if raw is None or getattr(array, "mode", None) != "r" or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        base = np.frombuffer(raw, dtype=np.uint8).ctypes.data
        low = view.ctypes.data - base
        high = low + view.nbytes
        low -= low % mmap.PAGESIZE
        if high > low:
            raw.madvise(mmap.MADV_DONTNEED, low, min(high, len(raw)) - low)
    except (ValueError, OSError, TypeError):  # not our mapping's layout: keep the pages
        pass


class TensorRows(RowSource):
    """A torch tensor, dense or sparse (kept as CSR), served in row blocks."""

    def __init__(self, tensor, name="V"):
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be a matrix (2-D), got shape {tuple(tensor.shape)}")
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype()
        self.is_sparse = tensor.layout != torch.strided
        if self.is_sparse:
            from .sparse import to_csr  # sorted, unique indices

            csr = to_csr(tensor.coalesce() if tensor.layout == torch.sparse_coo else tensor)
            self.tensor = csr
            self._crow = csr.crow_indices()
        else:
            self.tensor = tensor

    def read(self, start, stop):
        self._check_range(start, stop)
        if not self.is_sparse:
            return self.tensor[start:stop].to(self.dtype)
        low, high = int(self._crow[start]), int(self._crow[stop])
        return _csr(
            self._crow[start:stop + 1] - low, self.tensor.col_indices()[low:high],
            self.tensor.values()[low:high].to(self.dtype), (stop - start, self.shape[1]),
        )


class ScipyRows(RowSource):
    """A scipy sparse matrix (converted to CSR once), served as torch CSR blocks."""

    is_sparse = True

    def __init__(self, matrix, name="V"):
        self.matrix = matrix.tocsr()
        try:  # indices in range, indptr rising: before sorting, which trusts them
            self.matrix.check_format(full_check=True)
        except ValueError as error:
            raise ValueError(f"{name} is a malformed sparse matrix: {error}") from None
        if not self.matrix.has_canonical_format:  # in place would change the caller's matrix
            self.matrix = self.matrix.copy()
            self.matrix.sum_duplicates()  # sorted, each entry once
        self.shape = tuple(int(s) for s in self.matrix.shape)
        self.dtype = _torch_dtype_of(self.matrix.dtype, name)

    def read(self, start, stop):
        self._check_range(start, stop)
        m = self.matrix
        low, high = m.indptr[start], m.indptr[stop]
        return _csr_block(m.indptr[start:stop + 1], m.indices[low:high], m.data[low:high],
                          self.shape[1], self.dtype)


@contextlib.contextmanager
def _reading(path):
    """What numpy or scipy raise on a file they cannot read, as a ValueError naming it."""
    try:
        yield
    except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        detail = " ".join(str(error).split())
        if isinstance(error, ValueError) and detail.startswith(path.name):
            raise
        raise ValueError(f"{path.name} cannot be read: {detail}") from None


def _memmap_npy(path):
    """A read-only memory map of a ``.npy`` file (never unpickled)."""
    with open(path, "rb") as handle:
        if handle.read(6) != b"\x93NUMPY":
            raise ValueError(f"{path.name} is not a .npy file (its header is wrong)")
    with _reading(path):
        return np.load(path, mmap_mode="r", allow_pickle=False)


def _open_npz(path):
    """An open ``.npz`` archive (never unpickled); read its members with :func:`_npz_array`."""
    with open(path, "rb") as handle:  # a missing file: OSError, as for every reader
        if not zipfile.is_zipfile(handle):
            raise ValueError(f"{path.name} is not a .npz file (not a zip archive)")
    return np.load(path, allow_pickle=False)


def _npz_array(archive, name, path):
    """Member ``name`` of an open ``.npz`` archive (numpy hands other files back as bytes)."""
    array = archive[name]
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path.name}: its member {name!r} is not a .npy array")
    return array


def _shard_shape(path):
    """The shape of one shard without reading its data (a dense ``.npz``'s is read)."""
    if path.suffix.lower() == ".npy":
        return _memmap_npy(path).shape
    with _reading(path), _open_npz(path) as archive:
        if "format" in archive.files:  # scipy.sparse.save_npz: as _open_file decides
            return tuple(int(s) for s in _npz_array(archive, "shape", path))
        names = archive.files
        if len(names) != 1:
            raise ValueError(f"{path.name}: a shard must be a scipy sparse .npz or hold one array")
        return _npz_array(archive, names[0], path).shape


def _load_shard(path):
    """One shard as a row source (sparse .npz, dense .npz or memory-mapped .npy)."""
    return _open_file(path, None)


class ShardRows(RowSource):
    """Row-wise shards (sparse ``.npz`` saved by ``scipy.sparse.save_npz``, dense
    ``.npz`` or ``.npy``) stacked in the order given; one shard is held at a time."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("the shard list is empty; give at least one .npz or .npy file")
        shapes = [_shard_shape(p) for p in self.paths]
        for path, shape in zip(self.paths, shapes):
            if len(shape) != 2 or shape[1] != shapes[0][1]:
                raise ValueError(
                    f"{path.name}: shards must be matrices with the same number of columns; "
                    f"the first has shape {tuple(shapes[0])}, this one {tuple(shape)}"
                )
        self.offsets = np.cumsum([0] + [s[0] for s in shapes])
        self.shape = (int(self.offsets[-1]), int(shapes[0][1]))
        first = _load_shard(self.paths[0])
        self.is_sparse, self.dtype = first.is_sparse, first.dtype
        self._cached = (0, first)

    def _shard(self, index):
        if self._cached[0] != index:
            self._cached = (index, _load_shard(self.paths[index]))
        return self._cached[1]

    def read(self, start, stop):
        self._check_range(start, stop)
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for index in range(max(first, 0), len(self.paths)):
            low, high = int(self.offsets[index]), int(self.offsets[index + 1])
            if low >= stop and parts:
                break
            if high <= start:
                continue
            shard = self._shard(index)
            part = shard.read(max(start, low) - low, min(stop, high) - low)
            parts.append(part.to_dense() if not self.is_sparse and part.layout != torch.strided
                         else part)
        return _stack(parts, self.shape[1], self.dtype, self.is_sparse)


def _stack(parts, n_columns, dtype, sparse):
    """Row blocks stacked into one (a CSR block for sparse parts)."""
    if not parts:
        if not sparse:
            return torch.empty(0, n_columns, dtype=dtype)
        return _csr(torch.zeros(1, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                    torch.empty(0, dtype=dtype), (0, n_columns))
    if len(parts) == 1:
        part = parts[0]
    elif not sparse:
        part = torch.cat([p.to_dense() if p.layout != torch.strided else p for p in parts])
    else:
        parts = [p if p.layout == torch.sparse_csr else p.to_sparse_csr() for p in parts]
        crows, offset = [parts[0].crow_indices()[:1]], 0
        for p in parts:
            crows.append(p.crow_indices()[1:] + offset)
            offset += p.values().numel()
        part = _csr(
            torch.cat(crows), torch.cat([p.col_indices() for p in parts]),
            torch.cat([p.values() for p in parts]), (sum(p.shape[0] for p in parts), n_columns),
        )
    if sparse and part.layout != torch.sparse_csr:
        part = part.to_sparse_csr()
    elif not sparse and part.layout != torch.strided:
        part = part.to_dense()
    return part if part.dtype == dtype else part.to(dtype)


class H5adRows(RowSource):
    """The ``X`` matrix of an AnnData ``.h5ad`` file, read with h5py (never loaded whole).

    ``X`` may be a dense dataset or a CSR group (``data``, ``indices``,
    ``indptr``); ``key`` names another matrix (e.g. ``"layers/counts"``).  A
    CSC group would need the whole file for every row block and is refused.
    The file stays open until :meth:`close` (or garbage collection).
    """

    def __init__(self, path, key=None):
        try:
            import h5py
        except ImportError:
            raise ImportError("reading .h5ad files needs h5py; pip install 'torchnmf[h5ad]'") from None
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as error:
            raise OSError(f"{self.path.name} cannot be opened as an HDF5 (.h5ad) file: "
                          f"{error}") from None
        try:
            self._open(h5py, key or "X")
        except BaseException:
            self.file.close()
            raise

    def _open(self, h5py, key):
        self.name = f"{self.path.name}[{key!r}]"
        if key not in self.file:
            raise ValueError(f"{self.path.name} has no matrix {key!r}")
        node = self.file[key]
        if isinstance(node, h5py.Dataset):
            if node.ndim != 2:
                raise ValueError(f"{self.name} must be a matrix, got shape {node.shape}")
            self.dense = node
            self.shape = tuple(int(s) for s in node.shape)
            self.dtype = _torch_dtype_of(node.dtype, self.name)
            return
        encoding = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", ""))
        encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
        if encoding not in ("csr_matrix", "csr"):
            raise NotImplementedError(
                f"{self.name} is stored as {encoding or 'an unknown group'}; row "
                f"blocks need a dense or CSR matrix: write it with adata.X = adata.X.tocsr()"
            )
        missing = [part for part in ("data", "indices", "indptr") if part not in node]
        shape = node.attrs.get("shape", node.attrs.get("h5sparse_shape"))
        if missing or shape is None:
            raise ValueError(f"{self.name} is a CSR group without "
                             f"{', '.join(missing) or 'its shape attribute'}")
        shape = np.asarray(shape).reshape(-1)
        if shape.size != 2 or shape.dtype.kind not in "iu" or (shape < 0).any():
            raise ValueError(f"{self.name} has shape {shape.tolist()}; a matrix needs two "
                             f"non-negative integers")
        self.dense = None
        self.data, self.indices, self.indptr = node["data"], node["indices"], node["indptr"]
        self.shape = tuple(int(s) for s in shape)
        stored = int(self.indptr[-1]) if self.indptr.shape[0] else None
        if (self.indptr.shape != (self.shape[0] + 1,) or stored != self.data.shape[0]
                or self.indices.shape != self.data.shape):
            raise ValueError(
                f"{self.name} is a malformed CSR group: shape {self.shape} needs "
                f"{self.shape[0] + 1} indptr entries ending at the number of stored values; it "
                f"has {self.indptr.shape[0]} ending at {stored}, {self.data.shape[0]} values and "
                f"{self.indices.shape[0]} indices"
            )
        self.dtype = _torch_dtype_of(self.data.dtype, self.name)
        self.is_sparse = True

    def read(self, start, stop):
        self._check_range(start, stop)
        if self.dense is not None:
            return _dense_block(self.dense[start:stop], self.dtype)
        indptr = self.indptr[start:stop + 1]
        low, high = int(indptr[0]), int(indptr[-1])
        indices = self.indices[low:high]
        # checked block by block: the whole index array may not fit in memory
        if (np.diff(indptr) < 0).any() or (indices.size and (
                indices.min() < 0 or indices.max() >= self.shape[1])):
            raise ValueError(
                f"{self.name} is a malformed CSR group: in rows {start}:{stop}, indptr falls "
                f"or a column index is outside 0:{self.shape[1]}"
            )
        if not _sorted_unique(indptr, indices):  # written by other tools than scipy
            return _coalesced_csr_block(indptr, indices, self.data[low:high], self.shape[1],
                                        self.dtype)
        return _csr_block(indptr, indices, self.data[low:high], self.shape[1], self.dtype)

    def close(self):
        self.file.close()

    def __del__(self):
        try:
            self.file.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _as_block(block, index):
    """One user block as a torch tensor (dense, or sparse CSR)."""
    if isinstance(block, torch.Tensor):
        tensor = block.detach()
        if tensor.layout not in (torch.strided, torch.sparse_csr):
            tensor = tensor.to_sparse_csr() if tensor.layout != torch.sparse_coo else (
                tensor.coalesce().to_sparse_csr()
            )
    elif hasattr(block, "tocsr"):
        csr = block.tocsr()
        if not csr.has_canonical_format:  # in place would change the caller's block
            csr = csr.copy()
            csr.sum_duplicates()  # sorted, each entry once
        tensor = _csr_block(csr.indptr, csr.indices, csr.data, csr.shape[1],
                            _torch_dtype_of(csr.dtype, f"block {index}"))
    elif isinstance(block, np.ndarray):
        tensor = _dense_block(block, _torch_dtype_of(block.dtype, f"block {index}"))
    else:
        raise TypeError(
            f"block {index} must be a torch tensor, a numpy array or a scipy sparse matrix, "
            f"got {type(block).__name__}"
        )
    if tensor.dim() != 2:
        raise ValueError(f"block {index} must be 2-D (rows x columns), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


class BlockRows(RowSource):
    """A user's sequence (or re-iterable) of row blocks, stacked in order.

    Blocks may be torch tensors (dense or sparse), numpy arrays or scipy sparse
    matrices, of any row counts; :meth:`blocks` yields each in its own kind
    (dense or CSR), :meth:`read` in the kind of the first.  ``shape`` is checked as the blocks are read;
    when not given, one pass over the blocks finds it.  A one-shot iterator
    (a generator) is refused: every fitting iteration reads the blocks again.
    """

    def __init__(self, blocks, shape=None):
        if iter(blocks) is blocks:
            raise TypeError(
                "V as an iterator (e.g. a generator) can be read only once, but a fit reads "
                "the rows every iteration; pass a list, or an object whose __iter__ starts "
                "the blocks anew"
            )
        self.source = blocks
        first = None
        if shape is None:
            rows, columns = 0, None
            for index, block in enumerate(blocks):
                block = _as_block(block, index)
                first = block if first is None else first
                columns = block.shape[1] if columns is None else columns
                if block.shape[1] != columns:
                    raise ValueError(
                        f"block {index} has {block.shape[1]} columns, block 0 has {columns}"
                    )
                rows += block.shape[0]
            if first is None:
                raise ValueError("the sequence of row blocks is empty")
            shape = (rows, columns)
        else:
            shape = tuple(shape)
            if len(shape) != 2 or not all(
                isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in shape
            ):
                raise ValueError(f"shape must be two positive integers (N, C), got {shape}")
            for index, block in enumerate(blocks):
                first = _as_block(block, index)
                break
            if first is None:
                raise ValueError("the sequence of row blocks is empty")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = first.dtype
        self.is_sparse = first.layout != torch.strided

    def blocks(self, block_rows=None):
        start = 0
        N, C = self.shape
        for index, block in enumerate(self.source):
            block = _as_block(block, index)
            stop = start + block.shape[0]
            if block.shape[1] != C or stop > N:
                raise ValueError(
                    f"block {index} of shape {tuple(block.shape)} does not fit the declared "
                    f"shape {self.shape} after row {start}"
                )
            if block.dtype != self.dtype:
                block = block.to(self.dtype)
            yield start, stop, block
            start = stop
        if start != N:
            raise ValueError(f"the blocks hold {start} rows, but the declared shape is {self.shape}")

    def read(self, start, stop):
        self._check_range(start, stop)
        parts = []
        for low, high, block in self.blocks():
            if high <= start or low >= stop:
                continue
            parts.append(block[max(start, low) - low:min(stop, high) - low] if block.layout == torch.strided
                         else _csr_rows(block, max(start, low) - low, min(stop, high) - low))
            if high >= stop:
                break
        return _stack(parts, self.shape[1], self.dtype, self.is_sparse)


def _csr_rows(csr, start, stop):
    crow = csr.crow_indices()
    low, high = int(crow[start]), int(crow[stop])
    return _csr(
        crow[start:stop + 1] - low, csr.col_indices()[low:high], csr.values()[low:high],
        (stop - start, csr.shape[1]),
    )


class RowRange(RowSource):
    """Rows ``start:stop`` of another row source, a source of their own: each process
    of a distributed fit streams its own rows of one file.

    Examples::

        >>> import torch
        >>> from torchnmf.targets.sources import RowRange, TensorRows
        >>> rows = RowRange(TensorRows(torch.arange(12.0).reshape(6, 2)), 2, 5)
        >>> rows.shape, rows.read(0, 2).tolist()
        ((3, 2), [[4.0, 5.0], [6.0, 7.0]])
    """

    def __init__(self, source, start, stop):
        N = source.shape[0]
        for name, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
        if not 0 <= start <= stop <= N:
            raise ValueError(f"rows {start}:{stop} are outside the source's 0:{N}")
        self.source, self.start = source, int(start)
        self.shape = (int(stop) - int(start), source.shape[1])
        self.dtype, self.is_sparse = source.dtype, source.is_sparse

    def read(self, start, stop):
        self._check_range(start, stop)
        return self.source.read(self.start + start, self.start + stop)


def is_row_source(obj):
    """Whether ``obj`` is streamed by ``fit``: a row source or a ``numpy.memmap``."""
    if isinstance(obj, (RowSource, np.memmap)):
        return True
    return all(hasattr(obj, name) for name in ("read", "shape", "dtype", "is_sparse")) and not (
        isinstance(obj, torch.Tensor)
    )


def _shard_paths(directory):
    paths = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in (".npz", ".npy"))
    if not paths:
        raise ValueError(f"{directory}: the directory holds no .npz or .npy shards")
    return paths


def open_rows(path, *, key=None, shape=None):
    """A row source over ``path``, for fits streamed from disk.

    Args:
        path: a file (``.npy`` memory-mapped; ``.npz`` sparse or dense;
            ``.mtx``; ``.h5ad``), a directory of ``.npz``/``.npy`` shards (in
            name order) or a list of shard paths; or, in memory, a numpy array
            or ``numpy.memmap``, a scipy sparse matrix, a torch tensor, or a
            sequence of row blocks (tensors, arrays or scipy sparse matrices).
        key (str, keyword-only): the array of a dense ``.npz`` with several, or
            the matrix of an ``.h5ad`` (default ``"X"``).
        shape (tuple, keyword-only): ``(N, C)`` of a sequence of row blocks,
            which otherwise is read once to find it.

    Returns:
        a row source: ``.shape``, ``.dtype``, ``.is_sparse``, ``.read(start,
        stop)`` (a dense tensor or a sparse CSR tensor of those rows) and
        ``.blocks(block_rows)``.

    Raises:
        ValueError: an unknown suffix, a malformed file, shards that disagree.
        OSError: a file that cannot be opened.
        NotImplementedError: an ``.h5ad`` whose matrix is stored by columns.

    Examples::

        >>> import os, tempfile
        >>> import numpy as np
        >>> from torchnmf.io import open_rows
        >>> path = os.path.join(tempfile.mkdtemp(), "V.npy")
        >>> np.save(path, np.arange(12.0).reshape(4, 3))
        >>> rows = open_rows(path)   # memory-mapped, read in blocks of rows
        >>> rows.shape, rows.is_sparse
        ((4, 3), False)
        >>> rows.read(1, 3)
        tensor([[3., 4., 5.],
                [6., 7., 8.]], dtype=torch.float64)
    """
    if isinstance(path, RowSource):
        return path
    if isinstance(path, np.ndarray):
        return ArrayRows(path)
    if isinstance(path, torch.Tensor):
        return TensorRows(path)
    if hasattr(path, "tocsr") and hasattr(path, "shape"):
        return ScipyRows(path)
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
        if path.is_dir():
            return ShardRows(_shard_paths(path))
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file or directory")
        return _open_file(path, key)
    if isinstance(path, (list, tuple)) and path and all(
        isinstance(p, (str, os.PathLike)) for p in path
    ):
        return ShardRows(path)
    try:
        iter(path)
    except TypeError:
        raise TypeError(
            f"open_rows needs a path, an array, a tensor or a sequence of row blocks, got "
            f"{type(path).__name__}"
        ) from None
    return BlockRows(path, shape)


def _open_file(path, key):
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return ArrayRows(_memmap_npy(path), path.name)
    if suffix == ".npz":
        with _reading(path), _open_npz(path) as archive:
            names = archive.files
            if "format" in names and key is None:
                from scipy import sparse

                return ScipyRows(sparse.load_npz(path), path.name)
            key = key or (names[0] if len(names) == 1 else "V")
            if key not in names:
                raise ValueError(f"{path.name} has no array {key!r}; it holds "
                                 f"{', '.join(names) or 'none'}")
            return ArrayRows(_npz_array(archive, key, path), f"{path.name}[{key!r}]")
    if suffix == ".mtx":
        from scipy import io as scipy_io

        with _reading(path):
            matrix = scipy_io.mmread(str(path))
        return ArrayRows(matrix, path.name) if isinstance(matrix, np.ndarray) else ScipyRows(
            matrix, path.name
        )
    if suffix == ".h5ad":
        return H5adRows(path, key)
    raise ValueError(
        f"{path.name}: unsupported file type {suffix or '(no suffix)'!r} for row blocks; use "
        f".npy, .npz, .mtx, .h5ad or a directory of .npz shards"
    )
