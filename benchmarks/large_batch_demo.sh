#!/usr/bin/env bash
# Large-batch experiment on the offline demo set (issue 4, acceptance 6): NiN, strategy=firecaffe, 2 CPU
# processes, 40 epochs for every run.
#   reference: global batch 32 at LR 0.003 (rule none)
#   8x:        global batch 256, rule linear (LR 0.024) with 5 epochs of gradual warm-up, vs rule none (LR 0.003)
# Measured (one seed): reference 90.5% top-1; 8x linear + warm-up 91.5%; 8x none 87.7%. ~9 minutes on 2 cores.
# With 16 epochs (96 large-batch steps) the 8x runs are too short for NiN: linear 85.5%, none 68.0%.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-logs/large_batch_demo/$(date +%Y-%m-%d_%H-%M-%S)}"
export EPOCHS="${EPOCHS:-40}" WARMUP="${WARMUP:-5}"
SWEEP_DIR="$OUT/reference" BATCHES=32 RULES=none examples/sweep_batch_rule.sh model.lr=0.003 "$@"
SWEEP_DIR="$OUT/batch8x" BATCHES=256 RULES=none,linear examples/sweep_batch_rule.sh model.lr=0.003 "$@"
