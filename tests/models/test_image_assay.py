import json
import logging
from dataclasses import replace

import numpy as np
import torch
import pandas as pd
import pytest
from typer.testing import CliRunner

from lab_io.crops import CropSet, compound_smiles, load_crops, write_crops
from models.image_assay import (
    ANALOGUE_TANIMOTO, MAX_SHOT_NOISE_GAIN, ImageAssay, ImageAssayConfig, PlateControls, _comparable, applicability,
    member_seed, resolve_compound,
    select_training_crops, shot_noise_gain, train_image_assay,
)
from models.image_flow import ChannelNorm, bootstrap_compound_weights
from models.image_dit import DiTConfig
from models.virtual_assay import VirtualAssay

from image_helpers import tiny_config, tiny_crops


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("assay")
    crops = tiny_crops()
    assay = train_image_assay(crops, out, tiny_config(exclude_plates=("P2",)))
    return out, crops, assay


def test_member_folders_hold_everything(trained):
    out, _, assay = trained
    for k in range(2):
        files = {p.name for p in (out / f"member_{k:03d}").iterdir()}
        assert {"checkpoint.pt", "config.json", "normalisation.json", "data_fingerprint.json", "model.pt"} <= files
    seeds = {json.loads((out / f"member_{k:03d}" / "config.json").read_text())["seed"] for k in range(2)}
    assert len(seeds) == 2
    assert (out / "autoencoder" / "model.pt").is_file() and (out / "autoencoder" / "stage1.pt").is_file()
    meta = json.loads((out / "assay.json").read_text())
    assert meta["train_plates"] == ["P1"]
    assert meta["config"]["flow"]["dit"]["dose_range_um"] == [5.0, 50.0]  # P1's treated doses: the dose gate's range
    assert all(net.gate_head is not None for net in assay.members)
    assert isinstance(assay, VirtualAssay)


def test_generation_reproducible_and_unseen_plate(trained):
    _, crops, assay = trained
    fp = assay.training_fingerprint("cyclohexamide")
    p2_ctrl = crops.subset(((crops.metadata["plate"] == "P2") & crops.is_control).to_numpy())
    z = assay.encode_controls(p2_ctrl.images)  # unseen plate, conditioned on its own DMSO cells
    a = assay.generate(0, fp, 15.0, z, 5, seed=3)
    b = assay.generate(0, fp, 15.0, z, 5, seed=3)
    c = assay.generate(0, fp, 15.0, z, 5, seed=4)
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.uint16
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert assay.generate_ensemble(fp, 15.0, z, 5, seed=0).shape == (5, 16, 16, 3)
    with pytest.raises(KeyError, match="P2"):
        assay.plate_controls("P2")


def test_predict_profiles_protocol(trained):
    _, _, assay = trained
    fps = np.stack([assay.training_fingerprint("cyclohexamide")] * 2)
    p = assay.predict_profiles(fps, np.array([5.0, 50.0]), n_cells=4, seed=1, plate_id="P1", batch_size=1)
    q = assay.predict_profiles(fps, np.array([5.0, 50.0]), n_cells=4, seed=1, plate_id="P1", batch_size=2)
    assert p.shape == (2, 2, len(assay.feature_names)) and p.dtype == np.float32
    assert np.array_equal(p, q) and np.isfinite(p).all()
    # a compound's profile does not depend on the other rows of the call (as the prediction cache needs)
    alone = assay.predict_profiles(fps[1:], np.array([50.0]), n_cells=4, seed=1, plate_id="P1")
    assert np.array_equal(alone[:, 0], p[:, 1])
    cells = assay.predict_cells(fps[0], 5.0, n_cells=3, seed=0, plate_id="P1")
    assert cells.shape == (2, 3, 16, 16, 3) and cells.dtype == np.float32
    with pytest.raises(ValueError, match="packed"):
        assay.predict_profiles(np.zeros((2, 2048), np.uint8), np.ones(2))
    with pytest.raises(ValueError, match="> 0"):
        assay.predict_profiles(fps, np.array([5.0, -1.0]))


def test_out_of_bag_follows_each_members_bootstrap(trained):
    out, _, assay = trained
    compounds = assay.meta["compounds"]
    oob = assay.out_of_bag([*compounds, "campaign-compound"])  # a compound it never trained on
    assert oob.shape == (2, len(compounds) + 1) and oob[:, -1].all()
    for row, k in zip(oob, assay.member_indices):
        drawn = bootstrap_compound_weights(len(compounds), member_seed(assay.config.seed, k), assay.config.flow.bootstrap) > 0
        assert (row[:-1] == ~drawn).all()
    assert ImageAssay.load(out, members=[1]).out_of_bag(compounds).tolist() == [oob[1, :-1].tolist()]


def test_resume_skips_trained_members_and_rejects_other_config(trained):
    out, crops, assay = trained
    before = (out / "member_000" / "model.pt").stat().st_mtime_ns
    again = train_image_assay(crops, out, tiny_config(exclude_plates=("P2",)))
    assert again.version == assay.version
    assert (out / "member_000" / "model.pt").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="different configuration.*exclude_plates=.*P2.*P1"):
        train_image_assay(crops, out, tiny_config(exclude_plates=("P1",)))
    cfg = tiny_config(exclude_plates=("P2",))
    no_conv = replace(cfg, flow=replace(cfg.flow, dit=replace(cfg.flow.dit, final_conv=False)))
    with pytest.raises(ValueError, match=r"flow\.dit\.final_conv=True/False"):
        train_image_assay(crops, out, no_conv)


def test_control_mode_trains_and_samples(tmp_path):
    crops = tiny_crops()
    cfg = tiny_config(n_members=1)
    assay = train_image_assay(crops, tmp_path, replace(cfg, flow=replace(cfg.flow, mode="control")))
    out = assay.generate(0, assay.training_fingerprint("cyclohexamide"), 15.0, assay.plate_controls("P2"), 3, seed=0)
    assert out.shape == (3, 16, 16, 3)
    with pytest.raises(ValueError, match="control-mode assay needs"):
        assay.generate(0, None, 1.0, None, 3, seed=0)
    fp, ctrl = assay.training_fingerprint("cyclohexamide"), assay.plate_controls("P2")
    z_clean, idx_clean = assay.generate_latents(0, fp, 15.0, ctrl, 4, seed=1)
    assay.config = replace(assay.config, flow=replace(assay.config.flow, source_noise=0.5))
    z_a, idx_a = assay.generate_latents(0, fp, 15.0, ctrl, 4, seed=1)
    z_b, _ = assay.generate_latents(0, fp, 15.0, ctrl, 4, seed=1)
    # same source cells, noisier start, reproducible from the seed
    assert torch.equal(idx_a, idx_clean) and torch.equal(z_a, z_b) and not torch.allclose(z_a, z_clean)
    z_dmso_noisy, _ = assay.generate_latents(0, None, 1.0, ctrl, 4, seed=1)
    assay.config = replace(assay.config, flow=replace(assay.config.flow, source_noise_on="treated"))
    z_dmso, _ = assay.generate_latents(0, None, 1.0, ctrl, 4, seed=1)
    assert torch.equal(assay.generate_latents(0, fp, 15.0, ctrl, 4, seed=1)[0], z_a)  # treated: noisy as before
    assay.config = replace(assay.config, flow=replace(assay.config.flow, source_noise=0.0))
    # DMSO: no noise with source_noise_on="treated"
    assert torch.equal(z_dmso, assay.generate_latents(0, None, 1.0, ctrl, 4, seed=1)[0])
    assert not torch.allclose(z_dmso, z_dmso_noisy)
    # the null token trained on label-dropped compound rows, so unconditional sampling is noisy too
    assay.config = replace(assay.config, flow=replace(assay.config.flow, source_noise=0.5))
    z_null_noisy, _ = assay.generate_latents(0, None, 1.0, ctrl, 4, seed=1, unconditional=True)
    assay.config = replace(assay.config, flow=replace(assay.config.flow, source_noise=0.0))
    assert not torch.allclose(z_null_noisy, assay.generate_latents(0, None, 1.0, ctrl, 4, seed=1, unconditional=True)[0])
    pooled = assay.plate_controls(None)  # unknown plate in control mode: all training plates' controls
    assert len(pooled) == len(assay.plate_controls("P1")) + len(assay.plate_controls("P2"))
    assert pooled.images.shape[1:] == (16, 16, 3)


