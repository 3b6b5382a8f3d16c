import numpy as np
import pytest
import torch

from acquisition.diversity import (
    maxmin_select,
    penalized_greedy_select,
    popcount_rows,
    tanimoto_matrix,
    tanimoto_to_set,
)
from acquisition.greedy import greedy_select


def _random_fps(n, seed, density=0.1):
    rng = np.random.default_rng(seed)
    return np.packbits(rng.random((n, 2048)) < density, axis=1)


def clustered_toy(n_clusters=6, per_cluster=20, seed=0):
    """Clusters of near-duplicate fingerprints; cluster 0 has the best values."""
    rng = np.random.default_rng(seed)
    centres = rng.random((n_clusters, 2048)) < 0.08
    cluster = np.repeat(np.arange(n_clusters), per_cluster)
    bits = centres[cluster] ^ (rng.random((len(cluster), 2048)) < 0.005)
    quality = -cluster + 0.1 * rng.standard_normal(len(cluster))
    values = quality[None] + 0.05 * rng.standard_normal((4, len(cluster)))
    return torch.as_tensor(values), np.packbits(bits, axis=1), cluster


def test_popcount_table_matches_bitwise_count_and_unpacked_sum():
    fps = _random_fps(50, 0)
    expected = np.unpackbits(fps, axis=1).sum(axis=1)
    assert np.array_equal(popcount_rows(fps), expected)
    assert np.array_equal(popcount_rows(fps, use_table=True), expected)


def test_tanimoto_closed_form():
    a = np.packbits(np.array([[1, 1, 0, 0] + [0] * 2044, [0] * 2048], dtype=bool), axis=1)
    b = np.packbits(np.array([[1, 0, 1, 0] + [0] * 2044], dtype=bool), axis=1)
    sims = tanimoto_matrix(a, b)
    assert sims[0, 0] == pytest.approx(1 / 3)  # |{0}| / |{0, 1, 2}|
    assert sims[1, 0] == 0.0


def test_tanimoto_matrix_matches_bruteforce_and_table():
    a, b = _random_fps(30, 1), _random_fps(17, 2, density=0.2)
    ua, ub = np.unpackbits(a, axis=1).astype(bool), np.unpackbits(b, axis=1).astype(bool)
    inter = (ua[:, None] & ub[None]).sum(-1)
    union = (ua[:, None] | ub[None]).sum(-1)
    expected = inter / union
    assert np.allclose(tanimoto_matrix(a, b), expected, atol=1e-6)
    assert np.allclose(tanimoto_matrix(a, b, use_table=True), expected, atol=1e-6)
    assert np.allclose(tanimoto_to_set(a, b), expected.max(axis=1), atol=1e-6)
    assert np.allclose(np.diag(tanimoto_matrix(a, a)), 1.0)


def test_tanimoto_to_empty_set_is_zero():
    assert np.array_equal(tanimoto_to_set(_random_fps(5, 0), _random_fps(0, 0)), np.zeros(5))


def test_maxmin_covers_clusters_and_honours_exclude():
    _, fps, cluster = clustered_toy()
    exclude = np.zeros(len(fps), dtype=bool)
    exclude[cluster == 5] = True
    picks = maxmin_select(fps, 5, seed=3, exclude=exclude)
    assert sorted(cluster[picks].tolist()) == [0, 1, 2, 3, 4]
    assert np.array_equal(picks, maxmin_select(fps, 5, seed=3, exclude=exclude))  # seeded
    assert len(maxmin_select(fps, 500, seed=0, exclude=exclude)) == 100


def test_zero_penalty_matches_exact_greedy_until_saturation():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, 200, generator=g, dtype=torch.float64)
    fps = _random_fps(200, 4)
    pending = np.array([3, 99])
    exact, acq = greedy_select(values, 8, "qUCB", {"beta": 1.0}, pending=pending)
    growing = int(torch.cumprod(torch.cat([torch.tensor([1]), (acq[1:] > acq[:-1]).int()]), 0).sum())
    result = penalized_greedy_select(values, fps, 8, "qUCB", {"beta": 1.0},
                                     diversity_penalty=0.0, pending=pending)
    assert growing >= 3
    assert result.n_joint >= growing
    assert result.indices[:growing].tolist() == exact[:growing].tolist()


