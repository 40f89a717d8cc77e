"""Training with strategy="firecaffe" on a real one-node SLURM cluster (slurmctld, slurmd, slurmdbd) on localhost.

The cluster comes up once for the module (``lightning_firecaffe.testing.slurm``: private state dir, munge,
MariaDB, ports and ``SLURM_CONF``) and is torn down afterwards, even if a test times out. Where SLURM is
not installed (``.ci/install-slurm.sh``) or we are not root, the tests skip with the reason.

(a) the plain sbatch example (``examples/sbatch_firecaffe.sh``) runs ``firecaffe-train`` in 2 srun tasks;
(b) ``firecaffe-train -m hydra/launcher=submitit_slurm`` submits a 2-task job (submitit polls sacct); the
    task count comes from ``trainer.devices`` through the launcher config (``tasks_per_node``).
Both train NiN on the demo shards for a few steps with ``rank_reports=true`` and check through the
``ranks/rank<N>.json`` files each rank writes that it trained on 2 ranks under Lightning's SLURMEnvironment.
(c) a dead job is reported by the launcher: it uses ``tests/integration/slurm_app/hydra_app.py`` (``die=true``), a
    tiny stand-in app whose tasks exit at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_firecaffe.testing.required import import_or_missing, missing
from lightning_firecaffe.testing.slurm import LocalSlurm, SlurmUnavailable, check_prerequisites

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "tests" / "integration" / "slurm_app"
APP = APP_DIR / "hydra_app.py"  # the stand-in whose tasks can die at once (test c)
FIRECAFFE_TRAIN = Path(sys.executable).with_name("firecaffe-train")
# tiny settings for the real app: a few steps of NiN on the demo shards, 2 ranks, no progress bar in the logs
TINY = [
    "data=demo",
    "model=nin",
    "trainer.max_steps=4",
    "global_batch_size=16",
    "rank_reports=true",
    "callbacks.progress_bar=null",
    "+trainer.enable_progress_bar=false",
]
SBATCH_EXAMPLE = ROOT / "examples" / "sbatch_firecaffe.sh"
JOB_TIMEOUT = 120  # seconds a submitted job may take, queueing included


@pytest.fixture(scope="module")
def slurm(built_demo_set):
    reason = check_prerequisites()
    if reason:
        print(f"\nSLURM tests skipped: {reason}", file=sys.stderr)
        missing(reason)
    try:
        cluster = LocalSlurm(start_timeout=90, ttl=900).up()
    except SlurmUnavailable as exc:  # pragma: no cover - check_prerequisites() already said so
        missing(str(exc))
    try:
        yield cluster
    finally:
        cluster.down()


def job_env(cluster: LocalSlurm) -> dict:
    env = cluster.env()
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_DIR), str(ROOT), env.get("PYTHONPATH")]))
    env.pop("MASTER_PORT", None)
    env.pop("MASTER_ADDR", None)
    return env


def read_ranks(out_dir: Path) -> dict[int, dict]:
    facts = [json.loads(p.read_text()) for p in sorted(out_dir.glob("ranks/rank*.json"))]
    return {f["global_rank"]: f for f in facts}


def check_two_slurm_ranks(out_dir: Path, diagnostics: str) -> None:
    ranks = read_ranks(out_dir)
    assert sorted(ranks) == [0, 1], (
        f"expected files from ranks 0 and 1 in {out_dir}, got {sorted(ranks)}\n{diagnostics}"
    )
    for rank, f in ranks.items():
        assert f["cluster_environment"] == "SLURMEnvironment", f
        assert f["strategy"] == "FireCaffeStrategy", f
        assert f["world_size"] == 2, f
        assert f["slurm_ntasks"] == "2" and f["slurm_procid"] == str(rank), f
        assert f["global_step"] == 4, f
        assert f["comm_hook"] == "firecaffe_hook", f  # the gradients went through the reduction tree
        assert f["bytes_sent"] > 0, f
    assert ranks[0]["slurm_job_id"] == ranks[1]["slurm_job_id"]
    assert ranks[0]["pid"] != ranks[1]["pid"]


def job_logs(folder: Path, pattern: str) -> str:
    return "\n".join(f"--- {p} ---\n" + p.read_text(errors="replace")[-3000:] for p in sorted(folder.rglob(pattern)))


@pytest.mark.timeout(180)
def test_sbatch_example_trains_on_two_slurm_ranks(slurm, tmp_path):
    out = tmp_path / "hydra"  # the run dir: rank files land in <run dir>/ranks/
    env = job_env(slurm)
    env["FIRECAFFE_TRAIN"] = str(FIRECAFFE_TRAIN)  # this venv's console script (the example's default name)
    t0 = time.monotonic()
    job_id = slurm.sbatch(
        f"--output={tmp_path}/slurm-%j.out",
        str(SBATCH_EXAMPLE),
        f"hydra.run.dir={out}",
        *TINY,
        env=env,
        cwd=tmp_path,
    )
    state = slurm.wait_job(job_id, timeout=JOB_TIMEOUT)
    diagnostics = f"job {job_id} {state}\n{job_logs(tmp_path, 'slurm-*.out')}"
    assert state == "COMPLETED", diagnostics
    check_two_slurm_ranks(out, diagnostics)
    print(f"\nsbatch job {job_id}: 2 ranks trained under SLURMEnvironment in {time.monotonic() - t0:.1f} s")


def hydra_multirun(cluster: LocalSlurm, tmp_path: Path, app: list[str], *overrides: str) -> subprocess.CompletedProcess:
    """``<app> -m hydra/launcher=submitit_slurm`` with 2 tasks on 1 node; returns or fails within JOB_TIMEOUT."""
    import_or_missing("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher is not installed")
    sweep = tmp_path / "multirun"
    cmd = [
        *app,
        "-m",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=5",
        "hydra.launcher.partition=debug",
        f"hydra.sweep.dir={sweep}",
        "trainer.devices=2",
        "trainer.num_nodes=1",
        *overrides,
    ]
    try:
        return subprocess.run(
            cmd, env=job_env(cluster), cwd=tmp_path, capture_output=True, text=True, timeout=JOB_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        cluster.run("scancel", "--user=root", timeout=10, check=False)
        pytest.fail(
            f"Hydra submitit launcher did not return within {JOB_TIMEOUT} s\n{exc.stderr}\n{job_logs(sweep, '*_log.*')}"
        )


@pytest.mark.timeout(180)
def test_hydra_submitit_launcher_trains_on_two_slurm_ranks(slurm, tmp_path):
    t0 = time.monotonic()
    # no hydra.launcher.tasks_per_node/nodes here: conf/hydra/launcher/submitit_slurm.yaml derives them
    r = hydra_multirun(slurm, tmp_path, [str(FIRECAFFE_TRAIN)], *TINY)
    sweep = tmp_path / "multirun"
    out = sweep / "0"  # the job's output dir
    diagnostics = (
        f"hydra rc={r.returncode}\nstdout={r.stdout[-3000:]}\nstderr={r.stderr[-3000:]}\n{job_logs(sweep, '*_log.*')}"
    )
    assert r.returncode == 0, diagnostics
    check_two_slurm_ranks(out, diagnostics)
    job_id = read_ranks(out)[0]["slurm_job_id"]
    # submitit returns once the result files exist; the job itself ends a moment later.
    assert slurm.wait_job(job_id, timeout=30) == "COMPLETED", diagnostics
    assert list(sweep.rglob(".submitit/*")), f"no submitit folder under {sweep}"
    print(f"\nhydra-submitit job {job_id}: 2 ranks trained under SLURMEnvironment in {time.monotonic() - t0:.1f} s")


@pytest.mark.timeout(180)
def test_hydra_submitit_launcher_reports_a_dead_job(slurm, tmp_path):
    """Tasks that exit without a result: submitit learns it from accounting (sacct) and Hydra fails, no hang."""
    t0 = time.monotonic()
    r = hydra_multirun(
        slurm,
        tmp_path,
        [sys.executable, str(APP)],
        "die=true",
        f"out_dir={tmp_path / 'ranks'}",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.nodes=1",  # the stand-in's launcher is not wired
    )
    assert r.returncode != 0, r.stdout[-2000:]
    assert "UncompletedJobError" in r.stderr and "FAILED" in r.stderr, r.stderr[-3000:]
    print(f"\nhydra-submitit dead job reported as FAILED in {time.monotonic() - t0:.1f} s")
