import math
import warnings

import numpy as np
import pytest
import torch
from botorch.optim import optimize_acqf_discrete

from acquisition.ensemble_model import CachedEnsembleModel, index_choices
from acquisition.greedy import greedy_select, thompson_members
from acquisition.registry import make_acquisition

PARAMS = {
    "qUCB": {"beta": 2.0},
    "qEI": {"best_f": 1.0},
    "mean": {},
    "qPosteriorStandardDeviation": {},
}


def _values(K, N, seed):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, N, generator=g, dtype=torch.float64)
    return shared + 0.5 * torch.randn(K, N, generator=g, dtype=torch.float64)


def _botorch(values, q, name, params, exclude=None, pending=None):
    K, N = values.shape
    model = CachedEnsembleModel(values.unsqueeze(-1))
    X_pending = None if pending is None else index_choices(N)[torch.as_tensor(pending)]
    acqf = make_acquisition(name, model, X_pending=X_pending, **params)
    eligible = torch.ones(N, dtype=torch.bool)
    if exclude is not None:
        eligible &= ~torch.as_tensor(exclude)
    if pending is not None:
        eligible[torch.as_tensor(pending)] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X, acq_values = optimize_acqf_discrete(acqf, q, index_choices(N)[eligible])
    return X[:, 0].long(), acq_values


def test_qucb_closed_form_three_candidates():
    # K = 3 members, N = 3; beta = 2 / pi -> beta' = 1:  u_ki = mu_i + |y_ki - mu_i|
    values = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    # mu = (1, 1, 1); u = [[3, 2, 1], [2, 2, 1], [2, 3, 1]]
    # step 1: a({0}) = 7/3, a({1}) = 7/3, a({2}) = 1 -> 0 (first of the tie)
    # step 2: running max (3, 2, 2): a(+1) = (3 + 2 + 3)/3 = 8/3, a(+2) = 7/3 -> 1
    # step 3: only 2 left: a = 8/3
    indices, acq = greedy_select(values, 3, "qUCB", {"beta": 2 / math.pi})
    assert indices.tolist() == [0, 1, 2]
    assert acq.tolist() == pytest.approx([7 / 3, 8 / 3, 8 / 3])


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_identical_to_optimize_acqf_discrete(name):
    values = _values(6, 300, seed=0)
    exclude = np.zeros(300, dtype=bool)
    exclude[::9] = True
    pending = np.array([4, 50, 123])
    ref_idx, ref_val = _botorch(values, 16, name, PARAMS[name], exclude, pending)
    idx, val = greedy_select(values, 16, name, PARAMS[name], exclude=exclude, pending=pending)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(val, ref_val)
    assert not exclude[idx.numpy()].any() and not np.isin(idx.numpy(), pending).any()


def test_saturated_ties_break_like_botorch():
    # K = 2: after two picks every candidate ties -> lowest remaining index, as BoTorch
    values = _values(2, 40, seed=3)
    ref_idx, ref_val = _botorch(values, 10, "mean", {})
    idx, val = greedy_select(values, 10, "mean")
    assert torch.equal(idx, ref_idx) and torch.equal(val, ref_val)
    assert len(set(val[3:].tolist())) == 1


def test_qlogei_matches_within_tolerance():
    values = _values(5, 200, seed=1)
    params = {"best_f": 0.5}
    pending = np.array([7, 8])
    ref_idx, ref_val = _botorch(values, 12, "qLogEI", params, pending=pending)
    idx, val = greedy_select(values, 12, "qLogEI", params, pending=pending)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(val, ref_val, rtol=1e-10, atol=1e-12)


def test_thompson_matches_per_member_discrete_optimum():
    values = _values(4, 100, seed=2)
    exclude = np.zeros(100, dtype=bool)
    exclude[:10] = True
    idx, val = greedy_select(values, 9, "thompson", {"seed": 5}, exclude=exclude)
    members = thompson_members(9, 4, 5)
    assert sorted(members[:4]) == [0, 1, 2, 3]
    model = CachedEnsembleModel(values.unsqueeze(-1))
    eligible = ~torch.as_tensor(exclude)
    for t, member in enumerate(members):
        acqf = make_acquisition("thompson", model, member=member)
        X, v = optimize_acqf_discrete(acqf, 1, index_choices(100)[eligible])
        assert int(X[0, 0]) == int(idx[t]) and float(v) == float(val[t])
        eligible[int(idx[t])] = False


def test_fewer_eligible_than_q_warns():
    values = _values(3, 5, seed=0)
    exclude = np.array([True, False, True, False, False])
    with pytest.warns(UserWarning, match="only 2"):
        idx, _ = greedy_select(values, 4, "mean", exclude=exclude, pending=[3])
    assert sorted(idx.tolist()) == [1, 4]


def test_narrow_errors():
    values = _values(3, 5, seed=0)
    with pytest.raises(ValueError, match="valid names"):
        greedy_select(values, 2, "qKG")
    with pytest.raises(ValueError, match="beta"):
        greedy_select(values, 2, "qUCB")
    with pytest.raises(ValueError, match="K x N"):
        greedy_select(values[0], 2, "mean")
    with pytest.raises(ValueError, match="positive"):
        greedy_select(values, 0, "mean")
    with pytest.raises(ValueError, match="pending"):
        greedy_select(values, 2, "mean", pending=[9])


@pytest.mark.slow
@pytest.mark.parametrize("name,K", [("qEI", 5), ("mean", 8)])
def test_identical_to_optimize_acqf_discrete_large(name, K):
    values = _values(K, 2000, seed=4)
    pending = np.array([1, 500, 1999])
    ref_idx, ref_val = _botorch(values, 64, name, PARAMS[name], pending=pending)
    idx, val = greedy_select(values, 64, name, PARAMS[name], pending=pending)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(val, ref_val)


@pytest.mark.slow
@pytest.mark.parametrize("name,K,pending", [
    ("qUCB", 8, None), ("qUCB", 8, [1, 500, 1999]), ("qPosteriorStandardDeviation", 6, [3, 1998]),
])
def test_qucb_std_large_identical_until_saturation(name, K, pending):
    """qUCB / qPSTD: identical picks and values while the joint value still grows.

    Once saturated all remaining candidates tie in exact arithmetic; BoTorch's choice
    among them then depends on last-bit rounding of the per-point member mean inside its
    ``K x b x (1 + p)`` evaluation tensor (last entries of a block), ours is the lowest
    index.  Values stay equal to rounding.
    """
    values = _values(K, 2000, seed=4)
    pending = None if pending is None else np.array(pending)
    ref_idx, ref_val = _botorch(values, 64, name, PARAMS[name], pending=pending)
    idx, val = greedy_select(values, 64, name, PARAMS[name], pending=pending)
    growing = torch.cat([torch.tensor([True]), val[1:] > val[:-1]])
    n_growing = int(torch.cumprod(growing.int(), 0).sum())
    assert n_growing >= K // 2
    assert torch.equal(idx[:n_growing], ref_idx[:n_growing])
    assert torch.equal(val[:n_growing], ref_val[:n_growing])
    assert torch.allclose(val, ref_val, rtol=1e-13, atol=0)
    assert len(set(idx.tolist())) == 64
