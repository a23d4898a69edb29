"""The ``torchnmf`` command line (also ``python -m torchnmf``).

``torchnmf fit INPUT --rank R [options]`` factorises a matrix read from a file
(see :mod:`torchnmf.io` for the formats), writes ``W``, ``H`` and the loss
history to an ``.npz`` archive, optionally a figure (``--plot``) and, for
``.wav`` input, one waveform per component.  ``torchnmf rank`` and
``torchnmf consensus`` run many restarts at once to choose the rank and to
build consensus programs (:mod:`torchnmf.cli_selection`).  ``torchnmf demo``
runs the demo (:mod:`torchnmf.demo`).

A report goes to stdout, the progress bar and notes to stderr.  Exit status:
0 on success, 1 when the input or an option's value cannot be used (one line
on stderr, no traceback), 2 for a malformed command line, 130 when interrupted.
"""
import argparse
import os
import sys
import warnings
from pathlib import Path

from .cli_selection import check_outputs, figure_file

__all__ = ["main"]

class CommandError(Exception):
    """A failure to report to the user in one line."""


def init_methods():
    """The initialisations ``--init`` offers: those of :mod:`torchnmf.init`."""
    from .init import METHODS

    return METHODS


def solver_names():
    """The solvers ``--solver`` offers: the registry's keys at run time."""
    from .solvers.registry import SOLVERS

    return tuple(sorted(SOLVERS))


# -- argument types: argparse turns their ValueError into a usage error (status 2) -----
def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


_positive_int.__name__ = "positive integer"


def _non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value


_non_negative_float.__name__ = "non-negative number"


def _positive_seconds(text):
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


_positive_seconds.__name__ = "positive number of seconds"


def _finite_float(text):
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(text)
    return value


_finite_float.__name__ = "finite number"


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="torchnmf", description="Non-negative factorisations in PyTorch."
    )
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    fit = commands.add_parser(
        "fit",
        help="factorise a matrix read from a file",
        description="Factorise INPUT (.npy, .npz dense or scipy sparse, .csv, .tsv, .mtx, "
        ".wav) as V ~ H @ W.T (rows of V are samples, columns features; a .wav file "
        "becomes its magnitude spectrogram, frames x frequency bins) and save W, H and "
        "the loss history.",
    )
    fit.add_argument("input", metavar="INPUT", help="the data file")
    fit.add_argument("-r", "--rank", type=_positive_int, required=True,
                     help="the number of components")
    fit.add_argument("--beta", type=_finite_float, default=1.0,
                     help="the beta-divergence: 2 Euclidean, 1 Kullback-Leibler (default), "
                     "0 Itakura-Saito")
    solvers = solver_names()
    fit.add_argument("--solver", choices=solvers, default="mu" if "mu" in solvers else solvers[0],
                     help="the update rule (default %(default)s)")
    fit.add_argument("--init", choices=init_methods(), default="random",
                     help="the initialisation (default %(default)s, scaled to the data)")
    fit.add_argument("--max-iter", type=_positive_int, default=200,
                     help="the most iterations (default %(default)s)")
    fit.add_argument("--tol", type=_non_negative_float, default=1e-4,
                     help="stop when the relative decrease of the loss falls under this; "
                     "0 runs all iterations (default %(default)s)")
    fit.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    fit.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    fit.add_argument("--dtype", choices=("float32", "float64"), default=None,
                     help="floating type (default: that of the data; float32 for integers)")
    fit.add_argument("--model", choices=("nmf", "nmfd"), default="nmf",
                     help="nmf, or nmfd (convolutive along the rows: time for a spectrogram)")
    fit.add_argument("--T", type=_positive_int, default=None,
                     help="NMFD template length in rows/frames (default 8)")
    fit.add_argument("-o", "--output", default=None,
                     help="the .npz to write W, H and loss_history to "
                     "(default: INPUT with suffix .nmf.npz)")
    fit.add_argument("--plot", default=None, metavar="PNG",
                     help="write a figure of the factorisation (needs matplotlib)")
    fit.add_argument("--key", default=None,
                     help="for a .npz holding several arrays, the one to factorise")
    fit.add_argument("--n-fft", type=_positive_int, default=1024,
                     help="STFT frame length for .wav input (default %(default)s)")
    fit.add_argument("--hop", type=_positive_int, default=None,
                     help="STFT hop for .wav input (default n_fft / 4)")
    fit.add_argument("--stream", action="store_true",
                     help="read INPUT in blocks of rows every iteration instead of loading it "
                     "(.npy memory-mapped, sparse .npz or a directory of .npz shards, .mtx, "
                     ".h5ad); for matrices larger than memory, same result")
    fit.add_argument("--block-rows", type=_positive_int, default=None, metavar="N",
                     help="rows per block with --stream (implies it; default about 64 MiB "
                     "of data per block)")
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fit.add_argument("--checkpoint", default=None, metavar="PATH",
                     help="save the fit there every --checkpoint-every iterations, and resume "
                     "from it when it exists (e.g. after torchrun --max-restarts)")
    fit.add_argument("--checkpoint-every", type=_positive_int, default=10,
                     help="iterations between checkpoints (default %(default)s)")
    fit.add_argument("--timeout", type=_positive_seconds, default=300.0,
                     help="under torchrun, seconds to wait for the other processes before "
                     "failing (default %(default)s)")

    from .cli_selection import add_commands

    add_commands(commands, _positive_int, _non_negative_float, _finite_float, solvers)

    demo = commands.add_parser(
        "demo", help="separate the instruments of a synthesised piece with NMFD"
    )
    demo.add_argument("--out", default="torchnmf-demo", metavar="DIR",
                      help="where to write the figure and audio (default ./%(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--max-iter", type=_positive_int, default=None,
                      help="NMFD iterations (default: the demo's own)")
    demo.add_argument("--no-plot", action="store_true", help="skip the figure")
    return parser


