#!/usr/bin/env bash
# Hydra multirun: global batch size x LR scaling rule on the offline demo set (NiN, strategy=firecaffe,
# 2 CPU processes per job), with Hydra's basic launcher: the jobs run one after another.
#
#   examples/sweep_batch_rule.sh                              # 3 batches x 3 rules = 9 jobs, ~4 epochs each
#   EPOCHS=8 examples/sweep_batch_rule.sh trainer.devices=1   # extra arguments are Hydra overrides
#
# The reference is batch 32 at LR 0.01 (model.lr, callbacks.large_batch.reference_batch); the larger batches
# get the LR that the rule gives (none: unchanged, sqrt, linear), with 1 epoch of warm-up. Each job writes
# summary.json in its directory; the table at the end collects them.
set -euo pipefail

EPOCHS="${EPOCHS:-4}"
BATCHES="${BATCHES:-64,256,512}"
RULES="${RULES:-none,sqrt,linear}"
WARMUP="${WARMUP:-1}"
SWEEP_DIR="${SWEEP_DIR:-logs/sweep_batch_rule/$(date +%Y-%m-%d_%H-%M-%S)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

${FIRECAFFE_TRAIN:-firecaffe-train} -m \
    experiment=demo task_name=sweep_batch_rule hydra.sweep.dir="$SWEEP_DIR" \
    global_batch_size="$BATCHES" \
    callbacks.large_batch.rule="$RULES" \
    callbacks.large_batch.warmup="$WARMUP" \
    trainer.max_epochs="$EPOCHS" \
    callbacks.progress_bar.refresh_rate=0 \
    "$@"

"${PYTHON:-python3}" - "$SWEEP_DIR" <<'PY'
import json, pathlib, sys
print(f"\n{'batch':>6} {'rule':>7} {'top-1':>7} {'top-5':>7} {'steps':>6} {'seconds':>8}")
for job in sorted(pathlib.Path(sys.argv[1]).glob("[0-9]*"), key=lambda p: int(p.name)):
    if not (job / "summary.json").exists():
        continue
    s = json.loads((job / "summary.json").read_text())
    o = dict(line[2:].split("=", 1) for line in (job / ".hydra" / "overrides.yaml").read_text().splitlines()
             if line.startswith("- ") and "=" in line)
    print(f"{o['global_batch_size']:>6} {o['callbacks.large_batch.rule']:>7} {100 * s['val_top1']:>6.1f}% "
          f"{100 * s['val_top5']:>6.1f}% {s['global_step']:>6} {s['fit_seconds']:>8.1f}")
PY
