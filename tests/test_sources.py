"""Row sources: open_rows over files, arrays and block sequences."""
import numpy as np
import pytest
import torch

from torchnmf.io import open_rows
from torchnmf.nmf import NMF

scipy_sparse = pytest.importorskip("scipy.sparse")


def _matrix(seed=0, n=17, c=6, density=0.4):
    generator = np.random.default_rng(seed)
    dense = generator.random((n, c))
    dense[generator.random((n, c)) > density] = 0
    return dense


def _assert_rows(source, dense, ranges=((0, 17), (3, 9), (16, 17), (5, 5))):
    assert tuple(source.shape) == dense.shape
    for start, stop in ranges:
        block = source.read(start, stop)
        assert block.layout == (torch.sparse_csr if source.is_sparse else torch.strided)
        got = block.to_dense() if source.is_sparse else block
        np.testing.assert_allclose(got.numpy(), dense[start:stop], rtol=0, atol=0)
    # blocks may share buffers once read further: copy each as it comes
    stacked = torch.cat([b.clone() if b.layout == torch.strided else b.to_dense()
                         for _, _, b in source.blocks(4)])
    np.testing.assert_allclose(stacked.numpy(), dense, rtol=0, atol=0)


def test_npy_is_memory_mapped(tmp_path):
    dense = _matrix()
    np.save(tmp_path / "V.npy", dense)
    source = open_rows(tmp_path / "V.npy")
    assert isinstance(source.array, np.memmap) and not source.is_sparse
    assert source.dtype == torch.float64
    _assert_rows(source, dense)


@pytest.mark.parametrize("dtype", [">f8", ">i2", np.longdouble])
def test_big_endian_and_long_double_files_are_read(tmp_path, dtype):
    h5py = pytest.importorskip("h5py")
    dense = np.round(_matrix() * 100).astype(dtype)
    np.save(tmp_path / "V.npy", dense)
    _assert_rows(open_rows(tmp_path / "V.npy"), dense.astype(np.float64))
    np.savez(tmp_path / "V.npz", V=dense)
    _assert_rows(open_rows(tmp_path / "V.npz"), dense.astype(np.float64))
    if dtype != np.longdouble:  # HDF5 keeps the byte order
        with h5py.File(tmp_path / "V.h5ad", "w") as handle:
            handle["X"] = dense
        source = open_rows(tmp_path / "V.h5ad")
        _assert_rows(source, dense.astype(np.float64))
        source.close()


def test_sparse_npz_shards_and_directory(tmp_path):
    dense = _matrix()
    scipy_sparse.save_npz(tmp_path / "whole.npz", scipy_sparse.csr_matrix(dense))
    _assert_rows(open_rows(tmp_path / "whole.npz"), dense)
    shards = tmp_path / "shards"
    shards.mkdir()
    for index, (low, high) in enumerate(((0, 5), (5, 6), (6, 17))):
        scipy_sparse.save_npz(shards / f"part{index}.npz", scipy_sparse.csr_matrix(dense[low:high]))
    by_directory = open_rows(shards)
    assert by_directory.is_sparse
    _assert_rows(by_directory, dense)
    _assert_rows(open_rows(sorted(shards.iterdir())), dense)


