"""``torchnmf fit`` under torchrun (two gloo processes) writes what the plain command writes."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from _distributed_pool import free_port
from torchnmf.cli import main

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def torchrun(args, cwd):
    command = [TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "torchnmf", "fit", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def plain_fit(args, cwd):
    """The single-process command, run in ``cwd``, writing plain.npz."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(["fit", *args, "-o", "plain.npz"]) == 0
    finally:
        os.chdir(here)


def assert_same_output(plain, shared):
    assert sorted(plain.files) == sorted(shared.files)
    for key in plain.files:
        if plain[key].dtype.kind == "f":
            np.testing.assert_allclose(shared[key], plain[key], rtol=1e-10, atol=1e-12)
        else:
            assert (shared[key] == plain[key]).all(), key


def assert_same_figure(plain_png, shared_png):
    from matplotlib.image import imread

    plain, shared = imread(plain_png), imread(shared_png)
    assert plain.shape == shared.shape
    # the same pixels, but for a rare colour step where the factors differ by rounding
    differing = np.abs(plain - shared).max(axis=-1) > 1.5 / 255
    assert differing.mean() < 1e-4, differing.mean()


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("name", ["V.npy", "V.npz", "V.mtx"])
def test_torchrun_fit_equals_plain_fit(tmp_path, name):
    rng = np.random.default_rng(0)
    V = rng.random((41, 4)) @ rng.random((4, 13))
    sparse = name != "V.npy"
    if sparse:
        import scipy.io
        import scipy.sparse

        V = scipy.sparse.csr_matrix(V * (rng.random(V.shape) < 0.4))
        if name == "V.npz":
            scipy.sparse.save_npz(tmp_path / name, V)
        else:
            scipy.io.mmwrite(tmp_path / name, V, precision=17)
    else:
        np.save(tmp_path / name, V)
    common = [name, "-r", "3", "--max-iter", "25", "--tol", "0", "--init", "nndsvda",
              "--solver", "mu_extrapolated", "--dtype", "float64", "-q"]
    plain_fit(common, tmp_path)
    done = torchrun([*common, "-o", "shared.npz", "--checkpoint", "fit.ckpt",
                     "--checkpoint-every", "10"], tmp_path)
    assert done.returncode == 0, done.stderr
    plain, shared = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "shared.npz")
    assert_same_output(plain, shared)
    assert (tmp_path / "fit.ckpt.rank0").is_file() and (tmp_path / "fit.ckpt.rank1").is_file()
    if sparse:
        return
    # a restarted job (torchrun --max-restarts) resumes from the checkpoints
    again = torchrun([*common, "-o", "again.npz", "--checkpoint", "fit.ckpt",
                      "--max-iter", "40"], tmp_path)
    assert again.returncode == 0, again.stderr
    longer = np.load(tmp_path / "again.npz")
    assert int(longer["n_iter"]) == 40
    np.testing.assert_allclose(longer["loss_history"][:25], plain["loss_history"][:25], rtol=1e-10)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_torchrun_nccl_on_two_gpus(tmp_path):
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (NCCL runs one process per GPU)")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "V.npy", rng.random((64, 4)) @ rng.random((4, 16)))
    common = ["V.npy", "-r", "3", "--max-iter", "20", "--tol", "0", "--dtype", "float64", "-q"]
    plain_fit(common, tmp_path)
    done = torchrun([*common, "--device", "cuda", "-o", "gpu.npz"], tmp_path)
    assert done.returncode == 0, done.stderr
    plain, gpu = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "gpu.npz")
    np.testing.assert_allclose(gpu["W"], plain["W"], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(gpu["loss_history"], plain["loss_history"], rtol=1e-8)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_torchrun_nmfd_and_plot_equal_plain(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(1)
    # five sequences of 6 channels x 30 frames: NMFD's rows are the sequences
    np.save(tmp_path / "V.npy", rng.random((5, 6, 30)) + 0.05)
    common = ["V.npy", "-r", "2", "--model", "nmfd", "--T", "4", "--max-iter", "15", "--tol", "0",
              "--dtype", "float64", "-q"]
    plain_fit([*common, "--plot", "plain.png"], tmp_path)
    done = torchrun([*common, "-o", "shared.npz", "--plot", "shared.png"], tmp_path)
    assert done.returncode == 0, done.stderr
    plain, shared = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "shared.npz")
    assert shared["H"].shape == (5, 2, 27)
    assert_same_output(plain, shared)
    assert_same_figure(tmp_path / "plain.png", tmp_path / "shared.png")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_torchrun_plot_of_a_long_sparse_matrix(tmp_path):
    # more rows than the figure draws: rank 0 reads only those of the file
    pytest.importorskip("matplotlib")
    import scipy.sparse

    rng = np.random.default_rng(2)
    V = rng.random((2050, 3)) @ rng.random((3, 7))
    scipy.sparse.save_npz(tmp_path / "V.npz", scipy.sparse.csr_matrix(V * (rng.random(V.shape) < 0.5)))
    common = ["V.npz", "-r", "3", "--max-iter", "10", "--tol", "0", "--dtype", "float64", "-q"]
    plain_fit([*common, "--plot", "plain.png"], tmp_path)
    done = torchrun([*common, "-o", "shared.npz", "--plot", "shared.png"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_output(np.load(tmp_path / "plain.npz"), np.load(tmp_path / "shared.npz"))
    assert_same_figure(tmp_path / "plain.png", tmp_path / "shared.png")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_torchrun_reads_its_rows_of_an_h5ad(tmp_path):
    # AnnData's on-disk CSR layout of X; each process reads its rows through h5py, and the
    # result is the plain command's streamed fit of the same file
    h5py = pytest.importorskip("h5py")
    import scipy.sparse

    rng = np.random.default_rng(3)
    V = (rng.random((37, 3)) @ rng.random((3, 9))) * (rng.random((37, 9)) < 0.6)
    matrix = scipy.sparse.csr_matrix(V.astype(np.float32))
    with h5py.File(tmp_path / "cells.h5ad", "w") as handle:
        handle.attrs["encoding-type"] = "anndata"
        group = handle.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["shape"] = np.array(V.shape)
        group["data"], group["indices"], group["indptr"] = matrix.data, matrix.indices, matrix.indptr
    common = ["cells.h5ad", "-r", "2", "--max-iter", "12", "--tol", "0", "--dtype", "float64",
              "--init", "random", "-q"]
    plain_fit([*common, "--stream"], tmp_path)
    done = torchrun([*common, "-o", "shared.npz"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_output(np.load(tmp_path / "plain.npz"), np.load(tmp_path / "shared.npz"))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_torchrun_nmfd_needs_sequences(tmp_path):
    np.save(tmp_path / "V.npy", np.ones((30, 6)))
    done = torchrun(["V.npy", "-r", "2", "--model", "nmfd", "-q"], tmp_path)
    assert done.returncode == 1
    assert "splits the sequences (dimension 0 of an (N, C, L) INPUT) over the 2 processes, " \
           "but V.npy has shape (30, 6)" in done.stderr


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_torchrun_needs_a_row_per_process(tmp_path):
    # a process without rows would fail alone, deep in building its model
    np.save(tmp_path / "V.npy", np.ones((1, 6)))
    done = torchrun(["V.npy", "-r", "2", "-q"], tmp_path)
    assert done.returncode == 1
    message = "fit splits the rows of INPUT over the 2 processes, but V.npy has 1 rows"
    assert done.stderr.count(message) == 2, done.stderr


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("solver", ["hals"])
def test_torchrun_streams_its_rows_like_the_plain_streamed_fit(tmp_path, solver):
    # each process reads only its rows, a block at a time (blocks that do not divide
    # them); rank 0 writes what the single-process streamed command writes
    rng = np.random.default_rng(5)
    np.save(tmp_path / "V.npy", rng.random((23, 3)) @ rng.random((3, 8)))
    common = ["V.npy", "-r", "3", "--max-iter", "15", "--tol", "0", "--dtype", "float64",
              "--solver", solver, "--beta", "2", "-q", "--block-rows", "4"]
    plain_fit(common, tmp_path)
    done = torchrun([*common, "-o", "shared.npz"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_output(np.load(tmp_path / "plain.npz"), np.load(tmp_path / "shared.npz"))
