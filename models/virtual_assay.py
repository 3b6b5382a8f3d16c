"""The ``VirtualAssay`` protocol every assay (feature space or image space) implements.

A virtual assay is an ensemble of ``K`` generative members. For a compound (Morgan
fingerprint, packed ``uint8 x 256``) at a dose it predicts per-member *profiles*:

    profile_k(c) = (mean_i x_i^(k, c) - mu_k^ctrl) / sigma_k^ctrl          (per feature)

where ``x_i^(k, c)`` are ``n_cells`` cells (feature vectors) sampled from member ``k``
under compound ``c`` and ``mu_k^ctrl``, ``sigma_k^ctrl`` are the mean and standard
deviation of cells member ``k`` samples under the control (DMSO) condition on the
same plate. This mirrors how lab profiles are normalised to a plate's DMSO wells, so
a profile is in "control standard deviations" and an inactive compound has a
profile near 0. Spread across ``k`` is the ensemble's (epistemic) uncertainty.

Shapes: ``N`` compounds, ``K`` members, ``F`` features.

Shared input checks (``check_fingerprints``, ``check_doses``) and the profile
normalisation (``profiles_from_cells``) live here so every assay behaves the same.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

FINGERPRINT_N_BITS = 2048
FINGERPRINT_N_BYTES = FINGERPRINT_N_BITS // 8
CONTROL_STD_FLOOR = 1e-3  # profiles divide by max(sigma_ctrl, floor) (features in normalised units)

__all__ = [
    "CONTROL_STD_FLOOR",
    "FINGERPRINT_N_BITS",
    "FINGERPRINT_N_BYTES",
    "VirtualAssay",
    "check_doses",
    "check_fingerprints",
    "profiles_from_cells",
]


@runtime_checkable
class VirtualAssay(Protocol):
    """A trained virtual assay: K members that simulate cells under a compound.

    Attributes:
        n_members: K, the number of ensemble members.
        feature_names: the F profile features, in output order.
        version: short id of the trained model (config + training data).
    """

    n_members: int
    feature_names: list[str]
    version: str

    def predict_profiles(
        self,
        fingerprints: np.ndarray,
        dose_um: np.ndarray,
        *,
        n_cells: int = 32,
        seed: int = 0,
        plate_id: str | None = None,
        batch_size: int = 256,
    ) -> np.ndarray:
        """Per-member predicted profiles, ``float32 K x N x F``, normalised to each member's controls.

        Args:
            fingerprints: ``uint8 N x 256`` packed 2048-bit Morgan fingerprints (np.packbits order).
            dose_um: ``N`` doses in micromolar (> 0).
            n_cells: cells sampled per compound and member.
            seed: all sampling noise derives from it (same seed -> same output).
            plate_id: plate to condition on; None or a plate unseen in training uses the
                'unknown plate' token.
            batch_size: compounds per forward batch (memory/speed only, not results).
        """
        ...

    def predict_cells(
        self,
        fingerprint: np.ndarray | None,
        dose_um: float,
        *,
        n_cells: int = 32,
        seed: int = 0,
        plate_id: str | None = None,
    ) -> np.ndarray:
        """Sampled cells for one condition, ``float32 K x n_cells x ...`` in the assay's raw units.

        ``fingerprint=None`` means the control (DMSO) condition (``dose_um`` ignored).
        """
        ...


def check_fingerprints(fingerprints: np.ndarray, *, name: str = "fingerprints") -> np.ndarray:
    """Validate packed fingerprints ``uint8 N x 256``; returns a C-contiguous uint8 array."""
    arr = np.asarray(fingerprints)
    if arr.ndim != 2 or arr.shape[1] != FINGERPRINT_N_BYTES:
        hint = ""
        if arr.ndim == 2 and arr.shape[1] == FINGERPRINT_N_BITS:
            hint = " (looks unpacked: pack it with np.packbits(bits, axis=1))"
        raise ValueError(
            f"{name} must be packed uint8 N x {FINGERPRINT_N_BYTES} "
            f"({FINGERPRINT_N_BITS}-bit Morgan, np.packbits order), got shape {arr.shape}{hint}"
        )
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer) or arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"{name} must be uint8 (packed bits), got dtype {arr.dtype}")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def check_doses(dose_um: np.ndarray, n: int, *, name: str = "dose_um") -> np.ndarray:
    """Validate doses ``N`` (micromolar, finite, > 0); returns float64 array."""
    arr = np.asarray(dose_um, dtype=np.float64)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be a vector of length N={n}, got a scalar")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the fingerprints, got {arr.shape}")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} must be finite and > 0 micromolar; entry {i} is {float(arr[i])} "
            f"({int(bad.sum())} bad entries)"
        )
    return arr


def profiles_from_cells(
    treated_cells: Tensor,
    control_mean: Tensor,
    control_std: Tensor,
    *,
    std_floor: float = CONTROL_STD_FLOOR,
) -> Tensor:
    """Profiles ``b x F`` from treated cells ``b x n x F`` and control stats ``F`` (or ``b x F``).

    ``(mean over cells - control_mean) / max(control_std, std_floor)``.
    """
    if treated_cells.ndim != 3:
        raise ValueError(f"treated_cells must be b x n x F, got shape {tuple(treated_cells.shape)}")
    scale = torch.clamp(control_std, min=std_floor)
    return (treated_cells.mean(dim=1) - control_mean) / scale
