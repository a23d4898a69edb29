"""Streamed targets: fits read in row blocks equal in-memory fits."""
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from torchnmf.io import open_rows
from torchnmf.nmf import NMF, NMFD
from torchnmf.targets.sources import TensorRows

TOL = dict(rtol=1e-10, atol=1e-12)


def _data(generator, n=23, c=9, rank=3, offset=0.05):
    H = torch.rand(n, rank, generator=generator, dtype=torch.float64)
    W = torch.rand(c, rank, generator=generator, dtype=torch.float64)
    return H @ W.T + offset


def _pair(V, rank, generator):
    W = torch.rand(V.shape[1], rank, generator=generator, dtype=torch.float64)
    H = torch.rand(V.shape[0], rank, generator=generator, dtype=torch.float64)
    return NMF(W=W, H=H), NMF(W=W, H=H)


def _assert_same(a, b):
    torch.testing.assert_close(b.W, a.W, **TOL)
    torch.testing.assert_close(b.H, a.H, **TOL)
    torch.testing.assert_close(torch.tensor(b.loss_history), torch.tensor(a.loss_history), **TOL)


@pytest.mark.parametrize("solver,beta", [
    ("mu", 2), ("mu", 1), ("mu", 0.5), ("mu", 0), ("mu", 3),
    ("mu_extrapolated", 1), ("mu_extrapolated", 1.5), ("hals", 2),
])
@pytest.mark.parametrize("block_rows", [1, 5, 23])
def test_streamed_equals_in_memory(generator, solver, beta, block_rows):
    V = _data(generator)
    memory, streamed = _pair(V, 3, generator)
    options = dict(beta=beta, tol=0, max_iter=25, solver=solver, alpha=0.01, l1_ratio=0.3)
    memory.fit(V, **options)
    streamed.fit(V, block_rows=block_rows, **options)
    _assert_same(memory, streamed)


def test_fixed_components_and_separate_penalties_stream(generator):
    V = _data(generator)
    memory, streamed = _pair(V, 3, generator)
    options = dict(beta=1, tol=0, max_iter=20, fixed_W=[1], fixed_H=[0], alpha_W=0.1, alpha_H=0.02)
    memory.fit(V, **options)
    streamed.fit(V, block_rows=4, **options)
    _assert_same(memory, streamed)


@pytest.mark.parametrize("beta", [2, 1, 1.5])
def test_sparse_sources_equal_in_memory_sparse(generator, beta):
    scipy_sparse = pytest.importorskip("scipy.sparse")
    dense = _data(generator, offset=0)
    dense[torch.rand(dense.shape, generator=generator) < 0.6] = 0
    memory, from_tensor = _pair(dense, 3, generator)
    _, from_scipy = _pair(dense, 3, generator)
    from_scipy.W.data.copy_(memory.W)
    from_scipy.H.data.copy_(memory.H)
    options = dict(beta=beta, tol=0, max_iter=20)
    memory.fit(dense.to_sparse(), **options)
    from_tensor.fit(dense.to_sparse(), block_rows=6, **options)
    from_scipy.fit(open_rows(scipy_sparse.csr_matrix(dense.numpy())), block_rows=7, **options)
    _assert_same(memory, from_tensor)
    _assert_same(memory, from_scipy)


@pytest.mark.parametrize("solver", ["mu", "mu_extrapolated"])
@pytest.mark.parametrize("beta", [2, 1, 0.5])
def test_masked_streams_with_a_mask_source_and_nan(generator, solver, beta):
    V = _data(generator)
    observed = torch.rand(V.shape, generator=generator) > 0.3
    observed[:, 0] = True
    observed[0, :] = True
    holes = V.clone()
    holes[~observed] = float("nan")
    memory, with_mask = _pair(V, 3, generator)
    _, with_nan = _pair(V, 3, generator)
    for model in (with_nan,):
        model.W.data.copy_(memory.W)
        model.H.data.copy_(memory.H)
    options = dict(beta=beta, tol=0, max_iter=20, solver=solver)
    memory.fit(V, mask=observed, **options)
    with_mask.fit(V, mask=observed.numpy(), block_rows=4, **options)
    with_nan.fit(holes, missing="mask", block_rows=5, **options)
    _assert_same(memory, with_mask)
    _assert_same(memory, with_nan)


