import numpy as np
import pytest
import torch

from models.image_eval import (
    MORPH_CLIP_SD, channel_scale, compare, compare_kid_difference, fid, inception_features, inception_weights_path, kid,
    kid_difference, morph_standardisation, save_montage, standardise_morph, to_rgb, FeatureSets,
)


def test_fid_closed_form_for_shifted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = a + np.array([1.0, 2.0, 0.0])  # same covariance, mean shifted: FID = |mu_a - mu_b|^2
    assert fid(a, b) == pytest.approx(5.0, rel=1e-6)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)


def test_kid_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    assert abs(kid(a, b)) < 0.05 * kid(a, b + 1.5)
    with pytest.raises(ValueError, match=">= 2 samples"):
        kid(a[:1], b)


def test_kid_difference_matches_torch_fidelity_on_full_sets():
    rng = np.random.default_rng(2)
    a, b, real = rng.normal(size=(60, 5)), rng.normal(0.3, 1.0, size=(60, 5)), rng.normal(size=(60, 5))
    out = kid_difference(a, b, real, draws=20)
    # torch-fidelity's KID with one subset as large as the sets is the full-set unbiased MMD^2
    reference = kid(a, real, subset_size=60, subsets=1) - kid(b, real, subset_size=60, subsets=1)
    assert out["model_minus_baseline"] == pytest.approx(reference, rel=1e-9)
    assert out["ci95"][0] < out["model_minus_baseline"] < out["ci95"][1] and out["sd"] > 0
    same = kid_difference(a, a, real, draws=20)
    assert same["model_minus_baseline"] == 0.0  # (its sd is not 0: the two half-samples are drawn apart)


def test_kid_difference_sd_matches_the_spread_of_fresh_draws():
    """The half-sample sd predicts how much the difference moves when the cell sets are drawn again."""
    rng = np.random.default_rng(3)
    draw = lambda shift: rng.normal(shift, 1.0, size=(200, 6))  # noqa: E731
    fresh = [kid_difference(draw(0.2), draw(0.0), draw(0.0), draws=2)["model_minus_baseline"] for _ in range(80)]
    predicted = np.median([kid_difference(draw(0.2), draw(0.0), draw(0.0), draws=100, seed=s)["sd"] for s in range(8)])
    assert 0.7 < predicted / np.std(fresh) < 1.15  # 0.88 measured; without the 1/sqrt(2) it would be 1.25
    far = kid_difference(draw(1.0), draw(0.0), draw(0.0))
    assert far["ci95"][0] > 0  # a set shifted by 1 sd is worse beyond the noise
    with pytest.raises(ValueError, match=">= 4 cells"):
        kid_difference(draw(0)[:3], draw(0), draw(0))


def test_kid_difference_subsamples_large_sets(monkeypatch):
    import models.image_eval as image_eval

    rng = np.random.default_rng(5)
    a, b, real = rng.normal(size=(30, 3)), rng.normal(size=(12, 3)), rng.normal(size=(25, 3))
    monkeypatch.setattr(image_eval, "KID_DIFFERENCE_MAX_CELLS", 20)
    capped = image_eval.kid_difference(a, b, real, draws=10, seed=7)["model_minus_baseline"]
    pick = np.random.default_rng(7)  # the same seeded draws, in the same order: a, then real (b is small)
    a_sub, real_sub = a[np.sort(pick.choice(30, 20, replace=False))], real[np.sort(pick.choice(25, 20, replace=False))]
    monkeypatch.setattr(image_eval, "KID_DIFFERENCE_MAX_CELLS", 2000)
    assert capped == pytest.approx(image_eval.kid_difference(a_sub, b, real_sub, draws=1)["model_minus_baseline"], rel=1e-9)
    assert capped != pytest.approx(image_eval.kid_difference(a, b, real, draws=1)["model_minus_baseline"], rel=1e-3)