def test_ensemble_splits_one_draw_of_source_cells(tmp_path):
    """K members in control mode share one draw of n distinct source control cells (independent
    draws would repeat sources in the pooled set); one member keeps its own draw."""
    from models.image_assay import derive_seed
    from models.image_flow import source_indices

    crops = tiny_crops()
    cfg = tiny_config(n_members=1)
    train_image_assay(crops, tmp_path, replace(cfg, flow=replace(cfg.flow, mode="control")))
    single = ImageAssay.load(tmp_path)
    fp, ctrl = single.training_fingerprint("cyclohexamide"), single.plate_controls("P2")
    n = min(6, len(ctrl))
    assert np.array_equal(single.generate_ensemble(fp, 15.0, ctrl, n, seed=2),
                          single.generate(0, fp, 15.0, ctrl, n, derive_seed(2, 0)))
    triple = ImageAssay.load(tmp_path, members=[0, 0, 0])
    used = []  # the source indices each member's call returned

    def spy(*args, **kwargs):
        z_1, idx = ImageAssay.generate_latents(triple, *args, **kwargs)
        used.append(idx)
        return z_1, idx

    triple.generate_latents = spy
    pooled = triple.generate_ensemble(fp, 15.0, ctrl, n, seed=2)
    idx = torch.cat(used)
    assert pooled.shape[0] == n and [len(u) for u in used] == [n // 3 + (k < n % 3) for k in range(3)]
    assert torch.equal(idx, source_indices(n, len(ctrl), torch.Generator().manual_seed(derive_seed(2, 0))))
    assert len(set(idx.tolist())) == n  # distinct sources, as one member would use
    with pytest.raises(ValueError, match="source_idx must hold 2 indices"):
        single.generate_latents(0, fp, 15.0, ctrl, 2, seed=0, source_idx=torch.tensor([0, len(ctrl)]))


def test_shot_noise_gain_closed_form():
    norm = ChannelNorm(lo=(0.0,), hi=(2.0,))  # raw = x + 1
    raw_1, raw_0 = torch.tensor([15.0, 3.0, 99.0, -5.0]), torch.tensor([3.0, 3.0, 0.0, 3.0])
    gain = shot_noise_gain((raw_1 - 1).view(1, 1, 1, 4), (raw_0 - 1).view(1, 1, 1, 4), norm).flatten()
    # sqrt((r1 + 1) / (r0 + 1)): 4x brighter -> 2; unchanged -> 1; clipped at the maximum; negative raw -> 0
    assert torch.allclose(gain, torch.tensor([2.0, 1.0, MAX_SHOT_NOISE_GAIN, 0.5]))


def test_plate_pixel_floor_is_a_cached_percentile():
    images = np.random.default_rng(0).integers(100, 5000, (7, 8, 8, 3)).astype(np.uint16)
    controls = PlateControls(torch.zeros(7, 2, 2, 2), images)
    floor = controls.pixel_floor(2.0)
    assert floor.dtype == np.uint16
    assert np.array_equal(floor, np.percentile(images.reshape(-1, 3), 2.0, axis=0).astype(np.uint16))
    assert controls.pixel_floor(2.0) is floor
    assert PlateControls(torch.zeros(7, 2, 2, 2)).pixel_floor(2.0) is None


def test_detail_transfer_returns_an_unmoved_source_cell_above_the_plate_floor(tmp_path, monkeypatch):
    """If the flow leaves a latent where it started, detail transfer gives back the source crop
    itself (gain 1 with or without the shot-noise gain); the floor then lifts pixels below the
    plate's DMSO percentile to it and nothing else."""
    cfg = tiny_config(n_members=1, pixel_floor_percentile=None)
    assay = train_image_assay(tiny_crops(), tmp_path, replace(cfg, flow=replace(cfg.flow, mode="control")))
    controls = assay.plate_controls("P1")
    monkeypatch.setattr(assay, "generate_latents",
                        lambda member, fp, dose, ctrl, n, seed, **kw: (ctrl.z[torch.arange(n)], torch.arange(n)))
    source = controls.images[:4].astype(np.int64)
    for shot_noise in (False, True):
        assay.config = replace(assay.config, detail_shot_noise=shot_noise, pixel_floor_percentile=None)
        assert np.abs(assay.generate(0, None, 1.0, controls, 4, seed=0) - source).max() <= 1
    assay.config = replace(assay.config, pixel_floor_percentile=40.0)
    floor = controls.pixel_floor(40.0).astype(np.int64)
    lifted = assay.generate(0, None, 1.0, controls, 4, seed=0).astype(np.int64)
    assert (source < floor).any() and (lifted >= floor).all()
    assert np.abs(lifted - np.maximum(source, floor)).max() <= 1
    # reconstruct: a cell that is its plate's only control is its own detail source -> itself
    assay.config = replace(assay.config, pixel_floor_percentile=None)
    only = assay.encode_controls(controls.images[:1])
    assert np.abs(assay.reconstruct(controls.images[:1], only, seed=3).astype(np.int64) - source[:1]).max() <= 1
    many = assay.reconstruct(controls.images[:4], controls, seed=3)
    assert many.shape == (4, 16, 16, 3) and np.array_equal(many, assay.reconstruct(controls.images[:4], controls, seed=3))
    with pytest.raises(ValueError, match="control cells to decode"):
        assay.reconstruct(controls.images[:1], None, seed=0)


def test_decode_options_load_and_resume():
    cfg = tiny_config()
    assert (cfg.detail_shot_noise, cfg.pixel_floor_percentile) == (True, 0.1)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("detail_shot_noise", "pixel_floor_percentile")}
    loaded = ImageAssayConfig.from_dict(old)  # models saved before these options decode as they did
    assert (loaded.detail_shot_noise, loaded.pixel_floor_percentile) == (False, None)
    assert ImageAssayConfig.from_dict(cfg.to_dict()) == cfg
    assert _comparable(loaded) == _comparable(cfg)  # decode options never block resuming a model
    unguided = replace(cfg, flow=replace(cfg.flow, guidance_scale=1.0, n_steps=50, sampler="heun"))
    assert _comparable(unguided) == _comparable(cfg)  # nor do sampling options
    with pytest.raises(ValueError, match="pixel_floor_percentile"):
        tiny_config(pixel_floor_percentile=60.0)


def test_decoder_stage_files_resume_and_config_check(tmp_path):
    """Stage 1 is kept as stage1.pt, the finished autoencoder (stage 2 on top) is model.pt; a run
    stopped between the two redoes stage 2 to the same weights; a model without stage 2 (saved
    before it) is not resumed by a config with it, and larger budgets of it do not block resuming."""
    crops = tiny_crops()
    cfg = tiny_config(n_members=1)
    assay = train_image_assay(crops, tmp_path, cfg)
    ae_dir = tmp_path / "autoencoder"
    stage1 = torch.load(ae_dir / "stage1.pt", weights_only=True)
    final = torch.load(ae_dir / "model.pt", weights_only=True)
    assert all(torch.equal(stage1[k], final[k]) for k in stage1 if k.startswith("encoder"))
    assert any(not torch.equal(stage1[k], final[k]) for k in stage1 if k.startswith("decoder"))
    assert json.loads((ae_dir / "train_log.json").read_text())["decoder_steps"] == 3
    (ae_dir / "model.pt").unlink()  # as if stopped after stage 1
    again = train_image_assay(crops, tmp_path, cfg)
    assert again.version == assay.version
    redone = torch.load(ae_dir / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], redone[k]) for k in final)
    more = replace(cfg, autoencoder=replace(cfg.autoencoder, decoder_steps=800))
    assert _comparable(more) == _comparable(cfg)
    none = replace(cfg, autoencoder=replace(cfg.autoencoder, decoder_steps=0, decoder_noise=0.3))
    assert _comparable(none) == _comparable(replace(none, autoencoder=replace(none.autoencoder, decoder_noise=2.0)))
    with pytest.raises(ValueError, match=r"autoencoder\.decoder_steps=1/0"):
        train_image_assay(crops, tmp_path, none)


def test_select_training_crops_and_resolve_compound(trained):
    _, crops, assay = trained
    kept = select_training_crops(crops, tiny_config(exclude_doses_um=(15.0,)))
    assert 15.0 not in set(kept.metadata["concentration_um"]) and kept.is_control.sum() == crops.is_control.sum()
    assert resolve_compound(assay, "DMSO") is None
    assert np.array_equal(resolve_compound(assay, "Cyclohexamide"), assay.training_fingerprint("cyclohexamide"))
    assert resolve_compound(assay, "CCO").shape == (256,)
    with pytest.raises(ValueError, match="neither a compound"):
        resolve_compound(assay, "not-a-smiles((")


def test_nearest_training_compound_matches_rdkit_and_warns_off_analogues(trained, monkeypatch, caplog):
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    _, crops, assay = trained
    own = assay.training_fingerprint("cyclohexamide")
    assert assay.nearest_training_compound(own) == ("cyclohexamide", 1.0)
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    trained_smiles = compound_smiles(crops.metadata)["cyclohexamide"]
    for query in ("CCO", "CCC1CC(C)C(=O)C(C(O)CC2CC(=O)NC(=O)C2)C1"):  # ethanol; an ethyl analogue of cycloheximide
        name, similarity = assay.nearest_training_compound(resolve_compound(assay, query))
        expected = DataStructs.TanimotoSimilarity(generator.GetFingerprint(Chem.MolFromSmiles(query)),
                                                  generator.GetFingerprint(Chem.MolFromSmiles(trained_smiles)))
        assert name == "cyclohexamide" and similarity == pytest.approx(expected, abs=1e-6)
    with caplog.at_level(logging.WARNING, logger="models.image_assay"):
        assert applicability(assay, "cyclohexamide", own)["analogue"] and not caplog.records
        assert applicability(assay, "DMSO", None) == {}
        assert applicability(assay, "ethyl analogue", resolve_compound(assay, "CCC1CC(C)C(=O)C(C(O)CC2CC(=O)NC(=O)C2)C1"))[
            "analogue"] and not caplog.records
        ethanol = applicability(assay, "ethanol", resolve_compound(assay, "CCO"))
    assert not ethanol["analogue"] and ethanol["nearest_training_tanimoto"] < ANALOGUE_TANIMOTO
    assert len(caplog.records) == 1 and "ethanol is no analogue" in caplog.text
    monkeypatch.setattr(assay, "meta", {**assay.meta, "compounds": [], "fingerprints_packed_hex": []})
    assert assay.nearest_training_compound(own) == (None, 0.0)


