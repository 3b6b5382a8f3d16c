"""Single-cell crops format: reader, writer and compound-name -> SMILES resolution.

A crops folder (what ``../shared/data/bbbc021`` ships, and what ``loop ingest --crops-px`` writes per
plate from the lab's images, cut with :func:`cut_crops`)::

    DIR/
      crops.npz              key ``images``: uint16 array N x H x W x C (raw intensities)
      crops_metadata.csv     one row per crop; required columns plate, well, compound,
                             concentration_um; optional ``row`` (index into images),
                             ``smiles``, site, moa, ...
      channels.json          optional: {"channel_names": [...], "named": true} (length C); "named"
                             false (written for crops whose names are defaults or guesses) keeps
                             the names for display but says they were never declared

A folder without ``channels.json``, or with ``"named": false``, has no declared channel names: its
channels are taken by position (:func:`reorder_channels`). Channel names are compared by
:func:`channel_key` (case, spaces and punctuation ignored) everywhere.

Rows are matched to images through ``row`` when present (any order), else by position.
DMSO (the solvent) is the null compound: ``compound == "DMSO"`` (case-insensitive).
Every validation error names the offending file (and the row / column where it can).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from lab_io.schema import CONTROL_COMPOUND_ID
from lab_io.tempfiles import write_files_atomically

logger = logging.getLogger(__name__)

IMAGES_FILE = "crops.npz"
METADATA_FILE = "crops_metadata.csv"
CHANNELS_FILE = "channels.json"
IMAGES_KEY = "images"
REQUIRED_COLUMNS = ("plate", "well", "compound", "concentration_um")
#: Names of a 3-channel crops folder without ``channels.json``: the order of the BBBC021 crops in
#: ``../shared`` (0 = DAPI). Channels 1 and 2 are actin and tubulin, the reverse of the order the
#: shared README gives ("not independently verified"): against BBBC021's own CellProfiler per-well
#: means (Ljosa 2013) for the same wells, log(ch1 / ch2) correlates +0.97 / +0.98 / +0.99 (Nuclei /
#: Cells / Cytoplasm) with log(CorrActin / CorrTub), and cycloheximide's 50 uM fold changes match
#: only this way round (session 33's review, ``docs/STATUS_LOG.md``).
DEFAULT_CHANNELS_3 = ("DNA", "Actin", "Tubulin")
#: What :data:`DEFAULT_CHANNELS_3` was before session 33 (and what ingest guessed for a 3-channel
#: images-only plate, ``lab_io.schema.CHANNELS``, before session 34): models saved then may carry it.
OLD_DEFAULT_CHANNELS_3 = ("DNA", "Tubulin", "Actin")
SMILES_TABLE = Path("bbbc021") / "compounds_smiles_matched.csv"
#: Fallback names -> SMILES (from ``compounds_smiles_matched.csv``, Drug Repurposing Hub match),
#: used when the shared table is absent. BBBC021 spells cycloheximide "cyclohexamide".
FALLBACK_SMILES: Mapping[str, str] = {
    "cyclohexamide": "C[C@H]1C[C@H](C)C(=O)[C@@H](C1)[C@H](O)CC1CC(=O)NC(=O)C1",
    "cycloheximide": "C[C@H]1C[C@H](C)C(=O)[C@@H](C1)[C@H](O)CC1CC(=O)NC(=O)C1",
}


class CropsError(ValueError):
    """A crops folder is missing, malformed or inconsistent; the message names the file."""


@dataclass(frozen=True)
class CropSet:
    """Crops and their metadata.

    images: uint16 ``N x H x W x C``; metadata: N rows (index 0..N-1, aligned with images);
    channel_names: length C; channels_named: False when the names are defaults or guesses (a folder
    without ``channels.json``, or one saying ``"named": false``): they say nothing of the stains, and
    :func:`reorder_channels` takes such channels by position.
    """

    images: np.ndarray
    metadata: pd.DataFrame
    channel_names: tuple[str, ...]
    channels_named: bool = True

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise CropsError(f"images must be N x H x W x C, got shape {self.images.shape}")
        if len(self.metadata) != len(self.images):
            raise CropsError(f"{len(self.metadata)} metadata rows for {len(self.images)} images")
        if len(self.channel_names) != self.images.shape[3]:
            raise CropsError(f"{len(self.channel_names)} channel names for {self.images.shape[3]} channels")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, mask_or_index: np.ndarray) -> "CropSet":
        """Rows selected by a boolean mask or an integer index (metadata re-indexed 0..n-1)."""
        idx = np.flatnonzero(mask_or_index) if np.asarray(mask_or_index).dtype == bool else np.asarray(mask_or_index)
        return CropSet(self.images[idx], self.metadata.iloc[idx].reset_index(drop=True), self.channel_names,
                       self.channels_named)

    @property
    def is_control(self) -> np.ndarray:
        """Boolean N: DMSO (null compound) rows."""
        return is_control_compound(self.metadata["compound"])

    @property
    def plates(self) -> list[str]:
        return sorted(self.metadata["plate"].astype(str).unique())


def is_control_compound(compounds: pd.Series | Sequence[str]) -> np.ndarray:
    """Boolean mask of DMSO (null-compound) entries."""
    return np.asarray([str(c).strip().upper() == CONTROL_COMPOUND_ID.upper() for c in compounds], dtype=bool)


def default_channel_names(n_channels: int) -> tuple[str, ...]:
    return DEFAULT_CHANNELS_3 if n_channels == 3 else tuple(f"ch{i}" for i in range(n_channels))


def _read_images(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CropsError(f"{path}: missing (a crops folder needs {IMAGES_FILE}; a folder of <barcode>.crops "
                         "folders, as `loop ingest RESULTS --crops-px N` writes into a campaign's measurements, "
                         "is read as their union)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if IMAGES_KEY not in npz.files:
                raise CropsError(f"{path}: no key {IMAGES_KEY!r} (keys: {npz.files})")
            images = npz[IMAGES_KEY]
    except CropsError:
        raise
    except Exception as err:  # zip / npy parsing errors
        raise CropsError(f"{path}: not a readable .npz ({err})") from err
    if images.ndim != 4:
        raise CropsError(f"{path}: {IMAGES_KEY!r} must be N x H x W x C, got shape {images.shape}")
    if images.dtype != np.uint16:
        raise CropsError(f"{path}: {IMAGES_KEY!r} must be uint16, got {images.dtype}")
    return images


def _read_metadata(path: Path, n_images: int) -> pd.DataFrame:
    if not path.is_file():
        raise CropsError(f"{path}: missing (a crops folder needs {METADATA_FILE})")
    try:  # identifiers are text: plate 0101 stays 0101
        meta = pd.read_csv(path, dtype={"plate": str, "well": str, "compound": str, "smiles": str})
    except Exception as err:
        raise CropsError(f"{path}: not a readable CSV ({err})") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise CropsError(f"{path}: missing column(s) {missing}; required {list(REQUIRED_COLUMNS)}")
    if len(meta) != n_images:
        raise CropsError(f"{path}: {len(meta)} rows but {IMAGES_FILE} holds {n_images} images")
    for col in ("plate", "well", "compound"):
        bad = meta.index[meta[col].isna()]
        if len(bad):
            raise CropsError(f"{path}: empty {col!r} at data line {int(bad[0]) + 2}")
    for col in ("plate", "well", "compound"):
        meta[col] = meta[col].astype(str).str.strip()
    meta["compound"] = _unify_spellings(meta["compound"], path)
    dose = pd.to_numeric(meta["concentration_um"], errors="coerce")
    blank_control = dose.isna() & meta["concentration_um"].isna() & pd.Series(is_control_compound(meta["compound"]))
    dose = dose.where(~blank_control, 0.0)  # DMSO wells often carry no concentration
    bad = meta.index[dose.isna() | (dose < 0)]
    if len(bad):
        value = meta.loc[bad[0], "concentration_um"]
        raise CropsError(
            f"{path}: concentration_um must be a number >= 0; line {int(bad[0]) + 2} "
            f"({meta.loc[bad[0], 'plate']} {meta.loc[bad[0], 'well']} {meta.loc[bad[0], 'compound']}) has "
            + ("none" if pd.isna(value) else repr(str(value)))
        )
    meta["concentration_um"] = dose.astype(float)
    if "row" in meta.columns:
        rows = pd.to_numeric(meta["row"], errors="coerce")
        if rows.isna().any() or sorted(rows.astype(int)) != list(range(n_images)):
            raise CropsError(f"{path}: column 'row' must be a permutation of 0..{n_images - 1}")
        meta = meta.assign(row=rows.astype(int)).sort_values("row").reset_index(drop=True)
    return meta


def _unify_spellings(compounds: pd.Series, path: Path) -> pd.Series:
    """Compound names that differ only in case are one compound (as DMSO and the model's name
    lookups already treat them): each takes its most frequent spelling, with a warning."""
    key = compounds.str.lower()
    spellings = compounds.groupby(key, sort=False).agg(lambda s: s.value_counts(sort=False).idxmax())
    n_spellings = compounds.groupby(key, sort=False).nunique()
    for name in n_spellings.index[n_spellings > 1]:
        variants = sorted(compounds[key == name].unique())
        logger.warning("%s: compound spelled %s; all read as %r", path, " / ".join(map(repr, variants)),
                       spellings[name])
    return key.map(spellings)


class ChannelNames(list):
    """A model's channel names and whether they were ``declared``: False when they are defaults or
    guesses that mean only the order (a model trained on crops without declared names), so that
    :func:`reorder_channels` maps a folder's channels to it by position, not by name."""

    def __init__(self, names: Iterable[str] = (), declared: bool = True) -> None:
        super().__init__(str(n) for n in names)
        self.declared = bool(declared)


