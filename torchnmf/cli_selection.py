"""The ``torchnmf rank`` and ``torchnmf consensus`` commands (see :mod:`torchnmf.cli`).

``torchnmf rank INPUT --ranks 2:12 --restarts 20`` prints, per rank, the best
restart's loss, the cross-validated held-out error, cNMF's stability and
prediction error, Brunet's cophenetic correlation and Kim & Park's
dispersion, then the suggested rank with its rule; ``--plot PNG`` writes the
k-selection figure.  ``torchnmf consensus INPUT --rank 7 --restarts 50``
writes the consensus ``W`` and refitted ``H`` (with the stability and the
prediction error) to an ``.npz`` archive.
"""
import importlib.util
from pathlib import Path

__all__ = ["add_commands", "check_outputs", "figure_file", "parse_ranks", "run_rank",
           "run_consensus"]


def check_outputs(paths, plot, error_type, input=None):
    """Refuse, before any work, output ``paths`` (``.npz`` archives) and the figure
    ``plot`` whose directory does not exist, that would overwrite ``input`` (the data
    would be lost), a figure path that is a directory or whose suffix matplotlib cannot
    write, and a figure without matplotlib installed."""
    # save_factors appends .npz to an archive's name, matplotlib its format to a figure's
    written = [Path(p) if Path(p).suffix.lower() == ".npz" else Path(f"{p}.npz") for p in paths]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    figure = figure_file(plot) if plot and has_matplotlib else plot
    source = None if input is None else Path(input).resolve()
    for path, shown in (*zip(written, paths), (figure, plot)):
        if path is None:
            continue
        if not Path(path).resolve().parent.is_dir():
            raise error_type(f"cannot write {shown}: the directory {Path(path).parent} "
                             f"does not exist")
        if Path(path).resolve() == source:
            raise error_type(f"cannot write {shown}: it is INPUT, whose data would be "
                             f"overwritten; choose another file")
    if not plot:
        return
    if not has_matplotlib:
        raise error_type("--plot needs matplotlib; pip install 'torchnmf[plot]'")
    if Path(plot).is_dir():
        raise error_type(f"cannot write the figure to {plot}: it is a directory; give a file "
                         f"name such as {Path(plot) / 'figure.png'}")
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(plot).suffix.lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise error_type(f"cannot write the figure to {plot}: matplotlib writes "
                         f"{', '.join('.' + f for f in sorted(formats))}, not .{suffix}")


def figure_file(plot):
    """The file matplotlib writes for the figure path ``plot``: with its default format's
    suffix where ``plot`` has none (``--plot fig`` wrote ``fig.png`` and reported ``fig``)."""
    import matplotlib

    path = Path(plot)
    if path.suffix or not path.name or path.is_dir():
        return path
    return path.with_name(f"{path.name}.{matplotlib.rcParams['savefig.format']}")