def test_compare_kid_difference_spaces():
    rng = np.random.default_rng(4)
    sets = [FeatureSets(rng.normal(size=(40, 8)), rng.normal(size=(40, 3))) for _ in range(3)]
    mean, std = morph_standardisation(sets[2].morph)
    out = compare_kid_difference(sets[0], sets[1], sets[2], mean, std)
    assert set(out) == {"kid_inception", "kid_morph"} and out["kid_inception"]["sd"] > 0
    no_inc = [FeatureSets(np.zeros((40, 0)), s.morph) for s in sets]
    assert compare_kid_difference(*no_inc, mean, std)["kid_inception"] is None
    few = FeatureSets(sets[0].inception[:3], sets[0].morph[:3])
    assert compare_kid_difference(few, sets[1], sets[2], mean, std) == {"kid_inception": None, "kid_morph": None}


def test_to_rgb_channel_mapping():
    scale = np.ones(1)
    one = np.full((1, 2, 2, 1), 0.5)
    assert torch.allclose(to_rgb(one, scale)[0, :, 0, 0], torch.tensor([0.5, 0.5, 0.5]))
    two = np.stack([np.full((2, 2), 0.2), np.full((2, 2), 0.4)], -1)[None]
    assert torch.allclose(to_rgb(two, np.ones(2))[0, :, 0, 0], torch.tensor([0.2, 0.4, 0.0]))
    three = np.stack([np.full((2, 2), v) for v in (0.1, 0.2, 0.3)], -1)[None]
    assert torch.allclose(to_rgb(three, np.ones(3))[0, :, 0, 0], torch.tensor([0.1, 0.2, 0.3]))
    five = np.stack([np.full((2, 2), v) for v in (0.1, 0.3, 0.5, 0.7, 0.9)], -1)[None]
    # channel i -> RGB[i * 3 // 5]: R = {0, 1}, G = {2, 3}, B = {4}
    assert torch.allclose(to_rgb(five, np.ones(5))[0, :, 0, 0], torch.tensor([0.2, 0.6, 0.9]))
    # scaling by the percentile and clipping to [0, 1]
    assert torch.allclose(to_rgb(np.full((1, 1, 1, 1), 300.0), np.full(1, 100.0)), torch.ones(1, 3, 1, 1))


def test_channel_scale_is_percentile():
    x = np.arange(1000, dtype=np.uint16).reshape(10, 10, 10, 1)
    assert channel_scale(x)[0] == pytest.approx(np.percentile(np.arange(1000), 99.5))


def test_inception_weights_ship_with_fid_helper():
    assert inception_weights_path().name == "default_1.pt"


@pytest.mark.slow
def test_inception_features_shape_and_determinism():
    crops = np.random.default_rng(0).integers(0, 4000, (2, 20, 20, 3), dtype=np.uint16)
    f1 = inception_features(crops, np.full(3, 4000.0))
    f2 = inception_features(crops, np.full(3, 4000.0), batch_size=1)
    assert f1.shape == (2, 2048) and np.allclose(f1, f2, atol=1e-4)


def test_compare_uses_standardised_morph_features():
    rng = np.random.default_rng(2)
    real = FeatureSets(rng.normal(size=(120, 5)), rng.normal(size=(120, 3)) * 100)
    same = FeatureSets(rng.normal(size=(120, 5)), rng.normal(size=(120, 3)) * 100)
    mean, std = morph_standardisation(real.morph)
    m = compare(same, real, mean, std)
    assert set(m) == {"fid_inception", "kid_inception", "fid_morph", "kid_morph"}
    assert m["fid_morph"] < 0.5  # standardised: scale 100 does not inflate it


def test_one_broken_cell_does_not_decide_fid_morph():
    rng = np.random.default_rng(3)
    real = FeatureSets(np.zeros((300, 0)), rng.normal(size=(300, 4)))
    gen = rng.normal(size=(300, 4))
    mean, std = morph_standardisation(real.morph)
    clean = compare(FeatureSets(np.zeros((300, 0)), gen), real, mean, std)["fid_morph"]
    gen[0, 2] = 500.0  # one segmentation failure, 500 sd out
    broken = compare(FeatureSets(np.zeros((300, 0)), gen), real, mean, std)["fid_morph"]
    unclipped = fid((gen - mean) / std, (real.morph - mean) / std)
    assert unclipped > 500  # what one cell did before clipping
    # clipped at 10 sd the cell adds at most about (10^2 + 10^2/300) / 300 ~ 0.7 to the trace terms
    assert broken - clean < 1.0
    z = standardise_morph(np.array([[1e6, -1e6, 0.5]]), np.zeros(3), np.ones(3))
    assert z.tolist() == [[MORPH_CLIP_SD, -MORPH_CLIP_SD, 0.5]]


