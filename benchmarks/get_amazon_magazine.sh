#!/usr/bin/env bash
# Amazon Review Data (2018), category Magazine Subscriptions: ratings with timestamps and
# the category's item metadata, converted to the canonical tables.
#
# The raw files come from two public GitHub repositories that hold copies of the UCSD
# files (both under the 4 MiB a repository snapshot keeps). On a machine with the search
# tool, bring them with its fetch first:
#   fetch github:horaceyoung/Tri-Training-with-Deep-Document-Representations-Evaluation-FYP
#       -> data/Magazine_Subscriptions.csv  (ratings only: item,user,rating,unix time)
#   fetch github:kevincakey/CollaborativeRecommenderSystem
#       -> meta_Magazine_Subscriptions.json.gz  (item metadata, JSON lines)
# The same files are on the UCSD page of the data set (nijianmo.github.io/amazon) as
# "ratings only" and "metadata" of Magazine_Subscriptions.
#
# Usage: benchmarks/get_amazon_magazine.sh [DEST]   (DEST defaults to /work/data/amazon2018-magazine)
set -euo pipefail

DEST="${1:-/work/data/amazon2018-magazine}"
MIRROR="${MIRROR:-/work/.mirror}"
RATINGS_REPO="$MIRROR/horaceyoung+Tri-Training-with-Deep-Document-Representations-Evaluation-FYP/repo"
META_REPO="$MIRROR/kevincakey+CollaborativeRecommenderSystem/repo"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
RECSYS="${RECSYS:-$HERE/.venv/bin/recsys}"

for repo in "$RATINGS_REPO" "$META_REPO"; do
    if [ ! -d "$repo" ]; then
        echo "missing $repo: fetch the two repositories named at the top of this script" >&2
        exit 1
    fi
done

mkdir -p "$DEST/raw"
git -C "$RATINGS_REPO" show HEAD:data/Magazine_Subscriptions.csv > "$DEST/raw/Magazine_Subscriptions.csv"
git -C "$META_REPO" show HEAD:meta_Magazine_Subscriptions.json.gz > "$DEST/raw/meta_Magazine_Subscriptions.json.gz"
(cd "$DEST/raw" && sha256sum -c - <<'EOF'
6e1b48a78f7d4713a3f15abb028d5a1258e3c06d04b258b9d478f55d057a6696  Magazine_Subscriptions.csv
147cb78dac0f9ce04849b196e2e13cad6a504bff45d53500b7a1fe8121d91595  meta_Magazine_Subscriptions.json.gz
EOF
)

# every rating (72,098 users, most with one review) ...
"$RECSYS" ingest amazon "$DEST/raw/Magazine_Subscriptions.csv" \
    "$DEST/raw/meta_Magazine_Subscriptions.json.gz" "$DEST/all"
# ... and the users with at least two, the set the benchmarks use
"$RECSYS" ingest amazon "$DEST/raw/Magazine_Subscriptions.csv" \
    "$DEST/raw/meta_Magazine_Subscriptions.json.gz" "$DEST/min2" --min-user-events 2
