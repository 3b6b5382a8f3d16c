import pytest
import torch
from botorch.acquisition import qSimpleRegret
from botorch.posteriors.ensemble import EnsemblePosterior

from acquisition.ensemble_model import CachedEnsembleModel, MemberSampler, index_choices


def _model(K=4, N=10, M=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(K, N, M, generator=g, dtype=torch.float64)
    return Y, CachedEnsembleModel(Y)


def test_forward_indexes_members_b_x_K_x_q_x_M():
    Y, model = _model()
    X = torch.tensor([[[2.0], [5.0]], [[0.0], [9.0]], [[1.0], [1.0]]])  # b=3 x q=2 x 1
    out = model(X)
    assert out.shape == (3, 4, 2, 3)
    assert torch.equal(out[1, :, 1], Y[:, 9])
    assert torch.equal(out[0, 2, 0], Y[2, 2])


def test_posterior_is_ensemble_posterior_with_member_mean():
    Y, model = _model()
    post = model.posterior(index_choices(10).unsqueeze(0))  # 1 x 10 x 1
    assert isinstance(post, EnsemblePosterior)
    assert torch.allclose(post.mean[0], Y.mean(dim=0))


def test_member_sampler_returns_each_member_once_in_order():
    Y, model = _model()
    post = model.posterior(torch.tensor([[[3.0], [7.0]], [[0.0], [1.0]]]))
    samples = MemberSampler(4)(post)
    assert samples.shape == (4, 2, 2, 3)
    for k in range(4):
        assert torch.equal(samples[k, 0, 1], Y[k, 7])
        assert torch.equal(samples[k, 1, 0], Y[k, 0])


def test_mc_acquisition_average_is_exact_member_average():
    Y, model = _model(M=1)
    acqf = qSimpleRegret(model, sampler=MemberSampler(4))
    value = acqf(torch.tensor([[[2.0], [6.0]]]))
    expected = torch.maximum(Y[:, 2, 0], Y[:, 6, 0]).mean()
    assert torch.equal(value[0], expected)


def test_member_sampler_rejects_wrong_ensemble_size():
    _, model = _model()
    with pytest.raises(ValueError, match="built for 3 members"):
        MemberSampler(3)(model.posterior(torch.tensor([[[1.0]]])))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="K x N x M"):
        CachedEnsembleModel(torch.zeros(3, 4))
    _, model = _model()
    with pytest.raises(IndexError, match="out of range"):
        model(torch.tensor([[[10.0]]]))
