"""Conditional flow matching (rectified-flow / linear path), shape-agnostic.

Path and target (Lipman et al. 2023, Liu et al. 2023)::

    x_t = (1 - t) x_0 + t x_1          t in [0, 1], x_0 ~ noise, x_1 ~ data
    v   = d x_t / d t = x_1 - x_0      regression target of v_theta(x_t, t, cond)

Every function works on tensors of any shape ``b x ...`` (feature vectors
``b x f``, groups of cells ``b x n x f``, images ``b x c x h x w``); times are
``b`` vectors broadcast over the trailing dimensions.

A velocity function has the signature ``velocity_fn(x_t, t, cond) -> v`` with
``x_t: b x ...``, ``t: b``, ``cond`` anything the model understands (or None)
and ``v`` shaped like ``x_t``.

Samplers integrate ``dx/dt = v(x, t, cond)`` from t=0 to t=1 on a uniform grid of
``n_steps`` steps. Classifier-free guidance (Ho & Salimans 2022) combines a
conditional and an unconditional velocity::

    v_guided = v_uncond + guidance_scale * (v_cond - v_uncond)

so ``guidance_scale = 1`` is plain conditional sampling.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]
TimeScheme = Literal["uniform", "logit_normal"]

__all__ = [
    "EMA",
    "VelocityFn",
    "broadcast_time",
    "cfm_loss",
    "guided_velocity",
    "interpolate",
    "sample_euler",
    "sample_heun",
    "sample_time",
    "target_velocity",
    "time_grid",
]


def sample_time(
    batch: int,
    generator: torch.Generator,
    scheme: TimeScheme = "uniform",
    device: torch.device | str | None = None,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> Tensor:
    """Training times ``t: b`` in (0, 1) (float32).

    ``uniform``: t ~ U[0, 1). ``logit_normal``: t = sigmoid(u), u ~ N(logit_mean,
    logit_std^2) (SD3, Esser et al. 2024), which puts more weight on mid-path times.
    The generator must live on ``device`` (torch requirement); draws are made on the
    generator's device and moved.
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if logit_std <= 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    gen_device = generator.device
    if scheme == "uniform":
        t = torch.rand(batch, generator=generator, device=gen_device)
    elif scheme == "logit_normal":
        u = torch.randn(batch, generator=generator, device=gen_device) * logit_std + logit_mean
        t = torch.sigmoid(u)
    else:
        raise ValueError(f"unknown time scheme {scheme!r}; expected 'uniform' or 'logit_normal'")
    return t.to(device) if device is not None else t


