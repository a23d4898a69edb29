"""The demo behind ``make demo``: separate the instruments of a synthesised piece.

Everything is generated here, offline: two bars of a drum groove with a bell
(kick, snare, hi-hat, bell), each instrument one sound repeated in time.  The
mixture's magnitude spectrogram (:func:`torch.stft`) is factorised with
:class:`torchnmf.nmf.NMFD`, whose templates are short spectrograms (a sound
that unfolds over several frames) and whose activations say when each sound
starts.  Each component is turned back into audio by soft masking the
mixture's STFT (:meth:`torchnmf.io.Spectrogram.to_audio`), matched to the
planted instrument it resembles most, and scored by its signal-to-distortion
ratio against that instrument's own track.

Written into the output directory: ``mixture.wav``, one
``component<r>-<instrument>.wav`` per component, ``sources/<instrument>.wav``
(the planted tracks, for listening side by side), ``factors.npz`` and
``figure.png`` (when matplotlib is installed).
"""
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import io
from .nmf import NMFD

__all__ = ["INSTRUMENTS", "synthesise_piece", "match_components", "sdr", "run_demo", "DemoResult"]

SAMPLE_RATE = 8000
N_FFT = 512
HOP = 256
BEAT = 0.5  # seconds (120 beats per minute)
BARS = 2
T = 8  # template length in frames (0.26 s)
MAX_ITER = 200

# instrument -> onsets, in beats from the start of each bar
PATTERN = {
    "kick": (0.0, 1.5, 2.0),
    "snare": (1.0, 3.0),
    "hi-hat": (0.5, 1.5, 2.5, 3.5),
    "bell": (0.75, 2.25, 3.25),
}
INSTRUMENTS = tuple(PATTERN)


def _kick(t, generator):
    # a sine gliding from 150 Hz to 50 Hz, fast decay
    phase = 2 * math.pi * (50 * t + 100 * 0.04 * (1 - torch.exp(-t / 0.04)))
    return torch.sin(phase) * torch.exp(-t / 0.12)


def _snare(t, generator):
    noise = torch.randn(t.numel() + 1, dtype=t.dtype, generator=generator)
    rattle = 0.5 * (noise[1:] + noise[:-1])  # a first sum: low-pass, away from the hi-hat
    body = 0.5 * torch.sin(2 * math.pi * 190 * t)
    return (0.8 * rattle + body) * torch.exp(-t / 0.07)


def _hihat(t, generator):
    noise = torch.randn(t.numel() + 2, dtype=t.dtype, generator=generator)
    bright = noise[2:] - 2 * noise[1:-1] + noise[:-2]  # a second difference: high-pass
    return 0.25 * bright * torch.exp(-t / 0.03)


def _bell(t, generator):
    tone = sum(weight * torch.sin(2 * math.pi * 880 * ratio * t)
               for ratio, weight in ((1.0, 1.0), (2.0, 0.5), (3.0, 0.3), (4.2, 0.2)))
    return 0.5 * tone * torch.exp(-t / 0.25)


_SOUNDS = {"kick": _kick, "snare": _snare, "hi-hat": _hihat, "bell": _bell}
_SOUND_LENGTH = 0.6  # seconds rendered per hit


def synthesise_piece(seed=0, sample_rate=SAMPLE_RATE, bars=BARS, dtype=torch.float64):
    """The planted tracks and their mixture.

    Returns:
        (sources, mixture): ``sources`` maps each instrument to its own
        waveform; ``mixture`` is their sum, with a peak of 0.9.
    """
    generator = torch.Generator().manual_seed(seed)
    length = int(round((bars * 4 * BEAT + _SOUND_LENGTH) * sample_rate))
    hit_length = int(_SOUND_LENGTH * sample_rate)
    t = torch.arange(hit_length, dtype=dtype) / sample_rate
    sources = {}
    for name, onsets in PATTERN.items():
        track = torch.zeros(length, dtype=dtype)
        for bar in range(bars):
            for beat in onsets:
                start = int(round((bar * 4 + beat) * BEAT * sample_rate))
                track[start:start + hit_length] += _SOUNDS[name](t, generator)
        sources[name] = track
    mixture = sum(sources.values())
    gain = 0.9 / float(mixture.abs().max())
    sources = {name: gain * track for name, track in sources.items()}
    return sources, gain * mixture


def sdr(estimate, reference):
    """Signal-to-distortion ratio in dB: ``10 log10(|s|^2 / |s - estimate|^2)``."""
    error = float(((reference - estimate) ** 2).sum())
    power = float((reference ** 2).sum())
    return 10 * math.log10(power / max(error, 1e-300))


def match_components(parts, references):
    """The assignment of components to references with the highest total similarity.

    Args:
        parts (Tensor): ``(R, ...)`` non-negative component spectrograms.
        references (Tensor): ``(S, ...)`` the planted sources' spectrograms, ``S <= R``.

    Returns:
        (assignment, similarity): ``assignment[s]`` is the component matched to
        reference ``s``; ``similarity`` the ``(S, R)`` cosine similarities.
    """
    a = parts.flatten(1)
    b = references.flatten(1)
    similarity = (b @ a.T) / (b.norm(dim=1, keepdim=True) * a.norm(dim=1)).clamp_min(1e-300)
    S, R = similarity.shape
    best = max(itertools.permutations(range(R), S),
               key=lambda p: sum(float(similarity[s, r]) for s, r in enumerate(p)))
    return list(best), similarity


