"""Where reading a tensor back to the host synchronises: an accelerator.

On an accelerator, ``float(t)``, ``bool(t)``, ``t.item()`` and ``t.tolist()``
wait for every queued kernel, so the solvers make their decisions inside an
iteration on the device (``torch.where`` on 0-dim tensors) and the loop reads
the objectives back in groups (:mod:`torchnmf.solvers.loop`).  On the CPU a
read costs nothing and the solvers keep Python numbers.  Every such choice asks
:func:`on_accelerator`, so a test can replace this one function with a
stand-in and run the device paths on the CPU.
"""
import torch

__all__ = ["on_accelerator"]


def on_accelerator(tensor):
    """Whether ``tensor`` is a tensor whose read-back synchronises with a device."""
    return isinstance(tensor, torch.Tensor) and tensor.device.type != "cpu"
