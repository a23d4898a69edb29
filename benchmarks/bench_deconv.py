"""Convolutional models, PLCA's shift-invariant kin and a BetaMu chain against the original torchnmf.

The original torchnmf 0.3.5 is the library this one replaces; it is loaded
under another name (see ``_original``), never shadowing ours.  Each row times
``fit`` (or one ``BetaMu`` step) per iteration for both libraries from the
same starting factors, and reports the loss each reaches after the same
number of iterations from that start (our ``beta_div`` on both
reconstructions; the KL divergence of the normalised target for SI-PLCA).
The original checks its stopping rule every 10 iterations; its fits here run
with a tolerance of minus infinity so that both run every iteration asked for,
and the timing runs use 10 and 30 iterations so that its checks count in
proportion.
"""
import sys
import time
import warnings

import torch
import torch.nn as nn

import _original
from _common import markdown_table

from torchnmf.metrics import beta_div
from torchnmf.nmf import NMF, NMF2D, NMF3D, NMFD
try:  # the floor needs the closed-form kernels (absent from older checkouts)
    from torchnmf.targets import convolution
    from torchnmf.targets.convolution import ConvStats, correlate_h, correlate_w, windows
except ImportError:
    ConvStats = None
try:  # the explicit residual's FFTs (absent from older checkouts)
    from torchnmf.targets import spectral
except ImportError:
    spectral = None
from torchnmf.plca import SIPLCA
from torchnmf.trainer import BetaMu

TITLE = "Convolutional models against the original torchnmf 0.3.5 (issue 16)"
NO_STOP = float("-inf")
ROUNDS = 7


def conv_problem(shape, rank, kernel, seed=0, noise=0.1):
    """A planted convolutional target ``V`` (shape ``shape``) and a random start (W0, H0)."""
    g = torch.Generator().manual_seed(seed)
    N, C, *spatial = shape
    inner = [s - k + 1 for s, k in zip(spatial, kernel)]
    W = torch.rand(C, rank, *kernel, generator=g)
    H = torch.rand(N, rank, *inner, generator=g).pow_(4)  # sparse-ish activations
    model = {1: NMFD, 2: NMF2D, 3: NMF3D}[len(kernel)]
    with torch.no_grad():
        V = model.reconstruct(H, W)
        V.add_(torch.rand(V.shape, generator=g), alpha=noise * float(V.mean()))
        W0 = torch.rand(W.shape, generator=g)
        H0 = torch.rand(H.shape, generator=g)
        scale = float(V.mean() / model.reconstruct(H0, W0).mean())
    return V, W0 * scale ** 0.5, H0 * scale ** 0.5


def _classes(original, ndim):
    ours = {1: NMFD, 2: NMF2D, 3: NMF3D}[ndim]
    theirs = getattr(original.nmf, ours.__name__) if original else None
    return ours, theirs


def _fit_runner(cls, V, W0, H0, beta, **options):
    def run(n_iter):
        model = cls(W=W0.clone(), H=H0.clone())
        model.fit(V, beta=beta, max_iter=n_iter, **options)
        return model
    return run


def _plca_runner(cls, V, W0, H0, **options):
    def run(n_iter):
        rank = W0.shape[1]
        model = cls(W=W0.clone(), H=H0.clone(), Z=torch.full((rank,), 1.0 / rank))
        model.fit(V, max_iter=n_iter, **options)
        return model
    return run


