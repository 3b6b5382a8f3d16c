import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from models.image_dit import ROLE_COMPOUND, ROLE_CONTROL, ROLE_NULL, DiTConfig
from models.image_flow import (
    BlockSampler, ChannelNorm, FlowConfig, LatentData, add_source_noise, bootstrap_compound_weights,
    ot_pair, learning_rate, sample_latents, sampling_condition, source_latents, train_flow,
)

DIT = DiTConfig(latent_channels=2, latent_size=4, patch_size=2, hidden_dim=16, depth=2, n_heads=2)
CFG = FlowConfig(batch_size=8, block_size=4, control_set_size=3, max_steps=4, checkpoint_every=2, n_steps=3,
                 warmup_steps=2, dit=DIT)


def _data(offsets=(0.0, 10.0), n_per_group=6, seed=0) -> LatentData:
    """Two plates whose latents sit at distinct offsets; DMSO and one compound at two doses."""
    g = torch.Generator().manual_seed(seed)
    z, plate, compound, dose = [], [], [], []
    for p, off in enumerate(offsets):
        for c, d in ((-1, 0.0), (0, 5.0), (0, 50.0)):
            z.append(torch.randn(n_per_group, 2, 4, 4, generator=g) * 0.1 + off + (0 if c < 0 else np.log10(d)))
            plate += [p] * n_per_group
            compound += [c] * n_per_group
            dose += [d] * n_per_group
    bits = torch.zeros(1, 2048)
    bits[0, ::37] = 1
    return LatentData(torch.cat(z), np.asarray(plate), np.asarray(compound), np.asarray(dose),
                      ["P1", "P2"], ["cmpd"], bits)


def test_channel_norm_round_trip_and_percentiles():
    rng = np.random.default_rng(0)
    images = rng.integers(100, 5000, (20, 8, 8, 2), dtype=np.uint16)
    norm = ChannelNorm.fit(images)
    x = norm.normalize(images)
    assert x.shape == (20, 2, 8, 8)
    assert np.allclose(norm.lo, np.percentile(images.reshape(-1, 2), 0.5, axis=0))
    assert np.abs(norm.denormalize(x).astype(int) - images.astype(int)).max() <= 1
    assert ChannelNorm.from_dict(norm.to_dict()) == norm


def test_ot_pair_recovers_permutation():
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randn(7, 2, 3, 3, generator=g)
    perm = torch.randperm(7, generator=g)
    x_1 = x_0[perm] + 0.01
    a, b = ot_pair(x_0, x_1)
    assert torch.allclose(b - a, torch.full_like(a, 0.01), atol=1e-6)


def test_blocks_pair_within_one_plate():
    data = _data()
    cfg = replace(CFG, mode="control", control_fraction=0.3)
    sampler = BlockSampler(data, cfg, np.ones(1))
    for step in range(5):
        x_0, x_1, cond = sampler.draw(torch.Generator().manual_seed(step), np.random.default_rng(step))
        plate_0 = (x_0.mean(dim=(1, 2, 3)) > 5).view(-1, cfg.block_size)
        plate_1 = (x_1.mean(dim=(1, 2, 3)) > 5).view(-1, cfg.block_size)
        # every block: all sources and all targets from the same plate
        assert torch.all(plate_0 == plate_0[:, :1]) and torch.all(plate_1 == plate_0)
        assert set(cond.role.tolist()) <= {ROLE_COMPOUND, ROLE_CONTROL, ROLE_NULL}


def test_bootstrap_weights():
    assert np.array_equal(bootstrap_compound_weights(5, 0, enabled=False), np.ones(5))
    w = bootstrap_compound_weights(5, 1, enabled=True)
    assert w.sum() == 5 and np.array_equal(w, bootstrap_compound_weights(5, 1, enabled=True))
    # a bootstrap resample leaves some compound out for most seeds
    assert sum((bootstrap_compound_weights(5, s, enabled=True) == 0).any() for s in range(20)) >= 10


