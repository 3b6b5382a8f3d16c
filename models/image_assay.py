"""Image virtual assay: an ensemble of latent flow-matching members over single-cell crops.

Training (``train_image_assay``) runs top to bottom:

1. filter the crops (excluded plates / treated doses), centre-crop to ``image_size``;
2. fit the robust per-channel intensity normalisation (:class:`models.image_flow.ChannelNorm`);
3. train the shared autoencoder (resumable; it is part of the model and saved with it);
4. encode every crop, standardise latents per channel, save them with their labels; then train the
   decoder alone on noisy latents (stage 2, :func:`models.image_autoencoder.finetune_decoder`;
   the encoder, and so the latents, do not change);
5. train K flow members (seed ``member_seed(seed, k)`` = ``seed * 1000 + k`` and a bootstrap resample
   of compounds), one task per member, locally or with Ray (``models.ray_executor.run_tasks``; 1 CPU
   or a GPU fraction each). Each member folder holds its checkpoint (resumable), config,
   normalisation statistics and data fingerprint;
6. write ``assay.json`` once every member is trained: until then a folder that held a model (say
   one being given more members) stays that model. A rerun that trains a stage of that model further
   (on a larger time budget) removes ``assay.json`` first; one that trains nothing keeps it, and its version.

A stage (the autoencoder's first, or a member) stopped by its time budget (``max_minutes``) before
its ``max_steps`` continues from its checkpoint when training is rerun with a larger budget; a
budget that does not cover what a finished stage trained is refused (:func:`_check_resume_budgets`).

Model folder::

    MODEL_DIR/assay.json             ImageAssayConfig, channel names, compounds, version
    MODEL_DIR/normalisation.json     intensity percentiles + latent mean / std
    MODEL_DIR/autoencoder/           config.json, checkpoint.pt, stage1.pt (before the decoder's stage 2), model.pt
    MODEL_DIR/training_latents.pt    latents and labels the members train on
    MODEL_DIR/control_bank.pt        up to ``control_bank_size`` DMSO cells (latents + crops) per training plate
    MODEL_DIR/member_XXX/            config.json, checkpoint.pt, model.pt (EMA), normalisation.json,
                                     data_fingerprint.json, train_log.json

:class:`ImageAssay` implements :class:`models.virtual_assay.VirtualAssay`: generated cells are
featurised with :func:`lab_io.morphology.featurize_crops`; a profile is the mean of a compound's
cell features minus the mean of the same member's generated DMSO cells on the same plate, over
their std (``profiles_from_cells``).

Control mode decodes with *detail transfer* (``ImageAssayConfig.detail_transfer``): a generated
cell is ``x_hat = D(z_1) + g * (x_0 - D(z_0))``, i.e. the flow's latent change applied to the real
source control cell ``x_0`` (latent ``z_0``) while keeping the high-frequency detail the small
autoencoder cannot reproduce. With ``detail_shot_noise`` the residual's gain is
``g = sqrt(D(z_1) / D(z_0))`` per pixel and channel in raw intensity units (shot noise grows as the
square root of the signal; :func:`shot_noise_gain`), else 1. Noise mode decodes plainly
(``x_hat = D(z_1)``). Either way, with ``pixel_floor_percentile`` no generated pixel is darker than
that percentile of the conditioning plate's DMSO pixels, per channel
(:meth:`PlateControls.pixel_floor`): the camera's dark level, which the decoder and a transferred
residual otherwise undershoot (docs/STATUS_LOG.md, session 16: the cells' minimum DNA intensity came out
1.4-1.8 sd too dark).

Devices: training runs on the GPU when one is visible (batches are still drawn on the CPU, so a
seed gives the same batches anywhere); :meth:`ImageAssay.to` moves a loaded assay to a device
for sampling, while every method takes and returns CPU arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from lab_io.chem import morgan_fingerprints, tanimoto_matrix, unpack_fingerprints
from lab_io.crops import (
    ChannelNames, CropSet, centre_crop, compound_smiles, could_be_default_names, is_control_compound,
    smiles_for_name,
)
from lab_io.morphology import cell_feature_names, dna_channel_index, featurize_crops
from models.image_autoencoder import (
    AutoencoderConfig, ImageAutoencoder, decode_all, encode_all, finetune_decoder, train_autoencoder,
)
from models.image_dit import ImageDiT
from models.image_flow import (
    ChannelNorm, FlowConfig, LatentData, add_source_noise, bootstrap_compound_weights, control_source,
    load_checkpoint, sample_latents, sampling_condition, save_json, save_torch, source_indices, train_flow,
)
from models.ray_executor import check_executor, ensure_ray
from models.virtual_assay import check_doses, check_fingerprints, profiles_from_cells

logger = logging.getLogger(__name__)

ASSAY_FILE = "assay.json"
NORM_FILE = "normalisation.json"
LATENTS_FILE = "training_latents.pt"
BANK_FILE = "control_bank.pt"
DATA_FILE = "training_data.json"  # written before training starts: what a resume must train on


@dataclass(frozen=True)
class ImageAssayConfig:
    """Everything that defines a trained image assay (saved in ``assay.json``).

    Defaults are the 2-core CPU configuration: autoencoder <= 12 min (2,000 steps), each flow member <= 45 min (1,000 steps).
    """

    n_members: int = 1
    image_size: int = 64
    seed: int = 0
    dna_channel: int | None = None  # None: the channel named DNA / DAPI / Hoechst (else 0), saved as its index
    control_bank_size: int = 256
    detail_transfer: bool = True
    detail_shot_noise: bool = True  # residual gain sqrt(D(z_1) / D(z_0)); models saved before it: False
    pixel_floor_percentile: float | None = 0.1  # clamp to the plate's DMSO pixel percentile; before: None
    exclude_plates: tuple[str, ...] = ()
    exclude_doses_um: tuple[float, ...] = ()
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ImageAssayConfig":
        d = {"detail_shot_noise": False, "pixel_floor_percentile": None, **d}  # saved before these decode options
        d["autoencoder"] = AutoencoderConfig.from_dict(d["autoencoder"])
        d["flow"] = FlowConfig.from_dict(d["flow"])
        d["exclude_plates"] = tuple(d["exclude_plates"])
        d["exclude_doses_um"] = tuple(d["exclude_doses_um"])
        return ImageAssayConfig(**d)

    def __post_init__(self) -> None:
        step = ImageAutoencoder.downsample_factor * self.flow.dit.patch_size
        if self.image_size < step or self.image_size % step:
            raise ValueError(f"image_size must be a positive multiple of {step} px (autoencoder downsampling "
                             f"{ImageAutoencoder.downsample_factor} x DiT patch {self.flow.dit.patch_size}), got "
                             f"{self.image_size}; e.g. 64 for 68 px crops (their centre 64 px)")
        q = self.pixel_floor_percentile
        if q is not None and not 0.0 <= q <= 50.0:
            raise ValueError(f"pixel_floor_percentile must be None or in [0, 50], got {q}")


# ----------------------------------------------------------------------------- data preparation
def select_training_crops(crops: CropSet, config: ImageAssayConfig) -> CropSet:
    """Drop excluded plates and excluded treated doses (DMSO is never dropped by dose). A plate or
    dose to exclude that the crops do not hold is an error (a typo would train on what was meant
    to be held out)."""
    meta = crops.metadata
    plates = sorted(meta["plate"].astype(str).unique())
    unknown = [p for p in config.exclude_plates if p not in plates]
    if unknown:
        raise ValueError(f"plate(s) to exclude {unknown} not in the crops (plates there: {plates})")
    keep = ~meta["plate"].isin(config.exclude_plates).to_numpy()
    if config.exclude_doses_um:
        dose = meta["concentration_um"].to_numpy(dtype=float)
        treated_doses = sorted({float(d) for d in dose[~crops.is_control]})
        unknown = [d for d in config.exclude_doses_um if not np.isclose(d, treated_doses).any()]
        if unknown:
            raise ValueError(f"dose(s) to exclude {unknown} uM not among the treated doses (doses there: "
                             f"{[f'{d:g}' for d in treated_doses]} uM)")
        dose_hit = np.isclose(dose[:, None], np.asarray(config.exclude_doses_um)[None]).any(1)
        keep &= ~(dose_hit & ~crops.is_control)
    kept = crops.subset(keep)
    if len(kept) == 0:
        raise ValueError("no crops left after excluding plates / doses")
    return kept


def _check_plate_controls(crops: CropSet, source: str) -> None:
    """Every training plate with treated cells needs DMSO cells (its conditioning and, in control
    mode, its source): checked before any training."""
    plates = crops.metadata["plate"].astype(str).to_numpy()
    if not crops.is_control.any():
        raise ValueError(f"{source}: the training crops hold no DMSO control cells")
    lacking = sorted(set(plates[~crops.is_control]) - set(plates[crops.is_control]))
    if lacking:
        raise ValueError(f"{source}: plate(s) {lacking} have treated cells but no DMSO cells to condition on; "
                         + " ".join(f"--exclude-plate {p}" for p in lacking) + " leaves them out")


def data_fingerprint(crops: CropSet) -> str:
    """sha256 of the training crops (pixels) and their plate / compound / dose labels."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(crops.images).tobytes())
    cols = crops.metadata[["plate", "well", "compound", "concentration_um"]]
    h.update(cols.to_csv(index=False).encode())
    return h.hexdigest()


