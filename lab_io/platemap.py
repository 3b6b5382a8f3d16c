"""384-well plate layouts and the files liquid handlers and Cell Painting pipelines read.

Layout rules (``design_plates``):

* every plate carries its full control set: ``n_negative_controls`` DMSO wells and
  ``n_positive_controls`` wells of ``positive_control_id``, spread over rows and columns (each new
  control goes to a free well whose row and column hold the fewest controls so far, ties broken by
  the seeded generator, so 16 controls take 16 different rows (14 with an empty edge) and 16 different
  columns);
* treatments go to seeded random wells among the remaining usable wells; treatments are shuffled
  across plates and plates are filled evenly (sizes differ by at most one);
* with ``empty_edge`` the outer ring (rows A, P, columns 1, 24) stays empty;
* usable wells left over are ``empty`` (no transfer).

Barcodes are ``f"{barcode_prefix}{campaign_tag}{plate_index:04d}"`` (e.g. ``LPR01-0001``) and each
plate has its own map, ``plate_map_name = f"{barcode}-MAP"``.

Volumes (Echo, 2.5 nL droplets): a treatment needs ``dose_um * assay_volume_ul / stock_mm`` nL of
its ``stock_mm`` DMSO stock (10 uM in 40 uL from 10 mM = 40 nL), rounded to the nearest multiple of
2.5 nL; a dose the droplets give more than ``DOSE_TOLERANCE`` (5 %) away from is refused, naming
the doses they do give, so the ``dose_um`` written is the dose dispensed to within 5 %. Every
non-empty well receives ``transfer_volume_nl`` of DMSO in total (whole droplets, at most
``MAX_DMSO_FRACTION`` = 1 % of the assay volume): compound wells are back-filled with pure DMSO
(``transfer_volume_nl - compound volume``), DMSO wells get ``transfer_volume_nl`` of DMSO.

Files (``write_plate_files``), one folder per batch of plates, Cell Painting Gallery conventions::

    <plate_map_name>.txt     tab-separated: plate_map_name, well_position (A01), broad_sample
                             (empty for DMSO and empty wells, like CPJUMP1), solvent (DMSO; empty
                             for empty wells), dose_um, role (lab_io.schema.WellRole)
    barcode_platemap.csv     Assay_Plate_Barcode, Plate_Map_Name
    compound_metadata.tsv    broad_sample, pert_iname, smiles, InChIKey, pert_type, control_type
                             (the DMSO row has an empty broad_sample, like the plate maps)
    source_platemap.csv      Source Plate Name (SRC-<first barcode of the batch>-<k>), Source Plate
                             Type, Source Well (A1 style), broad_sample (DMSO: empty), pert_iname,
                             concentration_mm (DMSO: 0), transfer_total_ul (drawn from the well),
                             fill_volume_ul (that plus source_dead_volume_ul); a sample needing
                             more than a well gives is split over several wells
    picklist.csv             Echo: Source Plate Name, Source Plate Type, Source Well (A1 style),
                             Destination Plate Name, Destination Well (A1 style), Transfer Volume
                             (nL), Sample ID
    <barcode>.png            plate picture, wells coloured by role

The folder is written in a temporary sibling folder and renamed into place, so a failure never
leaves a partial set.

``read_plate_files`` reads such a folder back, and also Cell Painting Gallery folders such as
CPJUMP1 (``barcode_platemap_*.csv``, ``<map>_platemap.txt``, ``*compound_metadata.tsv``): without a
``role`` column a well is a treatment if it has a broad_sample, DMSO if it only has solvent, else
empty; without a ``dose_um`` column (CPJUMP1 records ``mmoles_per_liter`` of the source instead)
``dose_um`` is NaN for compound wells. Maps are laid on 384-well plates: a map that lists exactly
the 96 wells A01-H12 and none beyond (a 96-well plate's map; a 384-well map lists its 384, or a
sparse set that is not that quarter) is refused, naming the file, rather than read as the
top-left quarter of a 384-well plate. A 96-well map is not always recognisable: one that lists
only some of its wells looks like a sparse 384-well map, and the files carry no plate format.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from lab_io.schema import (
    CONTROL_COMPOUND_ID,
    DMSO_INCHIKEY,
    DMSO_SMILES,
    MISSING_VALUE_TEXT,
    N_COLS,
    N_ROWS,
    N_WELLS,
    ROW_LETTERS,
    SOLVENT,
    WellRole,
    echo_well,
    parse_well,
    well_name,
)
from lab_io.tempfiles import make_temp_dir

log = logging.getLogger(__name__)

ECHO_DROPLET_NL = 2.5
WELL_COLUMNS = ("well", "row", "col", "role", "compound_id", "dose_um")
PLATEMAP_COLUMNS = ("plate_map_name", "well_position", "broad_sample", "solvent", "dose_um", "role")
BARCODE_FILE = "barcode_platemap.csv"
COMPOUND_FILE = "compound_metadata.tsv"
SOURCE_FILE = "source_platemap.csv"
PICKLIST_FILE = "picklist.csv"
PICKLIST_COLUMNS = ("Source Plate Name", "Source Plate Type", "Source Well", "Destination Plate Name",
                    "Destination Well", "Transfer Volume", "Sample ID")
SOURCE_COLUMNS = ("Source Plate Name", "Source Plate Type", "Source Well", "broad_sample", "pert_iname",
                  "concentration_mm", "transfer_total_ul", "fill_volume_ul")
SOURCE_PLATE_PREFIX = "SRC-"
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]*$")
ROLE_COLOURS = {
    WellRole.treatment.value: "#4C72B0",
    WellRole.negative_control.value: "#AAAAAA",
    WellRole.positive_control.value: "#C44E52",
    WellRole.empty.value: "#FFFFFF",
}


# --------------------------------------------------------------------------------------------
# Config and layouts
# --------------------------------------------------------------------------------------------

#: A dose is dispensed in whole droplets: one whose droplet volume gives a dose further than this
#: (relative) from the one asked for is refused (1 uM in 40 uL from 10 mM is 4 nL: 2 droplets, 1.25 uM).
DOSE_TOLERANCE = 0.05
#: DMSO above this fraction of the assay volume harms most cell lines (0.1-0.5 % is usual).
MAX_DMSO_FRACTION = 0.01


@dataclass(frozen=True)
class PlateLayoutConfig:
    """How plates are laid out and dispensed (saved with each campaign and each round).

    Source plates (Echo): each compound and the DMSO back-fill sit in wells of ``source_plate_type``
    filled with ``source_dead_volume_ul`` beyond what is transferred, at most
    ``source_max_volume_ul`` a well; a sample needing more is split over several wells."""

    n_negative_controls: int = 16
    positive_control_id: str | None = None
    n_positive_controls: int = 0
    positive_control_dose_um: float = 10.0
    empty_edge: bool = False
    transfer_volume_nl: float = 50.0  # total DMSO per non-empty well (compound + back-fill)
    stock_mm: float = 10.0  # source plate compound concentration
    assay_volume_ul: float = 40.0  # medium volume per destination well
    barcode_prefix: str = "LP"
    source_plate_type: str = "384PP_DMSO2"  # Echo source plate definition (polypropylene, DMSO)
    source_dead_volume_ul: float = 15.0  # what the Echo cannot draw from a 384PP well
    source_max_volume_ul: float = 65.0  # a 384PP well's largest working volume

    def __post_init__(self) -> None:
        self._check_types()
        if self.positive_control_id is not None and not self.positive_control_id.strip():
            object.__setattr__(self, "positive_control_id", None)  # "" (a blank in campaign.json): none
        if self.n_negative_controls < 1:
            raise ValueError(f"n_negative_controls must be >= 1 (plates are normalised to DMSO), "
                             f"got {self.n_negative_controls}")
        if self.n_positive_controls < 0:
            raise ValueError(f"n_positive_controls must be >= 0, got {self.n_positive_controls}")
        if self.n_positive_controls and not self.positive_control_id:
            raise ValueError("n_positive_controls > 0 needs a positive_control_id")
        if self.n_positive_controls and self.positive_control_id.strip().upper() == CONTROL_COMPOUND_ID:
            raise ValueError(f"positive_control_id cannot be {self.positive_control_id!r}: DMSO is the negative control")
        if self.n_positive_controls and self.positive_control_id.strip() in MISSING_VALUE_TEXT:
            raise ValueError(f"positive_control_id cannot be {self.positive_control_id!r}: table readers (pandas, R) "
                             "take it for a missing value, and its wells would read back as empty")
        if self.n_controls >= self.usable_wells_per_plate:
            raise ValueError(f"{self.n_controls} controls leave no room for treatments on a plate with "
                             f"{self.usable_wells_per_plate} usable wells")
        for name in ("transfer_volume_nl", "stock_mm", "assay_volume_ul", "positive_control_dose_um",
                     "source_max_volume_ul"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        self._check_volumes()
        if self.n_positive_controls:
            self.check_dispensable(self.positive_control_dose_um, "positive_control_dose_um")
        for name in ("barcode_prefix", "source_plate_type"):
            if not _SAFE_NAME_RE.match(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} may only use letters, digits, '_', '-', '.'")

    def _check_types(self) -> None:
        """Settings come from a hand-editable campaign.json: a count must be a whole number, a
        volume a number, ``empty_edge`` true or false (``"false"`` is not False). Numpy numbers are
        taken and stored as int / float."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise ValueError(f"layout {f.name} must be a whole number, got {value!r}")
                object.__setattr__(self, f.name, int(value))
            elif f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                    raise ValueError(f"layout {f.name} must be a finite number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            elif f.type in ("bool", bool):
                if not isinstance(value, (bool, np.bool_)) and not (isinstance(value, numbers.Integral)
                                                                   and value in (0, 1)):  # earlier versions took 0 / 1
                    raise ValueError(f"layout {f.name} must be true or false, got {value!r}")
                object.__setattr__(self, f.name, bool(value))
            elif not (isinstance(value, str) or (value is None and "None" in str(f.type))):
                raise ValueError(f"layout {f.name} must be text, got {value!r}")

    def _check_volumes(self) -> None:
        droplets = self.transfer_volume_nl / ECHO_DROPLET_NL
        if not math.isclose(droplets, round(droplets), abs_tol=1e-9):
            raise ValueError(f"transfer_volume_nl must be a whole number of {ECHO_DROPLET_NL} nL Echo droplets, got "
                             f"{self.transfer_volume_nl} (e.g. {round(droplets) * ECHO_DROPLET_NL:g})")
        if self.transfer_volume_nl > MAX_DMSO_FRACTION * self.assay_volume_ul * 1000:
            raise ValueError(f"transfer_volume_nl {self.transfer_volume_nl:g} nL of DMSO in {self.assay_volume_ul:g} uL "
                             f"is {100 * self.transfer_volume_nl / (self.assay_volume_ul * 1000):.3g} % DMSO, above the "
                             f"{100 * MAX_DMSO_FRACTION:g} % cells tolerate")
        if not 0 <= self.source_dead_volume_ul < self.source_max_volume_ul:
            raise ValueError(f"source_dead_volume_ul must be >= 0 and below source_max_volume_ul "
                             f"({self.source_max_volume_ul:g}), got {self.source_dead_volume_ul:g}")
        if self.source_capacity_nl < self.transfer_volume_nl:
            raise ValueError(f"a source well gives {self.source_capacity_nl:g} nL (source_max_volume_ul less "
                             f"source_dead_volume_ul), less than one well's transfer_volume_nl "
                             f"{self.transfer_volume_nl:g} nL")

    @property
    def source_capacity_nl(self) -> float:
        """What one source well can give: its largest working volume less the dead volume."""
        return (self.source_max_volume_ul - self.source_dead_volume_ul) * 1000

    @property
    def n_controls(self) -> int:
        return self.n_negative_controls + self.n_positive_controls

    @property
    def usable_wells_per_plate(self) -> int:
        return len(usable_wells(self.empty_edge))

    @property
    def treatments_per_plate(self) -> int:
        return self.usable_wells_per_plate - self.n_controls

    def compound_volume_nl(self, dose_um: float) -> float:
        """Compound stock volume for ``dose_um``, rounded to Echo droplets (2.5 nL)."""
        volume = dose_um * self.assay_volume_ul / self.stock_mm
        return round(volume / ECHO_DROPLET_NL) * ECHO_DROPLET_NL

    def dispensed_dose_um(self, dose_um: float) -> float:
        """The dose the droplets of :meth:`compound_volume_nl` give."""
        return self.compound_volume_nl(dose_um) * self.stock_mm / self.assay_volume_ul

    def check_dispensable(self, dose_um: float, what: str) -> None:
        """ValueError naming ``what`` unless ``dose_um`` takes between one droplet and
        ``transfer_volume_nl`` of the stock, in whole droplets within ``DOSE_TOLERANCE`` of the dose."""
        volume = self.compound_volume_nl(dose_um)
        if volume <= 0:  # under half a droplet: say what it needs, not the 0 nL it rounds to
            exact = dose_um * self.assay_volume_ul / self.stock_mm
            raise ValueError(
                f"{what}: {dose_um} uM needs {exact:.3g} nL of {self.stock_mm} mM stock, less than half of one "
                f"{ECHO_DROPLET_NL} nL droplet; use a dose of at least "
                f"{ECHO_DROPLET_NL * self.stock_mm / self.assay_volume_ul:g} uM or a more dilute stock (stock_mm)"
            )
        if volume > self.transfer_volume_nl:
            raise ValueError(
                f"{what}: {dose_um} uM needs {volume} nL of {self.stock_mm} mM stock; "
                f"it must be between {ECHO_DROPLET_NL} and transfer_volume_nl={self.transfer_volume_nl} nL"
            )
        dispensed = self.dispensed_dose_um(dose_um)
        if abs(dispensed - dose_um) > DOSE_TOLERANCE * dose_um:
            step = ECHO_DROPLET_NL * self.stock_mm / self.assay_volume_ul  # uM per droplet
            near = sorted({max(step, math.floor(dose_um / step) * step), math.ceil(dose_um / step) * step})
            raise ValueError(
                f"{what}: {dose_um:g} uM would be dispensed as {dispensed:g} uM ({volume:g} nL, whole "
                f"{ECHO_DROPLET_NL} nL droplets of {self.stock_mm:g} mM stock into {self.assay_volume_ul:g} uL), "
                f"{100 * (dispensed / dose_um - 1):+.1f} % (more than {100 * DOSE_TOLERANCE:g} %); set {what} to a "
                f"dose the droplets give ({' or '.join(f'{d:g}' for d in near)} uM), or stock_mm to a stock "
                "from which every dose of the campaign takes whole droplets"
            )


@dataclass(frozen=True, eq=False)
class PlateLayout:
    """One destination plate: all 384 wells, row-major (``A01, A02, ..., P24``).

    ``wells`` columns: well (A01), row, col (0-based), role (WellRole value), compound_id
    (``DMSO`` for negative controls, ``''`` for empty wells), dose_um (0 for DMSO / empty).
    """

    barcode: str
    plate_map_name: str
    wells: pd.DataFrame
    config: PlateLayoutConfig = field(default_factory=PlateLayoutConfig)

    def wells_with_role(self, role: WellRole) -> pd.DataFrame:
        return self.wells[self.wells["role"] == role.value]


def usable_wells(empty_edge: bool) -> list[tuple[int, int]]:
    """(row, col) of wells that may hold liquid, row-major."""
    margin = 1 if empty_edge else 0
    return [(r, c) for r in range(margin, N_ROWS - margin) for c in range(margin, N_COLS - margin)]


def treatment_capacity(budget_wells: int, config: PlateLayoutConfig) -> int:
    """Treatment wells that fit in ``budget_wells`` wells (controls included) over any number of plates.

    Full plates hold ``config.treatments_per_plate`` treatments; the remainder opens one more plate
    only if it can hold its full control set plus at least one treatment.
    """
    if budget_wells < 0:
        raise ValueError(f"budget_wells must be >= 0, got {budget_wells}")
    per_plate = config.usable_wells_per_plate
    full_plates, remainder = divmod(budget_wells, per_plate)
    return full_plates * config.treatments_per_plate + max(0, remainder - config.n_controls)


def _check_treatments(treatments: Sequence[tuple[str, float]], config: PlateLayoutConfig) -> list[tuple[str, float]]:
    checked = []
    for i, item in enumerate(treatments):
        try:
            compound_id, dose_um = item
            dose_um = float(dose_um)
        except (TypeError, ValueError) as err:
            raise ValueError(f"treatment #{i} {item!r} is not a (compound_id, dose_um) pair") from err
        compound_id = str(compound_id).strip()
        if not compound_id or compound_id == CONTROL_COMPOUND_ID:
            raise ValueError(f"treatment #{i}: invalid compound_id {compound_id!r}")
        if not (math.isfinite(dose_um) and dose_um > 0):
            raise ValueError(f"treatment #{i} ({compound_id}): dose_um must be > 0, got {dose_um}")
        config.check_dispensable(dose_um, f"treatment #{i} ({compound_id})")
        checked.append((compound_id, dose_um))
    return checked


def _spread_wells(n: int, free: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pick ``n`` free wells, each in the row and column with the fewest picks so far (seeded ties)."""
    row_count = np.zeros(N_ROWS, dtype=int)
    col_count = np.zeros(N_COLS, dtype=int)
    picked = []
    for _ in range(n):
        rows, cols = np.nonzero(free)
        if len(rows) == 0:
            raise ValueError("no free wells left for controls")
        score = row_count[rows] + col_count[cols] + rng.random(len(rows)) * 0.5
        k = int(np.argmin(score))
        r, c = int(rows[k]), int(cols[k])
        free[r, c] = False
        row_count[r] += 1
        col_count[c] += 1
        picked.append((r, c))
    return picked


def _layout_plate(treatments: list[tuple[str, float]], config: PlateLayoutConfig, rng: np.random.Generator) -> pd.DataFrame:
    role = np.full((N_ROWS, N_COLS), WellRole.empty.value, dtype=object)
    compound = np.full((N_ROWS, N_COLS), "", dtype=object)
    dose = np.zeros((N_ROWS, N_COLS), dtype=float)
    free = np.zeros((N_ROWS, N_COLS), dtype=bool)
    for r, c in usable_wells(config.empty_edge):
        free[r, c] = True

    for r, c in _spread_wells(config.n_negative_controls, free, rng):
        role[r, c], compound[r, c] = WellRole.negative_control.value, CONTROL_COMPOUND_ID
    for r, c in _spread_wells(config.n_positive_controls, free, rng):
        role[r, c], compound[r, c] = WellRole.positive_control.value, config.positive_control_id
        dose[r, c] = config.positive_control_dose_um
    rows, cols = np.nonzero(free)
    order = rng.permutation(len(rows))[: len(treatments)]
    for (compound_id, dose_um), k in zip(treatments, order):
        r, c = rows[k], cols[k]
        role[r, c], compound[r, c], dose[r, c] = WellRole.treatment.value, compound_id, dose_um

    grid_rows, grid_cols = np.divmod(np.arange(N_WELLS), N_COLS)
    return pd.DataFrame({
        "well": [well_name(r, c) for r, c in zip(grid_rows, grid_cols)],
        "row": grid_rows,
        "col": grid_cols,
        "role": role.ravel(),
        "compound_id": compound.ravel(),
        "dose_um": dose.ravel(),
    })


def plate_barcode(config: PlateLayoutConfig, plate_index: int, campaign_tag: str = "") -> str:
    return f"{config.barcode_prefix}{campaign_tag}{plate_index:04d}"


def design_plates(
    treatments: Sequence[tuple[str, float]],
    config: PlateLayoutConfig,
    seed: int,
    plate_index_start: int = 1,
    campaign_tag: str = "",
    budget_wells: int | None = None,
) -> list[PlateLayout]:
    """Lay out ``(compound_id, dose_um)`` treatments on as few 384-well plates as needed.

    ``budget_wells`` (optional) caps the wells used, controls included (``treatment_capacity``);
    more treatments than fit raise ValueError. No treatments -> no plates.
    """
    if not _SAFE_NAME_RE.match(campaign_tag):
        raise ValueError(f"campaign_tag {campaign_tag!r} may only use letters, digits, '_', '-', '.'")
    if plate_index_start < 0:
        raise ValueError(f"plate_index_start must be >= 0, got {plate_index_start}")
    checked = _check_treatments(treatments, config)
    if budget_wells is not None and len(checked) > treatment_capacity(budget_wells, config):
        raise ValueError(f"{len(checked)} treatments do not fit in a budget of {budget_wells} wells "
                         f"(capacity {treatment_capacity(budget_wells, config)} with controls)")
    if not checked:
        return []
    rng = np.random.default_rng(seed)
    shuffled = [checked[i] for i in rng.permutation(len(checked))]
    n_plates = math.ceil(len(shuffled) / config.treatments_per_plate)
    layouts = []
    for k, plate_treatments in enumerate(np.array_split(np.arange(len(shuffled)), n_plates)):
        barcode = plate_barcode(config, plate_index_start + k, campaign_tag)
        wells = _layout_plate([shuffled[i] for i in plate_treatments], config, rng)
        layouts.append(PlateLayout(barcode=barcode, plate_map_name=f"{barcode}-MAP", wells=wells, config=config))
    log.info("designed %d plates for %d treatments", len(layouts), len(checked))
    return layouts


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _platemap_table(layout: PlateLayout) -> pd.DataFrame:
    wells = layout.wells
    is_empty = wells["role"] == WellRole.empty.value
    is_dmso = wells["role"] == WellRole.negative_control.value
    return pd.DataFrame({
        "plate_map_name": layout.plate_map_name,
        "well_position": wells["well"],
        "broad_sample": np.where(is_empty | is_dmso, "", wells["compound_id"]),
        "solvent": np.where(is_empty, "", SOLVENT),
        "dose_um": wells["dose_um"].astype(float),
        "role": wells["role"],
    })


def _compound_metadata(layouts: Sequence[PlateLayout], compounds: pd.DataFrame) -> pd.DataFrame:
    missing_cols = [c for c in ("compound_id", "name", "smiles", "inchikey") if c not in compounds.columns]
    if missing_cols:
        raise ValueError(f"compounds table lacks columns {missing_cols}; it has {list(compounds.columns)}")
    placed = _placed_compounds(layouts)
    table = compounds.drop_duplicates("compound_id").set_index("compound_id")
    unknown = [c for c in placed if c not in table.index]
    if unknown:
        raise ValueError(f"compounds on the plates but not in the compounds table: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} in total)")
    positive = {layout.config.positive_control_id for layout in layouts} - {None}
    rows = [dict(broad_sample="", pert_iname=CONTROL_COMPOUND_ID, smiles=DMSO_SMILES, InChIKey=DMSO_INCHIKEY,
                 pert_type="control", control_type="negcon")]
    for compound_id in placed:
        rec = table.loc[compound_id]
        is_pos = compound_id in positive
        rows.append(dict(broad_sample=compound_id, pert_iname=rec["name"] if isinstance(rec["name"], str) and rec["name"]
                         else compound_id, smiles=rec["smiles"], InChIKey=rec["inchikey"],
                         pert_type="control" if is_pos else "trt", control_type="poscon" if is_pos else ""))
    return pd.DataFrame(rows)


def _placed_compounds(layouts: Sequence[PlateLayout]) -> list[str]:
    """Compound ids on the plates (not DMSO), in order of first appearance."""
    seen: dict[str, None] = {}
    for layout in layouts:
        wells = layout.wells
        for cid in wells.loc[wells["role"].isin([WellRole.treatment.value, WellRole.positive_control.value]),
                             "compound_id"]:
            seen.setdefault(cid, None)
    return list(seen)


def _transfers(layouts: Sequence[PlateLayout]) -> list[tuple[str, str, str, float]]:
    """Every Echo transfer, plate by plate and well by well: ``(sample, plate barcode, A1-style well,
    volume nL)``, sample = compound id or DMSO (the back-fill and the negative controls)."""
    rows = []
    for layout in layouts:
        total = layout.config.transfer_volume_nl
        for w in layout.wells.itertuples(index=False):
            if w.role == WellRole.empty.value:
                continue
            dest = (layout.barcode, echo_well(w.well))
            if w.role == WellRole.negative_control.value:
                rows.append((CONTROL_COMPOUND_ID, *dest, total))
                continue
            volume = layout.config.compound_volume_nl(w.dose_um)
            rows.append((w.compound_id, *dest, volume))
            if total - volume > 0:
                rows.append((CONTROL_COMPOUND_ID, *dest, total - volume))
    return rows


def _source_and_picklist(layouts: Sequence[PlateLayout], names: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The source plates and the Echo pick list of a batch.

    Each compound (in order of first appearance), then DMSO, takes as many source wells as its
    transfers need at ``source_capacity_nl`` a well, filled in pick-list order; wells are laid out
    row-major over source plates named after the batch's first destination plate
    (``SRC-<barcode>-<k>``), so no two batches share a source plate name. Each source well says
    what it holds and how much to fill: the volume transferred from it plus the dead volume."""
    config = layouts[0].config
    capacity = config.source_capacity_nl
    transfers = _transfers(layouts)
    used: dict[str, list[float]] = {}  # sample -> nL drawn from each of its wells so far
    assigned = []
    for sample, plate, well, volume in transfers:
        wells = used.setdefault(sample, [0.0])
        if wells[-1] + volume > capacity:
            wells.append(0.0)
        wells[-1] += volume
        assigned.append(len(wells) - 1)
    samples = [*_placed_compounds(layouts), CONTROL_COMPOUND_ID]
    position, source_rows = {}, []
    for sample in (s for s in samples if s in used):
        for k, drawn_nl in enumerate(used[sample]):
            plate_number, index = divmod(len(source_rows), N_WELLS)
            plate_name = f"{SOURCE_PLATE_PREFIX}{layouts[0].barcode}-{plate_number + 1}"
            well = echo_well(well_name(*divmod(index, N_COLS)))
            position[(sample, k)] = (plate_name, well)
            is_dmso = sample == CONTROL_COMPOUND_ID
            source_rows.append({
                "Source Plate Name": plate_name, "Source Plate Type": config.source_plate_type, "Source Well": well,
                "broad_sample": "" if is_dmso else sample,
                "pert_iname": CONTROL_COMPOUND_ID if is_dmso else names.get(sample) or sample,
                "concentration_mm": 0.0 if is_dmso else config.stock_mm,
                "transfer_total_ul": drawn_nl / 1000,
                "fill_volume_ul": drawn_nl / 1000 + config.source_dead_volume_ul,
            })
    pick_rows = []
    for (sample, plate, well, volume), k in zip(transfers, assigned):
        source_plate, source_well = position[(sample, k)]
        pick_rows.append((source_plate, config.source_plate_type, source_well, plate, well, volume, sample))
    return (pd.DataFrame(source_rows, columns=list(SOURCE_COLUMNS)),
            pd.DataFrame(pick_rows, columns=list(PICKLIST_COLUMNS)))


def _plot_plate(layout: PlateLayout, path: Path, label_compounds: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(12, 8))
    wells = layout.wells
    for role, colour in ROLE_COLOURS.items():
        sel = wells[wells["role"] == role]
        ax.scatter(sel["col"], sel["row"], s=260, c=colour, edgecolors="#333333", linewidths=0.6)
    if label_compounds:
        for w in wells[wells["role"] == WellRole.treatment.value].itertuples(index=False):
            ax.text(w.col, w.row, str(w.compound_id)[-4:], fontsize=4, ha="center", va="center", color="white")
    ax.set_xticks(range(N_COLS), [str(c + 1) for c in range(N_COLS)])
    ax.set_yticks(range(N_ROWS), list(ROW_LETTERS))
    ax.set_xlim(-0.7, N_COLS - 0.3)
    ax.set_ylim(N_ROWS - 0.3, -0.7)
    ax.set_aspect("equal")
    counts = wells["role"].value_counts()
    ax.legend(handles=[Patch(facecolor=c, edgecolor="#333333", label=f"{r} ({counts.get(r, 0)})")
                       for r, c in ROLE_COLOURS.items()],
              loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=4, frameon=False)
    ax.set_title(f"{layout.barcode}  (map {layout.plate_map_name})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_batch(layouts: Sequence[PlateLayout], compounds: pd.DataFrame, folder: Path) -> list[str]:
    names = []
    for layout in layouts:
        name = f"{layout.plate_map_name}.txt"
        _platemap_table(layout).to_csv(folder / name, sep="\t", index=False)
        names.append(name)
    pd.DataFrame({"Assay_Plate_Barcode": [l.barcode for l in layouts],
                  "Plate_Map_Name": [l.plate_map_name for l in layouts]}).to_csv(folder / BARCODE_FILE, index=False)
    metadata = _compound_metadata(layouts, compounds)
    metadata.to_csv(folder / COMPOUND_FILE, sep="\t", index=False)
    source, picklist = _source_and_picklist(layouts, dict(zip(metadata["broad_sample"], metadata["pert_iname"])))
    source.to_csv(folder / SOURCE_FILE, index=False)
    picklist.to_csv(folder / PICKLIST_FILE, index=False)
    names += [BARCODE_FILE, COMPOUND_FILE, SOURCE_FILE, PICKLIST_FILE]
    for layout in layouts:
        _plot_plate(layout, folder / f"{layout.barcode}.png")
        names.append(f"{layout.barcode}.png")
    return names


def write_plate_files(layouts: Sequence[PlateLayout], compounds: pd.DataFrame, out_dir: str | Path,
                      extra_files: dict[str, str] | None = None) -> dict[str, Path]:
    """Write the batch of plates into ``out_dir`` (must not exist or be empty) -> {file name: path}.

    ``compounds``: DataFrame[compound_id, name, smiles, inchikey] covering every compound placed.
    ``extra_files``: {file name: text} written beside them (e.g. the round's config).
    Files are written into a temporary sibling folder which is renamed to ``out_dir`` at the end,
    so ``out_dir`` appears with every file or not at all.
    """
    out_dir = Path(out_dir)
    if not layouts:
        raise ValueError(f"{out_dir}: no plate layouts to write")
    barcodes = [l.barcode for l in layouts]
    map_names = [l.plate_map_name for l in layouts]
    for name in barcodes + map_names:
        if not name or not _SAFE_NAME_RE.match(name):
            raise ValueError(f"{out_dir}: barcode / plate map name {name!r} is not a safe file name")
    if len(set(barcodes)) != len(barcodes) or len(set(map_names)) != len(map_names):
        raise ValueError(f"{out_dir}: barcodes and plate map names must be unique: {barcodes}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: already exists and is not an empty folder; refusing to overwrite plates")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out_dir.parent, prefix=f".{out_dir.name}.tmp-")
    try:
        names = _write_batch(layouts, compounds, tmp)
        for name, text in (extra_files or {}).items():
            if not name or name.startswith(".") or not _SAFE_NAME_RE.match(name) or name in names:
                raise ValueError(f"{out_dir}: extra file name {name!r} is not a safe, unused file name")
            (tmp / name).write_text(text)
            names.append(name)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d plates to %s", len(layouts), out_dir)
    return {name: out_dir / name for name in names}


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _read_table(path: Path, sep: str) -> pd.DataFrame:
    """All cells as text with surrounding whitespace stripped (``BR001 `` is ``BR001``)."""
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path}: cannot parse: {err}") from err
    table.columns = [str(c).strip() for c in table.columns]
    return table.apply(lambda col: col.str.strip())


def _find_barcode_file(plates_dir: Path) -> Path:
    path = plates_dir / BARCODE_FILE
    if path.is_file():
        return path
    candidates = sorted(plates_dir.glob("barcode_platemap*.csv"))
    if len(candidates) != 1:
        raise ValueError(f"{plates_dir}: expected {BARCODE_FILE} (or exactly one barcode_platemap*.csv), "
                         f"found {[c.name for c in candidates]}")
    return candidates[0]


def _find_map_file(plates_dir: Path, map_name: str, barcode_file: Path) -> Path:
    for name in (f"{map_name}.txt", f"{map_name}_platemap.txt"):
        if (plates_dir / name).is_file():
            return plates_dir / name
    raise ValueError(f"{barcode_file}: plate map {map_name!r} has no file {map_name}.txt in {plates_dir}")


def _role_of(row: pd.Series, has_role: bool, path: Path, line: int) -> str:
    if has_role and row["role"]:
        try:
            return WellRole(row["role"]).value
        except ValueError:
            raise ValueError(f"{path} line {line}: unknown role {row['role']!r} in well {row['well_position']}") from None
    if row["broad_sample"]:
        return WellRole.treatment.value
    return WellRole.negative_control.value if row.get("solvent", SOLVENT) else WellRole.empty.value


_PLATE_96_SHAPE = (8, 12)  # a 96-well plate: rows A-H, columns 1-12


def _check_not_96_well(path: Path, listed: dict[int, int]) -> None:
    """ValueError naming ``path`` when its listed wells (384-well indices) are exactly A01-H12."""
    rows, cols = _PLATE_96_SHAPE
    quarter = {r * N_COLS + c for r in range(rows) for c in range(cols)}
    if set(listed) == quarter:
        raise ValueError(f"{path}: lists exactly the {len(quarter)} wells A01-H12 and none beyond: a 96-well plate "
                         f"map? Plates here are 384-well ({N_ROWS} x {N_COLS}), where those wells are only the "
                         "top-left quarter; write the map with the 384-well positions the wells were dispensed to")


def _read_platemap(path: Path, map_name: str) -> pd.DataFrame:
    """Parse one plate map -> wells DataFrame (all 384 wells; wells not listed are empty).

    ``dose_um`` is NaN where the file has no ``dose_um`` column (e.g. CPJUMP1, which records
    ``mmoles_per_liter`` of the source instead) or an empty value for a compound well.
    """
    table = _read_table(path, "\t")
    missing = [c for c in ("well_position", "broad_sample") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; columns are {list(table.columns)}")
    has_role = "role" in table.columns
    roles = np.full(N_WELLS, WellRole.empty.value, dtype=object)
    compounds = np.full(N_WELLS, "", dtype=object)
    doses = np.zeros(N_WELLS, dtype=float)
    seen: dict[int, int] = {}
    for i, row in table.iterrows():
        line = int(i) + 2
        if "plate_map_name" in table.columns and row["plate_map_name"] and row["plate_map_name"] != map_name:
            raise ValueError(f"{path} line {line}: plate_map_name {row['plate_map_name']!r} != {map_name!r}")
        try:
            r, c = parse_well(row["well_position"])
        except ValueError as err:
            raise ValueError(f"{path} line {line}: {err}") from None
        k = r * N_COLS + c
        if k in seen:
            raise ValueError(f"{path} line {line}: duplicate well {well_name(r, c)} (first on line {seen[k]})")
        seen[k] = line
        role = _role_of(row, has_role, path, line)
        roles[k] = role
        if role == WellRole.negative_control.value:
            compounds[k] = CONTROL_COMPOUND_ID
        elif role != WellRole.empty.value:
            if not row["broad_sample"]:
                raise ValueError(f"{path} line {line}: {role} well {well_name(r, c)} has no broad_sample")
            compounds[k] = row["broad_sample"]
            dose_text = row.get("dose_um", "") if "dose_um" in table.columns else ""
            try:
                doses[k] = float(dose_text) if dose_text != "" else np.nan
            except ValueError:
                raise ValueError(f"{path} line {line}: invalid dose_um {dose_text!r} in well "
                                 f"{well_name(r, c)}") from None
            if dose_text != "" and not (math.isfinite(doses[k]) and doses[k] > 0):
                raise ValueError(f"{path} line {line}: dose_um {dose_text!r} in well {well_name(r, c)} must be "
                                 "a number > 0 (leave it empty when unknown)")
    _check_not_96_well(path, seen)
    grid_rows, grid_cols = np.divmod(np.arange(N_WELLS), N_COLS)
    return pd.DataFrame({
        "well": [well_name(r, c) for r, c in zip(grid_rows, grid_cols)],
        "row": grid_rows, "col": grid_cols, "role": roles, "compound_id": compounds, "dose_um": doses,
    })


def _read_compounds(plates_dir: Path, placed: set[str]) -> pd.DataFrame:
    """compound_metadata.tsv (or, failing that, every *compound_metadata.tsv with SMILES) -> compounds.

    Returns DataFrame[compound_id, name, smiles, inchikey] of non-DMSO rows; from the fallback
    files only compounds placed on the plates are kept.
    """
    own = plates_dir / COMPOUND_FILE
    paths = [own] if own.is_file() else sorted(plates_dir.glob(f"*{COMPOUND_FILE}"))
    frames = []
    for path in paths:
        table = _read_table(path, "\t")
        if not {"broad_sample", "smiles"} <= set(table.columns):
            if path == own:
                raise ValueError(f"{path}: needs broad_sample and smiles columns; columns are {list(table.columns)}")
            continue
        frame = pd.DataFrame({
            "compound_id": table["broad_sample"].str.strip(),
            "name": table["pert_iname"] if "pert_iname" in table.columns else table["broad_sample"],
            "smiles": table["smiles"],
            "inchikey": table["InChIKey"] if "InChIKey" in table.columns else "",
        })
        # the negative control's row (empty broad_sample, or JUMP's NA / pert_iname DMSO); a compound
        # placed on the plates is never taken for it, whatever its name
        is_dmso = frame["compound_id"].isin(["", "NA"]) | (frame["name"] == CONTROL_COMPOUND_ID)
        frame = frame[~is_dmso | frame["compound_id"].isin(placed - {""})]
        if path != own:
            frame = frame[frame["compound_id"].isin(placed)]
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["compound_id", "name", "smiles", "inchikey"])
    return pd.concat(frames, ignore_index=True).drop_duplicates("compound_id").reset_index(drop=True)


def read_plate_files(plates_dir: str | Path) -> tuple[list[PlateLayout], pd.DataFrame]:
    """Parse a plates folder (as ``write_plate_files`` writes, or a Cell Painting Gallery one).

    Returns (layouts in barcode-file order, compounds DataFrame[compound_id, name, smiles, inchikey]).
    Raises ValueError naming the file (and well / line) for unknown plate maps, invalid or
    duplicate wells, unknown roles and malformed tables. Layouts get the default config.
    """
    plates_dir = Path(plates_dir)
    if not plates_dir.is_dir():
        raise ValueError(f"{plates_dir}: plates folder not found")
    barcode_file = _find_barcode_file(plates_dir)
    barcodes = _read_table(barcode_file, ",")
    missing = [c for c in ("Assay_Plate_Barcode", "Plate_Map_Name") if c not in barcodes.columns]
    if missing:
        raise ValueError(f"{barcode_file}: missing columns {missing}; columns are {list(barcodes.columns)}")
    duplicated = barcodes["Assay_Plate_Barcode"][barcodes["Assay_Plate_Barcode"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{barcode_file}: duplicate plate barcodes {duplicated}")
    maps: dict[str, pd.DataFrame] = {}
    layouts = []
    for barcode, map_name in zip(barcodes["Assay_Plate_Barcode"], barcodes["Plate_Map_Name"]):
        if not barcode or not map_name:
            raise ValueError(f"{barcode_file}: empty barcode or plate map name ({barcode!r}, {map_name!r})")
        if map_name not in maps:
            maps[map_name] = _read_platemap(_find_map_file(plates_dir, map_name, barcode_file), map_name)
        layouts.append(PlateLayout(barcode=barcode, plate_map_name=map_name, wells=maps[map_name].copy()))
    placed = set(_placed_compounds(layouts))
    return layouts, _read_compounds(plates_dir, placed)
