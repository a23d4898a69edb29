"""The demo: a synthesised piece separated with NMFD, written to a directory."""
import wave

import pytest
import torch

from torchnmf import demo
from torchnmf.cli import main


def test_piece_is_the_sum_of_its_sources():
    sources, mixture = demo.synthesise_piece(seed=3)
    assert list(sources) == list(demo.INSTRUMENTS)
    torch.testing.assert_close(sum(sources.values()), mixture)
    assert float(mixture.abs().max()) == pytest.approx(0.9)
    again, _ = demo.synthesise_piece(seed=3)
    torch.testing.assert_close(again["snare"], sources["snare"])


def test_sdr():
    reference = torch.tensor([1.0, -2.0, 2.0])
    assert demo.sdr(torch.zeros(3), reference) == pytest.approx(0.0)
    assert demo.sdr(0.9 * reference, reference) == pytest.approx(20.0)


def test_match_components_finds_the_planted_permutation():
    generator = torch.Generator().manual_seed(0)
    references = torch.rand(3, 6, 5, generator=generator)
    parts = torch.cat([references[[2, 0, 1]], torch.rand(1, 6, 5, generator=generator)])
    assignment, similarity = demo.match_components(parts, references)
    assert assignment == [1, 2, 0]
    assert similarity.shape == (3, 4)


def test_demo_writes_audio_figure_and_factors_and_separates(tmp_path):
    lines = []
    result = demo.run_demo(out_dir=tmp_path / "out", seed=0, max_iter=30, out=lines.append)
    _, mixture = demo.synthesise_piece(seed=0)
    wavs = sorted((tmp_path / "out").rglob("*.wav"))
    assert len(wavs) == 1 + 2 * len(demo.INSTRUMENTS)
    for path in wavs:
        with wave.open(str(path)) as handle:
            assert handle.getframerate() == demo.SAMPLE_RATE
            assert handle.getnframes() == mixture.numel()
    assert (tmp_path / "out" / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "factors.npz").exists()
    assert set(result.paths) == set(wavs) | {tmp_path / "out" / n for n in ("figure.png", "factors.npz")}
    # every planted instrument is recovered far better than by the mixture itself
    assert sorted(result.assignment.values()) == list(range(len(demo.INSTRUMENTS)))
    for name in demo.INSTRUMENTS:
        assert result.sdr[name] > result.baseline_sdr[name] + 10, name
        assert any(line.lstrip().startswith(name) for line in lines)
    assert any("Mean SDR improvement" in line for line in lines)


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--max-iter", "3", "--no-plot"]) == 0
    captured = capsys.readouterr()
    assert "NMFD (rank 4" in captured.out and "Wrote 10 files" in captured.out
    assert not (tmp_path / "d" / "figure.png").exists()