def compound_table(crops: CropSet, source: str) -> tuple[list[str], np.ndarray]:
    """Treated compound names (sorted) and their packed Morgan fingerprints ``uint8 n x 256``."""
    smiles = compound_smiles(crops.metadata, source)
    names = sorted(n for n, s in smiles.items() if s)
    if not names:
        return names, np.zeros((0, 256), np.uint8)
    try:
        return names, morgan_fingerprints([smiles[n] for n in names])
    except ValueError:
        bad = []
        for n in names:
            try:
                morgan_fingerprints([smiles[n]])
            except ValueError:
                bad.append(f"{n!r} ({smiles[n]!r})")
        raise ValueError(f"{source}: RDKit cannot parse the SMILES of compound(s) {', '.join(bad)}; fix them "
                         "or leave those cells out of the training crops") from None


@dataclass(frozen=True)
class LatentNorm:
    """Per-channel standardisation of autoencoder latents: ``z_n = (z - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @staticmethod
    def fit(z: Tensor) -> "LatentNorm":
        zz = z.transpose(0, 1).flatten(1)
        return LatentNorm(tuple(zz.mean(1).tolist()), tuple(zz.std(1).clamp_min(1e-6).tolist()))

    def apply(self, z: Tensor) -> Tensor:
        return (z - self._t(self.mean, z)) / self._t(self.std, z)

    def invert(self, z: Tensor) -> Tensor:
        return z * self._t(self.std, z) + self._t(self.mean, z)

    @staticmethod
    def _t(v: Sequence[float], like: Tensor) -> Tensor:
        return torch.tensor(v, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def _latent_data(z: Tensor, crops: CropSet, compounds: list[str], fps_packed: np.ndarray) -> LatentData:
    meta = crops.metadata
    plate_ids = crops.plates
    plate = meta["plate"].map({p: i for i, p in enumerate(plate_ids)}).to_numpy()
    control = crops.is_control
    cidx = {c: i for i, c in enumerate(compounds)}
    compound = np.asarray([-1 if ctrl else cidx[c] for c, ctrl in zip(meta["compound"], control)])
    dose = np.where(control, 0.0, meta["concentration_um"].to_numpy(float))
    return LatentData(z=z, plate=plate, compound=compound, dose_um=dose, plate_ids=plate_ids,
                      compounds=compounds, fingerprint_bits=torch.from_numpy(unpack_fingerprints(fps_packed)))


# ----------------------------------------------------------------------------- training
def train_image_assay(
    crops: CropSet,
    out_dir: str | Path,
    config: ImageAssayConfig,
    *,
    executor: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
    source: str = "crops",
) -> "ImageAssay":
    """Train (or resume) an image assay on ``crops`` into ``out_dir``; returns the loaded assay."""
    check_executor(executor)  # before any training
    out = Path(out_dir).resolve()  # Ray workers elsewhere resolve a relative path against their own folder
    config = replace(config, dna_channel=_dna_channel(out, config, crops, source))
    _check_resume_config(out, config)
    train = select_training_crops(crops, config)
    _check_plate_controls(train, source)
    if min(train.images.shape[1:3]) >= config.image_size + 8:
        logger.info("%s: the model works on the centre %d px of the %s px crops (--image-size sets it; a multiple "
                    "of 8)", source, config.image_size, "x".join(map(str, train.images.shape[1:3])))
    images = centre_crop(train.images, config.image_size, source)
    compounds, fps = compound_table(train, source)
    fingerprint = data_fingerprint(train)
    _check_resume_data(out, fingerprint, crops.channel_names)
    _check_resume_budgets(out, config)
    weights_before = fingerprint_weights(out, config.n_members)
    continuing = _continuing_stages_of_record(out, config)  # refuses a stage that cannot continue, before any write
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / DATA_FILE, {"data_fingerprint": fingerprint, "channel_names": list(crops.channel_names),
                                "n_train_cells": int(len(train)), "train_plates": sorted(set(train.plates)),
                                "config": config.to_dict()})  # what a resume must train with
    if "autoencoder" in continuing:  # its weights change next
        _withdraw_record(out, continuing)
    norm = ChannelNorm.fit(images, seed=config.seed)
    x = norm.normalize(images)  # n x C x H x W
    ae = _train_or_load_autoencoder(out / "autoencoder", x, replace(config.autoencoder, in_channels=x.shape[1]), config.seed)
    z_raw = encode_all(ae, x)
    latent_norm = LatentNorm.fit(z_raw)
    ae = _run_decoder_stage(out / "autoencoder", ae, x, latent_norm, config.seed)
    z = latent_norm.apply(z_raw)
    data = _latent_data(z, train, compounds, fps)
    flow_cfg = replace(config.flow, dit=replace(config.flow.dit, latent_channels=z.shape[1], latent_size=z.shape[2],
                                                dose_range_um=treated_dose_range(data.dose_um)))
    config = replace(config, autoencoder=replace(config.autoencoder, in_channels=x.shape[1]), flow=flow_cfg)
    norm_dict = {"intensity": norm.to_dict(), "latent": asdict(latent_norm)}
    save_json(out / NORM_FILE, norm_dict)
    save_torch(out / LATENTS_FILE, asdict_latent_data(data))
    save_torch(out / BANK_FILE, _control_bank(data, images, config.control_bank_size, config.seed))
    assay_meta = {
        "config": config.to_dict(), "channel_names": list(crops.channel_names), "compounds": compounds,
        "fingerprints_packed_hex": [bytes(f).hex() for f in fps], "data_fingerprint": fingerprint,
        "n_train_cells": int(len(train)), "train_plates": data.plate_ids, "source": str(source),
    }
    # the version identifies the trained model as before session 34 (a model resumed unchanged keeps it)
    assay_meta["version"] = hashlib.sha256(json.dumps(assay_meta, sort_keys=True).encode()).hexdigest()[:12]
    assay_meta["channels_named"] = bool(crops.channels_named)  # False: names say only the order (defaults)
    kwargs = [{"model_dir": str(out), "member_index": k, "meta": assay_meta} for k in range(config.n_members)]
    if continuing:  # members' weights change next; a Ray cluster that cannot be reached fails before
        if executor == "ray":
            ensure_ray(ray_address)
        _withdraw_record(out, continuing)
    _run_members(kwargs, executor, ray_address)
    if _keeps_record(out, assay_meta, weights_before):
        return ImageAssay.load(out)
    save_json(out / ASSAY_FILE, assay_meta)  # only now: until every member is trained the folder is what it was
    return ImageAssay.load(out)


def fingerprint_weights(out: Path, n_members: int) -> dict[str, str | None]:
    """sha256 of every trained weights file of a model folder (the autoencoder's ``model.pt`` and
    members ``0..n_members-1``'s; None for one not there): what a rerun compares to tell whether
    anything trained."""
    paths = [out / "autoencoder" / "model.pt"] + [out / f"member_{k:03d}" / "model.pt" for k in range(n_members)]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in paths}


def _continuing_stages_of_record(out: Path, requested: ImageAssayConfig) -> list[str]:
    """The stages of the model ``assay.json`` records (its autoencoder, one of its ``n_members``
    members) that train further under the requested budgets (stopped on a time budget, rerun with
    a larger one): their weights change, so the record must go before they train
    (:func:`_withdraw_record`). Empty without a record, or with one recorded without its config
    (before session 31); ValueError when such a stage lacks its checkpoint."""
    stored = read_stored_config(out) if (out / ASSAY_FILE).is_file() else None
    return [] if stored is None else _continuing_stages(out, stored[2], requested)


def _withdraw_record(out: Path, continuing: list[str]) -> None:
    """Remove ``assay.json`` (logged) just before ``continuing`` stages train further: the folder is
    an unfinished model until this run writes the new record, and a run killed meanwhile leaves no
    record naming the old version over other weights."""
    if (out / ASSAY_FILE).is_file():
        logger.info("%s: %s of the model there train(s) further, so its record is removed: the folder is an "
                    "unfinished model (no version) until this run completes", out / ASSAY_FILE, ", ".join(continuing))
        (out / ASSAY_FILE).unlink()


def _continuing_stages(out: Path, stored: ImageAssayConfig, requested: ImageAssayConfig) -> list[str]:
    """Finished stages of the stored model (its autoencoder, members ``0..stored.n_members-1``)
    that the requested budgets train further (:func:`_stage_continues`)."""
    ae, flow = requested.autoencoder, requested.flow
    ae_dir = out / "autoencoder"
    stages = [ae_dir.name] if any((ae_dir / f).is_file() for f in ("model.pt", "stage1.pt")) and _stage_continues(
        ae_dir, stored.autoencoder.to_dict(), None, ae.max_steps, ae.max_minutes) else []
    return stages + [d.name for d in _member_dirs(out, stored.n_members, "model.pt")
                     if _stage_continues(d, stored.flow.to_dict(), "flow", flow.max_steps, flow.max_minutes)]


def _keeps_record(out: Path, meta: dict, weights_before: dict[str, str | None]) -> bool:
    """Whether the model's ``assay.json`` stands as it is (logged): this run trained nothing (no
    weights file changed) and would only record other training budgets, so the model, and its
    version, are unchanged. Other sampling options, or new weights, make a new record."""
    path = out / ASSAY_FILE
    if not path.is_file() or fingerprint_weights(out, meta["config"]["n_members"]) != weights_before:
        return False
    stored = read_model_json(path)
    if "config" not in stored or _record_without_budgets(stored) != _record_without_budgets(meta):
        return False  # a record without its config (before session 31) is rewritten whole
    logger.info("%s: nothing trained (every stage had finished under these budgets): the model is unchanged "
                "and keeps its record (version %s)", out, stored.get("version"))
    return True


def _record_without_budgets(meta: dict) -> dict:
    """An ``assay.json`` record as saved (its config with the defaults of options added since),
    without its version, its training budgets and its ``source`` (the data path as typed: the data
    themselves are ``data_fingerprint``)."""
    config = ImageAssayConfig.from_dict(meta["config"]).to_dict()
    for part in ("autoencoder", "flow"):
        config[part] = {k: v for k, v in config[part].items() if k not in BUDGET_FIELDS}
    kept = {k: v for k, v in meta.items() if k not in ("version", "source")}
    return json.loads(json.dumps({**kept, "config": config}))


def treated_dose_range(dose_um: np.ndarray) -> tuple[float, float] | None:
    """(lowest, highest) treated dose in the training cells (DMSO rows have dose 0); None if none."""
    treated = np.asarray(dose_um, dtype=np.float64)
    treated = treated[treated > 0]
    return (float(treated.min()), float(treated.max())) if len(treated) else None


def read_model_json(path: Path) -> dict:
    """A JSON file of a model folder; ValueError naming it when it cannot be read (cut short)."""
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: unreadable ({err}); use another --out") from err


def read_stored_config(out: Path) -> tuple[Path, bool, ImageAssayConfig] | None:
    """(its file, whether it is a complete model, its config) of a model (``assay.json``) or the
    start of one (``training_data.json``, written before any training with the requested config)
    in ``out``; None when there is none, or it recorded no config (started before session 31)."""
    complete = (out / ASSAY_FILE).is_file()
    path = out / (ASSAY_FILE if complete else DATA_FILE)
    meta = read_model_json(path) if path.is_file() else {}
    return (path, complete, ImageAssayConfig.from_dict(meta["config"])) if "config" in meta else None


def _refuse_differences(path: Path, complete: bool, differ: list[str]) -> None:
    if differ:
        what = "a model" if complete else "the start of a model (stopped before it was complete)"
        raise ValueError(f"{path}: {what} with a different configuration is already there "
                         f"({', '.join(differ)}: stored vs requested); use another --out, or the stored "
                         "model's options to resume it")


def _check_resume_config(out: Path, config: ImageAssayConfig) -> None:
    """A folder holding a model, or the start of one (:func:`read_stored_config`), is resumed only
    with the same configuration but for budgets (:func:`_check_resume_budgets`), ensemble size and
    sampling and decode options; a complete ensemble keeps its members."""
    stored = read_stored_config(out)
    if stored is None:
        return
    path, complete, stored = stored
    differ = _differing_fields(_comparable(stored).to_dict(), _comparable(config).to_dict())
    if complete and config.n_members < stored.n_members:
        differ.append(f"n_members={stored.n_members}/{config.n_members} (members are added, never dropped)")
    _refuse_differences(path, complete, differ)


def _check_resume_budgets(out: Path, config: ImageAssayConfig) -> None:
    """A stage's budgets may change until that stage is finished. A finished stage (the
    autoencoder, a member) keeps its step budget unless it stopped on its time budget first; then
    a larger time budget continues it (the autoencoder only while no member has trained on its
    latents). No budget may shrink below what a finished stage trained."""
    stored = read_stored_config(out)
    if stored is None:
        return
    path, complete, stored = stored
    n_members = max(stored.n_members, config.n_members)  # the members this run trains or keeps; not leftovers
    differ = _check_member_budgets(out, stored.flow, config.flow, n_members)
    differ += _check_autoencoder_budget(out, stored.autoencoder, config.autoencoder, n_members)
    _refuse_differences(path, complete, differ)


@dataclass(frozen=True)
class StageProgress:
    """What a finished training stage (a member, the autoencoder's first stage) did: its steps and
    seconds (``train_log.json``) under its step and time budgets (``config.json``)."""

    steps: int
    seconds: float
    max_steps: int
    max_minutes: float

    def continues_under(self, max_steps: int, max_minutes: float) -> bool:
        """Whether these budgets train the stage further: it stopped on its time budget before
        ``max_steps``, and ``max_minutes`` leaves time it has not used."""
        return self.steps < max_steps and self.seconds < 60 * max_minutes

    def budget_conflicts(self, name: str, prefix: str, max_steps: int, max_minutes: float) -> list[str]:
        """``field=trained/requested (why)`` for a requested budget that would misstate what the stage trained."""
        out = []
        if (self.steps >= self.max_steps and max_steps != self.max_steps) or max_steps < self.steps:
            out.append(f"{prefix}max_steps={self.max_steps!r}/{max_steps!r} ({name} trained {self.steps} steps)")
        if max_minutes < self.max_minutes and 60 * max_minutes < self.seconds:
            out.append(f"{prefix}max_minutes={self.max_minutes!r}/{max_minutes!r} ({name} trained "
                       f"{self.seconds / 60:.1f} min)")
        return out


def read_stage_progress(stage_dir: Path, budget: dict, key: str | None = None) -> StageProgress:
    """:class:`StageProgress` of a finished stage. Its budgets are those ``train_log.json`` (written
    after the model) records, else its ``config.json``'s (``[key]`` of it for a member's), else
    ``budget``'s (a config dict); a stage saved without ``train_log.json`` counts as having trained
    all its steps. A ``train_log.json`` without budgets (written before stages continued on time;
    the autoencoder's then held only the last run's seconds) of a stage stopped before its
    ``max_steps`` counts as having used its time budget: it never continues on time."""
    cfg_path, log_path = stage_dir / "config.json", stage_dir / "train_log.json"
    if cfg_path.is_file():
        budget = read_model_json(cfg_path)
        budget = budget[key] if key else budget
    log = read_model_json(log_path) if log_path.is_file() else {}
    max_steps = int(log.get("max_steps", budget["max_steps"]))
    max_minutes = float(log.get("max_minutes", budget["max_minutes"]))
    steps, seconds = int(log.get("steps", max_steps)), float(log.get("seconds", 0.0))
    if "max_minutes" not in log and steps < max_steps:
        seconds = max(seconds, 60 * max_minutes)  # its log predates the budgets: it used its time budget
    return StageProgress(steps, seconds, max_steps, max_minutes)


def _member_dirs(out: Path, n_members: int, *names: str) -> list[Path]:
    """Folders of members ``0..n_members-1`` of ``out`` holding any of the files ``names``
    (leftover member folders beyond ``n_members`` are no part of the model)."""
    dirs = [out / f"member_{k:03d}" for k in range(n_members)]
    return [d for d in dirs if any((d / name).is_file() for name in names)]


def _check_member_budgets(out: Path, stored: FlowConfig, requested: FlowConfig, n_members: int) -> list[str]:
    """Budget conflicts of the finished members (of the first ``n_members``) with the requested flow budgets."""
    differ = []
    for mdir in _member_dirs(out, n_members, "model.pt"):
        progress = read_stage_progress(mdir, stored.to_dict(), "flow")
        differ += progress.budget_conflicts(mdir.name, "flow.", requested.max_steps, requested.max_minutes)
    return differ


def _check_autoencoder_budget(out: Path, stored: AutoencoderConfig, requested: AutoencoderConfig,
                              n_members: int) -> list[str]:
    """Budget conflicts of a finished autoencoder with the requested budgets; one stopped on its
    time budget cannot continue once a member (of the first ``n_members``) has trained on its latents."""
    ae_dir = out / "autoencoder"
    if not any((ae_dir / name).is_file() for name in ("model.pt", "stage1.pt")):
        return []
    progress = read_stage_progress(ae_dir, stored.to_dict())
    differ = progress.budget_conflicts("the autoencoder", "autoencoder.", requested.max_steps, requested.max_minutes)
    if (ae_dir / "model.pt").is_file() and stored.decoder_steps != requested.decoder_steps:
        differ.append(f"autoencoder.decoder_steps={stored.decoder_steps!r}/{requested.decoder_steps!r} "
                      "(that stage is finished)")
    started = [d.name for d in _member_dirs(out, n_members, "model.pt", "checkpoint.pt")]
    if started and progress.continues_under(requested.max_steps, requested.max_minutes):
        differ.append(f"autoencoder.max_minutes={progress.max_minutes!r}/{requested.max_minutes!r} (the autoencoder "
                      f"stopped on its time budget at step {progress.steps} of {progress.max_steps}, and "
                      f"{', '.join(started)} trained on its latents: it cannot train further)")
    return differ


def _dna_channel(out: Path, config: ImageAssayConfig, crops: CropSet, source: str) -> int:
    """The DNA channel index: as given (checked), else the one a model in ``out`` was trained
    with, else found by name (:func:`lab_io.morphology.dna_channel_index`)."""
    n = len(crops.channel_names)
    if config.dna_channel is not None:
        if not 0 <= config.dna_channel < n:
            raise ValueError(f"dna_channel {config.dna_channel} out of range for the {n} channels "
                             f"{list(crops.channel_names)} of {source}")
        return int(config.dna_channel)
    stored = read_stored_config(out)  # a model, or the start of one (assay.json comes last)
    if stored is not None and stored[2].dna_channel is not None:
        return int(stored[2].dna_channel)
    return dna_channel_index(crops.channel_names, source)


def _check_resume_data(out: Path, fingerprint: str, channel_names: Sequence[str]) -> None:
    """A model folder that already holds a model (or the start of one: its autoencoder) resumes
    only on the same training crops."""
    path = next((p for p in (out / ASSAY_FILE, out / DATA_FILE) if p.is_file()), None)
    if path is None:
        return
    meta = read_model_json(path)
    if list(meta["channel_names"]) != list(channel_names):
        raise ValueError(f"{path}: the model there was trained on channels {meta['channel_names']}, these crops "
                         f"have {list(channel_names)}; use another --out")
    if meta["data_fingerprint"] != fingerprint:
        raise ValueError(f"{path}: the model there was trained on other crops ({meta['n_train_cells']} cells of "
                         f"plates {meta['train_plates']}); use another --out, or the same --data and "
                         "exclusions to resume it")


def _differing_fields(stored: dict, requested: dict, prefix: str = "") -> list[str]:
    """``name=stored_value/requested_value`` for every (nested) field that differs."""
    out = []
    for k in sorted(set(stored) | set(requested)):
        a, b = stored.get(k), requested.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_fields(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}={a!r}/{b!r}")
    return out


def _comparable(config: ImageAssayConfig) -> ImageAssayConfig:
    """Config without derived sizes, ensemble size, training budgets, sampling and decode options
    (which may change on resume)."""
    budget = {"max_steps": 0, "max_minutes": 0.0, "checkpoint_every": 0}
    sampling = {"n_steps": 0, "sampler": "euler", "guidance_scale": 1.0, "guidance_reference": "null",
                "guidance_gated": False}
    assert set(sampling) == set(SAMPLING_FIELDS)
    ae = config.autoencoder
    return replace(config, n_members=0, detail_shot_noise=False, pixel_floor_percentile=None,
                   autoencoder=replace(ae, in_channels=0, max_steps=0, max_minutes=0.0, decoder_steps=min(ae.decoder_steps, 1),
                                       decoder_noise=ae.decoder_noise if ae.decoder_steps else AutoencoderConfig.decoder_noise,
                                       decoder_lr=ae.decoder_lr if ae.decoder_steps else AutoencoderConfig.decoder_lr),
                   flow=replace(config.flow, **budget, **sampling,
                                dit=replace(config.flow.dit, latent_channels=0, latent_size=0, dose_range_um=None)))


def _train_or_load_autoencoder(ae_dir: Path, x: Tensor, cfg: AutoencoderConfig, seed: int) -> ImageAutoencoder:
    """Stage 1 (resumable from ``checkpoint.pt``). Saved as ``model.pt`` when there is no stage 2,
    else as ``stage1.pt``; an existing ``model.pt`` is the finished autoencoder and is loaded, as is
    ``stage1.pt`` (stage 2 then follows), unless stage 1 stopped on its time budget and ``cfg``'s
    is larger: it then continues from its checkpoint (and stage 2 is run again on it)."""
    ae_dir.mkdir(parents=True, exist_ok=True)
    final, stage1, ckpt = ae_dir / "model.pt", ae_dir / "stage1.pt", ae_dir / "checkpoint.pt"
    done = next((path for path in (final, stage1) if path.is_file()), None)
    if done is not None and not _continues(ae_dir, cfg.to_dict(), None, cfg.max_steps, cfg.max_minutes):
        model = ImageAutoencoder(cfg)
        model.load_state_dict(torch.load(done, weights_only=True, map_location="cpu"))
        return model.eval()
    state = load_checkpoint(ckpt)
    model, state = train_autoencoder(x, cfg, seed=seed, state=state, checkpoint_fn=lambda s: save_torch(ckpt, s),
                                     device=training_device())
    save_json(ae_dir / "config.json", cfg.to_dict())
    if cfg.decoder_steps > 0:
        final.unlink(missing_ok=True)  # stage 2 of an earlier stage 1: it is run again on this one
    save_torch(stage1 if cfg.decoder_steps > 0 else final, model.state_dict())
    save_json(ae_dir / "train_log.json", {"steps": state["step"], "seconds": state["elapsed_s"],
                                          "max_steps": cfg.max_steps, "max_minutes": cfg.max_minutes})
    return model


def _stage_continues(stage_dir: Path, budget: dict, key: str | None, max_steps: int, max_minutes: float) -> bool:
    """Whether the finished stage in ``stage_dir`` trains further under these budgets
    (:meth:`StageProgress.continues_under`); ValueError naming its checkpoint when that is missing."""
    progress = read_stage_progress(stage_dir, budget, key)
    if not progress.continues_under(max_steps, max_minutes):
        return False
    ckpt = stage_dir / "checkpoint.pt"
    if not ckpt.is_file():
        raise ValueError(f"{ckpt}: missing, so {stage_dir.name}, stopped on its time budget at step "
                         f"{progress.steps} of {progress.max_steps}, cannot continue; keep its time budget "
                         f"({progress.max_minutes:g} min) or use another --out")
    return True


def _continues(stage_dir: Path, budget: dict, key: str | None, max_steps: int, max_minutes: float) -> bool:
    """:func:`_stage_continues`, logged when it does."""
    if not _stage_continues(stage_dir, budget, key, max_steps, max_minutes):
        return False
    progress = read_stage_progress(stage_dir, budget, key)
    logger.info("%s stopped on its time budget at step %d of %d (%.1f min): continuing from its checkpoint "
                "up to %d steps or %g min", stage_dir.name, progress.steps, progress.max_steps,
                progress.seconds / 60, max_steps, max_minutes)
    return True


def _run_decoder_stage(ae_dir: Path, ae: ImageAutoencoder, x: Tensor, latent_norm: LatentNorm,
                       seed: int) -> ImageAutoencoder:
    """Stage 2 (:func:`models.image_autoencoder.finetune_decoder`) on the stage-1 model, saved as
    ``model.pt``; returns ``ae`` as it is when ``model.pt`` exists (it is then the finished
    autoencoder ``_train_or_load_autoencoder`` loaded) or the config has no stage 2."""
    final = ae_dir / "model.pt"
    if final.is_file() or ae.config.decoder_steps == 0:
        return ae
    t0 = time.perf_counter()
    ae = finetune_decoder(ae, x, torch.tensor(latent_norm.std), seed=seed, device=training_device())
    log_path = ae_dir / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    save_json(log_path, {**log, "decoder_steps": ae.config.decoder_steps, "decoder_seconds": time.perf_counter() - t0})
    save_torch(final, ae.state_dict())
    return ae


def asdict_latent_data(d: LatentData) -> dict:
    return {"z": d.z.half(), "plate": d.plate, "compound": d.compound, "dose_um": d.dose_um,
            "plate_ids": d.plate_ids, "compounds": d.compounds, "fingerprint_bits": d.fingerprint_bits.bool()}


def latent_data_from_dict(d: dict) -> LatentData:
    return LatentData(z=d["z"].float(), plate=np.asarray(d["plate"]), compound=np.asarray(d["compound"]),
                      dose_um=np.asarray(d["dose_um"]), plate_ids=list(d["plate_ids"]), compounds=list(d["compounds"]),
                      fingerprint_bits=d["fingerprint_bits"].float())


def _control_bank(data: LatentData, images: np.ndarray, size: int, seed: int) -> dict[str, dict]:
    """plate -> {"z": latents (float16), "images": uint16 crops} of up to ``size`` DMSO cells."""
    rng = np.random.default_rng([seed, 4242])
    bank = {}
    for i, plate in enumerate(data.plate_ids):
        rows = data.controls_of_plate(i)
        if len(rows):
            rows = np.sort(rng.choice(rows, min(size, len(rows)), replace=False))
            bank[plate] = {"z": data.z[rows].half(), "images": np.ascontiguousarray(images[rows])}
    return bank


@dataclass
class PlateControls:
    """A plate's DMSO cells as the model sees them: standardised latents ``n x c x h x w`` and the
    uint16 crops ``n x H x W x C`` at the model size (None when only latents are known)."""

    z: Tensor
    images: np.ndarray | None = None
    _floors: dict[float, np.ndarray] = field(default_factory=dict, repr=False)

    def pixel_floor(self, percentile: float) -> np.ndarray | None:
        """uint16 ``C``: per-channel ``percentile`` of the crops' pixels (cached); None without crops."""
        if self.images is None:
            return None
        if percentile not in self._floors:
            flat = self.images.reshape(-1, self.images.shape[-1])
            self._floors[percentile] = np.percentile(flat, percentile, axis=0).astype(np.uint16)
        return self._floors[percentile]

    def __len__(self) -> int:
        return len(self.z)


