"""Tests for acquisition/surrogate.py (closed-form FakeAssay from test_prediction_cache)."""

import numpy as np
import pytest
import torch

from acquisition.surrogate import (MIN_OUT_OF_BAG, FingerprintSurrogate, SurrogateConfig, _spearman, fingerprint_bags,
                                   fingerprint_groups, prescreen, train_surrogate)
from test_prediction_cache import FakeAssay, clustered_library, random_fingerprints

FAST = SurrogateConfig(n_heads=4, hidden_dim=32, n_epochs=20, batch_size=128)


def member_activity(assay, fps, dose=10.0):
    profiles = assay.predict_profiles(fps, np.full(len(fps), dose))
    return np.linalg.norm(profiles, axis=-1) / np.sqrt(profiles.shape[-1])  # K x N


def test_fingerprint_bags_sum_the_rows_of_the_set_bits():
    rng = np.random.default_rng(0)
    fps = random_fingerprints(7, rng)
    fps[3] = 0  # an empty fingerprint is an empty bag
    index, offsets = fingerprint_bags(fps)
    embed = torch.nn.EmbeddingBag(2048, 5, mode="sum")
    bits = torch.from_numpy(np.unpackbits(fps, axis=1).astype(np.float32))
    torch.testing.assert_close(embed(index, offsets), bits @ embed.weight)


def test_surrogate_ranks_planted_active_cluster_above_random():
    rng = np.random.default_rng(1)
    fps, motif, is_cluster = clustered_library(2400, 120, rng)  # 4.8% cluster
    assay = FakeAssay(motif=motif, motif_weight=4.0)
    values = member_activity(assay, fps)
    train = rng.choice(len(fps), 600, replace=False)
    model, diag = train_surrogate(fps[train], values[:, train], config=FAST, seed=0)
    # out-of-bag rank correlation is modest: the random linear part is hard to learn from 600 compounds
    assert diag["n_train"] == 600 and diag["steps"] > 0 and diag["oob_spearman"] > 0.1
    rest = np.ones(len(fps), bool)
    rest[train] = False
    shortlist = prescreen(model, fps, 100, beta=1.0, exclude=~rest)
    assert len(shortlist) == 100 and rest[shortlist].all()
    base_rate = is_cluster[rest].mean()
    assert is_cluster[shortlist].mean() > max(0.6, 8 * base_rate)


def test_prescreen_orders_by_ucb_and_respects_exclude_and_size():
    rng = np.random.default_rng(2)
    fps = random_fingerprints(300, rng)
    values = member_activity(FakeAssay(), fps)
    model, _ = train_surrogate(fps, values, config=FAST, seed=0)
    heads = model.predict_heads(fps)
    assert heads.shape == (4, 300) and heads.dtype == np.float32
    ucb = heads.mean(0) + 2.0 * heads.std(0, ddof=1)
    top = prescreen(model, fps, 10, beta=2.0)
    np.testing.assert_array_equal(top, np.argsort(-ucb, kind="stable")[:10])
    exclude = np.ones(300, bool)
    exclude[[5, 9]] = False
    assert sorted(prescreen(model, fps, 10, exclude=exclude).tolist()) == [5, 9]
    with pytest.raises(ValueError, match="shortlist_size"):
        prescreen(model, fps, 0)
    with pytest.raises(ValueError, match="exclude"):
        prescreen(model, fps, 5, exclude=np.zeros(3, bool))


def test_same_seed_same_model_and_heads_differ():
    rng = np.random.default_rng(3)
    fps = random_fingerprints(200, rng)
    values = member_activity(FakeAssay(), fps)
    a, _ = train_surrogate(fps, values, config=FAST, seed=5)
    b, _ = train_surrogate(fps, values, config=FAST, seed=5)
    np.testing.assert_array_equal(a.predict_heads(fps), b.predict_heads(fps))
    heads = a.predict_heads(fps)
    assert not np.allclose(heads[0], heads[1])


def test_measured_labels_pull_predictions_towards_the_lab():
    rng = np.random.default_rng(4)
    fps = random_fingerprints(400, rng)
    values = np.zeros((2, 400), np.float32) + 0.05 * rng.random((2, 400)).astype(np.float32)
    measured = random_fingerprints(20, rng)
    plain, _ = train_surrogate(fps, values, config=FAST, seed=0)
    with_lab, diag = train_surrogate(fps, values, config=FAST, seed=0, measured_fingerprints=measured,
                                     measured_activity=np.full(20, 3.0, np.float32))
    assert diag["n_measured"] == 20
    assert with_lab.predict_heads(measured).mean() > plain.predict_heads(measured).mean() + 1.0


