"""The examples of the introduction (../shared/seed/intro.rst.txt), run as written
(with the documented ``mode`` -> ``model`` typo fixed)."""
import torch
import torch.nn as nn

from torchnmf.metrics import beta_div


def test_intro_single_nmf():
    torch.manual_seed(0)
    V = torch.rand(64, 1024)
    assert V.size() == torch.Size([64, 1024])

    from torchnmf.nmf import NMF

    model = NMF(V.t().shape, rank=10)
    assert model.W.size() == torch.Size([64, 10])
    assert model.H.size() == torch.Size([1024, 10])

    start = beta_div(model(), V.t(), 1)
    model.fit(V.t())
    WH = model.W @ model.H.t()
    assert WH.shape == V.shape
    assert torch.allclose(model().detach(), (model.H @ model.W.t()).detach())
    assert beta_div(model(), V.t(), 1) < start / 2


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        from torchnmf.nmf import NMF

        self.nmf1 = NMF((1024, 10), rank=4)
        self.nmf2 = NMF(W=(24, 10))
        self.nmf3 = NMF(W=(64, 24))

    def forward(self):
        WH = self.nmf1()
        WWH = self.nmf2(H=WH)
        WWWH = self.nmf3(H=WWH)
        return WWWH


def test_intro_chain_module():
    torch.manual_seed(0)
    model = Chain()
    output = model()
    assert output.shape == (1024, 64)


def test_intro_sequential():
    from torchnmf.nmf import NMF

    torch.manual_seed(0)
    model = nn.Sequential(NMF((1024, 10), rank=4), NMF(W=(24, 10)), NMF(W=(64, 24)))
    output = model(None)
    assert output.shape == (1024, 64)
