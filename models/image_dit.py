"""DiT-style velocity network for latent single-cell images (Peebles & Xie 2023).

``v_theta(x_t, t, cond)``: ``x_t: b x c x h x w`` latents -> velocity of the same shape.

* Patchify (``patch_size``) -> tokens ``b x n x d`` + fixed 2-D sin-cos positions.
* Transformer blocks with RMSNorm and adaLN-zero modulation (shift, scale, gate for attention
  and MLP, zero-initialised so every block starts as the identity), conditioned on one
  vector ``c: b x d`` = time embedding + compound embedding + plate (control-set) embedding.
* Long skip connections (U-ViT, Bao et al. 2023): block ``L-1-i`` of the second half gets the
  output of block ``i`` of the first half through ``Linear(2d -> d)``.
* Final adaLN + linear (zero-init) -> unpatchify. Optionally (``DiTConfig.final_conv``, as in
  U-ViT) a zero-initialised 3x3 convolution of the unpatchified velocity is added to it: each
  token predicts its own ``p x p`` patch, and without it nothing ties the values on either side
  of a patch edge, so generated latents show seams that real latents do not have.
* Optional randomized prior function (Osband et al. 2018; ``DiTConfig.prior_scale > 0``): a
  fixed, untrained random function of (fingerprint, log10 dose) is added to the velocity of
  treated cells (:class:`RandomizedPrior`). Each ensemble member draws its own with its seed; its
  trained network learns to cancel it where there are data, so members agree at measured
  conditions and disagree between and beyond them (an unmeasured dose or compound).

Conditioning (:class:`ImageCondition`):

* compound: packed-bit Morgan fingerprint unpacked to 2048 floats and log10-dose features,
  through an MLP (so unseen compounds and doses get an embedding). With ``DiTConfig.dose_gate``
  the compound embedding is blended with the control token along a learned Hill curve of dose
  (:meth:`ImageDiT.dose_gate`), so the prediction returns to the control cells as the dose goes
  to 0 instead of extrapolating the dose features below the trained doses. The compound slot has a
  role per cell: ``ROLE_COMPOUND`` (fingerprint + dose), ``ROLE_CONTROL`` (DMSO: a learned
  control token) or ``ROLE_NULL`` (label dropout: a separate learned null token = the
  "unconditional" model, the marginal over all training cells of the plate, used for
  classifier-free guidance and the ``unconditional`` baseline). Control and null are kept
  apart so predicted controls are not contaminated by dropped-out treated cells.
* plate: a *control-set encoder* (DeepSets): the plate's DMSO control cells' latents are
  summarised (mean latent pooled to 4x4 + per-channel std over cells and pixels) and mapped
  by an MLP. Any plate with control cells — including one never seen in training — is
  conditioned this way; a learned null-plate token stands in when no controls are given
  (and under plate-label dropout).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FINGERPRINT_BITS = 2048
DOSE_FREQS = (0.5, 1.0, 2.0)
CONTROL_POOL = 4
ROLE_COMPOUND = 0
ROLE_CONTROL = 1
ROLE_NULL = 2
GATE_DECADES_BELOW = 1.0  # the gate's midpoint may sit down to this many decades below the lowest trained dose
GATE_MIN_HILL = 0.5  # the gate's Hill coefficient is at least this (a curve over at most about 4 decades)


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of :class:`ImageDiT` (saved with the model)."""

    latent_channels: int = 8
    latent_size: int = 16
    patch_size: int = 2
    hidden_dim: int = 192
    depth: int = 6
    n_heads: int = 6
    mlp_ratio: float = 4.0
    long_skip: bool = True
    final_conv: bool = True  # 3x3 conv on the unpatchified velocity (U-ViT); models saved before it: False
    prior_scale: float = 0.0  # randomized prior function amplitude (0: none)
    prior_features: int = 64  # random Fourier features of the prior
    prior_dose_scale: float = 0.4  # prior's length scale in log10 dose units (decades)
    dose_gate: bool = True  # Hill-curve blend control token -> compound embedding; models saved before it: False
    dose_range_um: tuple[float, float] | None = None  # lowest and highest treated training dose (set from the data)

    def __post_init__(self) -> None:
        if self.prior_scale < 0 or self.prior_dose_scale <= 0 or self.prior_features < 1:
            raise ValueError("prior_scale must be >= 0, prior_dose_scale > 0 and prior_features >= 1, got "
                             f"{self.prior_scale}, {self.prior_dose_scale}, {self.prior_features}")
        if self.dose_range_um is not None:
            lo, hi = self.dose_range_um
            if not 0 < lo <= hi:
                raise ValueError(f"dose_range_um must be (lowest, highest) treated dose > 0, got {self.dose_range_um}")
            object.__setattr__(self, "dose_range_um", (float(lo), float(hi)))

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "DiTConfig":
        # configs saved before these options had neither a final conv nor a dose gate
        return DiTConfig(**{"final_conv": False, "dose_gate": False, **d})


