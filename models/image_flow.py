"""One image flow-matching member: intensity normalisation, training data, training, sampling.

A member maps a *source* to treated-cell latents (latents of the shared
:mod:`models.image_autoencoder`), with the linear path of :mod:`models.flow_matching`::

    x_t = (1 - t) x_0 + t x_1,    target v = x_1 - x_0,    v_theta = ImageDiT(x_t, t, cond)

Source modes (``FlowConfig.mode``):

* ``noise``: x_0 ~ N(0, I). The plate enters through the control-set encoder (see
  :mod:`models.image_dit`), so a plate never seen in training is conditioned on its own DMSO
  cells; with no controls the learned null-plate token is used.
* ``control``: x_0 = DMSO control cells of the *same plate* as the target cells. Each training
  batch is made of plate blocks (``block_size`` target cells of one plate and condition +
  ``block_size`` controls of that plate); inside every block source and target are paired by
  exact minibatch optimal transport (``ot.emd``, squared Euclidean cost on latents), never
  across plates. ``source_noise`` = sigma > 0 adds ``sigma * N(0, I)`` to the paired control
  latents (after pairing, in training and in sampling alike; CellFlux's noise injection): the
  ODE is then not a deterministic map of the plate's controls, and has its own randomness to
  spread the treated cells beyond what the control cells alone give.

Training data are drawn block by block: a block is one (plate, compound, dose) group; DMSO
groups are drawn with probability ``control_fraction`` (teaching the null compound =
control phenotype), treated groups otherwise, weighted by bootstrap counts of compounds.
Label dropout (``label_dropout``: compound -> null; ``plate_dropout``: controls -> null-plate
token) trains the unconditional branch used for classifier-free guidance and for the
``unconditional`` baseline. Every random draw of step ``s`` comes from a generator seeded with
``(seed, s)``; sampling is reproducible from its seed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import ot
import torch
from torch import Tensor

from models.flow_matching import EMA, cfm_loss, sample_euler, sample_heun, sample_time
from models.image_autoencoder import AutoencoderConfig
from models.image_dit import (
    ROLE_COMPOUND, ROLE_CONTROL, ROLE_NULL, DiTConfig, ImageCondition, ImageDiT, control_summary,
    control_summary_dim,
)

logger = logging.getLogger(__name__)

SourceMode = Literal["noise", "control"]


# ----------------------------------------------------------------------------- configuration
SAMPLERS = {"euler": sample_euler, "heun": sample_heun}  # fixed-step integrators by name


def check_sampler(name: str) -> str:
    """``name`` if it is a key of :data:`SAMPLERS`, else ValueError naming the valid ones."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be 'euler' or 'heun', got {name!r}")
    return name


