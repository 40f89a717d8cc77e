#!/usr/bin/env bash
# Large-batch experiment on the offline demo set (issue 4, acceptance 6): NiN, strategy=firecaffe, 2 CPU
# processes, the same number of epochs for every job.
#   reference: global batch 32 at LR 0.01 (rule none and linear are the same there)
#   8x:        global batch 256, rule linear (LR 0.08) with WARMUP epochs of gradual warm-up, vs rule none
# Prints a table of top-1/top-5 per job. ~10 minutes on 2 cores with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
export BATCHES="${BATCHES:-32,256}" RULES="${RULES:-none,linear}" WARMUP="${WARMUP:-2}" EPOCHS="${EPOCHS:-16}"
exec examples/sweep_batch_rule.sh "$@"
