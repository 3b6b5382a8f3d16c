"""One member of the feature virtual assay: a conditional flow-matching model of single cells.

Model (all in the normalised feature space of ``FeatureNormalization``, F features)::

    x_0 ~ N(0, I_F)                      noise
    x_1 = asinh((x - center) / scale)    one cell's features (``feature_transform='asinh'``,
                                         the default; ``'none'`` drops the asinh)
    v_theta(x_t, t, cond)                residual MLP, adaLN-Zero conditioning (DiT style) on
                                         c = time_emb(t) + cond,
                                         cond = ConditionEncoder(compound | control | null,
                                                                 log10 dose, plate)

trained with the CFM loss ``|| v_theta(x_t, t, cond) - (x_1 - x_0) ||^2`` and sampled by
integrating the ODE from t=0 to 1 (Euler/Heun, ``config.n_sample_steps`` steps); samples are
mapped back with ``sinh`` so that profiles are computed in control units.

Why asinh: cell features are heavy-tailed. In the synthetic lab's ``toxicity`` class a fraction
of cells is apoptotic, with DNA intensities 15-25 control sd out; trained on the linear units,
the flow never reached them (median profile RMS of toxic training compounds 0.30 predicted vs
1.69 real, no better than inactive compounds); on asinh units it does (1.64 vs 1.69).

The network takes cells grouped by condition, ``x_t: b x n x F`` with ``cond: b x d``
(or ``b x F`` / ``b x d``), so per-condition work (embeddings, modulation) is done once
per compound, not once per cell.

``train_member`` writes into ``out_dir``:

    member.pt           EMA weights + architecture sizes (written last: marks completion)
    config.json         FeatureAssayConfig, seed, bootstrap, vocabularies, data fingerprint, timings
    normalization.json  per-feature center / scale (see models.training_data)
    data_fingerprint    sha256 of the training arrays (text)
    training_log.csv    step, loss (mean over the last log_every steps), lr, elapsed_s
    loss_curve.png      the log as a figure (config.write_loss_plot)
    checkpoint.pt       only while training: weights, EMA, optimiser, generator state, log

All randomness comes from ``torch.Generator``s seeded from the member's ``seed``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.conditioning import (
    ROLE_COMPOUND,
    ROLE_CONTROL,
    ROLE_NULL,
    UNKNOWN_PLATE,
    ConditionEncoder,
    TimeEmbedding,
    drop_labels,
)
from models.config import FeatureAssayConfig
from models.flow_matching import EMA, cfm_loss, sample_euler, sample_heun, sample_time
from models.training_data import FeatureNormalization, FeatureTrainingSet
from models.virtual_assay import check_doses, check_fingerprints, profiles_from_cells

log = logging.getLogger(__name__)

MEMBER_FORMAT_VERSION = 1
MEMBER_FILE = "member.pt"
CHECKPOINT_FILE = "checkpoint.pt"

__all__ = [
    "FeatureAssayMember",
    "FeatureVelocityNet",
    "derive_seed",
    "train_member",
]


# ---------------------------------------------------------------------------------------------
# network


class AdaLNBlock(nn.Module):
    """Pre-norm residual MLP block, modulated by the condition (adaLN-Zero: starts as identity)."""

    def __init__(self, width: int, cond_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, int(round(width * mlp_ratio)))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, width))
        self.modulation = nn.Linear(cond_dim, 3 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        # h: b x [n x] w, c: b x d (already passed through SiLU)
        shift, scale, gate = _per_row(self.modulation(c), h).chunk(3, dim=-1)  # b x [1 x] w each
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)  # b x [n x] w


class FeatureVelocityNet(nn.Module):
    """``v_theta(x_t: b x [n x] F, t: b, cond: b x d) -> b x [n x] F``; also owns the condition encoder."""

    def __init__(self, n_features: int, n_plates: int, config: FeatureAssayConfig) -> None:
        super().__init__()
        self.n_features = n_features
        self.n_plates = n_plates
        w, d = config.hidden_dim, config.cond_dim
        self.condition = ConditionEncoder(n_plates, d, config.fp_hidden_dim, config.n_dose_frequencies)
        self.time = TimeEmbedding(config.n_time_frequencies, d)
        self.input = nn.Linear(n_features, w)
        self.blocks = nn.ModuleList(AdaLNBlock(w, d, config.mlp_ratio) for _ in range(config.n_blocks))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(d, 2 * w)
        self.output = nn.Linear(w, n_features)
        for layer in (self.final_modulation, self.output):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def encode_condition(self, fingerprints: Tensor, role: Tensor, log10_dose_um: Tensor, plate_index: Tensor) -> Tensor:
        return self.condition(fingerprints, role, log10_dose_um, plate_index)  # b x d

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if x_t.shape[-1] != self.n_features or x_t.ndim not in (2, 3):
            raise ValueError(f"x_t must be b x F or b x n x F with F={self.n_features}, got {tuple(x_t.shape)}")
        c = F.silu(self.time(t) + cond)  # b x d
        h = self.input(x_t)  # b x [n x] w
        for block in self.blocks:
            h = block(h, c)  # b x [n x] w
        shift, scale = _per_row(self.final_modulation(c), h).chunk(2, dim=-1)  # b x [1 x] w
        return self.output(self.final_norm(h) * (1 + scale) + shift)  # b x [n x] F


def _per_row(m: Tensor, like: Tensor) -> Tensor:
    """Per-condition modulation ``b x k`` -> broadcastable to ``like`` (``b x k`` or ``b x 1 x k``)."""
    return m.unsqueeze(1) if like.ndim == 3 else m


# ---------------------------------------------------------------------------------------------
# trained member (inference)


@dataclass
class FeatureAssayMember:
    """A trained member loaded from its directory: samples cells and profiles."""

    net: FeatureVelocityNet
    config: FeatureAssayConfig
    normalization: FeatureNormalization
    plate_ids: tuple[str, ...]
    feature_names: tuple[str, ...]
    seed: int
    data_fingerprint: str
    member_dir: Path
    bootstrap: bool = False
    compound_ids: tuple[str, ...] | None = None  # training compounds (None: written before they were saved)

    @classmethod
    def load(cls, member_dir: Path, *, device: torch.device | str = "cpu") -> "FeatureAssayMember":
        member_dir = Path(member_dir)
        path = member_dir / MEMBER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{member_dir}: no {MEMBER_FILE} (member not trained or training incomplete)")
        meta = json.loads((member_dir / "config.json").read_text())
        config = FeatureAssayConfig.from_dict(meta["config"])
        normalization = FeatureNormalization.load(member_dir / "normalization.json")
        state = torch.load(path, map_location=device, weights_only=True)
        if state.get("format_version") != MEMBER_FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported member format {state.get('format_version')!r}")
        with torch.random.fork_rng(devices=[]):
            net = FeatureVelocityNet(int(state["n_features"]), int(state["n_plates"]), config)
        net.load_state_dict(state["model"])
        net.to(device).eval()
        return cls(net, config, normalization, tuple(meta["plate_ids"]), tuple(meta["feature_names"]),
                   int(meta["seed"]), str(meta["data_fingerprint"]), member_dir, bool(meta.get("bootstrap", False)),
                   tuple(meta["compound_ids"]) if "compound_ids" in meta else None)

    def in_bag(self, compound_ids: Sequence[str]) -> np.ndarray:
        """``n`` bool: True where the member trained on the compound (its bootstrap drew it).

        Compounds outside its training set are out of bag. A member saved before its
        training compounds were recorded counts every compound as in bag (no honest
        prediction can be claimed for any).
        """
        compound_ids = [str(c) for c in compound_ids]
        if self.compound_ids is None:
            return np.ones(len(compound_ids), dtype=bool)
        drawn = set(self.compound_ids)
        if self.bootstrap and self.compound_ids:
            draws = bootstrap_draws(len(self.compound_ids), self.seed)
            drawn = {self.compound_ids[i] for i in np.unique(draws)}
        return np.array([c in drawn for c in compound_ids], dtype=bool)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def plate_index(self, plate_id: str | None) -> int:
        """Index of ``plate_id`` in the training vocabulary; ``UNKNOWN_PLATE`` if None or unseen."""
        if plate_id is None:
            return UNKNOWN_PLATE
        try:
            return self.plate_ids.index(str(plate_id))
        except ValueError:
            log.info("plate %r not seen in training: using the unknown-plate token", plate_id)
            return UNKNOWN_PLATE

    def noise(self, n_cells: int, seed: int) -> Tensor:
        """Shared noise ``max(n_cells, n_control_cells) x F`` for one prediction call.

        Every compound (and the control) is sampled from the same first ``n_cells`` noise
        vectors (common random numbers): profile differences between compounds then reflect
        the model, not the Monte Carlo draw, and results do not depend on batching.
        """
        gen = torch.Generator().manual_seed(derive_seed(seed, self.seed, "predict"))
        n = max(n_cells, self.config.n_control_cells)
        return torch.randn(n, self.net.n_features, generator=gen).to(self.device)

    @torch.no_grad()
    def condition(self, fingerprints: np.ndarray, role: int, log10_dose_um: np.ndarray, plate_index: int) -> Tensor:
        b = len(fingerprints)
        dev = self.device
        return self.net.encode_condition(
            torch.from_numpy(np.ascontiguousarray(fingerprints)).to(dev),
            torch.full((b,), role, dtype=torch.long, device=dev),
            torch.as_tensor(log10_dose_um, dtype=torch.float32, device=dev),
            torch.full((b,), plate_index, dtype=torch.long, device=dev),
        )  # b x d

    @torch.no_grad()
    def sample(self, cond: Tensor, x_0: Tensor, plate_index: int) -> Tensor:
        """Integrate noise ``x_0: b x n x F`` to cells (normalised units) under ``cond: b x d``."""
        net = self.net
        cfg = self.config
        uncond_fn = None
        if cfg.guidance_scale != 1.0:
            null = self.condition(np.zeros((1, 256), np.uint8), ROLE_NULL, np.zeros(1), plate_index)  # 1 x d

            def uncond_fn(x, t, c):
                return net(x, t, null.expand(x.shape[0], -1))

        sampler = sample_euler if cfg.sampler == "euler" else sample_heun
        with torch.autocast(x_0.device.type, dtype=torch.bfloat16, enabled=cfg.sample_bf16):
            x_1 = sampler(net, x_0, cfg.n_sample_steps, cond,
                          guidance_scale=cfg.guidance_scale, uncond_velocity_fn=uncond_fn)
        return from_model_space(x_1.float(), cfg)

    @torch.no_grad()
    def control_stats(self, z: Tensor, n_cells: int, plate_index: int) -> tuple[Tensor, Tensor]:
        """Mean over the control cells sampled from the shared ``z[:n_cells]`` (paired with the
        compounds) and std over all ``len(z)`` control cells; each ``F``."""
        cond = self.condition(np.zeros((1, 256), np.uint8), ROLE_CONTROL, np.zeros(1), plate_index)
        cells = self.sample(cond, z.unsqueeze(0), plate_index)[0]  # n_ctrl x F
        return cells[:n_cells].mean(dim=0), cells.std(dim=0)

    @torch.no_grad()
    def predict_profiles(
        self,
        fingerprints: np.ndarray,
        dose_um: np.ndarray,
        *,
        n_cells: int = 32,
        seed: int = 0,
        plate_id: str | None = None,
        batch_size: int = 256,
    ) -> np.ndarray:
        """``float32 N x F`` profiles of this member (see models.virtual_assay)."""
        fingerprints = check_fingerprints(fingerprints)
        dose_um = check_doses(dose_um, len(fingerprints))
        _check_sizes(n_cells, batch_size)
        plate = self.plate_index(plate_id)
        z = self.noise(n_cells, seed)  # n_ctrl x F
        ctrl_mean, ctrl_std = self.control_stats(z, n_cells, plate)  # F, F
        z_cells = z[:n_cells]
        out = np.empty((len(fingerprints), self.net.n_features), dtype=np.float32)
        log10_dose = np.log10(dose_um)
        for start in range(0, len(fingerprints), batch_size):
            sl = slice(start, start + batch_size)
            cond = self.condition(fingerprints[sl], ROLE_COMPOUND, log10_dose[sl], plate)  # b x d
            x_0 = z_cells.unsqueeze(0).expand(cond.shape[0], -1, -1)  # b x n x F
            cells = self.sample(cond, x_0, plate)  # b x n x F
            out[sl] = profiles_from_cells(cells, ctrl_mean, ctrl_std).cpu().numpy()
        return out

    @torch.no_grad()
    def predict_cells(
        self,
        fingerprint: np.ndarray | None,
        dose_um: float,
        *,
        n_cells: int = 32,
        seed: int = 0,
        plate_id: str | None = None,
    ) -> np.ndarray:
        """``float32 n_cells x F`` sampled cells in raw feature units; ``fingerprint=None`` = control."""
        _check_sizes(n_cells, 1)
        plate = self.plate_index(plate_id)
        if fingerprint is None:
            cond = self.condition(np.zeros((1, 256), np.uint8), ROLE_CONTROL, np.zeros(1), plate)
        else:
            fp = check_fingerprints(np.asarray(fingerprint).reshape(1, -1), name="fingerprint")
            dose = check_doses(np.atleast_1d(np.asarray(dose_um, dtype=np.float64)), 1)
            cond = self.condition(fp, ROLE_COMPOUND, np.log10(dose), plate)
        z = self.noise(n_cells, seed)[:n_cells]
        cells = self.sample(cond, z.unsqueeze(0), plate)[0]  # n x F
        return self.normalization.invert(cells.cpu().numpy().astype(np.float64))


def to_model_space(z: Tensor, config: FeatureAssayConfig) -> Tensor:
    """Control-unit features ``z`` -> the space the flow models (``asinh(z)`` or ``z``).

    Cell features are heavy-tailed: a subpopulation phenotype (apoptotic cells: condensed,
    bright nuclei) sits 15-25 control sd out, where a Gaussian-source flow under-reaches;
    ``asinh`` is linear near 0 and logarithmic in the tails, and exactly invertible.
    """
    return torch.asinh(z) if config.feature_transform == "asinh" else z


def from_model_space(x: Tensor, config: FeatureAssayConfig) -> Tensor:
    """Inverse of ``to_model_space``: back to control units (where profiles are computed)."""
    return torch.sinh(x.clamp(-15.0, 15.0)) if config.feature_transform == "asinh" else x  # no overflow


def _check_sizes(n_cells: int, batch_size: int) -> None:
    if int(n_cells) != n_cells or n_cells < 2:
        raise ValueError(f"n_cells must be an integer >= 2, got {n_cells!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


# ---------------------------------------------------------------------------------------------
# training


def derive_seed(*parts: Any) -> int:
    """Deterministic 63-bit seed from any parts (so streams for one member are independent)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def train_member(
    train_set: FeatureTrainingSet,
    config: FeatureAssayConfig,
    seed: int,
    out_dir: Path,
    *,
    bootstrap: bool,
    resume: bool = True,
    device: torch.device | str = "cpu",
) -> Path:
    """Train one member into ``out_dir`` (see module docstring for the files); returns ``out_dir``.

    ``bootstrap=True`` trains on a resample of the compounds (with replacement, drawn with
    the member's seed; controls always kept). With ``resume=True`` a finished member with the
    same config, seed, bootstrap flag and data is returned as is, and an interrupted one
    continues from ``checkpoint.pt``; a directory holding a different member is an error.
    ``resume=False`` retrains from scratch and replaces the files when done.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = _member_identity(train_set, config, seed, bootstrap)
    if resume and (out_dir / MEMBER_FILE).is_file():
        _check_identity(out_dir, _read_json(out_dir / "config.json"), identity)
        log.info("%s: member already trained, skipping", out_dir)
        return out_dir

    x_1_all, compound_index, log10_dose, plate_index = _member_tensors(train_set, config, seed, bootstrap, device)
    fingerprints = torch.tensor(train_set.fingerprints, device=device)  # n_compounds x 256 (a copy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        net = FeatureVelocityNet(train_set.n_features, len(train_set.plate_ids), config).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  fused=True)
    ema = EMA(net, decay=config.ema_decay, warmup=True)
    gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "train"))
    history: list[dict[str, float]] = []
    loss_window: list[Tensor] = []  # losses since the last log row
    start_step, elapsed_before = 0, 0.0

    ckpt_path = out_dir / CHECKPOINT_FILE
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        _check_identity(out_dir, ckpt["identity"], identity)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["ema"])
        gen.set_state(ckpt["generator"])
        history, start_step, elapsed_before = ckpt["history"], int(ckpt["step"]), float(ckpt["elapsed_s"])
        loss_window = [torch.tensor(v) for v in ckpt["loss_window"]]
        log.info("%s: resuming at step %d / %d", out_dir, start_step, config.n_steps)

    draw_rows = _row_sampler(compound_index, config, gen)
    t_start = time.perf_counter()
    net.train()
    for step in range(start_step, config.n_steps):
        _set_lr(optimizer, config, step)
        loss = _train_step(net, optimizer, gen, config, draw_rows(), x_1_all, compound_index, log10_dose, plate_index,
                           fingerprints)
        ema.update(net)
        loss_window.append(loss.detach())
        done = step + 1
        if done % config.log_every == 0 or done == config.n_steps:
            history.append({"step": done, "loss": float(torch.stack(loss_window).mean()),
                            "lr": optimizer.param_groups[0]["lr"],
                            "elapsed_s": elapsed_before + time.perf_counter() - t_start})
            loss_window = []
        if done % config.checkpoint_every == 0 and done < config.n_steps:
            _save_checkpoint(ckpt_path, {
                "identity": identity, "step": done, "model": net.state_dict(),
                "optimizer": optimizer.state_dict(), "ema": ema.state_dict(), "generator": gen.get_state(),
                "history": history, "loss_window": [float(v) for v in loss_window],
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
            })

    train_seconds = elapsed_before + time.perf_counter() - t_start
    _write_member(out_dir, net, ema, train_set, config, identity, history, train_seconds, len(x_1_all))
    ckpt_path.unlink(missing_ok=True)
    log.info("%s: trained %d steps in %.1f s, final loss %.4f", out_dir, config.n_steps, train_seconds,
             history[-1]["loss"] if history else float("nan"))
    return out_dir


def bootstrap_draws(n_compounds: int, seed: int) -> np.ndarray:
    """``n_compounds`` compound indices drawn with replacement: member ``seed``'s resample."""
    gen = torch.Generator().manual_seed(derive_seed(int(seed), "bootstrap"))
    return torch.randint(int(n_compounds), (int(n_compounds),), generator=gen).numpy()


