"""Prediction cache: each (model version, InChIKey, dose) is simulated by the virtual assay once.

``predict_with_cache`` asks the cache first and simulates only the missing compounds (in
chunks, locally or sharded over Ray workers through ``models.ray_executor.iter_tasks``),
storing per-member phenotypic activity ``||profile||_2 / sqrt(F)`` (``K x n``) and,
optionally, the first ``profile_dims`` profile features (``K x n x d``; ``None`` = all ``F``).

Layout (one folder per model version and simulation settings, append-only shards)::

    ROOT/<model_version>/<settings tag>/
      settings.json                 n_cells, seed, plate_id, profile_dims, n_members, feature names
      shard-<utc>-<uuid>.parquet    columns inchikey, dose_um, activity_m00.., profile_m00_000..

Settings (``n_cells``, ``seed``, ``plate_id``, ``profile_dims``) are part of the key: the
assays use common random numbers (one noise draw per seed shared by every compound), so
values cached under one seed are exactly what a direct ``predict_profiles`` call with that
seed returns, and compounds stay comparable. Shards are written to a temporary file and
renamed (atomic; a temporary file left by a killed writer is removed once it is an hour old);
a shard that cannot be read or fails validation raises
``PredictionCacheError`` naming the file. Concurrent writers never overwrite each other
(unique shard names); duplicate keys are resolved to the first shard read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from acquisition.objectives import phenotypic_activity
from lab_io.tempfiles import naming_path
from models.ray_executor import iter_tasks
from models.virtual_assay import VirtualAssay, check_doses, check_fingerprints

log = logging.getLogger(__name__)

__all__ = [
    "CacheLookup",
    "CachedPredictions",
    "PredictionCache",
    "PredictionCacheError",
    "SimulationSettings",
    "predict_with_cache",
    "simulate_predictions",
]

SETTINGS_FILE = "settings.json"
SHARD_GLOB = "shard-*.parquet"
STALE_TEMPORARY_S = 3600.0  # a temporary shard file this old was left by a killed writer
CACHE_FORMAT_VERSION = 1
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PredictionCacheError(RuntimeError):
    """A cache file is unreadable or inconsistent (the message names the file)."""


@dataclass(frozen=True)
class SimulationSettings:
    """How the virtual assay is asked (part of the cache key, saved as ``settings.json``).

    Attributes:
        n_cells: cells sampled per compound and member (``predict_profiles(n_cells=...)``).
        seed: sampling seed (common random numbers across compounds).
        plate_id: plate to condition on (None: the 'unknown plate' token).
        profile_dims: leading profile features stored per member (0: activity only; None: all F).
    """

    n_cells: int = 32
    seed: int = 0
    plate_id: str | None = None
    profile_dims: int | None = 0

    def __post_init__(self) -> None:
        if isinstance(self.n_cells, bool) or int(self.n_cells) != self.n_cells or self.n_cells < 2:
            raise ValueError(f"n_cells must be an integer >= 2, got {self.n_cells!r}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed:
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.profile_dims is not None and (isinstance(self.profile_dims, bool) or int(self.profile_dims)
                                              != self.profile_dims or self.profile_dims < 0):
            raise ValueError(f"profile_dims must be an integer >= 0 or None, got {self.profile_dims!r}")
        if isinstance(self.plate_id, (int, np.integer)) and not isinstance(self.plate_id, bool):
            object.__setattr__(self, "plate_id", str(self.plate_id))  # a barcode written as a number
        if self.plate_id is not None and (not isinstance(self.plate_id, str) or not self.plate_id):
            raise ValueError(f"plate_id must be a plate id (text) or None, got {self.plate_id!r}")
        # Plain ints in the key: numpy integers and 5.0 must hash (and name the folder) like 5.
        for name in ("n_cells", "seed", "profile_dims"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tag(self) -> str:
        """Folder name: readable prefix plus a hash of every setting."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        dims = "all" if self.profile_dims is None else str(self.profile_dims)
        return f"cells{self.n_cells}-seed{self.seed}-dims{dims}-{digest}"


@dataclass(frozen=True)
class CacheLookup:
    """Result of ``PredictionCache.get`` for ``n`` keys.

    ``found`` bool ``n``; ``activity`` float32 ``K x n`` (NaN where not found; ``K = 0`` when the
    folder is empty); ``profiles`` float32 ``K x n x d`` or None (settings without profiles).
    """

    found: np.ndarray
    activity: np.ndarray
    profiles: np.ndarray | None