def could_be_default_names(names: Sequence[str]) -> bool:
    """Whether ``names`` are what a default or a guess gave channels nobody named: either 3-channel
    default (:data:`DEFAULT_CHANNELS_3`, :data:`OLD_DEFAULT_CHANNELS_3`), ``ch0, ch1, ...`` or
    ingest's guesses (``DNA`` then ``Ch<n>``). A model saved without recording whether its names
    were declared, and named so, is taken to have positional channels."""
    keys = [channel_key(n) for n in names]
    if tuple(keys) in {tuple(map(channel_key, d)) for d in (DEFAULT_CHANNELS_3, OLD_DEFAULT_CHANNELS_3)}:
        return True
    numbered = keys[1:] if keys[:1] == ["dna"] else keys
    return bool(keys) and all(re.fullmatch(r"ch\d+", k) for k in numbered)


def _order_by_name(have: Sequence[str], want: Sequence[str]) -> list[int] | None:
    """Indices putting channels named ``have`` in the order ``want`` (compared by :func:`channel_key`);
    None unless both name the same distinct channels."""
    have_keys, want_keys = [channel_key(n) for n in have], [channel_key(n) for n in want]
    if sorted(have_keys) != sorted(want_keys) or len(set(want_keys)) != len(want_keys):
        return None
    return [have_keys.index(k) for k in want_keys]


