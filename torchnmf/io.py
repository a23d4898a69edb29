"""Reading targets from files and writing results back.

:func:`load` turns a file into a non-negative target tensor, choosing the
reader from the file's suffix:

========================  =================================================
``.npy``                  a dense array
``.npz``                  a dense array, or a scipy sparse matrix saved with
                          ``scipy.sparse.save_npz`` (read into a torch sparse
                          COO tensor)
``.csv``, ``.tsv``        numbers separated by commas or tabs (an optional
                          header line, with no numeric field, is skipped)
``.mtx``                  Matrix Market (a sparse COO tensor, or dense for
                          the ``array`` format)
``.wav``                  PCM audio: its magnitude spectrogram
                          (frames x frequency bins), see :class:`Spectrogram`
========================  =================================================

No reader ever unpickles: NumPy files are opened with ``allow_pickle=False``.
Every malformed file raises ``ValueError`` naming the file and what is wrong
with it; a file that cannot be opened raises ``OSError``.  scipy is needed
only for sparse ``.npz`` files and ``.mtx`` files, and imported there.

:func:`open_rows` opens a matrix to be read a block of rows at a time (a
memory-mapped ``.npy``, sparse ``.npz`` shards, ``.mtx``, an AnnData ``.h5ad``),
for fits streamed from disk; see :mod:`torchnmf.targets.sources`.

Audio helpers: :func:`read_wav`, :func:`write_wav`, :func:`stft_magnitude` and
:meth:`Spectrogram.to_audio`, which turns the parts of a factorisation back
into waveforms by soft masking the mixture's complex STFT.

The readers stay in one module, beside the one dispatch in :func:`load`, although
it runs past 400 lines: each format checks its own structure with its own
messages, and they share the conversion and validation helpers at the bottom.
"""
import numbers
import re
import warnings
import wave
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._validation import check_finite_tensor, check_non_negative_tensor
from .targets.sources import RowRange, open_rows

__all__ = [
    "SUFFIXES",
    "Target",
    "Spectrogram",
    "load",
    "open_rows",
    "RowRange",
    "read_npy",
    "read_npz",
    "read_text",
    "read_mtx",
    "read_wav",
    "write_wav",
    "stft_magnitude",
    "save_factors",
    "to_numpy",
]

SUFFIXES = (".npy", ".npz", ".csv", ".tsv", ".mtx", ".wav")


@dataclass
class Target:
    """A target read from a file.

    Attributes:
        V (Tensor): the non-negative target, dense or sparse COO.
        description (str): one line saying what was read.
        spectrogram (Spectrogram or None): for audio, what turns parts of ``V``
            back into sound.

    Examples::

        >>> import os, tempfile
        >>> import numpy as np
        >>> from torchnmf.io import load
        >>> path = os.path.join(tempfile.mkdtemp(), "V.npy")
        >>> np.save(path, np.ones((4, 3)))
        >>> target = load(path)
        >>> target.V.shape, target.spectrogram is None
        (torch.Size([4, 3]), True)
        >>> target.description.startswith("V.npy")
        True
    """

    V: torch.Tensor
    description: str
    spectrogram: "Spectrogram" = None


