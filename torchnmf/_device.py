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

__all__ = ["on_accelerator", "usable_device"]


def on_accelerator(tensor):
    """Whether ``tensor`` is a tensor whose read-back synchronises with a device."""
    return isinstance(tensor, torch.Tensor) and tensor.device.type != "cpu"


def usable_device(spec, name="device"):
    """``torch.device(spec)``, or a ``ValueError`` naming ``name`` when it is not a
    device or not one this process can allocate on (``"cuda:7"`` on a CPU build
    raised an ``AssertionError`` from inside torch at the first copy)."""
    try:
        device = torch.device(spec)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError, TypeError) as error:
        detail = " ".join(str(error).split())
        raise ValueError(f"{name}={spec!r} cannot be used here ({detail})") from None
    return device
