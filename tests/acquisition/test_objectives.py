import math

import numpy as np
import pytest
import torch

from acquisition.ensemble_model import CachedEnsembleModel, MemberSampler
from acquisition.objectives import (
    activity_objective,
    member_objective_values,
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
    with pytest.raises(ValueError, match="at least one"):
        weighted_objective([])
