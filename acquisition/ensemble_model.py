"""BoTorch ``EnsembleModel`` over cached virtual-assay member predictions.

The virtual assay is an ensemble of ``K`` generative models.  Their predictions for
``N`` candidate compounds are computed once (``models.virtual_assay``) and cached as
``Y: K x N x M``.  Acquisition treats the ``K`` members as ``K`` equally weighted
posterior samples, so a candidate is identified by its index ``n`` and the BoTorch
input is that index as a float, ``X: b x q x 1``.

Sampling: BoTorch's ``IndexSampler`` draws member indices *at random with
replacement* (multinomial over the ensemble weights).  ``MemberSampler`` instead
returns every member exactly once, in order (``sample_shape = K``), so an MC
acquisition function's sample average is the exact ensemble average, with no
Monte-Carlo noise and no seed dependence.
"""

from __future__ import annotations

import torch
from botorch.models.ensemble import EnsembleModel
from botorch.posteriors.ensemble import EnsemblePosterior
from botorch.sampling.index_sampler import IndexSampler
from torch import Tensor

__all__ = ["CachedEnsembleModel", "MemberSampler", "index_choices"]


class CachedEnsembleModel(EnsembleModel):
    """Ensemble model whose members' outputs are looked up, not computed.

    Args:
        Y: ``K x N x M`` member predictions (``K`` members, ``N`` candidates,
            ``M`` outputs, e.g. the ``F`` profile features or one scalar objective).
    """

    def __init__(self, Y: Tensor) -> None:
        if not isinstance(Y, Tensor):
            raise TypeError(f"Y must be a torch.Tensor, got {type(Y).__name__}")
        if Y.ndim != 3:
            raise ValueError(f"Y must be K x N x M (3-d), got shape {tuple(Y.shape)}")
        if min(Y.shape) == 0:
            raise ValueError(f"Y must be non-empty, got shape {tuple(Y.shape)}")
        if not Y.is_floating_point():
            raise ValueError(f"Y must be floating point, got {Y.dtype}")
        super().__init__(weights=None)
        self.register_buffer("Y", Y)
        self._num_outputs = Y.shape[-1]

    @property
    def n_members(self) -> int:
        return self.Y.shape[0]

    @property
    def n_candidates(self) -> int:
        return self.Y.shape[1]

    def forward(self, X: Tensor) -> Tensor:
        """Look up member predictions for candidate indices.

        Args:
            X: ``b x q x 1`` candidate indices (floats holding integers).

        Returns:
            ``b x K x q x M`` member predictions.
        """
        if X.shape[-1] != 1:
            raise ValueError(f"X must be b x q x 1 candidate indices, got {tuple(X.shape)}")
        index = X[..., 0].round().long()  # b x q
        if index.numel() and (index.min() < 0 or index.max() >= self.n_candidates):
            raise IndexError(
                f"candidate index out of range [0, {self.n_candidates}): "
                f"min {int(index.min())}, max {int(index.max())}"
            )
        values = self.Y[:, index]  # K x b x q x M
        return values.movedim(0, -3)  # b x K x q x M


class MemberSampler(IndexSampler):
    """Sampler whose ``K`` samples are the ``K`` ensemble members, each exactly once.

    Samples have shape ``K x b x q x M`` (``sample_shape = torch.Size([K])``); sample
    ``k`` is member ``k``.  Posterior weights are ignored (members count equally).

    Args:
        n_members: ensemble size ``K``; a posterior of another size is an error.
    """

    def __init__(self, n_members: int) -> None:
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        super().__init__(sample_shape=torch.Size([n_members]), seed=0)

    def _construct_base_samples(self, posterior: EnsemblePosterior) -> None:
        n_members = self.sample_shape[0]
        if posterior.ensemble_size != n_members:
            raise ValueError(
                f"MemberSampler built for {n_members} members, posterior has "
                f"{posterior.ensemble_size}"
            )
        shape = self.sample_shape + posterior.batch_shape
        if self.base_samples is None or self.base_samples.shape != shape:
            members = torch.arange(n_members, device=posterior.device)
            members = members.view(n_members, *([1] * len(posterior.batch_shape)))
            self.register_buffer("base_samples", members.expand(shape).contiguous())
        if self.base_samples.device != posterior.device:
            self.to(device=posterior.device)  # pragma: no cover


def index_choices(n_candidates: int, *, dtype: torch.dtype = torch.float64,
                  device: torch.device | None = None) -> Tensor:
    """All candidate indices as BoTorch inputs, ``N x 1`` (for ``optimize_acqf_discrete``)."""
    return torch.arange(n_candidates, dtype=dtype, device=device).unsqueeze(-1)
