"""Write a library file of N SMILES for timing ``loop library add`` (distinct, or a real file's repeated).

The embedded virtual library has at most ~139k products; beyond that each product is
extended at its first atom (when that atom is an unbracketed atom with a free hydrogen) with
one of a few small alkyl/alkoxy chains, which gives new, valid structures without running
RDKit reactions. The file is a CSV with ``compound_id,smiles``.

    .venv/bin/python benchmarks/make_smiles_file.py --n 1000000 --out bench_out/library_1m.csv

``--repeat FILE`` instead writes N rows by cycling through the rows of a real library file (for
example the Drug Repurposing Hub's 13,553 samples in ``../shared``), the way a 10^6-row file is
often put together for a timing: ``loop library add`` then featurises each distinct SMILES once.

    .venv/bin/python benchmarks/make_smiles_file.py --n 1000000 --out bench_out/hub_1m.csv \
        --repeat ../shared/data/repurposing_hub/repurposing_samples_20200324.txt
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import pandas as pd
from rdkit import Chem

from lab_io.virtual_library import enumerate_library, max_library_size

log = logging.getLogger("make_smiles_file")

PREFIXES = ("", "C", "CC", "CCC", "CC(C)", "CCCC", "COC", "CC(C)C", "OCC", "FC(F)(F)C", "CCCCC", "CCOCC",
            "ClCCC", "CC(C)(C)C")


def extendable(smiles: str) -> bool:
    """True when a chain written before ``smiles`` bonds to a first atom that has a free H."""
    if not smiles or smiles[0] in "[(=#":
        return False
    mol = Chem.MolFromSmiles(smiles)
    return mol is not None and mol.GetAtomWithIdx(0).GetTotalNumHs() > 0


def write_repeated(source: Path, n: int, out: Path) -> None:
    """N rows cycling through ``source``'s rows (CSV, or tab-separated .txt/.tsv; '!' comment lines)."""
    sep = "\t" if source.suffix in (".txt", ".tsv") else ","
    table = pd.read_csv(source, sep=sep, comment="!", dtype=str)
    smiles = [c for c in table.columns if c.lower() == "smiles"]
    table = table.dropna(subset=smiles)
    if table.empty or not smiles:
        raise SystemExit(f"{source}: no rows with a SMILES column to repeat")
    repeated = pd.concat([table] * -(-n // len(table)), ignore_index=True).iloc[:n]
    out.parent.mkdir(parents=True, exist_ok=True)
    repeated.to_csv(out, index=False)
    log.info("wrote %d rows cycling the %d rows (%d distinct SMILES) of %s to %s", n, len(table),
             table[smiles[0]].nunique(), source, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=Path, default=None, help="cycle through this library file's rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.repeat is not None:
        write_repeated(args.repeat, args.n, args.out)
        return
    base = enumerate_library(min(args.n, max_library_size()), seed=args.seed)["smiles"].tolist()
    ok = [s for s in base if extendable(s)]
    log.info("%d virtual products, %d extendable at their first atom", len(base), len(ok))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(args.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["compound_id", "smiles"])
        for prefix in PREFIXES:
            for smiles in (base if prefix == "" else ok):
                if n == args.n:
                    break
                n += 1
                writer.writerow([f"BENCH-{n:07d}", prefix + smiles])
    if n < args.n:
        raise SystemExit(f"only {n} SMILES could be made (asked for {args.n})")
    log.info("wrote %d SMILES to %s", n, args.out)


if __name__ == "__main__":
    main()
