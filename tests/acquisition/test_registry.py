import math
import warnings

import pytest
import torch

from acquisition.ensemble_model import CachedEnsembleModel
from acquisition.registry import ACQUISITIONS, make_acquisition


@pytest.fixture
def model():
    Y = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64).unsqueeze(-1)  # K=2, N=3
    return CachedEnsembleModel(Y)


def _value(acqf, indices):
    X = torch.tensor(indices, dtype=torch.float64).view(1, -1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acqf(X)[0])


def test_all_names_build(model):
    params = {"qUCB": {"beta": 1.0}, "qEI": {"best_f": 0.0}, "qLogEI": {"best_f": 0.0},
              "thompson": {"member": 0}}
    for name in ACQUISITIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acqf = make_acquisition(name, model, **params.get(name, {}))
        assert math.isfinite(_value(acqf, [0]))


def test_qucb_closed_form(model):
    # candidate 0: members (1, 3), mu = 2, |y - mu| = 1 -> 2 + sqrt(beta pi / 2)
    acqf = make_acquisition("qUCB", model, beta=2.0)
    assert _value(acqf, [0]) == pytest.approx(2 + math.sqrt(math.pi))
    # {0, 1}: member 0 max(2 + b, 1 + b) ; member 1 max(2 + b, 1 + b) with b = sqrt(pi)
    b = math.sqrt(math.pi)
    assert _value(acqf, [0, 1]) == pytest.approx(2 + b)


def test_qei_and_mean_and_std_closed_forms(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ei = make_acquisition("qEI", model, best_f=1.5)
    assert _value(ei, [0, 1]) == pytest.approx((0.5 + 1.5) / 2)
    assert _value(make_acquisition("mean", model), [0, 1]) == pytest.approx((2 + 3) / 2)
    std = make_acquisition("qPosteriorStandardDeviation", model)
    assert _value(std, [0]) == pytest.approx(math.sqrt(math.pi / 2))
    assert _value(std, [2]) == 0.0


def test_thompson_follows_one_member(model):
    assert _value(make_acquisition("thompson", model, member=1), [0]) == 3.0
    assert _value(make_acquisition("thompson", model, member=0), [1]) == 2.0


def test_pending_points_condition_the_value(model):
    acqf = make_acquisition("mean", model, X_pending=torch.tensor([[0.0]]))
    assert _value(acqf, [2]) == pytest.approx((1 + 3) / 2)


def test_narrow_errors(model):
    with pytest.raises(ValueError, match="valid names"):
        make_acquisition("qNEI", model)
    with pytest.raises(ValueError, match="missing \\['beta'\\]"):
        make_acquisition("qUCB", model)
    with pytest.raises(ValueError, match="unknown \\['gamma'\\]"):
        make_acquisition("mean", model, gamma=1)
    with pytest.raises(ValueError, match="member must be"):
        make_acquisition("thompson", model, member=5)


def test_flat_pending_indices_act_as_p_x_1(model):
    flat = make_acquisition("mean", model, X_pending=[0])
    column = make_acquisition("mean", model, X_pending=torch.tensor([[0.0]]))
    assert _value(flat, [2]) == _value(column, [2]) == pytest.approx((1 + 3) / 2)


def test_bad_parameters_are_named_errors(model):
    with pytest.raises(ValueError, match="member must be an integer"):
        make_acquisition("thompson", model, member=1.7)
    with pytest.raises(ValueError, match="beta >= 0"):
        make_acquisition("qUCB", model, beta=-1.0)
    with pytest.raises(ValueError, match="X_pending must be p x 1"):
        make_acquisition("mean", model, X_pending=torch.zeros(2, 1, 1))
    two_outputs = CachedEnsembleModel(torch.zeros(2, 3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="one model output"):
        make_acquisition("thompson", two_outputs, member=0)


def test_thompson_sums_its_member_over_the_q_batch(model):
    """Closed form: ``thompson`` over a q-batch is its member's values summed over the batch (as
    BoTorch's PathwiseThompsonSampling): member 0 on {0, 1} is 1 + 2, member 1 is 3 + 0."""
    assert _value(make_acquisition("thompson", model, member=0), [0, 1]) == 3.0
    assert _value(make_acquisition("thompson", model, member=1), [0, 1, 2]) == 3.0
    assert _value(make_acquisition("thompson", model, member=0), [1, 1]) == 4.0
