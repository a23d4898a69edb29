import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

torch.set_num_threads(1)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def low_rank(n, c, rank, generator, dtype=torch.float64, noise=0.0):
    """A planted non-negative low-rank matrix V = H @ W.T (+ noise), with its factors."""
    H = torch.rand(n, rank, generator=generator, dtype=dtype)
    W = torch.rand(c, rank, generator=generator, dtype=dtype)
    V = H @ W.T
    if noise:
        V = V + noise * torch.rand(n, c, generator=generator, dtype=dtype)
    return V, H, W


TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-12)}


class DenseWatcher(TorchDispatchMode):
    """Records the largest strided tensor any aten operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.layout == torch.strided:
                self.largest = max(self.largest, value.numel())
        return out
