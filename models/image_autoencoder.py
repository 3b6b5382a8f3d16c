"""A small convolutional autoencoder for multi-channel single-cell crops.

Flow matching runs on its latents (``b x c_z x h/4 x w/4``), which is what makes training
an image flow reachable on a CPU: 64 px x 3 channels (12,288 values) -> 16 x 16 x 8 latents
(2,048 values, 16x fewer pixels for the transformer to attend over).

Architecture (``base = base_channels``)::

    encoder  x: b x C x H x W
      conv4x4/2 C->2base, ResBlock(2base)                   H/2 x W/2
      conv4x4/2 2base->4base, ResBlock(4base)               H/4 x W/4
      GroupNorm, SiLU, conv1x1 4base->c_z                   z: b x c_z x H/4 x W/4
    decoder
      conv3x3 c_z->4base, 2 x ResBlock(4base)               H/4 x W/4
      nearest x2, conv3x3 4base->2base, ResBlock(2base)     H/2 x W/2
      GroupNorm, SiLU, conv3x3 2base->4C, PixelShuffle(2)   x_hat: b x C x H x W

No convolution runs at full resolution (sub-pixel output layer), which keeps a training step
cheap on a CPU.

Training loss: ``L1(x_hat, x) + mse_weight * MSE(x_hat, x) + grad_weight * L1(grad x_hat, grad x)
+ latent_l2 * mean z^2`` with Gaussian noise (std ``latent_noise``) added to z before decoding.
Inputs are crops normalised per channel to about [-1, 1] (see :mod:`models.image_flow`).

Stage 2 (:func:`finetune_decoder`, ``decoder_steps`` > 0): the encoder frozen, the decoder trains on
latents with Gaussian noise of std ``s * latent_std`` per channel, ``s ~ U(0, decoder_noise)`` per
crop. A flow's latents are never exactly on the encoder's manifold, and a decoder that only saw
encoder outputs renders such latents as worse and less varied cells (docs/STATUS_LOG.md, session 24:
real latents plus white noise of 0.25 latent sd doubled Inception KID and shrank the Inception spread,
the signature of the generated cells). Stage 1's fixed ``latent_noise`` (0.1 raw units, under 0.1
latent sd on BBBC021) is too small to teach this, and more noise in stage 1 would reshape the
latents themselves; stage 2's noise is relative to the frozen latents' spread, and the latents the
flow trains on do not change.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture and training options of :class:`ImageAutoencoder` (saved with the model)."""

    in_channels: int = 3
    latent_channels: int = 8
    base_channels: int = 16
    n_groups: int = 8
    latent_noise: float = 0.1
    latent_l2: float = 1e-4
    mse_weight: float = 1.0
    grad_weight: float = 0.5
    lr: float = 2e-3
    batch_size: int = 64
    max_steps: int = 2000
    max_minutes: float = 12.0
    decoder_steps: int = 800  # stage 2 (finetune_decoder); models saved before it: 0
    decoder_noise: float = 1.0  # stage 2's largest latent noise, in latent standard deviations
    decoder_lr: float = 5e-4

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "AutoencoderConfig":
        return AutoencoderConfig(**{"decoder_steps": 0, **d})  # saved before stage 2

    def __post_init__(self) -> None:
        if self.decoder_steps < 0 or not self.decoder_noise >= 0 or not self.decoder_lr > 0:
            raise ValueError(f"decoder_steps and decoder_noise must be >= 0 and decoder_lr > 0, got "
                             f"{self.decoder_steps}, {self.decoder_noise}, {self.decoder_lr}")


