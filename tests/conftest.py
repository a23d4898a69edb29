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


class unchanged:
    """``with unchanged(model, V, ...):`` asserts that the block leaves every given
    module (parameters, their ``requires_grad``, ``loss_history``) and tensor exactly
    as it was, also when the block raises (use it around ``pytest.raises``)."""

    def __init__(self, *objects):
        self.objects = objects

    @staticmethod
    def _state(obj):
        if isinstance(obj, torch.nn.Module):
            params = {k: (v.detach().clone(), v.requires_grad) for k, v in obj.named_parameters()}
            return params, list(getattr(obj, "loss_history", []))
        if obj.layout == torch.strided:
            return obj.clone()
        return obj.to_dense().clone()

    def __enter__(self):
        self.before = [self._state(obj) for obj in self.objects]
        return self

    def __exit__(self, *exc):
        for obj, before in zip(self.objects, self.before):
            after = self._state(obj)
            if isinstance(obj, torch.nn.Module):
                assert before[1] == after[1], "loss_history changed"
                assert before[0].keys() == after[0].keys()
                for key, (value, grad) in before[0].items():
                    assert torch.equal(value, after[0][key][0]), f"{key} changed"
                    assert grad == after[0][key][1]
            else:
                assert torch.equal(before.nan_to_num(), after.nan_to_num()), "a tensor changed"
                assert torch.equal(before.isnan(), after.isnan())
        return False
