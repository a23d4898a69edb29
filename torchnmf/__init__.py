"""torchnmf: non-negative factorisations in PyTorch.

Public modules: :mod:`torchnmf.nmf` (NMF models), :mod:`torchnmf.plca`
(PLCA models), :mod:`torchnmf.trainer` (optimizers for compositions of
models), :mod:`torchnmf.metrics` (divergences).  ``import torchnmf`` needs
only torch, numpy and tqdm.
"""
from . import metrics, nmf, plca, trainer
from ._validation import ConvergenceWarning

__version__ = "0.4.0.dev0"
__all__ = ["nmf", "plca", "trainer", "metrics", "ConvergenceWarning", "__version__"]
