"""Time and peak memory of `loop ingest` on a real-shaped CellProfiler delivery.

The real BR00121431 tables in ``../shared/data/cellprofiler`` (one Cell Painting field: ~1,900
features per compartment) are relabelled into ``--wells`` x ``--sites`` site folders of a plate a
fresh campaign proposed (a seeded subset of ``--cells`` of the field's 89 cells per site, so wells
differ), then ingested in this process with resident memory sampled every 10 ms (and the
process's own high-water mark, ``ru_maxrss``, which no sampling can miss). Reports the
single-cell table's size, the ingest's time and its peak memory above the start, and the same
scaled to a real 384-well plate with 9 fields of ~150 cells (time and memory grow with the cells).

    python benchmarks/bench_ingest_memory.py --wells 24 --sites 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench_common import start_benchmark

SHARED = (Path(os.environ.get("LOOP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
          / "cellprofiler" / "BR00121431" / "analysis")
SOURCE_SITE = "BR00121431-A01-1"
REAL_PLATE_CELLS = 384 * 9 * 150


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """Highest resident memory seen while running (sampled every ``every_s``)."""

    def __init__(self, every_s: float = 0.01):
        self.every_s, self.peak_mb, self._stop = every_s, resident_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, resident_mb())
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_site(site_dir: Path, source: dict[str, pd.DataFrame], barcode: str, well: str, site: int,
               image_number: int, n_cells: int, rng: np.random.Generator) -> None:
    """One site folder: the real field's tables with ``n_cells`` of its cells, relabelled."""
    keep = np.sort(rng.choice(source["Cells"]["ObjectNumber"].to_numpy(), size=n_cells, replace=False))
    site_dir.mkdir(parents=True)
    image = source["Image"].assign(ImageNumber=image_number, Metadata_Plate=barcode, Metadata_Well=well,
                                   Metadata_Site=site, Count_Nuclei=n_cells, Count_Cells=n_cells,
                                   Count_Cytoplasm=n_cells)
    image.to_csv(site_dir / "Image.csv", index=False)
    for name, link in (("Nuclei", "ObjectNumber"), ("Cells", "ObjectNumber"), ("Cytoplasm", "Parent_Cells")):
        table = source[name]
        table[table[link].isin(keep)].assign(ImageNumber=image_number).to_csv(site_dir / f"{name}.csv", index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wells", type=int, default=24, help="wells delivered (half DMSO, half treated)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--cells", type=int, default=60, help="cells per site (at most 89)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    options = start_benchmark(args)

    from loop.campaign import Campaign, CampaignConfig
    from loop.ingest import ingest_results
    from loop.library import add_virtual_library
    from loop.propose import propose

    source = {name: pd.read_csv(SHARED / SOURCE_SITE / f"{name}.csv") for name in ("Image", "Nuclei", "Cells",
                                                                                    "Cytoplasm")}
    with tempfile.TemporaryDirectory() as tmp:
        campaign = Campaign.init(Path(tmp) / "campaign", CampaignConfig(seed=0))
        add_virtual_library(campaign, 400, seed=0)
        proposal = propose(campaign, 384)
        barcode = proposal.barcodes[0]
        plate_map = pd.read_csv(next(proposal.out_dir.glob("*-MAP.txt")), sep="\t", keep_default_na=False)
        half = args.wells // 2
        wells = (list(plate_map.loc[plate_map["role"] == "negative_control", "well_position"][:half])
                 + list(plate_map.loc[plate_map["role"] == "treatment", "well_position"][:args.wells - half]))
        rng = np.random.default_rng(0)
        delivery = Path(tmp) / "delivery"
        image_number = 0
        for well in wells:
            for site in range(1, args.sites + 1):
                image_number += 1
                write_site(delivery / barcode / "analysis" / f"{barcode}-{well}-{site}", source, barcode, well, site,
                           image_number, args.cells, rng)
        start_mb = resident_mb()
        started = time.perf_counter()
        with PeakSampler() as sampler:
            reports = ingest_results(campaign, delivery, allow_missing_wells=True)
        seconds = time.perf_counter() - started
        stored = pd.read_parquet(campaign.measurements_dir / f"{barcode}.cells.parquet")
    n_cells = reports[0].n_cells
    features = [c for c in stored.columns if c.startswith(("Nuclei_", "Cells_", "Cytoplasm_"))]
    table_mb = n_cells * len(features) * stored[features[0]].dtype.itemsize / 2**20
    peak_mb = sampler.peak_mb - start_mb
    process_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole run (Linux: KiB)
    scale = REAL_PLATE_CELLS / n_cells
    result = dict(options=options, sites=image_number, cells=n_cells, features=len(features),
                  feature_dtype=str(stored[features[0]].dtype), table_mb=round(table_mb, 1),
                  seconds=round(seconds, 1), peak_above_start_mb=round(peak_mb, 1),
                  start_mb=round(start_mb, 1), process_peak_mb=round(process_peak_mb, 1),
                  peak_over_table=round(peak_mb / table_mb, 2),
                  real_plate=dict(cells=REAL_PLATE_CELLS, table_gb=round(table_mb * scale / 1024, 1),
                                  peak_gb=round(peak_mb * scale / 1024, 1), minutes=round(seconds * scale / 60)))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