def _member_identity(train_set: FeatureTrainingSet, config: FeatureAssayConfig, seed: int, bootstrap: bool) -> dict:
    return {"config": config.to_dict(), "seed": int(seed), "bootstrap": bool(bootstrap),
            "data_fingerprint": train_set.data_fingerprint}


def _without_run_only(identity: dict) -> dict:
    """An identity without the config's run-only fields (logging and checkpoint cadence), which do
    not change the weights (``FeatureAssayConfig.RUN_ONLY_FIELDS``; ``models.config.config_hash``)."""
    config = {k: v for k, v in identity.get("config", {}).items() if k not in FeatureAssayConfig.RUN_ONLY_FIELDS}
    return {**identity, "config": config}


def _check_identity(out_dir: Path, stored: dict, identity: dict) -> None:
    stored, identity = _without_run_only(stored), _without_run_only(identity)
    diffs = [k for k in identity if stored.get(k) != identity[k]]
    if diffs:
        raise ValueError(
            f"{out_dir} holds a member trained with a different {', '.join(diffs)}; "
            "use another directory or resume=False to retrain"
        )


def _member_tensors(train_set, config, seed, bootstrap, device):
    """Training tensors (after the compound bootstrap): x_1 ``c x F``, compound ``c``, log-dose ``c``, plate ``c``."""
    if bootstrap and train_set.n_compounds > 0:
        idx = train_set.bootstrap_cells(bootstrap_draws(train_set.n_compounds, seed))
    else:
        idx = np.arange(train_set.n_cells)
    # fancy indexing copies, so the tensors never alias (possibly read-only) training arrays
    return (to_model_space(torch.from_numpy(train_set.normalized_x()[idx]), config).to(device),
            torch.from_numpy(train_set.compound_index[idx]).to(device),
            torch.from_numpy(train_set.log10_dose_um[idx]).to(device),
            torch.from_numpy(train_set.plate_index[idx]).to(device))


