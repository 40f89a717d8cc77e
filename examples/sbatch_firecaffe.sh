#!/usr/bin/env bash
# Train with strategy=firecaffe on SLURM with a plain sbatch script (no Hydra launcher).
#
#   sbatch examples/sbatch_firecaffe.sh                       # 1 node x 2 tasks, the defaults below
#   sbatch --nodes=4 --ntasks-per-node=8 --gres=gpu:8 examples/sbatch_firecaffe.sh trainer=gpu
#   (arguments after the script name are passed on as Hydra overrides)
#
# RULE: one SLURM task per Trainer device. --ntasks-per-node MUST equal trainer.devices and --nodes MUST
# equal trainer.num_nodes: Lightning's SLURMEnvironment takes each rank from srun (SLURM_PROCID,
# SLURM_LOCALID, SLURM_NODEID) and refuses a mismatch. The srun line below derives both overrides from
# the allocation, so changing the two #SBATCH lines (or the sbatch command line) is enough.
#
# Preemption (a preemptible partition, or `scancel --signal=USR1 <job>`): SLURM sends SIGUSR1 120 s ahead,
# every rank checkpoints at the next step (callbacks.requeue.at=epoch: at the next epoch end, for a bitwise-exact
# resume) into the run directory, the job requeues itself and the restarted job resumes from there. This needs
# the --signal, --requeue and --open-mode lines below, and a fixed run directory (hydra.run.dir=...: the
# default one is named after the job id and step, the same across a requeue).
#
# Set FIRECAFFE_TRAIN to run another command, e.g. FIRECAFFE_TRAIN="python -m lightning_firecaffe.train".
# Keep the job name: Lightning ignores SLURM when the job is named "bash" or "interactive".
#
#SBATCH --job-name=firecaffe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append

set -euo pipefail

# One thread per rank unless the user chose otherwise (Lightning would set cores/processes otherwise).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# shellcheck disable=SC2086  # FIRECAFFE_TRAIN may hold a command with arguments
srun ${FIRECAFFE_TRAIN:-firecaffe-train} \
    trainer.devices="${SLURM_NTASKS_PER_NODE:?submit with --ntasks-per-node (= trainer.devices)}" \
    trainer.num_nodes="${SLURM_JOB_NUM_NODES}" \
    "$@"
