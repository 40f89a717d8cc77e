#!/usr/bin/env bash
# Does a 16-bit wire keep accuracy? The demo-set large-batch experiment (benchmarks/large_batch_demo.sh:
# NiN, strategy=firecaffe, 2 CPU processes, 40 epochs, poly decay) with gradients travelling as fp32, bf16,
# and bf16 with error feedback, SEEDS seeds each, for the reference batch (32 at LR 0.003) and the 8x batch
# (256, linear scaling with 5 epochs of warm-up). Prints mean top-1 +- spread per (batch, wire).
#   benchmarks/compression_accuracy.sh                 # ~1 h on 2 cores (18 runs)
#   CONFIGS=batch8x SEEDS=0,1,2 benchmarks/compression_accuracy.sh   # the large batch only (~20 min)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-logs/compression_accuracy/$(date +%Y-%m-%d_%H-%M-%S)}"
SEEDS="${SEEDS:-0,1,2}"
CONFIGS="${CONFIGS:-batch8x,reference}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
for config in ${CONFIGS//,/ }; do
    case "$config" in
        reference) args=(global_batch_size=32 callbacks.large_batch.rule=none) ;;
        batch8x) args=(global_batch_size=256 callbacks.large_batch.rule=linear callbacks.large_batch.warmup=5) ;;
        *) echo "unknown config $config" >&2; exit 2 ;;
    esac
    for wire in fp32 bf16 bf16_feedback; do
        case "$wire" in
            fp32) wire_args=(strategy.compression=null) ;;
            bf16) wire_args=(strategy.compression=bf16) ;;
            bf16_feedback) wire_args=(strategy.compression=bf16 strategy.compression_error_feedback=true) ;;
        esac
        ${FIRECAFFE_TRAIN:-firecaffe-train} -m experiment=demo task_name=compression_accuracy \
            hydra.sweep.dir="$OUT/$config/$wire" model.lr=0.003 trainer.max_epochs=40 \
            callbacks.progress_bar.refresh_rate=0 seed="$SEEDS" "${args[@]}" "${wire_args[@]}" "$@"
    done
done
"${PYTHON:-python3}" - "$OUT" <<'PY'
import json, pathlib, statistics, sys
root = pathlib.Path(sys.argv[1])
print(f"\n{'batch':>10} {'wire':>14} {'top-1 mean':>11} {'spread':>7}  seeds")
for config in sorted(p for p in root.iterdir() if p.is_dir()):
    for wire in ("fp32", "bf16", "bf16_feedback"):
        runs = [json.loads(f.read_text()) for f in sorted((config / wire).glob("*/summary.json"))]
        accs = [100 * r["val_top1"] for r in runs if r.get("val_top1") is not None]
        if accs:
            spread = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            print(f"{config.name:>10} {wire:>14} {statistics.mean(accs):>10.2f}% {spread:>7.2f}  "
                  + ", ".join(f"{a:.1f}" for a in accs))
PY