def _conv_floor(V, W0, H0, shared=False, beta=1):
    """The kernel calls one MU iteration cannot avoid: a reconstruction and one
    correlation per factor (what ConvStats calls, without the element-wise work);
    ``shared``: one reconstruction for both factors (EM)."""
    if ConvStats is None:
        return None
    stats = ConvStats(V, beta)  # the fit's statistics kind: the route it takes
    route = stats._route(H0, W0)
    kernel = tuple(W0.shape[2:])

    # the kernels of each correlation on the route (the hybrid mixes them)
    h_route, w_route = convolution._H_ROUTE[route], convolution._W_ROUTE[route]
    windowed = route in ("windows", "hybrid")

    def one():
        H_windows = windows(H0, kernel) if windowed else None
        prediction = stats._forward(H0, W0, route, H_windows)
        correlate_h(prediction, W0, h_route, **({"H": H0} if h_route == "adjoint" else {}))
        if not shared:  # MU: the W update sees the new H, so a second reconstruction
            H_windows = windows(H0, kernel) if windowed else None
            prediction = stats._forward(H0, W0, route, H_windows)
        correlate_w(prediction, H0, H_windows, kernel, w_route)

    def run(n_iter):
        for _ in range(n_iter):
            one()
    run.route = route  # the route ConvStats chose for this shape in this process
    return run


def _chain_floor(V, module, start):
    """The generic route's unavoidable work per step: for each parameter, one
    evaluation of the chain and two vector-Jacobian products."""
    model = module()
    with torch.no_grad():
        for p, q in zip(model.parameters(), start):
            p.copy_(q)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(n_iter):
        for _ in range(n_iter):
            for p in params:
                prediction = model(None)
                torch.autograd.grad(prediction, [p], V, retain_graph=True)
                torch.autograd.grad(prediction, [p], V)
    return run


def _chain(n, c, ranks, make):
    torch.manual_seed(0)
    return nn.Sequential(
        make((n, ranks[1]), rank=ranks[0]), make(W=(ranks[2], ranks[1])), make(W=(c, ranks[2]))
    )


def _chain_runner(V, module, trainer_cls, beta, start):
    def run(n_iter):
        model = module()
        with torch.no_grad():
            for p, q in zip(model.parameters(), start):
                p.copy_(q)
        trainer = trainer_cls(model.parameters(), beta=beta)

        def closure():
            trainer.zero_grad()
            return V, model(None)

        for _ in range(n_iter):
            trainer.step(closure)
        return model
    return run


def _siplca_loss(model, V):
    with torch.no_grad():
        return float(beta_div(model(), V / V.sum(), 1))