def reorder_channels(crops: CropSet, names: Sequence[str], source: str | Path, *,
                     declared: bool | None = None) -> CropSet:
    """``crops`` with its channels in the order a model takes them; ``names`` are the model's channels.

    ``declared`` (default: ``names.declared`` of a :class:`ChannelNames`, else True) says whether the
    model's names were declared. When both the model's and the folder's names are declared, channels
    are matched by name (:func:`channel_key`): a folder with the same channels in another order is
    reordered (a warning) and anything else raises :class:`CropsError` naming both. Otherwise the
    folder's channels are taken by position when the counts agree: a folder without declared names
    for a model with declared ones gets the model's names (a warning: nothing checks the stains); a
    model without declared names keeps the folder's own (a warning when the folder declares names
    other than the model's, in order: the model's say only which position it was trained on)."""
    if declared is None:
        declared = getattr(names, "declared", True)
    names = tuple(str(n) for n in names)
    have, n_channels = list(crops.channel_names), crops.images.shape[3]
    if (not declared or not crops.channels_named) and n_channels == len(names):
        if not declared:
            if crops.channels_named and [channel_key(n) for n in have] != [channel_key(n) for n in names]:
                logger.warning("%s: channels %s taken by position as the model's %s: the model was trained on "
                               "crops without declared channel names, so its names say only the order; if its "
                               "training crops held other stains in these positions, its input is wrong", source,
                               have, list(names))
            return crops
        logger.warning("%s: crops without declared channel names (%s: no %s or one saying \"named\": false) taken by "
                       "position as the model's %s; nothing checks that they are these stains (name them in %s)",
                       source, have, CHANNELS_FILE, list(names), CHANNELS_FILE)
        return CropSet(crops.images, crops.metadata, names, channels_named=False)
    if [channel_key(n) for n in have] == [channel_key(n) for n in names]:
        return crops
    order = _order_by_name(have, names) if declared and crops.channels_named else None
    if order is not None:
        logger.warning("%s: channels %s reordered to the model's %s", source, have, list(names))
        return CropSet(np.ascontiguousarray(crops.images[..., order]), crops.metadata, names)
    named = f"named in its {CHANNELS_FILE}" if crops.channels_named else "without declared names"
    raise CropsError(f"{source}: crops have {n_channels} channels {have} ({named}); "
                     f"the model expects {list(names)}")