def test_memmap_and_list_of_blocks_are_streamed(generator, tmp_path):
    V = _data(generator, n=30)
    np.save(tmp_path / "V.npy", V.numpy())
    mapped = np.load(tmp_path / "V.npy", mmap_mode="r")
    memory, from_memmap = _pair(V, 3, generator)
    _, from_blocks = _pair(V, 3, generator)
    from_blocks.W.data.copy_(memory.W)
    from_blocks.H.data.copy_(memory.H)
    memory.fit(V, beta=1, tol=0, max_iter=15)
    from_memmap.fit(mapped, beta=1, tol=0, max_iter=15)
    from_blocks.fit([V[:7], V[7:8].numpy(), V[8:]], beta=1, tol=0, max_iter=15)
    _assert_same(memory, from_memmap)
    _assert_same(memory, from_blocks)


@pytest.mark.parametrize("beta", [2, 1])
def test_transform_streams(generator, beta):
    V = _data(generator)
    model = NMF(W=torch.rand(9, 3, generator=generator, dtype=torch.float64))
    start = torch.rand(23, 3, generator=generator, dtype=torch.float64)
    expected = model.transform(V, beta=beta, tol=0, max_iter=20, H=start)
    streamed = model.transform(V, beta=beta, tol=0, max_iter=20, H=start, block_rows=4)
    torch.testing.assert_close(streamed, expected, **TOL)
    default = model.transform(V, beta=beta, tol=0, max_iter=20,
                              generator=torch.Generator().manual_seed(3))
    default_streamed = model.transform(V.numpy(), beta=beta, tol=0, max_iter=20, block_rows=6,
                                       generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(default_streamed, default, **TOL)


def test_streamed_fit_on_real_data(generator):
    datasets = pytest.importorskip("sklearn.datasets")
    V = torch.from_numpy(datasets.load_digits().data)  # 1797 x 64 pixel counts
    memory, streamed = _pair(V, 10, generator)
    memory.fit(V, beta=1, tol=0, max_iter=10, solver="mu_extrapolated")
    streamed.fit(V.numpy(), beta=1, tol=0, max_iter=10, solver="mu_extrapolated", block_rows=500)
    _assert_same(memory, streamed)
    assert streamed.loss_history[-1] < 0.5 * streamed.loss_history[0]


class _Recording:
    """A row source that records the threads it is read from."""

    def __init__(self, V):
        self.inner = TensorRows(V)
        self.shape, self.dtype, self.is_sparse = self.inner.shape, self.inner.dtype, False
        self.threads = set()

    def read(self, start, stop):
        self.threads.add(threading.current_thread())
        return self.inner.read(start, stop)


def test_blocks_are_read_in_a_background_thread(generator):
    V = _data(generator)
    source = _Recording(V)
    memory, streamed = _pair(V, 3, generator)
    memory.fit(V, beta=2, tol=0, max_iter=3)
    streamed.fit(source, beta=2, tol=0, max_iter=3, block_rows=5)
    _assert_same(memory, streamed)
    assert source.threads and all(t.name.startswith("torchnmf-rows") for t in source.threads)
    # one reading thread serves every pass (a thread per pass cost more than small reads)
    assert len(source.threads) == 1


def test_a_pass_left_early_leaves_the_next_one_whole(generator):
    from torchnmf.targets.streamed import StreamedTarget, as_streamed_source

    V = _data(generator)
    target = StreamedTarget(as_streamed_source(_Recording(V)), block_rows=5)
    passes = target.raw_blocks()
    start, stop, block, _ = next(passes)
    assert (start, stop) == (0, 5)
    passes.close()  # the block after it was being read ahead
    rows = [(start, stop, block) for start, stop, block, _ in target.raw_blocks()]
    assert [(a, b) for a, b, _ in rows] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert torch.equal(torch.cat([block for _, _, block in rows]), V)


def test_streamed_errors(generator, tmp_path):
    V = _data(generator)
    model = NMF(V.shape, rank=3).double()
    negative = V.clone()
    negative[17, 2] = -1
    with pytest.raises(ValueError, match=r"non-negative.*rows 15:20"):
        model.fit(negative, block_rows=5)
    with pytest.raises(ValueError, match="block_rows must be a positive integer, got 0"):
        model.fit(V, block_rows=0)
    with pytest.raises(TypeError, match="can be read only once"):
        model.fit(open_rows(block for block in (V[:10], V[10:])))
    with pytest.raises(ValueError, match=r"shape of the reconstruction \(23, 9\), got \(23, 8\)"):
        model.fit(V[:, :8], block_rows=5)
    zero = V.clone()
    zero[3, 3] = 0
    with pytest.raises(ValueError, match="beta=0 needs a strictly positive V, but V has 1 zero"):
        model.fit(zero, beta=0, block_rows=5)
    with pytest.raises(NotImplementedError, match="solver='hals' with a mask"):
        model.fit(V, beta=2, solver="hals", mask=torch.rand(V.shape) > 0.2, block_rows=5)
    with pytest.raises(TypeError, match="mask must be a boolean tensor"):
        model.fit(V, mask=torch.ones(V.shape), block_rows=5)
    with pytest.raises(NotImplementedError, match="streaming needs the matrix model NMF"):
        NMFD((2, 9, 6), rank=2, T=2).fit([torch.rand(2, 9, 6)])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError):
        model.fit(negative, block_rows=5)
    for p, kept in zip(model.parameters(), before):
        assert torch.equal(p.detach(), kept)


