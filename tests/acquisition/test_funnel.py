"""Tests for acquisition/funnel.py (closed-form FakeAssay from test_prediction_cache)."""

import dataclasses
import functools
import json

import numpy as np
import pytest

from acquisition.funnel import FunnelConfig, funnel_predict
from acquisition.objectives import ObjectiveConfig
from acquisition.prediction_cache import PredictionCache
from acquisition.select import SelectionConfig, select_batch
from acquisition.surrogate import SurrogateConfig
from test_prediction_cache import FakeAssay, clustered_library, direct_activity, inchikeys, random_fingerprints

SMALL = FunnelConfig(sample_size=400, shortlist_size=200, simulate_all_max=500,
                     surrogate=SurrogateConfig(n_heads=4, hidden_dim=32, n_epochs=20, batch_size=128))


@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(0)
    fps, motif, is_cluster = clustered_library(2850, 150, rng)
    return fps, inchikeys(len(fps)), motif, is_cluster


def test_funnel_finds_top_candidates_far_more_often_than_random(tmp_path, clustered):
    fps, keys, motif, _ = clustered
    assay = FakeAssay(motif=motif)
    truth = direct_activity(FakeAssay(motif=motif), fps, 10.0).mean(axis=0)
    top = np.argsort(-truth)[:50]
    result = funnel_predict(assay, fps, keys, 10.0, config=SMALL, cache=PredictionCache(tmp_path), seed=0)
    d = result.diagnostics
    assert d["mode"] == "funnel" and (d["n_sample"], d["n_shortlist"]) == (400, 200)
    assert len(result.indices) == 600 and result.values.shape == (3, 600)
    assert np.all(np.diff(result.indices) > 0) and assay.n_predicted == 600
    assert result.from_shortlist.sum() == 200
    assert set(d["timings"]) >= {"simulate_sample_s", "train_surrogate_s", "prescreen_s", "simulate_shortlist_s",
                                 "total_s"}
    # values are the assay's own
    np.testing.assert_allclose(result.values, direct_activity(FakeAssay(motif=motif), fps[result.indices], 10.0),
                               rtol=1e-6)
    recall = np.isin(top, result.indices).mean()
    assert recall > 3 * len(result.indices) / len(fps)  # random would catch 20%
    json.dumps(d)  # diagnostics are saved with the proposal


def test_same_round_again_hits_the_cache_only(tmp_path, clustered):
    fps, keys, motif, _ = clustered
    cache = PredictionCache(tmp_path)
    first = funnel_predict(FakeAssay(motif=motif), fps, keys, 10.0, config=SMALL, cache=cache, seed=3)
    assay = FakeAssay(motif=motif)
    again = funnel_predict(assay, fps, keys, 10.0, config=SMALL, cache=PredictionCache(tmp_path), seed=3)
    assert assay.n_calls == 0 and again.diagnostics["n_simulated"] == 0
    np.testing.assert_array_equal(again.indices, first.indices)
    np.testing.assert_array_equal(again.values, first.values)


def test_exclude_and_pending(clustered):
    fps, keys, motif, _ = clustered
    rng = np.random.default_rng(1)
    exclude = rng.random(len(fps)) < 0.3
    pending = rng.choice(np.flatnonzero(~exclude), 20, replace=False)
    result = funnel_predict(FakeAssay(motif=motif), fps, keys, 10.0, exclude=exclude, pending=pending,
                            config=SMALL, seed=0)
    assert not exclude[result.indices].any()
    np.testing.assert_array_equal(result.indices[result.pending], np.sort(pending))
    assert len(result.indices) == 400 + 200 + 20
    selection = select_batch(result.values, fps[result.indices], 16, SelectionConfig(seed=0),
                             pending=result.pending)
    picks = result.indices[selection.indices]
    assert len(set(picks.tolist())) == 16 and not np.isin(picks, pending).any() and not exclude[picks].any()