def test_penalty_increases_diversity_vs_top_k():
    values, fps, cluster = clustered_toy()
    q = 6
    top_k = np.argsort(-values.mean(0).numpy(), kind="stable")[:q]
    diverse = penalized_greedy_select(values, fps, q, "mean", diversity_penalty=1.0).indices

    def mean_distance(idx):
        sims = tanimoto_matrix(fps[idx], fps[idx])
        return float(1 - sims[np.triu_indices(q, 1)].mean())

    assert len(set(cluster[top_k])) == 1  # pure exploitation stays in the best cluster
    assert mean_distance(diverse) > mean_distance(top_k) + 0.3  # ~0.1 -> > 0.4
    assert len(set(cluster[diverse])) >= 4
    assert cluster[diverse[0]] == 0  # the best candidate is still picked first


def test_scaffold_cap_pending_and_selected_honoured():
    values, fps, cluster = clustered_toy()
    pending = np.array([0])  # cluster 0, counts towards the cap
    result = penalized_greedy_select(values, fps, 12, "qUCB", {"beta": 1.0}, diversity_penalty=0.2,
                                     pending=pending, selected=[1, 2], scaffold_ids=cluster,
                                     max_per_scaffold=3)
    picks = result.indices
    assert len(set(picks.tolist())) == 12
    assert not np.isin(picks, [0, 1, 2]).any()
    counts = np.bincount(cluster[np.concatenate([picks, [0, 1, 2]])], minlength=6)
    assert counts.max() <= 3
    assert result.n_joint < 12  # K = 4 members saturate before 12 picks


def test_penalized_greedy_narrow_errors():
    values, fps, _ = clustered_toy()
    with pytest.raises(ValueError, match="diversity_penalty"):
        penalized_greedy_select(values, fps, 2, "mean", diversity_penalty=1.5)
    with pytest.raises(ValueError, match="rows"):
        penalized_greedy_select(values, fps[:-1], 2, "mean")
    with pytest.raises(ValueError, match="supports"):
        penalized_greedy_select(values, fps, 2, "qLogEI")