# -- fit -------------------------------------------------------------------------------
def _device(name):
    from ._device import usable_device

    try:
        return usable_device(name, "--device")
    except ValueError as error:
        raise CommandError(f"{error}; try --device cpu") from None


def _model_layout(V, model_name, note):
    """The target in the model's layout: ``(N, C)`` for NMF, ``(1, C, N)`` for NMFD."""
    import torch

    if model_name == "nmf":
        if V.dim() != 2:
            raise CommandError(
                f"--model nmf needs a matrix, but the data has shape {tuple(V.shape)}; "
                f"use --model nmfd for (N, C, L) data"
            )
        return V
    if V.layout != torch.strided:
        note(f"NMFD needs a dense target: densified {' x '.join(map(str, V.shape))}")
        V = V.to_dense()
    return V.T.unsqueeze(0) if V.dim() == 2 else V


def _parts_as_rows(part, model_name):
    """A reconstruction in the model's layout back to the file's ``(N, C)`` rows."""
    return part if model_name == "nmf" else part[0].T


def _build_model(V, args):
    from .nmf import NMF, NMFD

    if args.model == "nmf":
        if args.T is not None:
            raise CommandError("--T applies to --model nmfd only")
        model = NMF(V.shape, rank=args.rank)
    else:
        T = 8 if args.T is None else args.T
        if T > V.shape[-1]:
            raise CommandError(
                f"--T {T} is longer than the data's {V.shape[-1]} rows/frames; choose a "
                f"smaller --T"
            )
        model = NMFD(V.shape, rank=args.rank, T=T)
    return model.to(device=V.device, dtype=V.dtype)


def _initialise(model, V, method, seed):
    import torch

    model.initialize_(V, method, generator=torch.Generator().manual_seed(seed))


def _check_streamable(args):
    """Refuse the options a streamed fit cannot serve."""
    if args.model != "nmf":
        raise CommandError("--stream supports --model nmf only")
    if args.plot:
        raise CommandError("--plot needs the data in memory; leave out --stream")
    if args.init != "random":
        raise CommandError(f"--stream supports --init random only (--init {args.init} needs "
                           f"the whole matrix for its SVD)")