@pytest.mark.parametrize("mode", ["noise", "control"])
def test_train_resume_and_reproducible_sampling(mode):
    data = _data()
    cfg = replace(CFG, mode=mode)
    saved = []
    model, state = train_flow(data, cfg, seed=1, checkpoint_fn=lambda s: saved.append(copy.deepcopy(s)))
    assert [s["step"] for s in saved] == [2, 4, 4]
    resumed, _ = train_flow(data, cfg, seed=1, state=saved[0])
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    z_ctrl = data.z[data.controls_of_plate(0)]
    cond = sampling_condition(data.fingerprint_bits[0], 15.0, z_ctrl, 5, 2)
    outs = []
    for _ in range(2):
        x_0 = source_latents(mode, 5, (2, 4, 4), z_ctrl, torch.Generator().manual_seed(9))
        outs.append(sample_latents(model, cond, x_0, n_steps=3, sampler="heun", guidance_scale=1.5))
    assert outs[0].shape == (5, 2, 4, 4) and torch.equal(outs[0], outs[1])


def test_guidance_reference_scales_the_effect_over_null_or_control():
    """One Euler step from t=0 is x_0 + v_ref + w (v_cond - v_ref); against the control reference
    DMSO cells are left exactly as the unguided flow moves them."""
    from models.image_dit import ImageDiT

    g = torch.Generator().manual_seed(0)
    model = ImageDiT(DIT).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    z, x_0, t = torch.randn(4, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g), torch.zeros(3)
    cond = sampling_condition(torch.ones(2048), 5.0, z, 3, 2)
    v_cmp, v_ctrl, v_null = (model(x_0, t, c) for c in (cond, cond.as_control(), cond.without_compound()))
    assert not torch.allclose(v_ctrl, v_null) and not torch.allclose(v_cmp, v_ctrl)
    for reference, v_ref in (("control", v_ctrl), ("null", v_null)):
        out = sample_latents(model, cond, x_0, n_steps=1, guidance_scale=2.0, guidance_reference=reference)
        assert torch.allclose(out, x_0 + v_ref + 2.0 * (v_cmp - v_ref), atol=1e-5)
    dmso = sampling_condition(None, 5.0, z, 3, 2)
    assert torch.equal(sample_latents(model, dmso, x_0, n_steps=2, guidance_scale=2.0, guidance_reference="control"),
                       sample_latents(model, dmso, x_0, n_steps=2, guidance_scale=1.0))
    with pytest.raises(ValueError, match="guidance_reference"):
        sample_latents(model, cond, x_0, n_steps=1, guidance_scale=2.0, guidance_reference="dmso")
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        sample_latents(model, cond, x_0, n_steps=1, guidance_scale=-1.0)


