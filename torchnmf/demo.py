"""The demo behind ``make demo``: find the notes of a synthesised tune.

Everything is generated here: a short tune of a few harmonic notes is
synthesised, its magnitude spectrogram taken with :func:`torch.stft`, and
:class:`torchnmf.nmf.NMF` factorises it into spectral templates (``W``) and
activations (``H``).  Each template's dominant frequency is compared with the
planted notes.
"""
import math
import time

import torch

from .nmf import NMF

__all__ = ["synthesise_tune", "spectrogram", "run_demo", "NOTES"]

SAMPLE_RATE = 8000
N_FFT = 1024
HOP = 256
# name -> fundamental frequency in Hz (equal temperament, A4 = 440 Hz)
NOTES = {"C5": 523.25, "E5": 659.26, "G5": 783.99, "A4": 440.00}
# the tune: (note, start in seconds, duration in seconds)
TUNE = [
    ("C5", 0.0, 0.5), ("E5", 0.5, 0.5), ("G5", 1.0, 0.5), ("A4", 1.5, 0.5),
    ("C5", 2.0, 0.25), ("G5", 2.25, 0.25), ("E5", 2.5, 0.5), ("A4", 3.0, 0.5),
    ("C5", 3.5, 1.0), ("G5", 3.5, 1.0),
]


def synthesise_tune(sample_rate=SAMPLE_RATE, seed=0, dtype=torch.float64):
    """The tune as a waveform: each note three harmonics with a decaying envelope."""
    generator = torch.Generator().manual_seed(seed)
    length = max(start + duration for _, start, duration in TUNE)
    n = int(math.ceil(length * sample_rate))
    t = torch.arange(n, dtype=dtype) / sample_rate
    signal = torch.zeros(n, dtype=dtype)
    for note, start, duration in TUNE:
        f0 = NOTES[note]
        on = (t >= start) & (t < start + duration)
        local = (t - start).clamp_min(0)
        envelope = torch.exp(-3.0 * local) * on
        for harmonic, weight in ((1, 1.0), (2, 0.4), (3, 0.2)):
            signal += weight * envelope * torch.sin(2 * math.pi * f0 * harmonic * local)
    signal += 1e-3 * torch.randn(n, dtype=dtype, generator=generator)
    return signal


def spectrogram(signal, n_fft=N_FFT, hop=HOP):
    """Magnitude spectrogram, frames by frequency bins (the NMF orientation)."""
    window = torch.hann_window(n_fft, dtype=signal.dtype)
    spec = torch.stft(signal, n_fft, hop_length=hop, window=window, return_complex=True)
    return spec.abs().T.contiguous()


def run_demo(seed=0, rank=4, max_iter=300, out=print):
    torch.manual_seed(seed)
    started = time.perf_counter()
    signal = synthesise_tune(seed=seed)
    V = spectrogram(signal)
    frequencies = torch.fft.rfftfreq(N_FFT, 1 / SAMPLE_RATE, dtype=V.dtype)
    out(f"Synthesised {signal.numel() / SAMPLE_RATE:.1f} s of a tune of {len(NOTES)} notes "
        f"({', '.join(f'{k} {v:.0f} Hz' for k, v in NOTES.items())}).")
    out(f"Magnitude spectrogram: {V.shape[0]} frames x {V.shape[1]} frequency bins.")

    model = NMF(V.shape, rank=rank).double()
    with torch.no_grad():
        model.H.mul_(V.mean().sqrt() / rank ** 0.5)
        model.W.mul_(V.mean().sqrt() / rank ** 0.5)
    n_iter = model.fit(V, beta=1, tol=1e-6, max_iter=max_iter)
    history = model.loss_history
    out(f"NMF (rank {rank}, KL divergence): {n_iter} iterations, "
        f"loss {history[0]:.4g} -> {history[-1]:.4g}.")

    found = []
    out("Component  dominant frequency  nearest planted note  error")
    for r in range(rank):
        peak = float(frequencies[model.W[:, r].argmax()])
        name = min(NOTES, key=lambda k: abs(NOTES[k] - peak))
        found.append(name)
        cents = 1200 * math.log2(peak / NOTES[name]) if peak > 0 else float("inf")
        out(f"{r:9d}  {peak:15.1f} Hz  {name:>20s}  {cents:+5.0f} cents")
    recovered = sorted(set(found))
    out(f"Recovered {len(recovered)} of {len(NOTES)} planted notes: {', '.join(recovered)} "
        f"(frequency resolution {SAMPLE_RATE / N_FFT:.1f} Hz) "
        f"in {time.perf_counter() - started:.1f} s.")
    return model, recovered
