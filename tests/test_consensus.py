import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from torchnmf.cluster import kmeans, local_density, silhouette_score
from torchnmf.consensus import (
    Consensus,
    consensus_from_restarts,
    consensus_matrix,
    consensus_nmf,
    cophenetic_correlation,
    dispersion,
)
from torchnmf.restarts import fit_restarts


def blobs(generator, centres, per=5, spread=0.05):
    centres = torch.tensor(centres, dtype=torch.float64)
    points = centres.repeat_interleave(per, 0)
    return points + spread * torch.randn(points.shape, generator=generator, dtype=torch.float64)


def inertia(X, labels):
    return sum(
        float(((X[labels == j] - X[labels == j].mean(0)) ** 2).sum())
        for j in torch.unique(labels)
    )


def test_kmeans_finds_the_optimal_partition_of_a_tiny_set(generator):
    X = torch.rand(7, 2, generator=generator, dtype=torch.float64)
    labels, centres, value = kmeans(X, 2, n_init=10, generator=1)
    best = min(
        inertia(X, torch.tensor(assignment))
        for assignment in itertools.product([0, 1], repeat=7)
        if len(set(assignment)) == 2
    )
    assert value == pytest.approx(best, rel=1e-12)
    assert value == pytest.approx(inertia(X, labels), rel=1e-12)


def naive_silhouette(X, labels):
    total = 0.0
    n = len(X)
    for i in range(n):
        own = [j for j in range(n) if labels[j] == labels[i] and j != i]
        if not own:
            continue
        a = sum(float((X[i] - X[j]).norm()) for j in own) / len(own)
        b = min(
            sum(float((X[i] - X[j]).norm()) for j in range(n) if labels[j] == c)
            / sum(1 for j in range(n) if labels[j] == c)
            for c in set(labels.tolist()) if c != labels[i]
        )
        total += (b - a) / max(a, b)
    return total / n


def test_silhouette_and_density_against_naive_loops(generator):
    X = torch.rand(9, 3, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 2])
    assert silhouette_score(X, labels) == pytest.approx(naive_silhouette(X, labels), rel=1e-12)
    single = torch.tensor([0, 0, 1, 1, 1, 2, 1, 0, 1])  # cluster 2 has one point
    assert silhouette_score(X, single) == pytest.approx(naive_silhouette(X, single), rel=1e-12)
    density = local_density(X, 3)
    for i in range(9):
        distances = sorted(float((X[i] - X[j]).norm()) for j in range(9) if j != i)
        assert float(density[i]) == pytest.approx(sum(distances[:3]) / 3, rel=1e-12)
    with pytest.raises(ValueError, match="labels must name at least 2 clusters"):
        silhouette_score(X, torch.zeros(9, dtype=torch.int64))
    with pytest.raises(ValueError, match="n_neighbors must be below the number of points 9, got 9"):
        local_density(X, 9)
    with pytest.raises(ValueError, match=r"a \(K, N, R\) stack .* got a tensor of shape \(5, 2\)"):
        consensus_matrix(torch.rand(5, 2))
    with pytest.raises(ValueError, match=r"H\[1\] has shape \(4, 2\), H\[0\] \(5, 2\)"):
        consensus_matrix([torch.rand(5, 2), torch.rand(4, 2)])


def test_silhouette_matches_scikit_learn(generator):
    metrics = pytest.importorskip("sklearn.metrics")
    X = blobs(generator, [[0, 0], [1, 0], [0, 1]], per=6, spread=0.3)
    labels, _, _ = kmeans(X, 3, generator=0)
    expected = metrics.silhouette_score(X.numpy(), labels.numpy())
    assert silhouette_score(X, labels) == pytest.approx(expected, rel=1e-10)


def test_consensus_matrix_and_dispersion_against_naive_loops(generator):
    runs = [torch.rand(6, 3, generator=generator) for _ in range(4)]
    expected = torch.zeros(6, 6, dtype=torch.float64)
    for H in runs:
        for i in range(6):
            for j in range(6):
                expected[i, j] += float(H[i].argmax() == H[j].argmax()) / 4
    C = consensus_matrix(runs)
    assert_close(C, expected)
    naive = sum(4 * (float(C[i, j]) - 0.5) ** 2 for i in range(6) for j in range(6)) / 36
    assert dispersion(C) == pytest.approx(naive)
    stable = consensus_matrix([torch.eye(3).repeat(2, 1)] * 3)
    assert dispersion(stable) == 1.0