def _set_lr(optimizer: torch.optim.Optimizer, config: FeatureAssayConfig, step: int) -> None:
    """Linear warmup, then cosine decay to 10 % of the peak learning rate."""
    if step < config.warmup_steps:
        factor = (step + 1) / config.warmup_steps
    else:
        span = max(1, config.n_steps - config.warmup_steps)
        factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - config.warmup_steps) / span))
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * factor


def _row_sampler(compound_index: Tensor, config: FeatureAssayConfig, gen: torch.Generator):
    """Returns a function drawing one batch of training-row indices (``batch_size``).

    Uniform over rows by default; with ``config.control_fraction`` a fixed share of each batch is
    drawn from the control rows and the rest from the treated rows, so that a table dominated by
    control wells (a profile table: hundreds of DMSO wells, a few treated) still trains the
    compound conditioning.
    """
    b, device = config.batch_size, compound_index.device
    is_control = compound_index < 0
    if config.control_fraction is None or bool(is_control.all()) or not bool(is_control.any()):
        n = len(compound_index)
        return lambda: torch.randint(n, (b,), generator=gen, device=gen.device).to(device)
    control_rows, treated_rows = torch.nonzero(is_control).squeeze(1), torch.nonzero(~is_control).squeeze(1)
    n_control = min(b - 1, max(1, round(config.control_fraction * b)))

    def draw() -> Tensor:
        c = torch.randint(len(control_rows), (n_control,), generator=gen, device=gen.device).to(device)
        t = torch.randint(len(treated_rows), (b - n_control,), generator=gen, device=gen.device).to(device)
        return torch.cat([control_rows[c], treated_rows[t]])  # b

    return draw


