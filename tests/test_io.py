"""Readers and writers of torchnmf.io: every format, never unpickling, clear errors."""
import pathlib
import struct
import wave

import numpy as np
import pytest
import torch

from torchnmf import io

scipy_sparse = pytest.importorskip("scipy.sparse")
scipy_io = pytest.importorskip("scipy.io")


@pytest.fixture
def matrix():
    rng = np.random.default_rng(0)
    return rng.random((6, 5)) @ rng.random((5, 4))


@pytest.fixture
def sparse_matrix():
    return scipy_sparse.random(7, 5, density=0.4, random_state=1, format="csr")


class _TouchOnUnpickle:
    """Unpickling this object creates a marker file: proof that a reader unpickled."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


# -- dense formats -------------------------------------------------------------------
def test_npy_round_trip_keeps_float_dtype(tmp_path, matrix):
    np.save(tmp_path / "x.npy", matrix.astype(np.float32))
    target = io.load(tmp_path / "x.npy")
    assert target.V.dtype == torch.float32
    torch.testing.assert_close(target.V, torch.from_numpy(matrix.astype(np.float32)))
    assert target.description == "x.npy: dense 6 x 4 float32"
    assert target.spectrogram is None


def test_integer_counts_become_the_default_float(tmp_path):
    np.save(tmp_path / "counts.npy", np.array([[0, 3], [2, 1]], dtype=np.int32))
    V = io.load(tmp_path / "counts.npy").V
    assert V.dtype == torch.get_default_dtype()
    torch.testing.assert_close(V, torch.tensor([[0.0, 3.0], [2.0, 1.0]]))


@pytest.mark.parametrize("dtype, expected", [
    (">f8", torch.float64), (">f4", torch.float32), (">i4", torch.get_default_dtype()),
    (np.longdouble, torch.float64),
])
@pytest.mark.parametrize("fortran", [False, True])
def test_big_endian_and_long_double_npy_are_read(tmp_path, matrix, dtype, expected, fortran):
    # torch takes neither a big-endian nor a long double array: numpy converts them
    array = np.round(matrix * 100).astype(dtype)
    np.save(tmp_path / "x.npy", np.asfortranarray(array) if fortran else array)
    np.savez(tmp_path / "x.npz", V=array)
    for name in ("x.npy", "x.npz"):
        V = io.load(tmp_path / name).V
        assert V.dtype == expected
        np.testing.assert_array_equal(V.numpy(), np.load(tmp_path / "x.npy").astype(V.numpy().dtype))


def test_dtype_option_converts(tmp_path, matrix):
    np.save(tmp_path / "x.npy", matrix)
    assert io.load(tmp_path / "x.npy", dtype=torch.float32).V.dtype == torch.float32


def test_npz_single_array_named_array_and_key(tmp_path, matrix):
    np.savez(tmp_path / "one.npz", data=matrix)
    torch.testing.assert_close(io.load(tmp_path / "one.npz").V, torch.from_numpy(matrix))
    np.savez(tmp_path / "named.npz", V=matrix, other=matrix * 2)
    torch.testing.assert_close(io.load(tmp_path / "named.npz").V, torch.from_numpy(matrix))
    torch.testing.assert_close(
        io.load(tmp_path / "named.npz", key="other").V, torch.from_numpy(matrix * 2)
    )


def test_npz_several_arrays_without_a_name_is_an_error(tmp_path, matrix):
    np.savez(tmp_path / "many.npz", a=matrix, b=matrix)
    with pytest.raises(ValueError, match=r"many.npz holds 2 arrays \(a, b\); name the target with --key"):
        io.load(tmp_path / "many.npz")
    with pytest.raises(ValueError, match=r"many.npz has no array 'c'; it holds a, b"):
        io.load(tmp_path / "many.npz", key="c")


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
@pytest.mark.parametrize("header", [False, True])
def test_text_tables(tmp_path, matrix, suffix, delimiter, header):
    path = tmp_path / f"x{suffix}"
    np.savetxt(path, matrix, delimiter=delimiter, fmt="%.17g",
               header=delimiter.join(f"col{i}" for i in range(4)) if header else "",
               comments="")
    V = io.load(path).V
    torch.testing.assert_close(V, torch.from_numpy(matrix))


@pytest.mark.parametrize("header", ["", "a,b\r\n"])
def test_csv_with_a_byte_order_mark(tmp_path, header):
    # spreadsheets save "CSV UTF-8" with a byte-order mark; before, a file without a
    # header was refused: "line 1, column 1: '\\ufeff1' is not a number"
    (tmp_path / "x.csv").write_bytes(("\ufeff" + header + "1,2.5\r\n3,4\r\n").encode("utf-8"))
    V = io.load(tmp_path / "x.csv").V
    torch.testing.assert_close(V, torch.tensor([[1.0, 2.5], [3.0, 4.0]], dtype=torch.float64))


def test_single_row_csv_is_a_matrix(tmp_path):
    (tmp_path / "row.csv").write_text("1,2,3\n")
    assert io.load(tmp_path / "row.csv").V.shape == (1, 3)


# -- sparse formats ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "bsr", "dia"])
def test_sparse_npz_becomes_a_torch_sparse_tensor(tmp_path, sparse_matrix, fmt):
    scipy_sparse.save_npz(tmp_path / "s.npz", sparse_matrix.asformat(fmt))
    target = io.load(tmp_path / "s.npz")
    assert target.V.layout == torch.sparse_coo
    torch.testing.assert_close(target.V.to_dense(), torch.from_numpy(sparse_matrix.toarray()))
    assert "sparse 7 x 5 float64, 14 stored entries" in target.description


def test_matrix_market_coordinate_and_array(tmp_path, sparse_matrix, matrix):
    scipy_io.mmwrite(str(tmp_path / "s.mtx"), sparse_matrix)
    V = io.load(tmp_path / "s.mtx").V
    assert V.layout == torch.sparse_coo
    torch.testing.assert_close(V.to_dense(), torch.from_numpy(sparse_matrix.toarray()))
    scipy_io.mmwrite(str(tmp_path / "d.mtx"), matrix)
    V = io.load(tmp_path / "d.mtx").V
    assert V.layout == torch.strided
    torch.testing.assert_close(V, torch.from_numpy(matrix))


def test_negative_sparse_values_are_refused(tmp_path, sparse_matrix):
    scipy_io.mmwrite(str(tmp_path / "neg.mtx"), -sparse_matrix)
    with pytest.raises(ValueError, match=r"neg.mtx must be non-negative, but its smallest entry"):
        io.load(tmp_path / "neg.mtx")


# -- never unpickle ------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_pickled_payloads_are_never_unpickled(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    payload = np.array([_TouchOnUnpickle(marker)], dtype=object)
    path = tmp_path / f"evil{suffix}"
    if suffix == ".npy":
        np.save(path, payload, allow_pickle=True)
    else:
        np.savez(path, V=payload)
    with pytest.raises(ValueError, match=r"holds Python objects, which torchnmf never unpickles"):
        io.load(path)
    assert not marker.exists()
    # the payload really is live: unpickling it would have created the marker
    np.load(path, allow_pickle=True) if suffix == ".npy" else np.load(path, allow_pickle=True)["V"]
    assert marker.exists()


def test_a_raw_pickle_named_npy_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "unpickled"
    (tmp_path / "raw.npy").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    with pytest.raises(ValueError, match=r"raw.npy is not a .npy file \(its header is wrong\)"):
        io.load(tmp_path / "raw.npy")
    assert not marker.exists()


# -- errors --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.csv", "1,2\n3\n", r"bad.csv is not a table of numbers: .*columns"),
        ("words.csv", "a,b\nc,d\n", r"words.csv is not a table of numbers"),
        ("mixed.csv", "1,2,x\n3,4,5\n",
         r"mixed.csv, line 1, column 3: 'x' is not a number; a header line must have no numeric field"),
        ("mixed.tsv", "year\t2\n3\t4\n", r"mixed.tsv, line 1, column 1: 'year' is not a number"),
        ("empty.csv", "", r"empty.csv: the data is empty"),
        ("junk.npy", "hello", r"junk.npy is not a .npy file"),
        ("junk.npz", "hello", r"junk.npz is not a .npz file \(not a zip archive\)"),
        ("junk.wav", "hello", r"junk.wav is not a PCM .wav file that can be read"),
        ("junk.mtx", "hello", r"junk.mtx is not a valid Matrix Market file"),
        ("data.txt", "1 2", r"data.txt: unsupported file type '.txt'; use one of .npy, .npz"),
    ],
)
def test_malformed_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        io.load(tmp_path / name)


def _zip_with_text_member(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("V.txt", "1,2\n3,4\n")


def _csr_parts(path, indices, indptr, fmt="csr"):
    np.savez(path, format=np.array(fmt), shape=np.array([2, 2]), data=np.array([1.0, 2.0]),
             indices=np.array(indices), indptr=np.array(indptr))


@pytest.mark.parametrize(
    "write, message",
    [
        (_zip_with_text_member, r"x.npz: its member 'V.txt' is not a .npy array"),
        (lambda p: _csr_parts(p, [0, 5], [0, 1, 2]),
         r"x.npz is a malformed sparse .npz file: indices must be < 2"),
        (lambda p: _csr_parts(p, [0, 1], [0, 3, 2]),
         r"x.npz is a malformed sparse .npz file: indptr must be a non-decreasing sequence"),
        (lambda p: _csr_parts(p, [0, 1], [0, 1, 2], fmt=["csr", "csc"]),
         r"x.npz is a malformed sparse .npz file: can only convert an array of size 1"),
    ],
)
def test_malformed_npz_archives(tmp_path, write, message):
    # the file is named, and a sparse matrix's structure is checked before it is read
    write(tmp_path / "x.npz")
    with pytest.raises(ValueError, match=message):
        io.load(tmp_path / "x.npz")


@pytest.mark.parametrize(
    "array, message",
    [
        (-np.ones((2, 2)), r"x.npy must be non-negative, but its smallest entry is -1; "
                           r"non-negative factorisation needs non-negative data"),
        (np.array([[1.0, np.nan]]), r"x.npy contains NaN; non-negative factorisation needs finite, "
                                    r"non-negative values \(fill or drop the missing entries first\)$"),
        (np.array([[1.0, np.inf]]), r"x.npy contains infinite values"),
        (np.ones(3), r"x.npy: expected a matrix \(2-D; 3-D for NMFD\), got shape \(3,\)"),
        (np.ones((0, 3)), r"x.npy: the data is empty \(shape \(0, 3\)\)"),
        (np.ones((2, 2), dtype=complex), r"x.npy must hold real numbers, got dtype complex128"),
        (np.array([["a"]]), r"x.npy must hold real numbers, got dtype <U1"),
    ],
)
def test_bad_values(tmp_path, array, message):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(ValueError, match=message):
        io.load(tmp_path / "x.npy")


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.npy: no such file"):
        io.load(tmp_path / "missing.npy")
    (tmp_path / "folder.npy").mkdir()  # before: "no such file"
    with pytest.raises(IsADirectoryError, match=r"folder.npy: is a directory, not a .npy file"):
        io.load(tmp_path / "folder.npy")


def test_uint64_beyond_int64_is_named_not_called_negative(tmp_path):
    # before: wrapped to -9.2e18 and refused as "must be non-negative"
    np.save(tmp_path / "big.npy", np.array([[2**63 + 5, 1]], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"big.npy holds integers above 2\*\*63 - 1, which torch "
                                         r"cannot hold; save them as float64"):
        io.load(tmp_path / "big.npy")
    np.save(tmp_path / "ok.npy", np.array([[2**63 - 1, 1]], dtype=np.uint64))
    assert io.load(tmp_path / "ok.npy", dtype="float64").V[0, 0] == float(2**63 - 1)


# -- audio ---------------------------------------------------------------------------
def _write_raw_wav(path, samples, width, channels=1, rate=8000):
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(width)
        handle.setframerate(rate)
        handle.writeframes(samples.tobytes())


def test_wav_header_rate_of_zero_and_truncated_data(tmp_path):
    signal = torch.linspace(-0.5, 0.5, 400, dtype=torch.float64)
    raw = io.write_wav(tmp_path / "a.wav", signal, 8000).read_bytes()
    # before: "sample_rate must be a positive integer, got 0", naming no file
    (tmp_path / "rate0.wav").write_bytes(raw[:24] + struct.pack("<I", 0) + raw[28:])
    with pytest.raises(ValueError, match=r"rate0.wav: its header gives a sample rate of 0 Hz"):
        io.load(tmp_path / "rate0.wav")
    # before: the frames that are there were read without a word
    (tmp_path / "cut.wav").write_bytes(raw[:44 + 2 * 150 + 1])
    with pytest.warns(UserWarning, match=r"cut.wav ends after 150 of the 400 frames its header "
                                         r"announces \(a truncated file\?\)"):
        cut, rate, channels = io.read_wav(tmp_path / "cut.wav")
    whole, _, _ = io.read_wav(tmp_path / "a.wav")
    assert (rate, channels) == (8000, 1)
    torch.testing.assert_close(cut, whole[:150], rtol=0, atol=0)


def test_wav_round_trip(tmp_path):
    t = torch.arange(800, dtype=torch.float64) / 8000
    signal = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    io.write_wav(tmp_path / "a.wav", signal, 8000)
    with wave.open(str(tmp_path / "a.wav")) as handle:
        assert (handle.getnchannels(), handle.getsampwidth(), handle.getframerate()) == (1, 2, 8000)
        assert handle.getnframes() == 800
    back, rate, channels = io.read_wav(tmp_path / "a.wav")
    assert (rate, channels) == (8000, 1)
    torch.testing.assert_close(back, signal, atol=1 / 32767, rtol=0)


def test_wav_write_clips(tmp_path):
    io.write_wav(tmp_path / "loud.wav", torch.tensor([2.0, -2.0, 0.0]), 8000)
    back, _, _ = io.read_wav(tmp_path / "loud.wav")
    torch.testing.assert_close(back, torch.tensor([32767, -32767, 0], dtype=torch.float64) / 32768)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_sample_widths_and_stereo_mixdown(tmp_path, width):
    left = np.array([0.5, -0.5, 0.25, 0.0])
    right = np.array([0.0, 0.5, -0.25, 0.0])
    interleaved = np.stack([left, right], axis=1).reshape(-1)
    scale = 2 ** (8 * width - 1)
    ints = np.round(interleaved * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8)
    elif width == 3:
        unsigned = ints % (1 << 24)
        raw = np.stack([(unsigned >> s) & 0xFF for s in (0, 8, 16)], axis=1).astype(np.uint8)
    else:
        raw = ints.astype(f"<i{width}")
    _write_raw_wav(tmp_path / "s.wav", raw, width, channels=2)
    signal, rate, channels = io.read_wav(tmp_path / "s.wav")
    assert (rate, channels) == (8000, 2)
    torch.testing.assert_close(signal, torch.from_numpy((left + right) / 2), atol=1 / scale, rtol=0)


def test_wav_becomes_its_magnitude_spectrogram(tmp_path):
    t = torch.arange(4000, dtype=torch.float64) / 8000
    io.write_wav(tmp_path / "tone.wav", 0.5 * torch.sin(2 * torch.pi * 1000 * t), 8000)
    target = io.load(tmp_path / "tone.wav", n_fft=256)
    spec = target.spectrogram
    assert (spec.sample_rate, spec.n_fft, spec.hop, spec.length) == (8000, 256, 64, 4000)
    assert target.V.shape == (4000 // 64 + 1, 129)
    # the 1000 Hz tone sits in bin 1000 / (8000 / 256) = 32
    assert int(target.V.mean(0).argmax()) == 32
    assert "0.50 s of audio at 8000 Hz (1 channel), magnitude spectrogram 63 frames x 129 bins" \
        in target.description


def test_soft_masks_split_the_signal_exactly():
    generator = torch.Generator().manual_seed(0)
    signal = torch.randn(1000, dtype=torch.float64, generator=generator)
    spec = io.stft_magnitude(signal, 8000, n_fft=128, hop=32)
    share = torch.rand(spec.magnitude.shape, dtype=torch.float64, generator=generator)
    parts = torch.stack([share * spec.magnitude, (1 - share) * spec.magnitude, 0 * share])
    waves = spec.to_audio(parts)
    assert waves.shape == (3, 1000)
    torch.testing.assert_close(waves.sum(0), signal)
    torch.testing.assert_close(waves[2], torch.zeros(1000, dtype=torch.float64))
    # a single part equal to the magnitude gives the signal back
    torch.testing.assert_close(spec.to_audio(spec.magnitude[None])[0], signal)


def test_to_audio_checks_the_parts_shape():
    spec = io.stft_magnitude(torch.randn(500, dtype=torch.float64), 8000, n_fft=64)
    with pytest.raises(ValueError, match=r"parts must have shape \(R, 32, 33\), got \(2, 33, 32\)"):
        spec.to_audio(torch.rand(2, 33, 32, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_fft=0), r"n_fft must be a positive integer, got 0"),
        (dict(n_fft=64, hop=128), r"hop must not exceed n_fft=64"),
        (dict(sample_rate=0), r"sample_rate must be a positive integer, got 0"),
        (dict(n_fft=1024), r"signal has 500 samples, but a frame of n_fft=1024 needs at least 513"),
        (dict(signal=torch.full((500,), float("nan")), n_fft=64), r"signal contains NaN; every entry must be finite"),
    ],
)
def test_stft_settings_are_checked(kwargs, message):
    """Before: a short signal failed inside torch's padding, a NaN one gave a NaN
    spectrogram and a zero sample rate was kept."""
    arguments = dict(signal=torch.randn(500), sample_rate=8000)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        io.stft_magnitude(**arguments)
    with pytest.raises(TypeError, match="sample_rate must be a positive integer, got 8000.0"):
        io.stft_magnitude(torch.randn(500), 8000.0)


def test_write_wav_refuses_what_a_wav_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="signal must be finite"):
        io.write_wav(tmp_path / "nan.wav", torch.tensor([0.1, float("nan")]), 8000)
    with pytest.raises(ValueError, match="sample_rate must be a positive integer, got -1"):
        io.write_wav(tmp_path / "rate.wav", torch.zeros(3), -1)
    assert not (tmp_path / "nan.wav").exists() and not (tmp_path / "rate.wav").exists()


@pytest.mark.parametrize("signal, sample_rate, error, message", [
    # before: the rows were written one after the other as one mono signal
    (torch.zeros(2, 100), 8000, ValueError,
     r"signal must be a 1-D \(mono\) signal, got shape \(2, 100\); write each channel"),
    # before: a ComplexWarning, and the imaginary part dropped
    (torch.zeros(3, dtype=torch.complex64), 8000, TypeError,
     r"signal must hold real numbers, got dtype complex64"),
    (np.array(["0.5"]), 8000, TypeError, r"signal must hold real numbers, got dtype <U3"),
    # before: struct.error from the wave module, and a broken file left behind
    (torch.zeros(3), 1 << 31, ValueError, r"sample_rate must be below 2\*\*31 to fit a .wav header"),
])
def test_write_wav_refuses_signals_it_would_garble(tmp_path, signal, sample_rate, error, message):
    with pytest.raises(error, match=message):
        io.write_wav(tmp_path / "out.wav", signal, sample_rate)
    assert not (tmp_path / "out.wav").exists()


def test_read_text_refuses_a_file_without_numbers(tmp_path):
    for name, text in (("empty.csv", ""), ("header.csv", "a,b,c\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name}: the data is empty"):
            io.read_text(tmp_path / name)


# -- results -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["file", "allow_pickle"])
def test_save_factors_refuses_extras_numpy_would_take(tmp_path, name):
    # before: allow_pickle=... was taken by numpy.savez and silently not saved; file=...
    # failed inside numpy
    with pytest.raises(ValueError, match=f"{name} cannot name an extra value"):
        io.save_factors(tmp_path / "f.npz", torch.ones(3, 2), torch.ones(4, 2), [1.0], **{name: 1})
    assert not (tmp_path / "f.npz").exists()


def test_save_factors_loads_without_pickle(tmp_path):
    W, H = torch.rand(5, 2), torch.rand(7, 2)
    path = io.save_factors(tmp_path / "out", W, H, [3.0, 2.0, 1.0], beta=1.5, model="nmf")
    assert path == tmp_path / "out.npz"
    with np.load(path, allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["W"], W.numpy())
        np.testing.assert_array_equal(saved["H"], H.numpy())
        np.testing.assert_array_equal(saved["loss_history"], [3.0, 2.0, 1.0])
        assert float(saved["beta"]) == 1.5 and str(saved["model"]) == "nmf"
    with pytest.raises(TypeError, match=r"extra must be a number or a string, got dict"):
        io.save_factors(tmp_path / "bad.npz", W, H, [], extra={})


def test_to_audio_refuses_parts_that_are_not_shares(tmp_path):
    """Before: negative or NaN parts gave waveforms from masks outside [0, 1]."""
    spec = io.stft_magnitude(torch.randn(2000, dtype=torch.float64), 8000, n_fft=64)
    parts = torch.rand(2, *spec.magnitude.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="parts must be non-negative"):
        spec.to_audio(parts - 0.5)
    with pytest.raises(ValueError, match="parts contains NaN"):
        spec.to_audio(torch.where(parts > 0.9, float("nan"), parts))


def test_load_takes_a_dtype_or_its_name(tmp_path):
    """Before: a name such as "float16" was taken for a device ("Invalid device string")."""
    np.save(tmp_path / "a.npy", np.ones((3, 3)))
    assert io.load(tmp_path / "a.npy", dtype="float32").V.dtype == torch.float32
    assert io.load(tmp_path / "a.npy", dtype=torch.float16).V.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be a floating dtype .*, got torch.int8"):
        io.load(tmp_path / "a.npy", dtype="int8")
    with pytest.raises(TypeError, match="dtype must be a torch floating dtype or its name, got 'double precision'"):
        io.load(tmp_path / "a.npy", dtype="double precision")