def test_maxmin_priority_breaks_ties_between_identical_fingerprints():
    """A compound offered at 3 doses (identical fingerprints): MaxMin takes its highest dose."""
    _, fps, cluster = clustered_toy(n_clusters=4, per_cluster=1)
    fps = np.repeat(fps, 3, axis=0)  # 4 compounds x 3 doses
    dose_um = np.tile([0.1, 10.0, 1.0], 4)
    picks = maxmin_select(fps, 4, seed=0, priority=np.log10(dose_um))
    assert sorted(picks // 3) == [0, 1, 2, 3]
    assert np.all(dose_um[picks] == 10.0)
    assert np.all(dose_um[maxmin_select(fps, 4, seed=0)[1:]] == 0.1)  # without: lowest index
    with pytest.raises(ValueError, match="priority"):
        maxmin_select(fps, 4, seed=0, priority=np.ones(5))


def test_phenotype_penalty_needs_profiles_with_one_row_per_candidate():
    values, fps, _ = clustered_toy()
    with pytest.raises(ValueError, match="needs predicted profiles"):
        penalized_greedy_select(values, fps, 3, phenotype_penalty=0.5)
    with pytest.raises(ValueError, match="rows"):
        penalized_greedy_select(values, fps, 3, phenotype_penalty=0.5, profiles=np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"phenotype_penalty must be in \[0, 1\]"):
        penalized_greedy_select(values, fps, 3, phenotype_penalty=2.0, profiles=np.ones((len(fps), 2)))


def test_maxmin_never_starts_from_an_excluded_compound_after_an_empty_fingerprint():
    """An empty fingerprint (unparseable SMILES) has Tanimoto 0 to itself; the seeded first pick must
    still be an eligible compound when a priority re-chooses among its identical twins."""
    rng = np.random.default_rng(0)
    fps = np.packbits(rng.random((4, 2048)) < 0.05, axis=1)
    fps[0] = 0
    exclude = np.array([False, True, False, False])
    for seed in range(20):
        picks = maxmin_select(fps, 2, seed=seed, exclude=exclude, priority=np.array([0.0, 5.0, 1.0, 2.0]))
        assert 1 not in picks.tolist() and len(picks) == 2


def test_maxmin_around_anchors_starts_farthest_from_them():
    """With anchors (earlier picks, compounds in flight) the first pick is the eligible candidate
    farthest from them, deterministically, and every pick's distance to the anchors is counted."""
    rng = np.random.default_rng(1)
    centres = rng.random((3, 2048)) < 0.05
    bits = np.repeat(centres, 10, axis=0) ^ (rng.random((30, 2048)) < 0.005)  # 3 clusters of 10
    fps = np.packbits(bits, axis=1)
    anchors = np.array([0, 10])  # clusters 0 and 1 are already in the batch
    exclude = np.zeros(30, bool)
    exclude[anchors] = True
    a = maxmin_select(fps, 1, seed=0, exclude=exclude, anchors=anchors)
    b = maxmin_select(fps, 1, seed=99, exclude=exclude, anchors=anchors)
    assert a.tolist() == b.tolist() and 20 <= a[0] < 30  # the one cluster with nothing in the batch
    distance_to_anchors = 1 - tanimoto_to_set(fps, fps[anchors])
    assert a[0] == int(np.argmax(np.where(exclude, -np.inf, distance_to_anchors)))


def _penalized_reference(u, fps, q, penalty, pending=()):
    """One member: the greedy's score is ``(u_i - min u) * (1 - penalty * max Tanimoto to picks +
    pending)``, every candidate scored at every step, ties -> lowest index."""
    anchors, picks = list(pending), []
    eligible = np.ones(len(u), dtype=bool)
    eligible[list(pending)] = False
    gain = u - u[eligible].min()
    for _ in range(q):
        sims = tanimoto_to_set(fps, fps[anchors]) if anchors else np.zeros(len(u), np.float32)
        score = np.where(eligible, gain * np.clip(1 - penalty * sims, 0, None), -np.inf)
        best = int(np.flatnonzero(score == score.max())[0])
        picks.append(best)
        anchors.append(best)
        eligible[best] = False
    return picks


def test_lazy_penalized_greedy_breaks_exact_ties_like_scoring_everything():
    rng = np.random.default_rng(3)
    distinct = _random_fps(40, 5)
    fps = distinct[rng.integers(0, 40, 600)]  # duplicated fingerprints: exact ties in the score
    u = rng.integers(0, 4, 600).astype(np.float64)
    for penalty in (0.0, 0.5):
        result = penalized_greedy_select(torch.as_tensor(u[None]), fps, 30, "mean", diversity_penalty=penalty,
                                         pending=np.array([7]), shortlist=4)
        assert result.indices.tolist() == _penalized_reference(u, fps, 30, penalty, pending=[7])


def test_max_similarity_reports_tanimoto_even_without_the_tanimoto_penalty():
    values, fps, _ = clustered_toy()
    profiles = np.random.default_rng(0).standard_normal((values.shape[1], 5))
    result = penalized_greedy_select(values, fps, 5, "mean", diversity_penalty=0.0, pending=np.array([0]),
                                     profiles=profiles, phenotype_penalty=0.5)
    anchors = [0]
    for pick, sim in zip(result.indices, result.max_similarity):
        assert sim == pytest.approx(float(tanimoto_to_set(fps[[pick]], fps[anchors])[0]), abs=1e-6)
        anchors.append(int(pick))
    assert result.max_similarity.max() > 0.5  # the toy's clusters are near-duplicates


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_joint_gains_within_rounding_end_the_joint_phase(dtype):
    """Candidate 1 ties candidate 0 on member 0 up to one ulp: that rounding 'gain' must not outrank
    candidate 3's single-point value once candidates 0 and 2 saturate both members."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    one_ulp_up = float(np.nextafter(np_dtype(1.0), np_dtype(2.0)))
    values = torch.tensor([[1.0, one_ulp_up, 0.0, 0.6],
                           [0.0, -1.0, 0.9, 0.3]], dtype=dtype)
    fps = _random_fps(4, seed=1)
    result = penalized_greedy_select(values, fps, 3, "mean", diversity_penalty=0.0)
    assert result.indices.tolist() == [0, 2, 3]
    assert result.n_joint == 2


def test_qei_orders_candidates_without_improvement_by_smoothed_improvement():
    """After the few candidates with positive EI, every other one has EI 0 under every member; they
    are ranked by BoTorch's smoothed single-point qLogEI, not left tied in library order, so the
    Tanimoto penalty keeps a cluster of near-duplicates at the front of the library out."""
    from botorch.acquisition.logei import qLogExpectedImprovement

    from acquisition.ensemble_model import CachedEnsembleModel, MemberSampler

    rng = np.random.default_rng(1)
    n, k = 300, 4
    values = torch.as_tensor(rng.normal(size=n) + 0.3 * rng.normal(size=(k, n)))
    bits = rng.random((n, 2048)) < 0.03
    bits[:30] = rng.random(2048) < 0.05  # indices 0..29: one cluster of identical fingerprints
    fps = np.packbits(bits, axis=1)
    best_f = float(np.quantile(values.max(0).values.numpy(), 0.97))
    result = penalized_greedy_select(values, fps, 24, "qEI", {"best_f": best_f}, diversity_penalty=0.5)
    assert (result.scores > 0).all()
    assert (result.indices < 30).sum() <= 2
    model = CachedEnsembleModel(values.unsqueeze(-1))
    log_ei = qLogExpectedImprovement(model, best_f=best_f, sampler=MemberSampler(k))
    singles = log_ei(torch.arange(n, dtype=torch.float64).view(n, 1, 1)).exp()
    saturated = result.indices[result.n_joint:]
    gains = result.gains[result.n_joint:]
    eligible = np.ones(n, dtype=bool)
    eligible[result.indices[:result.n_joint]] = False
    floor = float(singles[torch.as_tensor(eligible)].min())
    np.testing.assert_allclose(gains, singles[torch.as_tensor(saturated)].numpy() - floor, rtol=1e-9, atol=1e-30)


def test_penalized_greedy_validates_pending():
    values, fps, _ = clustered_toy()
    with pytest.raises(ValueError, match="pending indices must be in"):
        penalized_greedy_select(values, fps, 2, "mean", pending=np.array([-1]))


def test_phenotype_penalty_closed_form_max_cosine_over_the_anchors():
    """Score = gain x (1 - mu max(0, max_j cos(p_i, p_j))) over pending and earlier picks, mu = 1.
    Pending 0 and 1 (profiles e1, e2, value 10) saturate the joint phase, so gains are the values less
    the eligible minimum (candidate 4, 0). Candidate 5 is at cos 0.5 from pending 0 (9 x 0.5 = 4.5),
    candidate 6 anti-parallel to it (cos clipped to 0: 4.2), candidate 3 orthogonal to all (4.0),
    candidate 2 parallel to pending 0 (cos 1 against one anchor, 0 against the other: score 0)."""
    e = np.eye(4)
    profiles = np.stack([e[0], e[1], e[0], e[2], e[2], (e[0] + np.sqrt(3) * e[3]) / 2, -e[0]])
    u = np.array([10.0, 10.0, 5.0, 4.0, 0.0, 9.0, 4.2])
    fps = _random_fps(len(u), 11)
    result = penalized_greedy_select(torch.as_tensor(u[None]), fps, 3, "mean", diversity_penalty=0.0,
                                     pending=np.array([0, 1]), profiles=profiles, phenotype_penalty=1.0)
    assert result.indices.tolist() == [5, 6, 3]
    np.testing.assert_allclose(result.scores, [4.5, 4.2, 4.0], rtol=1e-6)
    np.testing.assert_allclose(result.gains, [9.0, 4.2, 4.0], rtol=1e-6)