def test_a_memmap_is_never_loaded_whole(tmp_path):
    """Peak resident memory of a streamed fit stays far below the file's size."""
    path = tmp_path / "big.npy"
    rows, columns = 8192, 4096  # 128 MiB of float32: twice the allowed growth
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, columns))
    generator = np.random.default_rng(0)
    for start in range(0, rows, 2048):
        array[start:start + 2048] = generator.random((2048, columns), dtype=np.float32)
    array.flush()
    del array
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from torchnmf.nmf import NMF
        def peak():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) // 1024
        V = np.load({str(path)!r}, mmap_mode="r")
        # warm-up on 512 rows: loads the code and the allocator's arenas
        NMF((512, {columns}), rank=4).fit(V[:512], beta=1, tol=0, max_iter=1, block_rows=256)
        model = NMF(({rows}, {columns}), rank=4)
        before = peak()
        model.fit(V, beta=1, tol=0, max_iter=2, block_rows=256)
        print(peak() - before)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=240)
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout.split()[-1])
    # the file is 128 MiB, a block 4 MiB: a few blocks mapped or read ahead, and the
    # work buffers of one block, stay resident at a time
    assert grown < 64, f"the streamed fit grew the peak resident memory by {grown} MiB"


def test_h_may_live_in_a_memory_mapped_file(generator, tmp_path):
    V = _data(generator, n=40)
    memory, streamed = _pair(V, 3, generator)
    mapped = np.lib.format.open_memmap(tmp_path / "H.npy", mode="w+", dtype=np.float64,
                                       shape=(40, 3))
    mapped[:] = memory.H.detach().numpy()
    streamed.H = torch.nn.Parameter(torch.from_numpy(mapped))
    memory.fit(V, beta=1, tol=0, max_iter=10)
    streamed.fit(V.numpy(), beta=1, tol=0, max_iter=10, block_rows=7)
    _assert_same(memory, streamed)
    mapped.flush()
    np.testing.assert_array_equal(np.load(tmp_path / "H.npy"), streamed.H.detach().numpy())