class ResBlock(nn.Module):
    def __init__(self, channels: int, n_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(n_groups, channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(n_groups, channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # b x c x h x w
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class ImageAutoencoder(nn.Module):
    """Conv autoencoder, 4x spatial downsampling: ``b x C x H x W <-> b x c_z x H/4 x W/4``."""

    downsample_factor = 4

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        c, b, g, z = config.in_channels, config.base_channels, config.n_groups, config.latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(c, 2 * b, 4, stride=2, padding=1), ResBlock(2 * b, g),
            nn.Conv2d(2 * b, 4 * b, 4, stride=2, padding=1), ResBlock(4 * b, g),
            nn.GroupNorm(min(g, 4 * b), 4 * b), nn.SiLU(), nn.Conv2d(4 * b, z, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(z, 4 * b, 3, padding=1), ResBlock(4 * b, g), ResBlock(4 * b, g),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(4 * b, 2 * b, 3, padding=1), ResBlock(2 * b, g),
            nn.GroupNorm(min(g, 2 * b), 2 * b), nn.SiLU(), nn.Conv2d(2 * b, 4 * c, 3, padding=1),
            nn.PixelShuffle(2),
        )

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected b x {self.config.in_channels} x H x W, got {tuple(x.shape)}")
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"H and W must be multiples of 4, got {tuple(x.shape[2:])}")

    def encode(self, x: Tensor) -> Tensor:
        """``x: b x C x H x W`` -> ``z: b x c_z x H/4 x W/4``."""
        self.check_input(x)
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """``z: b x c_z x h x w`` -> ``x_hat: b x C x 4h x 4w``."""
        return self.decoder(z)

    def loss(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction loss of a batch ``x: b x C x H x W`` (noise drawn from ``generator``)."""
        cfg = self.config
        z = self.encode(x)  # b x c_z x h x w
        noise = torch.randn(z.shape, generator=generator, device=generator.device, dtype=z.dtype).to(z.device)
        x_hat = self.decode(z + cfg.latent_noise * noise)  # b x C x H x W
        reg = (z**2).mean()
        recon, parts = self.reconstruction_loss(x_hat, x)
        return recon + cfg.latent_l2 * reg, {**parts, "z2": float(reg.detach())}

    def reconstruction_loss(self, x_hat: Tensor, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """``L1 + mse_weight * MSE + grad_weight * L1 of image gradients`` between ``b x C x H x W`` batches."""
        l1 = (x_hat - x).abs().mean()
        mse = ((x_hat - x) ** 2).mean()
        grad = _grad_l1(x_hat, x)
        total = l1 + self.config.mse_weight * mse + self.config.grad_weight * grad
        return total, {k: float(v.detach()) for k, v in {"l1": l1, "mse": mse, "grad": grad}.items()}


def _grad_l1(a: Tensor, b: Tensor) -> Tensor:
    """L1 between finite-difference image gradients (keeps edges and texture sharp)."""
    dxa, dya = a[..., :, 1:] - a[..., :, :-1], a[..., 1:, :] - a[..., :-1, :]
    dxb, dyb = b[..., :, 1:] - b[..., :, :-1], b[..., 1:, :] - b[..., :-1, :]
    return 0.5 * ((dxa - dxb).abs().mean() + (dya - dyb).abs().mean())


def train_autoencoder(
    images: Tensor,
    config: AutoencoderConfig,
    *,
    seed: int,
    state: dict | None = None,
    checkpoint_fn=None,
    checkpoint_every: int = 200,
    device: torch.device | str = "cpu",
) -> tuple[ImageAutoencoder, dict]:
    """Train on normalised crops ``images: n x C x H x W`` (float32, CPU) for ``config.max_steps``
    steps or ``config.max_minutes``, whichever comes first.

    ``state`` (from a previous ``checkpoint_fn`` call) resumes training; batches are drawn on the CPU
    and moved to ``device``; the returned model is on the CPU. ``checkpoint_fn(state)``
    is called every ``checkpoint_every`` steps and at the end. Returns (model, final state).
    Batches are drawn with a generator seeded by ``(seed, step)``, so a resumed run sees the
    same batches it would have seen uninterrupted.
    """
    torch.manual_seed(seed)  # parameter init only; all later randomness uses explicit generators
    model = ImageAutoencoder(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    step, elapsed_s = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed_s = int(state["step"]), float(state["elapsed_s"])
    sched = lambda s: min(1.0, (s + 1) / 100) * (0.5 * (1 + np.cos(np.pi * min(s, config.max_steps) / config.max_steps)) * 0.9 + 0.1)  # noqa: E731
    model.train()
    t_start = time.perf_counter() - elapsed_s
    while step < config.max_steps and (time.perf_counter() - t_start) < 60 * config.max_minutes:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x = _draw_batch(images, config.batch_size, gen).to(device)
        for group in opt.param_groups:
            group["lr"] = config.lr * sched(step)
        loss, parts = model.loss(x, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step == 1:
            logger.info("autoencoder step %d loss %.4f %s", step, float(loss.detach()), {k: round(v, 4) for k, v in parts.items()})
        if checkpoint_fn is not None and step % checkpoint_every == 0:
            checkpoint_fn(_ae_state(model, opt, step, time.perf_counter() - t_start))
    final = _ae_state(model, opt, step, time.perf_counter() - t_start)
    if checkpoint_fn is not None:
        checkpoint_fn(final)
    return model.cpu().eval(), final


def finetune_decoder(
    model: ImageAutoencoder,
    images: Tensor,
    latent_std: Tensor,
    *,
    seed: int,
    device: torch.device | str = "cpu",
) -> ImageAutoencoder:
    """Stage 2: ``config.decoder_steps`` steps on the decoder alone (encoder frozen), decoding
    ``z + s * latent_std * eps`` with ``s ~ U(0, decoder_noise)`` per crop and ``latent_std: c_z``
    the latents' per-channel standard deviation (see the module docstring). ``images: n x C x H x W``
    are the normalised training crops; batches are drawn on the CPU from a generator seeded by
    ``(seed, step)``. Returns the model on the CPU, in eval mode; its encoder is unchanged."""
    cfg = model.config
    if latent_std.shape != (cfg.latent_channels,):
        raise ValueError(f"latent_std must have {cfg.latent_channels} entries, got {tuple(latent_std.shape)}")
    model = model.to(device).train()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
    std = latent_std.float().view(1, -1, 1, 1)
    for step in range(cfg.decoder_steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 500_000_000 + step)
        x = _draw_batch(images, cfg.batch_size, gen)
        with torch.no_grad():
            z = model.encode(x.to(device)).cpu()  # b x c_z x h x w
        scale = cfg.decoder_noise * torch.rand((len(z), 1, 1, 1), generator=gen) * std
        z_noisy = z + scale * torch.randn(z.shape, generator=gen)
        loss, parts = model.reconstruction_loss(model.decode(z_noisy.to(device)), x.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step == 0:
            logger.info("decoder step %d loss %.4f %s", step + 1, float(loss.detach()), {k: round(v, 4) for k, v in parts.items()})
    for p in model.encoder.parameters():
        p.requires_grad_(True)
    return model.cpu().eval()


def _ae_state(model: nn.Module, opt: torch.optim.Optimizer, step: int, elapsed_s: float) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed_s": elapsed_s}


def _draw_batch(images: Tensor, batch_size: int, gen: torch.Generator) -> Tensor:
    """``min(batch_size, n)`` crops drawn with replacement from ``images: n x C x H x W``, augmented."""
    idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
    return _augment(images[idx], gen)


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random flips and 90-degree rotations (cells have no preferred orientation), per batch."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(2, 3))
    if bool(torch.randint(0, 2, (1,), generator=gen)):
        x = torch.flip(x, dims=(3,))
    return x


@torch.no_grad()
def encode_all(model: ImageAutoencoder, images: Tensor, batch_size: int = 256) -> Tensor:
    """``n x C x H x W`` -> ``n x c_z x H/4 x W/4`` in batches (eval mode, no noise).

    Batches run on the model's device; the result is on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.encode(images[i : i + batch_size].to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def decode_all(model: ImageAutoencoder, z: Tensor, batch_size: int = 256) -> Tensor:
    """``n x c_z x h x w`` -> ``n x C x 4h x 4w`` in batches on the model's device (result on the CPU)."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.decode(z[i : i + batch_size].to(device)).cpu() for i in range(0, len(z), batch_size)])