def read_channel_names(path: Path) -> tuple[tuple[str, ...], bool]:
    """A ``channels.json``'s channel names and whether they were declared (a file written before
    ``named`` was recorded: declared, unless its names look like a default or a guess,
    :func:`could_be_default_names`, as ingest's guesses before session 34 were). CropsError naming
    the file when it cannot be read as one."""
    try:
        spec = json.loads(path.read_text())
        names = tuple(str(n) for n in spec["channel_names"])
        named = spec["named"] if "named" in spec else not could_be_default_names(names)
    except Exception as err:
        raise CropsError(f"{path}: expected JSON {{\"channel_names\": [...], \"named\": true}} ({err})") from err
    if not isinstance(named, bool):
        raise CropsError(f"{path}: \"named\" must be true or false, got {named!r}")
    return names, named


def _read_channels(path: Path, n_channels: int) -> tuple[tuple[str, ...], bool]:
    """The folder's channel names and whether they were declared (no file: defaults, not declared;
    else :func:`read_channel_names`, checked against the images' channel count)."""
    if not path.is_file():
        return default_channel_names(n_channels), False
    names, named = read_channel_names(path)
    if len(names) != n_channels:
        raise CropsError(f"{path}: {len(names)} channel names for {n_channels} image channels")
    keys = [channel_key(n) for n in names]
    if len(set(keys)) != len(keys) or not all(keys):
        raise CropsError(f"{path}: channel names must be non-empty and unique (ignoring case, spaces and "
                         f"punctuation), got {list(names)}")
    return names, named


def load_crops(crops_dir: str | Path) -> CropSet:
    """Read a crops folder -> :class:`CropSet` (images uint16 ``N x H x W x C``, metadata).

    A folder without ``crops.npz`` whose sub-folders are crops folders (a campaign's
    ``measurements/``, where ingest writes ``<barcode>.crops/`` per plate) is read as their union;
    they must agree on channels (crops of other sizes are centre-cropped to the smallest). Plates
    measured there without crops (``<barcode>.cells.parquet`` alone) are named in a warning.
    Raises :class:`CropsError` naming the file on any missing or malformed part.
    """
    crops_dir = Path(crops_dir)
    if not crops_dir.is_dir():
        raise CropsError(f"{crops_dir}: not a folder (expected {IMAGES_FILE} + {METADATA_FILE})")
    parts = sorted(p for p in crops_dir.iterdir()  # hidden folders are work in progress (ingest's temporaries)
                   if p.is_dir() and not p.name.startswith(".") and (p / IMAGES_FILE).is_file())
    if not (crops_dir / IMAGES_FILE).exists() and parts:
        with_crops = {p.name.removesuffix(".crops") for p in parts}
        without = sorted(p.name.removesuffix(".cells.parquet") for p in crops_dir.glob("*.cells.parquet")
                         if p.name.removesuffix(".cells.parquet") not in with_crops)
        if without:
            logger.warning("%s: plate(s) %s were measured without crops and are not in the crops read (ingest "
                           "them with --crops-px to cut crops)", crops_dir, without)
        return _concatenate([load_crops(p) for p in parts], parts)
    images = _read_images(crops_dir / IMAGES_FILE)
    metadata = _read_metadata(crops_dir / METADATA_FILE, len(images))
    channels, named = _read_channels(crops_dir / CHANNELS_FILE, images.shape[3])
    logger.info("loaded %d crops %s from %s", len(images), images.shape[1:], crops_dir)
    return CropSet(images=images, metadata=metadata, channel_names=channels, channels_named=named)


