"""A pycytominer per-well profile table of real drugs, measured by the synthetic lab.

For checking ``loop backtest --profiles`` on tables other than BBBC021: it draws N drugs
from the Drug Repurposing Hub sample file in ``../shared`` (real SMILES; CXSMILES, very large
molecules and DMSO rows dropped), lays each (drug, dose, replicate) out at random on 384-well
plates with 32 DMSO wells each, renders and measures every well with the synthetic lab
(``SyntheticLab.measure_plates``; world ``--seed``) and aggregates cells to wells
(``lab_io.profiles.aggregate_wells``, median). The result has the columns ``loop backtest``
reads: ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_compound``, ``Metadata_smiles``,
``Metadata_dose_um`` and the well's features.

Usage::

    .venv/bin/python benchmarks/make_profile_table.py --out hub300.csv --n-drugs 300 --doses 10 --replicates 2
    .venv/bin/loop backtest --profiles hub300.csv --rounds 3 --batch-size 8 --seeds 5 --json hub300.json

About 20 wells per second on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lab_io.ground_truth import GroundTruth
from lab_io.profile_table import write_profile_table
from lab_io.profiles import aggregate_wells
from lab_io.schema import (CONTROL_COMPOUND_ID, META_COMPOUND, META_DOSE, META_PLATE, META_SMILES, META_WELL,
                           N_COLS, N_ROWS, WellRole, well_name)
from lab_io.synthetic_lab import SyntheticLab, SyntheticLabConfig

log = logging.getLogger("make_profile_table")

HUB = Path(__file__).resolve().parents[2] / "shared" / "data" / "repurposing_hub" / "repurposing_samples_20200324.txt"
N_CONTROLS_PER_PLATE = 32


def read_hub_drugs(path: Path, max_smiles_length: int = 120) -> pd.DataFrame:
    """One row per named drug with a plain SMILES (``pert_iname``, ``smiles``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Repurposing Hub sample file not found (../shared/data/repurposing_hub)")
    hub = pd.read_csv(path, sep="\t", comment="!", usecols=["pert_iname", "smiles"])
    hub = hub.dropna().drop_duplicates("pert_iname")
    hub = hub[~hub["pert_iname"].str.upper().isin([CONTROL_COMPOUND_ID.upper(), ""])]
    return hub[(hub["smiles"].str.len() <= max_smiles_length) & ~hub["smiles"].str.contains(" ")].reset_index(drop=True)


def parse_doses(text: str) -> list[float]:
    """``"1,3,10"`` -> ``[1.0, 3.0, 10.0]``; every dose a positive number."""
    try:
        doses_um = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--doses {text!r}: expected comma-separated numbers in uM, e.g. 1,3,10") from None
    if not all(np.isfinite(d) and d > 0 for d in doses_um):
        raise ValueError(f"--doses {text!r}: every dose must be a positive number of uM")
    return doses_um


def layout_wells(drugs: pd.DataFrame, doses_um: list[float], replicates: int, rng: np.random.Generator,
                 plate_prefix: str) -> pd.DataFrame:
    """Every (drug, dose, replicate) on a random well; 32 random DMSO wells per 384-well plate."""
    conditions = [(d.pert_iname, d.smiles, dose) for d in drugs.itertuples() for dose in doses_um
                  for _ in range(replicates)]
    order = rng.permutation(len(conditions))
    wells = [well_name(r, c) for r in range(N_ROWS) for c in range(N_COLS)]
    per_plate = len(wells) - N_CONTROLS_PER_PLATE
    rows = []
    for plate in range(int(np.ceil(len(conditions) / per_plate))):
        chunk = iter(order[plate * per_plate:(plate + 1) * per_plate])
        controls = set(rng.choice(len(wells), N_CONTROLS_PER_PLATE, replace=False).tolist())
        barcode = f"{plate_prefix}{plate:02d}"
        for i, well in enumerate(wells):
            if i in controls:
                rows.append(dict(barcode=barcode, well=well, compound_id=CONTROL_COMPOUND_ID, smiles="", dose_um=0.0,
                                 role=WellRole.negative_control.value))
                continue
            k = next(chunk, None)
            if k is not None:
                name, smiles, dose = conditions[k]
                rows.append(dict(barcode=barcode, well=well, compound_id=name, smiles=smiles, dose_um=dose,
                                 role=WellRole.treatment.value))
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="CSV or Parquet (by suffix)")
    parser.add_argument("--n-drugs", type=int, default=300)
    parser.add_argument("--doses", default="10", help="comma-separated doses in uM")
    parser.add_argument("--replicates", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="drug draw, layout, lab noise and the lab's world")
    parser.add_argument("--active-fraction", type=float, default=0.08,
                        help="about this share of drugs is active in the lab's world (GroundTruth)")
    parser.add_argument("--hub", type=Path, default=HUB)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    doses_um = parse_doses(args.doses)
    if args.n_drugs < 1 or args.replicates < 1:
        raise ValueError(f"--n-drugs ({args.n_drugs}) and --replicates ({args.replicates}) must be >= 1")
    rng = np.random.default_rng(args.seed)
    hub = read_hub_drugs(args.hub)
    if args.n_drugs > len(hub):
        raise ValueError(f"--n-drugs {args.n_drugs}: {args.hub} has only {len(hub)} usable drugs")
    drugs = hub.iloc[rng.choice(len(hub), args.n_drugs, replace=False)].reset_index(drop=True)
    wells = layout_wells(drugs, doses_um, args.replicates, rng, plate_prefix=f"S{args.seed}-")
    truth = GroundTruth(world_seed=args.seed, active_fraction=args.active_fraction)
    lab = SyntheticLab(truth, seed=args.seed, config=SyntheticLabConfig(write_images=False))
    start = time.perf_counter()
    cells = lab.measure_plates(wells)
    log.info("measured %d wells in %.0f s", len(wells), time.perf_counter() - start)
    meta = wells.rename(columns={"barcode": META_PLATE, "well": META_WELL, "compound_id": META_COMPOUND,
                                 "smiles": META_SMILES, "dose_um": META_DOSE})
    table = meta[[META_PLATE, META_WELL, META_COMPOUND, META_SMILES, META_DOSE]].merge(
        aggregate_wells(cells), on=[META_PLATE, META_WELL], how="inner")
    write_profile_table(table, args.out)
    drug_truth = truth.for_smiles(drugs["smiles"].tolist())
    log.info("wrote %s: %d wells x %d columns; %d of %d drugs active in the lab's world %s", args.out, *table.shape,
             int(drug_truth["is_active"].sum()), len(drugs), drug_truth["phenotype_class"].value_counts().to_dict())


if __name__ == "__main__":
    main()