def _run_members(kwargs: list[dict], executor: str, ray_address: str | None) -> None:
    if executor == "local":
        for kw in kwargs:
            train_member_task(**kw)
    elif executor == "ray":
        from models.ray_executor import run_tasks

        gpus = 1.0 / len(kwargs) if torch.cuda.is_available() else 0.0
        run_tasks(train_member_task, kwargs, address=ray_address, num_cpus_per_task=1, num_gpus_per_task=gpus)
    else:
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")


def training_device() -> str:
    """``cuda`` when a GPU is visible to this process (Ray sets CUDA_VISIBLE_DEVICES per task), else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def member_seed(base_seed: int, member_index: int) -> int:
    return int(base_seed) * 1000 + int(member_index)


def train_member_task(model_dir: str, member_index: int, meta: dict | None = None) -> dict:
    """Train (or resume) member ``member_index`` of the assay in ``model_dir`` (one Ray task).

    ``meta`` is the model's ``assay.json`` record (default: read from ``model_dir``);
    :func:`train_image_assay` passes the one it writes once every member is trained. A trained
    member is skipped unless it stopped on its time budget and ``meta``'s is larger (it continues)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(model_dir)
    meta = json.loads((out / ASSAY_FILE).read_text()) if meta is None else meta
    config = ImageAssayConfig.from_dict(meta["config"])
    seed = member_seed(config.seed, member_index)
    mdir = out / f"member_{member_index:03d}"
    mdir.mkdir(exist_ok=True)
    if (mdir / "model.pt").is_file() and not _continues(mdir, config.flow.to_dict(), "flow", config.flow.max_steps,
                                                          config.flow.max_minutes):
        logger.info("member %d already trained", member_index)
        return {"member": member_index, "skipped": True}
    data = latent_data_from_dict(torch.load(out / LATENTS_FILE, weights_only=False))
    identity = member_identity(config, seed, meta["data_fingerprint"])
    if (mdir / "config.json").is_file() and (mdir / "checkpoint.pt").is_file():
        stored = json.loads((mdir / "config.json").read_text())
        stored = {**stored, "flow": FlowConfig.from_dict(stored["flow"]).to_dict()}  # options added since: defaults
        if member_identity_key(stored) != member_identity_key(identity):
            raise ValueError(f"{mdir / 'checkpoint.pt'}: checkpoint of a different member (seed, data or flow config); "
                             "remove it or use another model folder")
    save_json(mdir / "config.json", identity)
    save_json(mdir / "data_fingerprint.json", {"sha256": meta["data_fingerprint"], "n_train_cells": meta["n_train_cells"],
                                               "train_plates": meta["train_plates"]})
    (mdir / NORM_FILE).write_text((out / NORM_FILE).read_text())
    ckpt = mdir / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    model, final = train_flow(data, config.flow, seed=seed, state=state, checkpoint_fn=lambda s: save_torch(ckpt, s),
                              device=training_device())
    save_torch(mdir / "model.pt", model.state_dict())
    save_json(mdir / "train_log.json", {"steps": final["step"], "seconds": final["elapsed_s"],
                                        "max_steps": config.flow.max_steps, "max_minutes": config.flow.max_minutes})
    return {"member": member_index, "steps": final["step"], "seconds": final["elapsed_s"]}