def _train_step(net, optimizer, gen, config, idx, x_1_all, compound_index, log10_dose, plate_index,
                fingerprints) -> Tensor:
    b = config.batch_size
    x_1 = x_1_all[idx]  # b x F
    x_0 = torch.randn(x_1.shape, generator=gen, device=gen.device).to(x_1.device)  # b x F
    t = sample_time(b, gen, config.time_scheme, device=x_1.device)  # b
    ci = compound_index[idx]
    role = torch.where(ci < 0, ROLE_CONTROL, ROLE_COMPOUND)
    role, plate = drop_labels(role, plate_index[idx], p_compound=config.p_drop_compound,
                              p_plate=config.p_drop_plate, generator=gen)
    cond = net.condition.forward_indexed(fingerprints, ci.clamp(min=0), role, log10_dose[idx], plate,
                                         p_drop_bits=config.p_drop_bits, generator=gen)  # b x d
    loss = cfm_loss(net, x_0, x_1, t, cond)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip_norm > 0:
        nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip_norm)
    optimizer.step()
    return loss


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _write_member(out_dir, net, ema, train_set, config, identity, history, train_seconds, n_train_cells) -> None:
    """Write all member files atomically; ``member.pt`` last (it marks a finished member)."""
    meta = {
        **identity,
        "feature_names": list(train_set.feature_names),
        "plate_ids": list(train_set.plate_ids),
        "n_train_cells": int(n_train_cells),
        "n_compounds": train_set.n_compounds,
        "compound_ids": list(train_set.compound_ids),  # with seed and bootstrap: the member's bag
        "build_options": train_set.build_options,
        "train_seconds": round(train_seconds, 3),
        "torch_version": torch.__version__,
    }
    _atomic_write_text(out_dir / "config.json", json.dumps(meta, indent=1))
    _atomic_write_text(out_dir / "normalization.json", json.dumps(train_set.normalization.to_dict(), indent=1))
    _atomic_write_text(out_dir / "data_fingerprint", train_set.data_fingerprint + "\n")
    _write_log(out_dir / "training_log.csv", history)
    if config.write_loss_plot and history:
        _plot_loss(out_dir / "loss_curve.png", history, out_dir.name)
    ema_state = {k: v.detach().cpu() for k, v in ema.shadow.items()}
    state = {"format_version": MEMBER_FORMAT_VERSION, "n_features": net.n_features, "n_plates": net.n_plates,
             "model": ema_state}
    _save_checkpoint(out_dir / MEMBER_FILE, state)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "loss", "lr", "elapsed_s"])
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def _plot_loss(path: Path, history: list[dict[str, float]], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel("CFM loss (mean over log window)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read member metadata ({exc})") from exc