@dataclass(frozen=True)
class CachedPredictions:
    """``predict_with_cache`` output: ``activity`` float32 ``K x N``, ``profiles`` ``K x N x d`` or None,
    how many were served from the cache / simulated, and the simulation seconds."""

    activity: np.ndarray
    profiles: np.ndarray | None
    n_cached: int
    n_simulated: int
    simulate_seconds: float


def _check_component(value: str, name: str) -> str:
    if not isinstance(value, str) or not _SAFE_COMPONENT.match(value):
        raise ValueError(f"{name} must be a non-empty folder-safe string ([A-Za-z0-9._-]), got {value!r}")
    return value


def _check_inchikeys(inchikeys: Sequence[str], n: int | None = None) -> np.ndarray:
    keys = np.asarray(inchikeys, dtype=object)
    if keys.ndim != 1:
        raise ValueError(f"inchikeys must be a 1-d sequence of strings, got shape {keys.shape}")
    if n is not None and len(keys) != n:
        raise ValueError(f"inchikeys has {len(keys)} entries, expected {n} (one per fingerprint)")
    for i, key in enumerate(keys):
        if not isinstance(key, str) or not key:
            raise ValueError(f"inchikeys[{i}] must be a non-empty string, got {key!r}")
    return keys


def _dose_vector(dose_um: float | np.ndarray, n: int) -> np.ndarray:
    dose = np.asarray(dose_um, dtype=np.float64)
    if dose.ndim == 0:
        dose = np.full(n, float(dose))
    return check_doses(dose, n)


def _row_keys(inchikeys: np.ndarray, dose_um: np.ndarray) -> np.ndarray:
    """``'<inchikey>|<dose to 10 significant digits, uM>'`` per row (object array): doses that differ
    anywhere a lab would write them get their own key (a fixed 6 decimals merged 1e-7 and 4e-7 uM)."""
    return np.array([f"{k}|{d:.10g}" for k, d in zip(inchikeys, dose_um)], dtype=object)


def _activity_columns(n_members: int) -> list[str]:
    return [f"activity_m{k:02d}" for k in range(n_members)]


def _profile_columns(n_members: int, n_dims: int) -> list[str]:
    return [f"profile_m{k:02d}_{j:03d}" for k in range(n_members) for j in range(n_dims)]


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk: pyarrow's message names no file
        raise naming_path(exc, path) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_temporary_files(folder: Path, max_age_s: float = STALE_TEMPORARY_S) -> None:
    """Delete shard files a killed writer left half-written (``.shard-*.tmp-*``, older than ``max_age_s``).

    Reads never see them (they are not ``shard-*.parquet``); this only frees their disk space. A
    live writer renames its file within seconds, so an hour-old one has no owner.
    """
    now = time.time()
    for path in folder.glob(".shard-*.tmp-*"):
        with contextlib.suppress(OSError):  # another process removed it first
            if now - path.stat().st_mtime > max_age_s:
                path.unlink()
                log.info("%s: removed a temporary cache file left by an interrupted write", path)


class _Namespace:
    """In-memory index of one ``<model_version>/<settings tag>`` folder (reloads new shards)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta: dict[str, Any] | None = None
        self.shards: set[str] = set()
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # keys n, activity n x K, profiles n x K x d
        self.n_rows = 0
        self._merged: tuple[pd.Index, np.ndarray, np.ndarray] | None = None
        self._swept = False

    def refresh(self) -> None:
        if not self._swept:
            _remove_stale_temporary_files(self.folder)
            self._swept = True
        meta_path = self.folder / SETTINGS_FILE
        if self.meta is None and meta_path.is_file():
            self.meta = _read_meta(meta_path)
        new = sorted(p for p in self.folder.glob(SHARD_GLOB) if p.name not in self.shards)
        if new and self.meta is None:
            raise PredictionCacheError(f"{meta_path}: missing, but the folder holds cache shards")
        for path in new:
            self.append(path.name, *_read_shard(path, self.meta))

    def append(self, name: str, keys: np.ndarray, activity: np.ndarray, profiles: np.ndarray) -> None:
        self.shards.add(name)
        self.blocks.append((keys, activity, profiles))
        self.n_rows += len(keys)
        self._merged = None

    def _merge(self) -> tuple[pd.Index, np.ndarray, np.ndarray]:
        """Unique-key index (first shard read wins for duplicates) and the stacked rows."""
        if self._merged is None:
            keys = np.concatenate([b[0] for b in self.blocks])
            activity = np.concatenate([b[1] for b in self.blocks])
            profiles = np.concatenate([b[2] for b in self.blocks])
            index = pd.Index(keys, dtype=object)
            if not index.is_unique:  # concurrent writers simulated the same compound
                first = ~index.duplicated(keep="first")
                index, activity, profiles = index[first], activity[first], profiles[first]
            self._merged = (index, activity, profiles)
        return self._merged

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row positions (-1 missing), stacked activity ``rows x K`` and profiles ``rows x K x d``."""
        if self.n_rows == 0:
            return np.full(len(keys), -1, dtype=np.int64), np.zeros((0, 0), np.float32), np.zeros((0, 0, 0), np.float32)
        index, activity, profiles = self._merge()
        return index.get_indexer(keys).astype(np.int64), activity, profiles


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PredictionCacheError(f"{path}: unreadable cache settings ({exc})") from exc
    required = {"format_version", "model_version", "settings", "n_members", "profile_dims", "feature_names"}
    if not isinstance(meta, dict) or not required <= set(meta):
        raise PredictionCacheError(f"{path}: not a prediction-cache settings file (needs {sorted(required)})")
    if meta["format_version"] != CACHE_FORMAT_VERSION:
        raise PredictionCacheError(f"{path}: cache format {meta['format_version']}, expected {CACHE_FORMAT_VERSION}")
    return meta