def _rows(quick):
    """(label, ours runner, original runner or None, loss function) for every row."""
    original = _original.load()
    rows = []
    nmfd = [((1, 513, 2000), 8, 8, 1), ((1, 257, 1000), 8, 16, 1), ((1, 257, 1000), 8, 16, 2)]
    if quick:
        nmfd = [((1, 129, 300), 4, 8, 1), ((1, 129, 300), 4, 8, 2)]
    for shape, rank, T, beta in nmfd:
        V, W0, H0 = conv_problem(shape, rank, (T,))
        ours, theirs = _classes(original, 1)
        label = f"NMFD {shape[1]}x{shape[2]}, rank {rank}, T={T}, beta={beta}"
        loss = (lambda V, beta: lambda m: float(beta_div(m().detach(), V, beta)))(V, beta)
        rows.append((label, _fit_runner(ours, V, W0, H0, beta, tol=0),
                     theirs and _fit_runner(theirs, V, W0, H0, beta, tol=NO_STOP), loss,
                     _conv_floor(V, W0, H0, beta=beta)))
    grids = [((1, 4, 64, 64), 6, (k, k)) for k in (2, 3, 5, 8, 12, 16)]
    grids.append(((1, 16, 64, 64), 10, (10, 10)))  # many channels, a long kernel
    grids += [((1, 2, 16, 16, 16), 4, (k, k, k)) for k in (2, 3, 5)]
    if quick:
        grids = [((1, 4, 32, 32), 3, (4, 4)), ((1, 2, 12, 12, 12), 2, (3, 3, 3))]
    for shape, rank, kernel in grids:
        V, W0, H0 = conv_problem(shape, rank, kernel)
        ours, theirs = _classes(original, len(kernel))
        label = (f"{ours.__name__} {'x'.join(map(str, shape[1:]))}, rank {rank}, "
                 f"kernel {'x'.join(map(str, kernel))}, beta=1")
        loss = (lambda V: lambda m: float(beta_div(m().detach(), V, 1)))(V)
        rows.append((label, _fit_runner(ours, V, W0, H0, 1, tol=0),
                     theirs and _fit_runner(theirs, V, W0, H0, 1, tol=NO_STOP), loss,
                     _conv_floor(V, W0, H0)))
    shape, rank, T = ((1, 129, 300), 4, 8) if quick else ((1, 257, 1000), 8, 16)
    V, W0, H0 = conv_problem(shape, rank, (T,))
    W0 = W0 / W0.sum((0, 2), keepdim=True)
    H0 = H0 / H0.sum((0, 2), keepdim=True)
    rows.append((f"SIPLCA {shape[1]}x{shape[2]}, rank {rank}, T={T} (EM)",
                 _plca_runner(SIPLCA, V, W0, H0, tol=0),
                 original and _plca_runner(original.plca.SIPLCA, V, W0, H0, tol=NO_STOP),
                 (lambda V: lambda m: _siplca_loss(m, V))(V), _conv_floor(V, W0, H0, shared=True)))
    n, c = (512, 64) if quick else (2048, 1024)
    ranks = (4, 10, 24)
    g = torch.Generator().manual_seed(0)
    V = torch.rand(n, ranks[-1], generator=g) @ torch.rand(ranks[-1], c, generator=g)
    start = [p.detach().clone() for p in _chain(n, c, ranks, NMF).parameters()]
    with torch.no_grad():
        scale = float(V.mean() / _chain(n, c, ranks, NMF)(None).mean()) ** (1 / 4)
    start = [p * scale for p in start]
    loss = (lambda V: lambda m: float(beta_div(m(None).detach(), V, 1)))(V)
    rows.append((f"deep-NMF chain {n}x{c}, ranks {ranks}, one BetaMu step, beta=1",
                 _chain_runner(V, lambda: _chain(n, c, ranks, NMF), BetaMu, 1, start),
                 original and _chain_runner(
                     V, lambda: _chain(n, c, ranks, original.nmf.NMF), original.trainer.BetaMu, 1,
                     start),
                 loss, _chain_floor(V, lambda: _chain(n, c, ranks, NMF), start)))
    return rows, original is not None


def _interleaved_ms(runners, rounds, short=10, long=30):
    """ms per iteration of each runner: (min T(long) - min T(short)) / (long - short).

    The runners take turns, ``rounds`` times; on a shared machine the minimum
    over the rounds is the run least disturbed by other processes, and the
    turns let a load change hit every runner alike.  With one thread the
    times are the process's CPU time (:func:`_clock`), which the other
    processes of a shared machine do not inflate as they do wall time.
    """
    clock = _clock()
    times = {name: {short: [], long: []} for name in runners}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run in runners.values():
            run(short)  # warm-up
        for _ in range(rounds):
            for name, run in runners.items():
                for n_iter in (short, long):
                    start = clock()
                    run(n_iter)
                    times[name][n_iter].append(clock() - start)
    ms = {
        name: max((min(t[long]) - min(t[short])) / (long - short) * 1e3, 1e-6)
        for name, t in times.items()
    }
    # the same difference round by round: runners that took turns saw the same load
    rounds_ms = {
        name: [max((b - a) / (long - short) * 1e3, 1e-6) for a, b in zip(t[short], t[long])]
        for name, t in times.items()
    }
    return ms, rounds_ms


