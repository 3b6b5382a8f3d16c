import math

import pytest
import torch
from torch import nn

from models.flow_matching import (
    EMA,
    cfm_loss,
    interpolate,
    sample_euler,
    sample_heun,
    sample_time,
    target_velocity,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3), (2, 3, 8, 8)])
def test_interpolate_endpoints_and_midpoint_any_shape(shape):
    x_0 = torch.randn(shape, generator=_gen(1))
    x_1 = torch.randn(shape, generator=_gen(2))
    b = shape[0]
    assert torch.equal(interpolate(x_0, x_1, torch.zeros(b)), x_0)
    assert torch.allclose(interpolate(x_0, x_1, torch.ones(b)), x_1)
    assert torch.allclose(interpolate(x_0, x_1, torch.full((b,), 0.5)), (x_0 + x_1) / 2)
    # per-sample times broadcast over trailing dims
    t = torch.linspace(0, 1, b)
    x_t = interpolate(x_0, x_1, t)
    for i in range(b):
        assert torch.allclose(x_t[i], (1 - t[i]) * x_0[i] + t[i] * x_1[i])


def test_interpolate_rejects_mismatched_shapes_and_times():
    with pytest.raises(ValueError, match="same shape"):
        interpolate(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="length b=2"):
        interpolate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))


def test_target_velocity_is_difference():
    x_0 = torch.randn(6, 4, generator=_gen(3))
    x_1 = torch.randn(6, 4, generator=_gen(4))
    assert torch.allclose(target_velocity(x_0, x_1), x_1 - x_0)


def test_sample_time_schemes_range_and_reproducible():
    t_u = sample_time(10_000, _gen(0), "uniform")
    assert t_u.shape == (10_000,) and t_u.min() >= 0 and t_u.max() < 1
    assert abs(float(t_u.mean()) - 0.5) < 0.02
    t_l = sample_time(10_000, _gen(0), "logit_normal")
    assert t_l.min() > 0 and t_l.max() < 1
    # logit-normal(0, 1) is symmetric around 0.5 and more concentrated than uniform
    assert abs(float(t_l.mean()) - 0.5) < 0.02
    assert float(t_l.var()) < float(t_u.var())
    assert torch.equal(sample_time(7, _gen(5), "logit_normal"), sample_time(7, _gen(5), "logit_normal"))
    with pytest.raises(ValueError, match="unknown time scheme"):
        sample_time(3, _gen(0), "cosine")


def test_shift_closed_form_velocity_has_zero_loss_and_one_euler_step_is_exact():
    # x_0 ~ N(0, I), x_1 = x_0 + c: the exact velocity field is the constant c
    c = torch.tensor([3.0, -1.0, 0.5])
    x_0 = torch.randn(256, 3, generator=_gen(7))
    x_1 = x_0 + c

    def v_exact(x_t, t, cond):
        return c.expand_as(x_t)

    t = sample_time(256, _gen(8))
    assert float(cfm_loss(v_exact, x_0, x_1, t)) == pytest.approx(0.0, abs=1e-10)
    # a wrong field gives exactly ||c - wrong||^2 / d
    assert float(cfm_loss(lambda x, t, _: torch.zeros_like(x), x_0, x_1, t)) == pytest.approx(
        float((c**2).mean()), rel=1e-5
    )
    assert torch.allclose(sample_euler(v_exact, x_0, 1), x_1, atol=1e-6)
    assert torch.allclose(sample_heun(v_exact, x_0, 3), x_1, atol=1e-6)


def test_heun_is_exact_for_time_affine_field_and_euler_is_not():
    a = torch.tensor([1.0, 2.0])
    b = torch.tensor([4.0, -2.0])

    def v(x_t, t, cond):  # dx/dt = a + b t  ->  x(1) = x(0) + a + b / 2
        return a + b * t[:, None]

    x_0 = torch.randn(5, 2, generator=_gen(9))
    exact = x_0 + a + b / 2
    assert torch.allclose(sample_heun(v, x_0, 1), exact, atol=1e-6)
    assert torch.allclose(sample_heun(v, x_0, 4), exact, atol=1e-6)
    # Euler with n steps has error b / (2 n)
    assert torch.allclose(sample_euler(v, x_0, 4), exact - b / 8, atol=1e-6)


def test_heun_second_order_on_linear_ode():
    # dx/dt = -x : x(1) = x(0) e^{-1}; Heun error ~ h^2, Euler error ~ h
    def v(x_t, t, cond):
        return -x_t

    x_0 = torch.ones(1, 1, dtype=torch.float64)
    exact = math.exp(-1)
    err_h = [abs(float(sample_heun(v, x_0, n)) - exact) for n in (4, 8)]
    err_e = [abs(float(sample_euler(v, x_0, n)) - exact) for n in (4, 8)]
    assert err_h[0] / err_h[1] == pytest.approx(4.0, rel=0.15)
    assert err_e[0] / err_e[1] == pytest.approx(2.0, rel=0.15)


def test_samplers_pass_cond_and_work_on_image_shapes():
    x_0 = torch.zeros(2, 3, 4, 4)
    cond = torch.tensor([1.0, -2.0])

    def v(x_t, t, c):
        return c.view(-1, 1, 1, 1).expand_as(x_t)

    out = sample_euler(v, x_0, 5, cond)
    assert out.shape == x_0.shape
    assert torch.allclose(out[0], torch.ones(3, 4, 4)) and torch.allclose(out[1], -2 * torch.ones(3, 4, 4))


def test_classifier_free_guidance_combination():
    x_0 = torch.zeros(3, 2)

    def v_cond(x, t, c):
        return torch.full_like(x, 2.0)

    def v_uncond(x, t, c):
        return torch.full_like(x, 0.5)

    # v = u + w (c - u) = 0.5 + 3 * 1.5 = 5
    out = sample_euler(v_cond, x_0, 2, guidance_scale=3.0, uncond_velocity_fn=v_uncond)
    assert torch.allclose(out, torch.full_like(x_0, 5.0))
    out_h = sample_heun(v_cond, x_0, 2, guidance_scale=0.0, uncond_velocity_fn=v_uncond)
    assert torch.allclose(out_h, torch.full_like(x_0, 0.5))
    with pytest.raises(ValueError, match="uncond_velocity_fn"):
        sample_euler(v_cond, x_0, 2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="n_steps"):
        sample_euler(v_cond, x_0, 0)


def test_ema_update_formula_without_and_with_warmup():
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = EMA(lin, decay=0.9, warmup=False)
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(lin)  # 0.9 * 1 + 0.1 * 3 = 1.2
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.2))
    ema.update(lin)  # 0.9 * 1.2 + 0.1 * 3 = 1.38
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.38))
    target = nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.full((1, 2), 1.38))
    assert torch.allclose(lin.weight, torch.full((1, 2), 3.0))  # live weights untouched

    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema_w = EMA(lin, decay=0.999, warmup=True)
    assert ema_w.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    ema_w.update(lin)  # 0.1 * 1 + 0.9 * 2 = 1.9
    assert torch.allclose(ema_w.shadow["weight"], torch.full((1, 2), 1.9))
    assert ema_w.current_decay() == pytest.approx(2 / 11)

    restored = EMA(lin, decay=0.5)
    restored.load_state_dict(ema_w.state_dict())
    assert restored.n_updates == 1 and torch.equal(restored.shadow["weight"], ema_w.shadow["weight"])
    with pytest.raises(ValueError, match="decay"):
        EMA(lin, decay=1.0)