@dataclass
class DemoResult:
    """What the demo computed and wrote."""

    model: NMFD
    sdr: dict  # instrument -> dB of its matched component
    baseline_sdr: dict  # instrument -> dB of the mixture itself as the estimate
    assignment: dict  # instrument -> component index
    paths: list = field(default_factory=list)
    seconds: float = 0.0


def run_demo(out_dir="torchnmf-demo", seed=0, max_iter=None, plot=True, out=print):
    """Synthesise the piece, separate it with NMFD, write and report the results.

    Args:
        out_dir (str or Path): the directory to write into (created).
        seed (int): seeds the synthesis and the initialisation.
        max_iter (int, optional): NMFD iterations; default 300.
        plot (bool): write ``figure.png`` (skipped with a note without matplotlib).
        out (callable): where report lines go.

    Returns:
        DemoResult
    """
    started = time.perf_counter()
    max_iter = MAX_ITER if max_iter is None else max_iter
    out_dir = Path(out_dir)
    (out_dir / "sources").mkdir(parents=True, exist_ok=True)
    sources, mixture = synthesise_piece(seed=seed)
    spec = io.stft_magnitude(mixture, SAMPLE_RATE, n_fft=N_FFT, hop=HOP)
    V = spec.magnitude.T.unsqueeze(0)  # (1, bins, frames): NMFD shifts along time
    out(f"Synthesised {mixture.numel() / SAMPLE_RATE:.1f} s at {SAMPLE_RATE} Hz: {BARS} bars "
        f"of {', '.join(INSTRUMENTS)} ({sum(len(o) for o in PATTERN.values()) * BARS} hits).")
    out(f"Magnitude spectrogram: {V.shape[1]} frequency bins x {V.shape[2]} frames "
        f"(n_fft {N_FFT}, hop {HOP}).")

    rank = len(INSTRUMENTS)
    generator = torch.Generator().manual_seed(seed)
    model = NMFD(V.shape, rank=rank, T=T).double()
    with torch.no_grad():
        model.W.copy_(torch.rand(model.W.shape, generator=generator, dtype=V.dtype))
        model.H.copy_(torch.rand(model.H.shape, generator=generator, dtype=V.dtype))
        scale = (float(V.mean()) / float(model().mean())) ** 0.5
        model.W.mul_(scale)
        model.H.mul_(scale)
    n_iter = model.fit(V, beta=1, tol=0, max_iter=max_iter)
    history = model.loss_history
    out(f"NMFD (rank {rank}, templates of {T} frames = {T * HOP / SAMPLE_RATE:.2f} s, "
        f"KL divergence): {n_iter} iterations, loss {history[0]:.4g} -> {history[-1]:.4g}.")

    with torch.no_grad():
        parts = torch.stack([
            model.reconstruct(model.H[:, r:r + 1], model.W[:, r:r + 1])[0].T for r in range(rank)
        ])
    waves = spec.to_audio(parts)
    references = torch.stack([
        io.stft_magnitude(sources[name], SAMPLE_RATE, n_fft=N_FFT, hop=HOP).magnitude
        for name in INSTRUMENTS
    ])
    assignment, similarity = match_components(parts, references)
    result = DemoResult(model=model, sdr={}, baseline_sdr={},
                        assignment=dict(zip(INSTRUMENTS, assignment)))
    names = {r: f"unmatched{r}" for r in range(rank)}
    names.update({r: name for name, r in result.assignment.items()})

    result.paths.append(io.write_wav(out_dir / "mixture.wav", mixture, SAMPLE_RATE))
    for name in INSTRUMENTS:
        result.paths.append(io.write_wav(out_dir / "sources" / f"{name}.wav", sources[name], SAMPLE_RATE))
    for r in range(rank):
        result.paths.append(io.write_wav(out_dir / f"component{r}-{names[r]}.wav", waves[r], SAMPLE_RATE))
    result.paths.append(io.save_factors(out_dir / "factors.npz", model.W, model.H, history,
                                        sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop=HOP))

    out("Instrument  component  spectral similarity  SDR of component  SDR of mixture")
    for s, name in enumerate(INSTRUMENTS):
        r = result.assignment[name]
        result.sdr[name] = sdr(waves[r], sources[name])
        result.baseline_sdr[name] = sdr(mixture, sources[name])
        out(f"{name:>10s}  {r:9d}  {float(similarity[s, r]):19.2f}  {result.sdr[name]:13.1f} dB"
            f"  {result.baseline_sdr[name]:11.1f} dB")
    gain = sum(result.sdr[n] - result.baseline_sdr[n] for n in INSTRUMENTS) / rank
    out(f"Mean SDR improvement over the unseparated mixture: {gain:+.1f} dB.")

    if plot:
        try:
            from .plot import summary_figure
        except ImportError as error:
            out(f"Figure skipped: {error}")
        else:
            figure = summary_figure(
                model.W, model.H, V, model(), history, log=True,
                labels=[f"{r} {names[r]}" for r in range(rank)],
                title="NMFD of a synthesised drum groove with a bell",
            )
            figure.savefig(out_dir / "figure.png", dpi=90)
            result.paths.append(out_dir / "figure.png")

    result.seconds = time.perf_counter() - started
    out(f"Wrote {len(result.paths)} files into {out_dir}/ in {result.seconds:.1f} s:")
    for path in result.paths:
        out(f"  {path}")
    return result