def test_mean_target_and_input_checks():
    rng = np.random.default_rng(5)
    fps = random_fingerprints(50, rng)
    model, diag = train_surrogate(fps, np.ones(50, np.float32) + rng.random(50).astype(np.float32),
                                  config=SurrogateConfig(n_heads=2, hidden_dim=8, n_epochs=2, target="mean",
                                                         bootstrap=False), seed=0)
    assert isinstance(model, FingerprintSurrogate) and np.isnan(diag["oob_spearman"])
    with pytest.raises(ValueError, match="values must be K x n"):
        train_surrogate(fps, np.ones((2, 49)), config=FAST)
    with pytest.raises(ValueError, match="go together"):
        train_surrogate(fps, np.ones(50), config=FAST, measured_fingerprints=fps[:2])
    with pytest.raises(ValueError, match="packed uint8"):
        train_surrogate(np.unpackbits(fps, axis=1), np.ones(50), config=FAST)
    with pytest.raises(ValueError, match="target"):
        SurrogateConfig(target="median")


def test_nan_scores_never_let_excluded_candidates_in(monkeypatch, caplog):
    rng = np.random.default_rng(2)
    fps = random_fingerprints(100, rng)
    model, _ = train_surrogate(fps, member_activity(FakeAssay(), fps), config=FAST, seed=0)
    heads = model.predict_heads(fps)
    heads[:, 50:] = np.nan  # half the eligible candidates scored NaN
    monkeypatch.setattr(model, "predict_heads", lambda *a, **k: heads.copy())
    exclude = np.zeros(100, bool)
    exclude[:20] = True
    top = prescreen(model, fps, 80, exclude=exclude)
    assert sorted(top.tolist()) == list(range(20, 50))
    assert "50 of 80 eligible candidates" in caplog.text
    heads[:] = np.nan
    with pytest.raises(ValueError, match="every one of the 80 eligible"):
        prescreen(model, fps, 10, exclude=exclude)


def test_huge_targets_train_a_finite_surrogate():
    rng = np.random.default_rng(5)
    fps = random_fingerprints(60, rng)
    values = 1e20 * (1 + member_activity(FakeAssay(), fps))  # float32 std overflows above ~1e19
    model, _ = train_surrogate(fps, values, config=FAST, seed=0)
    assert np.isfinite(model.predict_heads(fps)).all()
    with pytest.raises(ValueError, match="NaN or inf"):
        train_surrogate(fps, np.where(np.arange(60) == 3, np.nan, 1.0), config=FAST, seed=0)


def test_fingerprint_groups_number_identical_rows_together_in_order_of_appearance():
    rng = np.random.default_rng(6)
    fps = random_fingerprints(4, rng)
    rows = fps[[2, 0, 2, 3, 0, 1]]
    np.testing.assert_array_equal(fingerprint_groups(rows), [0, 1, 0, 2, 1, 3])
    np.testing.assert_array_equal(fingerprint_groups(fps), np.arange(4))  # distinct rows: the row order


def test_out_of_bag_spearman_of_repeated_compounds_matches_a_hold_out():
    """A compound listed 5 times is in or out of a head's bag with all its copies: the out-of-bag
    rho stays near the hold-out rho instead of scoring rows the head trained on (0.98 before)."""
    rng = np.random.default_rng(1)
    fps, motif, _ = clustered_library(1100, 110, rng)
    values = member_activity(FakeAssay(motif=motif, motif_weight=4.0), fps)
    train, held_out = np.arange(400), np.arange(400, len(fps))
    repeated = np.tile(train, 5)
    model, diag = train_surrogate(fps[repeated], values[:, repeated], config=FAST, seed=0)
    hold_out = _spearman(model.predict_heads(fps[held_out]).mean(0), values[:, held_out].mean(0))
    assert diag["n_train"] == 2000 and diag["n_fingerprints"] == 400
    assert 0 < diag["n_out_of_bag"] <= 400  # counted per fingerprint, not per row
    assert abs(diag["oob_spearman"] - hold_out) < 0.15 and diag["oob_spearman"] < 0.6


def test_spearman_needs_enough_rows_and_a_spread():
    a = np.arange(MIN_OUT_OF_BAG, dtype=float)
    assert MIN_OUT_OF_BAG == 10 and _spearman(a, a ** 3) == pytest.approx(1.0)
    assert np.isnan(_spearman(a[:-1], a[:-1] ** 3))  # 3 rows agreeing used to report rho = 1
    assert np.isnan(_spearman(a, np.ones_like(a)))  # constant values have no ranking


def test_constant_targets_keep_their_magnitude_and_say_there_is_nothing_to_rank(caplog):
    """Equal targets have no spread to standardise by: the value's own size is the scale, so unseen
    compounds are predicted near it, not off by the network's noise in units of 1."""
    rng = np.random.default_rng(7)
    fps, unseen = random_fingerprints(200, rng), random_fingerprints(300, rng)
    value = 2e-3
    with caplog.at_level("WARNING", logger="acquisition.surrogate"):
        model, diag = train_surrogate(fps, np.full((2, 200), value, np.float32), config=FAST, seed=0)
    assert "nothing to rank (constant targets)" in caplog.text and diag["constant_targets"]
    assert float(model.y_mean) == pytest.approx(value) and float(model.y_scale) == pytest.approx(value)
    assert np.isnan(diag["oob_spearman"])
    assert np.abs(model.predict_heads(unseen) - value).max() < 2 * value  # 0.85 (425 x value) before
    _, zero_diag = train_surrogate(fps, np.zeros(200, np.float32), config=FAST, seed=0)
    assert zero_diag["constant_targets"]