@dataclass
class Spectrogram:
    """The magnitude spectrogram of a signal and what is needed to invert it.

    Attributes:
        magnitude (Tensor): ``(frames, bins)``, the NMF orientation.
        stft (Tensor): the complex STFT, ``(bins, frames)``.
        sample_rate (int), n_fft (int), hop (int): the analysis settings.
        length (int): the signal's length in samples.

    Examples::

        >>> import torch
        >>> from torchnmf.io import stft_magnitude
        >>> tone = torch.sin(2 * torch.pi * 440 * torch.arange(8000) / 8000)
        >>> spec = stft_magnitude(tone, 8000, n_fft=256, hop=128)
        >>> spec.magnitude.shape, spec.stft.shape
        (torch.Size([63, 129]), torch.Size([129, 63]))
        >>> spec.sample_rate, spec.n_fft, spec.hop, spec.length
        (8000, 256, 128, 8000)
    """

    magnitude: torch.Tensor
    stft: torch.Tensor
    sample_rate: int
    n_fft: int
    hop: int
    length: int

    def to_audio(self, parts):
        r"""Waveforms of the parts of a factorisation, by soft masking.

        Each part :math:`P_r` (a non-negative ``(frames, bins)`` reconstruction
        of one component) takes the share :math:`P_r / \sum_s P_s` of the
        mixture's complex STFT, which is then inverted.  The waveforms sum to
        the original signal (up to the STFT's round-off).

        Args:
            parts (Tensor): ``(R, frames, bins)``.

        Returns:
            Tensor: ``(R, length)``.
        """
        parts = parts.detach().to(device=self.stft.device, dtype=self.magnitude.dtype)
        if parts.dim() != 3 or tuple(parts.shape[1:]) != tuple(self.magnitude.shape):
            raise ValueError(
                f"parts must have shape (R, {', '.join(map(str, self.magnitude.shape))}), "
                f"got {tuple(parts.shape)}"
            )
        check_non_negative_tensor(parts, "parts")  # shares of the mixture: never below 0
        total = parts.sum(0, keepdim=True)
        tiny = torch.finfo(parts.dtype).tiny
        # where no component sounds, share the mixture equally
        masks = torch.where(total > tiny, parts / total.clamp_min(tiny), 1.0 / parts.shape[0])
        window = torch.hann_window(self.n_fft, dtype=self.magnitude.dtype, device=self.stft.device)
        return torch.istft(
            masks.transpose(1, 2) * self.stft,
            self.n_fft,
            hop_length=self.hop,
            window=window,
            length=self.length,
        )


