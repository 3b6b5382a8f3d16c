import json

import numpy as np
import pytest
import torch

from models.config import FeatureAssayConfig, config_hash
from models.ensemble import FeatureAssayEnsemble, load_ensemble, train_ensemble
from models.training_data import FeatureTrainingSet
from models.virtual_assay import VirtualAssay
from test_training_data import random_fingerprint, synthetic_cells

TINY = dict(hidden_dim=48, n_blocks=2, cond_dim=32, fp_hidden_dim=32, batch_size=128, learning_rate=3e-3,
            warmup_steps=10, log_every=20, write_loss_plot=False, n_control_cells=128, checkpoint_every=1000)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    cells, fps = synthetic_cells({"A": 3.0, "B": 0.0, "C": -2.0}, cells_per_well=50, seed=1)
    return FeatureTrainingSet.from_dataframe(cells, fps), fps


@pytest.fixture(scope="module")
def ensemble(data, tmp_path_factory):
    train_set, _ = data
    config = FeatureAssayConfig(n_members=3, n_steps=200, **TINY)
    return train_ensemble(train_set, config, tmp_path_factory.mktemp("ens"), executor="local")


def _query(fps):
    rng = np.random.default_rng(5)
    fp = np.stack([fps["A"], fps["B"], fps["C"], random_fingerprint(rng)])  # last one unseen
    return fp, np.array([10.0, 10.0, 10.0, 3.0])


def test_ensemble_implements_protocol_and_predicts_k_profiles(ensemble, data):
    train_set, fps = data
    assert isinstance(ensemble, VirtualAssay)
    assert ensemble.n_members == 3 and ensemble.feature_names == list(train_set.feature_names)
    fp, dose = _query(fps)
    profiles = ensemble.predict_profiles(fp, dose, n_cells=64, seed=0)
    assert profiles.shape == (3, 4, 4) and profiles.dtype == np.float32 and np.isfinite(profiles).all()
    # every member learned A (+3) and B (0); members differ (seeds + bootstrap)
    assert np.all(profiles[:, 0, 0] > 2.3) and np.all(np.abs(profiles[:, 1, 0]) < 0.7)
    assert not np.allclose(profiles[0], profiles[1]) and not np.allclose(profiles[1], profiles[2])
    # C (-2) is missing from some members' bootstrap samples: those extrapolate, the ensemble
    # disagrees on C far more than on A or B (epistemic uncertainty), and a member that saw it is right
    spread = profiles[:, :3, 0].max(axis=0) - profiles[:, :3, 0].min(axis=0)
    assert spread[2] > 1.5 and spread[2] > 3 * max(spread[0], spread[1])
    assert profiles[:, 2, 0].min() < -1.5
    cells = ensemble.predict_cells(fps["A"], 10.0, n_cells=8, seed=0)
    assert cells.shape == (3, 8, 4)
    assert ensemble.predict_cells(None, 0.0, n_cells=8).shape == (3, 8, 4)


def test_manifest_version_and_load_round_trip(ensemble, data):
    train_set, fps = data
    manifest = json.loads((ensemble.model_dir / "ensemble.json").read_text())
    assert manifest["version"] == ensemble.version == config_hash(ensemble.config, train_set.data_fingerprint)
    assert manifest["data_fingerprint"] == train_set.data_fingerprint
    assert [m["seed"] for m in manifest["members"]] == [0, 1, 2]
    assert manifest["feature_names"] == list(train_set.feature_names)
    loaded = load_ensemble(ensemble.model_dir)
    assert isinstance(loaded, FeatureAssayEnsemble) and loaded.version == ensemble.version
    fp, dose = _query(fps)
    assert np.array_equal(loaded.predict_profiles(fp, dose, seed=2), ensemble.predict_profiles(fp, dose, seed=2))
    # retraining with the same config and data reuses the finished members (same version)
    again = train_ensemble(train_set, ensemble.config, ensemble.model_dir)
    assert again.version == ensemble.version
    assert np.array_equal(again.predict_profiles(fp, dose, seed=2), ensemble.predict_profiles(fp, dose, seed=2))


def test_ensemble_narrow_errors(ensemble, data, tmp_path):
    _, fps = data
    fp, dose = _query(fps)
    with pytest.raises(ValueError, match="N x 256"):
        ensemble.predict_profiles(fp.reshape(8, 128), dose)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        ensemble.predict_profiles(fp, dose[:3])
    with pytest.raises(ValueError, match="executor"):
        train_ensemble(data[0], ensemble.config, tmp_path, executor="dask")
    with pytest.raises(FileNotFoundError, match="ensemble.json"):
        load_ensemble(tmp_path)


@pytest.mark.slow
def test_train_ensemble_through_ray(ray_cluster, data, tmp_path):
    train_set, fps = data
    config = FeatureAssayConfig(n_members=2, n_steps=20, **TINY)
    ens = train_ensemble(train_set, config, tmp_path / "ray_ens", executor="ray")
    assert ens.n_members == 2
    manifest = json.loads((tmp_path / "ray_ens" / "ensemble.json").read_text())
    assert manifest["executor"] == "ray" and len(manifest["members"]) == 2
    # the same members trained in-process are bit-identical (randomness comes from the seeds)
    local = train_ensemble(train_set, config, tmp_path / "local_ens", executor="local")
    fp, dose = _query(fps)
    assert np.allclose(ens.predict_profiles(fp, dose, n_cells=8), local.predict_profiles(fp, dose, n_cells=8),
                       atol=1e-4)


def test_out_of_bag_matches_what_each_member_learned(ensemble, data):
    """The recorded bag is the one trained on: members that left C out cannot predict its -2 shift."""
    _, fps = data
    out_of_bag = ensemble.out_of_bag(["A", "B", "C", "never-measured"])
    assert out_of_bag.shape == (3, 4) and out_of_bag[:, 3].all()
    assert out_of_bag[:, 2].any() and not out_of_bag[:, 2].all()  # (the spread test above relies on it)
    fp, dose = _query(fps)
    c_shift = ensemble.predict_profiles(fp, dose, n_cells=64, seed=0)[:, 2, 0]
    assert (c_shift[~out_of_bag[:, 2]] < -1.5).all() and (c_shift[out_of_bag[:, 2]] > -1.0).all()
    member = load_ensemble(ensemble.model_dir).members[0]
    assert member.bootstrap and sorted(member.compound_ids) == ["A", "B", "C"]
    unrecorded = type(member)(**{**member.__dict__, "compound_ids": None})  # saved before bags were recorded
    assert unrecorded.in_bag(["A", "zzz"]).all()