def _stream_total(source, args):
    """The sum of every entry of ``source``, in one pass over its blocks (float)."""
    import torch

    step = args.block_rows or max(1, (64 << 20) // max(source.shape[1] * 8, 1))
    total = 0.0
    for _, _, block in source.blocks(step):
        total += float((block.values() if block.layout != torch.strided else block)
                       .sum(dtype=torch.float64))
    return total


def _streamed_model(args, shape, total, dtype):
    """The random start of a streamed fit of an ``shape`` matrix whose entries sum to
    ``total``: as :func:`torchnmf.init.initialize_random`, uniform on [0, 2s] with
    s = sqrt(mean / rank), ``W`` drawn first, then every row of ``H``."""
    import torch

    from .nmf import NMF

    N, C = shape
    if not total > 0:
        raise CommandError(f"{Path(args.input).name} has no positive entry to factorise")
    scale = 2 * (total / (N * C) / args.rank) ** 0.5
    generator = torch.Generator().manual_seed(args.seed)
    model = NMF((N, C), rank=args.rank).to(dtype=dtype)
    with torch.no_grad():
        for factor in (model.W, model.H):
            factor.copy_(torch.rand(factor.shape, generator=generator, dtype=dtype) * scale)
    return model


def _stream_dtype(source, dtype):
    import torch

    return dtype or (source.dtype if source.dtype.is_floating_point else torch.get_default_dtype())


def _open_streamed(args, dtype, device, note):
    """``torchnmf fit --stream``: the row source, its description and a model whose
    random start is scaled to the data's mean (found in one pass over the blocks)."""
    from .io import open_rows

    _check_streamable(args)
    source = open_rows(args.input, key=args.key)
    N, C = source.shape
    kind = "sparse" if source.is_sparse else "dense"
    description = (f"{Path(args.input).name}: {kind} {N} x {C} "
                   f"{str(source.dtype).replace('torch.', '')}, streamed in row blocks")
    model = _streamed_model(args, source.shape, _stream_total(source, args),
                            _stream_dtype(source, dtype))
    return source, description, model.to(device)


def _fit(model, V, args, note):
    import torch

    options = dict(beta=args.beta, tol=args.tol, max_iter=args.max_iter,
                   verbose=not args.quiet, solver=args.solver)
    if getattr(args, "checkpoint", None):
        options.update(checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                       resume=_resume_path(args.checkpoint))
    if args.stream:
        options["block_rows"] = args.block_rows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            n_iter = model.fit(V, **options)
        except NotImplementedError as error:
            if args.stream or V.layout == torch.strided:
                raise
            # FALLBACK until sparse targets land in NMF.fit: fit the dense equivalent.
            note(f"this version cannot fit sparse targets ({error}); fitting the densified "
                 f"{' x '.join(map(str, V.shape))} matrix instead")
            V = V.to_dense()
            n_iter = model.fit(V, **options)
    for warning in caught:
        note(str(warning.message))
    return n_iter, V


FIGURE_ROWS = 2000


def _figure_rows(model, V, model_name, limit=FIGURE_ROWS):
    """Target and reconstruction to draw: at most ``limit`` rows of a matrix.

    ``V`` may hold only the first ``limit`` rows of a longer target (what rank
    0 reads under torchrun); the model's ``H`` has all of them.
    """
    import torch

    with torch.no_grad():
        if model_name == "nmf" and model.H.shape[0] > limit:
            target = V
            if V.shape[0] > limit:
                target = V.index_select(0, torch.arange(limit, device=V.device))
            return target, model.reconstruct(model.H[:limit], model.W), f" (first {limit} rows)"
        return V, model(), ""


def _write_plot(path, model, V, args, audio):
    try:
        from .plot import summary_figure
    except ImportError as error:
        raise CommandError(f"--plot needs matplotlib ({error}); pip install 'torchnmf[plot]'")
    target, approx, subset = _figure_rows(model, V, args.model)
    figure = summary_figure(
        model.W, model.H, target, approx, model.loss_history, log=audio,
        title=f"{Path(args.input).name}: {args.model.upper()} rank {args.rank}, "
        f"beta {args.beta:g}{subset}",
    )
    path = figure_file(path)
    figure.savefig(path, dpi=100)
    return path


def _write_audio(model, spectrogram, args, output):
    import torch

    from .io import write_wav

    with torch.no_grad():
        parts = torch.stack([
            _parts_as_rows(model.reconstruct(model.H[:, r:r + 1], model.W[:, r:r + 1]),
                           args.model)
            for r in range(model.rank)
        ])
        waves = spectrogram.to_audio(parts)
    stem = output.with_suffix("")
    paths = []
    for r, signal in enumerate(waves):
        paths.append(write_wav(f"{stem}.component{r}.wav", signal, spectrogram.sample_rate))
    return paths


def _torchrun_world():
    """The number of processes torchrun started (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _resume_path(checkpoint, group=None):
    """``checkpoint`` when every process has its file there (a restarted job), else ``None``."""
    import torch

    from .solvers.checkpoint import checkpoint_path

    if checkpoint is None:
        return None
    if group is None:
        return checkpoint if Path(checkpoint).is_file() else None
    import torch.distributed as dist

    mine = Path(checkpoint_path(checkpoint, dist.get_rank(), dist.get_world_size())).is_file()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces CUDA tensors
    missing = torch.tensor([0.0 if mine else 1.0], device=device)
    dist.all_reduce(missing)
    return checkpoint if missing.item() == 0 else None


class _Sequences:
    """The ``(N, C, L)`` array of a ``.npy`` (memory-mapped) or dense ``.npz`` file, read
    a block of sequences (dimension 0) at a time: NMFD's rows under torchrun."""

    def __init__(self, path, key=None):
        import numpy as np

        path = Path(path)
        if path.suffix.lower() == ".npy":
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as archive:
                if "format" in archive.files and key is None:
                    raise CommandError(f"{path.name} holds a sparse matrix; --model nmfd needs "
                                       f"a dense (N, C, L) array")
                key = key or (archive.files[0] if len(archive.files) == 1 else "V")
                if key not in archive.files:
                    raise CommandError(f"{path.name} has no array {key!r}; it holds "
                                       f"{', '.join(archive.files)}")
                self.array = archive[key]
        self.shape = tuple(int(n) for n in self.array.shape)

    def read(self, start, stop):
        import numpy as np
        import torch

        return torch.from_numpy(np.array(self.array[start:stop]))


def _open_own_rows(args, world):
    """The file's rows to split over ``world`` processes: a row source for NMF, the
    sequences (dimension 0 of an ``(N, C, L)`` array) for NMFD."""
    from . import io

    suffix = Path(args.input).suffix.lower()
    if args.model == "nmf":
        if suffix not in (".npy", ".npz", ".mtx", ".h5ad"):
            raise CommandError(
                f"under torchrun, fit reads .npy, .npz, .mtx or .h5ad INPUT (each process its "
                f"own rows), got {Path(args.input).name}"
            )
        source = io.open_rows(args.input, key=args.key)
        if source.shape[0] < world:  # (every process sees it, before any waits for another)
            raise CommandError(
                f"under torchrun, fit splits the rows of INPUT over the {world} processes, but "
                f"{Path(args.input).name} has {source.shape[0]} rows; run it with at most "
                f"{source.shape[0]} processes"
            )
        return source
    if suffix not in (".npy", ".npz"):
        raise CommandError(f"under torchrun, --model nmfd reads an (N, C, L) .npy or .npz "
                           f"INPUT, got {Path(args.input).name}")
    source = _Sequences(args.input, args.key)
    if len(source.shape) != 3 or source.shape[0] < world:
        raise CommandError(
            f"under torchrun, --model nmfd splits the sequences (dimension 0 of an (N, C, L) "
            f"INPUT) over the {world} processes, but {Path(args.input).name} has shape "
            f"{source.shape}; a matrix is a single sequence: run it without torchrun, or save "
            f"N >= {world} sequences as an (N, C, L) array"
        )
    return source


def _plot_gathered(args, model, H, history, source, dtype, out):
    """Rank 0's figure of the gathered fit: the one the plain command draws."""
    import torch

    from .nmf import NMF, NMFD

    N = source.shape[0]
    # the plain command draws the first FIGURE_ROWS rows of a matrix, all of NMFD's target
    V = source.read(0, min(N, FIGURE_ROWS) if args.model == "nmf" else N)
    V = V.to(dtype)
    cls = NMF if args.model == "nmf" else NMFD
    whole = cls(W=model.W.detach().cpu(), H=H.to(dtype))
    whole.loss_history = history
    out(f"wrote the figure to {_write_plot(args.plot, whole, V, args, False)}")


def _run_fit_distributed(args, out, note):
    """``torchnmf fit`` as one of torchrun's processes: each reads its own rows (NMFD:
    its sequences), the fit is shared, rank 0 gathers ``H`` and writes the
    single-process output (and figure)."""
    import datetime

    import torch
    import torch.distributed as dist

    from . import io

    args.stream = args.stream or args.block_rows is not None
    if args.stream:
        _check_streamable(args)
    check_outputs((), args.plot, CommandError, input=args.input)
    world = _torchrun_world()
    source = _open_own_rows(args, world)
    device = _device(args.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    global _GROUP_USED
    _GROUP_USED = True
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank != 0:
            out = note = lambda message: None  # noqa: E731
        output = Path(args.output) if args.output else Path(args.input).with_suffix(".nmf.npz")
        N = source.shape[0]
        start, stop = N * rank // world, N * (rank + 1) // world
        group = dist.group.WORLD
        dtype = getattr(torch, args.dtype) if args.dtype else None
        what = "rows" if args.model == "nmf" else "sequences"
        if args.stream:  # each process streams its own rows in blocks
            V = io.RowRange(source, start, stop)
            dtype = _stream_dtype(source, dtype)
            total = torch.tensor(_stream_total(V, args), dtype=torch.float64)
            dist.all_reduce(total, group=group)
            whole = _streamed_model(args, source.shape, float(total), dtype)
            model = type(whole)(W=whole.W.detach(), H=whole.H.detach()[start:stop].clone())
            model = model.to(device)
            what += ", streamed in row blocks,"
        else:
            V = source.read(start, stop)
            dtype = dtype or (V.dtype if V.dtype.is_floating_point else torch.get_default_dtype())
            V = V.to(dtype).to(device)
            torch.manual_seed(args.seed)
            model = _build_model(V, args)
            model.initialize_(V, args.init, generator=torch.Generator().manual_seed(args.seed),
                              process_group=group, timeout=args.timeout)
        out(f"read {Path(args.input).name}: {what} {start}..{stop} of "
            f"{' x '.join(map(str, source.shape))} on each of {world} processes ({backend})")
        options = dict(block_rows=args.block_rows) if args.stream else {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            n_iter = model.fit(
                V, beta=args.beta, tol=args.tol, max_iter=args.max_iter, verbose=not args.quiet,
                solver=args.solver, process_group=group, timeout=args.timeout,
                checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                resume=_resume_path(args.checkpoint, group), **options,
            )
        for warning in caught:
            note(str(warning.message))
        history = model.loss_history
        out(f"fit: {n_iter} iterations, loss {history[0]:.6g} -> {history[-1]:.6g}")
        blocks = [None] * world if rank == 0 else None
        dist.gather_object(model.H.detach().cpu().numpy(), blocks, dst=0)
        if rank == 0:
            import numpy as np

            H = torch.from_numpy(np.concatenate(blocks))
            extra = dict(n_iter=n_iter, rank=args.rank, beta=args.beta, model=args.model,
                         solver=args.solver, init=args.init, seed=args.seed,
                         input=str(Path(args.input).name))
            written = io.save_factors(output, model.W, H, history, **extra)
            out(f"wrote W {tuple(model.W.shape)}, H {tuple(H.shape)} and the loss history "
                f"({len(history)} values) to {written}")
            if args.plot:
                _plot_gathered(args, model, H, history, source, dtype, out)
        return 0
    finally:
        dist.destroy_process_group()


def run_fit(args, out=print, note=None):
    """Carry out ``torchnmf fit`` for parsed ``args``; returns the exit status."""
    import torch

    from . import io
    from ._validation import check_beta_with_zeros

    note = note or (lambda message: print(f"torchnmf: note: {message}", file=sys.stderr))
    if _torchrun_world() > 1:
        return _run_fit_distributed(args, out, note)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    output = Path(args.output) if args.output else Path(args.input).with_suffix(".nmf.npz")
    check_outputs((output,), args.plot, CommandError, input=args.input)
    device = _device(args.device)
    args.stream = args.stream or args.block_rows is not None
    if args.stream:
        V, description, model = _open_streamed(args, dtype, device, note)
        target = io.Target(V=None, description=description)
        out(f"read {description}")
    else:
        target = io.load(args.input, key=args.key, n_fft=args.n_fft, hop=args.hop, dtype=dtype)
        out(f"read {target.description}")
        V = _model_layout(target.V, args.model, note).to(device)
        torch.manual_seed(args.seed)
        model = _build_model(V, args)
        # before initialising, so that data the fit refuses gets the fit's message
        check_beta_with_zeros(V, args.beta)
        _initialise(model, V, args.init, args.seed)
    V_dtype = model.W.dtype
    kind = "NMF" if args.model == "nmf" else f"NMFD (T={model.W.shape[2]})"
    out(f"{kind} rank {args.rank}, beta {args.beta:g}, solver {args.solver}, init {args.init}, "
        f"{str(V_dtype).replace('torch.', '')} on {device}")
    n_iter, V = _fit(model, V, args, note)
    history = model.loss_history
    out(f"fit: {n_iter} iterations, loss {history[0]:.6g} -> {history[-1]:.6g}")

    extra = dict(n_iter=n_iter, rank=args.rank, beta=args.beta, model=args.model,
                 solver=args.solver, init=args.init, seed=args.seed,
                 input=str(Path(args.input).name))
    if target.spectrogram is not None:
        spec = target.spectrogram
        extra.update(sample_rate=spec.sample_rate, n_fft=spec.n_fft, hop=spec.hop)
    written = io.save_factors(output, model.W, model.H, history, **extra)
    out(f"wrote W {tuple(model.W.shape)}, H {tuple(model.H.shape)} and the loss history "
        f"({len(history)} values) to {written}")
    if args.plot:
        out(f"wrote the figure to {_write_plot(args.plot, model, V, args, target.spectrogram is not None)}")
    if target.spectrogram is not None:
        paths = _write_audio(model, target.spectrogram, args, written)
        out(f"wrote {len(paths)} component waveforms (soft masks of the input): "
            f"{', '.join(str(p) for p in paths)}")
    return 0


# -- entry point ---------------------------------------------------------------------
def _one_line(error):
    text = " ".join(str(error).split())
    return text or type(error).__name__


# Whether this process ran a command under torchrun (see exit_process).
_GROUP_USED = False


def exit_process(status):
    """End ``python -m torchnmf`` with ``status``.

    After a command under torchrun the process ends without finalising the
    interpreter (the streams flushed, every file written and closed): gloo's
    worker threads release a collective's work after it completed, which takes
    the GIL (its tensors are Python objects), and one still doing so while the
    interpreter finalised aborted the process ("terminate called without an
    active exception"; 4 of 80 two-process runs of ``fit --block-rows`` here,
    with the output already written).  A barrier before the end did not help:
    its own work holds the works before it.
    """
    if _GROUP_USED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status if isinstance(status, int) else 1)
    sys.exit(status)


def console():
    """The ``torchnmf`` console script: :func:`main`, ended by :func:`exit_process`."""
    exit_process(main())


def main(argv=None):
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "fit":
            return run_fit(args)
        if args.command in ("rank", "consensus"):
            from . import cli_selection

            run = cli_selection.run_rank if args.command == "rank" else cli_selection.run_consensus
            return run(args, error_type=CommandError)
        from .demo import run_demo

        run_demo(out_dir=args.out, seed=args.seed, max_iter=args.max_iter,
                 plot=not args.no_plot)
        return 0
    except KeyboardInterrupt:
        print("torchnmf: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, TypeError, OSError, ImportError, NotImplementedError,
            FloatingPointError, RuntimeError) as error:
        if args.debug:
            raise
        print(f"torchnmf: error: {_one_line(error)}", file=sys.stderr)
        return 1