def stft_magnitude(signal, sample_rate, n_fft=1024, hop=None):
    """The :class:`Spectrogram` of a mono signal (a Hann-windowed STFT).

    Args:
        signal (Tensor): ``(samples,)``, floating point.
        sample_rate (int): samples per second.
        n_fft (int): the frame length.
        hop (int, optional): the hop between frames; default ``n_fft // 4``.

    Returns:
        Spectrogram: the magnitude as ``(frames, n_fft // 2 + 1)``, with what
        :meth:`Spectrogram.to_audio` needs to invert parts of it.

    Examples::

        >>> import torch
        >>> from torchnmf.io import stft_magnitude
        >>> tone = torch.sin(2 * torch.pi * 440 * torch.arange(8000) / 8000)
        >>> spec = stft_magnitude(tone, 8000, n_fft=256, hop=128)
        >>> spec.magnitude.shape
        torch.Size([63, 129])
        >>> int(spec.magnitude.mean(0).argmax()) * 8000 // 256   # the loudest bin, in Hz
        437
    """
    hop = n_fft // 4 if hop is None else hop
    for name, value in (("n_fft", n_fft), ("hop", hop)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if hop > n_fft:
        raise ValueError(f"hop must not exceed n_fft={n_fft} (the frames would leave gaps), got {hop}")
    sample_rate = _check_sample_rate(sample_rate)
    if not isinstance(signal, torch.Tensor):
        raise TypeError(f"signal must be a torch.Tensor, got {type(signal).__name__}")
    if not signal.is_floating_point():
        raise TypeError(f"signal must be floating point, got dtype {signal.dtype}")
    if signal.dim() != 1 or signal.numel() == 0:
        raise ValueError(f"signal must be a non-empty 1-D tensor, got shape {tuple(signal.shape)}")
    if signal.numel() <= n_fft // 2:  # the centred frames reflect n_fft // 2 samples at each end
        raise ValueError(
            f"signal has {signal.numel()} samples, but a frame of n_fft={n_fft} needs at least "
            f"{n_fft // 2 + 1}; lower n_fft"
        )
    check_finite_tensor(signal, "signal")
    window = torch.hann_window(n_fft, dtype=signal.dtype, device=signal.device)
    stft = torch.stft(signal, n_fft, hop_length=hop, window=window, return_complex=True)
    return Spectrogram(
        magnitude=stft.abs().T.contiguous(),
        stft=stft,
        sample_rate=sample_rate,
        n_fft=n_fft,
        hop=hop,
        length=signal.numel(),
    )


# -- the dispatcher ----------------------------------------------------------------
def load(path, *, key=None, n_fft=1024, hop=None, dtype=None):
    """Read a non-negative target from ``path``; the suffix chooses the reader.

    Args:
        path (str or Path): the file.
        key (str, keyword-only): for a dense ``.npz`` with several arrays, the
            one to read (default: the only array, or the one named ``V``).
        n_fft, hop (int, keyword-only): STFT settings for ``.wav`` files.
        dtype (torch.dtype or str, keyword-only): the floating dtype of the target
            (or its name, e.g. ``"float32"``);
            default: a float array keeps its dtype, anything else becomes
            ``torch.get_default_dtype()``.

    Returns:
        Target: the tensor, a one-line description and, for audio, the
        :class:`Spectrogram`.

    Raises:
        ValueError: for an unknown suffix, a malformed file, or data that is
            negative, NaN, infinite, empty or not a matrix.
        OSError: when the file cannot be opened.

    Examples::

        >>> import os, tempfile
        >>> import numpy as np
        >>> from torchnmf.io import load
        >>> path = os.path.join(tempfile.mkdtemp(), "V.npy")
        >>> np.save(path, np.ones((4, 3)))
        >>> target = load(path)
        >>> target.V.shape, target.V.dtype
        (torch.Size([4, 3]), torch.float64)
    """
    dtype = _float_dtype(dtype)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"{path.name}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(SUFFIXES)}"
        )
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a {suffix} file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    spectrogram = None
    if suffix == ".npy":
        V = read_npy(path)
    elif suffix == ".npz":
        V = read_npz(path, key=key)
    elif suffix in (".csv", ".tsv"):
        V = read_text(path, delimiter="," if suffix == ".csv" else "\t")
    elif suffix == ".mtx":
        V = read_mtx(path)
    else:
        signal, sample_rate, channels = read_wav(path)
        if dtype is not None:
            signal = signal.to(dtype)
        spectrogram = stft_magnitude(signal, sample_rate, n_fft=n_fft, hop=hop)
        V = spectrogram.magnitude
    V = _as_float(V, dtype)
    _check_data(V, path.name)
    if spectrogram is not None:
        description = (
            f"{path.name}: {spectrogram.length / spectrogram.sample_rate:.2f} s of audio at "
            f"{spectrogram.sample_rate} Hz ({channels} channel{'s' * (channels > 1)}"
            f"{', mixed to mono' * (channels > 1)}), magnitude spectrogram "
            f"{V.shape[0]} frames x {V.shape[1]} bins (n_fft {spectrogram.n_fft}, "
            f"hop {spectrogram.hop})"
        )
    else:
        description = f"{path.name}: {_describe(V)}"
    return Target(V=V, description=description, spectrogram=spectrogram)


def _describe(V):
    shape = " x ".join(map(str, V.shape))
    dtype = str(V.dtype).replace("torch.", "")
    if V.layout == torch.strided:
        return f"dense {shape} {dtype}"
    nnz = V._nnz()
    density = nnz / max(1, V.shape[0] * V.shape[1])
    return f"sparse {shape} {dtype}, {nnz} stored entries ({100 * density:.2g}% dense)"


def _float_dtype(dtype):
    """``load``'s ``dtype``: ``None``, a floating ``torch.dtype`` or its name."""
    if dtype is None:
        return None
    named = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(named, torch.dtype):
        raise TypeError(f"dtype must be a torch floating dtype or its name, got {dtype!r}")
    if not named.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype (e.g. torch.float32), got {named}")
    return named


def _as_float(V, dtype):
    if dtype is None:
        dtype = V.dtype if V.is_floating_point() else torch.get_default_dtype()
    return V if V.dtype == dtype else V.to(dtype)