BUDGET_FIELDS = ("max_steps", "max_minutes", "checkpoint_every")
SAMPLING_FIELDS = ("n_steps", "sampler", "guidance_scale", "guidance_reference", "guidance_gated")


def member_identity(config: ImageAssayConfig, seed: int, fingerprint: str) -> dict:
    """What a member checkpoint belongs to (saved as the member's config.json)."""
    return {"seed": seed, "data_fingerprint": fingerprint, "flow": config.flow.to_dict(),
            "autoencoder": config.autoencoder.to_dict(), "image_size": config.image_size}


def member_identity_key(identity: dict) -> str:
    """The identity without training-budget and sampling fields: a larger budget, or other
    sampling options, resume the same member."""
    flow = {k: v for k, v in identity["flow"].items() if k not in BUDGET_FIELDS + SAMPLING_FIELDS}
    ae = {k: v for k, v in identity.get("autoencoder", {}).items() if k not in BUDGET_FIELDS}
    return json.dumps({**identity, "flow": flow, "autoencoder": ae}, sort_keys=True)


# ----------------------------------------------------------------------------- the trained assay
def derive_seed(*parts) -> int:
    return int(np.random.SeedSequence([abs(hash_int(p)) for p in parts]).generate_state(1)[0])


def hash_int(x) -> int:
    return int.from_bytes(hashlib.sha256(repr(x).encode()).digest()[:4], "little")