def test_load_errors(tmp_path, trained):
    import shutil

    with pytest.raises(FileNotFoundError, match="assay.json"):
        ImageAssay.load(tmp_path)
    out = shutil.copytree(trained[0], tmp_path / "copy")
    member = out / "member_000" / "model.pt"
    member.write_bytes(member.read_bytes()[:100])  # an interrupted copy
    with pytest.raises(ValueError, match=r"member_000/model.pt: cannot read this image assay file .*damaged"):
        ImageAssay.load(out)
    (out / "assay.json").write_text("")
    with pytest.raises(ValueError, match=r"assay.json: cannot read this image assay file"):
        ImageAssay.load(out)
    (out / "assay.json").write_text("{}")
    with pytest.raises(ValueError, match=r"assay.json: cannot read .*no model version"):
        ImageAssay.load(out)
    (out / "assay.json").write_text((trained[0] / "assay.json").read_text())
    (out / "normalisation.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"normalisation.json: missing from the image assay folder"):
        ImageAssay.load(out)


@pytest.mark.slow
def test_cli_sample_and_evaluate(trained, tmp_path, monkeypatch, caplog):
    from loop.assay_cli import assay_app

    out, crops, _ = trained
    data = write_crops(crops, tmp_path / "crops")
    runner = CliRunner()
    res = runner.invoke(assay_app, ["sample", "--model", str(out), "--compound", "cyclohexamide", "--dose-um", "15",
                                    "--controls", str(data), "--plate", "P2", "--n", "4", "--out", str(tmp_path / "g.npz")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "g.npz") as z:
        assert z["images"].shape == (4, 16, 16, 3)
        assert (str(z["nearest_training_compound"]), float(z["nearest_training_tanimoto"])) == ("cyclohexamide", 1.0)
    assert (tmp_path / "g.png").is_file() and "no analogue" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="models.image_assay"):
        res = runner.invoke(assay_app, ["sample", "--model", str(out), "--compound", "CCO", "--dose-um", "15",
                                        "--controls", str(data), "--plate", "P2", "--n", "2", "--out",
                                        str(tmp_path / "e.npz")])
    assert res.exit_code == 0 and "CCO is no analogue of any training compound (nearest cyclohexamide" in caplog.text
    res = runner.invoke(assay_app, ["evaluate", "--model", str(out), "--data", str(data), "--plate", "P2", "--n", "4",
                                    "--min-real", "4", "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    cond = json.loads((tmp_path / "e.json").read_text())["conditions"][0]
    assert (cond["plate"], cond["dose_um"], cond["n_real"]) == ("P2", 15.0, 4)
    assert (cond["nearest_training_compound"], cond["nearest_training_tanimoto"], cond["analogue"]) == \
        ("cyclohexamide", 1.0, True)
    for name in ("model", "copy_control", "unconditional", "real_floor"):
        assert set(cond[name]) == {"fid_inception", "kid_inception", "fid_morph", "kid_morph"}
    assert "autoencoder_ceiling" not in cond
    for gap in cond["kid_difference"]["unconditional"].values():  # 4 cells: the fewest --n takes, enough for the gap
        assert set(gap) == {"model_minus_baseline", "sd", "ci95"} and np.isfinite(gap["model_minus_baseline"])
    res = runner.invoke(assay_app, ["evaluate", "--model", str(out), "--data", str(data), "--plate", "P1", "--n", "4",
                                    "--min-real", "4", "--cross-doses", "--no-inception", "--ceiling",
                                    "--json", str(tmp_path / "e1.json")])
    assert res.exit_code == 0, res.output
    conds = {c["dose_um"]: c for c in json.loads((tmp_path / "e1.json").read_text())["conditions"]}
    assert conds[5.0]["autoencoder_ceiling"]["fid_morph"] >= 0.0 and "autoencoder_ceiling" in res.output
    assert set(conds) == {5.0, 50.0} and set(conds[5.0]["model_at_dose"]) == set(conds[5.0]["real_at_dose"]) == {"50"}
    assert conds[5.0]["real_at_dose"]["50"]["fid_morph"] >= 0.0
    for base in ("unconditional", "copy_control"):
        gap = conds[5.0]["kid_difference"][base]
        assert gap["kid_inception"] is None and gap["kid_morph"]["sd"] >= 0.0
        assert gap["kid_morph"]["ci95"][0] <= gap["kid_morph"]["model_minus_baseline"] <= gap["kid_morph"]["ci95"][1]
    assert "KID model - unconditional: kid_morph" in res.output
    assert conds[5.0]["ensemble_disagreement"] >= 0.0
    assert conds[5.0]["model"]["fid_inception"] is None and conds[5.0]["model"]["fid_morph"] >= 0.0
    calls = []
    original = ImageAssay.generate_ensemble
    monkeypatch.setattr(ImageAssay, "generate_ensemble",
                        lambda self, *a, **k: calls.append((k["sampler"], k["n_steps"])) or original(self, *a, **k))
    res = runner.invoke(assay_app, ["evaluate", "--model", str(out), "--data", str(data), "--plate", "P1", "--n", "4",
                                    "--min-real", "4", "--no-inception", "--sampler", "heun", "--steps", "2",
                                    "--json", str(tmp_path / "heun.json")])
    assert res.exit_code == 0, res.output
    heun = json.loads((tmp_path / "heun.json").read_text())
    assert (heun["sampler"], heun["n_steps"]) == ("heun", 2)
    assert len(calls) == 3 and set(calls) == {("heun", 2)}  # unconditional, then the two doses
    monkeypatch.undo()
    res = runner.invoke(assay_app, ["evaluate", "--model", str(out), "--data", str(data), "--sampler", "rk4",
                                    "--json", str(tmp_path / "rk4.json")])
    assert res.exit_code == 1 and "sampler must be" in res.output and not (tmp_path / "rk4.json").exists()
    res = runner.invoke(assay_app, ["sample", "--model", str(out), "--compound", "cyclohexamide", "--dose-um", "15",
                                    "--controls", "NOPE", "--n", "2", "--out", str(tmp_path / "x.npz")])
    assert res.exit_code == 1 and "NOPE" in res.output


def test_resolve_device(monkeypatch):
    import torch

    from loop.assay_cli import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device("auto") == "cuda"
    with pytest.raises(ValueError, match="sees 1 GPU"):
        resolve_device("cuda:3")


def test_cli_device_option(trained, tmp_path):
    """``--device cpu`` samples as the default does (same seed, same cells); a device that cannot be used
    is refused before anything is written."""
    import torch

    from loop.assay_cli import assay_app

    out, crops, _ = trained
    data = write_crops(crops, tmp_path / "crops")
    runner = CliRunner()
    args = ["sample", "--model", str(out), "--compound", "cyclohexamide", "--dose-um", "15", "--controls", str(data),
            "--plate", "P2", "--n", "3"]
    for name, extra in (("a", []), ("b", ["--device", "cpu"])):
        res = runner.invoke(assay_app, args + ["--out", str(tmp_path / f"{name}.npz")] + extra)
        assert res.exit_code == 0, res.output
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert np.array_equal(a["images"], b["images"])
    bad = "cuda" if not torch.cuda.is_available() else "meta"
    res = runner.invoke(assay_app, args + ["--out", str(tmp_path / "c.npz"), "--device", bad])
    assert res.exit_code == 1 and f"--device '{bad}'" in res.output and not (tmp_path / "c.npz").exists()
    res = runner.invoke(assay_app, ["evaluate", "--model", str(out), "--data", str(data), "--device", bad,
                                    "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 1 and f"--device '{bad}'" in res.output and not (tmp_path / "e.json").exists()


def test_evaluate_skips_conditions_it_cannot_score(trained, tmp_path, caplog):
    """A new plate holding a compound without SMILES, one with a SMILES column entry the model never
    saw, and a condition with too few cells: the scorable ones are scored, the rest listed as skipped."""
    from loop.assay_cli import assay_app

    out, crops, _ = trained
    p2 = crops.subset((crops.metadata["plate"] == "P2").to_numpy())
    extra = p2.subset(~p2.is_control)
    meta = extra.metadata
    parts = [p2]
    for compound, smiles, n in (("AZ-unknown", "", 4), ("ethanol", "CCO", 4), ("ethanol", "CCO", 2)):
        m = meta.iloc[:n].assign(compound=compound, smiles=smiles)
        if n == 2:
            m = m.assign(concentration_um=1.0)
        parts.append(CropSet(extra.images[:n], m.reset_index(drop=True), crops.channel_names))
    merged = CropSet(np.concatenate([c.images for c in parts]),
                     pd.concat([c.metadata for c in parts], ignore_index=True), crops.channel_names)
    data = write_crops(merged, tmp_path / "crops")
    runner = CliRunner()
    with caplog.at_level(logging.INFO, logger="models.image_eval"), \
            caplog.at_level(logging.INFO, logger="models.image_assay"):
        res = runner.invoke(assay_app, ["evaluate", "--model", str(out), "--data", str(data), "--n", "4", "--min-real",
                                        "4", "--no-inception", "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    analogue_warnings = [r.getMessage() for r in caplog.records if "no analogue" in r.getMessage()]
    assert len(analogue_warnings) == 1 and analogue_warnings[0].startswith("ethanol is no analogue")
    # progress counts every condition visited, the skipped ones included (2 scored of 4)
    progress = [r.getMessage() for r in caplog.records if "scored: condition" in r.getMessage()]
    assert len(progress) == 2 and all(" of 4," in m for m in progress) and "min left" in progress[-1]
    result = json.loads((tmp_path / "e.json").read_text())
    scored = {(c["compound"], c["dose_um"]) for c in result["conditions"]}
    assert scored == {("cyclohexamide", 15.0), ("ethanol", 15.0)}
    assert {c["compound"]: c["analogue"] for c in result["conditions"]} == {"cyclohexamide": True, "ethanol": False}
    skipped = {(s["compound"], s["dose_um"]): s for s in result["skipped"]}
    assert set(skipped) == {("AZ-unknown", 15.0), ("ethanol", 1.0)}
    assert "SMILES" in skipped[("AZ-unknown", 15.0)]["reason"] and skipped[("ethanol", 1.0)]["n_real"] == 2
    assert "skipped P2 AZ-unknown 15 uM" in res.output
    # nothing left to score: a clear error naming the folder and why
    res = runner.invoke(assay_app, ["evaluate", "--model", str(out), "--data", str(data), "--n", "4", "--min-real",
                                    "50", "--no-inception", "--json", str(tmp_path / "none.json")])
    assert res.exit_code == 1 and "fewer than 50 real cells" in res.output and str(data) in res.output
    assert not (tmp_path / "none.json").exists()


@pytest.mark.slow
def test_ray_executor_trains_members(tmp_path, ray_cluster):
    assay = train_image_assay(tiny_crops(), tmp_path, tiny_config(), executor="ray")
    assert assay.n_members == 2


def test_cli_train_tiny(tmp_path):
    from loop.assay_cli import assay_app

    data = write_crops(tiny_crops(), tmp_path / "crops")
    res = CliRunner().invoke(assay_app, [
        "train", "--data", str(data), "--out", str(tmp_path / "m"), "--members", "1", "--exclude-dose", "15",
        "--ae-steps", "2", "--flow-steps", "2", "--hidden-dim", "16", "--depth", "2", "--heads", "2",
        "--batch-size", "32", "--image-size", "16", "--lr-schedule", "cosine", "--source-noise", "0.25",
        "--no-final-conv", "--plain-decode", "--guidance", "1.2", "--time-logit-mean", "-0.5"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "member_000" / "model.pt").is_file()
    saved = ImageAssayConfig.from_dict(json.loads((tmp_path / "m" / "assay.json").read_text())["config"])
    default = ImageAssayConfig()
    # options given on the command line override; the rest are the config's defaults
    assert (saved.flow.max_steps, saved.flow.dit.hidden_dim, saved.image_size, saved.flow.lr_schedule,
            saved.flow.source_noise, saved.flow.dit.final_conv) == (2, 16, 16, "cosine", 0.25, False)
    assert (saved.detail_shot_noise, saved.pixel_floor_percentile, saved.flow.guidance_scale,
            saved.flow.time_logit_mean) == (False, None, 1.2, -0.5)
    assert (saved.flow.mode, saved.flow.max_minutes, saved.flow.time_scheme) == (
        default.flow.mode, default.flow.max_minutes, default.flow.time_scheme)
    assert saved.autoencoder.max_minutes == default.autoencoder.max_minutes
    assert saved.flow.dit.prior_scale == 0.0  # one member: no randomized prior
    assert saved.flow.guidance_gated and saved.dna_channel == 0
    res = CliRunner().invoke(assay_app, ["train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "m2")])
    assert res.exit_code == 1 and "nothing" in res.output
    # rerunning train (a resume) keeps the stored sampling options unless given again
    tiny = ["--ae-steps", "2", "--flow-steps", "2", "--hidden-dim", "16", "--depth", "2", "--heads", "2",
            "--batch-size", "32", "--image-size", "16"]
    resume = ["train", "--data", str(data), "--out", str(tmp_path / "m"), "--exclude-dose", "15", "--lr-schedule",
              "cosine", "--source-noise", "0.25", "--no-final-conv", "--plain-decode", "--time-logit-mean", "-0.5"] + tiny
    assert CliRunner().invoke(assay_app, resume + ["--no-guidance-gated"]).exit_code == 0
    again = ImageAssayConfig.from_dict(json.loads((tmp_path / "m" / "assay.json").read_text())["config"])
    assert (again.flow.guidance_scale, again.flow.guidance_gated) == (1.2, False)
    res = CliRunner().invoke(assay_app, ["train", "--data", str(data), "--out", str(tmp_path / "m3"), "--members",
                                         "1", "--dna-channel", "actin"] + tiny)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m3" / "assay.json").read_text())["config"]["dna_channel"] == 2
    res = CliRunner().invoke(assay_app, ["train", "--data", str(data), "--out", str(tmp_path / "m4"), "--dna-channel",
                                         "Hoechst"] + tiny)
    assert res.exit_code == 1 and "--dna-channel 'Hoechst': not a channel of" in res.output
    assert not (tmp_path / "m4").exists()


def test_cli_ensemble_gets_randomized_priors_unless_told(tmp_path):
    from loop.assay_cli import assay_app
    from models.image_dit import ENSEMBLE_PRIOR_SCALE

    data = write_crops(tiny_crops(), tmp_path / "crops")
    tiny = ["--ae-steps", "1", "--flow-steps", "1", "--hidden-dim", "16", "--depth", "1", "--heads", "2",
            "--batch-size", "32", "--image-size", "16"]
    for name, extra, expected in [("k2", [], ENSEMBLE_PRIOR_SCALE), ("k2-off", ["--prior-scale", "0"], 0.0)]:
        out = tmp_path / name
        res = CliRunner().invoke(assay_app, ["train", "--data", str(data), "--out", str(out), "--members", "2",
                                             *tiny, *extra])
        assert res.exit_code == 0, res.output
        saved = ImageAssayConfig.from_dict(json.loads((out / "assay.json").read_text())["config"])
        assert saved.flow.dit.prior_scale == expected


def test_interrupted_member_resumes_with_larger_budget(tmp_path):
    crops = tiny_crops()
    cfg = tiny_config(n_members=1)
    train_image_assay(crops, tmp_path, cfg)
    member = tmp_path / "member_000"
    (member / "model.pt").unlink()  # as if stopped after the last checkpoint
    longer = replace(cfg, flow=replace(cfg.flow, max_steps=5))
    train_image_assay(crops, tmp_path, longer)
    assert json.loads((member / "train_log.json").read_text())["steps"] == 5
    (member / "model.pt").unlink()
    ident = json.loads((member / "config.json").read_text())
    # a checkpoint saved before an option existed resumes: the option's default fills it in, and
    # sampling options (guidance_gated: False for configs saved before it, True now) do not count
    older = {**ident, "flow": {k: v for k, v in ident["flow"].items() if k not in ("time_logit_mean", "guidance_gated")}}
    (member / "config.json").write_text(json.dumps(older))
    even_longer = replace(cfg, flow=replace(cfg.flow, max_steps=6))
    train_image_assay(crops, tmp_path, even_longer)
    assert json.loads((member / "train_log.json").read_text())["steps"] == 6
    (member / "model.pt").unlink()
    ident["seed"] += 1
    (member / "config.json").write_text(json.dumps(ident))
    with pytest.raises(ValueError, match="different member"):
        train_image_assay(crops, tmp_path, even_longer)


def test_disagreement_uses_common_random_numbers(trained):
    """Two copies of the same member disagree by exactly 0 (no Monte-Carlo noise); a member whose
    output layer is perturbed disagrees by more."""
    from models.image_eval import member_disagreement

    out, crops, _ = trained
    twins = ImageAssay.load(out, members=[0, 0])
    fp = twins.training_fingerprint("cyclohexamide")
    controls = twins.plate_controls("P1")
    assert member_disagreement(twins, fp, 15.0, controls, n_cells=6, seed=0) == 0.0
    other = ImageAssay.load(out, members=[0, 0])
    with torch.no_grad():
        other.members[1].final.bias.add_(torch.linspace(-2.0, 2.0, other.members[1].final.bias.numel()))
    assert member_disagreement(other, fp, 15.0, controls, n_cells=6, seed=0) > 0.0
    # the sampling options of the scored cells reach every generated set
    calls = []
    original = ImageAssay.generate
    other.generate = lambda *a, **k: calls.append(k) or original(other, *a, **k)
    member_disagreement(other, fp, 15.0, controls, n_cells=4, seed=0, n_steps=2, sampler="heun", guidance_scale=1.0)
    assert len(calls) == 4 and all(k == {"n_steps": 2, "sampler": "heun", "guidance_scale": 1.0} for k in calls)


def test_evaluate_refuses_an_unknown_plate_before_scoring(trained, monkeypatch):
    from models.image_eval import evaluate_assay

    _, crops, assay = trained
    monkeypatch.setattr(ImageAssay, "generate_ensemble", lambda *a, **k: pytest.fail("generated before the check"))
    with pytest.raises(ValueError, match=r"no crops of plate\(s\) \['P9'\]"):
        evaluate_assay(assay, crops, plates=["P1", "P9"], inception=False, source="here")


def test_unknown_plate_uses_unknown_plate_condition(trained):
    _, _, assay = trained
    fps = np.stack([assay.training_fingerprint("cyclohexamide")])
    assert assay.plate_controls(None) is None  # noise mode: null-plate token
    assert assay.plate_controls("P9", strict=False) is None
    p = assay.predict_profiles(fps, np.array([5.0]), n_cells=3, seed=0, plate_id="P9")
    assert p.shape == (2, 1, len(assay.feature_names))


def test_evaluate_draws_each_conditions_baselines_on_its_own(trained):
    """A condition's copy-control and real-floor draws do not depend on what else is scored."""
    from models.image_eval import evaluate_assay

    _, crops, assay = trained
    kw = dict(n_per_condition=4, min_real=4, inception=False, seed=5)
    both = evaluate_assay(assay, crops, **kw)
    alone = evaluate_assay(assay, crops, plates=["P2"], **kw)
    pick = [c for c in both["conditions"] if c["plate"] == "P2"]
    assert len(pick) == len(alone["conditions"]) == 1
    for baseline in ("copy_control", "real_floor", "model"):
        assert pick[0][baseline] == alone["conditions"][0][baseline]


def test_evaluate_skips_a_plate_with_too_few_dmso_cells(trained):
    from models.image_eval import MIN_CONTROL_CELLS, evaluate_assay

    _, crops, assay = trained
    dmso_p2 = np.flatnonzero(crops.is_control & (crops.metadata["plate"] == "P2").to_numpy())
    drop = np.ones(len(crops), dtype=bool)
    drop[dmso_p2[MIN_CONTROL_CELLS - 1:]] = False  # leaves 3 DMSO cells on P2
    result = evaluate_assay(assay, crops.subset(drop), n_per_condition=4, min_real=4, inception=False)
    assert {c["plate"] for c in result["conditions"]} == {"P1"}
    (skip,) = result["skipped"]
    assert skip["plate"] == "P2" and skip["reason"] == "only 3 DMSO cell(s) on the plate (fewer than 4)"


def test_cli_sample_names_what_is_wrong_with_controls(trained, tmp_path):
    from loop.assay_cli import assay_app

    out, crops, _ = trained
    data = write_crops(crops, tmp_path / "crops")
    runner = CliRunner()
    base = ["sample", "--model", str(out), "--compound", "cyclohexamide", "--dose-um", "15", "--n", "2",
            "--out", str(tmp_path / "g.npz")]
    res = runner.invoke(assay_app, base + ["--controls", str(data / "crops.npz")])
    assert res.exit_code == 1 and "crops.npz: --controls takes a crops folder" in res.output and "not a folder" in res.output
    res = runner.invoke(assay_app, base + ["--controls", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "no such folder" in res.output
    res = runner.invoke(assay_app, base + ["--controls", str(data), "--plate", "P7"])
    assert res.exit_code == 1 and "no plate 'P7' (plates there: ['P1', 'P2'])" in res.output
    assert not (tmp_path / "g.npz").exists()


def test_cli_sample_refuses_a_bad_dose_and_a_stray_plate(trained, tmp_path):
    from loop.assay_cli import assay_app

    out, _, _ = trained
    runner = CliRunner()
    base = ["sample", "--model", str(out), "--n", "2", "--out", str(tmp_path / "g.npz"), "--controls", "P1"]
    res = runner.invoke(assay_app, base + ["--compound", "cyclohexamide", "--dose-um", "inf"])
    assert res.exit_code == 1 and "dose_um must be a finite dose >= 0, got inf" in res.output
    res = runner.invoke(assay_app, base + ["--compound", "DMSO", "--dose-um", "-3"])
    assert res.exit_code == 1 and "finite dose >= 0, got -3" in res.output
    res = runner.invoke(assay_app, base + ["--compound", "DMSO", "--dose-um", "0", "--plate", "P2"])
    assert res.exit_code == 1 and "--plate P2 chooses a plate inside a crops folder, and --controls P1 is no folder" \
        in res.output
    res = runner.invoke(assay_app, ["sample", "--model", str(out), "--n", "2", "--out", str(tmp_path / "g.npz"),
                                    "--controls", "P9", "--compound", "DMSO", "--dose-um", "0"])
    assert res.exit_code == 1 and "error: plate 'P9' has no stored controls" in res.output  # the text, not a repr
    assert not (tmp_path / "g.npz").exists()
    res = runner.invoke(assay_app, base + ["--compound", "cyclohexamide", "--dose-um", "5"])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "g.npz") as saved:
        assert bool(saved["guidance_gated"]) and float(saved["guidance_scale"]) == 1.6


def test_cli_sample_out_must_be_an_npz_and_write_failures_are_named(trained, tmp_path):
    """``--out X.png`` would have been overwritten by its own montage; a folder or an unwritable
    parent gives an error naming the path, and no temporary is left behind."""
    from loop.assay_cli import assay_app

    out, _, _ = trained
    runner = CliRunner()
    base = ["sample", "--model", str(out), "--n", "2", "--controls", "P1", "--compound", "cyclohexamide",
            "--dose-um", "5"]
    res = runner.invoke(assay_app, base + ["--out", str(tmp_path / "g.png")])
    assert res.exit_code == 1 and "give a FILE.npz" in res.output and not list(tmp_path.iterdir())
    (tmp_path / "adir.npz").mkdir()
    res = runner.invoke(assay_app, base + ["--out", str(tmp_path / "adir.npz")])
    assert res.exit_code == 1 and "is a folder" in res.output
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(assay_app, base + ["--out", str(tmp_path / "afile" / "g.npz")])
    assert res.exit_code == 1 and "cannot write" in res.output and "afile" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.npz", "afile"]
    (tmp_path / "m.png").mkdir()  # the montage cannot be written: the cells are kept, and it says so
    res = runner.invoke(assay_app, base + ["--out", str(tmp_path / "m.npz")])
    assert res.exit_code == 1 and "wrote" in res.output and "but not its montage" in res.output
    assert (tmp_path / "m.npz").is_file()


def test_cli_sample_records_how_cells_were_made(trained, tmp_path, caplog):
    from loop.assay_cli import assay_app

    out, _, assay = trained
    runner = CliRunner()
    base = ["sample", "--model", str(out), "--controls", "P1", "--steps", "2"]
    res = runner.invoke(assay_app, base + ["--compound", " cycloheximide ", "--dose-um", "5", "--n", "5",
                                           "--out", str(tmp_path / "a.npz")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "a.npz") as z:
        assert z["member"].tolist() == [0, 0, 0, 1, 1] == assay.member_of_cells(5).tolist()
        assert int(z["n_members"]) == 2 and int(z["n_steps"]) == 2 and str(z["sampler"]) == "euler"
        assert str(z["compound"]) == "cycloheximide"  # the usual spelling, found in the name table
        assert str(z["compound_resolved_as"]).startswith("name table SMILES C[C@H]1")
        assert z["dose_range_um"].tolist() == [5.0, 50.0] and bool(z["dose_in_training_range"])
        assert str(z["model"]) == str(out.resolve()) and str(z["controls"]) == "P1"
        assert z["channel_names"].tolist() == list(assay.channel_names) and bool(z["channel_names_declared"])
    with caplog.at_level(logging.WARNING, logger="models.image_assay"):
        res = runner.invoke(assay_app, base + ["--compound", "cyclohexamide", "--dose-um", "1000", "--n", "2",
                                               "--out", str(tmp_path / "b.npz")])
    assert res.exit_code == 0 and "cyclohexamide at 1000 uM is outside the treated doses" in caplog.text
    with np.load(tmp_path / "b.npz") as z:
        assert not bool(z["dose_in_training_range"]) and str(z["compound_resolved_as"]) == "training compound cyclohexamide"
    res = runner.invoke(assay_app, base + ["--compound", "DMSO", "--dose-um", "7", "--n", "2",
                                           "--out", str(tmp_path / "c.npz")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "c.npz") as z:
        assert float(z["dose_um"]) == 0.0 and str(z["compound_resolved_as"]) == "control"


def test_sample_montage_shows_the_real_condition_or_labels_its_stand_in(trained, tmp_path):
    """Real cells are matched by fingerprint (a SMILES finds the plate's named cells); without
    cells of the condition the plate's DMSO cells stand in, labelled so; a training plate id shows
    the model's stored controls."""
    from lab_io.crops import FALLBACK_SMILES
    from loop.assay_cli import _real_reference

    _, crops, assay = trained
    p2 = crops.subset((crops.metadata["plate"] == "P2").to_numpy())
    fp = resolve_compound(assay, FALLBACK_SMILES["cyclohexamide"])
    real, label = _real_reference(assay, (None, "P2", p2), fp, 15.0)
    assert len(real) == 4 and label == "real, same compound and dose on P2"
    real, label = _real_reference(assay, (None, "P2", p2), fp, 5.0)
    assert len(real) == 6 and label.startswith("real DMSO (no cells of this compound at this dose on P2")
    stored = assay.plate_controls("P1")
    real, label = _real_reference(assay, (stored, "P1", None), fp, 5.0)
    assert real is stored.images and len(real) and "the model's stored controls" in label


def test_assay_sampling_scales_guidance_with_the_dose_gate(trained):
    """A saved model's ``guidance_gated`` reaches sampling: DMSO cells (gate 0) get the unguided
    flow when it is on, and the guided one when it is off (as in models saved before it)."""
    import copy

    _, _, assay = trained
    controls = assay.plate_controls("P1")
    old_config, old_net = assay.config, assay.members[0]
    net = copy.deepcopy(old_net)  # random weights: after 3 steps the tiny net's tokens barely differ
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    assay.members[0] = net
    try:
        gated = assay.generate_latents(0, None, 0.0, controls, 4, seed=3)[0]
        assert assay.config.flow.guidance_gated and assay.config.flow.guidance_scale == 1.6
        assert torch.allclose(gated, assay.generate_latents(0, None, 0.0, controls, 4, seed=3, guidance_scale=1.0)[0])
        assay.config = replace(assay.config, flow=replace(assay.config.flow, guidance_gated=False))
        ungated = assay.generate_latents(0, None, 0.0, controls, 4, seed=3)[0]
        assert (gated - ungated).abs().max() > 1e-3
    finally:
        assay.config, assay.members[0] = old_config, old_net


def test_training_refuses_what_it_cannot_do_before_writing_anything(tmp_path):
    crops = tiny_crops()
    out = tmp_path / "m"
    with pytest.raises(ValueError, match=r"plate\(s\) to exclude \['P7'\] not in the crops \(plates there: \['P1', 'P2'\]\)"):
        train_image_assay(crops, out, tiny_config(exclude_plates=("P7",)))
    with pytest.raises(ValueError, match=r"dose\(s\) to exclude \[7.0\] uM not among the treated doses .*'15', '50'"):
        train_image_assay(crops, out, tiny_config(exclude_doses_um=(7.0,)))
    no_dmso = crops.subset(~((crops.metadata["plate"] == "P2") & crops.is_control).to_numpy())
    with pytest.raises(ValueError, match=r"plate\(s\) \['P2'\] have treated cells but no DMSO.*--exclude-plate P2"):
        train_image_assay(no_dmso, out, tiny_config())
    smiles = crops.metadata.assign(smiles=np.where(crops.is_control, "", "C1CC(N"))
    with pytest.raises(ValueError, match=r"cannot parse the SMILES of compound\(s\) 'cyclohexamide' \('C1CC\(N'\)"):
        train_image_assay(CropSet(crops.images, smiles, crops.channel_names), out, tiny_config())
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 8 px"):
        tiny_config(image_size=12)
    assert not out.exists()  # no half-written model folder


def test_resume_refuses_other_crops_and_channels(tmp_path):
    crops = tiny_crops()
    out = tmp_path / "m"
    cfg = tiny_config(n_members=1)
    other = CropSet(crops.images[::-1].copy(), crops.metadata, crops.channel_names)
    # a folder stopped during the autoencoder stage (no assay.json yet) is guarded too
    slow = replace(cfg, autoencoder=replace(cfg.autoencoder, max_minutes=0.0))
    train_image_assay(crops, tmp_path / "early", slow)
    (tmp_path / "early" / "assay.json").unlink()
    with pytest.raises(ValueError, match="training_data.json: the model there was trained on other crops"):
        train_image_assay(other, tmp_path / "early", cfg)
    train_image_assay(crops, out, cfg)
    with pytest.raises(ValueError, match="trained on other crops .* use another --out"):
        train_image_assay(other, out, cfg)
    renamed = CropSet(crops.images, crops.metadata, ("DNA", "Tubulin", "Phalloidin"))
    with pytest.raises(ValueError, match=r"trained on channels \['DNA', 'Tubulin', 'Actin'\]"):
        train_image_assay(renamed, out, cfg)


def test_nuclei_are_segmented_on_the_channel_named_dna(tmp_path):
    """Crops whose DNA stain is not channel 0 (channels.json says where it is): the model records
    its index and its morphology features equal those of the same cells in the usual order."""
    crops = tiny_crops()
    moved = CropSet(crops.images[..., [1, 2, 0]].copy(), crops.metadata, ("Tubulin", "Actin", "Hoechst 33342"))
    assay = train_image_assay(moved, tmp_path / "m", tiny_config(n_members=1))
    assert assay.config.dna_channel == 2
    assert json.loads((tmp_path / "m" / "assay.json").read_text())["config"]["dna_channel"] == 2
    # a model saved with another index (before the channel was found by name) resumes with its own
    meta = json.loads((tmp_path / "m" / "assay.json").read_text())
    meta["config"]["dna_channel"] = 0
    (tmp_path / "m" / "assay.json").write_text(json.dumps(meta))
    assert train_image_assay(moved, tmp_path / "m", tiny_config(n_members=1)).config.dna_channel == 0
    with pytest.raises(ValueError, match=r"dna_channel 3 out of range for the 3 channels"):
        train_image_assay(moved, tmp_path / "m2", tiny_config(n_members=1, dna_channel=3))
    from lab_io.morphology import featurize_crops

    usual, _ = featurize_crops(crops.images[:6], ("DNA", "Tubulin", "Actin"))
    assert np.allclose(assay.featurize(moved.images[:6])[:, :8], usual[:, :8])  # nucleus shape features


def test_evaluate_names_a_dose_the_folder_lacks(trained):
    from models.image_eval import evaluate_assay

    _, crops, assay = trained
    with pytest.raises(ValueError, match=r"no treated cells at dose\(s\) \['7'\] uM \(treated doses there: \['5', '15', '50'\] uM\)"):
        evaluate_assay(assay, crops, n_per_condition=4, doses_um=[7.0], inception=False)
    with pytest.raises(ValueError, match=r"no treated cells of plate\(s\) \['P2'\] at dose\(s\) \['5'\] uM \(treated doses there: \['15'\]"):
        evaluate_assay(assay, crops, n_per_condition=4, plates=["P2"], doses_um=[5.0], inception=False)
    with pytest.raises(ValueError, match="n_per_condition must be >= 4"):
        evaluate_assay(assay, crops, n_per_condition=3, inception=False)


class _Stop(Exception):
    pass


def test_a_stopped_evaluation_resumes_to_the_uninterrupted_result(trained, tmp_path):
    """After each plate the partial result goes to ``on_plate``; resuming it scores only the plates
    left and ends where an uninterrupted run ends. Other settings cannot be resumed; the CLI writes
    the partial JSON as it goes and continues it with --resume."""
    from loop.assay_cli import assay_app
    from models.image_eval import evaluate_assay

    _, crops, assay = trained
    data = write_crops(crops, tmp_path / "crops")
    kw = dict(n_per_condition=4, min_real=4, inception=False, seed=3, source=str(data))
    full = json.loads(json.dumps(evaluate_assay(assay, crops, **kw)))
    assert full["complete"] and full["plates_done"] == ["P1", "P2"]
    partials = []

    def stop_after_first(partial):
        partials.append(json.loads(json.dumps(partial)))
        raise _Stop

    with pytest.raises(_Stop):
        evaluate_assay(assay, crops, on_plate=stop_after_first, **kw)
    (partial,) = partials
    assert partial["complete"] is False and partial["plates_done"] == ["P1"]
    assert {c["plate"] for c in partial["conditions"]} == {"P1"}
    resumed = json.loads(json.dumps(evaluate_assay(assay, crops, resume=partial, **kw)))
    assert resumed == full
    with pytest.raises(ValueError, match=r"cannot resume .*n_per_condition: 4 there, 5 now"):
        evaluate_assay(assay, crops, resume=partial, **{**kw, "n_per_condition": 5})

    out_json, kept = tmp_path / "e.json", tmp_path / "e.json.partial"
    kept.write_text(json.dumps(partial))
    args = ["evaluate", "--model", str(trained[0]), "--data", str(data), "--n", "4", "--min-real", "4",
            "--no-inception", "--seed", "3", "--json", str(out_json)]
    res = CliRunner().invoke(assay_app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert "plates P1 already scored" in res.output and json.loads(out_json.read_text()) == full
    assert not kept.exists()
    res = CliRunner().invoke(assay_app, args + ["--resume"])
    assert res.exit_code != 0 and "nothing to resume, it holds a complete evaluation" in res.output
    kept.write_text(json.dumps(partial))
    res = CliRunner().invoke(assay_app, args[:-2] + ["--seed", "4", "--json", str(out_json), "--resume"])
    assert res.exit_code != 0 and "seed: 3 there, 4 now" in res.output
    assert json.loads(kept.read_text()) == partial  # a refused resume leaves the partial JSON as it was
    assert json.loads(out_json.read_text()) == full  # and the complete one too
    kept.write_text(json.dumps({"complete": False}))
    res = CliRunner().invoke(assay_app, args + ["--resume"])
    assert res.exit_code != 0 and "cannot resume (not a partial evaluation)" in res.output


def test_a_resume_is_checked_against_the_config_the_training_started_with(tmp_path):
    """Before ``assay.json`` exists, ``training_data.json`` holds the config the training started
    with: a rerun with another seed or image size (which would reuse its autoencoder) is refused.
    A complete model refuses changed step budgets (its members would not train again) and fewer
    members; unreadable files and checkpoints are named."""
    from dataclasses import replace

    from models.image_assay import ASSAY_FILE, DATA_FILE, _check_resume_budgets, _check_resume_config
    from models.image_flow import load_checkpoint

    config = ImageAssayConfig(n_members=2)
    (tmp_path / DATA_FILE).write_text(json.dumps({"config": config.to_dict()}))
    _check_resume_config(tmp_path, replace(config, flow=replace(config.flow, max_steps=7)))  # budgets may change
    for changed, name in ((replace(config, seed=1), "seed"), (replace(config, image_size=56), "image_size"),
                          (replace(config, autoencoder=replace(config.autoencoder, decoder_steps=0)), "decoder_steps")):
        with pytest.raises(ValueError, match=f"{DATA_FILE}: the start of a model .*{name}"):
            _check_resume_config(tmp_path, changed)
    (tmp_path / ASSAY_FILE).write_text(json.dumps({"config": config.to_dict()}))
    _check_resume_budgets(tmp_path, replace(config, flow=replace(config.flow, max_steps=7)))  # a member unfinished
    for path in (tmp_path / "member_000", tmp_path / "member_001", tmp_path / "autoencoder"):
        path.mkdir()
        (path / "model.pt").write_bytes(b"")  # every stage finished
    _check_resume_config(tmp_path, replace(config, n_members=3))  # members are added
    for changed, name, check in ((replace(config, flow=replace(config.flow, max_steps=7)), "flow.max_steps",
                                  _check_resume_budgets),
                                 (replace(config, n_members=1), "n_members=2/1", _check_resume_config)):
        with pytest.raises(ValueError, match=f"{ASSAY_FILE}: a model .*{name}"):
            check(tmp_path, changed)
    (tmp_path / ASSAY_FILE).write_text('{"config": {"flow": ')
    with pytest.raises(ValueError, match=f"{ASSAY_FILE}: unreadable"):
        _check_resume_config(tmp_path, config)
    torch.save({"step": 1}, tmp_path / "checkpoint.pt")
    assert load_checkpoint(tmp_path / "checkpoint.pt") == {"step": 1} and load_checkpoint(tmp_path / "none.pt") is None
    (tmp_path / "checkpoint.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes()[:40])
    with pytest.raises(ValueError, match="checkpoint.pt: unreadable checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def _as_saved_before_session_34(model_dir, dst, names=None):
    """A copy of a model folder as models were saved before they recorded ``channels_named``."""
    import shutil

    shutil.copytree(model_dir, dst)
    meta = json.loads((dst / "assay.json").read_text())
    meta.pop("channels_named", None)
    if names is not None:
        meta["channel_names"] = list(names)
    (dst / "assay.json").write_text(json.dumps(meta))
    return dst


def test_a_model_records_whether_its_channel_names_were_declared(trained, tmp_path, caplog):
    """Trained on declared names, a model's are declared; trained on a folder without them, they are
    not (same version: the record does not change what was trained). A model saved before the record
    whose names are defaults (DNA, Tubulin, Actin: BBBC021's pre-session-33 default, the synthetic
    lab's stains) takes a folder's channels by position, other names stay declared."""
    out, crops, assay = trained
    assert json.loads((out / "assay.json").read_text())["channels_named"] is True and assay.channel_names.declared
    unnamed = CropSet(crops.images, crops.metadata, crops.channel_names, channels_named=False)
    bare = train_image_assay(unnamed, tmp_path / "bare", tiny_config(exclude_plates=("P2",)))
    assert json.loads((tmp_path / "bare" / "assay.json").read_text())["channels_named"] is False
    assert not bare.channel_names.declared and bare.version == assay.version
    old = ImageAssay.load(_as_saved_before_session_34(out, tmp_path / "old"))
    assert old.channel_names == ["DNA", "Tubulin", "Actin"] and not old.channel_names.declared
    other = ImageAssay.load(_as_saved_before_session_34(out, tmp_path / "other", ("DNA", "ER", "Mito")))
    assert other.channel_names.declared


def test_sample_and_evaluate_feed_a_positional_model_the_folders_order(trained, tmp_path, caplog):
    """The BBBC021 case: a model saved before names were recorded, named DNA, Tubulin, Actin only by
    the old default, gets a folder's channels in the folder's order (a warning when its declared
    names disagree), and evaluate records the folder's names as the stains scored; a model with
    declared names gets the same folder reordered by name, and records its own. A folder written
    from crops without declared names (BBBC021's) is fed in its order to both."""
    from loop.assay_cli import _controls
    from models.image_eval import evaluate_assay

    out, crops, assay = trained
    old_dir = _as_saved_before_session_34(out, tmp_path / "old")
    old = ImageAssay.load(old_dir)
    swapped = CropSet(crops.images[..., [0, 2, 1]].copy(), crops.metadata, ("DNA", "Actin", "Tubulin"))
    declared = write_crops(swapped, tmp_path / "declared")
    with caplog.at_level(logging.WARNING, logger="lab_io.crops"):
        _, _, fed_old = _controls(old, str(declared), "P2")
    assert "taken by position as the model's ['DNA', 'Tubulin', 'Actin']" in caplog.text
    on_p2 = swapped.subset((swapped.metadata["plate"] == "P2").to_numpy())
    assert np.array_equal(fed_old.images, on_p2.images)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lab_io.crops"):
        _, _, fed_new = _controls(assay, str(declared), "P2")
    assert "reordered to the model's ['DNA', 'Tubulin', 'Actin']" in caplog.text
    assert np.array_equal(fed_new.images, on_p2.images[..., [0, 2, 1]])
    bare = write_crops(CropSet(swapped.images, swapped.metadata, swapped.channel_names, channels_named=False),
                       tmp_path / "bare")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lab_io.crops"):
        for model in (old, assay):
            assert np.array_equal(_controls(model, str(bare), "P2")[2].images, on_p2.images)
    assert caplog.text.count("without declared channel names") == 1  # the declared model's warning only
    scored = evaluate_assay(old, load_crops(declared), n_per_condition=4, plates=["P2"], inception=False,
                            min_real=4)
    assert (scored["channel_names"], scored["channel_names_declared"]) == (["DNA", "Actin", "Tubulin"], True)
    scored = evaluate_assay(assay, load_crops(declared), n_per_condition=4, plates=["P2"], inception=False,
                            min_real=4)
    assert (scored["channel_names"], scored["channel_names_declared"]) == (["DNA", "Tubulin", "Actin"], True)
    from loop.assay_cli import assay_app  # the sample file records the stains the same way

    for model, stains in ((old_dir, ["DNA", "Actin", "Tubulin"]), (out, ["DNA", "Tubulin", "Actin"])):
        res = CliRunner().invoke(assay_app, ["sample", "--model", str(model), "--compound", "cyclohexamide",
                                             "--dose-um", "15", "--controls", str(declared), "--plate", "P2",
                                             "--n", "2", "--out", str(tmp_path / "s.npz")])
        assert res.exit_code == 0, res.output
        with np.load(tmp_path / "s.npz") as z:
            assert z["channel_names"].tolist() == stains and bool(z["channel_names_declared"])


def _member_steps(model_dir, k=0):
    return json.loads((model_dir / f"member_{k:03d}" / "train_log.json").read_text())["steps"]


def test_a_member_stopped_by_its_time_budget_continues_with_a_larger_one(tmp_path):
    """Rerun with a larger --flow-minutes, a member its time budget stopped before max_steps trains
    on from its checkpoint (the record then tells the truth); a budget below what it trained is refused."""
    crops, cfg = tiny_crops(), tiny_config(n_members=1)
    train_image_assay(crops, tmp_path, replace(cfg, flow=replace(cfg.flow, max_minutes=0.0)))  # stopped at once
    assert _member_steps(tmp_path) == 0
    assay = train_image_assay(crops, tmp_path, cfg)
    assert _member_steps(tmp_path) == cfg.flow.max_steps
    assert assay.config.flow.max_minutes == cfg.flow.max_minutes
    record = (tmp_path / "assay.json").read_text()
    with pytest.raises(ValueError, match=r"flow\.max_minutes=.*member_000 trained"):
        train_image_assay(crops, tmp_path, replace(cfg, flow=replace(cfg.flow, max_minutes=0.0)))
    assert (tmp_path / "assay.json").read_text() == record


def test_an_autoencoder_stopped_by_its_time_budget_continues_until_members_use_it(tmp_path, monkeypatch):
    import models.image_assay as image_assay

    crops, cfg = tiny_crops(), tiny_config(n_members=1)
    stopped = replace(cfg, autoencoder=replace(cfg.autoencoder, max_minutes=0.0))

    def stop(*args):
        raise RuntimeError("stopped before the members")

    with monkeypatch.context() as m:
        m.setattr(image_assay, "_run_members", stop)
        with pytest.raises(RuntimeError):
            train_image_assay(crops, tmp_path / "a", stopped)
    train_image_assay(crops, tmp_path / "a", cfg)  # no member yet: stage 1 continues, stage 2 again
    log = json.loads((tmp_path / "a" / "autoencoder" / "train_log.json").read_text())
    assert (log["steps"], log["decoder_steps"]) == (cfg.autoencoder.max_steps, cfg.autoencoder.decoder_steps)
    train_image_assay(crops, tmp_path / "b", stopped)
    with pytest.raises(ValueError, match="stopped on its time budget at step 0 .*member_000 trained on its latents"):
        train_image_assay(crops, tmp_path / "b", cfg)


def test_adding_members_keeps_the_model_until_they_are_trained(tmp_path, monkeypatch):
    import models.image_assay as image_assay

    crops, cfg = tiny_crops(), tiny_config(n_members=1)
    train_image_assay(crops, tmp_path, cfg)
    record = (tmp_path / "assay.json").read_text()
    real = image_assay.train_member_task

    def interrupted(member_index, **kwargs):
        if member_index == 1:
            raise RuntimeError("interrupted")
        return real(member_index=member_index, **kwargs)

    monkeypatch.setattr(image_assay, "train_member_task", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        train_image_assay(crops, tmp_path, replace(cfg, n_members=2))
    assert (tmp_path / "assay.json").read_text() == record
    assert ImageAssay.load(tmp_path).n_members == 1


def test_ray_members_get_the_absolute_model_folder(tmp_path, monkeypatch):
    from models import ray_executor

    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()

    def run_elsewhere(fn, kwargs_list, **_):
        monkeypatch.chdir(elsewhere)  # a worker's own working folder
        return [fn(**kw) for kw in kwargs_list]

    monkeypatch.setattr(ray_executor, "run_tasks", run_elsewhere)
    monkeypatch.chdir(tmp_path)
    train_image_assay(tiny_crops(), "rel", tiny_config(n_members=1), executor="ray")
    assert (tmp_path / "rel" / "member_000" / "model.pt").is_file() and not (elsewhere / "rel").exists()


def test_a_bad_executor_is_refused_before_any_training(tmp_path):
    from loop.assay_cli import assay_app

    with pytest.raises(ValueError, match="executor must be 'local' or 'ray', got 'Ray'"):
        train_image_assay(tiny_crops(), tmp_path / "m", tiny_config(), executor="Ray")
    assert not (tmp_path / "m").exists()
    res = CliRunner().invoke(assay_app, ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m"),
                                         "--executor", "Ray"])
    assert res.exit_code == 1 and "--executor: executor must be 'local' or 'ray', got 'Ray'" in res.output


def test_zero_sampler_steps_are_refused(trained, tmp_path):
    from loop.assay_cli import assay_app

    _, _, assay = trained
    with pytest.raises(ValueError, match="n_steps .* >= 1, got 0"):
        assay.generate_latents(0, None, 0.0, None, 2, seed=0, n_steps=0)
    res = CliRunner().invoke(assay_app, ["sample", "--model", str(trained[0]), "--compound", "DMSO", "--dose-um", "0",
                                         "--controls", "P1", "--out", str(tmp_path / "s.npz"), "--steps", "0"])
    assert res.exit_code == 2 and not (tmp_path / "s.npz").exists()


def test_a_stopped_training_keeps_its_sampling_options_on_resume(tmp_path):
    """Killed before assay.json was written, the options stored at its start (training_data.json) hold."""
    from loop.assay_cli import _keep_stored_sampling
    from models.image_assay import DATA_FILE

    cfg = ImageAssayConfig()
    stored = replace(cfg, flow=replace(cfg.flow, guidance_scale=2.5, guidance_gated=False))
    (tmp_path / DATA_FILE).write_text(json.dumps({"config": stored.to_dict()}))
    kept = _keep_stored_sampling(tmp_path, cfg.flow, guidance=None, guidance_gated=None)
    assert (kept.guidance_scale, kept.guidance_gated) == (2.5, False)
    given = _keep_stored_sampling(tmp_path, replace(cfg.flow, guidance_scale=3.0), guidance=3.0, guidance_gated=None)
    assert (given.guidance_scale, given.guidance_gated) == (3.0, False)


def test_a_member_continuing_on_time_withdraws_the_old_record_first(tmp_path, monkeypatch, caplog):
    """A run killed while a member of the recorded model trains further leaves no record naming the
    old version over other weights: the folder is an unfinished model until the run completes."""
    import models.image_assay as image_assay

    crops, cfg = tiny_crops(), tiny_config(n_members=1)
    old = train_image_assay(crops, tmp_path, replace(cfg, flow=replace(cfg.flow, max_minutes=0.0))).version

    def killed(**kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="models.image_assay"):
        m.setattr(image_assay, "train_member_task", killed)
        with pytest.raises(RuntimeError, match="killed"):
            train_image_assay(crops, tmp_path, cfg)
    assert not (tmp_path / "assay.json").exists() and "member_000 of the model there train(s) further" in caplog.text
    assert train_image_assay(crops, tmp_path, cfg).version != old  # new weights: a new version


def test_the_record_stays_until_a_continuing_member_trains(tmp_path, monkeypatch):
    """A failure after the checks but before any member trains further (here, encoding the crops)
    leaves the model and its record as they were."""
    import models.image_assay as image_assay

    crops, cfg = tiny_crops(), tiny_config(n_members=1)
    old = train_image_assay(crops, tmp_path, replace(cfg, flow=replace(cfg.flow, max_minutes=0.0))).version

    def failing(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(image_assay, "encode_all", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        train_image_assay(crops, tmp_path, cfg)
    assert ImageAssay.load(tmp_path).version == old


def test_an_unchanged_rerun_keeps_its_version_from_another_data_path_and_mends_an_old_record(tmp_path):
    """The data path as typed (``source``) is no part of what a rerun that trains nothing compares;
    a record saved without its config (before session 31) is rewritten, not a KeyError."""
    crops, cfg = tiny_crops(), tiny_config(n_members=1)
    version = train_image_assay(crops, tmp_path, cfg, source="/data/crops").version
    assert train_image_assay(crops, tmp_path, cfg, source="../data/crops").version == version
    record = json.loads((tmp_path / "assay.json").read_text())
    (tmp_path / "assay.json").write_text(json.dumps({k: v for k, v in record.items() if k != "config"}))
    (tmp_path / "training_data.json").unlink()
    train_image_assay(crops, tmp_path, cfg, source="/data/crops")
    assert "config" in json.loads((tmp_path / "assay.json").read_text())


def test_loading_an_unfinished_training_says_to_resume_it(tmp_path):
    from models.image_assay import DATA_FILE

    (tmp_path / DATA_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: its training is unfinished .*rerun the same "
                                                "`loop assay train` command to resume it"):
        ImageAssay.load(tmp_path)


def test_a_rerun_that_trains_nothing_keeps_the_record_and_version(tmp_path):
    """Larger budgets under which no stage trains (a larger --flow-steps for a member stopped by time,
    a larger --flow-minutes for one finished by steps) change no weights, so not the version."""
    crops, cfg = tiny_crops(), tiny_config(n_members=1)
    timed = replace(cfg, flow=replace(cfg.flow, max_minutes=0.0))
    for first, rerun in ((timed, replace(timed, flow=replace(timed.flow, max_steps=9))),
                         (cfg, replace(cfg, flow=replace(cfg.flow, max_minutes=99.0)))):
        out = tmp_path / str(first.flow.max_minutes)
        version = train_image_assay(crops, out, first).version
        record = (out / "assay.json").read_text()
        assert train_image_assay(crops, out, rerun).version == version
        assert (out / "assay.json").read_text() == record


def test_a_stage_logged_before_budgets_were_recorded_never_continues_on_time(tmp_path):
    """Such a log held the autoencoder's last run's seconds only: a stage stopped before its steps
    has used its time budget (an unchanged rerun is neither refused nor retrained)."""
    from models.image_assay import DATA_FILE, _check_resume_budgets, read_stage_progress

    cfg = tiny_config(n_members=1)
    cfg = replace(cfg, autoencoder=replace(cfg.autoencoder, max_steps=10, max_minutes=0.03))
    (tmp_path / DATA_FILE).write_text(json.dumps({"config": cfg.to_dict()}))
    ae = tmp_path / "autoencoder"
    ae.mkdir()
    (ae / "config.json").write_text(json.dumps(cfg.autoencoder.to_dict()))
    (ae / "train_log.json").write_text(json.dumps({"steps": 5, "seconds": 0.5}))
    (ae / "model.pt").write_bytes(b"")
    (tmp_path / "member_000").mkdir()
    (tmp_path / "member_000" / "checkpoint.pt").write_bytes(b"")
    assert not read_stage_progress(ae, cfg.autoencoder.to_dict()).continues_under(10, 0.03)
    _check_resume_budgets(tmp_path, cfg)


def test_member_folders_beyond_the_ensemble_do_not_count(tmp_path):
    """A leftover member_005 (from another run) neither blocks the autoencoder nor has its budgets checked."""
    from models.image_assay import DATA_FILE, _check_resume_budgets

    cfg = tiny_config(n_members=1)
    (tmp_path / DATA_FILE).write_text(json.dumps({"config": cfg.to_dict()}))
    ae, leftover = tmp_path / "autoencoder", tmp_path / "member_005"
    for path in (ae, leftover):
        path.mkdir()
        (path / "model.pt").write_bytes(b"")
    (ae / "train_log.json").write_text(json.dumps({"steps": 1, "seconds": 0.0, **{
        k: getattr(cfg.autoencoder, k) for k in ("max_steps", "max_minutes")}}))  # stopped on time
    (leftover / "train_log.json").write_text(json.dumps({"steps": 3, "seconds": 0.0, "max_steps": 3,
                                                         "max_minutes": 45.0}))
    _check_resume_budgets(tmp_path, replace(cfg, flow=replace(cfg.flow, max_steps=7)))