def test_gated_guidance_follows_the_dose_gate():
    """``guidance_gated``: row scale 1 + (w - 1) g, g the compound gate; DMSO rows (g = 0) get the
    unguided velocity, a compound at a dose far above its gate's midpoint the full guidance."""
    from models.image_dit import ImageDiT

    g = torch.Generator().manual_seed(1)
    model = ImageDiT(replace(DIT, dose_gate=True, dose_range_um=(1.0, 10.0))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    z, x_0, t = torch.randn(4, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g), torch.zeros(3)
    bits = torch.ones(2048)
    for dose in (1e-6, 3.0, 1e6):
        cond = sampling_condition(bits, dose, z, 3, 2)
        gate = model.compound_gate(cond)
        assert torch.allclose(gate, model.dose_gate(model.fp_mlp(cond.fingerprint_bits), cond.log10_dose_um))
        v_cmp, v_null = model(x_0, t, cond), model(x_0, t, cond.without_compound())
        out = sample_latents(model, cond, x_0, n_steps=1, guidance_scale=2.0, guidance_gated=True)
        scale = (1.0 + gate).view(-1, 1, 1, 1)
        assert torch.allclose(out, x_0 + v_null + scale * (v_cmp - v_null), atol=1e-5)
    assert float(model.compound_gate(sampling_condition(bits, 1e-6, z, 3, 2)).detach().max()) < 1e-3
    assert float(model.compound_gate(sampling_condition(bits, 1e6, z, 3, 2)).detach().min()) > 1 - 1e-3
    dmso = sampling_condition(None, 5.0, z, 3, 2)
    assert torch.equal(model.compound_gate(dmso), torch.zeros(3))
    assert torch.equal(model.compound_gate(sampling_condition(bits, 5.0, z, 3, 2, unconditional=True)), torch.ones(3))
    assert torch.allclose(sample_latents(model, dmso, x_0, n_steps=2, guidance_scale=2.0, guidance_gated=True),
                          sample_latents(model, dmso, x_0, n_steps=2, guidance_scale=1.0), atol=1e-6)
    no_gate = ImageDiT(DIT).eval()  # without a dose gate every compound row is guided in full
    cond = sampling_condition(bits, 1e-6, z, 3, 2)
    assert torch.equal(sample_latents(no_gate, cond, x_0, n_steps=2, guidance_scale=2.0, guidance_gated=True),
                       sample_latents(no_gate, cond, x_0, n_steps=2, guidance_scale=2.0))


def test_sampling_condition_roles_and_checks():
    bits = torch.ones(2048)
    z = torch.randn(4, 2, 4, 4)
    assert torch.all(sampling_condition(bits, 5.0, z, 3, 2).role == ROLE_COMPOUND)
    assert torch.all(sampling_condition(None, 5.0, z, 3, 2).role == ROLE_CONTROL)
    assert torch.all(sampling_condition(bits, 5.0, z, 3, 2, unconditional=True).role == ROLE_NULL)
    null_plate = sampling_condition(bits, 5.0, None, 3, 2)
    assert not null_plate.has_controls.any() and null_plate.control_summary.shape == (3, 2 * 16 + 2)
    with pytest.raises(ValueError, match="dose_um must be > 0"):
        sampling_condition(bits, 0.0, z, 3, 2)
    with pytest.raises(ValueError, match="control mode needs"):
        source_latents("control", 3, (2, 4, 4), None, torch.Generator())


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        FlowConfig(mode="pixels")
    with pytest.raises(ValueError, match="multiple of block_size"):
        FlowConfig(batch_size=10, block_size=4)
    with pytest.raises(ValueError, match="time_scheme"):
        FlowConfig(time_scheme="cosine")  # refused before any training, not at the first flow step
    with pytest.raises(ValueError, match="lr_schedule"):
        FlowConfig(lr_schedule="linear")
    assert FlowConfig.from_dict(CFG.to_dict()) == CFG
    old = {k: v for k, v in CFG.to_dict().items()
           if k not in ("lr_schedule", "source_noise", "guidance_scale", "guidance_reference",
                        "time_logit_mean")}  # saved before these
    old = {k: v for k, v in old.items() if k != "guidance_gated"}
    loaded = FlowConfig.from_dict(old)
    assert (loaded.lr_schedule, loaded.source_noise, loaded.guidance_scale, loaded.guidance_reference,
            loaded.time_logit_mean, loaded.guidance_gated) == ("constant", 0.0, 1.0, "null", 0.0, False)
    assert FlowConfig().guidance_gated  # new models scale the guidance with the dose gate
    shifted = replace(CFG, time_scheme="logit_normal", time_logit_mean=-0.5)
    assert FlowConfig.from_dict(shifted.to_dict()) == shifted
    with pytest.raises(ValueError, match="time_logit_mean must be finite"):
        FlowConfig(time_logit_mean=float("nan"))
    with pytest.raises(ValueError, match="applies to time_scheme 'logit_normal', not 'uniform'"):
        FlowConfig(time_scheme="uniform", time_logit_mean=-0.5)
    assert (FlowConfig().guidance_scale, FlowConfig().guidance_reference) == (1.6, "null")
    with pytest.raises(ValueError, match="guidance_reference"):
        FlowConfig(guidance_reference="dmso")
    with pytest.raises(ValueError, match="needs label_dropout > 0"):
        FlowConfig(label_dropout=0.0)  # the default guidance needs a trained null token
    assert FlowConfig(label_dropout=0.0, guidance_scale=1.0).label_dropout == 0.0
    assert FlowConfig(label_dropout=0.0, guidance_reference="control").guidance_scale == 1.6
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        FlowConfig(guidance_scale=float("nan"))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="source_noise must be a finite sigma >= 0"):
            FlowConfig(source_noise=bad)
    with pytest.raises(ValueError, match="source_noise applies to the control source"):
        FlowConfig(mode="noise", source_noise=0.5)


