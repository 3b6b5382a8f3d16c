"""``loop ingest RESULTS_DIR``: import what the lab returned.

Order of work: parse every plate in the folder, check every plate against the campaign
(barcode emitted by us, wells in its map), compute every plate's well profiles, and only then
write, under the campaign's write lock (``Campaign.writing``). A whole plate is one
transaction; re-importing identical results is a no-op that says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from sqlmodel import Session, select

from lab_io import profiles as profiling
from lab_io.crops import CropSet, write_crops
from lab_io.results import PlateResult, ResultsError, plate_barcode, plate_dirs, plate_fingerprint, read_plate
from lab_io.schema import (
    META_COMPOUND,
    META_DOSE,
    META_PLATE,
    META_ROLE,
    META_WELL,
    CONTROL_COMPOUND_ID,
    WellRole,
    feature_columns,
)
from lab_io.tempfiles import naming_path
from loop import store
from loop.campaign import Campaign

log = logging.getLogger(__name__)


class IngestError(ValueError):
    """Results that do not belong to this campaign or do not match its plate maps."""


@dataclass(frozen=True)
class PlateQC:
    barcode: str
    status: str  # imported | already imported | crops added (already imported; --crops-px cut its crops now)
    n_wells: int = 0
    n_cells: int = 0
    cells_per_well_median: float = 0.0
    cells_per_well_min: int = 0
    control_activity_mean: float = float("nan")
    control_activity_sd: float = float("nan")
    n_hits: int = 0
    missing_wells: list[str] = field(default_factory=list)  # mapped, nothing delivered (--allow-missing-wells)
    empty_wells: list[str] = field(default_factory=list)  # mapped, imaged, no cell found (measured: n_cells 0)
    edge_offset_sd: float = float("nan")  # edge effect removed, DMSO sd over the features corrected (NaN: none)
    hit_threshold: float = float("nan")  # the plate's profile threshold: DMSO mean + hit_sd sd of activity
    # (with cell_count_hits a well on few cells needs more, and a cell-loss hit needs none)
    n_hits_withdrawn: int = 0  # profile hits on few cells that DMSO wells measured with as few cells explain
    n_hits_cell_loss: int = 0  # hits by cell loss alone (wells without a cell included)


def ingest_results(campaign: Campaign, results_dir: Path, *, crop_px: int | None = None,
                   crops_per_well: int = 64, allow_missing_wells: bool = False,
                   allow_uneven_fields: bool = False, replace: bool = False,
                   channel_names: Sequence[str] | None = None) -> list[PlateQC]:
    """Import every plate under ``results_dir``; nothing is written unless all plates check out and
    every plate's profiles can be computed.

    A mapped well with no delivered field at all (no Image.csv row, no image) makes its plate an
    error naming the wells: a partial copy of the lab's export would otherwise be taken for wells
    without cells and their compounds for measured. ``allow_missing_wells``: import such plates
    without those wells (no measurement is stored for them, so their compounds stay candidates;
    the plate is imported again only with ``replace``). A well the lab imaged and found no cell in
    is a measurement with ``n_cells = 0``.

    A mapped well delivered with fewer fields (sites) than the plate's most imaged well is an error
    too (a copy still in progress, cut inside a well); ``allow_uneven_fields`` imports such wells
    with the fields delivered (a lab that images a varying number of fields per well).

    ``replace``: a plate imported before from other files (the complete copy of a plate imported
    with ``allow_missing_wells``, a corrected export) is imported again from these: its
    measurements, Parquet files and crops (``crop_px`` is then needed when it has crops) are
    replaced as one step (:func:`_replace_plate`): if it fails or is killed, the earlier ones are
    back by the end of this or the next ingest. Models trained before keep what they were trained
    on; ``loop train`` trains a new version on the new measurements.

    ``crop_px``: also cut single-cell crops (``crop_px`` square, at most ``crops_per_well`` a well)
    from each plate's images and store them as a crops folder, ``measurements/<barcode>.crops/``
    (compound = the campaign's compound id, DMSO for controls; ``smiles`` from the library), which
    ``loop assay train --data <campaign>/measurements`` trains the image assay on.

    ``channel_names``: the stains of an images-only plate's channels ``ch1..chN`` (default: its
    Harmony index's names, else guessed with a warning: DNA for ch1, ``Ch<N>`` for the others, and
    recorded as not declared in the plate's crops). With ``replace``,
    plates imported before from these very files are read again with these names (a plate whose
    stains were guessed wrong).

    A plate folder whose barcode this campaign did not emit, whose round was cancelled, or (without
    ``replace``) that was imported from other files is refused before any plate is read or
    segmented (again under the write lock, with the plate's contents)."""
    results_dir = Path(results_dir)
    folders = plate_dirs(results_dir)
    _refuse_duplicate_plates(folders)
    fingerprints: dict[Path, str | None] = {}  # each folder's files hashed once

    def fingerprint_of(folder: Path) -> str | None:
        if folder not in fingerprints:
            fingerprints[folder] = plate_fingerprint(folder)
        return fingerprints[folder]

    rename_channels = replace and channel_names is not None  # same files, read again with these names
    _refuse_unwanted_plates(campaign, folders, replace, fingerprint_of)
    unchanged = ({} if rename_channels else  # not parsed nor segmented again
                 _imported_unchanged(campaign, folders, crop_px, fingerprint_of))
    plates = [read_plate(folder, channel_names=channel_names, crop_px=crop_px, crops_per_well=crops_per_well)
              for folder in folders if plate_barcode(folder.name) not in unchanged]
    if crop_px is not None:
        no_images = [p.barcode for p in plates if p.crops is None]
        if no_images:
            raise IngestError(f"{results_dir}: plate(s) {no_images} have no Images/ folder to cut crops from")
    if not plates:
        if unchanged:
            return list(unchanged.values())
        raise IngestError(f"{results_dir}: no plate folders with results found")
    with campaign.writing(f"ingest of {results_dir}"):
        recover_replacements(campaign)
        with campaign.session() as session:
            plans = [_check_plate(session, plate, results_dir, allow_missing_wells, allow_uneven_fields, replace,
                                  rename_channels)
                     for plate in plates]
        _check_same_measurements(campaign, [plan for plan in plans if not plan.imported_before], results_dir)
        if crop_px is None:
            with_crops = [plan.plate.barcode for plan in plans if plan.replaces
                          and (campaign.measurements_dir / f"{plan.plate.barcode}.crops").exists()]
            if with_crops:
                raise IngestError(f"{results_dir}: plate(s) {with_crops} have crops from their earlier files; "
                                  "pass --crops-px to cut them again from the new ones (--replace replaces them)")
        profiles = [None if plan.imported_before else _profile_plate(campaign, plan.plate, plan.well_map, results_dir)
                    for plan in plans]
        reports = []
        for plan, profiled in zip(plans, profiles):
            if plan.imported_before:
                reports.append(_revisit_plate(campaign, plan))
                continue
            reports.append(_replace_plate(campaign, plan, *profiled) if plan.replaces else
                           _record_plate(campaign, plan, *profiled))
    by_barcode = {**unchanged, **{r.barcode: r for r in reports}}
    barcodes = [plate_barcode(folder.name) for folder in folders]
    return [by_barcode[barcode] for barcode in barcodes if barcode in by_barcode]


def _folder(plate: PlateResult, results_dir: Path) -> Path:
    """The folder a plate was read from, for messages (its name may carry Harmony's suffix)."""
    return plate.folder if plate.folder is not None else results_dir / plate.barcode


def _refuse_duplicate_plates(folders: list[Path]) -> None:
    """Two folders of one plate (Harmony's ``Measurement 1`` and ``Measurement 2``, or a copy beside
    its renamed original) would import its wells twice: refused, naming both."""
    seen: dict[str, Path] = {}
    for folder in folders:
        barcode = plate_barcode(folder.name)
        if barcode in seen:
            raise IngestError(f"{seen[barcode]} and {folder}: both hold plate {barcode}; keep the one to import "
                              "in the results folder and move the other out")
        seen[barcode] = folder


def _refuse_unwanted_plates(campaign: Campaign, folders: list[Path], replace: bool,
                            fingerprint_of: Callable[[Path], str | None]) -> None:
    """Refuse, before minutes of reading and segmenting, a plate folder whose barcode this campaign did
    not emit or whose round was cancelled, and (without ``replace``) one imported before from other
    files (fingerprints from the bytes alone; not while a replacement is unsettled, which the full
    path settles first); ``_check_plate`` checks again under the write lock."""
    unsettled = any(campaign.measurements_dir.glob(".*.replacing"))
    with campaign.session() as session:
        for folder in folders:
            barcode = plate_barcode(folder.name)
            row = _importable_row(session, barcode, folder)
            if row.status == "returned" and not replace and row.results_fingerprint and not unsettled:
                fingerprint = fingerprint_of(folder)
                if fingerprint is not None and fingerprint != row.results_fingerprint:
                    raise _imported_from_other_files(folder, barcode)


def _importable_row(session: Session, barcode: str, folder: Path) -> store.Plate:
    """The plate's row; IngestError naming ``folder`` when this campaign did not emit the barcode or
    the plate's round was cancelled."""
    row = session.exec(select(store.Plate).where(store.Plate.barcode == barcode)).first()
    if row is None:
        raise IngestError(f"{folder}: plate barcode {barcode!r} was not emitted by this campaign")
    if row.status == "cancelled":
        raise IngestError(f"{folder}: plate {barcode} belongs to round {row.round_index}, which was cancelled "
                          "(`loop round cancel`); its results are not imported")
    return row


def _imported_from_other_files(folder: Path, barcode: str) -> IngestError:
    return IngestError(f"{folder}: plate {barcode} was already imported from different files; refusing to "
                       "overwrite its measurements (pass --replace to import it again from these files, e.g. the "
                       "complete copy of a plate imported with --allow-missing-wells)")


def _imported_unchanged(campaign: Campaign, folders: list[Path], crop_px: int | None,
                        fingerprint_of: Callable[[Path], str | None] = plate_fingerprint) -> dict[str, PlateQC]:
    """Plate folders holding exactly the files a plate was imported from (same fingerprint, read
    from the bytes alone: :func:`lab_io.results.plate_fingerprint`), with nothing left to add (no
    crops asked for, or cut then): ``{barcode: PlateQC}`` with status ``already imported``. A
    scheduled ingest re-reading a drop folder then does not parse and segment every plate again
    to find it imported. Nothing while a replacement is unsettled (the full path settles it first)."""
    if any(campaign.measurements_dir.glob(".*.replacing")):
        return {}
    with campaign.session() as session:
        returned = {row.barcode: row.results_fingerprint for row in session.exec(
            select(store.Plate).where(store.Plate.status == "returned")).all()}
    unchanged = {}
    for folder in folders:
        barcode = plate_barcode(folder.name)
        if (barcode not in returned
                or (crop_px is not None and not (campaign.measurements_dir / f"{barcode}.crops").exists())):
            continue
        if returned[barcode] and fingerprint_of(folder) == returned[barcode]:
            log.info("plate %s: these results were already imported; nothing to do", barcode)
            unchanged[barcode] = PlateQC(barcode=barcode, status="already imported")
    return unchanged


def ingest_each_plate(campaign: Campaign, results_dir: Path, **options) -> tuple[list[PlateQC], dict[str, str]]:
    """:func:`ingest_results` on each plate folder of ``results_dir`` on its own, for a scheduled
    ingest watching a drop folder: a plate refused (still being copied, damaged, another
    campaign's) is logged and returned by folder name with its reason, and the other plates are
    imported. ``options``: those of :func:`ingest_results`. Returns the imported plates' QC and
    ``{plate folder name: reason}`` of the refused ones."""
    reports: list[PlateQC] = []
    refused: dict[str, str] = {}
    for plate_dir in plate_dirs(results_dir):
        try:
            reports += ingest_results(campaign, plate_dir, **options)
        except (IngestError, ResultsError) as err:
            refused[plate_dir.name] = str(err)
            log.warning("%s: not imported this time: %s", plate_dir, err)
    return reports, refused


MIN_SHARED_FEATURES = 0.9  # a plate sharing fewer of the campaign's features than this is refused


def _check_same_measurements(campaign: Campaign, plans: list, results_dir: Path) -> None:
    """Every new plate measures (nearly) the features the campaign's plates do: the models train on
    the features all plates share, so a plate exported by another pipeline (other compartment
    prefixes, a missing channel) would silently shrink them or leave none. The reference is an
    imported plate, else the first new one. IngestError naming the plate when fewer than
    ``MIN_SHARED_FEATURES`` of either set are shared; a warning when the sets differ a little."""
    import pyarrow.parquet as pq

    replaced = {plan.plate.barcode for plan in plans if plan.replaces}  # not their own reference
    stored = sorted(path for path in campaign.measurements_dir.glob("*.cells.parquet")
                    if path.name.removesuffix(".cells.parquet") not in replaced)
    if stored:
        reference = set(feature_columns(pq.read_schema(stored[0]).names))
        where = f"plate {stored[0].name.removesuffix('.cells.parquet')} (imported)"
    elif plans:
        reference = set(feature_columns(plans[0].plate.cells.columns))
        where = f"plate {plans[0].plate.barcode}"
    else:
        return
    for plan in plans:
        features = set(feature_columns(plan.plate.cells.columns))
        shared = features & reference
        if features == reference:
            continue
        lacks, extra = sorted(reference - features), sorted(features - reference)
        message = (f"plate {plan.plate.barcode} measures {len(features)} features and {where} {len(reference)}; "
                   f"they share {len(shared)}: it lacks {len(lacks)} (e.g. {', '.join(lacks[:3]) or '-'}) and has "
                   f"{len(extra)} others (e.g. {', '.join(extra[:3]) or '-'})")
        if len(shared) < MIN_SHARED_FEATURES * max(len(features), len(reference)):
            raise IngestError(f"{_folder(plan.plate, results_dir)}: {message}; export every plate with the same "
                              "pipeline and channels (the models train on the features all plates share; an "
                              "images-only plate takes its channels' names from --channels or its Harmony index: "
                              f"name them as the other plates' are{_stored_channel_hint(campaign)})")
        log.warning("%s; the models use the %d shared", message, len(shared))


def _stored_channel_hint(campaign: Campaign) -> str:
    """``", e.g. --channels DNA,Tubulin,Actin"`` from a plate already imported with crops, else ``""``."""
    from lab_io.crops import CHANNELS_FILE, CropsError, read_channel_names

    for path in sorted(campaign.measurements_dir.glob(f"*.crops/{CHANNELS_FILE}")):
        try:
            names, _ = read_channel_names(path)
        except (OSError, CropsError):
            continue
        return f", e.g. --channels {','.join(map(str, names))} as {path.parent.name} was imported"
    return ""


@dataclass(frozen=True)
class _Plan:
    """What ingest does with one plate's results (:func:`_check_plate`)."""

    plate: PlateResult
    well_map: pd.DataFrame  # its map, less the wells nothing was delivered for
    undelivered: list[str]
    imported_before: bool  # these very files were imported already
    replaces: bool = False  # imported before from other files, and to be replaced (``replace``)
    earlier_fingerprint: str = ""  # the fingerprint of the results it replaces
    earlier_returned_at: str = ""  # when they were imported: the same files read with other channel names
    # (--replace --channels) have the same fingerprint, and only this tells the two imports apart


def _revisit_plate(campaign: Campaign, plan: _Plan) -> PlateQC:
    """Results imported before: nothing is measured again, but crops asked for now (``--crops-px``)
    and not cut then are added."""
    barcode = plan.plate.barcode
    if plan.plate.crops is None or (campaign.measurements_dir / f"{barcode}.crops").exists():
        log.info("plate %s: these results were already imported; nothing to do", barcode)
        return PlateQC(barcode=barcode, status="already imported")
    out = _write_plate_crops(campaign, plan.plate, plan.well_map)
    log.info("plate %s: already imported; its crops were added to %s", barcode, out)
    return PlateQC(barcode=barcode, status="crops added")


def _profile_plate(campaign: Campaign, plate: PlateResult, well_map: pd.DataFrame,
                   results_dir: Path) -> tuple[pd.DataFrame, EdgeCorrection | None]:
    """Normalised well profiles of one plate and its edge correction (small: the annotated single
    cells are made again when the plate is written, so a multi-plate import never holds two copies
    of every plate's cells); errors name its folder."""
    try:
        return plate_profiles(annotate_cells(plate.cells, well_map), campaign.config.hit_sd,
                              campaign.config.edge_correction, campaign.config.cell_count_hits)
    except (IngestError, ValueError) as err:
        raise IngestError(f"{_folder(plate, results_dir)}: plate {plate.barcode}: {err}") from err


def _check_plate(session: Session, plate: PlateResult, results_dir: Path,
                 allow_missing_wells: bool = False, allow_uneven_fields: bool = False, replace: bool = False,
                 rename_channels: bool = False) -> _Plan:
    """The plate's plan: its map and the mapped wells nothing was delivered for (left out of the map
    when ``allow_missing_wells``; IngestError naming the plate folder otherwise). ``rename_channels``:
    an images-only plate imported before from these files is replaced (read with new channel names)."""
    row = _importable_row(session, plate.barcode, _folder(plate, results_dir))
    replaces = row.status == "returned" and (row.results_fingerprint != plate.fingerprint
                                             or (rename_channels and plate.from_images))
    if replaces and not replace:
        raise _imported_from_other_files(_folder(plate, results_dir), plate.barcode)
    wells = session.exec(select(store.Well).where(store.Well.barcode == plate.barcode)).all()
    well_map = pd.DataFrame(
        [dict(well=w.well, role=w.role, compound_id=w.compound_id, dose_um=w.dose_um) for w in wells]
    )
    if row.status == "returned" and not replaces:
        return _Plan(plate, well_map, [], imported_before=True)
    used = set(well_map.loc[well_map["role"] != WellRole.empty.value, "well"])
    measured = set(plate.cells[META_WELL].unique())
    outside = sorted(measured - used)
    if outside:
        raise IngestError(
            f"{_folder(plate, results_dir)}: plate {plate.barcode} has results for well(s) {', '.join(outside[:10])} "
            "that are not in its plate map (empty or unknown)"
        )
    undelivered = [] if plate.imaged_wells is None else sorted(used - set(plate.imaged_wells))
    if undelivered and not allow_missing_wells:
        raise IngestError(
            f"{_folder(plate, results_dir)}: plate {plate.barcode}: nothing was delivered for {len(undelivered)} "
            f"mapped well(s) ({', '.join(undelivered[:10])}{', ...' if len(undelivered) > 10 else ''}: no image, "
            "no Image.csv row); import the complete results, or pass --allow-missing-wells to import the plate "
            "without them (their compounds stay candidates; if the export leaves out fields without cells, "
            "these wells may be such, e.g. a toxic compound's)"
        )
    short = _wells_short_of_fields(plate, used)
    if short and not allow_uneven_fields:
        raise IngestError(
            f"{_folder(plate, results_dir)}: plate {plate.barcode}: {len(short)} well(s) have fewer fields than the "
            f"plate's others ({_describe_short(short)}): a copy still in progress? Import the complete results, "
            "or pass --allow-uneven-fields to import the fields delivered (if the lab images a varying number of "
            "fields per well, or its export leaves out fields without cells, this is expected)"
        )
    if short:
        log.warning("plate %s: imported with %d well(s) short of fields: %s", plate.barcode, len(short),
                    _describe_short(short))
    if undelivered:
        log.warning("plate %s: imported without %d undelivered well(s): %s", plate.barcode, len(undelivered),
                    ", ".join(undelivered[:10]))
        well_map = well_map[~well_map["well"].isin(undelivered)].reset_index(drop=True)
    return _Plan(plate, well_map, undelivered, imported_before=False, replaces=replaces,
                 earlier_fingerprint=(row.results_fingerprint or "") if replaces else "",
                 earlier_returned_at=str(row.returned_at) if replaces else "")


def _wells_short_of_fields(plate: PlateResult, mapped: set[str]) -> dict[str, tuple[int, int]]:
    """Mapped wells delivered with fewer fields (sites) than the plate's most imaged well:
    ``{well: (fields, most)}``. Counts, not site numbers, are compared: without ``Metadata_Site`` a
    plate-wide Image.csv numbers its images across wells."""
    if not plate.imaged_sites:
        return {}
    counts = pd.Series([well for well, _ in plate.imaged_sites]).value_counts()
    counts = counts[counts.index.isin(mapped)]
    if counts.empty:
        return {}
    most = int(counts.max())
    return {str(well): (int(n), most) for well, n in counts.sort_index().items() if n < most}


def _describe_short(short: dict[str, tuple[int, int]]) -> str:
    shown = ", ".join(f"{well}: {n} of {most}" for well, (n, most) in list(short.items())[:10])
    return shown + (", ..." if len(short) > 10 else "")


def annotate_cells(cells: pd.DataFrame, well_map: pd.DataFrame) -> pd.DataFrame:
    """Attach compound, dose and role from the plate map to single-cell rows."""
    lookup = well_map.set_index("well")
    wells = cells[META_WELL]
    return cells.assign(**{  # the features are shared, not copied (pandas copy-on-write)
        META_COMPOUND: wells.map(lookup["compound_id"]).fillna("").astype(str).to_numpy(),
        META_DOSE: wells.map(lookup["dose_um"]).astype(float).to_numpy(),
        META_ROLE: wells.map(lookup["role"]).astype(str).to_numpy(),
    })


@dataclass(frozen=True)
class EdgeCorrection:
    """A plate's edge effect as removed at ingest (``lab_io.profiles.edge_offsets``): ``offsets``
    per feature in the plate's raw units (edge-ring median minus interior median; 0 for a feature
    within its noise), and ``size_sd``, their root mean square over the features corrected, in the
    interior DMSO wells' standard deviations (robust: 1.4826 MAD)."""

    offsets: pd.Series
    size_sd: float


def well_profiles(cells: pd.DataFrame, hit_sd: float) -> pd.DataFrame:
    """Per-well median profiles normalised to the plate's DMSO wells, with activity and hit calls
    (no edge correction; :func:`plate_profiles` with it).

    Only the features ``lab_io.profiles.feature_select`` keeps on this plate are in the table (all in
    control units): bookkeeping columns (object locations, ids), features constant or missing over
    the plate's wells, and features its DMSO wells all share one value of (no control scale) are
    left out, so every feature column a reader finds is normalised (a feature
    left out is at the control centre, 0). The single-cell values stay in ``<barcode>.cells.parquet``."""
    return plate_profiles(cells, hit_sd, edge_correction=False)[0]


def plate_profiles(cells: pd.DataFrame, hit_sd: float, edge_correction: bool, cell_count_hits: bool = False
                   ) -> tuple[pd.DataFrame, EdgeCorrection | None]:
    """:func:`well_profiles` after removing the plate's edge effect when ``edge_correction``
    (:func:`_edge_correction`): per feature, the offset of its outer-ring wells from its interior
    ones is subtracted from the edge wells' medians before they are normalised to DMSO. With
    ``cell_count_hits`` (off by default: the rule of campaigns created before it; ingest passes the
    campaign's ``cell_count_hits``) hit calls account for each well's cell count (:func:`_cell_count_hits`):
    a profile measured on fewer cells than the plate's typical DMSO well must pass the threshold
    of DMSO wells measured with as few cells, and a treatment that leaves far fewer cells than
    DMSO is a hit by its cell loss. Returns the profiles and the correction (None when off or when
    none is removed; :func:`_edge_correction` logs why); the caller subtracts the same offsets from
    the edge wells' single cells when it stores them."""
    wells = profiling.aggregate_wells(cells)  # carries the per-well constant Metadata_* columns
    edge = None
    if edge_correction:
        edge = _edge_correction(wells, hit_sd)
        if edge is not None:
            wells = profiling.subtract_edge_offsets(wells, edge.offsets)
    profiles = _normalised_profiles(wells, hit_sd)
    if cell_count_hits:
        profiles = _cell_count_hits(profiles, wells, cells, None if edge is None else edge.offsets, hit_sd)
    return profiles, edge


COUNT_DRAWS = 3  # subsets drawn from each DMSO well for a cell count's threshold
COUNT_MAX_CONTROLS = 24  # DMSO wells drawn from for one cell count (a real plate has 5,800 features)
COUNT_MIN_CONTROLS = 4  # DMSO wells with more cells than the count (and finite draws per well) it needs
COUNT_GRID_RATIO = 1.25  # thresholds are measured at counts n_ref / 1.25^k and interpolated in 1/n between
CELL_LOSS_MIN_DMSO = 8  # DMSO wells a plate needs for cell-loss calls
EMPTY_WELL_CELLS = 0.5  # the count a well without a cell is given on the log scale (log 0 is undefined)


def _log_count(n_cells) -> np.ndarray:
    """Natural log of cell counts, a well without a cell at ``EMPTY_WELL_CELLS``."""
    return np.log(np.maximum(np.asarray(n_cells, dtype=np.float64), EMPTY_WELL_CELLS))


def _cell_count_hits(profiles: pd.DataFrame, wells: pd.DataFrame, cells: pd.DataFrame,
                     offsets: pd.Series | None, hit_sd: float) -> pd.DataFrame:
    """Hit calls that account for each well's cell count. A well's median over few cells is
    noisier, so an inactive compound on few cells (an edge well, a dispensing fault) lay further
    from the DMSO centre by chance and passed the plate's threshold more often (7.6 % against
    2.6 % of the inactive wells on the demo's edge): such calls are checked against DMSO wells
    measured with as few cells (:func:`_count_matched_profile_hits`). A compound that kills cells
    acts through the count itself, which the profile does not hold: a treatment well with far
    fewer cells than DMSO (:func:`cell_loss_rule`) is a hit whatever its profile. Activities are
    unchanged; the profiles gain ``Metadata_hit_withdrawn`` (a profile hit the count check took
    back, and no cell loss) and ``Metadata_hit_by_cell_loss`` (a hit by its cell loss alone)."""
    plate = wells[META_PLATE].iloc[0]
    before = profiles["Metadata_is_hit"].to_numpy(dtype=bool)
    profile_hits = _count_matched_profile_hits(profiles, wells, cells, offsets, hit_sd)
    rule = cell_loss_rule(profiles, hit_sd)
    cell_loss = np.zeros(len(profiles), dtype=bool) if rule is None else (
        rule.calls(profiles[META_WELL].tolist(), profiles[profiling.META_N_CELLS].to_numpy())
        & (profiles[META_ROLE] == WellRole.treatment.value).to_numpy())
    is_hit = profile_hits | cell_loss
    log.info("plate %s: %d hit(s) after matching hit calls to cell counts (%d before): %d withdrawn as the noise of "
             "few cells, %d by cell loss alone", plate, int(is_hit.sum()), int(before.sum()),
             int((before & ~is_hit).sum()), int((cell_loss & ~profile_hits).sum()))
    calls = pd.DataFrame({"Metadata_is_hit": is_hit, "Metadata_hit_withdrawn": before & ~is_hit,
                          "Metadata_hit_by_cell_loss": cell_loss & ~profile_hits}, index=profiles.index)
    return pd.concat([profiles.drop(columns="Metadata_is_hit"), calls], axis=1)  # one block: 5,800 columns


@dataclass(frozen=True)
class CellLossRule:
    """A plate's cell-loss call: a treatment well is a hit by cell loss when its log cell count,
    the edge ring's shifted by ``edge_shift`` to the interior's scale, lies below ``cutoff``."""

    cutoff: float  # log cell count
    edge_shift: float  # median log count of the edge ring's measured wells minus the interior's (0: not estimable)

    def calls(self, wells: Sequence[str], n_cells: np.ndarray) -> np.ndarray:
        """Cell-loss calls of ``wells`` with ``n_cells`` cells (0 for a well with no cell)."""
        return _log_count(n_cells) - self.edge_shift * profiling.is_edge_well(list(wells)) < self.cutoff


def cell_loss_rule(profiles: pd.DataFrame, hit_sd: float, say: bool = True) -> CellLossRule | None:
    """The plate's :class:`CellLossRule`: the DMSO wells' median log count less a one-sided
    prediction bound of ``hit_sd`` robust sd. The sd is that of all measured wells (DMSO and
    treatments: a plate's 16 DMSO wells give too rough a MAD, and compounds that change the count
    only widen it), at least the Poisson sd of a count, 1/sqrt(n); the bound is Student's t with
    n_DMSO - 1 degrees of freedom at the normal tail of ``hit_sd``, times sqrt(1 + 1/n_DMSO) for the
    centre's own error (a plain 3-sd cut from 16 DMSO wells called ten times the nominal rate).
    The edge ring's counts are first put on the interior's scale by the median log counts of all
    measured wells on each side (a drying edge loses cells wherever a compound is; the medians
    leave the few compounds that kill cells out). None (no calls, logged) with fewer than
    ``CELL_LOSS_MIN_DMSO`` DMSO wells (logged when ``say``)."""
    from scipy import stats

    role = profiles[META_ROLE].to_numpy()
    dmso = role == WellRole.negative_control.value
    if dmso.sum() < CELL_LOSS_MIN_DMSO:
        if say:
            log.info("plate %s: no cell-loss calls (%d DMSO wells; they need %d)", profiles[META_PLATE].iloc[0],
                     int(dmso.sum()), CELL_LOSS_MIN_DMSO)
        return None
    log_n = _log_count(profiles[profiling.META_N_CELLS].to_numpy())
    edge = profiling.is_edge_well(profiles[META_WELL].tolist())
    measured = dmso | (role == WellRole.treatment.value)
    shift = 0.0
    if min((edge & measured).sum(), (~edge & measured).sum()) >= profiling.EDGE_MIN_WELLS:
        shift = float(np.median(log_n[edge & measured]) - np.median(log_n[~edge & measured]))
    adjusted = log_n - shift * edge
    centre = float(np.median(adjusted[dmso]))
    spread = float(profiling.robust_sd(adjusted[measured][:, None])[0])
    scale = max(spread, 1.0 / np.sqrt(np.exp(centre)))
    n = int(dmso.sum())
    critical = float(stats.t.ppf(stats.norm.cdf(hit_sd), df=n - 1)) * np.sqrt(1.0 + 1.0 / n)
    return CellLossRule(cutoff=centre - critical * scale, edge_shift=shift)


def _count_matched_profile_hits(profiles: pd.DataFrame, wells: pd.DataFrame, cells: pd.DataFrame,
                                offsets: pd.Series | None, hit_sd: float, seed: int = 0) -> np.ndarray:
    """The profile hit calls with each hit on a treatment well with fewer cells than the median
    DMSO well (``n_ref``) checked against the threshold of DMSO wells measured with as few cells.
    Thresholds are measured at the counts ``n_ref / COUNT_GRID_RATIO^k`` that bracket the wells
    checked (``COUNT_DRAWS`` random subsets of that many cells from up to ``COUNT_MAX_CONTROLS``
    DMSO wells with more cells, their medians edge-corrected and normalised as the plate's wells,
    each against the DMSO wells other than its donor as the plate's DMSO activities are measured
    leaving each well out (against its own donor a draw scored low, and inactive wells on half the DMSO count were called hits three times
    as often as those on as many cells); their activities' mean + ``hit_sd`` sd; draws with a
    missing value are left out), made
    to rise as the count falls (the plate's threshold at ``n_ref``), and interpolated in 1/n to
    each well's own count (a median's variance goes as 1/n). Below the lowest count with
    ``COUNT_MIN_CONTROLS`` DMSO wells to draw from, the lowest measured threshold stands. Draws
    are seeded by the plate."""
    plate = str(wells[META_PLATE].iloc[0])
    role = profiles[META_ROLE].to_numpy()
    n_cells = profiles[profiling.META_N_CELLS].to_numpy(dtype=np.float64)
    is_hit = profiles["Metadata_is_hit"].to_numpy(dtype=bool).copy()
    dmso = role == WellRole.negative_control.value
    n_ref = float(np.median(n_cells[dmso]))
    check = is_hit & (n_cells < n_ref) & (role == WellRole.treatment.value)
    if not check.any():
        return is_hit
    features = feature_columns(profiles.columns)
    reference = wells.loc[dmso, [META_PLATE, META_WELL, profiling.META_N_CELLS] + features]
    rng = np.random.default_rng([seed, zlib.crc32(plate.encode())])
    left_out = profiling.LeftOutControls(reference, features)  # draws need COUNT_MIN_CONTROLS >= LEFT_OUT_MIN_CONTROLS wells
    counts, thresholds = [n_ref], [hit_threshold(profiles.loc[dmso, "Metadata_activity"].to_numpy(), hit_sd)]
    while counts[-1] > n_cells[check].min() and counts[-1] > 1:
        n_grid = max(min(int(np.floor(n_ref / COUNT_GRID_RATIO ** len(counts))), int(np.ceil(counts[-1])) - 1), 1)
        threshold = _subsampled_dmso_threshold(reference, left_out, cells, n_grid, offsets, features, hit_sd, rng)
        if threshold is None:
            break
        counts.append(n_grid)
        thresholds.append(max(threshold, thresholds[-1]))  # fewer cells never lower the bar
    inverse = 1.0 / np.asarray(counts, dtype=np.float64)  # rising, as the counts fall
    rows = np.flatnonzero(check)
    bar = np.interp(1.0 / n_cells[rows], inverse, np.asarray(thresholds))  # flat beyond the lowest count measured
    is_hit[rows] = profiles["Metadata_activity"].to_numpy()[rows] > bar
    return is_hit


def _subsampled_dmso_threshold(reference: pd.DataFrame, left_out: profiling.LeftOutControls,
                               cells: pd.DataFrame, n_cells: int, offsets: pd.Series | None, features: list[str],
                               hit_sd: float, rng: np.random.Generator) -> float | None:
    """The hit threshold of the plate's DMSO wells (``reference``, edge-corrected medians) measured
    with ``n_cells`` cells: see :func:`_count_matched_profile_hits`. Each draw is scored against the
    DMSO wells other than its donor (``left_out``, the same wells). None with fewer than
    ``COUNT_MIN_CONTROLS`` donor wells, or as few finite draws per donor."""
    donors = reference.loc[reference[profiling.META_N_CELLS] > n_cells, META_WELL].tolist()
    if len(donors) < COUNT_MIN_CONTROLS:
        return None
    donors = sorted(rng.choice(donors, min(len(donors), COUNT_MAX_CONTROLS), replace=False))
    null = profiling.subsampled_wells(cells, donors, n_cells, COUNT_DRAWS, rng, features)
    if offsets is not None:
        null = profiling.subtract_edge_offsets(null, offsets[offsets.index.isin(features)])
    activity = left_out.activity(null, null[META_WELL].tolist())  # as the plate's DMSO activities: each against the others
    activity = activity[np.isfinite(activity)]  # a feature missing in every drawn cell: no activity
    if len(activity) < COUNT_MIN_CONTROLS * COUNT_DRAWS:
        return None
    return hit_threshold(activity, hit_sd)


EDGE_PASSES = 2  # estimates, each from the wells the previous correction leaves unhit
EDGE_MIN_DMSO = 8  # DMSO wells a plate needs for its edge correction (half of them inside the edge ring)


def _edge_correction(wells: pd.DataFrame, hit_sd: float) -> EdgeCorrection | None:
    """The plate's edge offsets (``lab_io.profiles.edge_offsets``, each kept only beyond its
    Bonferroni bound of standard errors), estimated on DMSO wells and the treatments that are no
    hits: ``EDGE_PASSES`` estimates, each from DMSO and the treatments the previous correction
    leaves below the hit threshold (at first, without a correction, the treatments below each
    side's top share of actives, :func:`_quiet_on_each_side`). Active wells are left out so that a
    plate where half the compounds act does not take a chance imbalance of actives between edge
    and interior for an edge effect. None (no correction, logged) with fewer than
    ``EDGE_MIN_DMSO`` DMSO wells or half as many inside the edge ring (a plate with its DMSO on the
    edge cannot tell an edge effect from what every compound does), without enough reference
    wells, without an offset beyond the noise, or when the offsets would move the edge DMSO wells
    further from the interior ones
    (:func:`_controls_disagree`: what the treatments' medians took for the plate's edge is then a
    compound's effect, e.g. one compound filling the edge ring)."""
    plate = wells[META_PLATE].iloc[0]
    role = wells[META_ROLE].to_numpy()
    dmso, treated = role == WellRole.negative_control.value, role == WellRole.treatment.value
    edge = profiling.is_edge_well(wells[META_WELL].tolist())
    features = profiling.feature_select(wells)  # never bookkeeping: object positions stay as measured
    if dmso.sum() < EDGE_MIN_DMSO or (dmso & ~edge).sum() < EDGE_MIN_DMSO // 2 or not features:
        log.info("plate %s: no edge correction (%s)", plate, "no features" if not features else
                 f"{int(dmso.sum())} DMSO wells, {int((dmso & ~edge).sum())} of them inside the edge ring; it needs "
                 f"{EDGE_MIN_DMSO} and {EDGE_MIN_DMSO // 2}: the interior DMSO wells say what is not an edge effect")
        return None
    unhit = _quiet_on_each_side(_normalised_profiles(wells, hit_sd, say=False), treated, dmso & ~edge, hit_sd)
    offsets = None
    for _ in range(EDGE_PASSES):
        estimate = profiling.edge_offsets(wells, dmso | (treated & unhit), features)
        if estimate is None:
            break
        offsets = estimate
        corrected = profiling.subtract_edge_offsets(wells, offsets)
        hits = _normalised_profiles(corrected, hit_sd, say=False)["Metadata_is_hit"]
        unhit = ~hits.to_numpy(dtype=bool)
    if offsets is None or not offsets.any():
        log.info("plate %s: no edge correction (%s)", plate, "no edge effect beyond its noise" if offsets is not None
                 else f"fewer than {profiling.EDGE_MIN_WELLS} DMSO or inactive wells on the edge ring or inside it")
        return None
    scale = _interior_dmso_scale(wells, dmso & ~edge, features)
    if _controls_disagree(wells, offsets, dmso, edge, features, scale):
        log.warning("plate %s: the edge offsets its treatments give would move its edge DMSO wells away from its "
                    "interior ones: the edge ring's compounds, not its position, differ; not corrected", plate)
        return None
    moved = offsets.to_numpy() != 0
    in_sd = offsets.to_numpy()[moved] / scale[moved]
    size = float(np.sqrt(np.nanmean(in_sd ** 2))) if np.isfinite(in_sd).any() else float("nan")
    log.info("plate %s: edge wells differ from interior ones by %.2f DMSO sd (root mean square over the %d of %d "
             "features beyond their noise); removed", plate, size, int(moved.sum()), len(features))
    return EdgeCorrection(offsets, size)


def _interior_dmso_scale(wells: pd.DataFrame, reference: np.ndarray, features: list[str]) -> np.ndarray:
    """Per feature, the robust sd of the interior DMSO wells (NaN where 0)."""
    scale = profiling.robust_sd(wells.loc[reference, features].to_numpy(np.float64))
    return np.where(scale > 0, scale, np.nan)


def _controls_disagree(wells: pd.DataFrame, offsets: pd.Series, dmso: np.ndarray, edge: np.ndarray,
                       features: list[str], scale: np.ndarray) -> bool:
    """Whether the offsets move the edge DMSO wells' median further from the interior DMSO wells'
    (root mean square over the features they change, in interior DMSO sd). Two edge DMSO wells at
    least; with fewer nothing can be checked (False)."""
    moved = offsets.to_numpy() != 0
    if (dmso & edge).sum() < 2 or not moved.any():
        return False
    values = wells.loc[:, features].to_numpy(np.float64)[:, moved]
    inside = np.nanmedian(values[dmso & ~edge], axis=0)

    def distance(edge_values: np.ndarray) -> float:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a feature without interior spread: NaN, left out
            z = (np.nanmedian(edge_values, axis=0) - inside) / scale[moved]
            return float(np.sqrt(np.nanmean(z ** 2)))

    on_edge = values[dmso & edge]
    return distance(on_edge - offsets.to_numpy()[moved]) > distance(on_edge)


def _quiet_on_each_side(profiles: pd.DataFrame, treated: np.ndarray, interior_dmso: np.ndarray,
                        hit_sd: float) -> np.ndarray:
    """bool per well: not among the most active treatments of its side of the plate (edge ring or
    interior), as many of them as the interior treatments' share above the interior DMSO wells'
    hit threshold (uncorrected profiles: the edge effect inflates every edge well's activity, the
    edge DMSO wells' spread with it, so only the interior says how many act; ranks keep the
    actives on top of each side)."""
    edge = profiling.is_edge_well(profiles[META_WELL].tolist())
    activity = profiles["Metadata_activity"].to_numpy(dtype=np.float64)
    threshold = hit_threshold(activity[interior_dmso], hit_sd)
    inside = treated & ~edge
    active_fraction = float((activity[inside] > threshold).mean()) if inside.any() else 0.0
    quiet = np.ones(len(profiles), dtype=bool)
    for side in (treated & edge, inside):
        n_active = int(round(active_fraction * side.sum()))
        if n_active:
            quiet[np.flatnonzero(side)[np.argsort(-activity[side], kind="stable")[:n_active]]] = False
    return quiet


def hit_threshold(control_activity: np.ndarray, hit_sd: float) -> float:
    """The activity above which a treatment well is a hit: its controls' mean + ``hit_sd`` sd (NaN
    with fewer than 2 controls with an activity: no spread, and no well exceeds it)."""
    ctrl = np.asarray(control_activity, dtype=np.float64)
    ctrl = ctrl[np.isfinite(ctrl)]
    return float(ctrl.mean() + hit_sd * ctrl.std(ddof=1)) if len(ctrl) > 1 else float("nan")


# DMSO wells a plate needs for hit calls: each DMSO well's activity (the activities set the hit
# threshold) is measured against the others, and a robust z needs two of them. Measured against
# all of them (the rule below 8 DMSO wells until session 38) the activities were biased low: on
# simulated plates of 20-60 features, 14-75 % of inactive wells were hits with 4-7 DMSO wells
# (0-3.4 % now), every one with 2. Left out, the median and MAD of a handful of wells are noisy,
# so the threshold is high: below CALIBRATED_MIN_CONTROLS wells the calls are conservative.
LEFT_OUT_MIN_CONTROLS = 3
CALIBRATED_MIN_CONTROLS = 8


def _normalised_profiles(wells: pd.DataFrame, hit_sd: float, say: bool = True) -> pd.DataFrame:
    """Robust z against the plate's DMSO wells, activity and hit calls (``say``: log the features
    left out; the edge correction's trial passes do not)."""
    controls = (wells[META_ROLE] == WellRole.negative_control.value).to_numpy()
    if not controls.any():
        raise IngestError(f"plate {wells[META_PLATE].iloc[0]}: no negative-control (DMSO) wells with cells")
    if controls.sum() < 2:  # one well has no spread: every feature's robust z would be undefined
        raise IngestError(f"plate {wells[META_PLATE].iloc[0]}: only 1 negative-control (DMSO) well with cells; "
                          "the robust z against DMSO needs at least 2")
    features = profiling.feature_select(wells)
    left_out = [c for c in feature_columns(wells.columns) if c not in set(features)]
    normalized = profiling.normalize_to_controls(wells.drop(columns=left_out), controls, features=features)
    unscaled = profiling.unscaled_features(normalized, features)  # the DMSO wells share one value
    if unscaled:
        if say:
            log.info("plate %s: %d feature(s) left out, its DMSO wells do not vary in them (e.g. %s)",
                     wells[META_PLATE].iloc[0], len(unscaled), ", ".join(unscaled[:3]))
        normalized = normalized.drop(columns=unscaled)
        features = [f for f in features if f not in unscaled]
    activity = profiling.phenotypic_activity(normalized, features)
    threshold = float("nan")  # no well exceeds it
    if controls.sum() >= LEFT_OUT_MIN_CONTROLS:  # a DMSO well against the others, as a treatment is against all
        activity[controls] = profiling.left_out_control_activity(wells, controls, features)
        threshold = hit_threshold(activity[controls], hit_sd)
    elif say:
        log.warning("plate %s: no hit calls: %d DMSO wells with cells; a hit threshold needs at least %d (each "
                    "DMSO well is scored against the others)", wells[META_PLATE].iloc[0], int(controls.sum()),
                    LEFT_OUT_MIN_CONTROLS)
    if say and LEFT_OUT_MIN_CONTROLS <= controls.sum() < CALIBRATED_MIN_CONTROLS:
        log.warning("plate %s: %d DMSO wells with cells: each is scored against so few others that the hit "
                    "threshold is high, and only strong phenotypes are called hits (%d or more DMSO wells give "
                    "calls near the nominal rate)", wells[META_PLATE].iloc[0], int(controls.sum()),
                    CALIBRATED_MIN_CONTROLS)
    is_hit = (activity > threshold) & (normalized[META_ROLE] == WellRole.treatment.value).to_numpy()
    return pd.concat([normalized, pd.DataFrame({"Metadata_activity": activity, "Metadata_is_hit": is_hit},
                                               index=normalized.index)], axis=1)


REPLACED_SUFFIX = ".replaced"  # measurements/.<file>.replaced: a plate's earlier file while --replace runs


def _replace_plate(campaign: Campaign, plan: _Plan, wells: pd.DataFrame, edge: EdgeCorrection | None) -> PlateQC:
    """Import a plate again from other files, crash-safe by a journal: ``.<barcode>.replacing``
    records the earlier results' fingerprint, then the earlier Parquet files and crops are moved
    aside (``.<name>.replaced``), the new ones recorded with the earlier measurements deleted in the
    same transaction, and the set-aside files removed. Whatever stops it, the store decides: the
    next ingest (:func:`recover_replacements`), or this one on an exception, puts the earlier files
    back when the store still holds the earlier results, and removes them when it holds the new."""
    barcode = plan.plate.barcode
    journal = campaign.measurements_dir / f".{barcode}.replacing"
    earlier = _plate_files(campaign, barcode)
    tmp = journal.with_name(journal.name + ".tmp")  # the journal is whole or absent
    tmp.write_text(json.dumps({"fingerprint": plan.earlier_fingerprint, "returned_at": plan.earlier_returned_at,
                               "files": [p.name for p in earlier]}))
    os.replace(tmp, journal)
    try:
        for path in earlier:
            moved = path.with_name(f".{path.name}{REPLACED_SUFFIX}")
            _remove([moved])
            os.replace(path, moved)
        qc = _record_plate(campaign, plan, wells, edge, delete_earlier=True)
    finally:  # after a success too: the set-aside files go
        recover_replacements(campaign, only=barcode)
    log.warning("plate %s: imported again from other files; its earlier measurements are replaced (models "
                "trained before keep theirs; `loop train` trains on the new ones)", barcode)
    return qc


def _plate_file_names(barcode: str) -> tuple[str, ...]:
    return f"{barcode}.cells.parquet", f"{barcode}.wells.parquet", f"{barcode}.crops"


def _plate_files(campaign: Campaign, barcode: str) -> list[Path]:
    """The plate's Parquet files and crops folder that exist."""
    return [campaign.measurements_dir / name for name in _plate_file_names(barcode)
            if (campaign.measurements_dir / name).exists()]


def recover_replacements(campaign: Campaign, only: str | None = None) -> None:
    """Finish replacements (``--replace``) a stop left half done, as the store says: it still holds the
    journal's earlier results -> the earlier files are put back (new ones written meanwhile go);
    it holds others -> the set-aside earlier files are removed. Run under the write lock."""
    for journal in sorted(campaign.measurements_dir.glob(".*.replacing")):
        barcode = journal.name[1:-len(".replacing")]
        if only is not None and barcode != only:
            continue
        record = json.loads(journal.read_text())
        with campaign.session() as session:
            row = session.exec(select(store.Plate).where(store.Plate.barcode == barcode)).first()
        earlier_kept = (row is not None and row.results_fingerprint == record["fingerprint"]
                        # a journal written before it recorded the import time decides by fingerprint
                        and str(row.returned_at) == record.get("returned_at", str(row.returned_at)))
        for name in _plate_file_names(barcode):
            path = campaign.measurements_dir / name
            moved = path.with_name(f".{name}{REPLACED_SUFFIX}")
            if not earlier_kept:
                _remove([moved])
            elif moved.exists():  # set aside: back it comes, over whatever was written since
                _remove([path])
                os.replace(moved, path)
            elif name not in record["files"]:  # written by the replacement only
                _remove([path])
        if earlier_kept:
            log.warning("plate %s: a replacement did not finish; its earlier files are back", barcode)
        journal.unlink()


def _record_plate(campaign: Campaign, plan: _Plan, wells: pd.DataFrame, edge: EdgeCorrection | None,
                  delete_earlier: bool = False) -> PlateQC:
    """Write one checked plate: its single cells (edge wells' cells less the plate's edge offsets,
    as their well profiles are) and well profiles (Parquet), crops if cut, and its measurements
    and status in one transaction; files written are removed if anything fails."""
    plate, well_map = plan.plate, plan.well_map
    cells = annotate_cells(plate.cells, well_map)
    cells_path = campaign.measurements_dir / f"{plate.barcode}.cells.parquet"
    profiles_path = campaign.measurements_dir / f"{plate.barcode}.wells.parquet"
    n_cells = cells.groupby(META_WELL).size()
    measured = wells.set_index(META_WELL)
    mapped = well_map[well_map["role"] != WellRole.empty.value]
    emptied = _emptied_by_cell_loss(campaign, wells, mapped, n_cells)  # before any file is written
    edit = None if edge is None else (lambda chunk: profiling.subtract_edge_offsets(chunk, edge.offsets))
    written = _write_parquets({cells_path: cells, profiles_path: wells}, edits={cells_path: edit})
    try:
        if plate.crops is not None:
            written.append(_write_plate_crops(campaign, plate, well_map))
        with campaign.session() as session:
            # Every mapped well gets a row: a well the lab imaged but where no cell survived
            # (e.g. a toxic compound) is a measurement too, with n_cells = 0 and no profile.
            rows = [
                dict(
                    barcode=plate.barcode,
                    well=w["well"],
                    role=w["role"],
                    compound_id=w["compound_id"] or None,
                    dose_um=float(w["dose_um"]),
                    n_cells=int(n_cells.get(w["well"], 0)),
                    activity=float(measured.at[w["well"], "Metadata_activity"]) if w["well"] in measured.index
                    else None,
                    is_hit=bool(measured.at[w["well"], "Metadata_is_hit"]) if w["well"] in measured.index
                    else w["well"] in emptied,
                    cells_path=campaign.relative(cells_path),
                    profiles_path=campaign.relative(profiles_path),
                )
                for w in mapped.to_dict("records")
            ]
            if delete_earlier:  # a replaced plate: its earlier measurements go in the same transaction
                for earlier in session.exec(select(store.Measurement)
                                            .where(store.Measurement.barcode == plate.barcode)).all():
                    session.delete(earlier)
                session.flush()
            store.bulk_insert(session, store.Measurement, rows)
            db_plate = session.exec(select(store.Plate).where(store.Plate.barcode == plate.barcode)).one()
            db_plate.status = "returned"
            db_plate.results_fingerprint = plate.fingerprint
            db_plate.returned_at = store.utcnow()
            session.add(db_plate)
            session.commit()
    except BaseException:  # Ctrl-C and SIGTERM (loop.cli) too: no files without their measurements
        # a signal can land while the commit returns (after SQLite stored it): the store decides
        if not _plate_recorded(campaign, plate):
            _remove(written)
        raise
    empty = sorted(set(mapped["well"]) - set(n_cells.index))
    return _qc(plate.barcode, wells, n_cells, plan.undelivered, empty, edge, campaign.config.hit_sd, emptied)


def _emptied_by_cell_loss(campaign: Campaign, wells: pd.DataFrame, mapped: pd.DataFrame,
                          n_cells: pd.Series) -> set[str]:
    """Treatment wells imaged without a single cell that are hits by cell loss (with
    ``cell_count_hits``; :func:`cell_loss_rule` of the plate's profiled wells): a compound that
    killed every cell acted at least as much as one that left a few."""
    if not campaign.config.cell_count_hits:
        return set()
    empty = mapped[(mapped["role"] == WellRole.treatment.value) & ~mapped["well"].isin(n_cells.index)]["well"]
    rule = cell_loss_rule(wells, campaign.config.hit_sd, say=False) if len(empty) else None  # logged at profiling
    if rule is None:
        return set()
    return set(empty[rule.calls(empty.tolist(), np.zeros(len(empty)))])


def _plate_recorded(campaign: Campaign, plate: PlateResult) -> bool:
    """True when the store holds this plate as returned from these very files."""
    try:
        with campaign.session() as session:
            row = session.exec(select(store.Plate).where(store.Plate.barcode == plate.barcode)).first()
            return row is not None and row.status == "returned" and row.results_fingerprint == plate.fingerprint
    except Exception:  # the store cannot be read: the files go, as before the commit
        return False


def _remove(paths: list[Path]) -> None:
    """Undo this import's files (a crops folder too) when a later step fails."""
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _write_plate_crops(campaign: Campaign, plate: PlateResult, well_map: pd.DataFrame) -> Path:
    """``measurements/<barcode>.crops/``: the plate's crops with compound, dose and SMILES from its map."""
    lookup = well_map.set_index("well")
    meta = plate.crops.metadata
    roles = meta["well"].map(lookup["role"]).to_numpy()
    control = roles == WellRole.negative_control.value
    compound = np.where(control, CONTROL_COMPOUND_ID, meta["well"].map(lookup["compound_id"]).fillna("").to_numpy())
    dose = np.where(control, 0.0, meta["well"].map(lookup["dose_um"]).astype(float).to_numpy())
    with campaign.session() as session:
        ids = sorted(set(compound[~control]))
        smiles = dict(session.exec(select(store.Compound.compound_id, store.Compound.smiles)
                                   .where(store.Compound.compound_id.in_(ids))).all()) if ids else {}
    meta = meta.assign(compound=compound, concentration_um=dose, role=roles,
                       smiles=[smiles.get(c, "") for c in compound])
    out = campaign.measurements_dir / f"{plate.barcode}.crops"
    tmp = campaign.measurements_dir / f".{plate.barcode}.crops.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_crops(CropSet(plate.crops.images, meta, plate.crops.channel_names, plate.crops.channels_named), tmp)
        shutil.rmtree(out, ignore_errors=True)  # left by a crashed import: this plate is not imported yet
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; left only by a failure
    return out


def _write_parquets(frames: dict[Path, pd.DataFrame], edits: dict | None = None) -> list[Path]:
    """Each frame to its path, whole or not at all; ``edits[path]``, when given, changes each chunk
    as it is written (:func:`write_parquet_in_chunks`)."""
    written = []
    try:
        for path, frame in frames.items():
            tmp = path.with_name(path.name + ".tmp")
            try:
                write_parquet_in_chunks(frame, tmp, edit=(edits or {}).get(path))
            except BaseException as exc:
                tmp.unlink(missing_ok=True)
                if isinstance(exc, OSError):  # a full disk: pyarrow's message names no file
                    raise naming_path(exc, path) from exc
                raise
            os.replace(tmp, path)
            written.append(path)
    except BaseException:  # Ctrl-C and SIGTERM (loop.cli) too: no files without their measurements
        _remove(written)
        raise
    return written


PARQUET_CHUNK_ROWS = 50_000  # rows converted to Arrow at a time when a plate's cells are written


def write_parquet_in_chunks(frame: pd.DataFrame, path: Path, chunk_rows: int = PARQUET_CHUNK_ROWS,
                            edit: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> None:
    """``frame.to_parquet(path, index=False)``, converting ``chunk_rows`` rows to Arrow at a time (one
    row group each), so a plate's cells are not held a second time as an Arrow table. ``edit``
    (same columns and dtypes out as in) is applied to each chunk before it is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def chunk(start: int) -> pd.DataFrame:
        part = frame.iloc[start:start + chunk_rows]
        return part if edit is None else edit(part)

    first = pa.Table.from_pandas(chunk(0), preserve_index=False)
    with pq.ParquetWriter(path, first.schema) as writer:
        writer.write_table(first)
        for start in range(chunk_rows, len(frame), chunk_rows):
            writer.write_table(pa.Table.from_pandas(chunk(start), schema=first.schema, preserve_index=False))


def _qc(barcode: str, wells: pd.DataFrame, n_cells: pd.Series, undelivered: list[str], empty: list[str],
        edge: EdgeCorrection | None = None, hit_sd: float = float("nan"), emptied: set[str] = frozenset()) -> PlateQC:
    controls = wells[META_ROLE] == WellRole.negative_control.value
    ctrl = wells.loc[controls, "Metadata_activity"]
    return PlateQC(
        barcode=barcode,
        status="imported",
        n_wells=len(wells),
        n_cells=int(n_cells.sum()),
        cells_per_well_median=float(n_cells.median()),
        cells_per_well_min=int(n_cells.min()),
        control_activity_mean=float(ctrl.mean()),
        control_activity_sd=float(ctrl.std(ddof=1)) if len(ctrl) > 1 else float("nan"),
        n_hits=int(wells["Metadata_is_hit"].sum()) + len(emptied),
        n_hits_withdrawn=int(wells.get("Metadata_hit_withdrawn", pd.Series(dtype=bool)).sum()),
        n_hits_cell_loss=int(wells.get("Metadata_hit_by_cell_loss", pd.Series(dtype=bool)).sum()) + len(emptied),
        missing_wells=list(undelivered),
        empty_wells=empty,
        edge_offset_sd=float("nan") if edge is None else edge.size_sd,
        hit_threshold=hit_threshold(ctrl.to_numpy(), hit_sd),
    )
