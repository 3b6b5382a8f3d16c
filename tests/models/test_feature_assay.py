import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from models import feature_assay
from models.config import FeatureAssayConfig
from models.feature_assay import FeatureAssayMember, FeatureVelocityNet, train_member
from models.training_data import FeatureTrainingSet
from test_training_data import FEATURES, synthetic_cells

TINY = dict(hidden_dim=64, n_blocks=2, cond_dim=32, fp_hidden_dim=32, batch_size=128, learning_rate=3e-3,
            warmup_steps=20, log_every=25, write_loss_plot=False, n_control_cells=256)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    cells, fps = synthetic_cells({"A": 3.0, "B": 0.0}, cells_per_well=100, seed=0)
    return FeatureTrainingSet.from_dataframe(cells, fps), fps


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    train_set, fps = data
    config = FeatureAssayConfig(n_steps=400, checkpoint_every=1000, **TINY)
    out = train_member(train_set, config, seed=0, out_dir=tmp_path_factory.mktemp("member"), bootstrap=False)
    return FeatureAssayMember.load(out), fps


def _ab(fps):
    return np.stack([fps["A"], fps["B"]]), np.array([10.0, 10.0])


def test_member_learns_a_shift_and_a_null_compound(trained):
    member, fps = trained
    fp, dose = _ab(fps)
    profiles = member.predict_profiles(fp, dose, n_cells=256, seed=0)
    assert profiles.shape == (2, 4) and profiles.dtype == np.float32
    assert profiles[0, 0] == pytest.approx(3.0, abs=0.6)  # A: +3 control sd on feature 0
    assert np.all(np.abs(profiles[0, 1:]) < 0.5)
    assert np.all(np.abs(profiles[1]) < 0.5)  # B: inactive
    # the sampled cells are in raw units around the control distribution
    ctrl = member.predict_cells(None, 0.0, n_cells=512, seed=1)
    assert ctrl.shape == (512, 4)
    assert np.allclose(ctrl.mean(0), [100, 500, 2, 0.5], rtol=0.05, atol=0.05)
    cells_a = member.predict_cells(fps["A"], 10.0, n_cells=512, seed=1)
    assert (cells_a[:, 0].mean() - ctrl[:, 0].mean()) / ctrl[:, 0].std() == pytest.approx(3.0, abs=0.6)


def test_predictions_are_seeded_and_independent_of_batching(trained):
    member, fps = trained
    fp, dose = _ab(fps)
    p1 = member.predict_profiles(fp, dose, n_cells=16, seed=3)
    assert np.array_equal(p1, member.predict_profiles(fp, dose, n_cells=16, seed=3))
    assert not np.allclose(p1, member.predict_profiles(fp, dose, n_cells=16, seed=4))
    assert np.allclose(p1, member.predict_profiles(fp, dose, n_cells=16, seed=3, batch_size=1), atol=1e-5)
    # one compound alone gives the same profile as in a list (common random numbers)
    assert np.allclose(p1[1], member.predict_profiles(fp[1:], dose[1:], n_cells=16, seed=3)[0], atol=1e-5)


def test_save_load_round_trip_and_files(trained):
    member, fps = trained
    again = FeatureAssayMember.load(member.member_dir)
    fp, dose = _ab(fps)
    assert np.array_equal(member.predict_profiles(fp, dose, seed=5), again.predict_profiles(fp, dose, seed=5))
    d = member.member_dir
    for name in ("member.pt", "config.json", "normalization.json", "data_fingerprint", "training_log.csv"):
        assert (d / name).is_file(), name
    assert not (d / "checkpoint.pt").exists()
    meta = json.loads((d / "config.json").read_text())
    assert meta["data_fingerprint"] == (d / "data_fingerprint").read_text().strip() == member.data_fingerprint
    assert meta["config"]["n_steps"] == 400 and meta["seed"] == 0 and meta["bootstrap"] is False
    log = pd.read_csv(d / "training_log.csv")
    assert list(log["step"])[-1] == 400 and log["loss"].iloc[-4:].mean() < log["loss"].iloc[:2].mean()


def test_unseen_plate_uses_unknown_token(trained):
    member, fps = trained
    fp, dose = _ab(fps)
    unknown = member.predict_profiles(fp, dose, n_cells=256, plate_id="NEVER_SEEN")
    assert np.array_equal(unknown, member.predict_profiles(fp, dose, n_cells=256, plate_id=None))
    assert unknown[0, 0] == pytest.approx(3.0, abs=0.8) and np.all(np.abs(unknown[1]) < 0.6)
    known = member.predict_profiles(fp, dose, n_cells=256, plate_id="P1")
    assert np.isfinite(known).all() and not np.array_equal(known, unknown)