def _read_shard(path: Path, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_members, n_dims = int(meta["n_members"]), int(meta["profile_dims"])
    columns = ["inchikey", "dose_um", *_activity_columns(n_members), *_profile_columns(n_members, n_dims)]
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for truncated / garbled files
        raise PredictionCacheError(
            f"{path}: unreadable prediction-cache shard ({type(exc).__name__}: {exc}); "
            f"delete it to re-simulate its compounds") from exc
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise PredictionCacheError(f"{path}: cache shard lacks columns {missing[:5]} "
                                   f"(expected K={n_members} members, {n_dims} profile dims)")
    frame = table.select(columns).to_pandas()
    inchikeys = frame["inchikey"].to_numpy(dtype=object)
    dose = frame["dose_um"].to_numpy(dtype=np.float64)
    activity = frame[_activity_columns(n_members)].to_numpy(dtype=np.float32)  # n x K
    profiles = frame[_profile_columns(n_members, n_dims)].to_numpy(dtype=np.float32)
    profiles = profiles.reshape(len(frame), n_members, n_dims)  # n x K x d
    if not (np.isfinite(activity).all() and np.isfinite(profiles).all() and np.isfinite(dose).all()):
        raise PredictionCacheError(f"{path}: cache shard holds non-finite values")
    if any(not isinstance(k, str) or not k for k in inchikeys):
        raise PredictionCacheError(f"{path}: cache shard holds empty or non-string InChIKeys")
    return _row_keys(inchikeys, dose), activity, profiles


class PredictionCache:
    """Member predictions on disk, keyed by (model version, settings, InChIKey, dose_um).

    ``PredictionCache(root)``; ``root`` is typically ``<campaign>/cache``.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._namespaces: dict[Path, _Namespace] = {}

    def folder(self, model_version: str, settings: SimulationSettings) -> Path:
        return self.root / _check_component(model_version, "model_version") / settings.tag()

    def _namespace(self, model_version: str, settings: SimulationSettings) -> _Namespace:
        folder = self.folder(model_version, settings)
        namespace = self._namespaces.setdefault(folder, _Namespace(folder))
        namespace.refresh()
        if namespace.meta is not None and namespace.meta["settings"] != settings.to_dict():
            raise PredictionCacheError(f"{folder / SETTINGS_FILE}: records settings {namespace.meta['settings']}, "
                                       f"not {settings.to_dict()}")
        return namespace

    def n_entries(self, model_version: str, settings: SimulationSettings = SimulationSettings()) -> int:
        return self._namespace(model_version, settings).n_rows

    def get(
        self,
        model_version: str,
        inchikeys: Sequence[str],
        dose_um: float | np.ndarray,
        settings: SimulationSettings = SimulationSettings(),
    ) -> CacheLookup:
        """Cached values for ``n`` (InChIKey, dose) pairs: see ``CacheLookup``."""
        keys = _check_inchikeys(inchikeys)
        dose = _dose_vector(dose_um, len(keys))
        namespace = self._namespace(model_version, settings)
        positions, activity, profiles = namespace.lookup(_row_keys(keys, dose))
        found = positions >= 0
        n_members = 0 if namespace.meta is None else int(namespace.meta["n_members"])
        out = np.full((n_members, len(keys)), np.nan, dtype=np.float32)
        out[:, found] = activity[positions[found]].T
        out_profiles = None
        if settings.profile_dims != 0:
            n_dims = 0 if namespace.meta is None else int(namespace.meta["profile_dims"])
            out_profiles = np.full((n_members, len(keys), n_dims), np.nan, dtype=np.float32)
            out_profiles[:, found] = profiles[positions[found]].transpose(1, 0, 2)
        return CacheLookup(found=found, activity=out, profiles=out_profiles)

    def put(
        self,
        model_version: str,
        inchikeys: Sequence[str],
        dose_um: float | np.ndarray,
        activity: np.ndarray,
        settings: SimulationSettings = SimulationSettings(),
        *,
        profiles: np.ndarray | None = None,
        feature_names: Sequence[str] = (),
    ) -> Path | None:
        """Store ``activity`` ``K x n`` (and ``profiles`` ``K x n x d`` when settings keep any) as one new shard.

        Returns the shard path (None for ``n = 0``). Nothing already stored is rewritten.
        """
        keys = _check_inchikeys(inchikeys)
        n = len(keys)
        dose = _dose_vector(dose_um, n) if n else np.zeros(0)
        activity = np.asarray(activity, dtype=np.float32)
        if activity.ndim != 2 or activity.shape[1] != n:
            raise ValueError(f"activity must be K x n with n={n}, got shape {activity.shape}")
        n_members = activity.shape[0]
        if settings.profile_dims == 0:
            profiles = np.zeros((n_members, n, 0), np.float32)
        elif profiles is None or np.ndim(profiles) != 3 or np.shape(profiles)[:2] != (n_members, n):
            got = None if profiles is None else np.shape(profiles)
            raise ValueError(f"settings keep profile_dims={settings.profile_dims}: profiles must be "
                             f"K x n x d = {n_members} x {n} x d, got {got}")
        profiles = np.asarray(profiles, dtype=np.float32)
        if not (np.isfinite(activity).all() and np.isfinite(profiles).all()):
            raise ValueError("refusing to cache non-finite predictions")
        if n == 0:
            return None
        namespace = self._namespace(model_version, settings)
        n_dims = profiles.shape[2]
        meta = self._ensure_meta(namespace, model_version, settings, n_members, n_dims, feature_names)
        if int(meta["n_members"]) != n_members or int(meta["profile_dims"]) != n_dims:
            raise PredictionCacheError(
                f"{namespace.folder / SETTINGS_FILE}: holds K={meta['n_members']} members x "
                f"{meta['profile_dims']} profile dims, cannot add K={n_members} x {n_dims}")
        columns: dict[str, Any] = {"inchikey": pa.array(keys.tolist(), pa.string()), "dose_um": pa.array(dose)}
        for k, name in enumerate(_activity_columns(n_members)):
            columns[name] = pa.array(activity[k])
        flat = profiles.transpose(1, 0, 2).reshape(n, n_members * n_dims)  # n x (K d)
        for j, name in enumerate(_profile_columns(n_members, n_dims)):
            columns[name] = pa.array(flat[:, j])
        table = pa.table(columns)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        path = namespace.folder / f"shard-{stamp}-{uuid.uuid4().hex[:12]}.parquet"
        _write_atomic(path, lambda tmp: pq.write_table(table, tmp))
        namespace.append(path.name, _row_keys(keys, dose), activity.T.copy(), profiles.transpose(1, 0, 2).copy())
        log.debug("cached %d predictions -> %s", n, path)
        return path

    def _ensure_meta(self, namespace: _Namespace, model_version: str, settings: SimulationSettings,
                     n_members: int, n_dims: int, feature_names: Sequence[str]) -> dict[str, Any]:
        if namespace.meta is not None:
            return namespace.meta
        namespace.folder.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": CACHE_FORMAT_VERSION, "model_version": model_version,
                "settings": settings.to_dict(), "n_members": n_members, "profile_dims": n_dims,
                "feature_names": list(feature_names)[:n_dims]}
        path = namespace.folder / SETTINGS_FILE
        _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
        namespace.meta = meta
        return meta


def simulate_predictions(
    assay: VirtualAssay,
    fingerprints: np.ndarray,
    dose_um: np.ndarray,
    settings: SimulationSettings,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """One ``predict_profiles`` call: activity ``K x n`` and kept profile dims ``K x n x d`` (float32)."""
    profiles = assay.predict_profiles(fingerprints, dose_um, n_cells=settings.n_cells, seed=settings.seed,
                                      plate_id=settings.plate_id, batch_size=batch_size)  # K x n x F
    activity = phenotypic_activity(torch.from_numpy(np.ascontiguousarray(profiles))).numpy()  # K x n
    n_dims = profiles.shape[2] if settings.profile_dims is None else min(settings.profile_dims, profiles.shape[2])
    return activity.astype(np.float32), np.ascontiguousarray(profiles[:, :, :n_dims], dtype=np.float32)


def _non_finite(activity: np.ndarray, profiles: np.ndarray) -> np.ndarray:
    """``b`` mask of compounds with a NaN / inf prediction in any member (``K x b``, ``K x b x d``)."""
    bad = ~np.isfinite(activity).all(axis=0)
    if profiles.size:
        bad |= ~np.isfinite(profiles).all(axis=(0, 2))
    return bad


def _refuse_non_finite(model_version: str, bad_keys: list[str], bad_doses: list[float]) -> None:
    """A diverged sampler must not reach selection: name the compounds (the others are cached)."""
    if bad_keys:
        named = ", ".join(f"{k} at {d:g} uM" for k, d in zip(bad_keys[:5], bad_doses[:5]))
        raise ValueError(f"virtual assay {model_version} predicted non-finite values for {len(bad_keys)} "
                         f"compound(s): {named}{' ...' if len(bad_keys) > 5 else ''}; nothing was cached for "
                         "them (the other compounds were)")


def _simulate_task(assay, fingerprints, dose_um, settings, batch_size):
    """One Ray shard (module level so workers import it)."""
    return simulate_predictions(assay, fingerprints, dose_um, settings, batch_size)


def _simulate_chunked(assay, fingerprints, dose_um, settings, batch_size, chunk_size):
    """Yield ``(positions, (activity K x b, profiles K x b x d))`` chunk by chunk (stored as they finish)."""
    for start in range(0, len(fingerprints), chunk_size):
        part = np.arange(start, min(start + chunk_size, len(fingerprints)))
        yield part, simulate_predictions(assay, fingerprints[part], dose_um[part], settings, batch_size)


def _simulate_sharded(assay, fingerprints, dose_um, settings, batch_size, n_shards, ray_address):
    """``n_shards`` Ray tasks through ``models.ray_executor.iter_tasks``; yields like ``_simulate_chunked``,
    each shard as it finishes (so a failing shard does not lose the finished ones)."""
    parts = [p for p in np.array_split(np.arange(len(fingerprints)), min(n_shards, len(fingerprints))) if len(p)]
    jobs = [dict(assay=assay, fingerprints=fingerprints[p], dose_um=dose_um[p], settings=settings,
                 batch_size=batch_size) for p in parts]
    for i, result in iter_tasks(_simulate_task, jobs, address=ray_address, num_cpus_per_task=1):
        yield parts[i], result


def predict_with_cache(
    assay: VirtualAssay,
    fingerprints: np.ndarray,
    inchikeys: Sequence[str],
    dose_um: float | np.ndarray,
    cache: PredictionCache | None,
    *,
    seed: int,
    n_cells: int = 32,
    plate_id: str | None = None,
    profile_dims: int | None = 0,
    batch_size: int = 256,
    chunk_size: int = 4096,
    executor: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
    n_shards: int = 2,
) -> CachedPredictions:
    """Per-member activity ``K x N`` for ``N`` compounds, simulating only what the cache lacks.

    Args:
        assay: a ``VirtualAssay`` (its ``version`` keys the cache).
        fingerprints: ``uint8 N x 256`` packed Morgan fingerprints.
        inchikeys: ``N`` InChIKeys (cache keys; duplicates are simulated once).
        dose_um: scalar or ``N`` doses (micromolar).
        cache: a ``PredictionCache``, or None to simulate everything without storing.
        seed, n_cells, plate_id, profile_dims: ``SimulationSettings`` (part of the key).
        batch_size: compounds per forward batch inside ``predict_profiles``.
        chunk_size: compounds simulated (and stored) per step locally, so an interrupted run keeps
            what it finished.
        executor: ``'local'`` or ``'ray'`` (``n_shards`` tasks via ``models.ray_executor.iter_tasks``).

    Returns:
        ``CachedPredictions`` (``activity`` float32 ``K x N``; ``profiles`` ``K x N x d`` or None).
    """
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if int(chunk_size) != chunk_size or chunk_size < 1 or int(n_shards) != n_shards or n_shards < 1:
        raise ValueError(f"chunk_size and n_shards must be positive integers, got {chunk_size!r}, {n_shards!r}")
    fingerprints = check_fingerprints(fingerprints)
    n = len(fingerprints)
    keys = _check_inchikeys(inchikeys, n)
    dose = _dose_vector(dose_um, n)
    settings = SimulationSettings(n_cells=n_cells, seed=seed, plate_id=plate_id, profile_dims=profile_dims)
    n_members = int(assay.n_members)
    codes, uniques = pd.factorize(_row_keys(keys, dose))  # N -> unique (InChIKey, dose)
    unique_rows = np.empty(len(uniques), dtype=np.int64)
    unique_rows[codes[::-1]] = np.arange(n)[::-1]  # first row of each unique key

    if cache is not None:
        lookup = cache.get(assay.version, keys[unique_rows], dose[unique_rows], settings)
        if lookup.found.any() and lookup.activity.shape[0] != n_members:
            raise PredictionCacheError(f"{cache.folder(assay.version, settings)}: cached K={lookup.activity.shape[0]} "
                                       f"members, the assay has K={n_members}")
        found = lookup.found
    else:
        lookup, found = None, np.zeros(len(unique_rows), dtype=bool)
    activity = np.full((n_members, len(unique_rows)), np.nan, dtype=np.float32)
    profiles: np.ndarray | None = None
    if lookup is not None and found.any():
        activity[:, found] = lookup.activity[:, found]
        if lookup.profiles is not None:
            profiles = np.full((n_members, len(unique_rows), lookup.profiles.shape[2]), np.nan, dtype=np.float32)
            profiles[:, found] = lookup.profiles[:, found]

    missing = np.flatnonzero(~found)
    bad_keys: list[str] = []
    bad_doses: list[float] = []
    t0 = time.perf_counter()
    if len(missing):
        rows = unique_rows[missing]
        log.info("virtual assay %s: simulating %d compounds x %d member(s), %d cells each (%d from cache)...",
                 assay.version, len(missing), n_members, n_cells, int(found.sum()))
        if executor == "ray":
            blocks = _simulate_sharded(assay, fingerprints[rows], dose[rows], settings, batch_size, n_shards,
                                       ray_address)
        else:
            blocks = _simulate_chunked(assay, fingerprints[rows], dose[rows], settings, batch_size, chunk_size)
        for part, (act, prof) in blocks:
            if act.shape != (n_members, len(part)):
                raise ValueError(f"assay {assay.version} returned activity {act.shape}, "
                                 f"expected {(n_members, len(part))}")
            bad = _non_finite(act, prof)
            bad_keys += keys[rows[part[bad]]].tolist()
            bad_doses += dose[rows[part[bad]]].tolist()
            activity[:, missing[part]] = act
            if settings.profile_dims != 0:
                if profiles is None:
                    profiles = np.full((n_members, len(unique_rows), prof.shape[2]), np.nan, dtype=np.float32)
                profiles[:, missing[part]] = prof
            if cache is not None:  # every finite prediction is kept, even when another shard fails
                good = part[~bad]
                cache.put(assay.version, keys[rows[good]], dose[rows[good]], act[:, ~bad], settings,
                          profiles=prof[:, ~bad], feature_names=list(assay.feature_names))
            if len(part) < len(missing):  # progress of a long simulation, chunk by chunk
                log.info("virtual assay %s: %d more simulated (%.0f s so far)", assay.version, len(part),
                         time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    _refuse_non_finite(assay.version, bad_keys, bad_doses)
    if len(missing):
        log.info("virtual assay %s: simulated %d compounds (K=%d, %s) in %.1f s; %d from cache",
                 assay.version, len(missing), n_members, executor, seconds, int(found.sum()))
    if profiles is None and settings.profile_dims != 0:  # nothing looked up or simulated (N = 0)
        n_features = len(assay.feature_names)
        n_dims = n_features if settings.profile_dims is None else min(settings.profile_dims, n_features)
        profiles = np.zeros((n_members, len(unique_rows), n_dims), dtype=np.float32)
    out_profiles = None if profiles is None else profiles[:, codes]
    return CachedPredictions(activity=activity[:, codes], profiles=out_profiles,
                             n_cached=int(found.sum()), n_simulated=len(missing), simulate_seconds=seconds)
