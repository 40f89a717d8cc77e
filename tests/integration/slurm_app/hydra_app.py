"""A tiny Hydra app shaped like ``firecaffe-train`` (``trainer.devices``, ``trainer.num_nodes`` overrides).

tests/test_slurm.py trains with the real ``firecaffe-train``; this stand-in remains for the dead-job test
(``die=true``: every task exits at once, which only SLURM accounting can report).

    python tests/integration/slurm_app/hydra_app.py out_dir=/tmp/x trainer.devices=2
    python tests/integration/slurm_app/hydra_app.py -m hydra/launcher=submitit_slurm hydra.launcher.tasks_per_node=2 ...

``tiny_training`` must be importable where the job runs: the test puts this directory on ``PYTHONPATH``
(sbatch exports the submitting environment to the job).
"""

import os

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    if cfg.die:  # a job that dies without a word (no result for submitit): only accounting can tell
        os._exit(3)
    from tiny_training import train

    facts = train(cfg.out_dir, cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.max_steps, cfg.strategy)
    return facts["losses"][-1]


if __name__ == "__main__":
    main()
