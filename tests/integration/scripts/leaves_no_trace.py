"""Every Trainer entry point under ``firecaffe`` on 2 CPU ranks leaves the process as ``ddp`` leaves it.

Run as a script (the launcher re-runs it for rank 1). Each rank first runs ``ddp`` (Lightning's own
environment variables are then set, as in any DDP job), snapshots ``os.environ`` and the live threads,
then runs ``firecaffe``'s fit/validate/test/predict, and writes what changed to ``OUT/trace-rank<r>.json``.
The script never ends its process group itself: at its very end (an exit handler registered before the
strategy's, so it runs after it) each rank writes ``OUT/exit-rank<r>.json``, saying whether the groups
were still alive. With ``--fail`` the firecaffe fit raises at step 2 on both ranks and the script catches
it, as a user's script may.
"""

import atexit
import json
import os
import sys
import threading
from pathlib import Path

import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

import lightning_firecaffe  # noqa: F401

RANK = {}


def record_groups_at_exit(out: Path) -> None:
    if "rank" in RANK:
        (out / f"exit-rank{RANK['rank']}.json").write_text(json.dumps({"groups_alive": dist.is_initialized()}))


def trainer(strategy: str) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=4,
        limit_val_batches=2,
        limit_test_batches=2,
        limit_predict_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


class FailsAtStep2(BoringModel):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            raise RuntimeError("the user's model failed at step 2")
        return super().training_step(batch, batch_idx)


def main(out: Path, fail: bool) -> int:
    atexit.register(record_groups_at_exit, out)
    if fail:
        runs = trainer("firecaffe")
        RANK["rank"] = runs.global_rank
        try:
            runs.fit(FailsAtStep2())
        except RuntimeError as exc:
            print(f"rank {runs.global_rank} caught: {exc}", flush=True)
            return 1
        return 0
    trainer("ddp").fit(BoringModel())
    env, threads = dict(os.environ), {t.ident for t in threading.enumerate()}
    runs = trainer("firecaffe")
    runs.fit(BoringModel())
    runs.validate(BoringModel())
    runs.test(BoringModel())
    runs.predict(BoringModel())
    changed = {
        k: [env.get(k), os.environ.get(k)] for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)
    }
    left = [t.name for t in threading.enumerate() if t.ident not in threads and t.is_alive()]
    rank = RANK["rank"] = runs.global_rank
    trace = {"changed": changed, "threads_left": left, "gloo_interface_was_chosen": rank_interface(runs)}
    (out / f"trace-rank{rank}.json").write_text(json.dumps(trace))
    return 0


def rank_interface(trainer: Trainer) -> bool:
    """Whether interface selection ran (it must, for the test to mean anything)."""
    return trainer.strategy.selected_gloo_interface is not None


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), "--fail" in sys.argv[2:]))