def _concatenate(sets: list[CropSet], folders: list[Path]) -> CropSet:
    """The union of several plates' crops. They must share channels (compared by :func:`channel_key`;
    declared names in another order are reordered to the first folder's, with a warning); crops cut
    at different sizes (``--crops-px`` changed between rounds) are centre-cropped to the smallest,
    with a warning. The union's names are declared only when every folder's are."""
    first, where = sets[0], folders[0]
    sets = [first] + [_same_channels(crops, folder, first, where) for crops, folder in zip(sets[1:], folders[1:])]
    size = min(min(c.images.shape[1:3]) for c in sets)
    if any(c.images.shape[1:3] != (size, size) for c in sets):
        logger.warning("crops of %s are %s px: all are centre-cropped to %d px", [f.name for f in folders],
                       ["x".join(map(str, c.images.shape[1:3])) for c in sets], size)
    images = [centre_crop(c.images, size) for c in sets]
    metadata = pd.concat([c.metadata.drop(columns=["row"], errors="ignore") for c in sets], ignore_index=True)
    return CropSet(np.concatenate(images), metadata, first.channel_names, all(c.channels_named for c in sets))


def _same_channels(crops: CropSet, folder: Path, first: CropSet, where: Path) -> CropSet:
    """``crops`` with the channels of ``first`` (the union's first folder, ``where``), in its order."""
    if [channel_key(n) for n in crops.channel_names] == [channel_key(n) for n in first.channel_names]:
        return crops
    order = (_order_by_name(crops.channel_names, first.channel_names)
             if crops.channels_named and first.channels_named else None)
    if order is None:
        raise CropsError(f"{folder}: crops {crops.images.shape[1:]} with channels {list(crops.channel_names)} "
                         f"{_named(crops)} do not match {where}'s {first.images.shape[1:]} "
                         f"{list(first.channel_names)} {_named(first)}")
    logger.warning("%s: channels %s reordered to %s's %s", folder, list(crops.channel_names), where.name,
                   list(first.channel_names))
    return CropSet(np.ascontiguousarray(crops.images[..., order]), crops.metadata, first.channel_names)


def _named(crops: CropSet) -> str:
    return "(declared)" if crops.channels_named else "(not declared: defaults or guesses)"


def centre_crop(images: np.ndarray, size: int, source: str = "crops") -> np.ndarray:
    """``N x H x W x C`` -> ``N x size x size x C`` (centre); CropsError naming ``source`` if too small."""
    h, w = images.shape[1:3]
    if h < size or w < size:
        raise CropsError(f"{source}: crops are {h}x{w} px, smaller than the model's {size} px")
    top, left = (h - size) // 2, (w - size) // 2
    return images[:, top : top + size, left : left + size]


def channel_key(name: object) -> str:
    """A channel name as channels are matched and told apart: its letters and digits, lower case
    (case, spaces and punctuation ignored: ``Hoechst 33342`` matches ``HOECHST33342``)."""
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def channel_display_name(name: object) -> str:
    """A channel name as it is stored (crops' ``channels.json``, feature-name parts such as
    ``Cells_Intensity_MeanIntensity_<name>``): its letters and digits, case kept (``Hoechst 33342``
    -> ``Hoechst33342``); the one rule for names given with ``loop ingest --channels`` and names read
    from a Harmony index."""
    return "".join(ch for ch in str(name).strip() if ch.isalnum())