def test_training_times_follow_the_logit_mean(monkeypatch):
    """train_flow draws its times with the configured logit-normal location: shifting it to -1
    moves the drawn times' median to sigmoid(-1), the closed form."""
    import models.image_flow as image_flow

    drawn = []
    original = image_flow.sample_time
    monkeypatch.setattr(image_flow, "sample_time",
                        lambda *a, **k: drawn.append(t := original(*a, **k)) or t)
    for mean in (0.0, -1.0):
        drawn.clear()
        train_flow(_data(), replace(CFG, time_scheme="logit_normal", time_logit_mean=mean, max_steps=30), seed=0)
        median = torch.cat(drawn).median().item()
        assert median == pytest.approx(torch.sigmoid(torch.tensor(mean)).item(), abs=0.06)


def test_source_noise_is_gaussian_added_after_ot_pairing():
    """Same draws with and without ``source_noise``: targets and pairs are identical, and the
    sources differ by sigma * N(0, I) (checked on 2,048 values: mean 0, sd sigma)."""
    data = _data(n_per_group=40)
    cfg = replace(CFG, mode="control", batch_size=64, block_size=32, control_set_size=8)
    sigma = 0.7
    draws = [BlockSampler(data, replace(cfg, source_noise=s), np.ones(1)).draw(
        torch.Generator().manual_seed(0), np.random.default_rng(0)) for s in (0.0, sigma)]
    (x0_clean, x1_clean, _), (x0_noisy, x1_noisy, _) = draws
    assert torch.equal(x1_clean, x1_noisy)
    eps = (x0_noisy - x0_clean) / sigma
    assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1.0) < 0.1
    z_ctrl = data.z[data.controls_of_plate(0)]
    clean = source_latents("control", 5, (2, 4, 4), z_ctrl, torch.Generator().manual_seed(3))
    assert any(torch.equal(clean[0], z) for z in z_ctrl)  # sigma 0: the control latents themselves
    noisy = [source_latents("control", 5, (2, 4, 4), z_ctrl, torch.Generator().manual_seed(3), source_noise=sigma)
             for _ in range(2)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], clean)
    x = torch.randn(3, 2)
    assert add_source_noise(x, 0.0, torch.Generator()) is x


def test_source_noise_on_treated_leaves_dmso_blocks_clean():
    """``source_noise_on='treated'``: DMSO blocks keep their paired control latents exactly, treated
    blocks get the noise; ``source_sigma`` says which sigma a condition gets."""
    data = _data(n_per_group=40)
    cfg = replace(CFG, mode="control", batch_size=256, block_size=32, control_set_size=8, control_fraction=0.5,
                  label_dropout=0.0, guidance_scale=1.0, source_noise=0.7, source_noise_on="treated")
    assert (cfg.source_sigma(treated=True), cfg.source_sigma(treated=False)) == (0.7, 0.0)
    assert replace(cfg, source_noise_on="all").source_sigma(treated=False) == 0.7
    x0, _, cond = BlockSampler(data, cfg, np.ones(1)).draw(torch.Generator().manual_seed(0), np.random.default_rng(0))
    is_control_row = [any(torch.equal(row, z) for z in data.z[data.compound < 0]) for row in x0]
    assert torch.equal(torch.tensor(is_control_row), cond.role == ROLE_CONTROL)
    assert (cond.role == ROLE_CONTROL).any() and (cond.role == ROLE_COMPOUND).any()
    with pytest.raises(ValueError, match="source_noise_on must be 'all' or 'treated'"):
        FlowConfig(source_noise_on="dmso")


