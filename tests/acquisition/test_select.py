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


def test_cold_start_is_maxmin_and_seeded():
    _, fps, cluster = clustered_library()
    exclude = cluster == 7
    a = select_cold_start(fps, 7, seed=4, exclude=exclude)
    assert sorted(cluster[a.indices].tolist()) == list(range(7))
    assert np.array_equal(a.indices, select_cold_start(fps, 7, seed=4, exclude=exclude).indices)


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
    with pytest.raises(ValueError, match="unknown acquisition"):
        SelectionConfig(acquisition="qKG")
    with pytest.raises(ValueError, match="diversity_penalty"):
        SelectionConfig(diversity_penalty=2.0)
    with pytest.raises(ValueError, match="packed uint8"):
        select_cold_start(fps.astype(np.int64), 3, seed=0)