@pytest.mark.parametrize("scale", [1e-30, 3e7, 1e40])
@pytest.mark.parametrize("solver,beta", [("mu", 1), ("mu_extrapolated", 0.5), ("hals", 2)])
def test_streamed_fits_are_scale_equivariant(generator, scale, solver, beta):
    """The streamed kind supplies the entry point's scale (scale_sums, scaled) like the
    in-memory kinds: a fit of scale * V streamed equals the in-memory one, and both
    equal scale times the fit of V."""
    V = _data(generator)
    memory, streamed = _pair(V * scale, 3, generator)
    reference = NMF(W=memory.W.detach().clone(), H=memory.H.detach().clone() / scale)
    options = dict(beta=beta, tol=0, max_iter=15, solver=solver)
    memory.fit(V * scale, **options)
    streamed.fit(V * scale, block_rows=5, **options)
    _assert_same(memory, streamed)
    reference.fit(V, **options)
    torch.testing.assert_close(streamed(), reference() * scale, rtol=1e-8, atol=0)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("beta", [2, 1, 0.5, 0, 3])
def test_scaled_streamed_statistics_need_no_read(generator, beta, masked):
    """scale_sums comes from the validation pass and the scaled constant in closed
    form: equal to the sums and constant read from the scaled blocks."""
    from torchnmf.targets.streamed import StreamedTarget, as_streamed_source

    V = _data(generator) * 37.0
    mask = (torch.rand(V.shape, generator=generator) > 0.3).numpy() if masked else None
    source = _Counting(V)
    stats = StreamedTarget(as_streamed_source(source), mask, block_rows=5).statistics(beta)
    reads = source.passes
    factor = 2.0 ** -5
    scaled = stats.scaled(factor)
    total, count = scaled.scale_sums()
    assert source.passes == reads  # neither read a block
    rescaled = StreamedTarget(TensorRows(V * factor), mask, block_rows=5).statistics(beta)
    expected_total, expected_count = 0.0, 0
    for _, _, block, block_mask in rescaled._blocks():
        values = block if block_mask is None else block[block_mask]
        expected_total += float(values.sum())
        expected_count += values.numel()
    assert count == expected_count
    assert total == pytest.approx(expected_total, rel=1e-13)
    torch.testing.assert_close(torch.as_tensor(scaled.constant, dtype=torch.float64),
                               torch.as_tensor(rescaled.constant, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


class _Counting:
    """A row source that counts the passes over it (reads of its first row)."""

    def __init__(self, V):
        self.inner = TensorRows(V)
        self.shape, self.dtype, self.is_sparse = self.inner.shape, self.inner.dtype, False
        self.passes = 0

    def read(self, start, stop):
        self.passes += start == 0
        return self.inner.read(start, stop)


@pytest.mark.parametrize("beta", [2, 1])
def test_a_streamed_fit_reads_v_twice_to_set_up(generator, beta):
    # validation, then the divergence constant; the scale needs no read; then one
    # pass per multiplicative-update iteration and one for the final objective (a fit
    # far from exact: on this small target a nearly exact one takes the explicit
    # residual's pass too, see torchnmf.targets.residual.cancellation_threshold)
    V = (_data(generator) + torch.rand(23, 9, generator=generator, dtype=torch.float64)) * 1000
    for iterations in (3, 4):
        source = _Counting(V)
        NMF(V.shape, rank=3).double().fit(source, beta=beta, tol=0, max_iter=iterations,
                                          block_rows=5)
        assert source.passes == 2 + iterations + 1


def test_masked_streamed_fit_at_a_tiny_scale(generator):
    V = _data(generator) * 1e-50
    observed = torch.rand(V.shape, generator=generator) > 0.3
    memory, streamed = _pair(V, 3, generator)
    options = dict(beta=1, tol=0, max_iter=15)
    memory.fit(V, mask=observed, **options)
    streamed.fit(V, mask=observed.numpy(), block_rows=4, **options)
    _assert_same(memory, streamed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver,beta", [("mu", 1), ("mu", 2), ("hals", 2)])
def test_cuda_streamed_fit_matches_cpu(generator, solver, beta, tmp_path):
    """A model on CUDA streams host rows (a memmap: pinned blocks, non-blocking copies)
    to the same fit as in memory on the CPU (``make gpu-check`` runs it)."""
    V = _data(generator, n=30)
    np.save(tmp_path / "V.npy", V.numpy())
    memory, streamed = _pair(V, 3, generator)
    options = dict(beta=beta, tol=0, max_iter=15, solver=solver)
    memory.fit(V, **options)
    streamed.cuda().fit(np.load(tmp_path / "V.npy", mmap_mode="r"), block_rows=7, **options)
    torch.testing.assert_close(streamed.W.detach().cpu(), memory.W.detach(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(streamed.H.detach().cpu(), memory.H.detach(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("beta", [0.999, 1e-6])
def test_streamed_history_at_beta_near_zero_and_one(tmp_path, beta):
    """The one-read step reports the closed form, whose terms near beta 0 and 1 dwarf
    their sum: on the digits in float32 the streamed history was 2% off the
    in-memory one at beta=1e-6 and 3e-5 at 0.999.  Now they agree to 1e-5."""
    from sklearn.datasets import load_digits

    V = torch.tensor(load_digits().data[:600], dtype=torch.float32) + 0.1
    np.save(tmp_path / "v.npy", V.numpy())
    g = torch.Generator().manual_seed(0)
    W0, H0 = torch.rand(64, 6, generator=g), torch.rand(600, 6, generator=g)
    memory = NMF(W=W0, H=H0)
    memory.fit(V, beta=beta, max_iter=15, tol=0)
    streamed = NMF(W=W0, H=H0)
    streamed.fit(np.load(tmp_path / "v.npy", mmap_mode="r"), beta=beta, max_iter=15, tol=0, block_rows=128)
    assert streamed.loss_history == pytest.approx(memory.loss_history, rel=1e-5)


def test_a_conversion_the_dtype_cannot_hold_is_refused_by_rows(tmp_path):
    """A float64 memmap for a float32 model: at 1e300 the blocks became infinities
    ("V contains infinite values", about data that had none); at 1e-300 zeros,
    "fitted" with an objective of 0."""
    g = torch.Generator().manual_seed(0)
    V = torch.rand(40, 6, generator=g, dtype=torch.float64)
    for scale, message in ((1e300, r"V's largest entry, .*e\+299, exceeds torch.float32's largest value"),
                           (1e-300, r"V's mean non-zero entry, .*e-301, is under torch.float32's")):
        np.save(tmp_path / "v.npy", (V * scale).numpy())
        model = NMF((40, 6), rank=2)
        with pytest.raises(ValueError, match=message + r".*\(rows 0:10\)"):
            model.fit(np.load(tmp_path / "v.npy", mmap_mode="r"), block_rows=10, max_iter=3)


def test_a_float16_model_streams_in_float32(tmp_path):
    """A float16 model's streamed fit is fitted in float32, as its in-memory fit is,
    and the file's values must still fit float16 (it failed inside torch: the blocks
    were float16, the working factors float32)."""
    from sklearn.datasets import load_digits

    V = torch.tensor(load_digits().data[:300], dtype=torch.float32) + 0.1
    np.save(tmp_path / "V.npy", V.numpy())
    models = [NMF(V.shape, rank=3).half() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models[0].fit(open_rows(tmp_path / "V.npy"), beta=1, max_iter=8, tol=0, block_rows=128)
        models[1].fit(V.half(), beta=1, max_iter=8, tol=0)
    assert models[0].loss_history == pytest.approx(models[1].loss_history, rel=1e-5)
    assert_close(models[0].W.detach(), models[1].W.detach(), rtol=2e-3, atol=0)
    np.save(tmp_path / "large.npy", (V * 1e4).numpy())
    before = models[0].W.detach().clone()
    with pytest.raises(ValueError, match="exceeds torch.float16's largest value"):
        models[0].fit(open_rows(tmp_path / "large.npy"), beta=1, max_iter=2)
    assert torch.equal(models[0].W.detach(), before)