def broadcast_time(t: Tensor | float, like: Tensor) -> Tensor:
    """``t: b`` (or scalar) -> ``b x 1 x ... x 1`` matching ``like: b x ...``."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"t must be a scalar or a vector of length b={like.shape[0]}, got shape {tuple(t.shape)}"
        )
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x_0: Tensor, x_1: Tensor, t: Tensor | float) -> Tensor:
    """Point on the linear path: ``x_t = (1 - t) x_0 + t x_1`` (``b x ...``)."""
    _check_same_shape(x_0, x_1)
    t_b = broadcast_time(t, x_0)
    return (1.0 - t_b) * x_0 + t_b * x_1


def target_velocity(x_0: Tensor, x_1: Tensor) -> Tensor:
    """Conditional target velocity of the linear path: ``v = x_1 - x_0`` (``b x ...``)."""
    _check_same_shape(x_0, x_1)
    return x_1 - x_0


def cfm_loss(
    velocity_fn: VelocityFn,
    x_0: Tensor,
    x_1: Tensor,
    t: Tensor,
    cond: Any = None,
) -> Tensor:
    """Conditional flow-matching loss, a scalar: ``mean || v_theta(x_t, t, cond) - (x_1 - x_0) ||^2``.

    Mean over the batch and all trailing elements (plain MSE).
    """
    x_t = interpolate(x_0, x_1, t)
    v_pred = velocity_fn(x_t, t, cond)
    if v_pred.shape != x_t.shape:
        raise ValueError(
            f"velocity_fn returned shape {tuple(v_pred.shape)}, expected {tuple(x_t.shape)}"
        )
    return torch.mean((v_pred - target_velocity(x_0, x_1)) ** 2)


def guided_velocity(
    velocity_fn: VelocityFn,
    x_t: Tensor,
    t: Tensor,
    cond: Any,
    *,
    guidance_scale: float | Tensor = 1.0,
    uncond_velocity_fn: VelocityFn | None = None,
) -> Tensor:
    """Velocity with optional classifier-free guidance (see module docstring).

    ``guidance_scale``: one scale, or one per row (``b``; broadcast over the other dimensions).
    ``uncond_velocity_fn`` is called with the same ``(x_t, t, cond)``; it is the
    caller's job to make it ignore/replace the condition (e.g. null tokens).
    """
    v_cond = velocity_fn(x_t, t, cond)
    if not isinstance(guidance_scale, Tensor) and guidance_scale == 1.0:
        return v_cond
    if uncond_velocity_fn is None:
        raise ValueError("guidance_scale != 1 needs an uncond_velocity_fn")
    v_uncond = uncond_velocity_fn(x_t, t, cond)
    if isinstance(guidance_scale, Tensor):
        guidance_scale = guidance_scale.to(v_cond).reshape(-1, *([1] * (v_cond.dim() - 1)))  # b x 1 x ...
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def time_grid(n_steps: int, device: torch.device | str | None = None) -> Tensor:
    """Uniform grid ``t_0 = 0 < ... < t_n = 1`` with ``n_steps + 1`` points."""
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    return torch.linspace(0.0, 1.0, int(n_steps) + 1, device=device)


@torch.no_grad()
def sample_euler(
    velocity_fn: VelocityFn,
    x_0: Tensor,
    n_steps: int,
    cond: Any = None,
    *,
    guidance_scale: float | Tensor = 1.0,
    uncond_velocity_fn: VelocityFn | None = None,
) -> Tensor:
    """Integrate from ``x_0: b x ...`` at t=0 to t=1 with ``n_steps`` explicit Euler steps.

    Exact for velocity fields that are constant along the trajectory (e.g. the
    closed-form field ``v = c`` of a pure shift x_1 = x_0 + c).
    """
    ts = time_grid(n_steps, device=x_0.device)
    x = x_0
    b = x_0.shape[0]
    for i in range(len(ts) - 1):
        t = ts[i].expand(b).to(x_0.dtype)
        dt = ts[i + 1] - ts[i]
        v = guided_velocity(
            velocity_fn, x, t, cond,
            guidance_scale=guidance_scale, uncond_velocity_fn=uncond_velocity_fn,
        )
        x = x + dt * v
    return x


@torch.no_grad()
def sample_heun(
    velocity_fn: VelocityFn,
    x_0: Tensor,
    n_steps: int,
    cond: Any = None,
    *,
    guidance_scale: float | Tensor = 1.0,
    uncond_velocity_fn: VelocityFn | None = None,
) -> Tensor:
    """Heun's method (explicit trapezoid, 2 velocity evaluations per step), t: 0 -> 1.

    ``x_{i+1} = x_i + dt/2 (v(x_i, t_i) + v(x_i + dt v(x_i, t_i), t_{i+1}))``.
    Second-order; exact for velocity fields that are affine in t and independent of x.
    """
    ts = time_grid(n_steps, device=x_0.device)
    x = x_0
    b = x_0.shape[0]

    def v_at(x_: Tensor, t_scalar: Tensor) -> Tensor:
        t = t_scalar.expand(b).to(x_0.dtype)
        return guided_velocity(
            velocity_fn, x_, t, cond,
            guidance_scale=guidance_scale, uncond_velocity_fn=uncond_velocity_fn,
        )

    for i in range(len(ts) - 1):
        dt = ts[i + 1] - ts[i]
        v_0 = v_at(x, ts[i])
        x_euler = x + dt * v_0
        v_1 = v_at(x_euler, ts[i + 1])
        x = x + 0.5 * dt * (v_0 + v_1)
    return x


class EMA:
    """Exponential moving average of a module's floating-point parameters.

    Update (after every optimiser step)::

        decay_n  = min(decay, (1 + n) / (10 + n))   if warmup else decay
        shadow  <- decay_n * shadow + (1 - decay_n) * param

    where ``n`` is the number of updates done so far. Buffers (non-trainable state)
    are copied as they are. ``copy_to(module)`` loads the averaged weights;
    ``state_dict()`` / ``load_state_dict()`` checkpoint it.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.n_updates = 0
        self.shadow: dict[str, Tensor] = {
            k: v.detach().clone() for k, v in module.state_dict().items()
        }

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.n_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        shadow_f, live_f = [], []
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if torch.is_floating_point(v):
                shadow_f.append(s)
                live_f.append(v.detach())
            else:
                s.copy_(v)
        if shadow_f:
            # shadow + (1 - d) (live - shadow) = d shadow + (1 - d) live, one fused call
            torch._foreach_lerp_(shadow_f, live_f, 1.0 - d)
        self.n_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict(self.shadow)

    def averaged_copy(self, module: nn.Module) -> nn.Module:
        """A deep copy of ``module`` carrying the averaged weights (``module`` untouched)."""
        clone = copy.deepcopy(module)
        self.copy_to(clone)
        return clone

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "n_updates": self.n_updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the module; differing keys: {sorted(missing)}")
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.n_updates = int(state["n_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def _check_same_shape(x_0: Tensor, x_1: Tensor) -> None:
    if x_0.shape != x_1.shape:
        raise ValueError(
            f"x_0 and x_1 must have the same shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}"
        )