def test_a_shortlist_too_small_for_the_batch_is_enlarged_to_it(clustered, caplog):
    """sample_size + shortlist_size below the picks asked for would return too few to fill the
    plates: the shortlist grows to the batch, with a warning; otherwise the sizes stand."""
    fps, keys, motif, _ = clustered
    config = dataclasses.replace(SMALL, sample_size=50, shortlist_size=30)
    pending = np.arange(10)
    with caplog.at_level("WARNING", logger="acquisition.funnel"):
        result = funnel_predict(FakeAssay(motif=motif), fps, keys, 10.0, pending=pending, config=config, seed=0,
                                min_eligible=368)
    assert len(result.indices) - len(result.pending) == 368
    assert "shortlist_size 30 is less than the 368 picks asked for; shortlisting 318 instead" in caplog.text
    result = funnel_predict(FakeAssay(motif=motif), fps, keys, 10.0, pending=pending, config=config, seed=0,
                            min_eligible=60)
    assert len(result.indices) - len(result.pending) == 80


def test_small_library_is_simulated_whole():
    rng = np.random.default_rng(2)
    fps = random_fingerprints(120, rng)
    exclude = np.zeros(120, bool)
    exclude[:10] = True
    assay = FakeAssay()
    result = funnel_predict(assay, fps, inchikeys(120), np.full(120, 10.0), exclude=exclude, pending=[10, 11],
                            config=SMALL, seed=0)
    assert result.diagnostics["mode"] == "all" and assay.n_predicted == 110
    np.testing.assert_array_equal(result.indices, np.arange(10, 120))
    np.testing.assert_array_equal(result.pending, [0, 1])


def test_config_round_trip_and_checks():
    config = FunnelConfig(sample_size=7, surrogate=SurrogateConfig(n_heads=3))
    assert FunnelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="shortlist_size"):
        FunnelConfig(shortlist_size=0)
    with pytest.raises(ValueError, match="executor"):
        FunnelConfig(executor="spark")
    fps = random_fingerprints(5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="inchikeys"):
        funnel_predict(FakeAssay(), fps, inchikeys(4), 10.0)
    with pytest.raises(ValueError, match="pending"):
        funnel_predict(FakeAssay(), fps, inchikeys(5), 10.0, pending=[7])


def test_sample_larger_than_eligible_leaves_an_empty_shortlist():
    rng = np.random.default_rng(3)
    fps = random_fingerprints(600, rng)
    config = FunnelConfig(sample_size=1000, shortlist_size=50, simulate_all_max=500,
                          surrogate=SurrogateConfig(n_heads=2, hidden_dim=8, n_epochs=1))
    result = funnel_predict(FakeAssay(), fps, inchikeys(600), 10.0, config=config, seed=0)
    assert result.diagnostics["n_shortlist"] == 0 and len(result.indices) == 600
    assert not result.from_shortlist.any()
    with pytest.raises(ValueError, match="dose_um"):
        funnel_predict(FakeAssay(), fps, inchikeys(600), np.full(599, 10.0), config=config)


def test_empty_shortlist_with_profiles_or_an_objective(tmp_path):
    rng = np.random.default_rng(3)
    fps = random_fingerprints(600, rng)
    config = FunnelConfig(sample_size=1000, shortlist_size=50, simulate_all_max=500, profile_dims=None,
                          surrogate=SurrogateConfig(n_heads=2, hidden_dim=8, n_epochs=1))
    assay = FakeAssay()
    result = funnel_predict(assay, fps, inchikeys(600), 10.0, config=config, seed=0,
                            cache=PredictionCache(tmp_path))
    assert result.diagnostics["n_shortlist"] == 0 and result.profiles.shape == (3, 600, 4)
    objective = functools.partial(
        ObjectiveConfig(similarity_weight=1.0, target_features=("Cells_Fake_1", "Cells_Fake_2"),
                        target_values=(1.0, -1.0), target_label="t").member_values,
        feature_names=assay.feature_names)
    result = funnel_predict(assay, fps, inchikeys(600), 10.0, config=config, seed=0, objective=objective)
    assert result.values.shape == (3, 600) and np.isfinite(result.values).all()