def test_mtx_and_in_memory_objects(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    dense = _matrix()
    scipy_io.mmwrite(str(tmp_path / "V.mtx"), scipy_sparse.coo_matrix(dense))
    _assert_rows(open_rows(tmp_path / "V.mtx"), dense)
    _assert_rows(open_rows(scipy_sparse.csc_matrix(dense)), dense)
    _assert_rows(open_rows(torch.from_numpy(dense)), dense)
    _assert_rows(open_rows(torch.from_numpy(dense).to_sparse()), dense)
    blocks = [dense[:4], torch.from_numpy(dense[4:9]), scipy_sparse.csr_matrix(dense[9:])]
    _assert_rows(open_rows(blocks), dense)
    _assert_rows(open_rows(blocks, shape=dense.shape), dense)


def test_unsorted_scipy_matrices_are_read_without_changing_them():
    # before: open_rows sorted the caller's matrix and summed its duplicates in place
    def unsorted():
        return scipy_sparse.csr_matrix((np.array([1.0, 2.0, 3.0]), np.array([2, 0, 0]),
                                        np.array([0, 3, 3])), shape=(2, 3))

    for wrap in (lambda m: m, lambda m: [m]):
        matrix = unsorted()
        _assert_rows(open_rows(wrap(matrix)), np.array([[5.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),
                     ranges=((0, 2), (1, 2)))
        np.testing.assert_array_equal(matrix.indices, [2, 0, 0])
        np.testing.assert_array_equal(matrix.data, [1.0, 2.0, 3.0])


def _write_h5ad(path, dense, sparse):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as handle:  # the AnnData on-disk layout of X
        handle.attrs["encoding-type"] = "anndata"
        handle.attrs["encoding-version"] = "0.1.0"
        if sparse:
            matrix = scipy_sparse.csr_matrix(dense.astype(np.float32))
            group = handle.create_group("X")
            group.attrs["encoding-type"] = "csr_matrix"
            group.attrs["encoding-version"] = "0.1.0"
            group.attrs["shape"] = np.array(dense.shape)
            group["data"], group["indices"], group["indptr"] = (
                matrix.data, matrix.indices, matrix.indptr
            )
        else:
            handle["X"] = dense.astype(np.float32)
            handle["X"].attrs["encoding-type"] = "array"
            handle["X"].attrs["encoding-version"] = "0.2.0"


@pytest.mark.parametrize("sparse", [False, True])
def test_h5ad_dense_and_csr(tmp_path, sparse):
    dense = _matrix().astype(np.float32)
    _write_h5ad(tmp_path / "cells.h5ad", dense, sparse)
    source = open_rows(tmp_path / "cells.h5ad")
    assert source.is_sparse == sparse and source.dtype == torch.float32
    _assert_rows(source, dense)
    # a streamed fit from the file equals the in-memory fit
    V = torch.from_numpy(dense).double()
    W = torch.rand(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.1
    H = torch.rand(17, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.1
    memory, streamed = NMF(W=W, H=H), NMF(W=W, H=H)
    memory.fit(V, beta=1, tol=0, max_iter=10)
    streamed.fit(source, beta=1, tol=0, max_iter=10, block_rows=5)
    torch.testing.assert_close(streamed.W, memory.W, rtol=1e-10, atol=1e-12)
    source.close()


def _zip_with_text_member(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("V.txt", "1,2\n")


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("V.npy", lambda p: p.write_bytes(b""), r"V.npy is not a .npy file \(its header is wrong\)"),
        ("V.npy", lambda p: p.write_bytes(b"1,2\n3,4\n"), r"V.npy is not a .npy file"),
        ("V.npz", lambda p: p.write_bytes(b"1,2\n"), r"V.npz is not a .npz file \(not a zip archive\)"),
        ("V.npz", lambda p: (np.save(p.with_suffix(".npy"), np.ones((2, 2))), p.with_suffix(".npy").rename(p)), r"V.npz is not a .npz file"),
        ("V.npz", _zip_with_text_member, r"V.npz: its member 'V.txt' is not a .npy array"),
        ("V.npz", lambda p: np.savez(p, V=np.array([[1, None]], dtype=object)),
         r"V.npz cannot be read: Object arrays cannot be loaded when allow_pickle=False"),
        ("V.npz", lambda p: np.savez(p, format=np.array("csr"), shape=np.array([2, 2]),
                                     data=np.ones(2), indices=np.array([0, 5]),
                                     indptr=np.array([0, 1, 2])),
         r"V.npz is a malformed sparse matrix: indices must be < 2"),
        ("V.mtx", lambda p: p.write_text("%%MatrixMarket matrix coordinate real general\n2 2 2\n1 1 1\n"),
         r"V.mtx cannot be read: Truncated file"),
        ("shard.npz", lambda p: p.write_bytes(b"junk"), r"shard.npz is not a .npz file"),
    ],
)
def test_malformed_files_are_named(tmp_path, name, write, message):
    # a clear ValueError naming the file at open_rows, never numpy's pickle hint, an
    # AttributeError, or an IndexError deep in torch at the first read
    write(tmp_path / name)
    target = [tmp_path / name] if name.startswith("shard") else tmp_path / name
    with pytest.raises(ValueError, match=message):
        open_rows(target)


def _csr_group(path, shape=(2, 3), data=(1.0, 2.0), indices=(2, 0), indptr=(0, 1, 2),
               drop=None):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as handle:
        group = handle.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        if shape is not None:
            group.attrs["shape"] = np.array(shape)
        parts = dict(data=np.array(data), indices=np.array(indices), indptr=np.array(indptr))
        for name, values in parts.items():
            if name != drop:
                group[name] = values


def _vector_x(path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as handle:
        handle["X"] = np.ones(3)


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: p.write_bytes(b"not hdf5"), r"X.h5ad cannot be opened as an HDF5 \(.h5ad\) file"),
        (lambda p: _csr_group(p, shape=None), r"X.h5ad\['X'\] is a CSR group without its shape"),
        (lambda p: _csr_group(p, drop="data"), r"X.h5ad\['X'\] is a CSR group without data"),
        (lambda p: _csr_group(p, shape=(1, 3)), r"X.h5ad\['X'\] is a malformed CSR group: shape "
                                                r"\(1, 3\) needs 2 indptr entries"),
        (lambda p: _csr_group(p, indptr=(0, 1)), r"malformed CSR group: shape \(2, 3\) needs 3"),
        (lambda p: _csr_group(p, indptr=(0, 1, 3)), r"malformed CSR group"),
        (lambda p: _csr_group(p, indices=(2, 7)),
         r"X.h5ad\['X'\] is a malformed CSR group: in rows 0:2, indptr falls or a column index "
         r"is outside 0:3"),
        (_vector_x, r"X.h5ad\['X'\] must be a matrix, got shape \(3,\)"),
    ],
)
def test_malformed_h5ad_is_named(tmp_path, write, message):
    # before: a TypeError, KeyError or h5py RuntimeError at open_rows, an IndexError in
    # torch at the first read, or rows dropped without a word (a shape attribute too small)
    pytest.importorskip("h5py")
    write(tmp_path / "X.h5ad")
    with pytest.raises((ValueError, OSError), match=message):
        open_rows(tmp_path / "X.h5ad").read(0, 2)


def test_h5ad_unsorted_and_duplicate_indices_are_coalesced(tmp_path):
    # CSR written by another tool than scipy: each row's indices reversed and its first
    # value split in two entries; the blocks (and a streamed fit's loss) are those of the
    # summed matrix, as scipy's sum_duplicates makes them
    dense = _matrix(n=9, c=5, density=0.6)
    data, indices, indptr = [], [], [0]
    for row in dense:
        columns = list(np.flatnonzero(row)[::-1])
        values = list(row[columns])
        if columns:
            values[0] /= 2
            columns.append(columns[0])
            values.append(values[0])
        data, indices = data + values, indices + columns
        indptr.append(len(indices))
    _csr_group(tmp_path / "X.h5ad", shape=dense.shape, data=data, indices=indices, indptr=indptr)
    source = open_rows(tmp_path / "X.h5ad")
    _assert_rows(source, dense, ranges=((0, 9), (2, 7), (8, 9), (4, 4)))
    W = torch.rand(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.1
    H = torch.rand(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.1
    memory, streamed = NMF(W=W, H=H), NMF(W=W, H=H)
    memory.fit(torch.from_numpy(dense), beta=1, tol=0, max_iter=5)
    streamed.fit(source, beta=1, tol=0, max_iter=5, block_rows=4)
    torch.testing.assert_close(torch.tensor(streamed.loss_history),
                               torch.tensor(memory.loss_history), rtol=1e-10, atol=0)
    source.close()


def test_source_errors(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "bycolumn.h5ad", "w") as handle:
        group = handle.create_group("X")
        group.attrs["encoding-type"] = "csc_matrix"
    with pytest.raises(NotImplementedError, match="stored as csc_matrix.*tocsr"):
        open_rows(tmp_path / "bycolumn.h5ad")
    (tmp_path / "V.txt").write_text("1 2\n")
    with pytest.raises(ValueError, match="unsupported file type '.txt' for row blocks"):
        open_rows(tmp_path / "V.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_rows(tmp_path / "missing.npy")
    np.save(tmp_path / "a.npy", np.ones((2, 3)))
    np.save(tmp_path / "b.npy", np.ones((2, 4)))
    with pytest.raises(ValueError, match="same number of columns"):
        open_rows([tmp_path / "a.npy", tmp_path / "b.npy"])
    with pytest.raises(ValueError, match=r"rows 3:9 are outside 0:2"):
        open_rows(tmp_path / "a.npy").read(3, 9)
    source = open_rows([np.ones((2, 3))], shape=(3, 3))
    with pytest.raises(ValueError, match="the blocks hold 2 rows, but the declared shape is"):
        list(source.blocks())
    with pytest.raises(TypeError, match="open_rows needs a path"):
        open_rows(3.5)
