import copy
from dataclasses import replace

import pytest
import torch

from models.image_autoencoder import (
    AutoencoderConfig, ImageAutoencoder, decode_all, encode_all, finetune_decoder, train_autoencoder,
)

CFG = AutoencoderConfig(in_channels=2, latent_channels=3, base_channels=8, n_groups=4, batch_size=8, max_steps=6,
                        max_minutes=5.0, lr=3e-3)


def _images(n=12, size=16):
    """Smooth blobs (compressible, like cells): one Gaussian spot per channel at a random place."""
    g = torch.Generator().manual_seed(0)
    centre = torch.rand(n, 2, 2, generator=g) * (size - 6) + 3
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
    return 2 * torch.exp(-d2 / 8.0) - 1


def test_shapes_and_downsampling():
    model = ImageAutoencoder(CFG)
    x = _images(3, 24)
    z = model.encode(x)
    assert z.shape == (3, 3, 6, 6)
    assert model.decode(z).shape == x.shape
    assert encode_all(model, x, batch_size=2).shape == z.shape
    assert decode_all(model, z, batch_size=2).shape == x.shape


def test_rejects_bad_input():
    model = ImageAutoencoder(CFG)
    for bad in (torch.zeros(2, 3, 16, 16), torch.zeros(2, 2, 18, 16)):
        try:
            model.encode(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {tuple(bad.shape)}")


def test_training_reduces_reconstruction_error():
    x = _images()
    untrained = ImageAutoencoder(CFG)
    torch.manual_seed(0)
    before = float((decode_all(untrained, encode_all(untrained, x)) - x).abs().mean())
    model, state = train_autoencoder(x, CFG.__class__(**{**CFG.to_dict(), "max_steps": 40}), seed=0)
    after = float((decode_all(model, encode_all(model, x)) - x).abs().mean())
    assert state["step"] == 40
    assert after < 0.8 * before


def test_resume_matches_uninterrupted_run():
    x = _images()
    saved = []
    full, state = train_autoencoder(x, CFG, seed=3, checkpoint_fn=lambda s: saved.append(copy.deepcopy(s)),
                                    checkpoint_every=3)
    assert [s["step"] for s in saved] == [3, 6, 6]
    resumed, state = train_autoencoder(x, CFG, seed=3, state=saved[0])
    assert state["step"] == 6
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_finetune_decoder_changes_only_the_decoder_and_is_reproducible():
    x = _images()
    stage1, _ = train_autoencoder(x, replace(CFG, max_steps=20), seed=0)
    cfg = replace(CFG, max_steps=20, decoder_steps=30, decoder_noise=1.0, decoder_lr=3e-3)
    std = encode_all(stage1, x).transpose(0, 1).flatten(1).std(1)
    tuned = []
    for _ in range(2):
        model = ImageAutoencoder(cfg)
        model.load_state_dict(stage1.state_dict())
        tuned.append(finetune_decoder(model, x, std, seed=1))
    for (name, p0), p1, p2 in zip(stage1.state_dict().items(), tuned[0].state_dict().values(), tuned[1].state_dict().values()):
        assert torch.equal(p1, p2), name  # same seed, same weights
        if name.startswith("encoder"):
            assert torch.equal(p0, p1), name  # the latents the flow trains on do not move
    assert any(not torch.equal(p0, p1) for (n, p0), p1 in zip(stage1.state_dict().items(), tuned[0].state_dict().values())
               if n.startswith("decoder"))
    assert all(p.requires_grad for p in tuned[0].parameters())
    assert not tuned[0].training


def test_finetune_decoder_noise_makes_noisy_latents_decode_better():
    """The point of stage 2's noise: latents off the encoder's manifold (here, plus 0.5 latent sd of noise)
    decode better than after the same number of noise-free decoder steps."""
    x = _images(48)
    cfg = replace(CFG, max_steps=150, batch_size=16)
    stage1, _ = train_autoencoder(x, cfg, seed=0)
    z = encode_all(stage1, x)
    std = z.transpose(0, 1).flatten(1).std(1)
    z_noisy = z + 0.5 * std.view(1, -1, 1, 1) * torch.randn(z.shape, generator=torch.Generator().manual_seed(9))
    err = {}
    for noise in (0.0, 1.0):
        model = ImageAutoencoder(replace(cfg, decoder_steps=150, decoder_noise=noise))
        model.load_state_dict(stage1.state_dict())
        err[noise] = float((decode_all(finetune_decoder(model, x, std, seed=0), z_noisy) - x).abs().mean())
    assert err[1.0] < 0.9 * err[0.0], err


def test_decoder_stage_options_checked_and_old_configs_have_none():
    with pytest.raises(ValueError, match="decoder_steps"):
        AutoencoderConfig(decoder_steps=-1)
    with pytest.raises(ValueError, match="decoder_lr"):
        AutoencoderConfig(decoder_lr=0.0)
    old = {k: v for k, v in AutoencoderConfig().to_dict().items() if not k.startswith("decoder_")}
    assert AutoencoderConfig.from_dict(old).decoder_steps == 0
    assert AutoencoderConfig.from_dict(AutoencoderConfig().to_dict()) == AutoencoderConfig()
    with pytest.raises(ValueError, match="latent_std"):
        finetune_decoder(ImageAutoencoder(replace(CFG, decoder_steps=1)), _images(4), torch.ones(5), seed=0)
