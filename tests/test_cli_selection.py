"""``torchnmf rank`` and ``torchnmf consensus`` end to end on a small file."""
import numpy as np
import pytest

from torchnmf.cli import main
from torchnmf.cli_selection import parse_ranks


@pytest.fixture
def counts(tmp_path):
    rng = np.random.default_rng(0)
    W = rng.random((30, 3)) ** 3
    H = rng.random((45, 3)) ** 3
    path = tmp_path / "counts.npz"
    np.savez(path, V=rng.poisson(30 * H @ W.T))
    return path


def test_parse_ranks():
    assert parse_ranks("2:5") == [2, 3, 4, 5]
    assert parse_ranks("2:8:3") == [2, 5, 8]
    assert parse_ranks("3,5,9") == [3, 5, 9]
    for bad in ("0:3", "5:2", "a", "2,2", "1:2:3:4"):
        with pytest.raises(ValueError):
            parse_ranks(bad)


def test_rank_prints_a_table_and_suggests_the_planted_rank(counts, tmp_path, capsys):
    pytest.importorskip("scipy")
    pytest.importorskip("matplotlib")
    figure = tmp_path / "k.png"
    status = main(["rank", str(counts), "--ranks", "2:4", "--restarts", "4", "--max-iter", "150",
                   "-q", "--plot", str(figure)])
    out = capsys.readouterr().out
    assert status == 0, out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "loss"])
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [row[0] for row in rows] == ["2", "3", "4"]
    assert all(len(row) == 7 for row in rows)
    assert "suggested rank: 3 (the smallest rank whose mean held-out error" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_consensus_writes_the_factors(counts, tmp_path, capsys):
    output = tmp_path / "c.npz"
    status = main(["consensus", str(counts), "--rank", "3", "--restarts", "8", "-q", "-o", str(output)])
    out = capsys.readouterr().out
    assert status == 0, out
    archive = np.load(output)
    assert archive["W"].shape == (30, 3) and archive["H"].shape == (45, 3)
    np.testing.assert_allclose(archive["W"].sum(0), 1, rtol=1e-5)
    assert float(archive["stability"]) > 0.8
    assert "stability (silhouette)" in out and str(output) in out


def test_errors(counts, tmp_path, capsys):
    assert main(["rank", str(counts), "--ranks", "0:3"]) == 2
    assert main(["consensus", str(counts), "--restarts", "3"]) == 2  # no --rank
    assert main(["consensus", str(tmp_path / "missing.npz"), "--rank", "2", "-q"]) == 1
    assert "torchnmf: error:" in capsys.readouterr().err
    status = main(["consensus", str(counts), "--rank", "2", "-q", "-o", str(tmp_path / "no" / "c.npz")])
    assert status == 1
    assert "does not exist" in capsys.readouterr().err