def parse_ranks(text):
    """``"2:12"`` (inclusive), ``"2:12:2"`` or ``"3,5,8"`` as a list of positive ints."""
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError(text)
            start, stop = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else 1
            ranks = list(range(start, stop + 1, step)) if step > 0 else []
        else:
            ranks = [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(text) from None
    if not ranks or min(ranks) < 1 or len(set(ranks)) != len(ranks):
        raise ValueError(text)
    return ranks


parse_ranks.__name__ = "rank list (START:STOP[:STEP] or R1,R2,...)"


def _common(parser, positive_int, non_negative_float, finite_float, solvers):
    parser.add_argument("input", metavar="INPUT", help="the data file (as for torchnmf fit)")
    parser.add_argument("--restarts", type=positive_int, default=20,
                        help="restarts per rank, fitted as one batch (default %(default)s)")
    parser.add_argument("--beta", type=finite_float, default=2.0,
                        help="the beta-divergence (default %(default)s, as cNMF)")
    parser.add_argument("--solver", choices=solvers, default="mu",
                        help="the update rule (default %(default)s)")
    parser.add_argument("--max-iter", type=positive_int, default=400,
                        help="the most iterations per restart (default %(default)s)")
    parser.add_argument("--tol", type=non_negative_float, default=1e-4,
                        help="each restart's stopping tolerance (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                        help="floating type (default: that of the data; float32 for integers)")
    parser.add_argument("--key", default=None,
                        help="for a .npz holding several arrays, the one to factorise")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_commands(commands, positive_int, non_negative_float, finite_float, solvers):
    """Add the ``rank`` and ``consensus`` subcommands to ``commands``."""
    rank = commands.add_parser(
        "rank", help="choose the rank: held-out error and stability per rank",
        description="Fit RESTARTS factorisations of INPUT at every rank (batched), then print "
        "per rank the best loss, the cross-validated held-out error, the consensus stability "
        "and prediction error, the cophenetic correlation and the dispersion, and suggest a rank.",
    )
    _common(rank, positive_int, non_negative_float, finite_float, solvers)
    rank.add_argument("--ranks", type=parse_ranks, required=True,
                      help="the ranks: START:STOP (inclusive), START:STOP:STEP or R1,R2,...")
    rank.add_argument("--folds", type=positive_int, default=3,
                      help="cross-validation folds of held-out entries (default %(default)s)")
    rank.add_argument("--cv", choices=("entries", "bi"), default="entries",
                      help="held-out entries (Wold) or bi-cross-validation (Owen & Perry)")
    rank.add_argument("--cv-restarts", type=positive_int, default=None,
                      help="restarts per rank and fold (default min(RESTARTS, 4))")
    rank.add_argument("--plot", default=None, metavar="PNG",
                      help="write the error and stability against the rank (needs matplotlib)")
    consensus = commands.add_parser(
        "consensus", help="consensus NMF (cNMF) at one rank",
        description="Fit RESTARTS factorisations of INPUT at RANK (batched), combine their "
        "components as cNMF does (normalise, drop outliers, k-means, medians) and refit the "
        "usage; write W, H, the stability and the prediction error.",
    )
    _common(consensus, positive_int, non_negative_float, finite_float, solvers)
    consensus.add_argument("-r", "--rank", type=positive_int, required=True,
                           help="the number of programs")
    consensus.add_argument("--density-threshold", type=non_negative_float, default=0.5,
                           help="drop spectra with a larger local density (default %(default)s)")
    consensus.add_argument("--neighbours", type=float, default=0.3,
                           help="the density's neighbours, as a share of the restarts "
                           "(default %(default)s)")
    consensus.add_argument("-o", "--output", default=None,
                           help="the .npz to write (default: INPUT with suffix .consensus.npz)")


def _load(args, error_type):
    import torch

    from . import io

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    target = io.load(args.input, key=args.key, dtype=dtype)
    if target.V.dim() != 2:
        raise error_type(f"{args.input} must hold a matrix, got shape {tuple(target.V.shape)}")
    return target, target.V.to(args.device)


def run_rank(args, out=print, error_type=ValueError):
    """Carry out ``torchnmf rank``; returns the exit status."""
    from .selection import rank_table

    check_outputs((), args.plot, error_type, input=args.input)
    target, V = _load(args, error_type)
    out(f"read {target.description}")
    out(f"ranks {args.ranks[0]}..{args.ranks[-1]}, {args.restarts} restarts each, beta "
        f"{args.beta:g}, solver {args.solver}, {args.folds}-fold held-out {args.cv}")
    table = rank_table(
        V, args.ranks, args.restarts, args.beta, args.tol, args.max_iter, solver=args.solver,
        seed=args.seed, n_folds=args.folds, cv_restarts=args.cv_restarts, method=args.cv,
        verbose=not args.quiet,
    )
    out(table.format())
    out(f"suggested rank: {table.suggested} ({table.rule})")
    if args.plot:
        from .plot import rank_selection_figure

        path = figure_file(args.plot)
        rank_selection_figure(table).savefig(path)
        out(f"wrote the figure to {path}")
    return 0


def run_consensus(args, out=print, error_type=ValueError):
    """Carry out ``torchnmf consensus``; returns the exit status."""
    from . import io
    from .consensus import consensus_nmf

    output = Path(args.output) if args.output else Path(args.input).with_suffix(".consensus.npz")
    check_outputs((output,), None, error_type, input=args.input)
    target, V = _load(args, error_type)
    out(f"read {target.description}")
    result, restarts = consensus_nmf(
        V, args.rank, args.restarts, args.beta, args.tol, args.max_iter, solver=args.solver,
        seed=args.seed, density_threshold=args.density_threshold,
        local_neighborhood_size=args.neighbours, verbose=not args.quiet,
    )
    kept = int(result.kept.sum())
    out(f"{len(restarts)} restarts at rank {args.rank}: best loss "
        f"{float(restarts.losses.min()):.6g}; kept {kept} of {len(result.kept)} spectra")
    out(f"stability (silhouette) {result.stability:.4f}, prediction error "
        f"{result.prediction_error:.6g}")
    written = io.save_factors(
        output, result.W, result.H, [result.prediction_error], rank=args.rank,
        restarts=args.restarts, beta=args.beta, stability=result.stability,
        prediction_error=result.prediction_error, kept=kept, input=str(Path(args.input).name),
    )
    out(f"wrote the consensus W {tuple(result.W.shape)} and H {tuple(result.H.shape)} to {written}")
    return 0

