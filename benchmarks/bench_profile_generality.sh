#!/usr/bin/env bash
# Does `loop backtest --profiles` beat random on profile tables other than BBBC021? (issue #4)
# Builds per-well tables of real Drug Repurposing Hub drugs measured by the synthetic lab
# (benchmarks/make_profile_table.py) and backtests each with the default policies (the four of issue #4 and the GP reference gp_ucb).
#   rich_6dose:  150 drugs x 6 doses (0.04-10 uM), 2 replicates, ~30 % of drugs active   (~8 min)
#   rich_1dose:  300 drugs at 10 uM, 2 replicates, ~30 % active (world 12)               (~6 min)
#   rich_1dose_b: the same in world 13, where round 1 finds no hit                       (~6 min)
#   sparse_1dose: 300 drugs at 10 uM, 2 replicates, ~8 % active (many "hits" are noise)  (~6 min)
# Usage: benchmarks/bench_profile_generality.sh [OUT_DIR]   (default bench_out/generality)
# Results: OUT_DIR/NAME.json (+ .png) and a summary of hit fractions after the last round.
set -euo pipefail
out=${1:-bench_out/generality}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
tables=(
  "rich_6dose --n-drugs 150 --doses 0.04,0.12,0.37,1.11,3.33,10 --replicates 2 --seed 11 --active-fraction 0.3"
  "rich_1dose --n-drugs 300 --doses 10 --replicates 2 --seed 12 --active-fraction 0.3"
  "rich_1dose_b --n-drugs 300 --doses 10 --replicates 2 --seed 13 --active-fraction 0.3"
  "sparse_1dose --n-drugs 300 --doses 10 --replicates 2 --seed 1"
)
for spec in "${tables[@]}"; do
  read -r name args <<< "$spec"
  # shellcheck disable=SC2086
  "$py" benchmarks/make_profile_table.py --out "$out/$name.csv" $args
  /usr/bin/time -f "$name\t%e s\t%M kB" -a -o "$out/timings.tsv" \
    "$py" -m loop.cli backtest --profiles "$out/$name.csv" --control-label DMSO --rounds 3 --batch-size 8 \
    --seeds 5 --json "$out/$name.json"
done
"$py" - "$out" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    result = json.loads(path.read_text())
    cells = [f"{p} {v['hit_fraction_mean'][-1]:.3f} ± {v['hit_fraction_sd'][-1]:.3f}" for p, v in result["policies"].items()]
    print(f"{path.stem:13s} {result['n_hits']:3d} hits of {result['n_conditions']:4d}: " + "; ".join(cells))
PY
