"""The command line, run in-process: every input format, outputs, exit codes, errors."""
import re
import struct
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

from torchnmf import cli, io
from torchnmf.cli import main

scipy_sparse = pytest.importorskip("scipy.sparse")
scipy_io = pytest.importorskip("scipy.io")



@pytest.fixture
def matrix():
    rng = np.random.default_rng(0)
    return rng.random((12, 3)) @ rng.random((3, 9))


def write_formats(directory, matrix):
    """The same matrix in every format the CLI reads; returns {suffix label: path}."""
    paths = {}
    np.save(directory / "m.npy", matrix)
    paths["npy"] = directory / "m.npy"
    np.savez(directory / "m.npz", V=matrix)
    paths["npz"] = directory / "m.npz"
    np.savetxt(directory / "m.csv", matrix, delimiter=",", fmt="%.17g")
    paths["csv"] = directory / "m.csv"
    np.savetxt(directory / "m.tsv", matrix, delimiter="\t", fmt="%.17g", header="x\ty", comments="")
    paths["tsv"] = directory / "m.tsv"
    sparse = scipy_sparse.csr_matrix(np.where(matrix > 0.6, matrix, 0.0))
    scipy_sparse.save_npz(directory / "s.npz", sparse)
    paths["sparse npz"] = directory / "s.npz"
    scipy_io.mmwrite(str(directory / "s.mtx"), sparse)
    paths["mtx"] = directory / "s.mtx"
    return paths