def _clock():
    """CPU time of the process with one thread (what a shared machine's other jobs
    barely disturb); wall time with several, where CPU time would add the threads up."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def _spread(ratios):
    """The median of per-round ratios and their range, as the tables print them."""
    return f"{_median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def _median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


LONG_ITERATIONS = 200  # fit's default max_iter
LONG_ROUNDS = 3


def _photograph():
    """scikit-learn's china.jpg, its 3 colour channels pooled to 26x40 (None without
    scikit-learn or Pillow)."""
    try:
        from sklearn import datasets
        image = torch.tensor(datasets.load_sample_image("china.jpg"), dtype=torch.float32)
    except Exception:  # an optional dependency missing
        return None
    return torch.nn.functional.avg_pool2d(image.permute(2, 0, 1)[None], 16) / 255 + 0.01


def _counted(counts):
    """Count, while fitting, the explicit residuals (blocks of them, in the terms' pass
    or on their own, the final objective's included) and how many took the FFTs."""
    # the per-block step where there is one (it serves the terms' pass too)
    name = "_explicit_block" if hasattr(ConvStats, "_explicit_block") else "explicit_divergence"
    explicit = getattr(ConvStats, name)
    fft = spectral and spectral.fft_reconstruction

    def counted_explicit(self, *args):
        counts["explicit"] += 1
        return explicit(self, *args)

    def counted_fft(*args):
        counts["fft"] += 1
        return fft(*args)

    def restore():
        setattr(ConvStats, name, explicit)
        if spectral is not None:
            spectral.fft_reconstruction = fft

    setattr(ConvStats, name, counted_explicit)
    if spectral is not None:
        spectral.fft_reconstruction = counted_fft
    return restore


def _long_rows(quick):
    """(label, V, W0, H0, class) of the long fits: bench rows whose fits reach the
    explicit residual, and a real photograph."""
    rows = []
    problems = [((1, 257, 1000), 8, (16,)), ((1, 4, 64, 64), 6, (2, 2)), ((1, 4, 64, 64), 6, (8, 8)),
                ((1, 16, 64, 64), 10, (10, 10)), ((1, 2, 16, 16, 16), 4, (2, 2, 2))]
    if quick:
        problems = [((1, 4, 32, 32), 3, (8, 8))]
    for shape, rank, kernel in problems:
        V, W0, H0 = conv_problem(shape, rank, kernel)
        cls = {1: NMFD, 2: NMF2D, 3: NMF3D}[len(kernel)]
        rows.append((f"{cls.__name__} {'x'.join(map(str, shape[1:]))}, rank {rank}, kernel "
                     f"{'x'.join(map(str, kernel))}", V, W0, H0, cls))
    V = None if quick else _photograph()
    if V is not None:
        g = torch.Generator().manual_seed(0)
        rank, kernel = 12, (8, 8)
        W0 = torch.rand(V.shape[1], rank, *kernel, generator=g)
        H0 = torch.rand(1, rank, V.shape[2] - 7, V.shape[3] - 7, generator=g)
        scale = float(V.mean() / NMF2D.reconstruct(H0, W0).mean()) ** 0.5
        rows.append(("NMF2D china.jpg 3x26x40, rank 12, kernel 8x8", V, W0 * scale, H0 * scale, NMF2D))
    return rows


def run_long(quick=False):
    """Whole fits of the default 200 iterations (beta=1), ours against the original."""
    original = _original.load()
    if original is None or ConvStats is None:
        return "The original torchnmf 0.3.5 is not installed: no long fits to compare."
    n_iter = 20 if quick else LONG_ITERATIONS
    clock = _clock()
    table = []
    for label, V, W0, H0, cls in _long_rows(quick):
        ours = _fit_runner(cls, V, W0, H0, 1, tol=0)
        theirs = _fit_runner(getattr(original.nmf, cls.__name__), V, W0, H0, 1, tol=NO_STOP)
        times = {"ours": [], "theirs": []}
        counts = {"explicit": 0, "fft": 0}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours(3), theirs(3)  # warm-up
            for _ in range(1 if quick else LONG_ROUNDS):
                counts.update(explicit=0, fft=0)
                restore = _counted(counts)
                try:
                    start = clock()
                    ours(n_iter)
                    times["ours"].append(clock() - start)
                finally:
                    restore()
                start = clock()
                theirs(n_iter)
                times["theirs"].append(clock() - start)
        ours_ms, theirs_ms = (min(times[k]) / n_iter * 1e3 for k in ("ours", "theirs"))
        per_round = [a / b for a, b in zip(times["ours"], times["theirs"])]
        table.append([label, theirs_ms, ours_ms, ours_ms / theirs_ms, _spread(per_round),
                      f"{counts['explicit']} ({counts['fft']} by FFTs)"])
        print(f"  long {label}: done", file=sys.stderr, flush=True)
    header = (
        f"Long fits: {n_iter} iterations{' (the default max_iter)' if n_iter == 200 else ''}, "
        f"beta=1, tol 0, float32, "
        f"{torch.get_num_threads()} threads; ms per iteration of the whole fit, fastest of "
        f"{1 if quick else LONG_ROUNDS} rounds in turn. Past the first tens of iterations "
        f"a fit near its target reports the explicit residual (the float64 reconstruction "
        f"of torchnmf.targets.residual), which the 10-to-30-iteration table above hardly "
        f"reaches; \"explicit\" counts the iterations that took it, and how many of them "
        f"took the FFTs (torchnmf.targets.spectral)."
    )
    return header + "\n\n" + markdown_table(
        ["problem", "original ms", "ours ms", "ours / original", "per round", "explicit"], table)


def run(quick=False):
    return _run_short(quick) + "\n\n" + run_long(quick)


def _run_short(quick=False):
    rows, have_original = _rows(quick)
    iterations = 10 if quick else 30
    table = []
    for label, ours, theirs, loss, floor in rows:
        runners = {"ours": ours, "floor": floor, "theirs": theirs}
        ms, rounds_ms = _interleaved_ms({k: v for k, v in runners.items() if v},
                                        1 if quick else ROUNDS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours_ms = ms["ours"]
            floor_ms = ms.get("floor", float("nan"))
            ours_loss = loss(ours(iterations))
            if theirs:
                theirs_ms = ms["theirs"]
                theirs_loss = loss(theirs(iterations))
                spread = _spread([a / b for a, b in zip(rounds_ms["ours"], rounds_ms["theirs"])])
                table.append([label, getattr(floor, "route", ""), theirs_ms, ours_ms,
                              ours_ms / theirs_ms, spread, floor_ms,
                              floor_ms / theirs_ms, theirs_loss, ours_loss,
                              ours_loss / theirs_loss])
            else:
                table.append([label, getattr(floor, "route", ""), "", ours_ms, "", "", floor_ms, "", "",
                              ours_loss, ""])
        print(f"  {label}: done", file=sys.stderr, flush=True)
    header = (
        f"float32, {torch.get_num_threads()} threads; ms per iteration (per step for BetaMu; "
        f"{'CPU time of the process' if torch.get_num_threads() == 1 else 'wall time'}) "
        f"from the difference of the fastest 30- and 10-iteration runs of "
        f"{1 if quick else ROUNDS} rounds in turn; loss after {iterations} iterations from the "
        f"same start (SI-PLCA: KL of V / sum V); \"per round\" is the median (and range) "
        f"of ours / original within each round. The floor is the work an iteration cannot avoid "
        f"on its route: a reconstruction and one correlation per factor for the "
        f"convolutional models (one reconstruction for both in SI-PLCA's EM), one evaluation and two vector-Jacobian products per "
        f"parameter for the BetaMu chain. \"route\" is the kernels ConvStats chose for the shape "
        f"in this process (timed once, see torchnmf.targets.convolution.PROBE_ROUTES)."
    )
    if not have_original:
        header += (" The original torchnmf 0.3.5 is not installed (`make bench` puts it in "
                   ".venv/peers); its columns are empty.")
    return header + "\n\n" + markdown_table(
        ["problem", "route", "original ms", "ours ms", "ours / original", "per round", "floor ms",
         "floor / original",
         "original loss", "ours loss", "loss ratio"],
        table,
    )