@pytest.mark.parametrize("bad", [dict(sample_size=1), dict(n_cells=1), dict(n_cells=2.5), dict(profile_dims=-3),
                                 dict(simulation_seed=1.5), dict(plate_id=[3])])
def test_simulation_settings_are_checked_with_the_config(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        FunnelConfig(**bad)


def test_fixed_simulation_seed_shares_the_cache_across_round_seeds(tmp_path):
    rng = np.random.default_rng(4)
    fps = random_fingerprints(300, rng)
    config = FunnelConfig(simulate_all_max=1000, simulation_seed=11)
    cache = PredictionCache(tmp_path)
    first = funnel_predict(FakeAssay(), fps, inchikeys(300), 10.0, config=config, cache=cache, seed=1)
    assay = FakeAssay()
    second = funnel_predict(assay, fps, inchikeys(300), 10.0, config=config, cache=cache, seed=2)
    assert assay.n_calls == 0
    np.testing.assert_array_equal(first.values, second.values)
    np.testing.assert_allclose(first.values, direct_activity(FakeAssay(), fps, 10.0, seed=11), rtol=1e-6)


@pytest.mark.parametrize("simulate_all_max", [5000, 500])  # everything simulated / surrogate prescreen
def test_objective_replaces_activity_everywhere(clustered, simulate_all_max):
    fps, keys, motif, _ = clustered
    target = ObjectiveConfig(similarity_weight=1.0, target_features=("Cells_Fake_1", "Cells_Fake_2"),
                             target_values=(1.0, -1.0), target_label="t")
    assay = FakeAssay(motif=motif)
    objective = functools.partial(target.member_values, feature_names=assay.feature_names)
    config = dataclasses.replace(SMALL, simulate_all_max=simulate_all_max, profile_dims=None)
    result = funnel_predict(assay, fps, keys, 10.0, config=config, seed=0, objective=objective)
    profiles = FakeAssay(motif=motif).predict_profiles(fps[result.indices], np.full(len(result.indices), 10.0))
    np.testing.assert_allclose(result.values, target.member_values(profiles, assay.feature_names), rtol=1e-5,
                               atol=1e-6)
    assert result.values.min() < 0  # cosine values, not activity
    with pytest.raises(ValueError, match="profile_dims=None"):
        funnel_predict(assay, fps, keys, 10.0, config=SMALL, seed=0, objective=objective)


def test_constant_values_give_a_seeded_random_shortlist_with_a_warning(clustered, caplog):
    """With every simulated value the same the surrogate's UCB ranks by its initialisation alone:
    the shortlist is a random draw from the funnel's seed, and the round says so."""
    fps, keys, motif, _ = clustered
    config = dataclasses.replace(SMALL, profile_dims=None)
    flat = lambda profiles: np.full(profiles.shape[:2], 0.5, np.float32)  # noqa: E731 (an objective)
    with caplog.at_level("WARNING", logger="acquisition"):
        first = funnel_predict(FakeAssay(motif=motif), fps, keys, 10.0, config=config, seed=0, objective=flat)
    assert "nothing to rank" in caplog.text and first.diagnostics["shortlist"] == "random"
    assert first.diagnostics["surrogate"]["constant_targets"] and first.from_shortlist.sum() == 200
    again = funnel_predict(FakeAssay(motif=motif), fps, keys, 10.0, config=config, seed=0, objective=flat)
    other = funnel_predict(FakeAssay(motif=motif), fps, keys, 10.0, config=config, seed=1, objective=flat)
    np.testing.assert_array_equal(again.indices, first.indices)
    shortlisted = set(first.indices[first.from_shortlist].tolist())
    assert shortlisted != set(other.indices[other.from_shortlist].tolist())
    # a draw from the rest, not the surrogate's pick: the cluster (5% of the library) is not enriched
    _, _, _, is_cluster = clustered
    assert is_cluster[sorted(shortlisted)].mean() < 0.15
    varied = funnel_predict(FakeAssay(motif=motif), fps, keys, 10.0, config=SMALL, seed=0)
    assert varied.diagnostics["shortlist"] == "surrogate_ucb"