def channels_declared(meta: dict, source: str | Path = "model") -> bool:
    """Whether a model's channel names (``assay.json`` ``meta``) were declared by its training crops:
    its ``channels_named``; a model saved before it was recorded (session 34) whose names are defaults
    or guesses (:func:`lab_io.crops.could_be_default_names`, e.g. ``DNA, Tubulin, Actin``) is taken to
    have positional channels (logged), any other model's names as declared."""
    if "channels_named" in meta:
        return bool(meta["channels_named"])
    if could_be_default_names(meta["channel_names"]):
        logger.info("%s: saved without a record of whether its channel names %s were declared; they are "
                    "defaults, so its channels are taken by position", source, list(meta["channel_names"]))
        return False
    return True


def channel_record(assay: "ImageAssay", crops: CropSet | None = None) -> dict:
    """The stains of a model's output channels, for files that record them: ``{"channel_names": [...],
    "channel_names_declared": bool}``. A model with declared names outputs those stains; one whose
    names are positional defaults outputs the stains of the crops it was given in their positions
    (``crops`` as :func:`lab_io.crops.reorder_channels` returned them, declared or not), or, without
    crops, its own names, recorded as not declared."""
    if assay.channel_names.declared:
        return {"channel_names": list(assay.channel_names), "channel_names_declared": True}
    if crops is None:
        return {"channel_names": list(assay.channel_names), "channel_names_declared": False}
    return {"channel_names": list(crops.channel_names), "channel_names_declared": bool(crops.channels_named)}


