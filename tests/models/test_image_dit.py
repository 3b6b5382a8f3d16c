import numpy as np
import pytest
import torch

from models.image_dit import (
    GATE_DECADES_BELOW, GATE_MIN_HILL, ROLE_COMPOUND, ROLE_CONTROL, ROLE_NULL, DiTConfig, ImageCondition, ImageDiT,
    RandomizedPrior, control_summary, control_summary_dim, dose_features,
)

CFG = DiTConfig(latent_channels=3, latent_size=4, patch_size=2, hidden_dim=16, depth=4, n_heads=2)


def _cond(b, role=ROLE_COMPOUND, has_controls=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageCondition(
        fingerprint_bits=(torch.rand(b, 2048, generator=g) < 0.02).float(),
        log10_dose_um=torch.full((b,), 1.0),
        role=torch.full((b,), role, dtype=torch.long),
        control_summary=torch.randn(b, control_summary_dim(3), generator=g),
        has_controls=torch.full((b,), has_controls),
    )


def _perturbed_model(seed=0, **config):
    """CFG (with ``config`` fields replaced) with every weight nudged off its initialisation."""
    torch.manual_seed(seed)
    model = ImageDiT(DiTConfig(**{**CFG.to_dict(), **config}))
    with torch.no_grad():  # leave the adaLN-zero init so outputs depend on every input
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_zero_init_gives_zero_velocity():
    model = ImageDiT(CFG)
    v = model(torch.randn(2, 3, 4, 4), torch.rand(2), _cond(2))
    assert v.shape == (2, 3, 4, 4)
    assert torch.all(v == 0)


def test_output_depends_on_every_token_and_condition():
    model = _perturbed_model()
    x, t = torch.randn(2, 3, 4, 4), torch.rand(2)
    base = model(x, t, _cond(2))
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0
    assert not torch.allclose(model(x2, t, _cond(2)), base)
    assert not torch.allclose(model(x, t, _cond(2, role=ROLE_CONTROL)), base)
    assert not torch.allclose(model(x, t, _cond(2, role=ROLE_NULL)), model(x, t, _cond(2, role=ROLE_CONTROL)))
    cond = _cond(2)
    cond.log10_dose_um = torch.full((2,), 0.3)
    assert not torch.allclose(model(x, t, cond), base)


def test_tokens_ignore_masked_inputs():
    model = _perturbed_model()
    x, t = torch.randn(2, 3, 4, 4), torch.rand(2)
    a, b = _cond(2, role=ROLE_CONTROL, seed=1), _cond(2, role=ROLE_CONTROL, seed=2)
    a.has_controls[:] = False
    b.has_controls[:] = False
    # control token ignores fingerprint and dose; null-plate token ignores the control summary
    assert torch.allclose(model(x, t, a), model(x, t, b))


def test_without_compound_sets_null_role():
    cond = _cond(3).without_compound()
    assert torch.all(cond.role == ROLE_NULL)


def test_control_summary_is_permutation_invariant():
    z = torch.randn(10, 3, 4, 4)
    s = control_summary(z)
    assert s.shape == (control_summary_dim(3),)
    assert torch.allclose(control_summary(z[torch.randperm(10)]), s, atol=1e-6)
    # mean part equals the pooled mean latent
    assert torch.allclose(s[: 3 * 16], z.mean(0).flatten(), atol=1e-6)


def test_dose_features_smooth():
    f = dose_features(torch.tensor([1.0, 1.0 + 1e-4]))
    assert torch.allclose(f[0], f[1], atol=1e-3)
    assert f[0, 0] == 0.0


def test_no_long_skip_variant_runs():
    model = ImageDiT(DiTConfig(**{**CFG.to_dict(), "long_skip": False, "depth": 3}))
    assert len(model.skips) == 0
    assert model(torch.randn(1, 3, 4, 4), torch.rand(1), _cond(1)).shape == (1, 3, 4, 4)


def test_final_conv_adds_a_3x3_convolution_of_the_patch_velocity():
    """``final_conv``: v = u + conv3x3(u) with u the patch-wise velocity of the same network
    without it (reference: F.conv2d with the layer's kernel), zero at initialisation; old
    configs (no key) load without it."""
    plain = _perturbed_model(final_conv=False)
    conv = ImageDiT(DiTConfig(**{**CFG.to_dict(), "final_conv": True}))
    assert torch.all(conv(torch.randn(2, 3, 4, 4), torch.rand(2), _cond(2)) == 0)  # zero-initialised
    missing = conv.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["final_conv.bias", "final_conv.weight"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        conv.final_conv.weight.copy_(0.2 * torch.randn(3, 3, 3, 3, generator=g))
        conv.final_conv.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x, t = torch.randn(2, 3, 4, 4), torch.rand(2)
    u = plain(x, t, _cond(2))
    expected = u + torch.nn.functional.conv2d(u, conv.final_conv.weight, conv.final_conv.bias, padding=1)
    assert torch.allclose(conv.eval()(x, t, _cond(2)), expected, atol=1e-6)
    old = {k: v for k, v in CFG.to_dict().items() if k != "final_conv"}
    assert DiTConfig.from_dict(old).final_conv is False and ImageDiT(DiTConfig.from_dict(old)).final_conv is None


def _dose_cond(log10_doses, role=ROLE_COMPOUND, bits_seed=0):
    """One compound (the same fingerprint in every row) at several doses."""
    cond = _cond(len(log10_doses), role=role, seed=bits_seed)
    cond.fingerprint_bits = cond.fingerprint_bits[:1].expand(len(log10_doses), -1)
    cond.log10_dose_um = torch.as_tensor(log10_doses, dtype=torch.float32)
    return cond


def test_dose_gate_is_a_bounded_hill_curve():
    """g = sigmoid(ln 10 * n * (log10 dose - m)), m in [log10(lowest dose) - 1, log10(highest)],
    n >= 0.5, with (m, n) from the fingerprint embedding."""
    model = _perturbed_model(seed=1, dose_range_um=(5.0, 50.0))
    cond = _dose_cond(np.linspace(-3, 3, 13).tolist())
    fp = model.fp_mlp(cond.fingerprint_bits)
    a, b = model.gate_head(fp).unbind(-1)
    lo, hi = np.log10(5.0) - GATE_DECADES_BELOW, np.log10(50.0)
    m = lo + (hi - lo) * torch.sigmoid(a)
    n = GATE_MIN_HILL + torch.nn.functional.softplus(b)
    g = model.dose_gate(fp, cond.log10_dose_um)
    assert torch.allclose(g, torch.sigmoid(np.log(10) * n * (cond.log10_dose_um - m)), atol=1e-6)
    assert torch.all(g[1:] > g[:-1])  # increasing in dose
    with torch.no_grad():  # the midpoint saturates at the ends of its range, never beyond
        for bias, edge in ((50.0, hi), (-50.0, lo)):
            model.gate_head.bias[0] = bias
            at_edge = model.dose_gate(fp[:1], torch.tensor([edge], dtype=torch.float32))
            assert abs(float(at_edge) - 0.5) < 1e-5
    assert DiTConfig.from_dict(DiTConfig(dose_range_um=[5, 50]).to_dict()).dose_range_um == (5.0, 50.0)
    with pytest.raises(ValueError, match="dose_range_um"):
        DiTConfig(dose_range_um=(50.0, 5.0))


def test_dose_gate_returns_to_the_control_below_the_trained_doses():
    """Far below the trained doses a compound's velocity is the control cells' (the ungated model
    extrapolates its dose features there instead); within them it is the compound's own."""
    model = _perturbed_model(seed=1, dose_range_um=(5.0, 50.0))
    x, t = torch.randn(3, 3, 4, 4), torch.rand(3)
    low = _dose_cond([-6.0, -6.0, -6.0], bits_seed=4)
    control = _dose_cond([-6.0, -6.0, -6.0], role=ROLE_CONTROL, bits_seed=4)
    assert torch.allclose(model(x, t, low), model(x, t, control), atol=1e-5)
    trained = _dose_cond([1.0, 1.0, 1.0], bits_seed=4)
    assert not torch.allclose(model(x, t, trained), model(x, t, control), atol=1e-3)
    ungated = ImageDiT(DiTConfig(**{**CFG.to_dict(), "dose_gate": False, "dose_range_um": (5.0, 50.0)}))
    assert ungated.gate_head is None
    old = {k: v for k, v in CFG.to_dict().items() if k not in ("dose_gate", "dose_range_um")}
    assert DiTConfig.from_dict(old).dose_gate is False  # models saved before the gate load without it
    assert ImageDiT(CFG).gate_head is None  # no treated doses known: nothing to gate


def test_randomized_prior_kernel_closed_form():
    # f(u1) . f(u2) -> E cos(omega (u1 - u2)) = exp(-d^2 / (2 l^2)) for omega ~ N(0, 1 / l^2)
    torch.manual_seed(0)
    prior = RandomizedPrior(latent_channels=3, n_features=40_000, scale=2.0, dose_scale=0.4)
    f = prior.features(_dose_cond([0.0, 0.0, 0.2, 0.5, 1.0]))
    gram = f @ f.T
    for j, d in zip(range(1, 5), (0.0, 0.2, 0.5, 1.0)):
        assert abs(float(gram[0, j]) - float(np.exp(-d**2 / (2 * 0.4**2)))) < 0.02
    # two compounds at one dose: exp(-4 (1 - cosine of their fingerprints))
    a, b = _dose_cond([0.3], bits_seed=1), _dose_cond([0.3], bits_seed=2)
    b.fingerprint_bits = torch.maximum(a.fingerprint_bits, b.fingerprint_bits)  # shares a's bits plus others
    cos = float(torch.nn.functional.cosine_similarity(a.fingerprint_bits, b.fingerprint_bits))
    assert 0.5 < cos < 0.9
    assert abs(float(prior.features(a) @ prior.features(b).T) - np.exp(-4 * (1 - cos))) < 0.02
    assert torch.allclose(prior(a), 2.0 * prior.features(a) @ prior.amplitude)


def test_randomized_prior_only_moves_treated_cells_and_is_saved():
    cfg = DiTConfig(**{**CFG.to_dict(), "prior_scale": 1.0})
    torch.manual_seed(3)
    model = ImageDiT(cfg)
    x, t = torch.randn(2, 3, 4, 4), torch.rand(2)
    v = model(x, t, _dose_cond([0.0, 1.0]))  # zero-init network: the velocity is the prior alone
    assert torch.allclose(v, model.prior(_dose_cond([0.0, 1.0]))[:, :, None, None].expand_as(v))
    assert not torch.allclose(v[0], v[1])  # depends on dose
    for role in (ROLE_CONTROL, ROLE_NULL):
        assert torch.all(model(x, t, _dose_cond([0.0, 1.0], role=role)) == 0)
    torch.manual_seed(4)
    other = ImageDiT(cfg)  # another member draws another prior
    assert not torch.allclose(other(x, t, _dose_cond([0.0, 1.0])), v)
    other.load_state_dict(model.state_dict())  # the prior is part of the checkpoint
    assert torch.equal(other(x, t, _dose_cond([0.0, 1.0])), v)
    # without a prior the other weights initialise exactly as before
    torch.manual_seed(3)
    plain = ImageDiT(CFG)
    assert all(torch.equal(a, model.state_dict()[k]) for k, a in plain.state_dict().items())
    with pytest.raises(ValueError, match="prior_scale"):
        DiTConfig(prior_scale=-1.0)