def naive_average_linkage_cophenetic(D):
    """UPGMA by hand: merge the closest clusters (mean pairwise distance), record heights."""
    n = len(D)
    clusters = {i: [i] for i in range(n)}
    height = [[0.0] * n for _ in range(n)]
    while len(clusters) > 1:
        pairs = itertools.combinations(sorted(clusters), 2)
        a, b = min(pairs, key=lambda p: sum(D[i][j] for i in clusters[p[0]] for j in clusters[p[1]])
                   / (len(clusters[p[0]]) * len(clusters[p[1]])))
        h = sum(D[i][j] for i in clusters[a] for j in clusters[b]) / (len(clusters[a]) * len(clusters[b]))
        for i in clusters[a]:
            for j in clusters[b]:
                height[i][j] = height[j][i] = h
        clusters[a] = clusters[a] + clusters.pop(b)
    return height


def test_cophenetic_correlation_against_a_naive_reference(generator):
    pytest.importorskip("scipy")
    runs = [torch.rand(6, 3, generator=generator) for _ in range(5)]
    C = consensus_matrix(runs)
    D = (1 - C).tolist()
    heights = naive_average_linkage_cophenetic(D)
    x = [D[i][j] for i in range(6) for j in range(i + 1, 6)]
    y = [heights[i][j] for i in range(6) for j in range(i + 1, 6)]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    expected = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)
    )
    assert cophenetic_correlation(C) == pytest.approx(expected, rel=1e-10)
    # a perfectly stable clustering
    stable = consensus_matrix([torch.eye(3).repeat(2, 1)] * 3)
    assert cophenetic_correlation(stable) == pytest.approx(1.0)


def planted_counts(generator, cells=150, genes=60, programs=4, depth=40.0):
    """Counts from planted gene-expression programs, each on its own set of genes."""
    W = torch.rand(genes, programs, generator=generator, dtype=torch.float64) * 0.1
    for j in range(programs):
        W[j * genes // programs:(j + 1) * genes // programs, j] += 2.0
    W = W / W.sum(0)
    usage = torch.rand(cells, programs, generator=generator, dtype=torch.float64) ** 4
    usage[torch.arange(cells), torch.arange(cells) % programs] += 1.0
    rates = depth * genes * (usage / usage.sum(1, keepdim=True)) @ W.T
    return torch.poisson(rates, generator=generator), W


def matched_correlations(estimated, planted):
    """Each planted program's correlation with its best-matching consensus program."""
    k = planted.shape[1]
    corr = torch.corrcoef(torch.cat([planted.T, estimated.T]))[:k, k:]
    best = max(itertools.permutations(range(k)), key=lambda p: sum(float(corr[i, p[i]]) for i in range(k)))
    return [float(corr[i, best[i]]) for i in range(k)]


def test_consensus_recovers_planted_programs(generator):
    V, W_planted = planted_counts(generator)
    result, restarts = consensus_nmf(V, 4, n_restarts=10, beta=1, max_iter=300, seed=0)
    assert isinstance(result, Consensus)
    assert min(matched_correlations(result.W, W_planted)) > 0.95
    assert_close(result.W.sum(0), torch.ones(4, dtype=torch.float64))
    assert result.stability > 0.8
    assert int(result.kept.sum()) >= 30
    assert result.H.shape == (V.shape[0], 4)
    # usage refit: W stays the consensus, the error is the divergence of H W^T
    from torchnmf.metrics import kl_div

    assert result.prediction_error == pytest.approx(float(kl_div(result.H @ result.W.T, V)), rel=1e-8)
    model = result.model()
    assert not model.W.requires_grad


def test_consensus_with_sparse_counts_matches_dense(generator):
    V, _ = planted_counts(generator, cells=60, genes=30, programs=3)
    dense = fit_restarts(V, 3, n_restarts=4, beta=2, max_iter=50, tol=0)
    sparse = fit_restarts(V.to_sparse(), 3, n_restarts=4, beta=2, max_iter=50, tol=0)
    a = consensus_from_restarts(V, dense, 3, density_threshold=2.0)
    b = consensus_from_restarts(V.to_sparse(), sparse, 3, density_threshold=2.0)
    assert_close(a.W, b.W, rtol=1e-8, atol=1e-10)
    assert a.prediction_error == pytest.approx(b.prediction_error, rel=1e-6)


def test_outliers_are_dropped(generator):
    V, _ = planted_counts(generator, cells=60, genes=30, programs=3)
    restarts = fit_restarts(V, 3, n_restarts=6, beta=1, max_iter=80)
    restarts.W[0][:, 0] = torch.rand(30, generator=generator, dtype=torch.float64)  # an odd spectrum
    loose = consensus_from_restarts(V, restarts, 3, density_threshold=2.0)
    strict = consensus_from_restarts(V, restarts, 3, density_threshold=0.3)
    assert bool(loose.kept.all())
    assert not bool(strict.kept[0]) and int(strict.labels[0]) == -1
    with pytest.raises(ValueError, match="density_threshold=0 keeps 0 spectra, fewer than rank=3"):
        consensus_from_restarts(V, restarts, 3, density_threshold=0)
    with pytest.raises(TypeError, match="restarts must be a Restarts result, got dict"):
        consensus_from_restarts(V, {}, 3)
    single = fit_restarts(V, 3, n_restarts=1, beta=1, max_iter=20)
    with pytest.raises(ValueError, match="with 1 restart the neighbours of each spectrum are the other components"):
        consensus_from_restarts(V, single, 3)


@pytest.mark.parametrize("statistic", [dispersion, cophenetic_correlation])
def test_connectivity_statistics_refuse_what_is_no_consensus_matrix(statistic):
    """Before: a numpy array failed on .to or .detach, a (3, 5) tensor and entries of 5
    gave numbers, a 1-D tensor an IndexError."""
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="consensus must be a torch.Tensor, got ndarray"):
        statistic(np.eye(3))
    with pytest.raises(ValueError, match=r"consensus must be a square \(N, N\) matrix, got shape \(3, 5\)"):
        statistic(torch.full((3, 5), 0.5))
    with pytest.raises(ValueError, match=r"consensus must hold shares in \[0, 1\].*from 0 to 5"):
        statistic(5 * torch.eye(3))
    with pytest.raises(ValueError, match=r"consensus must hold shares in \[0, 1\].*nan"):
        statistic(torch.full((3, 3), float("nan")))