class ImageAssay:
    """A trained image assay (K members sharing one autoencoder). Implements ``VirtualAssay``."""

    def __init__(self, model_dir: Path, meta: dict, config: ImageAssayConfig, norm: ChannelNorm,
                 latent_norm: LatentNorm, autoencoder: ImageAutoencoder, members: list[ImageDiT],
                 control_bank: dict[str, PlateControls]) -> None:
        self.model_dir = model_dir
        self.meta = meta
        self.config = config
        self.norm = norm
        self.latent_norm = latent_norm
        self.autoencoder = autoencoder
        self.members = members
        self.control_bank = control_bank
        self.channel_names: ChannelNames = ChannelNames(meta["channel_names"], channels_declared(meta, model_dir))
        self.n_members = len(members)
        self.feature_names: list[str] = cell_feature_names(self.channel_names)
        self.version: str = meta["version"]
        self.member_indices: list[int] = list(range(len(members)))  # which trained members (``load(members=)``)

    @classmethod
    def load(cls, model_dir: str | Path, *, members: Sequence[int] | None = None) -> "ImageAssay":
        d = Path(model_dir)
        if not (d / ASSAY_FILE).is_file():
            _refuse_missing_record(d)
        meta, config = _read_model_file(d / ASSAY_FILE, _read_assay_meta)
        nd = _read_model_file(d / NORM_FILE, lambda p: json.loads(p.read_text()))
        ae = ImageAutoencoder(config.autoencoder)
        _read_model_file(d / "autoencoder" / "model.pt",
                         lambda p: ae.load_state_dict(torch.load(p, weights_only=True, map_location="cpu")))
        idx = list(range(config.n_members)) if members is None else list(members)
        nets = []
        for k in idx:
            path = d / f"member_{k:03d}" / "model.pt"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: member {k} is not trained (rerun `loop assay train` to resume)")
            net = ImageDiT(config.flow.dit)
            _read_model_file(path, lambda p: net.load_state_dict(torch.load(p, weights_only=True, map_location="cpu")))
            nets.append(net.eval())
        stored = _read_model_file(d / BANK_FILE, lambda p: torch.load(p, weights_only=False))
        bank = {p: PlateControls(v["z"].float(), v["images"]) if isinstance(v, dict) else PlateControls(v.float())
                for p, v in stored.items()}
        assay = cls(d, meta, config, ChannelNorm.from_dict(nd["intensity"]), LatentNorm(**nd["latent"]),
                    ae.eval(), nets, bank)
        assay.member_indices = idx
        return assay

    def out_of_bag(self, compound_ids: Sequence[str]) -> np.ndarray:
        """``bool K x n``: True where member ``k`` did not train on compound ``i`` (its bootstrap of
        the training compounds left it out, or it is not one of them, e.g. a campaign's compounds
        for an assay trained on another image set)."""
        compounds = {str(c): i for i, c in enumerate(self.meta["compounds"])}
        rows = []
        for k in self.member_indices:
            drawn = bootstrap_compound_weights(len(compounds), member_seed(self.config.seed, k),
                                               self.config.flow.bootstrap) > 0
            rows.append([str(c) not in compounds or not drawn[compounds[str(c)]] for c in compound_ids])
        return np.asarray(rows, dtype=bool).reshape(len(self.member_indices), len(compound_ids))

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    def to(self, device: torch.device | str) -> "ImageAssay":
        """Move the autoencoder and members to ``device`` (e.g. ``cuda``) for sampling; inputs and
        outputs of every method stay on the CPU."""
        self.autoencoder.to(device)
        for net in self.members:
            net.to(device)
        return self

    # -- images <-> latents
    def encode_crops(self, images: np.ndarray, source: str = "crops") -> Tensor:
        """uint16 ``N x H x W x C`` (centre-cropped to the model size) -> standardised latents."""
        x = self.norm.normalize(centre_crop(images, self.config.image_size, source))
        return self.latent_norm.apply(encode_all(self.autoencoder, x))

    def decode_latents(self, z: Tensor) -> np.ndarray:
        """Standardised latents ``N x c x h x w`` -> uint16 crops ``N x H x W x C``."""
        return self.norm.denormalize(decode_all(self.autoencoder, self.latent_norm.invert(z)))

    def encode_controls(self, images: np.ndarray, source: str = "crops") -> PlateControls:
        """A plate's DMSO crops (uint16 ``n x H x W x C``, any size >= the model's) -> :class:`PlateControls`."""
        if len(images) == 0:
            raise ValueError(f"{source}: no control cells to condition on")
        return PlateControls(self.encode_crops(images, source), centre_crop(images, self.config.image_size, source))

    def plate_controls(self, plate_id: str | None, *, strict: bool = True) -> PlateControls | None:
        """Stored control cells of a training plate.

        ``None`` (or, with ``strict=False``, a plate without stored controls) means "unknown plate":
        the null-plate token in noise mode, the pooled controls of all training plates in control
        mode (which needs source cells). With ``strict=True`` an unknown plate id raises KeyError.
        """
        if plate_id is not None and plate_id in self.control_bank:
            return self.control_bank[plate_id]
        if plate_id is not None and strict:
            raise KeyError(f"plate {plate_id!r} has no stored controls (training plates: {sorted(self.control_bank)}); "
                           "pass that plate's DMSO crops instead")
        if plate_id is not None:
            logger.warning("plate %s unseen in training and no controls given: using the unknown-plate condition", plate_id)
        if self.config.flow.mode == "noise":
            return None
        parts = list(self.control_bank.values())
        images = None if any(p.images is None for p in parts) else np.concatenate([p.images for p in parts])
        return PlateControls(torch.cat([p.z for p in parts]), images)

    # -- generation
    def generate_latents(self, member: int, fingerprint_packed: np.ndarray | None, dose_um: float,
                         controls: PlateControls | None, n: int, seed: int, *, unconditional: bool = False,
                         n_steps: int | None = None, sampler: str | None = None,
                         guidance_scale: float | None = None,
                         source_idx: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Latents ``z_1: n x c x h x w`` of member ``member`` for one condition (reproducible from
        ``seed``) and, in control mode, the indices of the source control cells (else None).

        ``source_idx: n`` (control mode only) names the source control cells instead of drawing
        them from ``seed`` (:meth:`generate_ensemble` splits one draw across the members)."""
        cfg = self.config.flow
        n_steps = cfg.n_steps if n_steps is None else n_steps
        if n_steps < 1:
            raise ValueError(f"n_steps (sampler steps) must be >= 1, got {n_steps}")
        z_ctrl = controls.z if controls is not None else None
        if cfg.mode == "control" and (z_ctrl is None or len(z_ctrl) == 0):
            raise ValueError("a control-mode assay needs the plate's control cells (plate_id or controls)")
        if source_idx is not None and (cfg.mode != "control" or len(source_idx) != n or (
                n > 0 and (int(source_idx.min()) < 0 or int(source_idx.max()) >= len(z_ctrl)))):
            raise ValueError(f"source_idx must hold {n} indices into the {0 if z_ctrl is None else len(z_ctrl)} "
                             f"control cells of a control-mode assay (mode {cfg.mode!r})")
        bits = None
        if fingerprint_packed is not None:
            bits = torch.from_numpy(unpack_fingerprints(np.asarray(fingerprint_packed, np.uint8).reshape(1, -1))[0])
        cond = sampling_condition(bits, dose_um, z_ctrl, n, cfg.dit.latent_channels, unconditional=unconditional)
        gen = torch.Generator().manual_seed(int(seed))
        shape = (cfg.dit.latent_channels, cfg.dit.latent_size, cfg.dit.latent_size)
        sigma = cfg.source_sigma(treated=bits is not None or unconditional)  # the null token: compound rows' noise
        if cfg.mode == "noise":
            idx, x_0 = None, torch.randn((n, *shape), generator=gen)
        else:  # as control_source draws: the indices first, then the noise
            idx = source_indices(n, len(z_ctrl), gen) if source_idx is None else source_idx.long()
            x_0 = add_source_noise(z_ctrl[idx], sigma, gen)
        z_1 = sample_latents(self.members[member], cond.to(self.device), x_0.to(self.device),
                             n_steps=n_steps, sampler=sampler or cfg.sampler,
                             guidance_scale=cfg.guidance_scale if guidance_scale is None else guidance_scale,
                             guidance_reference=cfg.guidance_reference, guidance_gated=cfg.guidance_gated)
        return z_1.cpu(), idx

    @torch.no_grad()
    def generate(self, member: int, fingerprint_packed: np.ndarray | None, dose_um: float,
                 controls: PlateControls | None, n: int, seed: int, **kwargs) -> np.ndarray:
        """uint16 crops ``n x H x W x C`` (see :meth:`generate_latents`; detail transfer in control mode)."""
        z_1, idx = self.generate_latents(member, fingerprint_packed, dose_um, controls, n, seed, **kwargs)
        return self.decode_generated(z_1, idx, controls)

    @torch.no_grad()
    def decode_generated(self, z_1: Tensor, idx: Tensor | None, controls: PlateControls | None) -> np.ndarray:
        """Standardised latents ``z_1: n x c x h x w`` -> uint16 crops ``n x H x W x C`` with the
        model's decoding: in control mode the residual of source control ``controls[idx[i]]`` is
        added to cell ``i`` (detail transfer, scaled by the shot-noise gain), then the plate's
        pixel floor (config options decide which steps run)."""
        x_1 = decode_all(self.autoencoder, self.latent_norm.invert(z_1))  # n x C x H x W
        if idx is not None and self.config.detail_transfer and controls.images is not None:
            x_src = self.norm.normalize(controls.images[idx.numpy()])
            x_src_hat = decode_all(self.autoencoder, self.latent_norm.invert(controls.z[idx]))
            gain = shot_noise_gain(x_1, x_src_hat, self.norm) if self.config.detail_shot_noise else 1.0
            x_1 = x_1 + gain * (x_src - x_src_hat)
        crops = self.norm.denormalize(x_1)  # n x H x W x C
        q = self.config.pixel_floor_percentile
        floor = None if controls is None or q is None else controls.pixel_floor(q)
        return crops if floor is None else np.maximum(crops, floor)

    @torch.no_grad()
    def reconstruct(self, images: np.ndarray, controls: PlateControls | None, seed: int,
                    source: str = "crops") -> np.ndarray:
        """Real crops (uint16 ``n x H x W x C``) encoded and decoded as generated cells are
        (:meth:`decode_generated`; in control mode each cell takes a random control of
        ``controls`` as its detail source, reproducible from ``seed``). Scored against other
        real cells this is the autoencoder ceiling: what a flow that put every latent exactly
        where a real cell's is would score."""
        z = self.encode_crops(images, source)
        idx = None
        if self.config.flow.mode == "control":
            if controls is None or len(controls.z) == 0:
                raise ValueError(f"{source}: a control-mode assay needs the plate's control cells to decode")
            idx = control_source(len(z), controls.z, torch.Generator().manual_seed(int(seed)))[1]
        return self.decode_generated(z, idx, controls)

    def member_counts(self, n: int) -> list[int]:
        """How :meth:`generate_ensemble` splits ``n`` cells: member k gets ``n // K`` or one more."""
        return [n // self.n_members + (k < n % self.n_members) for k in range(self.n_members)]

    def member_of_cells(self, n: int) -> np.ndarray:
        """int ``n``: the member that generated each of :meth:`generate_ensemble`'s ``n`` cells."""
        return np.repeat(np.arange(self.n_members), self.member_counts(n))

    def generate_ensemble(self, fingerprint_packed: np.ndarray | None, dose_um: float, controls: PlateControls | None,
                          n: int, seed: int, **kwargs) -> np.ndarray:
        """``n`` cells split across the K members (member k gets ``n // K`` or one more).

        In control mode the ``n`` source control cells are drawn once (as one member would draw
        them) and split across the members, so the pooled cells start from as many distinct
        control cells as a single member's; independent draws per member would repeat sources
        and make the pooled set less varied than the plate's controls allow."""
        counts = self.member_counts(n)
        sources: list[Tensor | None] = [None] * self.n_members
        # one member keeps its own draw, as before; without control cells generate_latents raises
        if self.config.flow.mode == "control" and self.n_members > 1 and controls is not None and len(controls.z):
            drawn = source_indices(n, len(controls.z), torch.Generator().manual_seed(int(derive_seed(seed, 0))))
            sources = list(torch.split(drawn, counts))
        parts = [self.generate(k, fingerprint_packed, dose_um, controls, c, derive_seed(seed, k),
                               source_idx=sources[k], **kwargs)
                 for k, c in enumerate(counts) if c > 0]
        return np.concatenate(parts)

    # -- VirtualAssay protocol
    def predict_cells(self, fingerprint: np.ndarray | None, dose_um: float, *, n_cells: int = 32, seed: int = 0,
                      plate_id: str | None = None) -> np.ndarray:
        """Generated crops in raw intensity units, float32 ``K x n_cells x H x W x C``."""
        z_ctrl = self.plate_controls(plate_id, strict=False)
        if fingerprint is not None:
            fingerprint = check_fingerprints(np.asarray(fingerprint).reshape(1, -1))[0]
        return np.stack([self.generate(k, fingerprint, dose_um, z_ctrl, n_cells, derive_seed(seed, k, "cells"))
                         for k in range(self.n_members)]).astype(np.float32)

    def featurize(self, crops: np.ndarray) -> np.ndarray:
        feats, _ = featurize_crops(crops, self.channel_names, dna_channel=self.config.dna_channel)
        return feats

    def predict_profiles(self, fingerprints: np.ndarray, dose_um: np.ndarray, *, n_cells: int = 32, seed: int = 0,
                         plate_id: str | None = None, batch_size: int = 256) -> np.ndarray:
        """Per-member profiles ``float32 K x N x F`` (F = morphology features), normalised to each member's
        generated DMSO cells on the same plate. Every compound of a member starts from the same source
        draws (common random numbers, as the feature assay does): differences between compounds reflect
        the model, and a compound's profile does not depend on the other rows or on ``batch_size``."""
        fps = check_fingerprints(fingerprints)
        doses = check_doses(dose_um, len(fps))
        if n_cells < 2 or batch_size < 1:
            raise ValueError(f"n_cells must be >= 2 and batch_size >= 1, got {n_cells}, {batch_size}")
        z_ctrl = self.plate_controls(plate_id, strict=False)
        out = np.zeros((self.n_members, len(fps), len(self.feature_names)), np.float32)
        for k in range(self.n_members):
            ctrl = torch.from_numpy(self.featurize(self.generate(k, None, 1.0, z_ctrl, n_cells, derive_seed(seed, k, "dmso"))))
            mean, std = ctrl.double().mean(0), ctrl.double().std(0, unbiased=False)
            for i in range(len(fps)):
                cells = self.featurize(self.generate(k, fps[i], float(doses[i]), z_ctrl, n_cells, derive_seed(seed, k, "cells")))
                prof = profiles_from_cells(torch.from_numpy(cells).double()[None], mean, std)
                out[k, i] = prof[0].float().numpy()
        return out

    def nearest_training_compound(self, fingerprint_packed: np.ndarray) -> tuple[str | None, float]:
        """The training compound most similar to a packed fingerprint, and their Tanimoto similarity
        (``(None, 0.0)`` for a model that trained on controls only). Below ``ANALOGUE_TANIMOTO`` the
        model has no structural basis for a compound-specific response: it predicts the response
        it learned for its training compounds at that dose (docs/STATUS_LOG.md, session 18)."""
        names = self.meta["compounds"]
        if not names:
            return None, 0.0
        query = check_fingerprints(np.asarray(fingerprint_packed, dtype=np.uint8).reshape(1, -1))
        similarity = tanimoto_matrix(query, self.training_fingerprints())[0]
        best = int(similarity.argmax())
        return names[best], float(similarity[best])

    def training_fingerprints(self) -> np.ndarray:
        """Packed fingerprints ``uint8 n x 256`` of the training compounds, in ``meta["compounds"]`` order."""
        return np.stack([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in self.meta["fingerprints_packed_hex"]])

    def training_fingerprint(self, compound: str) -> np.ndarray | None:
        """Packed fingerprint of a training compound name (case-insensitive); None if unknown."""
        for i, name in enumerate(self.meta["compounds"]):
            if name.lower() == compound.strip().lower():
                return self.training_fingerprints()[i].copy()
        return None


ANALOGUE_TANIMOTO = 0.4  # Morgan r2 similarity under which a compound is no analogue of any training compound
MAX_SHOT_NOISE_GAIN = 3.0  # a residual is amplified at most 3x (a pixel 9x brighter than its source's)


def _refuse_missing_record(d: Path) -> None:
    """FileNotFoundError for a model folder without ``assay.json``, saying why it may have none."""
    if (d / DATA_FILE).is_file():
        raise FileNotFoundError(f"{d}: its training is unfinished ({DATA_FILE} but no {ASSAY_FILE}: stopped, or "
                                "still running); rerun the same `loop assay train` command to resume it")
    what = "no such folder" if not d.is_dir() else f"not an image assay folder (no {ASSAY_FILE})"
    raise FileNotFoundError(f"{d}: {what}; train one with `loop assay train`")


def _read_assay_meta(path: Path) -> tuple[dict, ImageAssayConfig]:
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or "version" not in meta:
        raise KeyError("no model version")
    return meta, ImageAssayConfig.from_dict(meta["config"])


def _read_model_file(path: Path, read):
    """``read(path)``, with a missing or damaged file of a model folder reported by its path."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the image assay folder (copied or trained only in part?)")
    try:
        return read(path)
    except (ValueError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: cannot read this image assay file ({type(err).__name__}: {err}); the folder "
                         "is damaged: copy it again or retrain") from None


def shot_noise_gain(x_1: Tensor, x_0_hat: Tensor, norm: ChannelNorm) -> Tensor:
    """``sqrt(D(z_1) / D(z_0))`` per pixel and channel, ``n x C x H x W``, from two decoded sets in
    normalised units, compared in raw intensities (+1, so a dark pixel cannot divide by 0) and
    clipped to ``[0, MAX_SHOT_NOISE_GAIN]``: a brighter generated pixel carries a proportionally
    larger share of its source's photon noise and texture, a dimmer one a smaller share."""
    raw_1, raw_0 = norm.to_raw(x_1).clamp_min(0.0), norm.to_raw(x_0_hat).clamp_min(0.0)
    return ((raw_1 + 1.0) / (raw_0 + 1.0)).sqrt().clamp(0.0, MAX_SHOT_NOISE_GAIN)


def applicability(assay: ImageAssay, compound: str, fingerprint_packed: np.ndarray | None) -> dict:
    """How close a compound is to what the model trained on: ``nearest_training_compound``,
    ``nearest_training_tanimoto`` and ``analogue`` (similarity at least ``ANALOGUE_TANIMOTO``).
    Logs a warning naming the compound when it is no analogue. DMSO (no fingerprint): ``{}``."""
    if fingerprint_packed is None:
        return {}
    nearest, similarity = assay.nearest_training_compound(fingerprint_packed)
    analogue = similarity >= ANALOGUE_TANIMOTO
    if not analogue:
        logger.warning("%s is no analogue of any training compound (nearest %s, Tanimoto %.2f < %.2f): the model "
                       "predicts the response it learned for its training compounds at this dose, not one of its own",
                       compound, nearest, similarity, ANALOGUE_TANIMOTO)
    return {"nearest_training_compound": nearest, "nearest_training_tanimoto": round(similarity, 4),
            "analogue": bool(analogue)}


def dose_support(assay: ImageAssay, compound: str, dose_um: float) -> dict:
    """Whether a dose lies within the treated doses the model trained on: ``dose_range_um``
    (lowest, highest; None for a model saved without it) and ``dose_in_training_range``. Logs a
    warning naming the compound outside the range: below it the dose gate only moves cells
    towards the controls, above it the model extrapolates a response it never saw."""
    dose_range = assay.config.flow.dit.dose_range_um
    if dose_range is None:
        return {"dose_range_um": None, "dose_in_training_range": None}
    lo, hi = dose_range
    inside = bool(lo * (1 - 1e-6) <= dose_um <= hi * (1 + 1e-6))
    if not inside:
        logger.warning("%s at %g uM is outside the treated doses the model trained on (%g to %g uM): the "
                       "model extrapolates there", compound, dose_um, lo, hi)
    return {"dose_range_um": [float(lo), float(hi)], "dose_in_training_range": inside}


def resolve_compound(assay: ImageAssay, name_or_smiles: str) -> np.ndarray | None:
    """A compound name known to the model, ``DMSO`` (-> None) or a SMILES -> packed fingerprint."""
    return resolve_compound_source(assay, name_or_smiles)[0]


def resolve_compound_source(assay: ImageAssay, name_or_smiles: str) -> tuple[np.ndarray | None, str]:
    """(packed fingerprint, how it was found) for a compound given as the user types it.

    In order: ``DMSO`` (-> None, ``"control"``); a training compound's name, case-insensitive
    (its training fingerprint, ``"training compound NAME"``); a name in the BBBC021 name table
    or the embedded fallback, as :func:`compound_fingerprints` looks names up for ``evaluate``
    (``"name table SMILES ..."``); else the text parsed as SMILES (``"SMILES ..."``)."""
    text = name_or_smiles.strip()
    if is_control_compound([text])[0]:
        return None, "control"
    fp = assay.training_fingerprint(text)
    if fp is not None:
        return fp, f"training compound {text}"
    known = smiles_for_name(text)
    if known:
        return morgan_fingerprints([known])[0], f"name table SMILES {known}"
    try:
        return morgan_fingerprints([text])[0], f"SMILES {text}"
    except ValueError as err:
        raise ValueError(f"{text!r} is neither a compound the model knows ({assay.meta['compounds']}), nor a "
                         "name in the BBBC021 name table, nor a valid SMILES") from err


def compound_fingerprints(assay: ImageAssay, metadata, source: str
                          ) -> tuple[dict[str, np.ndarray | None], dict[str, str]]:
    """Packed fingerprint of every compound named in a crops table (None for DMSO), and the
    SMILES of those whose SMILES RDKit cannot parse.

    A name the model trained on keeps its training fingerprint; any other compound is looked up
    by SMILES (the table's ``smiles`` column, else the BBBC021 name table). Compounds with
    neither, or with an unparseable SMILES, are left out of the fingerprints, and the caller
    decides (``evaluate_assay`` skips their conditions, saying which of the two it was)."""
    smiles = compound_smiles(metadata, source, strict=False)
    out: dict[str, np.ndarray | None] = {}
    unparseable: dict[str, str] = {}
    for name in metadata["compound"].astype(str).unique():
        if is_control_compound([name])[0]:
            out[name] = None
        elif (fp := assay.training_fingerprint(name)) is not None:
            out[name] = fp
        elif smiles.get(name):
            try:
                out[name] = morgan_fingerprints([smiles[name]])[0]
            except ValueError:
                logger.warning("%s: compound %r has an unparseable SMILES %r", source, name, smiles[name])
                unparseable[name] = smiles[name]
    return out, unparseable
