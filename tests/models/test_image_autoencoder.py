import copy

import torch

from models.image_autoencoder import AutoencoderConfig, ImageAutoencoder, decode_all, encode_all, train_autoencoder

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