def cut_crops(field: np.ndarray, centres_yx: np.ndarray, size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Square single-cell crops of a field ``C x H x W`` centred on each ``(y, x)`` centre.

    Returns uint16 crops ``n' x size_px x size_px x C`` and the boolean mask (``n``) of the centres
    cut: a crop that would reach beyond the field is not cut (no padding; a crops pipeline skips
    cells at the border). The crop's top-left pixel is ``round(centre) - size_px // 2``."""
    field = np.asarray(field)
    if field.ndim != 3:
        raise CropsError(f"cut_crops expects a C x H x W field, got shape {field.shape}")
    if size_px < 2:
        raise CropsError(f"crop size must be >= 2 px, got {size_px}")
    centres = np.rint(np.asarray(centres_yx, dtype=np.float64).reshape(-1, 2)).astype(np.int64)
    top_left = centres - size_px // 2
    _, height, width = field.shape
    inside = ((top_left >= 0).all(axis=1) & (top_left[:, 0] + size_px <= height)
              & (top_left[:, 1] + size_px <= width))
    out = np.empty((int(inside.sum()), size_px, size_px, field.shape[0]), dtype=np.uint16)
    for i, (y, x) in enumerate(top_left[inside]):
        out[i] = np.moveaxis(field[:, y:y + size_px, x:x + size_px], 0, -1)
    return out, inside


def write_crops(crops: CropSet, crops_dir: str | Path) -> Path:
    """Write a :class:`CropSet` as a crops folder (each file written atomically). Returns the folder.

    ``channels.json`` records whether the names were declared (``"named"``), so the defaults of a
    folder read without names (or ingest's guesses) are read back as such, not as declared stains."""
    crops_dir = Path(crops_dir)
    if crops.images.dtype != np.uint16:
        raise CropsError(f"{crops_dir}: images must be uint16, got {crops.images.dtype}")
    missing = [c for c in REQUIRED_COLUMNS if c not in crops.metadata.columns]
    if missing:
        raise CropsError(f"{crops_dir / METADATA_FILE}: metadata lacks column(s) {missing}")
    crops_dir.mkdir(parents=True, exist_ok=True)
    meta = crops.metadata.reset_index(drop=True).copy()
    meta["row"] = np.arange(len(meta))
    meta = meta[["row"] + [c for c in meta.columns if c != "row"]]

    def _npz(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **{IMAGES_KEY: crops.images})

    write_files_atomically({
        crops_dir / IMAGES_FILE: _npz,
        crops_dir / METADATA_FILE: lambda tmp: meta.to_csv(tmp, index=False),
        crops_dir / CHANNELS_FILE: lambda tmp: Path(tmp).write_text(
            json.dumps({"channel_names": list(crops.channel_names), "named": bool(crops.channels_named)})),
    })
    return crops_dir


def shared_data_dir() -> Path:
    """``$LOOP_SHARED_DATA`` or ``../shared/data`` relative to the repository root."""
    env = os.environ.get("LOOP_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _smiles_table() -> dict[str, str]:
    table = dict(FALLBACK_SMILES)
    path = shared_data_dir() / SMILES_TABLE
    if path.is_file():
        df = pd.read_csv(path)
        for name, smi in zip(df["compound"], df["smiles"]):
            if isinstance(smi, str) and smi.strip():
                table[str(name).strip().lower()] = smi.split(" |")[0].strip()
    return table


def smiles_for_name(name: str) -> str | None:
    """SMILES of a compound name (case-insensitive) in the BBBC021 name table or the embedded
    fallback; None when neither has it."""
    return _smiles_table().get(str(name).strip().lower()) or None


def compound_smiles(metadata: pd.DataFrame, source: str | Path = "crops metadata", *,
                    strict: bool = True) -> dict[str, str]:
    """compound name -> SMILES for every compound in ``metadata`` ("" for DMSO).

    Uses the metadata's ``smiles`` column when present, else the BBBC021 name table
    (``shared/data/bbbc021/compounds_smiles_matched.csv``) and the embedded fallback.
    A compound with no SMILES raises :class:`CropsError` naming ``source`` and the compound, or
    with ``strict=False`` is left out of the result (BBBC021's AstraZeneca compounds have none).
    """
    known = _smiles_table()
    out: dict[str, str] = {}
    has_col = "smiles" in metadata.columns
    for name, group in metadata.groupby("compound", sort=True):
        name = str(name)
        if is_control_compound([name])[0]:
            out[name] = ""
            continue
        smi = ""
        if has_col:
            vals = [s for s in group["smiles"] if isinstance(s, str) and s.strip()]
            smi = vals[0].strip() if vals else ""
        smi = smi or known.get(name.strip().lower(), "")
        if smi:
            out[name] = smi
        elif strict:
            raise CropsError(f"{source}: no SMILES for compound {name!r} (add a 'smiles' column)")
    return out