def fit(capsys, *argv):
    status = main(["fit", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def tone_wav(path, seconds=0.5, rate=8000):
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    low = torch.sin(2 * torch.pi * 300 * t) * (t < seconds / 2)
    high = torch.sin(2 * torch.pi * 1500 * t) * (t >= seconds / 4)
    io.write_wav(path, 0.4 * (low + high), rate)
    return int(seconds * rate)


@pytest.mark.parametrize("label", ["npy", "npz", "csv", "tsv", "sparse npz", "mtx"])
def test_fit_every_format(tmp_path, capsys, matrix, label):
    path = write_formats(tmp_path, matrix)[label]
    output = tmp_path / "out.npz"
    status, out, err = fit(capsys, path, "--rank", 3, "--max-iter", 30, "--tol", 0, "-o", output)
    assert status == 0, err
    with np.load(output, allow_pickle=False) as saved:
        rows, cols = (12, 9)
        assert saved["W"].shape == (cols, 3) and saved["H"].shape == (rows, 3)
        history = saved["loss_history"]
        assert history.shape == (31,) and int(saved["n_iter"]) == 30
        assert np.all(np.diff(history) <= 1e-9 * history[0])  # MU never increases the loss
        assert str(saved["model"]) == "nmf" and float(saved["beta"]) == 1.0
    assert out.splitlines()[0].startswith(f"read {path.name}: ")
    assert f"to {output}" in out
    assert "Traceback" not in err


def test_sparse_input_fits_like_its_dense_equivalent(tmp_path, capsys, matrix):
    paths = write_formats(tmp_path, matrix)
    dense = tmp_path / "dense.npy"
    with np.load(paths["sparse npz"]) as arrays:
        shape = tuple(arrays["shape"])
    np.save(dense, scipy_io.mmread(str(paths["mtx"])).toarray().reshape(shape))
    results = []
    for path in (paths["mtx"], dense):
        output = tmp_path / f"{path.stem}.out.npz"
        status, out, err = fit(capsys, path, "-r", 2, "--max-iter", 20, "--tol", 0, "-o", output)
        assert status == 0, err
        with np.load(output) as saved:
            results.append((saved["W"], saved["H"]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-7)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-7)


def test_default_output_progress_bar_and_seed(tmp_path, capsys, matrix):
    np.save(tmp_path / "m.npy", matrix)
    status, out, err = fit(capsys, tmp_path / "m.npy", "-r", 2, "--max-iter", 5, "--tol", 0)
    assert status == 0
    assert (tmp_path / "m.nmf.npz").exists()
    assert "5/5" in err  # tqdm's bar goes to stderr
    first = np.load(tmp_path / "m.nmf.npz")["W"]
    fit(capsys, tmp_path / "m.npy", "-r", 2, "--max-iter", 5, "--tol", 0, "-q")
    np.testing.assert_array_equal(np.load(tmp_path / "m.nmf.npz")["W"], first)
    status, _, err = fit(capsys, tmp_path / "m.npy", "-r", 2, "--max-iter", 5, "--tol", 0, "-q",
                         "--seed", 1)
    assert err == ""
    assert not np.array_equal(np.load(tmp_path / "m.nmf.npz")["W"], first)


def test_options_reach_the_fit(tmp_path, capsys, matrix):
    np.save(tmp_path / "m.npy", matrix + 0.1)
    output = tmp_path / "o.npz"
    status, out, err = fit(capsys, tmp_path / "m.npy", "-r", 2, "--beta", 0.5, "--dtype", "float32",
                           "--max-iter", 7, "--tol", 0, "-q", "-o", output)
    assert status == 0, err
    with np.load(output) as saved:
        assert saved["W"].dtype == np.float32 and float(saved["beta"]) == 0.5
        assert saved["loss_history"].shape == (8,)
    assert "NMF rank 2, beta 0.5, solver mu, init random, float32 on cpu" in out


def test_max_iter_reached_is_a_one_line_note(tmp_path, capsys, matrix):
    np.save(tmp_path / "m.npy", matrix)
    status, _, err = fit(capsys, tmp_path / "m.npy", "-r", 2, "--max-iter", 2, "--tol", 1e-12, "-q")
    assert status == 0
    assert err.splitlines() == [
        "torchnmf: note: the fit stopped after max_iter=2 iterations before the relative "
        "decrease of the objective fell under tol=1e-12; raise max_iter or tol"
    ]


def test_nmfd_on_a_matrix_and_on_a_3d_array(tmp_path, capsys, matrix):
    np.save(tmp_path / "m.npy", matrix)
    status, out, err = fit(capsys, tmp_path / "m.npy", "-r", 2, "--model", "nmfd", "--T", 4,
                           "--max-iter", 5, "--tol", 0, "-q", "-o", tmp_path / "d.npz")
    assert status == 0, err
    with np.load(tmp_path / "d.npz") as saved:
        # rows are time: V (12, 9) is fitted as (1, 9, 12)
        assert saved["W"].shape == (9, 2, 4) and saved["H"].shape == (1, 2, 12 - 4 + 1)
    assert "NMFD (T=4) rank 2" in out
    np.save(tmp_path / "cube.npy", np.random.default_rng(0).random((2, 5, 10)))
    status, _, err = fit(capsys, tmp_path / "cube.npy", "-r", 3, "--model", "nmfd", "--max-iter", 3,
                         "--tol", 0, "-q", "-o", tmp_path / "c.npz")
    assert status == 0, err
    assert np.load(tmp_path / "c.npz")["W"].shape == (5, 3, 8)


def png_size(path):
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png(tmp_path, capsys, matrix):
    pytest.importorskip("matplotlib")
    np.save(tmp_path / "m.npy", matrix)
    status, out, err = fit(capsys, tmp_path / "m.npy", "-r", 2, "--max-iter", 5, "--tol", 0, "-q",
                           "--plot", tmp_path / "fig.png")
    assert status == 0, err
    width, height = png_size(tmp_path / "fig.png")
    assert (width, height) == (1300, 700)
    assert f"wrote the figure to {tmp_path / 'fig.png'}" in out


@pytest.mark.parametrize("model", ["nmf", "nmfd"])
def test_wav_components_are_valid_audio_that_sum_to_the_input(tmp_path, capsys, model):
    length = tone_wav(tmp_path / "tones.wav")
    status, out, err = fit(capsys, tmp_path / "tones.wav", "-r", 2, "--model", model,
                           "--n-fft", 256, "--max-iter", 20, "--tol", 0, "-q")
    assert status == 0, err
    paths = [tmp_path / f"tones.nmf.component{r}.wav" for r in range(2)]
    total = torch.zeros(length, dtype=torch.float64)
    for path in paths:
        with wave.open(str(path)) as handle:
            assert (handle.getnchannels(), handle.getframerate()) == (1, 8000)
            assert handle.getnframes() == length
        total += io.read_wav(path)[0]
    original = io.read_wav(tmp_path / "tones.wav")[0]
    # soft masks split the input: the components add up to it (16-bit rounding apart)
    torch.testing.assert_close(total, original, atol=3 / 32767, rtol=0)
    with np.load(tmp_path / "tones.nmf.npz") as saved:
        assert int(saved["sample_rate"]) == 8000 and int(saved["n_fft"]) == 256
    assert "wrote 2 component waveforms" in out


# -- errors: one line, non-zero status, never a traceback --------------------------------
def _bad_inputs(directory):
    np.save(directory / "negative.npy", -np.ones((3, 3)))
    np.save(directory / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(directory / "vector.npy", np.ones(4))
    (directory / "ragged.csv").write_text("1,2\n3\n")
    (directory / "junk.npy").write_text("not numpy")
    (directory / "junk.wav").write_text("not audio")
    (directory / "data.xlsx").write_text("")
    np.save(directory / "ok.npy", np.ones((6, 4)))
    np.save(directory / "zeros.npy", np.zeros((6, 4)))
    return directory


@pytest.mark.parametrize(
    "argv, message",
    [
        (["negative.npy"], "negative.npy must be non-negative, but its smallest entry is -1"),
        (["objects.npy"], "objects.npy holds Python objects, which torchnmf never unpickles"),
        (["vector.npy"], "vector.npy: expected a matrix (2-D; 3-D for NMFD), got shape (4,)"),
        (["ragged.csv"], "ragged.csv is not a table of numbers"),
        (["junk.npy"], "junk.npy is not a .npy file"),
        (["junk.wav"], "junk.wav is not a PCM .wav file that can be read"),
        (["data.xlsx"], "data.xlsx: unsupported file type '.xlsx'"),
        (["missing.npy"], "missing.npy: no such file"),
        (["zeros.npy", "--beta", "-1"], "beta=-1 needs a strictly positive V"),
        (["ok.npy", "--T", "3"], "--T applies to --model nmfd only"),
        (["ok.npy", "--model", "nmfd", "--T", "9"], "--T 9 is longer than the data's 6 rows/frames"),
        (["ok.npy", "-o", "nowhere/out.npz"],
         "cannot write nowhere/out.npz: the directory nowhere does not exist"),
        (["ok.npy", "--device", "nonsense"], "--device='nonsense' cannot be used here"),
    ],
)
def test_bad_input_gives_one_line_and_status_1(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(_bad_inputs(tmp_path))
    status, out, err = fit(capsys, *argv, "--rank", 2, "-q")
    assert status == 1
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("torchnmf: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in err + out


def test_unavailable_accelerator_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    np.save(tmp_path / "m.npy", np.ones((4, 4)))
    status, _, err = fit(capsys, tmp_path / "m.npy", "-r", 2, "--device", "cuda", "-q")
    assert status == 1 and len(err.splitlines()) == 1
    assert err.startswith("torchnmf: error: --device='cuda' cannot be used here (")
    assert err.rstrip().endswith("try --device cpu")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "x.npy"], "the following arguments are required: -r/--rank"),
        (["fit", "x.npy", "-r", "0"], "invalid positive integer value: '0'"),
        (["fit", "x.npy", "-r", "2", "--tol", "-1"], "invalid non-negative number value: '-1'"),
        (["fit", "x.npy", "-r", "2", "--beta", "nan"], "invalid finite number value: 'nan'"),
        (["fit", "x.npy", "-r", "2", "--solver", "newton"], "invalid choice: 'newton'"),
        (["fit", "x.npy", "-r", "2", "--model", "plca"], "invalid choice: 'plca'"),
        # torch.distributed takes 0 s as "fail at once" and cannot hold infinite seconds
        (["fit", "x.npy", "-r", "2", "--timeout", "0"], "invalid positive number of seconds value: '0'"),
        (["fit", "x.npy", "-r", "2", "--timeout", "inf"], "invalid positive number of seconds value: 'inf'"),
    ],
)
def test_usage_errors_give_status_2(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_and_no_command(capsys):
    assert main(["--help"]) == 0
    assert "fit" in capsys.readouterr().out
    assert main([]) == 2
    assert "usage: torchnmf" in capsys.readouterr().err


def test_solver_choices_follow_the_registry(monkeypatch, tmp_path, capsys, matrix):
    from torchnmf.solvers import mu, registry

    monkeypatch.setitem(registry.SOLVERS, "copy_of_mu", registry.SOLVERS["mu"])
    assert "copy_of_mu" in cli.solver_names()
    np.save(tmp_path / "m.npy", matrix)
    status, out, err = fit(capsys, tmp_path / "m.npy", "-r", 2, "--solver", "copy_of_mu",
                           "--max-iter", 3, "--tol", 0, "-q")
    assert status == 0, err
    assert "solver copy_of_mu" in out


def test_random_init_is_scaled_to_the_data(tmp_path, capsys, matrix):
    np.save(tmp_path / "big.npy", 1000 * matrix)
    fit(capsys, tmp_path / "big.npy", "-r", 3, "--max-iter", 1, "--tol", 0, "-q", "-o",
        tmp_path / "o.npz")
    with np.load(tmp_path / "o.npz") as saved:
        # one iteration from a data-scaled start: the reconstruction's mean is near the data's
        approx = saved["H"] @ saved["W"].T
    assert 0.5 < approx.mean() / (1000 * matrix).mean() < 2


def test_init_choices_are_those_of_the_init_module():
    from torchnmf import init

    assert cli.init_methods() == init.METHODS


@pytest.mark.parametrize("method", ["nndsvd", "nndsvda", "nndsvdar"])
def test_data_driven_init(tmp_path, capsys, matrix, method):
    np.save(tmp_path / "m.npy", matrix)
    status, out, err = fit(capsys, tmp_path / "m.npy", "-r", 3, "--init", method,
                           "--max-iter", 10, "--tol", 0, "-q", "-o", tmp_path / "o.npz")
    assert status == 0, err
    assert f"init {method}" in out
    with np.load(tmp_path / "o.npz") as saved:
        assert np.all(saved["W"] >= 0) and np.all(saved["H"] >= 0)


def test_data_driven_init_of_a_sparse_file(tmp_path, capsys, matrix):
    paths = write_formats(tmp_path, matrix)
    status, out, err = fit(capsys, paths["mtx"], "-r", 2, "--init", "nndsvd", "--max-iter", 1, "-q")
    assert status == 0, err
    assert "init nndsvd" in out


@pytest.mark.slow
def test_python_dash_m_runs_the_cli(tmp_path):
    np.save(tmp_path / "neg.npy", -np.ones((2, 2)))
    run = subprocess.run([sys.executable, "-m", "torchnmf", "fit", str(tmp_path / "neg.npy"), "-r", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.startswith("torchnmf: error: neg.npy must be non-negative")
    assert "Traceback" not in run.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_with_audio_and_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    length = tone_wav(tmp_path / "tones.wav")
    status, out, err = fit(capsys, tmp_path / "tones.wav", "-r", 2, "--model", "nmfd", "--device",
                           "cuda", "--n-fft", 256, "--max-iter", 10, "--tol", 0, "-q",
                           "--plot", tmp_path / "f.png")
    assert status == 0, err
    assert "on cuda" in out
    with wave.open(str(tmp_path / "tones.nmf.component1.wav")) as handle:
        assert handle.getnframes() == length
    assert png_size(tmp_path / "f.png") == (1300, 700)


@pytest.mark.parametrize("label", ["npy", "sparse npz"])
def test_stream_gives_the_in_memory_result(tmp_path, capsys, matrix, label):
    path = write_formats(tmp_path, matrix)[label]
    common = ("-r", 3, "--max-iter", 15, "--tol", 0, "-q")
    status, out, _ = fit(capsys, path, *common, "-o", tmp_path / "memory.npz")
    assert status == 0
    status, out, err = fit(capsys, path, *common, "--block-rows", 5, "-o", tmp_path / "streamed.npz")
    assert status == 0, err
    assert "streamed in row blocks" in out
    memory, streamed = np.load(tmp_path / "memory.npz"), np.load(tmp_path / "streamed.npz")
    np.testing.assert_allclose(streamed["W"], memory["W"], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(streamed["loss_history"], memory["loss_history"], rtol=1e-8)


def test_stream_shows_a_bar_over_rows_and_refuses_what_needs_memory(tmp_path, capsys, matrix):
    path = write_formats(tmp_path, matrix)["npy"]
    status, _, err = fit(capsys, path, "-r", 2, "--max-iter", 2, "--stream", "--block-rows", 4)
    assert status == 0 and "rows" in err
    status, _, err = fit(capsys, path, "-r", 2, "--stream", "--init", "nndsvd")
    assert status == 1 and "--stream supports --init random only" in err
    status, _, err = fit(capsys, path, "-r", 2, "--stream", "--model", "nmfd")
    assert status == 1 and "--stream supports --model nmf only" in err


@pytest.mark.parametrize("command", [["fit", "ok.npy", "--rank", "2"], ["rank", "ok.npy", "--ranks", "1:2"]])
def test_figure_checks_before_any_work(tmp_path, capsys, monkeypatch, command):
    """fit and rank refuse a figure in a missing directory, and any figure when
    matplotlib is missing, with one line and before reading the data."""
    import importlib.util

    monkeypatch.chdir(_bad_inputs(tmp_path))
    assert main([*command, "-q", "--plot", "nowhere/f.png"]) == 1
    assert "cannot write nowhere/f.png: the directory nowhere does not exist" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main([*command, "-q", "--plot", "f.png"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plot needs matplotlib; pip install 'torchnmf[plot]'" in err
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize("used", [False, True])
def test_the_process_ends_with_the_status_and_flushed_streams(used):
    """After a command under torchrun the process ends without finalising the
    interpreter (gloo's threads could abort it there); the status and everything
    printed still come out, and a plain run ends as usual (SystemExit)."""
    code = (
        "import sys, atexit\n"
        "from torchnmf import cli\n"
        f"cli._GROUP_USED = {used}\n"
        "atexit.register(lambda: print('finalised', file=sys.stderr))\n"
        "print('written', end='')\n"
        "print('noted', end='', file=sys.stderr)\n"
        "cli.exit_process(3)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    assert run.stdout == "written"
    assert run.stderr.startswith("noted")
    assert ("finalised" in run.stderr) is not used


@pytest.mark.parametrize("command, option, target", [
    (["fit", "m.npz", "-r", "2"], "-o", "m.npz"),
    (["fit", "m.npz", "-r", "2"], "-o", "m"),  # save_factors appends .npz
    (["fit", "m.npz", "-r", "2"], "--plot", "m.npz"),
    (["consensus", "m.npz", "-r", "2", "--restarts", "2"], "-o", "m.npz"),
    (["rank", "m.npz", "--ranks", "1:2", "--restarts", "2"], "--plot", "m.npz"),
])
def test_outputs_never_overwrite_the_input(tmp_path, capsys, monkeypatch, matrix, command,
                                           option, target):
    # before: the results (or the figure) replaced the data file, which was lost
    if option == "--plot":
        pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    np.savez("m.npz", V=matrix)
    assert main([*command, "-q", "--max-iter", "2", option, target]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"cannot write {target}: it is INPUT, whose data would be overwritten" in err
    np.testing.assert_array_equal(np.load("m.npz")["V"], matrix)


@pytest.mark.parametrize("plot, message", [
    ("f.xyz", r"cannot write the figure to f.xyz: matplotlib writes .*\.png.*, not .xyz"),
    (".", r"cannot write the figure to .: it is a directory"),
])
def test_figure_path_is_checked_before_the_fit(tmp_path, capsys, monkeypatch, matrix, plot,
                                               message):
    # before: an unknown suffix or a directory failed inside matplotlib after the whole fit
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    np.save("m.npy", matrix)
    status, out, err = fit(capsys, "m.npy", "-r", 2, "-q", "--plot", plot)
    assert status == 1 and out == "" and err.count("\n") == 1
    assert re.search(message, err)
    assert not (tmp_path / "m.nmf.npz").exists()


def test_a_figure_without_suffix_is_named_as_written(tmp_path, capsys, monkeypatch, matrix):
    """matplotlib appends its format to ``--plot fig``: the message named ``fig`` for the
    ``fig.png`` written, and ``--plot m`` on INPUT ``m.png`` would have overwritten it."""
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    np.save("m.npy", matrix)
    status, out, err = fit(capsys, "m.npy", "-r", 2, "--max-iter", 2, "-q", "--plot", "fig")
    assert status == 0, err
    assert "wrote the figure to fig.png" in out and png_size(tmp_path / "fig.png")
    np.save("m.png.npy", matrix)  # (np.save appends .npy): move it to m.png
    (tmp_path / "m.png.npy").rename(tmp_path / "m.png")
    status, out, err = fit(capsys, "m.png", "-r", 2, "-q", "--plot", "m")
    assert status == 1 and "cannot write m: it is INPUT" in err