@dataclass(frozen=True)
class FlowConfig:
    """Options of one flow member (saved as JSON with it). Defaults: the 2-core CPU config
    (control mode; 1,000 steps of batch 128 take about 22 min on 2 CPU cores, 30 s on an H100).

    ``time_logit_mean``: location of the logit-normal training times (``time_scheme``
    ``logit_normal``; 0 = SD3's default): below 0 more weight near the source (t = 0), above 0
    near the data. -0.5 won 11 of 12 plate hold-out comparisons in one training (session 22)
    and lost the 15 uM Inception scores in two retrains (session 23, docs/STATUS_LOG.md); the
    default stays 0.
    ``lr_schedule`` (:func:`learning_rate`): ``constant`` after the warm-up (default) or ``cosine``
    down to 0 at ``max_steps``; a resume with a larger ``max_steps`` stretches the cosine from there.
    ``source_noise``: sigma of the Gaussian noise added to the control source latents (control
    mode only; latents are standardised, so sigma is in latent standard deviations; 0 = none,
    the default). See :func:`add_source_noise`. ``source_noise_on``: ``all`` source cells (the
    default) or only those of ``treated`` conditions (a compound at a dose, label dropped or not),
    so DMSO cells stay a map of the plate's controls and only the response gets its own
    randomness (:meth:`source_sigma`).
    ``guidance_scale`` / ``guidance_reference``: classifier-free guidance at sampling
    (:func:`sample_latents`); 1.6 against the null token by default since session 16 (configs saved
    before keep the 1.0 they stored): the conditional flow falls short of the treated cells (the
    latent mean travels about 0.9 of the way), and guidance restores the distance (docs/STATUS_LOG.md, session
    16: FID-morph at a trained dose 32.8 -> 21.4 on Week4_27801)."""

    mode: SourceMode = "control"
    time_scheme: Literal["uniform", "logit_normal"] = "logit_normal"
    time_logit_mean: float = 0.0
    label_dropout: float = 0.1
    plate_dropout: float = 0.1
    control_fraction: float = 0.25
    batch_size: int = 128
    block_size: int = 32
    control_set_size: int = 64
    lr: float = 4e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    max_steps: int = 1000
    max_minutes: float = 45.0
    checkpoint_every: int = 100
    bootstrap: bool = True
    sampler: Literal["euler", "heun"] = "euler"
    n_steps: int = 20
    guidance_scale: float = 1.6
    guidance_reference: Literal["null", "control"] = "null"
    source_noise: float = 0.0
    source_noise_on: Literal["all", "treated"] = "all"
    guidance_gated: bool = True
    dit: DiTConfig = field(default_factory=DiTConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("noise", "control"):
            raise ValueError(f"mode must be 'noise' or 'control', got {self.mode!r}")
        if self.batch_size % self.block_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of block_size {self.block_size}")
        check_sampler(self.sampler)
        if self.time_scheme not in ("uniform", "logit_normal"):
            raise ValueError(f"time_scheme must be 'uniform' or 'logit_normal', got {self.time_scheme!r}")
        if not math.isfinite(self.time_logit_mean):
            raise ValueError(f"time_logit_mean must be finite, got {self.time_logit_mean}")
        if self.time_logit_mean != 0.0 and self.time_scheme != "logit_normal":
            raise ValueError(f"time_logit_mean {self.time_logit_mean} applies to time_scheme 'logit_normal', "
                             f"not {self.time_scheme!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not (math.isfinite(self.source_noise) and self.source_noise >= 0):
            raise ValueError(f"source_noise must be a finite sigma >= 0, got {self.source_noise}")
        check_guidance_reference(self.guidance_reference)
        check_guidance_scale(self.guidance_scale)
        if self.guidance_scale != 1.0 and self.guidance_reference == "null" and self.label_dropout == 0:
            raise ValueError(f"guidance_scale {self.guidance_scale} against the null token needs label_dropout > 0 "
                             "(label dropout is what trains the null token); use guidance_scale 1")
        if self.source_noise > 0 and self.mode != "control":
            raise ValueError(f"source_noise applies to the control source; mode {self.mode!r} already starts from noise")
        if self.source_noise_on not in ("all", "treated"):
            raise ValueError(f"source_noise_on must be 'all' or 'treated', got {self.source_noise_on!r}")

    def source_sigma(self, treated: bool) -> float:
        """The source noise sigma of a condition: ``source_noise``, or 0 for DMSO cells when
        ``source_noise_on`` is ``treated``."""
        return self.source_noise if treated or self.source_noise_on == "all" else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "FlowConfig":
        d = {"guidance_reference": "null", "guidance_scale": 1.0,  # saved before these options
             "guidance_gated": False, **d}
        d["dit"] = DiTConfig.from_dict(d["dit"])
        return FlowConfig(**d)


# ----------------------------------------------------------------------------- normalisation
@dataclass(frozen=True)
class ChannelNorm:
    """Robust per-channel intensity normalisation: ``x = 2 (v - lo) / (hi - lo) - 1`` with lo, hi the
    ``q_low`` / ``q_high`` percentiles of the training crops (stored with the model)."""

    lo: tuple[float, ...]
    hi: tuple[float, ...]
    q_low: float = 0.5
    q_high: float = 99.5

    @staticmethod
    def fit(images: np.ndarray, q_low: float = 0.5, q_high: float = 99.5, max_pixels: int = 4_000_000,
            seed: int = 0) -> "ChannelNorm":
        """Percentiles per channel of ``images: N x H x W x C`` (a fixed-seed pixel subsample when large)."""
        flat = images.reshape(-1, images.shape[-1])
        if len(flat) > max_pixels:
            flat = flat[np.random.default_rng(seed).choice(len(flat), max_pixels, replace=False)]
        lo = np.percentile(flat, q_low, axis=0)
        hi = np.percentile(flat, q_high, axis=0)
        hi = np.maximum(hi, lo + 1.0)
        return ChannelNorm(tuple(float(v) for v in lo), tuple(float(v) for v in hi), q_low, q_high)

    def normalize(self, images: np.ndarray) -> Tensor:
        """uint16 ``N x H x W x C`` -> float32 ``N x C x H x W``."""
        lo, hi = np.asarray(self.lo, np.float32), np.asarray(self.hi, np.float32)
        if images.shape[-1] != len(lo):
            raise ValueError(f"images have {images.shape[-1]} channels, normalisation has {len(lo)}")
        x = (images.astype(np.float32) - lo) / (hi - lo) * 2.0 - 1.0
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def to_raw(self, x: Tensor) -> Tensor:
        """float ``N x C x H x W`` normalised -> raw intensities, same shape (unclipped)."""
        lo = torch.tensor(self.lo, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        hi = torch.tensor(self.hi, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x + 1.0) / 2.0 * (hi - lo) + lo

    def denormalize(self, x: Tensor) -> np.ndarray:
        """float ``N x C x H x W`` -> uint16 ``N x H x W x C`` (clipped to the uint16 range)."""
        v = self.to_raw(x.detach().cpu().float()).numpy().transpose(0, 2, 3, 1)
        return np.clip(np.rint(v), 0, 65535).astype(np.uint16)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ChannelNorm":
        return ChannelNorm(tuple(d["lo"]), tuple(d["hi"]), d["q_low"], d["q_high"])


# ----------------------------------------------------------------------------- training data
@dataclass
class LatentData:
    """Latent training cells and their labels (all ``n`` rows aligned).

    z: ``n x c x h x w`` normalised latents; plate: ``n`` int plate index into ``plate_ids``;
    compound: ``n`` int index into ``compounds`` (-1 = DMSO); fingerprint_bits: ``n_compounds x 2048``;
    dose_um: ``n`` (0 for DMSO).
    """

    z: Tensor
    plate: np.ndarray
    compound: np.ndarray
    dose_um: np.ndarray
    plate_ids: list[str]
    compounds: list[str]
    fingerprint_bits: Tensor

    def groups(self) -> dict[tuple[int, int, float], np.ndarray]:
        """(plate, compound, dose) -> row indices."""
        keys = list(zip(self.plate.tolist(), self.compound.tolist(), np.round(self.dose_um, 6).tolist()))
        out: dict[tuple[int, int, float], list[int]] = {}
        for i, k in enumerate(keys):
            out.setdefault(k, []).append(i)
        return {k: np.asarray(v) for k, v in sorted(out.items())}

    def controls_of_plate(self, plate: int) -> np.ndarray:
        return np.flatnonzero((self.plate == plate) & (self.compound < 0))


def bootstrap_compound_weights(n_compounds: int, seed: int, enabled: bool) -> np.ndarray:
    """How often each compound is drawn in a bootstrap resample of compounds (ones if disabled)."""
    if not enabled or n_compounds == 0:
        return np.ones(n_compounds)
    rng = np.random.default_rng([seed, 7919])
    return np.bincount(rng.integers(0, n_compounds, n_compounds), minlength=n_compounds).astype(float)


@dataclass
class BlockSampler:
    """Draws plate blocks for training (see module docstring)."""

    data: LatentData
    config: FlowConfig
    compound_weights: np.ndarray

    def __post_init__(self) -> None:
        groups = self.data.groups()
        self.control_groups = [k for k in groups if k[1] < 0]
        self.treated_groups = [k for k in groups if k[1] >= 0 and self.compound_weights[k[1]] > 0]
        self.rows = groups
        if not self.control_groups:
            raise ValueError("training data hold no DMSO control cells")
        for k in groups:
            if len(self.data.controls_of_plate(k[0])) == 0:
                raise ValueError(f"plate {self.data.plate_ids[k[0]]} has treated cells but no DMSO cells")
        w = np.asarray([self.compound_weights[k[1]] for k in self.treated_groups], dtype=float)
        self.treated_p = w / w.sum() if len(w) else w

    def draw(self, gen: torch.Generator, rng: np.random.Generator) -> tuple[Tensor, Tensor, ImageCondition]:
        """One batch: ``x_0, x_1: b x c x h x w`` and conditions (``b`` rows, blocks of one plate)."""
        cfg, data = self.config, self.data
        n_blocks = cfg.batch_size // cfg.block_size
        x0s, x1s, conds = [], [], []
        for _ in range(n_blocks):
            use_control = (not self.treated_groups) or rng.random() < cfg.control_fraction
            if use_control:
                key = self.control_groups[rng.integers(len(self.control_groups))]
            else:
                key = self.treated_groups[rng.choice(len(self.treated_groups), p=self.treated_p)]
            rows = self.rows[key]
            x1 = data.z[rng.choice(rows, cfg.block_size, replace=len(rows) < cfg.block_size)]
            ctrl_rows = data.controls_of_plate(key[0])
            summary_rows = rng.choice(ctrl_rows, min(cfg.control_set_size, len(ctrl_rows)), replace=False)
            summary = control_summary(data.z[summary_rows])
            if cfg.mode == "control":
                x0 = data.z[rng.choice(ctrl_rows, cfg.block_size, replace=len(ctrl_rows) < cfg.block_size)]
                x0, x1 = ot_pair(x0, x1)
                x0 = add_source_noise(x0, cfg.source_sigma(treated=key[1] >= 0), gen)
            else:
                x0 = torch.randn(x1.shape, generator=gen)
            x0s.append(x0)
            x1s.append(x1)
            conds.append(block_condition(data, key, summary, cfg.block_size))
        cond = _cat_conditions(conds)
        cond = _drop_labels(cond, cfg, rng)
        return torch.cat(x0s), torch.cat(x1s), cond


def ot_pair(x_0: Tensor, x_1: Tensor) -> tuple[Tensor, Tensor]:
    """Exact minibatch OT pairing of ``x_0: m x ...`` and ``x_1: n x ...`` (``ot.emd``, uniform weights,
    squared Euclidean cost). For m == n the plan is a permutation; returns ``(x_0, x_1[perm])``
    re-ordered so row i of each is a transport pair."""
    a, b = x_0.flatten(1).double(), x_1.flatten(1).double()
    cost = torch.cdist(a, b) ** 2
    plan = ot.emd(np.full(len(a), 1.0 / len(a)), np.full(len(b), 1.0 / len(b)), cost.numpy())
    i, j = np.nonzero(plan > 1e-12)
    return x_0[torch.as_tensor(i)], x_1[torch.as_tensor(j)]


def add_source_noise(x_0: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """``x_0 + sigma * eps`` with ``eps ~ N(0, I)`` drawn from ``generator`` (``x_0`` itself, and no
    draw, when ``sigma == 0``, so models without the option sample exactly as before)."""
    if sigma == 0:
        return x_0
    return x_0 + sigma * torch.randn(x_0.shape, generator=generator).to(x_0)


def block_condition(data: LatentData, key: tuple[int, int, float], summary: Tensor, n: int) -> ImageCondition:
    plate, compound, dose = key
    bits = data.fingerprint_bits[compound] if compound >= 0 else torch.zeros(data.fingerprint_bits.shape[1])
    treated = compound >= 0
    return ImageCondition(
        fingerprint_bits=bits.expand(n, -1),
        log10_dose_um=torch.full((n,), float(np.log10(dose)) if treated else 0.0),
        role=torch.full((n,), ROLE_COMPOUND if treated else ROLE_CONTROL, dtype=torch.long),
        control_summary=summary.expand(n, -1),
        has_controls=torch.ones(n, dtype=torch.bool),
    )


def _cat_conditions(conds: list[ImageCondition]) -> ImageCondition:
    return ImageCondition(*(torch.cat([getattr(c, f) for c in conds]) for f in ImageCondition.__dataclass_fields__))


def _drop_labels(cond: ImageCondition, cfg: FlowConfig, rng: np.random.Generator) -> ImageCondition:
    b = cond.role.shape[0]
    drop_cmp = torch.from_numpy(rng.random(b) < cfg.label_dropout)
    keep_pl = torch.from_numpy(rng.random(b) >= cfg.plate_dropout)
    role = torch.where(drop_cmp, torch.full_like(cond.role, ROLE_NULL), cond.role)
    return ImageCondition(cond.fingerprint_bits, cond.log10_dose_um, role,
                          cond.control_summary, cond.has_controls & keep_pl)


# ----------------------------------------------------------------------------- training
def train_flow(
    data: LatentData,
    config: FlowConfig,
    *,
    seed: int,
    state: dict | None = None,
    checkpoint_fn=None,
    device: torch.device | str = "cpu",
) -> tuple[ImageDiT, dict]:
    """Train one member's velocity network on ``device``; returns (EMA model on CPU, eval mode, final state).

    Batches are drawn on the CPU (same draws on any device) and moved to ``device``.

    Stops after ``config.max_steps`` steps or ``config.max_minutes`` (wall clock, counted across
    resumes). ``state`` resumes (model, optimizer, EMA, step); ``checkpoint_fn(state)`` is called
    every ``config.checkpoint_every`` steps and at the end.
    """
    if data.z.shape[1] != config.dit.latent_channels or data.z.shape[2] != config.dit.latent_size:
        raise ValueError(f"latents {tuple(data.z.shape[1:])} do not match the DiT config {config.dit}")
    torch.manual_seed(seed)  # parameter initialisation only
    model = ImageDiT(config.dit).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(model, decay=config.ema_decay)
    step, elapsed_s = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        step, elapsed_s = int(state["step"]), float(state["elapsed_s"])
        logger.info("resuming flow member at step %d (%.0f s done)", step, elapsed_s)
    weights = bootstrap_compound_weights(len(data.compounds), seed, config.bootstrap)
    sampler = BlockSampler(data, config, weights)
    model.train()
    t_start = time.perf_counter() - elapsed_s
    while step < config.max_steps and time.perf_counter() - t_start < 60 * config.max_minutes:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rng = np.random.default_rng([seed, step])
        x_0, x_1, cond = sampler.draw(gen, rng)
        t = sample_time(x_0.shape[0], gen, config.time_scheme, logit_mean=config.time_logit_mean).to(device)
        x_0, x_1, cond = x_0.to(device), x_1.to(device), cond.to(device)
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, config)
        loss = cfm_loss(model, x_0, x_1, t, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        step += 1
        if step % 50 == 0 or step == 1:
            logger.info("flow step %d loss %.4f (%.0f s)", step, float(loss.detach()), time.perf_counter() - t_start)
        if checkpoint_fn is not None and step % config.checkpoint_every == 0:
            checkpoint_fn(_flow_state(model, opt, ema, step, time.perf_counter() - t_start))
    final = _flow_state(model, opt, ema, step, time.perf_counter() - t_start)
    if checkpoint_fn is not None:
        checkpoint_fn(final)
    ema_model = ema.averaged_copy(model).cpu().eval()
    return ema_model, final


def learning_rate(step: int, config: FlowConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up over ``warmup_steps``, then
    constant, or (``lr_schedule="cosine"``) ``lr * (1 + cos(pi * s)) / 2`` with ``s`` going from 0 after
    the warm-up to 1 at ``max_steps``."""
    warm = config.lr * min(1.0, (step + 1) / config.warmup_steps)
    if config.lr_schedule == "constant" or step < config.warmup_steps:
        return warm
    s = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * s))


def _flow_state(model, opt, ema, step: int, elapsed_s: float) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state_dict(),
            "step": step, "elapsed_s": elapsed_s}


# ----------------------------------------------------------------------------- sampling
GUIDANCE_REFERENCES = ("null", "control")


def check_guidance_reference(reference: str) -> str:
    if reference not in GUIDANCE_REFERENCES:
        raise ValueError(f"guidance_reference must be one of {GUIDANCE_REFERENCES}, got {reference!r}")
    return reference


def check_guidance_scale(scale: float) -> float:
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"guidance_scale must be a finite w >= 0, got {scale}")
    return scale


@torch.no_grad()
def sample_latents(
    model: ImageDiT,
    cond: ImageCondition,
    x_0: Tensor,
    *,
    n_steps: int,
    sampler: str = "euler",
    guidance_scale: float = 1.0,
    guidance_reference: str = "null",
    guidance_gated: bool = False,
) -> Tensor:
    """Integrate the learned flow from ``x_0: b x c x h x w`` (noise or control latents) to t=1.

    Classifier-free guidance ``v = v_ref + w (v_cond - v_ref)`` with ``w = guidance_scale``;
    ``guidance_reference`` picks ``v_ref``: ``'null'`` the null compound token (the usual CFG), or
    ``'control'`` the same cells labelled DMSO, which scales the compound's effect over the plate's
    control cells by ``w`` and leaves DMSO cells (and compounds whose dose gate is closed) as they are.

    ``guidance_gated``: each row's scale is ``1 + (w - 1) g`` with ``g: b`` its compound gate
    (:meth:`ImageDiT.compound_gate`: the dose gate for compounds, 0 for DMSO): full guidance
    where the compound acts, none where its gate is closed, so a compound at a dose it does not
    act at gets the DMSO cells' plain velocity, not the guidance's push away from the null token."""
    model.eval()
    check_guidance_scale(guidance_scale)
    control_ref = check_guidance_reference(guidance_reference) == "control"
    reference = cond.as_control() if control_ref else cond.without_compound()
    uncond_fn = (lambda x, t, _c: model(x, t, reference)) if guidance_scale != 1.0 else None
    scale: float | Tensor = guidance_scale
    if guidance_gated and guidance_scale != 1.0:
        scale = 1.0 + (guidance_scale - 1.0) * model.compound_gate(cond)  # b
    integrate = SAMPLERS[check_sampler(sampler)]
    return integrate(model, x_0, n_steps, cond, guidance_scale=scale, uncond_velocity_fn=uncond_fn)


def sampling_condition(
    fingerprint_bits: Tensor | None,
    dose_um: float,
    z_controls: Tensor | None,
    n: int,
    latent_channels: int,
    *,
    unconditional: bool = False,
) -> ImageCondition:
    """Condition of ``n`` cells: a compound (unpacked bits ``2048``; ``None`` = DMSO control) at
    ``dose_um`` on the plate whose control latents are ``z_controls: m x c x h x w``
    (``None`` or empty = the learned null-plate token). ``unconditional``: the null compound
    token (no compound / dose information), plate conditioning kept."""
    treated = fingerprint_bits is not None and not unconditional
    if not (math.isfinite(dose_um) and dose_um >= 0):
        raise ValueError(f"dose_um must be a finite dose >= 0, got {dose_um}")
    if treated and not dose_um > 0:
        raise ValueError(f"dose_um must be > 0 for a compound, got {dose_um}")
    bits = fingerprint_bits.float() if treated else torch.zeros(2048)
    has = z_controls is not None and len(z_controls) > 0
    summary = control_summary(z_controls) if has else torch.zeros(control_summary_dim(latent_channels))
    return ImageCondition(
        fingerprint_bits=bits.expand(n, -1),
        log10_dose_um=torch.full((n,), float(np.log10(dose_um)) if treated else 0.0),
        role=torch.full((n,), ROLE_NULL if unconditional else ROLE_COMPOUND if treated else ROLE_CONTROL,
                        dtype=torch.long),
        control_summary=summary.expand(n, -1),
        has_controls=torch.full((n,), has, dtype=torch.bool),
    )


def source_indices(n: int, n_controls: int, generator: torch.Generator) -> Tensor:
    """Which of ``n_controls`` control cells feed ``n`` samples: a random subset, or draws with
    replacement when fewer than ``n``."""
    if n_controls < 1:
        raise ValueError("control mode needs the plate's control cells as the source")
    if n_controls < n:
        return torch.randint(0, n_controls, (n,), generator=generator)
    return torch.randperm(n_controls, generator=generator)[:n]


def source_latents(
    mode: SourceMode,
    n: int,
    latent_shape: tuple[int, int, int],
    z_controls: Tensor | None,
    generator: torch.Generator,
    source_noise: float = 0.0,
) -> Tensor:
    """``x_0: n x c x h x w``: Gaussian noise, or (control mode) ``n`` control latents of the plate
    (:func:`source_indices`) plus ``source_noise`` (:func:`add_source_noise`)."""
    if mode == "noise":
        return torch.randn((n, *latent_shape), generator=generator)
    return control_source(n, z_controls, generator, source_noise)[0]


def control_source(n: int, z_controls: Tensor | None, generator: torch.Generator,
                   source_noise: float = 0.0) -> tuple[Tensor, Tensor]:
    """Control-mode source: ``(x_0: n x c x h x w, idx: n)``, the plate's control latents
    ``z_controls[idx]`` (:func:`source_indices`) plus ``source_noise`` (:func:`add_source_noise`)."""
    if z_controls is None or len(z_controls) == 0:
        raise ValueError("control mode needs the plate's control cells as the source")
    idx = source_indices(n, len(z_controls), generator)
    return add_source_noise(z_controls[idx], source_noise, generator), idx


# ----------------------------------------------------------------------------- persistence
def save_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def save_torch(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(obj, tmp)
    except RuntimeError as err:  # torch's "unexpected pos" on a full disk names neither the disk nor the file
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path} (disk full?): {err}") from err
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict | None:
    """A training checkpoint (None when there is none); ValueError naming a file that cannot be read
    (cut short). The file is left in place: the message says to delete it to train that stage from
    its start."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: unreadable checkpoint ({err}); delete it to train that stage from its "
                         "start") from err


def autoencoder_config_for(in_channels: int, base: AutoencoderConfig) -> AutoencoderConfig:
    return replace(base, in_channels=in_channels)
