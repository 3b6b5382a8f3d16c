import numpy as np
import pytest
import torch

from acquisition.diversity import tanimoto_matrix
from acquisition.greedy import greedy_select
from acquisition.select import SelectionConfig, select_batch, select_cold_start


def clustered_library(n_clusters=8, per_cluster=25, n_members=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.random((n_clusters, 2048)) < 0.08
    cluster = np.repeat(np.arange(n_clusters), per_cluster)
    bits = centres[cluster] ^ (rng.random((len(cluster), 2048)) < 0.005)
    quality = -0.5 * cluster + 0.2 * rng.standard_normal(len(cluster))
    values = quality[None] + 0.3 * rng.standard_normal((n_members, len(cluster)))
    return values, np.packbits(bits, axis=1), cluster


def _mean_distance(fps):
    sims = tanimoto_matrix(fps, fps)
    return float(1 - sims[np.triu_indices(len(fps), 1)].mean())


@pytest.mark.parametrize("acquisition", ["qUCB", "qEI", "qLogEI", "qPosteriorStandardDeviation",
                                         "thompson", "mean"])
def test_exactly_q_distinct_never_excluded_or_pending(acquisition):
    values, fps, cluster = clustered_library()
    n = values.shape[1]
    exclude = np.zeros(n, dtype=bool)
    exclude[::3] = True
    pending = np.array([1, 2, 4])
    config = SelectionConfig(acquisition=acquisition, exploration_fraction=0.25, seed=1)
    selection = select_batch(values, fps, 40, config, exclude=exclude, pending=pending, best_f=0.0)
    idx = selection.indices
    assert idx.dtype == np.int64 and idx.shape == (40,)
    assert len(set(idx.tolist())) == 40
    assert not exclude[idx].any() and not np.isin(idx, pending).any()
    assert selection.acq_values.shape == (40,)
    assert selection.diagnostics["n_explore"] == 10
    assert selection.diagnostics["config"]["acquisition"] == acquisition


def test_first_picks_equal_exact_greedy_without_penalty():
    values, fps, _ = clustered_library(seed=2)
    config = SelectionConfig(acquisition="qUCB", beta=1.0, diversity_penalty=0.0, exploration_fraction=0.0)
    selection = select_batch(values, fps, 10, config)
    exact, _ = greedy_select(torch.as_tensor(values), 10, "qUCB", {"beta": 1.0})
    n_joint = selection.diagnostics["n_joint_exploit"]
    assert n_joint >= 2
    assert selection.indices[:n_joint].tolist() == exact[:n_joint].tolist()


def test_diversity_beats_top_k_on_clustered_library():
    values, fps, cluster = clustered_library()
    q = 16
    top_k = np.argsort(-values.mean(axis=0), kind="stable")[:q]
    config = SelectionConfig(acquisition="mean", diversity_penalty=0.9, exploration_fraction=0.0)
    diverse = select_batch(values, fps, q, config).indices
    assert _mean_distance(fps[diverse]) > _mean_distance(fps[top_k]) + 0.2
    assert len(set(cluster[diverse])) > len(set(cluster[top_k]))


def test_scaffold_cap_and_maxmin_exploration():
    values, fps, cluster = clustered_library()
    config = SelectionConfig(max_per_scaffold=3, exploration_fraction=0.5, exploration_method="maxmin")
    selection = select_batch(values, fps, 20, config, scaffold_ids=cluster, pending=np.array([0]))
    counts = np.bincount(cluster[np.concatenate([selection.indices, [0]])])
    assert counts.max() <= 3
    assert len(set(selection.indices.tolist())) == 20
    assert selection.diagnostics["exploration_method"] == "maxmin"


def test_fewer_eligible_warns_and_returns_all():
    values, fps, _ = clustered_library()
    exclude = np.ones(values.shape[1], dtype=bool)
    exclude[[5, 17, 60]] = False
    with pytest.warns(UserWarning, match="only 3"):
        selection = select_batch(values, fps, 10, SelectionConfig(), exclude=exclude)
    assert sorted(selection.indices.tolist()) == [5, 17, 60]


def test_single_member_explores_with_maxmin():
    values, fps, _ = clustered_library(n_members=1)
    selection = select_batch(values, fps, 8, SelectionConfig(exploration_fraction=0.5))
    assert selection.diagnostics["exploration_method"] == "maxmin"
    assert len(set(selection.indices.tolist())) == 8


@pytest.mark.parametrize("method", ["coverage", "maxmin"])
def test_cold_start_one_pick_per_cluster_and_seeded(method):
    _, fps, cluster = clustered_library()
    exclude = cluster == 7
    a = select_cold_start(fps, 7, seed=4, exclude=exclude, method=method)
    assert sorted(cluster[a.indices].tolist()) == list(range(7))
    assert np.array_equal(a.indices, select_cold_start(fps, 7, seed=4, exclude=exclude, method=method).indices)
    assert a.diagnostics["method"] == method


def test_random_cold_start_takes_each_compound_at_its_top_dose_seeded_and_uniform():
    _, fps, _ = clustered_library(n_clusters=4, per_cluster=10)
    compound_fps = fps[::2]  # 20 distinct compounds ...
    fps = np.repeat(compound_fps, 3, axis=0)  # ... at 3 doses each
    log10_dose = np.tile([0.0, 0.5, 1.0], len(compound_fps))
    exclude = np.zeros(len(fps), bool)
    exclude[[2, 5]] = True  # compounds 0 and 1 measured at their top dose: 3.2 uM leads now
    a = select_cold_start(fps, 20, seed=3, exclude=exclude, priority=log10_dose, method="random")
    leads = {0: 1, 1: 4}  # compound -> index of its highest unmeasured dose
    for i in a.indices:
        assert not exclude[i]
        assert i == leads.get(i // 3, 3 * (i // 3) + 2)
    assert len(set((a.indices // 3).tolist())) == 20  # one condition per compound
    assert np.array_equal(a.indices, select_cold_start(fps, 20, seed=3, exclude=exclude, priority=log10_dose,
                                                       method="random").indices)
    assert not np.array_equal(a.indices, select_cold_start(fps, 20, seed=4, exclude=exclude,
                                                           priority=log10_dose, method="random").indices)
    # more picks than compounds: the rest comes from the other eligible doses, still distinct
    b = select_cold_start(fps, 30, seed=3, exclude=exclude, priority=log10_dose, method="random")
    assert len(set(b.indices.tolist())) == 30 and not exclude[b.indices].any()
    # uniform over leaders: every compound's top dose is picked about equally often
    counts = np.zeros(len(fps))
    for seed in range(400):
        counts[select_cold_start(fps, 5, seed=seed, priority=log10_dose, method="random").indices] += 1
    top = counts[2::3]
    assert counts.sum() == top.sum() == 2000
    assert top.min() > 60 and top.max() < 140  # expected 100 each (binomial sd ~9)
    # empty fingerprints (unparseable SMILES) are not one compound: each condition leads its own group
    fps[:6] = 0
    picks = select_cold_start(fps, 60, seed=0, priority=log10_dose, method="random").indices
    assert set(range(6)) <= set(picks[:len(compound_fps) - 2 + 6].tolist())


def test_stratified_cold_start_draws_one_leader_per_coverage_stratum():
    _, fps, cluster = clustered_library(n_clusters=4, per_cluster=10)
    fps = np.repeat(fps, 2, axis=0)  # 40 compounds at 2 doses each
    cluster = np.repeat(cluster, 2)
    log10_dose = np.tile([0.0, 1.0], 40)
    picks = [select_cold_start(fps, 4, seed=s, priority=log10_dose, method="stratified").indices
             for s in range(60)]
    for batch in picks:
        assert len(batch) == 4 and (log10_dose[batch] == 1.0).all()  # each compound at its top dose
        assert np.array_equal(np.sort(cluster[batch]), np.arange(4))  # one per structural cluster (stratum)
    assert np.array_equal(picks[0], select_cold_start(fps, 4, seed=0, priority=log10_dose,
                                                      method="stratified").indices)
    exclude = np.zeros(80, bool)
    exclude[[1, 3]] = True  # compounds 0 and 1 measured at their top dose: their low dose leads now
    for s in range(20):
        batch = select_cold_start(fps, 8, seed=s, exclude=exclude, priority=log10_dose, method="stratified").indices
        assert len(set(batch.tolist())) == 8 and not exclude[batch].any()
        assert all(log10_dose[i] == 1.0 or exclude[i + 1] for i in batch)
    assert len({tuple(p) for p in picks}) > 30  # a different batch in (almost) every seed
    counts = np.bincount(np.concatenate(picks), minlength=80)
    assert (counts[cluster == 2] > 0).sum() >= 8  # draws spread over a stratum, not its centre alone
    more = select_cold_start(fps, 50, seed=1, priority=log10_dose, method="stratified").indices
    assert len(set(more.tolist())) == 50  # more strata than leaders: topped up, distinct


def test_cold_start_method_is_validated():
    _, fps, _ = clustered_library()
    with pytest.raises(ValueError, match="cold-start method"):
        select_cold_start(fps, 3, seed=0, method="kmeans")
    with pytest.raises(ValueError, match="cold_start_method"):
        SelectionConfig(cold_start_method="kmeans")
    with pytest.raises(ValueError, match="anchor_beta must be >= 0"):
        SelectionConfig(anchor_beta=-0.5)


def test_narrow_errors_at_public_entry():
    values, fps, _ = clustered_library()
    with pytest.raises(ValueError, match="q must be a positive integer"):
        select_batch(values, fps, 0)
    with pytest.raises(ValueError, match="rows"):
        select_batch(values, fps[:-1], 4)
    with pytest.raises(ValueError, match="K x N"):
        select_batch(values[0], fps, 4)
    with pytest.raises(ValueError, match="exclude"):
        select_batch(values, fps, 4, exclude=np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="pending"):
        select_batch(values, fps, 4, pending=np.array([10_000]))
    with pytest.raises(ValueError, match="best_f"):
        select_batch(values, fps, 4, SelectionConfig(acquisition="qEI"))
    with pytest.raises(ValueError, match="scaffold_ids"):
        select_batch(values, fps, 4, scaffold_ids=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="max_per_scaffold=2 needs scaffold_ids"):
        select_batch(values, fps, 4, SelectionConfig(max_per_scaffold=2))
    with pytest.raises(ValueError, match="unknown acquisition"):
        SelectionConfig(acquisition="qKG")
    with pytest.raises(ValueError, match="diversity_penalty"):
        SelectionConfig(diversity_penalty=2.0)
    with pytest.raises(ValueError, match="packed uint8"):
        select_cold_start(fps.astype(np.int64), 3, seed=0)


def _two_phenotype_library(n_per=20, n_members=4, seed=0):
    """Distinct structures; group 0 scores highest and shifts cells along e_0, group 1 less
    and along e_1, group 2 (inactive) lowest and along e_2."""
    rng = np.random.default_rng(seed)
    n = 3 * n_per
    fps = np.packbits(rng.random((n, 2048)) < 0.05, axis=1)
    group = np.repeat([0, 1, 2], n_per)
    values = np.array([2.0, 1.0, 0.0])[group][None] + 0.01 * rng.standard_normal((n_members, n))
    profiles = np.zeros((n_members, n, 3))
    profiles[:, np.arange(n), group] = 1.0
    profiles += 0.01 * rng.standard_normal(profiles.shape)
    return values, fps, group, profiles


def test_phenotype_penalty_spreads_a_batch_over_predicted_phenotypes():
    values, fps, group, profiles = _two_phenotype_library()
    plain = SelectionConfig(diversity_penalty=0.0, exploration_fraction=0.0)
    assert set(group[select_batch(values, fps, 10, plain, profiles=profiles).indices]) == {0}
    spread = SelectionConfig(diversity_penalty=0.0, exploration_fraction=0.0, phenotype_penalty=0.9)
    chosen = select_batch(values, fps, 10, spread, profiles=profiles)
    # a pick of the second phenotype joins the batch; the best phenotype fills the rest, since the
    # penalty asks whether a similar pick exists, not how many; the inactive group is never picked
    assert (group[chosen.indices] == 1).sum() >= 1
    assert (group[chosen.indices] == 2).sum() == 0
    assert chosen.diagnostics["phenotype_penalty_applied"] == 0.9
    # the same config without profiles falls back to the structural selection
    assert np.array_equal(select_batch(values, fps, 10, spread).indices,
                          select_batch(values, fps, 10, plain).indices)
    # mu = 0 with profiles is exactly the plain selection; N x F member means work too
    assert np.array_equal(select_batch(values, fps, 10, plain, profiles=profiles).indices,
                          select_batch(values, fps, 10, plain).indices)
    assert np.array_equal(select_batch(values, fps, 10, spread, profiles=profiles.mean(0)).indices,
                          chosen.indices)


def test_phenotype_penalty_errors():
    values, fps, _, profiles = _two_phenotype_library()
    with pytest.raises(ValueError, match="phenotype_penalty"):
        SelectionConfig(phenotype_penalty=1.5)
    with pytest.raises(ValueError, match="profiles must be"):
        select_batch(values, fps, 4, SelectionConfig(phenotype_penalty=0.5), profiles=profiles[:, :-1])
    with pytest.raises(ValueError, match="finite"):
        select_batch(values, fps, 4, SelectionConfig(phenotype_penalty=0.5), profiles=profiles * np.nan)


@pytest.mark.parametrize("method", ["random", "stratified", "maxmin", "coverage"])
def test_cold_start_with_nothing_eligible_is_an_empty_batch(method):
    fps = np.packbits(np.random.default_rng(0).random((5, 2048)) < 0.05, axis=1)
    with pytest.warns(UserWarning):
        out = select_cold_start(fps, 3, seed=0, exclude=np.ones(5, bool), priority=np.arange(5.0), method=method)
    assert len(out.indices) == 0


def test_selection_config_numbers_are_checked_and_stored_as_python_numbers():
    """Text or non-integral values (a hand-edited campaign.json) fail naming the setting; numpy
    numbers are taken and stored as Python int / float."""
    import numpy as np

    config = SelectionConfig(seed=np.int64(3), beta=np.float32(1.5), max_per_scaffold=3.0, measurement_anchor=False)
    assert (config.seed, config.beta, config.max_per_scaffold) == (3, 1.5, 3)
    assert type(config.seed) is int and type(config.beta) is float and type(config.max_per_scaffold) is int
    for kw, message in (({"max_per_scaffold": "2"}, "max_per_scaffold must be an integer, got '2'"),
                        ({"beta": "2"}, "beta must be a number"), ({"seed": 1.5}, "seed must be an integer"),
                        ({"seed": float("inf")}, "seed must be an integer"), ({"beta": True}, "beta must be a number")):
        with pytest.raises(ValueError, match=message):
            SelectionConfig(**kw)


def test_exploration_picks_round_half_up():
    from acquisition.select import exploration_picks

    assert [exploration_picks(0.5, q) for q in (1, 3, 5, 7)] == [1, 2, 3, 4]
    assert exploration_picks(0.1, 384) == 38 and exploration_picks(1.0, 5) == 5 and exploration_picks(0.0, 5) == 0
    assert [exploration_picks(f, q) for f, q in ((0.35, 90), (0.29, 50), (0.7, 45))] == [32, 15, 32]  # x.4999... products


@pytest.mark.parametrize("n_members", [1, 3])
def test_all_maxmin_exploration_with_pending_and_a_scaffold_cap(n_members):
    """No exploit picks + MaxMin (chosen, or forced by K = 1) + pending + a cap: a capped batch, no
    IndexError from an empty list of earlier picks."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=(n_members, 10))
    fps = np.packbits(rng.random((10, 2048)) < 0.05, axis=1)
    scaffolds = np.arange(10) % 3
    config = SelectionConfig(measurement_anchor=False, exploration_fraction=1.0, exploration_method="maxmin",
                             max_per_scaffold=2)
    result = select_batch(values, fps, 3, config, pending=np.array([4]), scaffold_ids=scaffolds)
    assert len(result.indices) == 3 and 4 not in result.indices
    counts = np.bincount(scaffolds[np.concatenate([result.indices, [4]])], minlength=3)
    assert counts.max() <= 2
