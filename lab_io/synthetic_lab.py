"""A seeded simulated Cell Painting lab: plate maps in, Phenix images + CellProfiler tables out.

``SyntheticLab(ground_truth, seed, config).run_plates(plates_dir, out_dir)`` reads a plates
folder (``barcode_platemap.csv``, ``<plate_map_name>.txt``, ``compound_metadata.tsv``) with
:func:`lab_io.platemap.read_plate_files`, renders every non-empty well as ``fields_per_well`` fields of
``image_size_px`` pixels in the channels of :data:`lab_io.schema.CHANNELS` (DNA, Tubulin,
Actin), measures the rendered images with :func:`lab_io.morphology.measure_field` (so the
tables are a real measurement of the images, segmentation errors included) and writes the
results-folder layout of :mod:`lab_io.schema`, one plate at a time and atomically.
``measure_plates`` runs the same render + measure pipeline in memory for backtests.

Biology of one field (all randomness from ``np.random.default_rng([seed, crc32(barcode), well,
site])``, so a run is reproducible and independent of the order plates are processed):

* Cell count ~ Poisson(``cells_per_field``) x edge factor x survival; centres are placed with a
  minimum spacing; cells tile space as a power diagram (each pixel belongs to the cell with the
  smallest normalised distance), with irregular outlines.
* Each cell: elliptical nucleus with chromatin texture, tubulin as radial fibres over a diffuse
  perinuclear cytoplasm, actin as a cortical ring over a weak diffuse signal. Cell-to-cell
  heterogeneity (log-normal size and intensity), a G2 subpopulation (``g2_fraction``: nuclei 1.7x
  area, 2x DNA content) and, under treatment, responders (``responder_fraction``) versus
  non-responders.
* Compound effect ``e = GroundTruth`` Hill response at the well's dose (0 for DMSO), per cell
  ``e_i = e * LogNormal(0, 0.2)`` for responders, 0 otherwise, applied to the class's parameters:
  ``nuclear_enlargement`` nucleus area x(1 + 1.3 e), DNA content x(1 + e), more G2 cells;
  ``cytoskeletal_disruption`` tubulin fibres lost (x(1 - e)), tubulin brighter x(1 + 0.6 e) and
  punctate, cells rounder and smaller; ``actin_disruption`` cortical ring lost, less F-actin
  (x(1 - 0.35 e)) with bright aggregates, cells shrink; ``toxicity`` fewer cells (survival 1 - 0.85 e) and a fraction e of
  the survivors apoptotic (small, condensed, bright nuclei, shrunken cells).
* Positive-control wells (role ``positive_control``) show ``positive_control_class`` at
  ``positive_control_effect`` whatever their compound.
* Plate (batch) effects: per plate and channel a gain LogNormal(0, ``plate_effect_sd``) and an
  offset, seeded by barcode. Edge effects: outer-ring wells have ``1 - edge_effect`` x the cells
  and ``1 - edge_effect / 2`` x the intensity.
* Camera: background, shot noise and read noise, clipped to uint16.

The ground truth is reachable only as ``lab.ground_truth``; nothing of it is written to disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage as ndi

from lab_io.ground_truth import PHENOTYPE_CLASSES, GroundTruth
from lab_io.morphology import measure_field
from lab_io.phenix import harmony_index_xml, phenix_name
from lab_io.platemap import read_plate_files
from lab_io.results import merge_compartments
from lab_io.schema import (
    CHANNELS,
    CONTROL_COMPOUND_ID,
    META_PLATE,
    META_SITE,
    META_WELL,
    N_COLS,
    N_ROWS,
    WellRole,
    normalize_well,
    parse_well,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticLabConfig:
    """Everything that shapes the simulated images (saved next to each run by callers)."""

    image_size_px: int = 160
    fields_per_well: int = 1
    cells_per_field: float = 26.0
    channels: tuple[str, ...] = CHANNELS
    nucleus_radius_px: float = 6.5
    cell_radius_px: float = 15.0
    g2_fraction: float = 0.2
    responder_fraction: float = 0.85
    edge_effect: float = 0.25
    plate_effect_sd: float = 0.08
    positive_control_class: str = "cytoskeletal_disruption"
    positive_control_effect: float = 0.9
    write_images: bool = True

    def __post_init__(self):
        if self.image_size_px < 48:
            raise ValueError(f"image_size_px must be >= 48, got {self.image_size_px}")
        if self.fields_per_well < 1:
            raise ValueError(f"fields_per_well must be >= 1, got {self.fields_per_well}")
        if tuple(self.channels) != CHANNELS:
            raise ValueError(f"the synthetic lab renders channels {CHANNELS}, got {self.channels}")
        if self.positive_control_class not in PHENOTYPE_CLASSES:
            raise ValueError(f"positive_control_class must be one of {PHENOTYPE_CLASSES}")
        for name in ("g2_fraction", "responder_fraction", "edge_effect", "positive_control_effect"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------
# plate folder (the files lab_io.platemap writes)
# ----------------------------------------------------------------------------------------------

#: The synthetic lab's CellProfiler pipeline: cells by plain Otsu on the cytoplasm image (its
#: rendered cells have a uniform body and a blurred edge, which plain Otsu cuts at the edge), grown
#: at most 20 px from the nucleus. Real image-only plates are measured with the log-Otsu default.
PIPELINE = dict(cell_threshold="otsu", max_cell_expansion_px=20)
WELL_COLUMNS = ("barcode", "plate_map_name", "well", "compound_id", "smiles", "dose_um", "role")
_NO_COMPOUND = ("", CONTROL_COMPOUND_ID)


def _smiles_lookup(compounds: pd.DataFrame | None) -> dict[str, str]:
    if compounds is None:
        return {}
    key = "compound_id" if "compound_id" in compounds.columns else "broad_sample"
    if key not in compounds.columns or "smiles" not in compounds.columns:
        raise ValueError(f"compounds table needs compound_id (or broad_sample) and smiles columns, "
                         f"has {list(compounds.columns)}")
    return dict(zip(compounds[key].astype(str).str.strip(), compounds["smiles"].astype(str).str.strip()))


def wells_from_layouts(layouts, compounds: pd.DataFrame | None = None) -> pd.DataFrame:
    """Plate layouts -> one row per well: ``barcode, plate_map_name, well, compound_id, smiles, dose_um, role``.

    ``layouts``: a sequence of :class:`lab_io.platemap.PlateLayout` (``barcode``,
    ``plate_map_name``, ``wells`` with ``well, role, compound_id, dose_um``), or one DataFrame of
    wells with ``barcode`` (or ``Metadata_Plate``), ``well``, ``compound_id``, ``dose_um``,
    ``role`` and optionally ``smiles``. SMILES come from ``compounds`` (``compound_id`` or
    ``broad_sample`` -> ``smiles``). Errors name the plate and well.
    """
    if isinstance(layouts, pd.DataFrame):
        frames = [layouts.rename(columns={META_PLATE: "barcode", "well_position": "well", "broad_sample": "compound_id"})]
    else:
        frames = [layout.wells.assign(barcode=layout.barcode, plate_map_name=layout.plate_map_name) for layout in layouts]
    if not frames:
        return pd.DataFrame(columns=list(WELL_COLUMNS))
    wells = pd.concat(frames, ignore_index=True)
    missing = [c for c in ("barcode", "well", "compound_id", "dose_um", "role") if c not in wells.columns]
    if missing:
        raise ValueError(f"layouts are missing columns {missing}")
    lookup = _smiles_lookup(compounds)
    rows = []
    for rec in wells.to_dict("records"):
        where = f"plate {rec['barcode']}, well {rec['well']}"
        try:
            well = normalize_well(rec["well"])
            role = WellRole(rec["role"]).value
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        compound = "" if pd.isna(rec["compound_id"]) else str(rec["compound_id"]).strip()
        dose = float(rec["dose_um"]) if not pd.isna(rec["dose_um"]) else np.nan
        smiles = rec.get("smiles") if isinstance(rec.get("smiles"), str) and rec.get("smiles") else lookup.get(compound, "")
        if role == WellRole.treatment.value:
            if compound in _NO_COMPOUND:
                raise ValueError(f"{where}: treatment well has no compound")
            if not smiles:
                raise ValueError(f"{where}: compound {compound!r} has no SMILES in the compounds table")
            if not np.isfinite(dose) or dose < 0:
                raise ValueError(f"{where}: treatment well has no valid dose_um ({rec['dose_um']!r})")
        dose = 0.0 if not np.isfinite(dose) else dose
        rows.append((str(rec["barcode"]), str(rec.get("plate_map_name") or rec["barcode"]), well, compound,
                     smiles or "", dose, role))
    table = pd.DataFrame(rows, columns=list(WELL_COLUMNS))
    dup = table.duplicated(["barcode", "well"])
    if dup.any():
        first = table[dup].iloc[0]
        raise ValueError(f"plate {first['barcode']} lists well {first['well']} twice")
    return table


# ----------------------------------------------------------------------------------------------
# the lab
# ----------------------------------------------------------------------------------------------

def _stable_int(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


@dataclass(frozen=True)
class _Treatment:
    phenotype_class: str  # "inactive" / one of PHENOTYPE_CLASSES
    effect: float  # Hill response fraction, 0..1


class SyntheticLab:
    """The simulated lab. ``ground_truth`` is its explicit (and only) door to the hidden truth."""

    def __init__(self, ground_truth: GroundTruth, seed: int = 0, config: SyntheticLabConfig | None = None):
        self.ground_truth = ground_truth
        self.seed = int(seed)
        self.config = config or SyntheticLabConfig()

    # -- public API -------------------------------------------------------------------------

    def run_plates(self, plates_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                   barcodes: Sequence[str] | None = None) -> list[str]:
        """Image and measure every plate of a plates folder (``barcodes``: only these of them);
        returns the barcodes written.

        Writes ``<out_dir>/<barcode>/Images/*.tiff`` (when ``config.write_images``) and
        ``<out_dir>/<barcode>/analysis/<barcode>-<well>-<site>/{Image,Nuclei,Cells,Cytoplasm}.csv``.
        Each plate is built in a temporary folder and renamed into place; an existing plate folder
        is left untouched (FileExistsError) unless ``overwrite``.
        """
        layouts, compounds = read_plate_files(plates_dir)
        wells = wells_from_layouts(layouts, compounds)
        out_dir = Path(out_dir)
        in_folder = list(dict.fromkeys(wells["barcode"]))
        unknown = sorted(set(barcodes or ()) - set(in_folder))
        if unknown:
            raise ValueError(f"{plates_dir}: no plate(s) {unknown} in this plates folder (it holds {in_folder})")
        barcodes = in_folder if barcodes is None else [b for b in in_folder if b in set(barcodes)]
        out_dir.mkdir(parents=True, exist_ok=True)
        for barcode in barcodes:
            if (out_dir / barcode).exists() and not overwrite:
                raise FileExistsError(f"{out_dir / barcode}: plate {barcode} already has results; not overwriting")
        for barcode in barcodes:
            t0 = time.perf_counter()
            self._write_plate(barcode, wells[wells["barcode"] == barcode], out_dir)
            logger.info("synthetic lab: plate %s written in %.1f s", barcode, time.perf_counter() - t0)
        return barcodes

    def measure_plates(self, layouts, compounds: pd.DataFrame | None = None) -> pd.DataFrame:
        """Render + measure in memory (no files) -> single-cell table as :func:`lab_io.results.read_results` gives.

        ``layouts``/``compounds``: see :func:`wells_from_layouts`.
        """
        wells = wells_from_layouts(layouts, compounds)
        frames = []
        for barcode in dict.fromkeys(wells["barcode"]):
            plate_wells = wells[wells["barcode"] == barcode]
            for _, well in self._active_wells(plate_wells).iterrows():
                for site in range(1, self.config.fields_per_well + 1):
                    image = self.render_field(barcode, well, site)
                    frames.append(self._measure(image, barcode, well["well"], site))
        if not frames:
            return pd.DataFrame(columns=[META_PLATE, META_WELL, META_SITE])
        return pd.concat(frames, ignore_index=True)

    def render_field(self, barcode: str, well: pd.Series | dict, site: int = 1) -> np.ndarray:
        """One field ``C x H x W`` uint16 for a well record (``well``, ``smiles``, ``dose_um``, ``role``)."""
        treatment = self._treatment(well)
        return self.render_condition(barcode, well["well"], site, treatment.phenotype_class, treatment.effect)

    def render_condition(self, barcode: str, well: str, site: int, phenotype_class: str, effect: float) -> np.ndarray:
        """Field ``C x H x W`` uint16 of a given phenotype class at effect ``0..1`` (``"inactive"``: none).

        Same seeding as :meth:`render_field` (seed, barcode, well, site): the plate's batch
        effect and the well's edge effect apply.
        """
        if phenotype_class != "inactive" and phenotype_class not in PHENOTYPE_CLASSES:
            raise ValueError(f"unknown phenotype class {phenotype_class!r}; expected one of {PHENOTYPE_CLASSES}")
        if not 0.0 <= effect <= 1.0:
            raise ValueError(f"effect must be in [0, 1], got {effect}")
        well = normalize_well(well)
        rng = np.random.default_rng([self.seed, _stable_int(barcode), _stable_int(well), int(site)])
        row, col = parse_well(well)
        edge = row in (0, N_ROWS - 1) or col in (0, N_COLS - 1)
        gain, offset = self._plate_effect(barcode)
        return _render(rng, self.config, _Treatment(phenotype_class, float(effect)), edge, gain, offset)

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _active_wells(plate_wells: pd.DataFrame) -> pd.DataFrame:
        """Non-empty wells in canonical order (A01, A02, ..., P24), as read_results returns them."""
        return plate_wells[plate_wells["role"] != WellRole.empty.value].sort_values("well", kind="stable")

    def _treatment(self, well) -> _Treatment:
        role = well["role"]
        if role == WellRole.positive_control.value:
            return _Treatment(self.config.positive_control_class, self.config.positive_control_effect)
        if role != WellRole.treatment.value or not well["smiles"] or float(well["dose_um"]) <= 0:
            return _Treatment("inactive", 0.0)
        truth = self.ground_truth.for_smiles([well["smiles"]]).iloc[0]
        effect = float(self.ground_truth.response([well["smiles"]], float(well["dose_um"]))[0])
        return _Treatment(str(truth["phenotype_class"]), effect)

    def _plate_effect(self, barcode: str) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, _stable_int(barcode), 0xBA7C4])
        gain = np.exp(rng.normal(0.0, self.config.plate_effect_sd, size=len(CHANNELS)))
        offset = rng.normal(0.0, 30.0, size=len(CHANNELS))
        return gain, offset

    def _measure(self, image: np.ndarray, barcode: str, well: str, site: int,
                 file_names: dict[str, str] | None = None) -> pd.DataFrame:
        tables = measure_field(image, CHANNELS, **PIPELINE)
        image_row = _image_row(barcode, well, site, tables, file_names)
        return merge_compartments(image_row, tables["Nuclei"], tables["Cells"], tables["Cytoplasm"])

    def _write_plate(self, barcode: str, plate_wells: pd.DataFrame, out_dir: Path) -> None:
        tmp = out_dir / f".tmp-{barcode}-{uuid.uuid4().hex[:8]}"
        try:
            images_dir = tmp / "Images"
            tmp.mkdir()
            if self.config.write_images:
                images_dir.mkdir()
            image_number, indexed = 0, []  # images numbered through the plate, as CellProfiler does
            for _, well in self._active_wells(plate_wells).iterrows():
                row, col = parse_well(well["well"])
                for site in range(1, self.config.fields_per_well + 1):
                    image = self.render_field(barcode, well, site)
                    image_number += 1
                    names = {}
                    if self.config.write_images:
                        for c, ch in enumerate(CHANNELS):
                            names[ch] = phenix_name(row + 1, col + 1, site, 1, c + 1)
                            tifffile.imwrite(images_dir / names[ch], image[c])
                            indexed.append((names[ch], row + 1, col + 1, site, 1, c + 1, ch))
                    tables = measure_field(image, CHANNELS, image_number=image_number, **PIPELINE)
                    site_dir = tmp / "analysis" / f"{barcode}-{well['well']}-{site}"
                    site_dir.mkdir(parents=True)
                    _image_row(barcode, well["well"], site, tables, names, image_number).to_csv(
                        site_dir / "Image.csv", index=False)
                    for comp, table in tables.items():
                        table.to_csv(site_dir / f"{comp}.csv", index=False)
            if self.config.write_images:  # Harmony's index: which stain each channel number is
                (images_dir / "Index.idx.xml").write_text(harmony_index_xml(barcode, indexed))
            final = out_dir / barcode
            if final.exists():  # overwrite requested: swap, then delete the old folder
                old = out_dir / f".old-{barcode}-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
                try:
                    os.replace(tmp, final)
                except OSError:
                    os.replace(old, final)  # put the previous results back
                    raise
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def _image_row(barcode: str, well: str, site: int, tables: dict[str, pd.DataFrame],
               file_names: dict[str, str] | None, image_number: int = 1) -> pd.DataFrame:
    row = {"ImageNumber": image_number, META_PLATE: barcode, META_WELL: well, META_SITE: int(site),
           "Count_Nuclei": len(tables["Nuclei"]), "Count_Cells": len(tables["Cells"]),
           "Count_Cytoplasm": len(tables["Cytoplasm"])}
    for ch in CHANNELS:
        row[f"FileName_{ch}"] = (file_names or {}).get(ch, "")
    return pd.DataFrame([row])


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------

def _place_centres(rng: np.random.Generator, n: int, size: int, min_dist: float) -> np.ndarray:
    """Up to n points in [0, size)^2 at least min_dist apart (rejection sampling)."""
    pts = np.empty((0, 2))
    tries = 0
    while len(pts) < n and tries < 40 * n + 40:
        cand = rng.uniform(-0.05 * size, 1.05 * size, size=2)
        tries += 1
        if len(pts) == 0 or np.min(np.hypot(*(pts - cand).T)) >= min_dist:
            pts = np.vstack([pts, cand])
    return pts


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    noise = ndi.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return noise / max(float(noise.std()), 1e-9)


def _render(rng: np.random.Generator, cfg: SyntheticLabConfig, treatment: _Treatment, edge: bool,
            gain: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Render one field, C x H x W uint16 (see the module docstring for the biology)."""
    size = cfg.image_size_px
    cls, effect = treatment.phenotype_class, treatment.effect

    # -- how many cells, where -----------------------------------------------------------
    density = cfg.cells_per_field * (1.0 - cfg.edge_effect * edge)
    if cls == "toxicity":
        density *= 1.0 - 0.85 * effect
    n_cells = int(rng.poisson(density))
    centres = _place_centres(rng, n_cells, size, min_dist=1.9 * cfg.nucleus_radius_px * 1.25)
    n = len(centres)

    # -- per-cell parameters -------------------------------------------------------------
    responder = rng.random(n) < (cfg.responder_fraction if effect > 0 else 0.0)
    e = np.where(responder, effect * np.exp(rng.normal(0.0, 0.2, n)), 0.0).clip(0.0, 1.2)
    g2_p = cfg.g2_fraction + (0.35 * e if cls == "nuclear_enlargement" else 0.0)
    g2 = rng.random(n) < np.clip(g2_p, 0, 1)
    apoptotic = rng.random(n) < (0.8 * e if cls == "toxicity" else 0.0)

    size_jitter = np.exp(rng.normal(0.0, 0.12, n))
    nuc_area = size_jitter**2 * np.where(g2, 1.7, 1.0)
    dna_content = np.exp(rng.normal(0.0, 0.12, n)) * np.where(g2, 2.0, 1.0)
    cell_scale = np.exp(rng.normal(0.0, 0.1, n)) * size_jitter
    tub_level = np.exp(rng.normal(0.0, 0.15, n))
    act_level = np.exp(rng.normal(0.0, 0.15, n))
    fibre_amp = np.full(n, 0.7)
    tub_punct = np.full(n, 0.15)
    ring_amp = np.full(n, 1.6)
    act_punct = np.zeros(n)
    roundness = np.full(n, 0.18)  # amplitude of outline irregularity
    if cls == "nuclear_enlargement":
        nuc_area *= 1.0 + 1.3 * e
        dna_content *= 1.0 + 1.0 * e
    elif cls == "cytoskeletal_disruption":
        fibre_amp *= np.clip(1.0 - e, 0.0, 1.0)
        tub_level *= 1.0 + 0.6 * e
        tub_punct += 0.9 * e
        cell_scale *= 1.0 - 0.2 * np.clip(e, 0, 1)
        roundness *= np.clip(1.0 - e, 0.1, 1.0)
    elif cls == "actin_disruption":
        ring_amp *= np.clip(1.0 - e, 0.0, 1.0)
        act_level *= 1.0 - 0.35 * np.clip(e, 0, 1)  # less F-actin to stain
        act_punct += 2.5 * e
        cell_scale *= 1.0 - 0.25 * np.clip(e, 0, 1)
    elif cls == "toxicity":
        nuc_area = np.where(apoptotic, nuc_area * 0.35, nuc_area)
        dna_content = np.where(apoptotic, dna_content * 0.9, dna_content)
        cell_scale = np.where(apoptotic, cell_scale * 0.6, cell_scale)
    aspect = rng.uniform(0.7, 1.0, n)
    nuc_a = cfg.nucleus_radius_px * np.sqrt(nuc_area / aspect)
    nuc_b = cfg.nucleus_radius_px * np.sqrt(nuc_area * aspect)
    cell_r = np.maximum(cfg.cell_radius_px * cell_scale, 1.25 * nuc_a)
    theta = rng.uniform(0, np.pi, n)
    shape_phase = rng.uniform(0, 2 * np.pi, (n, 2))
    fibre_phase = rng.uniform(0, 2 * np.pi, n)
    n_fibres = rng.integers(9, 15, n)
    dna_level = dna_content / (nuc_a * nuc_b / cfg.nucleus_radius_px**2)  # mean intensity = content / area

    # -- signal ---------------------------------------------------------------------------
    signal = np.zeros((3, size, size))
    if n:
        # power diagram: each pixel belongs to the cell with the smallest normalised distance;
        # computed per cell inside a window around it (cells never reach beyond 1.45 radii).
        rho = np.full((size, size), np.inf)
        owner = np.zeros((size, size), dtype=np.int64)
        for i in range(n):
            reach = int(np.ceil(1.45 * cell_r[i])) + 1
            y0, y1 = max(int(centres[i, 0]) - reach, 0), min(int(centres[i, 0]) + reach + 1, size)
            x0, x1 = max(int(centres[i, 1]) - reach, 0), min(int(centres[i, 1]) + reach + 1, size)
            if y0 >= y1 or x0 >= x1:
                continue
            wy = np.arange(y0, y1, dtype=np.float64)[:, None] - centres[i, 0]
            wx = np.arange(x0, x1, dtype=np.float64)[None, :] - centres[i, 1]
            wphi = np.arctan2(wy, wx)
            outline = 1.0 + roundness[i] * (0.6 * np.cos(2 * wphi + shape_phase[i, 0])
                                            + 0.4 * np.cos(3 * wphi + shape_phase[i, 1]))
            w_rho = np.hypot(wy, wx) / (cell_r[i] * outline)
            win_rho, win_owner = rho[y0:y1, x0:x1], owner[y0:y1, x0:x1]
            closer = w_rho < win_rho
            win_rho[closer] = w_rho[closer]
            win_owner[closer] = i
        rho = np.minimum(rho, 10.0)  # pixels outside every window: far from any cell
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        o_dy = yy - centres[owner, 0]
        o_dx = xx - centres[owner, 1]
        o_phi = np.arctan2(o_dy, o_dx)
        cell_mask = np.clip((1.05 - rho) / 0.12, 0.0, 1.0)
        cos_t, sin_t = np.cos(theta)[owner], np.sin(theta)[owner]
        u = (o_dx * cos_t + o_dy * sin_t) / nuc_a[owner]
        v = (-o_dx * sin_t + o_dy * cos_t) / nuc_b[owner]
        rho_n = np.hypot(u, v)
        nuc_mask = np.clip((1.0 - rho_n) / 0.18 + 0.5, 0.0, 1.0)

        chromatin = _smooth_noise(rng, size, 1.0)
        condensed = np.where(apoptotic, 2.5, 1.0)[owner]
        signal[0] = 2600.0 * dna_level[owner] * condensed * nuc_mask * (1.0 + 0.18 * chromatin)

        tub_noise = _smooth_noise(rng, size, 0.9)
        wobble = _smooth_noise(rng, size, 3.0)
        fibres = (0.5 + 0.5 * np.cos(n_fibres[owner] * o_phi + fibre_phase[owner] + 2.5 * rho + 1.2 * wobble)) ** 3
        perinuclear = 0.45 + 0.55 * np.clip(1.0 - rho, 0.0, 1.0)
        tub = perinuclear * (1.0 - fibre_amp[owner] + 2.0 * fibre_amp[owner] * fibres)
        tub *= 1.0 + tub_punct[owner] * np.maximum(tub_noise, 0.0) ** 2
        signal[1] = 1100.0 * tub_level[owner] * cell_mask * tub * (1.0 - 0.35 * nuc_mask)

        act_noise = _smooth_noise(rng, size, 0.8)
        ring = ring_amp[owner] * np.exp(-(((rho - 0.9) / 0.09) ** 2))
        spots = act_punct[owner] * np.maximum(act_noise - 1.3, 0.0) * 2.0
        signal[2] = 900.0 * act_level[owner] * cell_mask * (0.35 + ring + spots) * (1.0 + 0.15 * act_noise)

    # -- plate, edge and camera -----------------------------------------------------------
    drift = 1.0 - 0.5 * cfg.edge_effect * edge
    background = np.array([180.0, 220.0, 200.0])
    image = (signal * drift + background[:, None, None]) * gain[:, None, None] + offset[:, None, None]
    image += rng.standard_normal(image.shape) * np.sqrt(np.maximum(image, 0.0) * 2.0 + 15.0**2)
    return np.clip(np.rint(image), 0, 65535).astype(np.uint16)


def config_dict(config: SyntheticLabConfig) -> dict:
    """JSON-ready dict of a config (callers save it next to a run)."""
    out = asdict(config)
    out["channels"] = list(config.channels)
    return out