def _check_data(V, name):
    if V.dim() not in (2, 3):
        raise ValueError(
            f"{name}: expected a matrix (2-D; 3-D for NMFD), got shape {tuple(V.shape)}"
        )
    if 0 in V.shape:
        raise ValueError(f"{name}: the data is empty (shape {tuple(V.shape)})")
    try:
        check_non_negative_tensor(V, name)
    except (ValueError, TypeError) as error:
        reason = "" if "non-negative factorisation" in str(error) else (
            "; non-negative factorisation needs non-negative data")
        raise ValueError(f"{error}{reason}") from None


def _from_numpy(array, name):
    if array.dtype.hasobject:
        raise ValueError(
            f"{name} holds Python objects, which torchnmf never unpickles; save a numeric array"
        )
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.dtype.kind == "f" and array.dtype.itemsize < 4:
        array = array.astype(np.float32)
    elif array.dtype.kind == "f" and array.dtype.itemsize > 8:  # long double: torch has none
        array = array.astype(np.float64)
    elif array.dtype.kind in "bu" and array.dtype != np.uint8:
        if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name} holds integers above 2**63 - 1, which torch cannot hold; "
                             f"save them as float64")
        array = array.astype(np.int64)
    if not array.dtype.isnative:  # a big-endian file: torch takes the machine's order only
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(array))


# -- NumPy ---------------------------------------------------------------------------
def read_npy(path):
    """A dense array from a ``.npy`` file (never unpickled).

    Examples::

        >>> import os, tempfile
        >>> import numpy as np
        >>> from torchnmf.io import read_npy
        >>> path = os.path.join(tempfile.mkdtemp(), "V.npy")
        >>> np.save(path, np.arange(6.0).reshape(2, 3))
        >>> read_npy(path)
        tensor([[0., 1., 2.],
                [3., 4., 5.]], dtype=torch.float64)
    """
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
        except ValueError:
            raise ValueError(f"{path.name} is not a .npy file (its header is wrong)") from None
        handle.seek(0)
        try:
            array = np.lib.format.read_array(handle, allow_pickle=False)
        except ValueError as error:
            if "pickle" in str(error):
                raise ValueError(
                    f"{path.name} holds Python objects, which torchnmf never unpickles; "
                    f"save a numeric array"
                ) from None
            raise ValueError(f"{path.name} is a malformed .npy file (format {version}): {error}") from None
    return _from_numpy(array, path.name)


