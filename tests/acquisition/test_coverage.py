import numpy as np
import pytest

from acquisition.coverage import coverage_select
from acquisition.diversity import maxmin_select, tanimoto_matrix


def _cluster_library(sizes, seed=0, noise=0.004):
    """Clusters of near-duplicate fingerprints with the given sizes (far apart)."""
    rng = np.random.default_rng(seed)
    centres = rng.random((len(sizes), 2048)) < 0.06
    cluster = np.repeat(np.arange(len(sizes)), sizes)
    bits = centres[cluster] ^ (rng.random((len(cluster), 2048)) < noise)
    return np.packbits(bits, axis=1), cluster


def _brute_force_greedy(fps, q, exclude, priority, covered):
    """Reference: plain (non-lazy) greedy facility location over all rows."""
    sims = tanimoto_matrix(fps, fps).astype(np.float64)
    cover = sims[covered].max(axis=0) if len(covered) else np.zeros(len(fps))
    eligible = ~exclude
    picks = []
    for _ in range(min(q, eligible.sum())):
        gains = np.maximum(sims - cover[None], 0).sum(axis=1)
        order = np.lexsort((np.arange(len(fps)), -priority, -np.round(gains, 9)))
        best = next(i for i in order if eligible[i])
        picks.append(best)
        eligible[best] = False
        cover = np.maximum(cover, sims[best])
    return picks


def test_lazy_greedy_matches_brute_force_greedy():
    rng = np.random.default_rng(3)
    fps = np.packbits(rng.random((120, 2048)) < rng.uniform(0.02, 0.2, (120, 1)), axis=1)
    exclude = rng.random(120) < 0.2
    priority = rng.integers(0, 3, 120).astype(float)
    covered = np.flatnonzero(exclude)[:5]
    picks = coverage_select(fps, 25, seed=0, exclude=exclude, priority=priority, covered=covered)
    assert picks.tolist() == _brute_force_greedy(fps, 25, exclude.copy(), priority, covered)


def test_picks_the_big_clusters_where_maxmin_picks_the_outliers():
    # clusters of 30, 20 and 10 compounds, and 3 singletons
    fps, cluster = _cluster_library([30, 20, 10, 1, 1, 1])
    picks = coverage_select(fps, 3, seed=0)
    assert sorted(cluster[picks].tolist()) == [0, 1, 2]
    assert cluster[picks[0]] == 0  # the largest region first
    maxmin = maxmin_select(fps, 3, seed=0)
    assert (cluster[maxmin] >= 3).any()  # MaxMin, blind to density, spends picks on singletons


def test_covered_regions_are_skipped_and_excluded_never_picked():
    fps, cluster = _cluster_library([30, 20, 10])
    exclude = cluster == 0
    picks = coverage_select(fps, 2, seed=0, exclude=exclude, covered=np.flatnonzero(cluster == 1)[:1])
    assert not exclude[picks].any()
    assert cluster[picks[0]] == 2  # cluster 1 is covered by its measured member, cluster 0 is excluded


def test_priority_takes_a_compound_at_its_highest_dose():
    fps, cluster = _cluster_library([1, 1, 1])
    fps = np.repeat(fps, 3, axis=0)  # each compound at three doses: identical fingerprints
    dose_um = np.tile([0.1, 10.0, 1.0], 3)
    picks = coverage_select(fps, 3, seed=0, priority=np.log10(dose_um))
    assert np.all(dose_um[picks] == 10.0)
    assert len({row // 3 for row in picks}) == 3  # three compounds, not one compound thrice


def test_large_library_uses_a_seeded_pool():
    fps, cluster = _cluster_library([400, 300, 200, 100], noise=0.01)
    a = coverage_select(fps, 4, seed=1, max_pool=200)
    assert np.array_equal(a, coverage_select(fps, 4, seed=1, max_pool=200))
    assert sorted(cluster[a].tolist()) == [0, 1, 2, 3]
    exclude = np.zeros(len(fps), dtype=bool)
    exclude[:500] = True
    b = coverage_select(fps, 50, seed=2, exclude=exclude, max_pool=100)
    assert len(set(b.tolist())) == 50 and not exclude[b].any()


def test_fewer_eligible_than_q_and_narrow_errors():
    fps, _ = _cluster_library([3, 2])
    exclude = np.array([True, True, False, False, True])
    assert sorted(coverage_select(fps, 10, seed=0, exclude=exclude).tolist()) == [2, 3]
    with pytest.raises(ValueError, match="q must be a positive integer"):
        coverage_select(fps, 0, seed=0)
    with pytest.raises(ValueError, match="priority"):
        coverage_select(fps, 2, seed=0, priority=np.ones(3))
    with pytest.raises(ValueError, match="covered"):
        coverage_select(fps, 2, seed=0, covered=np.array([99]))
    with pytest.raises(ValueError, match="packed uint8"):
        coverage_select(fps.astype(np.int64), 2, seed=0)
