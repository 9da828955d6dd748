#!/usr/bin/env bash
# The GPU path end to end, on a CUDA machine: the `gpu` tests, item encoding items/s on
# the GPU, and per data set a full `recsys fit` with the language model (timed, peak
# memory) and `recsys evaluate` (NDCG@10 of the pipeline, the no-LM ablation and EASE).
#
# Usage: benchmarks/gpu.sh [WORK]      (WORK defaults to /tmp/recsys-gpu)
#   ML_RAW=...   ml-latest-small as downloaded (default ../shared/datasets/ml-latest-small)
#   TEXT_RICH=.. a canonical folder (interactions.parquet + items.parquet) of the
#                text-rich set (default /work/data/amazon2018-magazine/min2, made by
#                benchmarks/get_amazon_magazine.sh); skipped when absent
#   SEED=0       the pipeline's seed
#   ONLY=...     the sets to run, comma-separated (text-rich,ml-latest-small: the default,
#                the shorter first)
#   STEP_TIMEOUT=0  seconds each encode, fit or evaluate may take (0: no limit), so that
#                one slow step cannot spend a lent machine's whole time
# Each set's line of the summary is appended to WORK/summary.txt as soon as the set is
# done, and every step's output is in WORK as it runs: a run cut short keeps what it did.
# Exits 1 without a CUDA device; every other failure stops the script (set -e).
set -euo pipefail

HERE="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$HERE/.venv/bin}"
WORK="${1:-/tmp/recsys-gpu}"
ML_RAW="${ML_RAW:-$HERE/../shared/datasets/ml-latest-small}"
TEXT_RICH="${TEXT_RICH:-/work/data/amazon2018-magazine/min2}"
SEED="${SEED:-0}"
ONLY="${ONLY:-text-rich,ml-latest-small}"
STEP_TIMEOUT="${STEP_TIMEOUT:-0}"
mkdir -p "$WORK"
cd "$HERE"
step() { timeout "$STEP_TIMEOUT" "$@"; } # timeout 0: no limit

"$BIN/python" - <<'EOF' || { echo "no CUDA device: torch.cuda.is_available() is False" >&2; exit 1; }
import sys, torch
if not torch.cuda.is_available():
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB")
EOF

echo "== gpu tests"
"$BIN/python" -m pytest -q -m gpu -p no:cacheprovider tests/

sets=()
IFS=, read -ra wanted <<<"$ONLY"
for want in "${wanted[@]}"; do
    case "$want" in
    text-rich)
        if [ -f "$TEXT_RICH/interactions.parquet" ]; then
            sets+=("text-rich=$TEXT_RICH")
        else
            echo "text-rich set not found at $TEXT_RICH: skipped (benchmarks/get_amazon_magazine.sh)" >&2
        fi
        ;;
    ml-latest-small)
        if [ -d "$ML_RAW" ]; then
            [ -f "$WORK/ml/interactions.parquet" ] ||
                "$BIN/recsys" ingest movielens "$ML_RAW" "$WORK/ml"
            sets+=("ml-latest-small=$WORK/ml")
        else
            echo "ml-latest-small not found at $ML_RAW: skipped" >&2
        fi
        ;;
    *)
        echo "unknown set in ONLY: $want (text-rich, ml-latest-small)" >&2
        exit 2
        ;;
    esac
done

printf 'seed = %s\n' "$SEED" > "$WORK/seed.toml"
summary=()
for entry in "${sets[@]}"; do
    name="${entry%%=*}"
    data="${entry#*=}"
    echo "== $name ($data)"
    step "$BIN/recsys" bench encode --items "$data/items.parquet" --device cuda --n 5000 \
        | tee "$WORK/encode_$name.txt"
    step /usr/bin/time -v "$BIN/recsys" fit --config "$WORK/seed.toml" \
        --interactions "$data/interactions.parquet" --items "$data/items.parquet" \
        --out "$WORK/bundle_$name" 2> >(tee "$WORK/fit_$name.log" >&2)
    step "$BIN/recsys" evaluate --config "$WORK/seed.toml" \
        --interactions "$data/interactions.parquet" --items "$data/items.parquet" \
        --out "$WORK/eval_$name" 2> "$WORK/eval_$name.log"
    line="$("$BIN/python" - "$name" "$WORK" <<'EOF'
import json, re, sys
from pathlib import Path

name, work = sys.argv[1], Path(sys.argv[2])
log = (work / f"fit_{name}.log").read_text()
wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", log).group(1)
peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1)) / 2**20
lm = json.loads((work / f"bundle_{name}" / "manifest.json").read_text()).get("lm", {})
n_items = lm.get("id_items") or 0
enc_s = lm.get("timings_s", {}).get("encode (frozen)")
rate = f"{n_items / enc_s:,.0f} items/s" if n_items and enc_s else "n/a"
m = json.loads((work / f"eval_{name}" / "metrics.json").read_text())
ndcg = {k: v.get("ndcg@10") for k, v in m["models"].items() if isinstance(v, dict)}
print(f"{name}: fit {wall} (peak {peak:.1f} GiB), frozen encoding in the fit {rate}, "
      f"NDCG@10 " + ", ".join(f"{k} {v:.4f}" for k, v in ndcg.items() if v is not None))
EOF
)"
    echo "$line" | tee -a "$WORK/summary.txt"
    summary+=("$line")
done

echo
echo "== summary (seed $SEED)"
printf '%s\n' "${summary[@]}"
