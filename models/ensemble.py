"""The feature virtual assay: an ensemble of K flow-matching members (``VirtualAssay``).

``train_ensemble`` trains member k with seed ``config.base_seed + k`` on a bootstrap
resample of the compounds (``config.bootstrap``), in-process or one Ray task per member,
then writes the manifest ``ensemble.json``::

    MODEL_DIR/
      ensemble.json               format, version, config, data fingerprint, feature names,
                                  plate ids, member dirs/seeds, training time
      members/member_00/ ...      see models.feature_assay
      members/member_01/ ...

``version`` = short sha256 of (config, data fingerprint): same data and options -> same id.
``load_ensemble(model_dir)`` reads it back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from models.config import FeatureAssayConfig, config_hash
from models.feature_assay import FeatureAssayMember, train_member
from models.ray_executor import check_executor
from models.training_data import FeatureTrainingSet
from models.virtual_assay import check_doses, check_fingerprints

log = logging.getLogger(__name__)

MANIFEST_FILE = "ensemble.json"
MANIFEST_FORMAT_VERSION = 1

__all__ = ["FeatureAssayEnsemble", "load_ensemble", "train_ensemble"]


@dataclass
class FeatureAssayEnsemble:
    """K trained feature-assay members; implements ``models.virtual_assay.VirtualAssay``."""

    members: list[FeatureAssayMember]
    version: str
    config: FeatureAssayConfig
    model_dir: Path
    feature_names: list[str] = field(default_factory=list)
    n_members: int = 0

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError(f"{self.model_dir}: an ensemble needs at least one member")
        names = list(self.members[0].feature_names)
        for m in self.members[1:]:
            if list(m.feature_names) != names:
                raise ValueError(f"{m.member_dir}: feature names differ from {self.members[0].member_dir}")
        self.feature_names = names
        self.n_members = len(self.members)

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
        """``float32 K x N x F`` member profiles normalised to each member's predicted controls.

        See ``models.virtual_assay.VirtualAssay.predict_profiles``. Each member samples
        ``n_cells`` cells per compound from the same noise draw for every compound and its
        control (common random numbers, seeded by (seed, member seed)); the profile is the
        cell mean minus the control mean over the same noise, divided by the std of
        ``max(n_cells, config.n_control_cells)`` control cells.
        """
        fingerprints = check_fingerprints(fingerprints)
        dose_um = check_doses(dose_um, len(fingerprints))
        with torch.inference_mode():
            return np.stack([
                m.predict_profiles(fingerprints, dose_um, n_cells=n_cells, seed=seed,
                                   plate_id=plate_id, batch_size=batch_size)
                for m in self.members
            ])

    def predict_cells(
        self,
        fingerprint: np.ndarray | None,
        dose_um: float,
        *,
        n_cells: int = 32,
        seed: int = 0,
        plate_id: str | None = None,
    ) -> np.ndarray:
        """``float32 K x n_cells x F`` sampled cells in raw feature units (``fingerprint=None``: DMSO)."""
        with torch.inference_mode():
            return np.stack([
                m.predict_cells(fingerprint, dose_um, n_cells=n_cells, seed=seed, plate_id=plate_id)
                for m in self.members
            ])

    def out_of_bag(self, compound_ids: Sequence[str]) -> np.ndarray:
        """``bool K x n``: True where member ``k`` did not train on compound ``i`` (its bootstrap
        left it out, or it was never in the training data): that member's prediction of it is
        out of sample (``acquisition.anchor`` fits its trust in the ensemble on those)."""
        return ~np.stack([m.in_bag(compound_ids) for m in self.members])


def train_ensemble(
    train_set: FeatureTrainingSet,
    config: FeatureAssayConfig,
    out_dir: Path,
    *,
    executor: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
    resume: bool = True,
) -> FeatureAssayEnsemble:
    """Train ``config.n_members`` members into ``out_dir`` and write ``ensemble.json``.

    ``executor='ray'`` runs one Ray task per member (a GPU fraction each when CUDA is
    available); ``'local'`` trains them one after another in this process. Finished
    members are reused when ``resume`` (see ``train_member``).
    """
    check_executor(executor)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    version = config_hash(config, train_set.data_fingerprint)
    jobs = [
        {"train_set": train_set, "config": config, "seed": config.base_seed + k,
         "out_dir": str(out_dir / "members" / f"member_{k:02d}"), "bootstrap": config.bootstrap,
         "resume": resume}
        for k in range(config.n_members)
    ]
    t0 = time.perf_counter()
    if executor == "ray":
        from models import ray_executor

        use_gpu = torch.cuda.is_available()
        gpu_fraction = min(1.0, 1.0 / config.n_members) if use_gpu else 0.0
        for job in jobs:
            job["device"] = "cuda" if use_gpu else "cpu"
        ray_executor.run_tasks(_train_member_task, jobs, address=ray_address,
                               num_cpus_per_task=1, num_gpus_per_task=gpu_fraction)
    else:
        for job in jobs:
            _train_member_task(**job)
    seconds = time.perf_counter() - t0
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "kind": "feature_assay",
        "version": version,
        "config": config.to_dict(),
        "data_fingerprint": train_set.data_fingerprint,
        "feature_names": list(train_set.feature_names),
        "plate_ids": list(train_set.plate_ids),
        "members": [{"dir": os.path.relpath(j["out_dir"], out_dir), "seed": j["seed"], "bootstrap": j["bootstrap"]}
                    for j in jobs],
        "executor": executor,
        "train_seconds": round(seconds, 3),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = out_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / MANIFEST_FILE)
    log.info("ensemble %s: %d members trained in %.1f s (%s) -> %s",
             version, config.n_members, seconds, executor, out_dir)
    return load_ensemble(out_dir)


def load_ensemble(model_dir: Path, *, device: torch.device | str = "cpu") -> FeatureAssayEnsemble:
    """Load an ensemble written by ``train_ensemble``."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {MANIFEST_FILE} (not a trained ensemble)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != MANIFEST_FORMAT_VERSION or manifest.get("kind") != "feature_assay":
        raise ValueError(f"{path}: not a feature-assay manifest of format {MANIFEST_FORMAT_VERSION}")
    config = FeatureAssayConfig.from_dict(manifest["config"])
    members = [FeatureAssayMember.load(model_dir / m["dir"], device=device) for m in manifest["members"]]
    for m in members:
        if m.data_fingerprint != manifest["data_fingerprint"]:
            raise ValueError(f"{m.member_dir}: trained on different data than {path} records")
    return FeatureAssayEnsemble(members, manifest["version"], config, model_dir)


def _train_member_task(**kwargs) -> str:
    """One member (module level so Ray can import it)."""
    return str(train_member(**kwargs))