def test_colour_key_names_the_stains_to_rgb_shows():
    from models.image_eval import colour_key

    assert colour_key(["DNA", "Actin", "Tubulin"]) == "red DNA, green Actin, blue Tubulin"
    assert colour_key(["DNA", "ER"]) == "red DNA, green ER"
    assert colour_key(["DNA", "ER", "RNA", "AGP", "Mito"]) == "red DNA+ER, green RNA+AGP, blue Mito"
    x = np.zeros((1, 2, 2, 5), np.float32)
    x[..., 4] = 1.0  # Mito alone lights blue, as the key says
    assert to_rgb(x, np.ones(5)).numpy()[0, :, 0, 0].tolist() == [0.0, 0.0, 1.0]


def test_save_montage(tmp_path):
    gen = np.random.default_rng(0).integers(0, 1000, (5, 16, 16, 3), dtype=np.uint16)
    path = save_montage(gen, gen[:3], tmp_path / "m.png", title="t", n_cols=4)
    assert path.is_file() and path.stat().st_size > 1000


def test_at_floor_sizes_puts_a_perfect_model_on_the_real_floor():
    """A 'model' drawing real cells scores far below the real floor with all its cells against all
    real cells (FID's small-sample bias inflates the half-vs-half floor), and on it at the floor's
    sizes: the figures to read against ``real_floor``."""
    from models.image_eval import _halves, at_floor_sizes

    full, matched, floor = [], [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        draw = lambda n: FeatureSets(rng.normal(size=(n, 6)), rng.normal(size=(n, 4)))  # noqa: E731
        real, perfect = draw(60), draw(200)
        mean, std = morph_standardisation(real.morph)
        a, b = _halves(60, rng)
        half_a, half_b = (FeatureSets(real.inception[i], real.morph[i]) for i in (a, b))
        sized = at_floor_sizes({"model": perfect}, half_a, half_b, mean, std, rng)
        assert (sized["n_each"], sized["n_reference"]) == (30, 30)
        full.append(compare(perfect, real, mean, std)["fid_inception"])
        matched.append(sized["model"]["fid_inception"])
        floor.append(compare(half_a, half_b, mean, std)["fid_inception"])
    assert np.mean(full) < 0.6 * np.mean(floor)
    assert abs(np.mean(matched) - np.mean(floor)) < 0.2 * np.mean(floor)
    few = at_floor_sizes({"model": FeatureSets(perfect.inception[:12], perfect.morph[:12])}, half_a, half_b, mean, std, rng)
    assert few["n_each"] == 30 and few["model"]["n"] == 12  # fewer cells than the half: said, not hidden


def test_at_floor_sizes_scores_each_method_with_as_many_cells_as_the_first_half_of_an_odd_split():
    """61 real cells split 30 / 31: each method is scored with 30 of its cells (the floor's first half,
    ``half_a``) against the 31 of ``half_b``, and its metrics are those of that subset: drawn with the
    same generator state, the 30 cells ``_subset`` keeps give the same figures through ``compare``."""
    from models.image_eval import _halves, _subset, at_floor_sizes

    rng = np.random.default_rng(0)
    real = FeatureSets(rng.normal(size=(61, 3)), rng.normal(size=(61, 4)))
    model = FeatureSets(rng.normal(size=(200, 3)), rng.normal(size=(200, 4)))
    mean, std = morph_standardisation(real.morph)
    a, b = _halves(61, rng)
    half_a, half_b = (FeatureSets(real.inception[i], real.morph[i]) for i in (a, b))
    sized = at_floor_sizes({"model": model}, half_a, half_b, mean, std, np.random.default_rng(7))
    assert (sized["n_each"], sized["n_reference"], sized["model"]["n"]) == (30, 31, 30)
    expected = compare(_subset(model, 30, np.random.default_rng(7)), half_b, mean, std)
    assert {k: sized["model"][k] for k in expected} == pytest.approx(expected)
