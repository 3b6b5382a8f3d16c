import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from acquisition.ensemble_model import CachedEnsembleModel, MemberSampler
from acquisition.objectives import (
    ObjectiveConfig,
    activity_objective,
    member_objective_values,
    target_similarity,
    target_similarity_objective,
    weighted_objective,
)


def test_activity_closed_form():
    profiles = torch.tensor([[[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    values = member_objective_values(profiles, activity_objective())
    assert values.shape == (1, 2)
    assert values[0, 0] == pytest.approx(5.0 / 2.0)  # ||(3,4,0,0)|| / sqrt(4)
    assert values[0, 1] == 0.0


def test_target_similarity_closed_form():
    target = np.array([1.0, 0.0])
    profiles = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]]], dtype=torch.float64)
    values = member_objective_values(profiles, target_similarity_objective(target))
    assert values[0].tolist() == pytest.approx([1.0, 0.0, -1 / math.sqrt(2)])


def test_weighted_objective_combines_terms():
    g = torch.Generator().manual_seed(0)
    profiles = torch.randn(3, 20, 5, generator=g, dtype=torch.float64)
    target = torch.randn(5, generator=g, dtype=torch.float64)
    act, sim = activity_objective(), target_similarity_objective(target)
    combined = weighted_objective([(act, 2.0), (sim, -0.5)])
    expected = 2.0 * member_objective_values(profiles, act) - 0.5 * member_objective_values(profiles, sim)
    assert torch.allclose(member_objective_values(profiles, combined), expected)


def test_fast_path_matches_model_posterior_samples():
    g = torch.Generator().manual_seed(1)
    profiles = torch.randn(4, 30, 6, generator=g, dtype=torch.float64)
    model = CachedEnsembleModel(profiles)
    X = torch.arange(30, dtype=torch.float64).view(30, 1, 1)  # 30 x 1 x 1
    samples = MemberSampler(4)(model.posterior(X))  # 4 x 30 x 1 x 6
    via_model = activity_objective()(samples)[..., 0]  # 4 x 30
    assert torch.allclose(via_model, member_objective_values(profiles, activity_objective(), chunk_size=7))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="K x N x F"):
        member_objective_values(torch.zeros(3, 4), activity_objective())
    with pytest.raises(ValueError, match="non-zero"):
        target_similarity_objective(np.zeros(3))
    with pytest.raises(ValueError, match="feature_index has 1 entries, target_profile 2"):
        target_similarity_objective(np.ones(2), feature_index=[0])


def test_similarity_on_selected_clipped_features():
    """``feature_index`` picks and orders the sampled features; both sides are clipped before the cosine."""
    samples = torch.tensor([[[50.0, 0.0, 3.0]]])  # 1 x 1 x 3
    objective = target_similarity_objective(torch.tensor([4.0, 20.0]), feature_index=[2, 0], clip_z=10.0)
    # shared (3, 10) against the clipped target (4, 10)
    expected = (3 * 4 + 10 * 10) / (np.hypot(3, 10) * np.hypot(4, 10))
    assert objective(samples).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least one"):
        weighted_objective([])


def _rms(x):
    return np.sqrt((x ** 2).mean(-1))


def _similarity(a, b, floor_z=1.0):
    """Cosine with the control-noise floor: a . b / (|b| sqrt(|a|^2 + F floor^2))."""
    return (a @ b) / (np.sqrt((a ** 2).sum(-1) + a.shape[-1] * floor_z ** 2) * np.linalg.norm(b))


