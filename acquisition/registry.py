"""Acquisition functions by name, built over a ``CachedEnsembleModel``.

Names (all Monte-Carlo over the ensemble members, each member one sample via
``MemberSampler``):

* ``qUCB`` — ``qUpperConfidenceBound(beta)``; per member ``mu + sqrt(beta pi / 2) |y_k - mu|``.
* ``qEI`` — ``qExpectedImprovement(best_f)``; ``best_f`` = the incumbent, on the scale of the values
  (``loop propose``: the best member-mean predicted objective over the measured conditions).
* ``qLogEI`` — ``qLogExpectedImprovement(best_f)`` (smoothed log of qEI).
* ``qPosteriorStandardDeviation`` — member disagreement ``sqrt(pi/2) |y_k - mu|``
  (pure exploration; BoTorch's MC ``qPosteriorStandardDeviation``).
* ``mean`` — ``qSimpleRegret``: ``E_k max_q y_k`` (pure exploitation).
* ``thompson`` — ``EnsembleThompsonSampling(member)``: the objective under one member
  (a posterior sample), summed over ``q`` as BoTorch's ``PathwiseThompsonSampling`` does;
  a batch is built one member per pick (see ``acquisition.greedy``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from botorch.acquisition import (
    AcquisitionFunction,
    qExpectedImprovement,
    qLogExpectedImprovement,
    qPosteriorStandardDeviation,
    qSimpleRegret,
    qUpperConfidenceBound,
)
from botorch.acquisition.objective import IdentityMCObjective, MCAcquisitionObjective
from botorch.utils.transforms import t_batch_mode_transform
from torch import Tensor

from acquisition.ensemble_model import CachedEnsembleModel, MemberSampler

__all__ = ["ACQUISITIONS", "EnsembleThompsonSampling", "make_acquisition"]


class EnsembleThompsonSampling(AcquisitionFunction):
    """Thompson sampling with an ensemble: the objective under member ``member``.

    Args:
        model: a ``CachedEnsembleModel``.
        member: which member (posterior sample) to follow, ``0 <= member < K``.
        objective: MC objective (defaults to the identity for one output).
    """

    def __init__(self, model: CachedEnsembleModel, member: int,
                 objective: MCAcquisitionObjective | None = None) -> None:
        super().__init__(model=model)
        if isinstance(member, bool) or int(member) != member or not 0 <= int(member) < model.n_members:
            raise ValueError(f"member must be an integer in [0, {model.n_members}), got {member!r}")
        if objective is None and model.num_outputs != 1:
            raise ValueError(f"thompson without an objective needs one model output, got {model.num_outputs}; "
                             "pass an MC objective that reduces the outputs (acquisition.objectives)")
        self.member = int(member)
        self.objective = objective if objective is not None else IdentityMCObjective()

    @t_batch_mode_transform()
    def forward(self, X: Tensor) -> Tensor:
        """``b x q x 1`` candidate indices -> ``b`` (member objective summed over q)."""
        values = self.model.posterior(X).values  # b x K x q x M
        samples = values[..., self.member, :, :].unsqueeze(0)  # 1 x b x q x M
        return self.objective(samples, X)[0].sum(dim=-1)  # b


def _ucb(model, objective, sampler, X_pending, *, beta: float):
    return qUpperConfidenceBound(model, beta=beta, sampler=sampler, objective=objective,
                                 X_pending=X_pending)


def _ei(model, objective, sampler, X_pending, *, best_f: float):
    return qExpectedImprovement(model, best_f=best_f, sampler=sampler, objective=objective,
                                X_pending=X_pending)


def _log_ei(model, objective, sampler, X_pending, *, best_f: float,
            tau_max: float = 1e-2, tau_relu: float = 1e-6):
    return qLogExpectedImprovement(model, best_f=best_f, sampler=sampler, objective=objective,
                                   X_pending=X_pending, tau_max=tau_max, tau_relu=tau_relu)


def _std(model, objective, sampler, X_pending):
    return qPosteriorStandardDeviation(model, sampler=sampler, objective=objective,
                                       X_pending=X_pending)


def _mean(model, objective, sampler, X_pending):
    return qSimpleRegret(model, sampler=sampler, objective=objective, X_pending=X_pending)


def _thompson(model, objective, sampler, X_pending, *, member: int):
    if X_pending is not None:
        raise ValueError("thompson takes no X_pending (pending points are simply excluded)")
    return EnsembleThompsonSampling(model, member=member, objective=objective)


ACQUISITIONS: dict[str, Callable[..., AcquisitionFunction]] = {
    "qUCB": _ucb,
    "qEI": _ei,
    "qLogEI": _log_ei,
    "qPosteriorStandardDeviation": _std,
    "thompson": _thompson,
    "mean": _mean,
}

_PARAMS = {
    "qUCB": ({"beta"}, set()),
    "qEI": ({"best_f"}, set()),
    "qLogEI": ({"best_f"}, {"tau_max", "tau_relu"}),
    "qPosteriorStandardDeviation": (set(), set()),
    "thompson": ({"member"}, set()),
    "mean": (set(), set()),
}


def make_acquisition(
    name: str,
    model: CachedEnsembleModel,
    objective: MCAcquisitionObjective | None = None,
    *,
    X_pending: Tensor | None = None,
    **params: Any,
) -> AcquisitionFunction:
    """Build acquisition function ``name`` over ``model`` with the per-member sampler.

    Args:
        name: one of ``ACQUISITIONS`` (``qUCB``, ``qEI``, ``qLogEI``,
            ``qPosteriorStandardDeviation``, ``thompson``, ``mean``).
        model: the cached ensemble (``K`` members).
        objective: MC objective over the model outputs (None: identity, M must be 1).
        X_pending: ``p x 1`` (or ``p``) indices of candidates in flight.
        **params: ``beta`` (qUCB), ``best_f`` (qEI, qLogEI; optional ``tau_max``,
            ``tau_relu``), ``member`` (thompson).
    """
    if name not in ACQUISITIONS:
        raise ValueError(f"unknown acquisition {name!r}; valid names: {sorted(ACQUISITIONS)}")
    if not isinstance(model, CachedEnsembleModel):
        raise TypeError(f"model must be a CachedEnsembleModel, got {type(model).__name__}")
    required, optional = _PARAMS[name]
    missing = required - params.keys()
    unknown = params.keys() - required - optional
    if missing or unknown:
        raise ValueError(
            f"acquisition {name!r} needs parameters {sorted(required)} "
            f"(optional {sorted(optional)}); missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    if "beta" in params and not float(params["beta"]) >= 0:
        raise ValueError(f"qUCB needs beta >= 0, got {params['beta']!r}")
    if X_pending is not None:
        X_pending = torch.as_tensor(X_pending).to(model.Y.dtype)
        if X_pending.ndim == 1:  # indices as a flat list: one candidate per row
            X_pending = X_pending.unsqueeze(-1)
        if X_pending.ndim != 2 or X_pending.shape[-1] != 1:
            raise ValueError(f"X_pending must be p x 1 candidate indices, got shape {tuple(X_pending.shape)}")
    sampler = MemberSampler(model.n_members)
    return ACQUISITIONS[name](model, objective, sampler, X_pending, **params)