@dataclass
class ImageCondition:
    """Conditioning of a batch of ``b`` cells.

    fingerprint_bits: ``b x 2048`` float 0/1 (unpacked Morgan; zeros for DMSO).
    log10_dose_um: ``b`` (used only where ``role == ROLE_COMPOUND``).
    role: ``b`` long, ``ROLE_COMPOUND`` / ``ROLE_CONTROL`` (DMSO) / ``ROLE_NULL`` (no label).
    control_summary: ``b x s`` control-set summaries (:func:`control_summary`) or None.
    has_controls: ``b`` bool; False = null-plate token.
    """

    fingerprint_bits: Tensor
    log10_dose_um: Tensor
    role: Tensor
    control_summary: Tensor
    has_controls: Tensor

    def index(self, idx: Tensor) -> "ImageCondition":
        return ImageCondition(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def to(self, device: torch.device | str) -> "ImageCondition":
        return ImageCondition(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def with_role(self, role: Tensor) -> "ImageCondition":
        """Same cells and plate conditioning, compound slot roles ``role: b``."""
        return ImageCondition(self.fingerprint_bits, self.log10_dose_um, role, self.control_summary, self.has_controls)

    def without_compound(self) -> "ImageCondition":
        """Same plate conditioning, null compound token (unconditional / CFG branch)."""
        return self.with_role(torch.full_like(self.role, ROLE_NULL))

    def as_control(self) -> "ImageCondition":
        """Same plate conditioning, treated cells relabelled as DMSO (the control-referenced CFG branch)."""
        treated = self.role == ROLE_COMPOUND
        return self.with_role(torch.where(treated, torch.full_like(self.role, ROLE_CONTROL), self.role))


def control_summary_dim(latent_channels: int) -> int:
    return latent_channels * CONTROL_POOL * CONTROL_POOL + latent_channels


def control_summary(z_controls: Tensor) -> Tensor:
    """Summary of a set of control latents ``n x c x h x w`` -> ``s`` (mean image pooled to 4x4,
    then per-channel std over cells and pixels). Permutation invariant (DeepSets input)."""
    if z_controls.ndim != 4 or z_controls.shape[0] < 1:
        raise ValueError(f"control latents must be n x c x h x w with n >= 1, got {tuple(z_controls.shape)}")
    mean_img = F.adaptive_avg_pool2d(z_controls.mean(dim=0, keepdim=True), CONTROL_POOL).flatten()  # c*16
    std = z_controls.transpose(0, 1).flatten(1).std(dim=1, unbiased=False)  # c
    return torch.cat([mean_img, std])


def dose_features(log10_dose_um: Tensor) -> Tensor:
    """``b`` -> ``b x (1 + 2 * len(DOSE_FREQS))`` smooth features of u = log10(dose_um) - 1."""
    u = (log10_dose_um - 1.0).unsqueeze(-1)
    f = torch.tensor(DOSE_FREQS, dtype=u.dtype, device=u.device)
    return torch.cat([u, torch.sin(u * f), torch.cos(u * f)], dim=-1)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of ``t: b`` in [0, 1] (scaled by 1000) -> ``b x dim``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos positional embedding ``(grid*grid) x dim``."""
    coords = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for pos in (yy.flatten(), xx.flatten()):
        out = pos[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# `loop assay train`'s prior scale for an ensemble (K > 1) when none is given. Three members
# without 15 uM cells (docs/STATUS_LOG.md, session 14): at 0.05 the unseen dose's disagreement was 1.0-1.5x
# the trained doses', within sampling noise; at 0.1 2.5-14x, with the unseen dose's FID-morph
# unchanged (36 against 35 on Week4_27801).
ENSEMBLE_PRIOR_SCALE = 0.1


class RandomizedPrior(nn.Module):
    """Fixed random function ``p(fingerprint, log10 dose) -> b x c`` (one offset per latent channel,
    the same at every position and time; 0 for control and null roles).

    Random Fourier features of a Gaussian process over log10 dose (length scale
    ``dose_scale`` decades) whose phase also depends on a random projection of the fingerprint
    (so another compound gets another function)::

        r = 2 bits @ P / sqrt(max(1, sum bits))                  P: 2048 x m, N(0, 1)
        f_j = sqrt(2 / m) cos(omega_j * log10 dose + r_j + phi_j)   omega_j ~ N(0, 1 / dose_scale^2)
        p = scale * f @ A                                        A: m x c, N(0, 1)

    so each output has variance ``scale^2`` over draws and, as m grows, correlation
    ``exp(-d^2 / (2 dose_scale^2)) * exp(-4 (1 - cos(bits, bits')))`` between doses ``d`` decades
    apart of compounds whose fingerprints have cosine similarity ``cos`` (unrelated compounds:
    about 0.02). Its tensors are buffers drawn from the global generator at construction
    (``train_flow`` seeds it per member), saved with the member, never trained.
    """

    def __init__(self, latent_channels: int, n_features: int, scale: float, dose_scale: float) -> None:
        super().__init__()
        self.scale = float(scale)
        self.register_buffer("projection", torch.randn(FINGERPRINT_BITS, n_features))
        self.register_buffer("omega", torch.randn(n_features) / dose_scale)
        self.register_buffer("phase", torch.rand(n_features) * 2 * math.pi)
        self.register_buffer("amplitude", torch.randn(n_features, latent_channels))

    def features(self, cond: ImageCondition) -> Tensor:
        """``f: b x m`` random Fourier features of (fingerprint, log10 dose)."""
        bits = cond.fingerprint_bits  # b x 2048
        r = 2.0 * bits @ self.projection / bits.sum(-1, keepdim=True).clamp(min=1.0).sqrt()  # b x m
        arg = cond.log10_dose_um.unsqueeze(-1) * self.omega + r + self.phase  # b x m
        return math.sqrt(2.0 / self.omega.numel()) * torch.cos(arg)

    def forward(self, cond: ImageCondition) -> Tensor:
        p = self.scale * self.features(cond) @ self.amplitude  # b x c
        return torch.where((cond.role == ROLE_COMPOUND).unsqueeze(-1), p, torch.zeros_like(p))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.RMSNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.RMSNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        b, n, d = x.shape  # b x n x d tokens, c: b x d
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)  # each b x d
        h = modulate(self.norm1(x), sh1, sc1)
        q, k, v = self.qkv(h).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # b x H x n x dh
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + g1.unsqueeze(1) * self.proj(a)
        x = x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))
        return x


class ImageDiT(nn.Module):
    """Velocity network ``v(x_t: b x c x h x w, t: b, cond: ImageCondition) -> b x c x h x w``."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        d, p, c = cfg.hidden_dim, cfg.patch_size, cfg.latent_channels
        if cfg.latent_size % p:
            raise ValueError(f"latent_size {cfg.latent_size} not divisible by patch_size {p}")
        if d % cfg.n_heads or d % 4:
            raise ValueError(f"hidden_dim {d} must be divisible by n_heads {cfg.n_heads} and 4")
        self.grid = cfg.latent_size // p
        self.patch_in = nn.Linear(c * p * p, d)
        self.register_buffer("pos", sincos_pos_embed(d, self.grid), persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.fp_mlp = nn.Sequential(nn.Linear(FINGERPRINT_BITS, d), nn.SiLU())
        self.compound_mlp = nn.Sequential(nn.Linear(d + 1 + 2 * len(DOSE_FREQS), d), nn.SiLU(), nn.Linear(d, d))
        self.control_token = nn.Parameter(torch.randn(d) * 0.02)
        self.null_token = nn.Parameter(torch.randn(d) * 0.02)
        self.control_mlp = nn.Sequential(nn.Linear(control_summary_dim(c), d), nn.SiLU(), nn.Linear(d, d))
        self.null_plate = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        n_skip = cfg.depth // 2 if cfg.long_skip else 0
        self.skips = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(n_skip))
        self.final_norm = nn.RMSNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(d, 2 * d)
        self.final = nn.Linear(d, c * p * p)
        self.final_conv = nn.Conv2d(c, c, 3, padding=1) if cfg.final_conv else None
        self.gate_head = nn.Linear(d, 2) if cfg.dose_gate and cfg.dose_range_um is not None else None
        for m in (self.final_ada, self.final, self.final_conv, self.gate_head):
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        self.prior = (RandomizedPrior(c, cfg.prior_features, cfg.prior_scale, cfg.prior_dose_scale)
                      if cfg.prior_scale > 0 else None)  # drawn last: the other weights init as without it

    def embed_condition(self, t: Tensor, cond: ImageCondition) -> Tensor:
        """``c: b x d`` = time + compound (or control / null token) + plate (control set or null token)."""
        d = self.config.hidden_dim
        c_t = self.t_mlp(timestep_embedding(t, d))  # b x d
        fp = self.fp_mlp(cond.fingerprint_bits)  # b x d
        c_cmp = self.compound_mlp(torch.cat([fp, dose_features(cond.log10_dose_um)], dim=-1))  # b x d
        if self.gate_head is not None:
            g = self.dose_gate(fp, cond.log10_dose_um).unsqueeze(-1)  # b x 1
            c_cmp = self.control_token + g * (c_cmp - self.control_token)
        role = cond.role.unsqueeze(-1)
        c_cmp = torch.where(role == ROLE_COMPOUND, c_cmp,
                            torch.where(role == ROLE_CONTROL, self.control_token, self.null_token).expand_as(c_cmp))
        c_pl = self.control_mlp(cond.control_summary)  # b x d
        c_pl = torch.where(cond.has_controls.unsqueeze(-1), c_pl, self.null_plate.expand_as(c_pl))
        return c_t + c_cmp + c_pl

    def compound_gate(self, cond: ImageCondition) -> Tensor:
        """``g: b`` in [0, 1], how much of its compound's embedding each row's condition carries:
        :meth:`dose_gate` for compound rows (1 in a model without the gate), 0 for DMSO rows and
        1 for the null token (used to scale guidance with the dose, :func:`models.image_flow.sample_latents`)."""
        role = cond.role
        g = torch.ones(role.shape, dtype=cond.log10_dose_um.dtype, device=role.device)
        if self.gate_head is not None:
            g = self.dose_gate(self.fp_mlp(cond.fingerprint_bits), cond.log10_dose_um)
        return torch.where(role == ROLE_COMPOUND, g, (role != ROLE_CONTROL).to(g))

    def dose_gate(self, fp: Tensor, log10_dose_um: Tensor) -> Tensor:
        """``g: b`` in (0, 1), a Hill curve of dose per compound: how far the compound embedding
        replaces the control token (0: a control cell; 1: the full compound embedding)::

            g = sigmoid(ln(10) * n * (log10 dose - m))
            m = lo + (hi - lo) * sigmoid(a)   lo = log10(lowest trained dose) - 1, hi = log10(highest)
            n = 0.5 + softplus(b)             (a, b) = gate_head(fingerprint embedding: b x d)

        The midpoint ``m`` (log10 EC50) is kept within the trained doses and one decade below, so
        far below the lowest trained dose every compound looks like the control, and an untrained
        compound's curve sits where the training compounds' do. At initialisation (``a = b = 0``)
        ``m`` is mid-range and ``n`` about 1.2."""
        lo_um, hi_um = self.config.dose_range_um
        lo, hi = math.log10(lo_um) - GATE_DECADES_BELOW, math.log10(hi_um)
        a, b = self.gate_head(fp).unbind(-1)  # b, b
        midpoint = lo + (hi - lo) * torch.sigmoid(a)
        hill = GATE_MIN_HILL + F.softplus(b)
        return torch.sigmoid(math.log(10.0) * hill * (log10_dose_um - midpoint))

    def forward(self, x_t: Tensor, t: Tensor, cond: ImageCondition) -> Tensor:
        b, c, h, w = x_t.shape  # b x c x h x w latents
        p, g = self.config.patch_size, self.grid
        if h != self.config.latent_size or w != self.config.latent_size or c != self.config.latent_channels:
            raise ValueError(f"expected b x {self.config.latent_channels} x {self.config.latent_size}^2, got {tuple(x_t.shape)}")
        tokens = x_t.view(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)  # b x n x cpp
        x = self.patch_in(tokens) + self.pos  # b x n x d
        cvec = self.embed_condition(t, cond)  # b x d
        n_skip = len(self.skips)
        stack = []
        for i, block in enumerate(self.blocks):
            if n_skip and i >= len(self.blocks) - n_skip:
                x = self.skips[i - (len(self.blocks) - n_skip)](torch.cat([x, stack.pop()], dim=-1))
            x = block(x, cvec)
            if n_skip and i < n_skip:
                stack.append(x)
        shift, scale = self.final_ada(F.silu(cvec)).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(x), shift, scale))  # b x n x cpp
        v = out.view(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        if self.final_conv is not None:  # lets neighbouring patches share their edges
            v = v + self.final_conv(v)  # b x c x h x w
        if self.prior is not None:
            v = v + self.prior(cond)[:, :, None, None]  # b x c -> b x c x 1 x 1
        return v
