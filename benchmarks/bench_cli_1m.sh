#!/usr/bin/env bash
# End-to-end CLI timings on a 10^6-compound campaign (issue #4):
#   1. `loop library add` of 10^6 distinct SMILES (fingerprints included)      target < 5 min
#   2. one round: cold-start propose -> synthetic lab -> ingest -> train     (timed, no target)
#   3. `loop propose --budget 384` after that ingested round                  target < 10 min
#   4. `loop objective set --target-compound` (the most active measured hit), then
#      `loop propose --budget 384` chasing that phenotype (round-2 plates still pending)
# Usage: benchmarks/bench_cli_1m.sh [OUT_DIR]   (default bench_out/cli_1m; takes ~10 min on 2 cores)
#        N=20000 benchmarks/bench_cli_1m.sh bench_out/cli_small   (a quick check of the script)
set -euo pipefail
out=${1:-bench_out/cli_1m}
n=${N:-1000000}
py=${PYTHON:-.venv/bin/python}
loop=(${py} -m loop.cli)
rm -rf "$out" && mkdir -p "$out"
"$py" benchmarks/make_smiles_file.py --n "$n" --out "$out/library.csv"
"${loop[@]}" --campaign "$out/campaign" init
timed() {  # timed NAME CMD...: wall seconds and peak RSS into $out/timings.tsv
  local name=$1; shift
  /usr/bin/time -f "$name\t%e\t%M" -a -o "$out/timings.tsv" "$@"
}
printf "step\twall_s\tpeak_rss_kb\n" > "$out/timings.tsv"
timed library_add "${loop[@]}" --campaign "$out/campaign" library add "$out/library.csv"
timed propose_round1 "${loop[@]}" --campaign "$out/campaign" propose --budget 384
timed lab "${loop[@]}" --campaign "$out/campaign" lab run "$out/campaign/rounds/round-001/plates" \
  --out "$out/results-001" --no-images
timed ingest "${loop[@]}" --campaign "$out/campaign" ingest "$out/results-001"
timed train "${loop[@]}" --campaign "$out/campaign" train
timed propose_round2 "${loop[@]}" --campaign "$out/campaign" propose --budget 384
target=$("$py" - "$out/campaign" <<'EOF'
import sys
from sqlmodel import select
from loop import store
from loop.campaign import Campaign
campaign = Campaign.open(sys.argv[1])
with campaign.session() as session:
    print(session.exec(select(store.Measurement.compound_id).where(store.Measurement.is_hit)
                       .order_by(store.Measurement.activity.desc())).first())
EOF
)
timed objective_set "${loop[@]}" --campaign "$out/campaign" objective set --target-compound "$target"
timed propose_round3_target "${loop[@]}" --campaign "$out/campaign" propose --budget 384
column -t "$out/timings.tsv"