def test_narrow_errors_at_prediction(trained):
    member, fps = trained
    fp, dose = _ab(fps)
    with pytest.raises(ValueError, match="looks unpacked"):
        member.predict_profiles(np.unpackbits(fp, axis=1), dose)
    with pytest.raises(ValueError, match=r"N x 256"):
        member.predict_profiles(fp[:, :128], dose)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        member.predict_profiles(fp, dose[:1])
    with pytest.raises(ValueError, match="entry 1"):
        member.predict_profiles(fp, np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="n_cells"):
        member.predict_profiles(fp, dose, n_cells=1)
    with pytest.raises(ValueError, match="b x F or b x n x F"):
        member.net(torch.zeros(2, 5), torch.zeros(2), torch.zeros(2, 32))


def test_resume_after_interruption_matches_uninterrupted_run(data, tmp_path, monkeypatch):
    train_set, _ = data
    config = FeatureAssayConfig(n_steps=30, checkpoint_every=10, **TINY)
    straight = train_member(train_set, config, seed=7, out_dir=tmp_path / "straight", bootstrap=True)

    real_save = feature_assay._save_checkpoint

    def crash_after_step_20(path, state):
        real_save(path, state)
        if state.get("step") == 20:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(feature_assay, "_save_checkpoint", crash_after_step_20)
    with pytest.raises(KeyboardInterrupt):
        train_member(train_set, config, seed=7, out_dir=tmp_path / "resumed", bootstrap=True)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "resumed" / "member.pt").exists()
    monkeypatch.setattr(feature_assay, "_save_checkpoint", real_save)
    resumed = train_member(train_set, config, seed=7, out_dir=tmp_path / "resumed", bootstrap=True)

    a = torch.load(straight / "member.pt", weights_only=True)["model"]
    b = torch.load(resumed / "member.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = pd.read_csv(straight / "training_log.csv")
    log_b = pd.read_csv(resumed / "training_log.csv")
    assert np.allclose(log_a["loss"], log_b["loss"]) and list(log_b["step"]) == [25, 30]

    # a finished member is reused; another seed in the same directory is refused
    mtime = (resumed / "member.pt").stat().st_mtime_ns
    train_member(train_set, config, seed=7, out_dir=resumed, bootstrap=True)
    assert (resumed / "member.pt").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="different seed"):
        train_member(train_set, config, seed=8, out_dir=resumed, bootstrap=True)
    # a different seed and bootstrap gives different weights
    other = train_member(train_set, config, seed=8, out_dir=tmp_path / "other", bootstrap=True)
    c = torch.load(other / "member.pt", weights_only=True)["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_network_shapes_grouped_cells_and_zero_init():
    config = FeatureAssayConfig(**TINY)
    net = FeatureVelocityNet(n_features=5, n_plates=2, config=config)
    cond = torch.randn(3, 32)
    t = torch.rand(3)
    x_grouped = torch.randn(3, 7, 5)
    v = net(x_grouped, t, cond)
    assert v.shape == (3, 7, 5)
    assert torch.count_nonzero(v) == 0  # adaLN-Zero output layer starts at zero velocity
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    v = net(x_grouped, t, cond)
    # grouped b x n x F equals the flat b*n x F call with repeated conditions
    flat = net(x_grouped.reshape(21, 5), t.repeat_interleave(7), cond.repeat_interleave(7, dim=0))
    assert torch.allclose(v.reshape(21, 5), flat, atol=1e-5)


def test_sampling_options_heun_guidance_bf16(trained):
    member, fps = trained
    fp, dose = _ab(fps)
    base = member.predict_profiles(fp, dose, n_cells=256, seed=0)
    variants = {}
    for name, change in {"heun": {"sampler": "heun"}, "cfg": {"guidance_scale": 2.0},
                         "bf16": {"sample_bf16": True}}.items():
        other = FeatureAssayMember(**{**member.__dict__, "config": dataclasses.replace(member.config, **change)})
        variants[name] = other.predict_profiles(fp, dose, n_cells=256, seed=0)
    # Heun and Euler integrate the same ODE (compared where both have converged); bf16 only perturbs rounding
    fine = {"n_sample_steps": 32}
    euler_fine, heun_fine = (FeatureAssayMember(**{**member.__dict__, "config": dataclasses.replace(
        member.config, **fine, **extra)}).predict_profiles(fp, dose, n_cells=256, seed=0)
        for extra in ({}, {"sampler": "heun"}))
    assert np.allclose(heun_fine, euler_fine, atol=0.3) and not np.array_equal(variants["heun"], base)
    assert np.allclose(variants["bf16"], base, atol=0.1)
    # guidance pushes A further from the unconditional (mostly control-like) distribution
    assert variants["cfg"][0, 0] > base[0, 0] + 0.3 and np.all(np.abs(variants["cfg"][1]) < 0.7)


def test_control_fraction_fixes_the_share_of_control_rows_per_batch():
    compound_index = torch.tensor([-1] * 90 + [0] * 6 + [1] * 4)  # a control-dominated table
    gen = torch.Generator().manual_seed(0)
    config = FeatureAssayConfig(batch_size=40, control_fraction=0.25)
    rows = torch.stack([feature_assay._row_sampler(compound_index, config, gen)() for _ in range(50)])
    assert rows.shape == (50, 40)
    assert torch.all((compound_index[rows] < 0).sum(dim=1) == 10)
    uniform = feature_assay._row_sampler(compound_index, dataclasses.replace(config, control_fraction=None), gen)
    assert (compound_index[uniform()] < 0).float().mean() > 0.5  # uniform draws follow the table
    with pytest.raises(ValueError, match="control_fraction"):
        FeatureAssayConfig(control_fraction=1.0)


def test_asinh_feature_space_round_trips_and_is_validated():
    z = torch.tensor([[-30.0, -1.0, 0.0, 0.5, 25.0]])
    asinh = FeatureAssayConfig(feature_transform="asinh")
    assert torch.allclose(feature_assay.from_model_space(feature_assay.to_model_space(z, asinh), asinh), z, rtol=1e-5)
    assert feature_assay.to_model_space(z, asinh)[0, -1] == pytest.approx(np.arcsinh(25.0))
    plain = FeatureAssayConfig(feature_transform="none")
    assert torch.equal(feature_assay.to_model_space(z, plain), z)
    with pytest.raises(ValueError, match="feature_transform"):
        FeatureAssayConfig(feature_transform="log")


def test_asinh_member_reaches_a_far_subpopulation(tmp_path):
    """Compound T makes 30% of cells 20 control sd brighter on feature 0 (apoptotic-like outliers):
    the mean shift, 6 sd, is what the profile must show."""
    cells, fps = synthetic_cells({"T": 0.0, "B": 0.0}, cells_per_well=100, seed=1)
    rng = np.random.default_rng(2)
    is_t = (cells["Metadata_compound"] == "T").to_numpy()
    outlier = is_t & (rng.random(len(cells)) < 0.3)
    cells.loc[outlier, FEATURES[0]] += 20 * 10.0  # feature 0: control sd 10
    train_set = FeatureTrainingSet.from_dataframe(cells, fps)
    config = FeatureAssayConfig(n_steps=600, checkpoint_every=1000, **TINY)
    member = FeatureAssayMember.load(train_member(train_set, config, seed=0, out_dir=tmp_path, bootstrap=False))
    profiles = member.predict_profiles(np.stack([fps["T"], fps["B"]]), np.array([10.0, 10.0]), n_cells=512, seed=0)
    real = train_set.normalized_x()[train_set.compound_index == train_set.compound_ids.index("T"), 0].mean()
    assert real == pytest.approx(6.0, abs=1.0)
    assert profiles[0, 0] == pytest.approx(real, rel=0.35)
    assert abs(profiles[1, 0]) < 0.5


def test_logging_cadence_is_no_part_of_a_members_identity(tmp_path):
    """A member trained (or checkpointed) with one logging / checkpoint cadence is resumed and reused
    with another (the version id ignores them too), but not with another training setting."""
    import dataclasses

    import pytest

    from models.config import FeatureAssayConfig
    from models.feature_assay import _check_identity

    config = FeatureAssayConfig()
    stored = {"config": config.to_dict(), "seed": 0, "bootstrap": True, "data_fingerprint": "d"}
    cadence = dataclasses.replace(config, log_every=1, checkpoint_every=7, write_loss_plot=False)
    _check_identity(tmp_path, stored, {**stored, "config": cadence.to_dict()})
    with pytest.raises(ValueError, match="different config"):
        _check_identity(tmp_path, stored, {**stored, "config": dataclasses.replace(config, n_steps=7).to_dict()})