def test_consensus_matrix_refuses_nan_activations():
    """Before: NaN activations (a failed fit) gave a matrix of ones, every row with
    every other."""
    H = [torch.rand(4, 2), torch.full((4, 2), float("nan"))]
    with pytest.raises(ValueError, match=r"H\[1\] contains NaN"):
        consensus_matrix(H)


def test_consensus_takes_a_numpy_integer_seed(generator):
    """Before: the restarts took np.int64(1) and then the usage refit's manual_seed
    failed with "an integer is required"."""
    np = pytest.importorskip("numpy")
    V = torch.rand(12, 2, generator=generator, dtype=torch.float64) @ torch.rand(
        2, 8, generator=generator, dtype=torch.float64)
    options = dict(n_restarts=3, max_iter=5, tol=0)
    expected, _ = consensus_nmf(V, 2, seed=1, **options)
    got, _ = consensus_nmf(V, 2, seed=np.int64(1), **options)
    assert_close(got.H, expected.H, rtol=0, atol=0)
    with pytest.raises(TypeError, match="seed must be an integer, got 1.5"):
        consensus_nmf(V, 2, seed=1.5, **options)


@pytest.mark.parametrize("beta", [1, 2])
@pytest.mark.parametrize("scale", [2.0**-30, 1e-9, 1e9])
def test_consensus_prediction_error_at_any_scale(beta, scale):
    """Real data (the digits, float32) scaled: the consensus's prediction error is unit
    scale's times scale**beta (to rounding for a power of two, 1e-3 otherwise); it was
    taken by the closed form in the data's units, negative at 1e-9 (-219,316 per unit
    of a divergence of 29,400)."""
    from sklearn.datasets import load_digits

    V = torch.tensor(load_digits().data[:150], dtype=torch.float32)
    options = dict(n_restarts=4, beta=beta, max_iter=30, seed=0)
    unit, _ = consensus_nmf(V, 3, **options)
    scaled, _ = consensus_nmf(V * scale, 3, **options)
    assert unit.prediction_error > 0
    rel = 1e-9 if scale == 2.0**-30 else 1e-3
    assert scaled.prediction_error / scale**beta == pytest.approx(unit.prediction_error, rel=rel)
    assert scaled.stability == pytest.approx(unit.stability, abs=1e-3)


def test_cluster_helpers_refuse_what_they_cannot_cluster():
    """Before: k-means of a NaN row failed in torch's multinomial, and labels of the
    wrong length were reported as naming too few clusters."""
    X = torch.rand(10, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="X contains NaN; every entry must be finite"):
        kmeans(torch.where(X > 0.9, float("nan"), X), 2)
    with pytest.raises(ValueError, match=r"labels must hold one cluster per row of X \(10\), got shape \(5,\)"):
        silhouette_score(X, torch.tensor([0, 1, 0, 1, 0]))