def test_learning_rate_warmup_then_constant_or_cosine():
    cfg = FlowConfig(lr=1e-3, warmup_steps=10, max_steps=110)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(109, cfg) == pytest.approx(1e-3)
    cos = replace(cfg, lr_schedule="cosine")
    assert [learning_rate(s, cos) for s in (0, 4, 9)] == [learning_rate(s, cfg) for s in (0, 4, 9)]
    assert learning_rate(10, cos) == pytest.approx(1e-3)  # s = 0 right after the warm-up
    assert learning_rate(60, cos) == pytest.approx(0.5e-3)  # s = 1/2: cos = 0
    assert learning_rate(35, cos) == pytest.approx(1e-3 * (1 + np.cos(np.pi / 4)) / 2)
    assert learning_rate(110, cos) == pytest.approx(0.0, abs=1e-12)
    lrs = [learning_rate(s, cos) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_randomized_prior_members_agree_on_data_and_disagree_between_doses():
    """Members with randomized prior functions (Osband et al. 2018) fit the measured doses 1 and
    100 uM, and disagree at the unmeasured 10 uM far more than at the measured ones."""
    g = torch.Generator().manual_seed(0)
    z, compound, dose = [], [], []
    for c, d, shift in ((-1, 0.0, 0.0), (0, 1.0, 1.0), (0, 100.0, 2.0)):
        z.append(torch.randn(16, 2, 4, 4, generator=g) * 0.3 + shift)
        compound += [c] * 16
        dose += [d] * 16
    bits = torch.zeros(1, 2048)
    bits[0, ::37] = 1
    data = LatentData(torch.cat(z), np.zeros(48, dtype=int), np.asarray(compound), np.asarray(dose), ["P1"], ["cmpd"],
                      bits)
    dit = replace(DIT, hidden_dim=32, prior_scale=1.0)
    cfg = replace(CFG, mode="control", batch_size=32, block_size=16, control_set_size=8, max_steps=250, warmup_steps=20,
                  lr=2e-3, ema_decay=0.99, bootstrap=False, plate_dropout=0.0, checkpoint_every=10_000, dit=dit)
    z_ctrl = data.z[data.controls_of_plate(0)]
    means = {1.0: [], 10.0: [], 100.0: []}  # dose -> per-member mean latent (2 channels)
    for k in range(3):
        model, _ = train_flow(data, cfg, seed=k)
        for d in means:
            out = sample_latents(model, sampling_condition(bits[0], d, z_ctrl, 16, 2), z_ctrl, n_steps=8)
            means[d].append(out.mean(dim=(0, 2, 3)))
    for d, target in ((1.0, 1.0), (100.0, 2.0)):
        assert torch.allclose(torch.stack(means[d]), torch.full((3, 2), target), atol=0.1)
    disagreement = {d: float(torch.stack(m).var(0).mean()) for d, m in means.items()}
    assert disagreement[10.0] > 20 * max(disagreement[1.0], disagreement[100.0], 1e-3)


def test_each_control_block_is_paired_by_an_optimal_transport_assignment():
    """Reference: within every block of a control-mode batch (no source noise) the pairs (x_0[i], x_1[i])
    minimise the total squared distance over all one-to-one assignments of the block's sources to its
    targets (``scipy.optimize.linear_sum_assignment``), not merely the order the cells were drawn in."""
    from scipy.optimize import linear_sum_assignment

    data = _data(n_per_group=40)
    cfg = replace(CFG, mode="control", batch_size=64, block_size=16, control_set_size=8, control_fraction=0.5)
    x_0, x_1, _ = BlockSampler(data, cfg, np.ones(1)).draw(torch.Generator().manual_seed(0), np.random.default_rng(0))
    for start in range(0, len(x_0), cfg.block_size):
        a = x_0[start:start + cfg.block_size].flatten(1).double()
        b = x_1[start:start + cfg.block_size].flatten(1).double()
        cost = (torch.cdist(a, b) ** 2).numpy()
        rows, cols = linear_sum_assignment(cost)
        assert np.trace(cost) == pytest.approx(cost[rows, cols].sum(), rel=1e-9)