def read_npz(path, *, key=None):
    """A dense array or a scipy sparse matrix from a ``.npz`` archive (never unpickled).

    Examples::

        >>> import os, tempfile
        >>> import numpy as np
        >>> from torchnmf.io import read_npz
        >>> path = os.path.join(tempfile.mkdtemp(), "data.npz")
        >>> np.savez(path, V=np.ones((2, 3)), labels=np.arange(2))
        >>> read_npz(path, key="V").shape
        torch.Size([2, 3])
    """
    path = Path(path)
    with open(path, "rb") as handle:  # a missing file: OSError, as for every reader
        if not zipfile.is_zipfile(handle):
            raise ValueError(f"{path.name} is not a .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if {"format", "shape", "data"} <= set(names) and key is None:
                arrays = {name: _npz_member(archive, name, path.name) for name in names}
                return _sparse_from_npz(arrays, path.name)
            if key is None:
                if len(names) == 1:
                    key = names[0]
                elif "V" in names:
                    key = "V"
                else:
                    raise ValueError(
                        f"{path.name} holds {len(names)} arrays ({', '.join(names) or 'none'}); "
                        f"name the target with --key, or save it as 'V'"
                    )
            if key not in names:
                raise ValueError(
                    f"{path.name} has no array {key!r}; it holds {', '.join(names) or 'none'}"
                )
            array = _npz_member(archive, key, path.name)
    except ValueError as error:
        if "pickle" in str(error):
            raise ValueError(
                f"{path.name} holds Python objects, which torchnmf never unpickles; "
                f"save numeric arrays"
            ) from None
        raise
    except (zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path.name} is a damaged .npz archive: {error}") from None
    return _from_numpy(array, f"{path.name}[{key!r}]")


def _npz_member(archive, name, file_name):
    """Member ``name`` of an open ``.npz`` archive (numpy hands other files back as bytes)."""
    array = archive[name]
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{file_name}: its member {name!r} is not a .npy array")
    return array


def _import_scipy(what):
    try:
        import scipy.io
        import scipy.sparse
    except ImportError:
        raise ImportError(f"reading {what} needs scipy; pip install 'torchnmf[io]'") from None
    return scipy


def _sparse_from_npz(arrays, name):
    """Rebuild a matrix saved by ``scipy.sparse.save_npz`` from its plain arrays."""
    scipy = _import_scipy("sparse .npz files")

    try:
        fmt = arrays["format"].item()
        fmt = fmt.decode("ascii") if isinstance(fmt, bytes) else str(fmt)
        shape = tuple(int(s) for s in arrays["shape"])
        data = arrays["data"]
        if fmt in ("csr", "csc", "bsr"):
            cls = {"csr": scipy.sparse.csr_matrix, "csc": scipy.sparse.csc_matrix,
                   "bsr": scipy.sparse.bsr_matrix}[fmt]
            matrix = cls((data, arrays["indices"], arrays["indptr"]), shape=shape)
            matrix.check_format(full_check=True)  # indices in range, indptr rising
        elif fmt == "coo":
            if "coords" in arrays:
                row, col = arrays["coords"]
            else:
                row, col = arrays["row"], arrays["col"]
            matrix = scipy.sparse.coo_matrix((data, (row, col)), shape=shape)
        elif fmt == "dia":
            matrix = scipy.sparse.dia_matrix((data, arrays["offsets"]), shape=shape)
        else:
            raise ValueError(f"unknown sparse format {fmt!r}")
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{name} is a malformed sparse .npz file: {error}") from None
    return _sparse_to_torch(matrix, name)


def _sparse_to_torch(matrix, name):
    """A scipy sparse matrix as a coalesced torch sparse COO tensor."""
    coo = matrix.tocoo()
    values = _from_numpy(np.asarray(coo.data), name)
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(
        indices, values, tuple(coo.shape), check_invariants=True
    ).coalesce()


# -- text ----------------------------------------------------------------------------
_NUMBER = re.compile(
    r"^\s*[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|nan|inf|infinity)\s*$", re.IGNORECASE
)


def read_text(path, delimiter=","):
    """A dense matrix from delimited text.

    The first line is a header when none of its fields is a number; a first
    line mixing numbers and other fields is an error naming its column (it
    would otherwise be dropped without a word, or read as a header).

    Examples::

        >>> import os, tempfile
        >>> from torchnmf.io import read_text
        >>> path = os.path.join(tempfile.mkdtemp(), "V.csv")
        >>> with open(path, "w") as handle:
        ...     _ = handle.write("a,b,c\\n1,2,3\\n4,5,6\\n")
        >>> read_text(path)   # the header line is skipped
        tensor([[1., 2., 3.],
                [4., 5., 6.]], dtype=torch.float64)
    """
    path = Path(path)
    # utf-8-sig: spreadsheets start their CSV files with a byte-order mark
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        first = handle.readline()
    fields = first.strip().split(delimiter)
    numeric = [bool(_NUMBER.match(f)) for f in fields]
    if any(numeric) and not all(numeric):
        column = numeric.index(False)
        raise ValueError(
            f"{path.name}, line 1, column {column + 1}: {fields[column]!r} is not a number; "
            f"a header line must have no numeric field, and a data line only numbers"
        )
    skip = 0 if all(numeric) else 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
            array = np.loadtxt(path, delimiter=delimiter, skiprows=skip, ndmin=2, dtype=np.float64,
                               encoding="utf-8-sig")
    except ValueError as error:
        detail = " ".join(str(error).split())
        raise ValueError(f"{path.name} is not a table of numbers: {detail}") from None
    if array.size == 0:
        raise ValueError(f"{path.name}: the data is empty (no numbers: an empty file, or a header alone)")
    return torch.from_numpy(array)


# -- Matrix Market -------------------------------------------------------------------
def read_mtx(path):
    """A Matrix Market file: a sparse COO tensor (coordinate format) or a dense one (array).

    Examples::

        >>> import os, tempfile
        >>> from torchnmf.io import read_mtx
        >>> path = os.path.join(tempfile.mkdtemp(), "V.mtx")
        >>> with open(path, "w") as handle:
        ...     _ = handle.write("%%MatrixMarket matrix coordinate real general\\n"
        ...                      "2 3 2\\n1 1 1.5\\n2 3 4.0\\n")
        >>> V = read_mtx(path)
        >>> V.layout, V.shape
        (torch.sparse_coo, torch.Size([2, 3]))
        >>> V.to_dense()
        tensor([[1.5000, 0.0000, 0.0000],
                [0.0000, 0.0000, 4.0000]], dtype=torch.float64)
    """
    scipy = _import_scipy(".mtx files")

    path = Path(path)
    try:
        matrix = scipy.io.mmread(str(path))
    except (ValueError, IndexError, TypeError, EOFError) as error:
        detail = " ".join(str(error).split())
        raise ValueError(f"{path.name} is not a valid Matrix Market file: {detail}") from None
    if isinstance(matrix, np.ndarray):
        if np.iscomplexobj(matrix):
            raise ValueError(f"{path.name} holds complex numbers; NMF needs real data")
        return _from_numpy(matrix, path.name)
    if np.iscomplexobj(matrix.data):
        raise ValueError(f"{path.name} holds complex numbers; NMF needs real data")
    return _sparse_to_torch(matrix, path.name)


# -- audio ---------------------------------------------------------------------------
def read_wav(path):
    """A PCM ``.wav`` file as a mono float64 signal in [-1, 1].

    Returns:
        (signal, sample_rate, channels): channels are averaged into ``signal``.

    Examples::

        >>> import os, tempfile
        >>> import torch
        >>> from torchnmf.io import read_wav, write_wav
        >>> path = write_wav(os.path.join(tempfile.mkdtemp(), "tone.wav"), 0.5 * torch.ones(800), 8000)
        >>> signal, sample_rate, channels = read_wav(path)
        >>> signal.shape, sample_rate, channels
        (torch.Size([800]), 8000, 1)
        >>> round(float(signal[0]), 3)
        0.5
    """
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as handle:
            channels = handle.getnchannels()
            width = handle.getsampwidth()
            sample_rate = handle.getframerate()
            announced = handle.getnframes()
            frames = handle.readframes(announced)
    except (wave.Error, EOFError) as error:
        raise ValueError(
            f"{path.name} is not a PCM .wav file that can be read ({error}); "
            f"convert it to 8, 16, 24 or 32-bit integer PCM"
        ) from None
    if width not in (1, 2, 3, 4):
        raise ValueError(f"{path.name}: unsupported sample width of {width} bytes")
    if sample_rate <= 0:
        raise ValueError(f"{path.name}: its header gives a sample rate of {sample_rate} Hz")
    if len(frames) < announced * width * channels:
        warnings.warn(
            f"{path.name} ends after {len(frames) // (width * channels)} of the {announced} "
            f"frames its header announces (a truncated file?); reading those", stacklevel=2
        )
    usable = len(frames) - len(frames) % (width * channels)
    raw = np.frombuffer(frames[:usable], dtype=np.uint8)
    if width == 1:
        samples = (raw.astype(np.float64) - 128.0) / 128.0
    elif width == 3:
        triples = raw.reshape(-1, 3).astype(np.int32)
        ints = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        samples = ints / float(1 << 23)
    else:
        ints = np.frombuffer(raw.tobytes(), dtype=f"<i{width}")
        samples = ints.astype(np.float64) / float(1 << (8 * width - 1))
    if samples.size == 0:
        raise ValueError(f"{path.name} holds no audio samples")
    signal = samples.reshape(-1, channels).mean(axis=1)
    return torch.from_numpy(np.ascontiguousarray(signal)), sample_rate, channels


def _check_sample_rate(sample_rate):
    """A positive integer number of samples per second (a ``.wav`` header holds an int)."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral):
        raise TypeError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
    return int(sample_rate)


def write_wav(path, signal, sample_rate):
    """Write a mono signal in [-1, 1] as 16-bit PCM (values beyond are clipped).

    Examples::

        >>> import os, tempfile
        >>> import torch
        >>> from torchnmf.io import load, write_wav
        >>> tone = torch.sin(2 * torch.pi * 440 * torch.arange(8000) / 8000)
        >>> path = write_wav(os.path.join(tempfile.mkdtemp(), "tone.wav"), tone, 8000)
        >>> path.suffix
        '.wav'
        >>> load(path, n_fft=256).V.shape   # its magnitude spectrogram
        torch.Size([126, 129])
    """
    sample_rate = _check_sample_rate(sample_rate)
    if 2 * sample_rate >= 1 << 32:  # the header's byte rate is an unsigned 32-bit field
        raise ValueError(f"sample_rate must be below 2**31 to fit a .wav header, got {sample_rate}")
    samples = to_numpy(signal)
    if samples.dtype.kind not in "biuf":
        raise TypeError(f"signal must hold real numbers, got dtype {samples.dtype}")
    if samples.ndim != 1:  # flattening rows would play them one after another
        raise ValueError(
            f"signal must be a 1-D (mono) signal, got shape {tuple(samples.shape)}; write "
            f"each channel or component to its own file"
        )
    samples = samples.astype(np.float64)
    if not np.isfinite(samples).all():
        raise ValueError("signal must be finite: it holds NaN or infinite samples")
    ints = np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(ints.tobytes())
    return Path(path)


# -- results -------------------------------------------------------------------------
def to_numpy(tensor):
    """A detached CPU NumPy copy of a (possibly sparse) tensor or an array (bfloat16,
    which NumPy lacks, as float32).

    Examples::

        >>> import torch
        >>> from torchnmf.io import to_numpy
        >>> V = torch.tensor([[0., 2.], [3., 0.]]).to_sparse()
        >>> to_numpy(V)
        array([[0., 2.],
               [3., 0.]], dtype=float32)
    """
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.cpu().numpy()
    return np.asarray(tensor)


def save_factors(path, W, H, loss_history, **extra):
    """Save ``W``, ``H`` and the loss history to an ``.npz`` archive readable without pickle.

    Extra keyword arguments (numbers or strings) are stored beside them.
    Returns the path written (``.npz`` is appended when missing).

    Examples::

        >>> import os, tempfile
        >>> import numpy as np
        >>> import torch
        >>> from torchnmf.io import save_factors
        >>> path = save_factors(os.path.join(tempfile.mkdtemp(), "factors"),
        ...                     torch.ones(4, 2), torch.ones(5, 2), [3.0, 1.0], beta=2)
        >>> path.name
        'factors.npz'
        >>> archive = np.load(path)
        >>> archive["W"].shape, archive["H"].shape, float(archive["beta"])
        ((4, 2), (5, 2), 2.0)
    """
    path = Path(path)
    if path.suffix.lower() != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays = {
        "W": to_numpy(W),
        "H": to_numpy(H),
        "loss_history": np.asarray(loss_history, dtype=np.float64),
    }
    for name, value in extra.items():
        if name in ("file", "allow_pickle"):  # numpy.savez's own arguments
            raise ValueError(f"{name} cannot name an extra value (numpy.savez would take it "
                             f"as its own argument); choose another name")
        arrays[name] = np.asarray(value)
        if arrays[name].dtype.hasobject:
            raise TypeError(f"{name} must be a number or a string, got {type(value).__name__}")
    np.savez(path, **arrays)
    return path

