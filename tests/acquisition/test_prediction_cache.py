"""Tests for acquisition/prediction_cache.py; also home of the closed-form ``FakeAssay`` the other
acquisition tests import (``from test_prediction_cache import FakeAssay``).

FakeAssay member k's profile of a compound with bits ``x`` (2048, 0/1) at dose ``d``:

    profile_k = (A + B_k) x * log10(1 + d) / 10 + motif_weight * (motif . x / |motif|) e_0 + 1e-3 * seed

``A`` (F x 2048) is shared, ``B_k`` a small member-specific perturbation; ``motif`` is a planted
set of bits that drives feature 0 (a planted "active cluster").
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import acquisition.prediction_cache as prediction_cache
from acquisition.objectives import phenotypic_activity
from acquisition.prediction_cache import (
    PredictionCache,
    PredictionCacheError,
    SimulationSettings,
    predict_with_cache,
)

N_BITS = 2048


class FakeAssay:
    """Closed-form virtual assay (see module docstring); counts calls and compounds predicted."""

    def __init__(self, n_members: int = 3, n_features: int = 4, *, seed: int = 0, version: str = "fake-v1",
                 motif: np.ndarray | None = None, motif_weight: float = 4.0, member_sd: float = 0.2) -> None:
        rng = np.random.default_rng(seed)
        self.n_members = n_members
        self.feature_names = [f"Cells_Fake_{j}" for j in range(n_features)]
        self.version = version
        self.shared = rng.normal(size=(n_features, N_BITS)).astype(np.float32)
        self.member = (member_sd * rng.normal(size=(n_members, n_features, N_BITS))).astype(np.float32)
        self.motif = np.zeros(N_BITS, dtype=np.float32) if motif is None else motif.astype(np.float32)
        self.motif_weight = motif_weight
        self.n_calls = 0
        self.n_predicted = 0

    def predict_profiles(self, fingerprints, dose_um, *, n_cells=32, seed=0, plate_id=None, batch_size=256):
        fingerprints = np.asarray(fingerprints, dtype=np.uint8)
        self.n_calls += 1
        self.n_predicted += len(fingerprints)
        bits = np.unpackbits(fingerprints, axis=1).astype(np.float32)  # N x 2048
        scale = (np.log10(1.0 + np.asarray(dose_um, dtype=np.float32)) / 10.0)[None, :, None]
        weights = self.shared[None] + self.member  # K x F x 2048
        profiles = np.einsum("kfb,nb->knf", weights, bits) * scale  # K x N x F
        n_motif = max(float(self.motif.sum()), 1.0)
        profiles[:, :, 0] += self.motif_weight * (bits @ self.motif) / n_motif
        return (profiles + 1e-3 * seed).astype(np.float32)

    def predict_cells(self, fingerprint, dose_um, *, n_cells=32, seed=0, plate_id=None):
        if fingerprint is None:
            return np.zeros((self.n_members, n_cells, len(self.feature_names)), dtype=np.float32)
        profile = self.predict_profiles(np.asarray(fingerprint).reshape(1, -1), np.array([dose_um]), seed=seed)
        return np.repeat(profile, n_cells, axis=1)


def random_fingerprints(n: int, rng: np.random.Generator, density: float = 0.02) -> np.ndarray:
    return np.packbits(rng.random((n, N_BITS)) < density, axis=1)


def clustered_library(n_random: int, n_cluster: int, rng: np.random.Generator, n_motif_bits: int = 40):
    """Random fingerprints plus a cluster sharing a planted motif: (packed fps, motif bits, is_cluster)."""
    motif = np.zeros(N_BITS, dtype=bool)
    motif[rng.choice(N_BITS, n_motif_bits, replace=False)] = True
    random_bits = rng.random((n_random, N_BITS)) < 0.02
    cluster_bits = (rng.random((n_cluster, N_BITS)) < 0.01) | (motif & (rng.random((n_cluster, N_BITS)) < 0.8))
    bits = np.concatenate([random_bits, cluster_bits])
    order = rng.permutation(len(bits))
    is_cluster = np.concatenate([np.zeros(n_random, bool), np.ones(n_cluster, bool)])[order]
    return np.packbits(bits[order], axis=1), motif, is_cluster


def inchikeys(n: int, prefix: str = "FAKE") -> np.ndarray:
    return np.array([f"{prefix}{i:010d}-UHFFFAOYSA-N" for i in range(n)], dtype=object)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

def direct_activity(assay, fps, dose, seed=0, n_cells=32):
    profiles = assay.predict_profiles(fps, np.full(len(fps), dose), n_cells=n_cells, seed=seed)
    return phenotypic_activity(torch.from_numpy(profiles)).numpy()


@pytest.fixture
def library():
    rng = np.random.default_rng(0)
    return random_fingerprints(60, rng), inchikeys(60)


def test_put_get_round_trip_and_missing_keys(tmp_path):
    cache = PredictionCache(tmp_path)
    keys = inchikeys(5)
    values = np.arange(15, dtype=np.float32).reshape(3, 5)
    path = cache.put("v1", keys[:4], 10.0, values[:, :4])
    assert path.is_file() and path.parent == cache.folder("v1", SimulationSettings())
    lookup = cache.get("v1", keys, np.full(5, 10.0))
    assert lookup.found.tolist() == [True, True, True, True, False]
    np.testing.assert_array_equal(lookup.activity[:, :4], values[:, :4])
    assert np.isnan(lookup.activity[:, 4]).all() and lookup.profiles is None
    # another dose, model version or seed is another key
    assert not cache.get("v1", keys, 3.0).found.any()
    assert not cache.get("v2", keys, 10.0).found.any()
    assert not cache.get("v1", keys, 10.0, SimulationSettings(seed=1)).found.any()
    # a fresh instance reads the shards back; no temporary files are left behind
    again = PredictionCache(tmp_path).get("v1", keys[::-1], 10.0)
    np.testing.assert_array_equal(again.activity[:, 1:], values[:, :4][:, ::-1])
    assert not [p for p in path.parent.iterdir() if "tmp" in p.name]
    meta = json.loads((path.parent / "settings.json").read_text())
    assert meta["n_members"] == 3 and meta["model_version"] == "v1"


def test_predict_with_cache_matches_direct_and_never_resimulates(tmp_path, library):
    fps, keys = library
    assay = FakeAssay()
    cache = PredictionCache(tmp_path)
    first = predict_with_cache(assay, fps[:40], keys[:40], 10.0, cache, seed=0)
    assert first.activity.shape == (3, 40) and first.activity.dtype == np.float32
    assert (first.n_simulated, first.n_cached) == (40, 0)
    np.testing.assert_allclose(first.activity, direct_activity(FakeAssay(), fps[:40], 10.0), rtol=1e-6)
    assay.n_calls = assay.n_predicted = 0
    # same compounds again: no call to the generator at all
    again = predict_with_cache(assay, fps[:40], keys[:40], 10.0, cache, seed=0)
    assert assay.n_calls == 0 and (again.n_simulated, again.n_cached) == (0, 40)
    np.testing.assert_array_equal(again.activity, first.activity)
    # overlapping request: only the 20 new compounds are simulated
    overlap = predict_with_cache(assay, fps[20:], keys[20:], 10.0, cache, seed=0)
    assert assay.n_predicted == 20 and (overlap.n_simulated, overlap.n_cached) == (20, 20)
    np.testing.assert_array_equal(overlap.activity[:, :20], first.activity[:, 20:])
    # a new seed (other noise draw) is a separate key
    predict_with_cache(assay, fps[:5], keys[:5], 10.0, cache, seed=1)
    assert assay.n_predicted == 25


def test_duplicates_chunks_and_profiles(tmp_path, library):
    fps, keys = library
    assay = FakeAssay()
    rows = np.array([0, 1, 2, 1, 0, 3])
    result = predict_with_cache(assay, fps[rows], keys[rows], 10.0, PredictionCache(tmp_path), seed=0,
                                profile_dims=2, chunk_size=2)
    assert assay.n_predicted == 4 and assay.n_calls == 2  # unique compounds, in chunks of 2
    np.testing.assert_array_equal(result.activity[:, 3], result.activity[:, 1])
    direct = assay.predict_profiles(fps[rows], np.full(6, 10.0))
    np.testing.assert_allclose(result.profiles, direct[:, :, :2], rtol=1e-6)
    cached = predict_with_cache(assay, fps[rows], keys[rows], 10.0, PredictionCache(tmp_path), seed=0,
                                profile_dims=2)
    assert cached.n_simulated == 0
    np.testing.assert_array_equal(cached.profiles, result.profiles)


def test_no_cache_simulates_everything(library):
    fps, keys = library
    assay = FakeAssay()
    out = predict_with_cache(assay, fps[:10], keys[:10], 10.0, None, seed=0)
    out = predict_with_cache(assay, fps[:10], keys[:10], 10.0, None, seed=0)
    assert assay.n_predicted == 20 and out.n_cached == 0


def test_sharded_executor_goes_through_iter_tasks(tmp_path, library, monkeypatch):
    fps, keys = library
    seen = []

    def fake_iter_tasks(fn, kwargs_list, *, address=None, num_cpus_per_task=1, num_gpus_per_task=0.0):
        seen.append(len(kwargs_list))
        for i in reversed(range(len(kwargs_list))):  # completion order need not be input order
            yield i, fn(**kwargs_list[i])

    monkeypatch.setattr(prediction_cache, "iter_tasks", fake_iter_tasks)
    assay = FakeAssay()
    out = predict_with_cache(assay, fps[:30], keys[:30], 10.0, PredictionCache(tmp_path), seed=0,
                             executor="ray", n_shards=3)
    assert seen == [3]
    np.testing.assert_allclose(out.activity, direct_activity(FakeAssay(), fps[:30], 10.0), rtol=1e-6)
    assert PredictionCache(tmp_path).n_entries("fake-v1") == 30


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_shard_raises_naming_the_file(tmp_path, library, damage):
    fps, keys = library
    cache = PredictionCache(tmp_path)
    predict_with_cache(FakeAssay(), fps[:10], keys[:10], 10.0, cache, seed=0)
    shard = next(cache.folder("fake-v1", SimulationSettings()).glob("shard-*.parquet"))
    data = shard.read_bytes()
    shard.write_bytes(b"not a parquet file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(PredictionCacheError, match=shard.name):
        PredictionCache(tmp_path).get("fake-v1", keys[:10], 10.0)


def test_shard_with_wrong_columns_or_missing_settings_is_an_error(tmp_path, library):
    fps, keys = library
    cache = PredictionCache(tmp_path)
    predict_with_cache(FakeAssay(), fps[:4], keys[:4], 10.0, cache, seed=0)
    folder = cache.folder("fake-v1", SimulationSettings())
    bad = folder / "shard-bad.parquet"
    pd.DataFrame({"inchikey": ["X"], "dose_um": [10.0]}).to_parquet(bad)
    with pytest.raises(PredictionCacheError, match="shard-bad.parquet.*lacks columns"):
        PredictionCache(tmp_path).get("fake-v1", keys[:4], 10.0)
    bad.unlink()
    (folder / "settings.json").unlink()
    with pytest.raises(PredictionCacheError, match="settings.json: missing"):
        PredictionCache(tmp_path).get("fake-v1", keys[:4], 10.0)


def test_bad_input_is_rejected_and_nothing_written(tmp_path, library):
    fps, keys = library
    cache = PredictionCache(tmp_path)
    with pytest.raises(ValueError, match="non-finite"):
        cache.put("v1", keys[:2], 10.0, np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="model_version"):
        cache.get("../escape", keys[:2], 10.0)
    with pytest.raises(ValueError, match=r"inchikeys\[1\]"):
        cache.get("v1", ["A", ""], 10.0)
    with pytest.raises(ValueError, match="dose_um"):
        predict_with_cache(FakeAssay(), fps[:2], keys[:2], -1.0, cache, seed=0)
    with pytest.raises(ValueError, match="inchikeys has 3 entries"):
        predict_with_cache(FakeAssay(), fps[:2], keys[:3], 10.0, cache, seed=0)
    with pytest.raises(ValueError, match="executor"):
        predict_with_cache(FakeAssay(), fps[:2], keys[:2], 10.0, cache, seed=0, executor="dask")
    assert not any(tmp_path.rglob("shard-*"))
    # a model version's folder holds one K: a different ensemble size is refused
    cache.put("v1", keys[:2], 10.0, np.ones((3, 2), np.float32))
    with pytest.raises(PredictionCacheError, match="K=3"):
        cache.put("v1", keys[2:4], 10.0, np.ones((2, 2), np.float32))


def _tiny_cells(seed: int = 0):
    """Single-cell table: DMSO ~ N(0, 1); compound A shifts feature 0 by +3 sd, B by 0."""
    rng = np.random.default_rng(seed)
    features = ["Nuclei_Intensity_MeanIntensity_DNA", "Cells_AreaShape_Area", "Cytoplasm_Texture_Contrast_Actin"]
    rows = []
    for plate in ("P1", "P2"):
        for w, (cid, dose, shift) in enumerate([("DMSO", 0.0, 0.0)] * 3 + [("A", 10.0, 3.0)] * 2
                                               + [("B", 10.0, 0.0)] * 2):
            z = rng.normal(size=(40, len(features)))
            z[:, 0] += shift
            frame = pd.DataFrame(z, columns=features)
            frame.insert(0, "Metadata_Plate", plate)
            frame.insert(1, "Metadata_Well", f"A{w + 1:02d}")
            frame.insert(2, "Metadata_compound", cid)
            frame.insert(3, "Metadata_dose_um", dose)
            rows.append(frame)
    fps = {cid: np.packbits(rng.random(2048) < 0.02) for cid in ("A", "B")}
    return pd.concat(rows, ignore_index=True), fps


@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory):
    """A real 2-member FeatureAssayEnsemble trained for a few steps (seconds)."""
    from models.config import FeatureAssayConfig
    from models.ensemble import train_ensemble
    from models.training_data import FeatureTrainingSet

    cells, fp_lookup = _tiny_cells()
    config = FeatureAssayConfig(n_members=2, n_steps=20, hidden_dim=32, n_blocks=1, cond_dim=16, fp_hidden_dim=16,
                                batch_size=64, warmup_steps=2, log_every=10, write_loss_plot=False,
                                n_control_cells=64, checkpoint_every=1000, n_sample_steps=2)
    assay = train_ensemble(FeatureTrainingSet.from_dataframe(cells, fp_lookup), config,
                           tmp_path_factory.mktemp("tiny_model"))
    rng = np.random.default_rng(3)
    fps = np.concatenate([np.stack([fp_lookup["A"], fp_lookup["B"]]), random_fingerprints(6, rng)])
    return assay, fps


def test_real_feature_ensemble_cached_equals_direct(tmp_path, tiny_ensemble):
    assay, fps = tiny_ensemble
    keys = inchikeys(8)
    cache = PredictionCache(tmp_path / "cache")
    first = predict_with_cache(assay, fps[:5], keys[:5], 10.0, cache, seed=7, n_cells=16, batch_size=3)
    full = predict_with_cache(assay, fps, keys, 10.0, cache, seed=7, n_cells=16, batch_size=3)
    assert (full.n_cached, full.n_simulated) == (5, 3)
    direct = direct_activity(assay, fps, 10.0, seed=7, n_cells=16)
    np.testing.assert_allclose(full.activity, direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(full.activity[:, :5], first.activity)
    assert PredictionCache(tmp_path / "cache").n_entries(assay.version, SimulationSettings(n_cells=16, seed=7)) == 8


@pytest.mark.slow
def test_ray_shards_match_local(tmp_path, tiny_ensemble, ray_cluster):
    assay, fps = tiny_ensemble
    keys = inchikeys(8)
    out = predict_with_cache(assay, fps, keys, 10.0, PredictionCache(tmp_path), seed=7, n_cells=16,
                             executor="ray", n_shards=2)
    assert out.n_simulated == 8
    np.testing.assert_allclose(out.activity, direct_activity(assay, fps, 10.0, seed=7, n_cells=16),
                               rtol=1e-4, atol=1e-5)


def test_a_failed_ray_shard_keeps_the_finished_shards_cached(tmp_path, library, monkeypatch):
    fps, keys = library

    def one_shard_fails(fn, kwargs_list, *, address=None, num_cpus_per_task=1, num_gpus_per_task=0.0):
        yield 0, fn(**kwargs_list[0])
        yield 2, fn(**kwargs_list[2])
        raise RuntimeError("worker died")  # shard 1, raised after the others finished

    monkeypatch.setattr(prediction_cache, "iter_tasks", one_shard_fails)
    with pytest.raises(RuntimeError, match="worker died"):
        predict_with_cache(FakeAssay(), fps[:30], keys[:30], 10.0, PredictionCache(tmp_path), seed=0,
                           executor="ray", n_shards=3)
    assert PredictionCache(tmp_path).n_entries("fake-v1") == 20


class NaNAssay(FakeAssay):
    """FakeAssay whose prediction for the compounds at ``bad_rows`` (of each call) is NaN."""

    def __init__(self, bad_rows, **kwargs):
        super().__init__(**kwargs)
        self.bad_rows = bad_rows

    def predict_profiles(self, fingerprints, dose_um, **kwargs):
        profiles = super().predict_profiles(fingerprints, dose_um, **kwargs)
        profiles[:, self.bad_rows] = np.nan
        return profiles


@pytest.mark.parametrize("use_cache", [True, False])
def test_non_finite_predictions_are_refused_naming_the_compound(tmp_path, library, use_cache):
    fps, keys = library
    cache = PredictionCache(tmp_path) if use_cache else None
    with pytest.raises(ValueError, match=rf"fake-v1 .*1 compound\(s\): {keys[3]} at 10 uM"):
        predict_with_cache(NaNAssay([3]), fps[:10], keys[:10], 10.0, cache, seed=0)
    if use_cache:  # the 9 finite predictions are kept
        assert PredictionCache(tmp_path).n_entries("fake-v1") == 9
        lookup = PredictionCache(tmp_path).get("fake-v1", keys[:10], np.full(10, 10.0), SimulationSettings())
        assert lookup.found.tolist() == [i != 3 for i in range(10)]


def test_seeds_key_the_cache_as_plain_integers(tmp_path, library):
    fps, keys = library
    assert SimulationSettings(seed=np.int64(5)).tag() == SimulationSettings(seed=5).tag()
    assert SimulationSettings(seed=5.0, n_cells=np.int32(32)).tag() == SimulationSettings(seed=5).tag()
    assay = FakeAssay()
    predict_with_cache(assay, fps[:10], keys[:10], 10.0, PredictionCache(tmp_path), seed=np.int64(5))
    predict_with_cache(assay, fps[:10], keys[:10], 10.0, PredictionCache(tmp_path), seed=5.0)
    assert assay.n_predicted == 10
    assert SimulationSettings(plate_id=27821).plate_id == "27821"  # a barcode written as a number
    with pytest.raises(ValueError, match="plate_id"):
        SimulationSettings(plate_id=[7])


def test_stale_temporary_shards_are_removed_fresh_ones_kept(tmp_path, library):
    import os
    import time

    fps, keys = library
    cache = PredictionCache(tmp_path)
    predict_with_cache(FakeAssay(), fps[:5], keys[:5], 10.0, cache, seed=0)
    folder = cache.folder("fake-v1", SimulationSettings())
    stale, fresh = folder / ".shard-a.parquet.tmp-1-aa", folder / ".shard-b.parquet.tmp-2-bb"
    stale.write_bytes(b"half a shard")
    fresh.write_bytes(b"being written")
    old = time.time() - 2 * prediction_cache.STALE_TEMPORARY_S
    os.utime(stale, (old, old))
    lookup = PredictionCache(tmp_path).get("fake-v1", keys[:5], np.full(5, 10.0), SimulationSettings())
    assert lookup.found.all() and not stale.exists() and fresh.exists()


def test_a_nan_shard_does_not_cost_the_healthy_shards(tmp_path, library, monkeypatch):
    fps, keys = library

    def in_order(fn, kwargs_list, *, address=None, num_cpus_per_task=1, num_gpus_per_task=0.0):
        for i, kwargs in enumerate(kwargs_list):
            yield i, fn(**kwargs)

    monkeypatch.setattr(prediction_cache, "iter_tasks", in_order)
    with pytest.raises(ValueError, match="non-finite"):  # the first compound of each shard is NaN
        predict_with_cache(NaNAssay([0]), fps[:30], keys[:30], 10.0, PredictionCache(tmp_path), seed=0,
                           executor="ray", n_shards=3)
    assert PredictionCache(tmp_path).n_entries("fake-v1") == 27