def test_objective_config_closed_form_matches_features_by_name():
    rng = np.random.default_rng(0)
    names = ["Cells_A", "Cells_B", "Nuclei_C", "Cytoplasm_D"]
    profiles = rng.normal(size=(3, 7, 4)).astype(np.float32)  # K x n x F
    # target in another order, with a feature the assay does not predict (ignored)
    config = ObjectiveConfig(activity_weight=0.5, similarity_weight=2.0,
                             target_features=("Nuclei_C", "Cells_A", "Image_Extra"),
                             target_values=(1.5, -0.5, 9.0), target_label="ref")
    values = config.member_values(profiles, names)
    expected = 0.5 * _rms(profiles) + 2.0 * _similarity(profiles[..., [2, 0]], np.array([1.5, -0.5]))
    assert values.shape == (3, 7)
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    # the default is activity alone, equal to the activity objective
    np.testing.assert_allclose(ObjectiveConfig().member_values(profiles, names), _rms(profiles), rtol=1e-6)
    # both sides are clipped to +-clip_z before the cosine: a near-zero-MAD feature cannot take it over
    clipped = dataclasses.replace(config, target_values=(1.5, -5000.0, 9.0), clip_z=1.0)
    expected = 0.5 * _rms(np.clip(profiles, -1, 1)) + 2.0 * _similarity(np.clip(profiles[..., [2, 0]], -1, 1),
                                                        np.array([1.0, -1.0]))
    np.testing.assert_allclose(clipped.member_values(profiles, names), expected, rtol=1e-5)


def test_noise_floor_discounts_weak_profiles_not_strong_ones():
    target = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    direction = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64) / math.sqrt(2)
    weak, strong = 0.1 * direction, 100.0 * direction  # same direction, |p| 0.1 and 100
    plain = target_similarity(torch.stack([weak, strong]), target)
    floored = target_similarity(torch.stack([weak, strong]), target, floor_z=1.0)
    assert plain.tolist() == pytest.approx([1.0, 1.0])
    # |p| / sqrt(|p|^2 + F) with F = 4
    assert floored.tolist() == pytest.approx([0.1 / math.sqrt(0.01 + 4), 100 / math.sqrt(1e4 + 4)])
    assert floored[0] < 0.06 and floored[1] > 0.999


def test_objective_config_round_trips_through_json():
    config = ObjectiveConfig(activity_weight=0.0, similarity_weight=1.0, target_features=("Cells_A", "Cells_B"),
                             target_values=(1.0, 2.0), target_label="C0001 measured")
    again = ObjectiveConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.uses_target and not ObjectiveConfig().uses_target


@pytest.mark.parametrize("kwargs, message", [
    (dict(activity_weight=0.0), "cannot both be 0"),
    (dict(activity_weight=-1.0), "activity_weight"),
    (dict(similarity_weight=float("nan")), "similarity_weight"),
    (dict(similarity_weight=1.0), "needs a target"),
    (dict(target_features=("Cells_A",), target_values=()), "1 feature names but 0 values"),
    (dict(target_features=("Cells_A", "Cells_A"), target_values=(1.0, 2.0)), "unique"),
    (dict(target_features=("Cells_A", "Cells_B"), target_values=(0.0, 0.0)), "not all zero"),
    (dict(target_features=("Cells_A", "Cells_B"), target_values=(1.0, float("inf"))), "finite"),
    (dict(clip_z=0.0), "clip_z"),
    (dict(floor_z=-1.0), "floor_z"),
])
def test_objective_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveConfig(**kwargs)


def test_target_sharing_too_few_features_with_the_assay_is_refused():
    config = ObjectiveConfig(similarity_weight=1.0, target_features=("Cells_A", "Cells_Z"), target_values=(1.0, 1.0),
                             target_label="ref")
    with pytest.raises(ValueError, match="'ref' shares 1 of its 2 features"):
        config.build(["Cells_A", "Cells_B"])
    zero_on_shared = ObjectiveConfig(similarity_weight=1.0, target_features=("Cells_A", "Cells_B", "Cells_Z"),
                                     target_values=(0.0, 0.0, 1.0), target_label="ref")
    with pytest.raises(ValueError, match="zero on every feature"):
        zero_on_shared.build(["Cells_A", "Cells_B"])
