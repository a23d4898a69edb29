"""
Separating the instruments of a drum groove with NMFD
=====================================================

A mixture of four instruments (kick, snare, hi-hat and a bell) playing two
bars is synthesised here, so the true tracks are known.  Its magnitude
spectrogram is factorised with :class:`torchnmf.nmf.NMFD`: each template is a
short spectrogram (a sound that unfolds over several frames) and each
activation says when that sound starts.  Every component is turned back into
audio by soft masking the mixture's STFT and compared with the planted
instrument it resembles most.  This is the material of ``make demo``.
"""

import base64
import io as _io
import wave

import matplotlib.pyplot as plt
import numpy as np
import torch

from torchnmf import io
from torchnmf.demo import INSTRUMENTS, match_components, sdr, synthesise_piece
from torchnmf.nmf import NMFD

torch.manual_seed(0)
SAMPLE_RATE, N_FFT, HOP, T = 8000, 512, 256, 8

# %%
# The mixture and its spectrogram
# --------------------------------
# :func:`torchnmf.io.stft_magnitude` returns the magnitude in NMF's
# orientation (frames x frequency bins) together with what is needed to invert
# it.  NMFD slides its templates along the last axis, so the spectrogram goes
# in as ``(1, bins, frames)``.

sources, mixture = synthesise_piece(seed=0)
spec = io.stft_magnitude(mixture, SAMPLE_RATE, n_fft=N_FFT, hop=HOP)
V = spec.magnitude.T.unsqueeze(0)
print(f"{mixture.numel() / SAMPLE_RATE:.1f} s of audio -> V of shape {tuple(V.shape)}")

# %%
# Fitting NMFD
# ------------
# Four components, templates of ``T = 8`` frames (0.26 s), the
# Kullback-Leibler divergence (``beta=1``), which suits magnitude spectra.

model = NMFD(V.shape, rank=len(INSTRUMENTS), T=T).double()
n_iter = model.fit(V, beta=1, tol=0, max_iter=200)
print(f"{n_iter} iterations, loss {model.loss_history[0]:.4g} -> {model.loss_history[-1]:.4g}")

# %%
# Each component's own reconstruction is its part of the spectrogram; soft
# masking splits the mixture's STFT in those proportions, so the separated
# waveforms add up to the mixture exactly.

with torch.no_grad():
    parts = torch.stack(
        [model.reconstruct(model.H[:, r : r + 1], model.W[:, r : r + 1])[0].T for r in range(model.rank)]
    )
waves = spec.to_audio(parts)
references = torch.stack(
    [io.stft_magnitude(sources[name], SAMPLE_RATE, n_fft=N_FFT, hop=HOP).magnitude for name in INSTRUMENTS]
)
assignment, similarity = match_components(parts, references)
for name, r in zip(INSTRUMENTS, assignment):
    print(
        f"{name:>7s}: component {r}, SDR {sdr(waves[r], sources[name]):5.1f} dB "
        f"(the unseparated mixture: {sdr(mixture, sources[name]):5.1f} dB)"
    )

# %%
# What NMFD found
# ---------------
# Left, the four templates (frequency x time within the template, log scale);
# right, when each one is active.  The kick's energy sits at the bottom of the
# spectrum, the hi-hat's at the top, the bell's in a few harmonic lines.

frequencies = np.fft.rfftfreq(N_FFT, 1 / SAMPLE_RATE)
frame_times = np.arange(model.H.shape[2]) * HOP / SAMPLE_RATE
fig = plt.figure(figsize=(10, 6.5), layout="constrained")
grid = fig.add_gridspec(len(INSTRUMENTS), 2, width_ratios=(1, 4))
W = model.W.detach().numpy()
H = model.H.detach()[0].numpy()
for row, (name, r) in enumerate(zip(INSTRUMENTS, assignment)):
    ax = fig.add_subplot(grid[row, 0])
    ax.imshow(
        np.log1p(W[:, r, :] / W[:, r, :].max() * 100),
        origin="lower",
        aspect="auto",
        cmap="magma",
        extent=(0, T * HOP / SAMPLE_RATE, 0, frequencies[-1] / 1000),
    )
    ax.set_ylabel(f"{name}\nkHz")
    if row == len(INSTRUMENTS) - 1:
        ax.set_xlabel("template time (s)")
    else:
        ax.set_xticklabels([])
    ax = fig.add_subplot(grid[row, 1])
    ax.fill_between(frame_times, H[r], color=f"C{row}", alpha=0.8)
    ax.set_xlim(frame_times[0], frame_times[-1])
    ax.set_yticks([])
    if row == len(INSTRUMENTS) - 1:
        ax.set_xlabel("time (s)")
    else:
        ax.set_xticklabels([])
fig.suptitle("NMFD templates (left) and their activations (right)")

# %%
# The mixture beside its reconstruction
# -------------------------------------

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True, layout="constrained")
extent = (0, frame_times[-1], 0, frequencies[-1] / 1000)
for ax, data, title in zip(axes, (V[0], model()[0].detach()), ("mixture", "NMFD reconstruction")):
    ax.imshow(np.log1p(data.numpy() * 10), origin="lower", aspect="auto", cmap="magma", extent=extent)
    ax.set_title(title)
    ax.set_xlabel("time (s)")
axes[0].set_ylabel("frequency (kHz)")


# %%
# Listening
# ---------
# The mixture, then each separated component (browsers play these inline).


class Audio:
    """A waveform that shows as an HTML audio player."""

    def __init__(self, signal, label):
        self.signal, self.label = signal, label

    def _repr_html_(self):
        pcm = (self.signal.clamp(-1, 1).numpy() * 32767).astype("<i2")
        buffer = _io.BytesIO()
        with wave.open(buffer, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes(pcm.tobytes())
        data = base64.b64encode(buffer.getvalue()).decode()
        return f'<p>{self.label}</p><audio controls src="data:audio/wav;base64,{data}"></audio>'


class Players:
    def __init__(self, players):
        self.players = players

    def _repr_html_(self):
        return "".join(player._repr_html_() for player in self.players)


Players(
    [Audio(mixture, "mixture")]
    + [Audio(waves[r], f"component {r} ({name})") for name, r in zip(INSTRUMENTS, assignment)]
)
