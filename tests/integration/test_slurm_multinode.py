"""``firecaffe-train`` on a real two-node SLURM: each node an emulated host (own network namespace, address,
hostname, 1 Gbit/s shaped link, own slurmd), one slurmctld (``lightning_firecaffe.testing.slurm_cluster``).

Node 1 is multi-homed the classic wrong way: its own hostname resolves to a second interface (``fcmgmt0``)
that no other node reaches, so gloo's hostname-based default would bind there; the strategy must pick
``fcnet0``, the interface that routes to MASTER_ADDR (node0). Every training test below therefore also
checks interface selection. Each rank writes ``ranks/rank<N>.json`` (``rank_reports=true``): world size,
node rank, ranks per node as the strategy used them, algorithm per bucket, gloo interface, hostname.

Skips with the reason where SLURM (``.ci/install-slurm.sh``), root or network namespaces are unavailable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_firecaffe.testing.cluster import can_emulate
from lightning_firecaffe.testing.required import import_or_missing, missing
from lightning_firecaffe.testing.slurm import SlurmUnavailable, check_prerequisites

ROOT = Path(__file__).resolve().parents[2]
FIRECAFFE_TRAIN = Path(sys.executable).with_name("firecaffe-train")
SBATCH_EXAMPLE = ROOT / "examples" / "sbatch_firecaffe.sh"
STEPS = 3
# 2 nodes x 2 ranks of NiN on the demo shards, pinned to two_level, a few steps, no progress bar
TINY = [
    "data=demo",
    "model=nin",
    f"trainer.max_steps={STEPS}",
    "rank_reports=true",
    "strategy.algorithm=two_level",
    "callbacks.progress_bar=null",
    "+trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]
# the sbatch runs: 3 epochs of 2 steps, the preemption checkpoint at an epoch end (bitwise-exact resume)
EPOCHS_STEPS = 6
EPOCHS = [
    *(o for o in TINY if not o.startswith("trainer.max_steps")),
    f"trainer.max_steps={EPOCHS_STEPS}",
    "trainer.max_epochs=8",  # max_steps ends the run (the demo experiment alone trains one long epoch)
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "callbacks.requeue.at=epoch",
    "+data.persistent_workers=false",
    "global_batch_size=8",
]
REFERENCE: dict[str, str] = {}  # final weights of the uninterrupted sbatch run, for the preemption test
JOB_TIMEOUT = 240  # seconds one job may take, queueing included (4 ranks share 2 cores)


@pytest.fixture(scope="module")
def slurm2(built_demo_set):
    reason = check_prerequisites()
    ok, why = can_emulate()
    if reason or not ok:
        missing(reason or why)
    from lightning_firecaffe.testing.slurm_cluster import EmulatedSlurm

    try:
        cluster = EmulatedSlurm(nodes=2, rate="1gbit", misleading_hostnames=(1,), start_timeout=120, ttl=1800).up()
    except SlurmUnavailable as exc:  # pragma: no cover - the checks above already said so
        missing(str(exc))
    try:
        yield cluster
    finally:
        cluster.down()


def job_env(cluster) -> dict:
    env = cluster.env()
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["FIRECAFFE_TRAIN"] = str(FIRECAFFE_TRAIN)
    for var in ("MASTER_PORT", "MASTER_ADDR", "GLOO_SOCKET_IFNAME"):
        env.pop(var, None)
    return env


def job_logs(folder: Path, *patterns: str, tail: int = 2500) -> str:
    files = sorted(p for pattern in patterns for p in folder.rglob(pattern))
    return "\n".join(f"--- {p} ---\n" + p.read_text(errors="replace")[-tail:] for p in files)


def read_ranks(out_dir: Path) -> dict[int, dict]:
    facts = [json.loads(p.read_text()) for p in sorted(out_dir.glob("ranks/rank*.json"))]
    return {f["global_rank"]: f for f in facts}


def check_two_nodes_two_ranks(out_dir: Path, diagnostics: str, steps: int = STEPS) -> dict[int, dict]:
    ranks = read_ranks(out_dir)
    assert sorted(ranks) == [0, 1, 2, 3], f"rank files in {out_dir}: {sorted(ranks)}\n{diagnostics}"
    for rank, f in ranks.items():
        node = rank // 2
        assert f["cluster_environment"] == "SLURMEnvironment", f
        assert f["world_size"] == 4 and f["slurm_ntasks"] == "4", f
        assert f["node_rank"] == node and f["local_rank"] == rank % 2, f
        assert f["hostname"] == f"node{node}", f  # the rank ran on that node (its own UTS hostname)
        assert f["global_step"] == steps, f
        assert f["comm_hook"] == "firecaffe_hook", f
        assert f["ranks_per_node"] == 2, f  # two_level grouped the ranks by node
        assert f["algorithms"] and set(f["algorithms"].values()) == {"two_level"}, f
        # node 1's hostname resolves to fcmgmt0: the strategy chose the interface that routes to node0
        assert f["gloo_socket_ifname"] == "fcnet0", f
    assert len({f["slurm_job_id"] for f in ranks.values()}) == 1
    return ranks


def check_links_carried_the_gradients(cluster, before: dict, ranks: dict[int, dict], steps: int = STEPS) -> None:
    """two_level: each node's leader sends at least the whole gradient per step across its link (plus the
    initial broadcast of the weights); loopback traffic inside a node never shows on fcnet0."""
    after = cluster.link_bytes()
    gradient = ranks[0]["gradient_bytes"]
    for node in ("node0", "node1"):
        sent = after[node]["tx_bytes"] - before[node]["tx_bytes"]
        received = after[node]["rx_bytes"] - before[node]["rx_bytes"]
        assert sent >= steps * gradient * 0.9 and received >= steps * gradient * 0.9, (node, sent, received, gradient)


def hydra_multirun(cluster, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    import_or_missing("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher is not installed")
    sweep = tmp_path / "multirun"
    cmd = [
        str(FIRECAFFE_TRAIN),
        "-m",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.partition=debug",
        f"hydra.sweep.dir={sweep}",
        *overrides,
    ]
    try:
        return subprocess.run(
            cmd, env=job_env(cluster), cwd=tmp_path, capture_output=True, text=True, timeout=2 * JOB_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        cluster.run("scancel", "--user=root", timeout=10, check=False)
        pytest.fail(
            f"Hydra submitit launcher did not return within {2 * JOB_TIMEOUT} s\n{exc.stderr}\n"
            f"{job_logs(sweep, '*_log.*')}"
        )


@pytest.mark.timeout(2 * JOB_TIMEOUT + 120)
def test_hydra_submitit_sweep_trains_on_two_nodes_with_two_level(slurm2, tmp_path):
    """Acceptance 1 (and 3, first half): the user's command with a two-value sweep, 2 nodes x 2 ranks."""
    t0 = time.monotonic()
    before = slurm2.link_bytes()
    r = hydra_multirun(slurm2, tmp_path, "trainer.num_nodes=2", "trainer.devices=2", "global_batch_size=8,16", *TINY)
    sweep = tmp_path / "multirun"
    diagnostics = (
        f"hydra rc={r.returncode}\nstdout={r.stdout[-2000:]}\nstderr={r.stderr[-3000:]}\n{job_logs(sweep, '*_log.*')}"
    )
    assert r.returncode == 0, diagnostics
    job_ids = []
    for job in ("0", "1"):
        ranks = check_two_nodes_two_ranks(sweep / job, diagnostics)
        job_ids.append(ranks[0]["slurm_job_id"])
    assert len(set(job_ids)) == 2  # two SLURM jobs, one per value of the sweep
    check_links_carried_the_gradients(slurm2, before, ranks)
    for job_id in job_ids:
        assert slurm2.wait_job(job_id, timeout=30) == "COMPLETED", diagnostics
    # the chosen interface is said once per node (local rank 0), in the job's log
    logs = job_logs(sweep, "*_log.out", "*_log.err")
    assert "gloo uses interface fcnet0" in logs, logs[-3000:]
    print(f"\nhydra-submitit sweep: 2 jobs x 2 nodes x 2 ranks trained in {time.monotonic() - t0:.1f} s")


def sbatch_example(cluster, tmp_path: Path, out: Path, *overrides: str, env: dict | None = None) -> str:
    return cluster.sbatch(
        "--nodes=2",
        "--ntasks-per-node=2",
        f"--output={tmp_path}/slurm-%j.out",
        str(SBATCH_EXAMPLE),
        f"hydra.run.dir={out}",
        *overrides,
        env=env or job_env(cluster),
        cwd=tmp_path,
    )


def run_reference(cluster, tmp_path: Path) -> dict[int, dict]:
    """The uninterrupted sbatch run of the preemption config; its final weights go to REFERENCE."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "run"
    before = cluster.link_bytes()
    job_id = sbatch_example(cluster, tmp_path, out, *EPOCHS)
    state = cluster.wait_job(job_id, timeout=JOB_TIMEOUT)
    diagnostics = f"job {job_id} {state}\n{job_logs(tmp_path, 'slurm-*.out')}"
    assert state == "COMPLETED", diagnostics
    ranks = check_two_nodes_two_ranks(out, diagnostics, steps=EPOCHS_STEPS)
    check_links_carried_the_gradients(cluster, before, ranks, steps=EPOCHS_STEPS)
    assert len({f["weights_sha256"] for f in ranks.values()}) == 1  # replicas identical
    REFERENCE["weights_sha256"] = ranks[0]["weights_sha256"]
    return ranks


@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_sbatch_example_trains_on_two_nodes(slurm2, tmp_path):
    """Acceptance 2: ``sbatch --nodes=2 --ntasks-per-node=2 examples/sbatch_firecaffe.sh`` with overrides."""
    t0 = time.monotonic()
    run_reference(slurm2, tmp_path)
    print(f"\nsbatch: 2 nodes x 2 ranks trained {EPOCHS_STEPS} steps in {time.monotonic() - t0:.1f} s")


def restarts(cluster, job_id: str) -> int:
    out = cluster.run("scontrol", "show", "job", job_id, timeout=15, check=False).stdout
    fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
    return int(fields.get("Restarts", "0"))


@pytest.mark.timeout(3 * JOB_TIMEOUT + 60)
def test_preempted_job_requeues_and_resumes_bitwise(slurm2, tmp_path):
    """Acceptance 4: SIGUSR1 mid-run (as SLURM sends before preemption) -> checkpoint at the epoch end, requeue,
    resume from hpc_ckpt_1.ckpt, finish; final weights bitwise equal to the uninterrupted run's."""
    t0 = time.monotonic()
    if "weights_sha256" not in REFERENCE:  # run alone (-k): make the reference here
        run_reference(slurm2, tmp_path / "reference")
    out = tmp_path / "run"
    job_id = sbatch_example(slurm2, tmp_path, out, *EPOCHS)
    log_file = tmp_path / f"slurm-{job_id}.out"
    deadline = time.monotonic() + JOB_TIMEOUT
    # every rank has its handler (installed at setup, before training): signal now, mid-run
    while log_file.read_text(errors="replace").count("] preemption: on SIGUSR1") < 4 if log_file.exists() else True:
        assert time.monotonic() < deadline, f"handlers not installed in time\n{job_logs(tmp_path, 'slurm-*.out')}"
        assert slurm2.job_state(job_id) in ("", "PENDING", "RUNNING"), job_logs(tmp_path, "slurm-*.out")
        time.sleep(0.5)
    slurm2.run("scancel", "--signal=USR1", job_id, timeout=15)
    # SLURM holds a requeued job back (its begin time is set ~2 minutes ahead); release it at once
    while not (restarts(slurm2, job_id) == 1 and slurm2.job_state(job_id) == "PENDING"):
        assert time.monotonic() < deadline, f"job {job_id} not requeued\n{job_logs(tmp_path, 'slurm-*.out')}"
        time.sleep(0.5)
    slurm2.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", timeout=15, check=False)
    state = slurm2.wait_job(job_id, timeout=2 * JOB_TIMEOUT)
    log = job_logs(tmp_path, "slurm-*.out", tail=100_000)
    diagnostics = f"job {job_id} {state}\n{log[-6000:]}"
    assert state == "COMPLETED", diagnostics
    assert restarts(slurm2, job_id) == 1, diagnostics
    assert "preemption: saved" in log and "requeueing SLURM job" in log, diagnostics
    assert (out / "hpc_ckpt_1.ckpt").exists(), diagnostics
    assert "Restoring states from the checkpoint path at" in log and "hpc_ckpt_1.ckpt" in log, diagnostics
    ranks = check_two_nodes_two_ranks(out, diagnostics, steps=EPOCHS_STEPS)
    assert {f["weights_sha256"] for f in ranks.values()} == {REFERENCE["weights_sha256"]}, diagnostics
    print(
        f"\npreempted job {job_id}: requeued, resumed, bitwise equal to the uninterrupted run; "
        f"{time.monotonic() - t0:.1f} s"
    )


@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_a_wrong_gloo_interface_fails_fast_naming_the_interfaces(slurm2, tmp_path):
    """Acceptance 3, second half: GLOO_SOCKET_IFNAME=doesnotexist fails every rank before any rendezvous."""
    t0 = time.monotonic()
    env = job_env(slurm2)
    env["GLOO_SOCKET_IFNAME"] = "doesnotexist"  # sbatch exports the submitting environment to the job
    job_id = slurm2.sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--output={tmp_path}/slurm-%j.out",
        str(SBATCH_EXAMPLE),
        f"hydra.run.dir={tmp_path / 'run'}",
        "global_batch_size=8",
        *TINY,
        env=env,
        cwd=tmp_path,
    )
    state = slurm2.wait_job(job_id, timeout=JOB_TIMEOUT)
    elapsed = time.monotonic() - t0
    log = job_logs(tmp_path, "slurm-*.out", tail=100_000)
    assert state.startswith("FAILED"), f"job {job_id} {state}\n{log}"
    for node in ("node0", "node1"):
        assert f"GLOO_SOCKET_IFNAME='doesnotexist': no network interface 'doesnotexist' on {node}" in log, log[-4000:]
    assert "fcnet0 (10.78." in log and "lo (127.0.0.1/8)" in log and "fcmgmt0 (10.79.2.2/24)" in log, log[-4000:]
    assert not list((tmp_path / "run").glob("ranks/*.json"))  # nobody trained
    print(f"\nGLOO_SOCKET_IFNAME=doesnotexist: job {job_id} {state} in {elapsed:.1f} s")


STALL_TIMEOUT = 20


def survivor_error(sweep: Path, task: int) -> BaseException:
    """The exception a task of the (only) submitit job ended with, from its result file."""
    import pickle

    (result,) = sweep.glob(f".submitit/*/*_{task}_result.pkl")
    outcome, job_return = pickle.loads(result.read_bytes())
    value = getattr(job_return, "_return_value", job_return)
    assert isinstance(value, BaseException), (outcome, job_return)
    return value


@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_a_dead_node_fails_the_job_naming_the_lost_ranks(slurm2, tmp_path):
    """Acceptance 5 (last in the module: node1 is restarted afterwards): node1's slurmd and ranks are SIGKILLed
    mid-training; node0's ranks fail within the stall timeout naming a rank of node1, and the Hydra submitit
    launcher returns the failed job instead of waiting."""
    import_or_missing("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher is not installed")
    sweep = tmp_path / "multirun"
    overrides = [
        *(o for o in TINY if not o.startswith("trainer.max_steps")),
        "trainer.max_steps=200",
        "trainer.max_epochs=1000",
        "+trainer.limit_val_batches=1",
        "global_batch_size=8",
        f"strategy.stall_timeout={STALL_TIMEOUT}",
        "callbacks.requeue=null",
        "callbacks.large_batch.guard=false",
    ]  # their per-step all-reduces (requeue's flag, the divergence guard's loss) would be other places to notice
    cmd = [
        str(FIRECAFFE_TRAIN),
        "-m",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.partition=debug",
        f"hydra.sweep.dir={sweep}",
        "trainer.num_nodes=2",
        "trainer.devices=2",
        *overrides,
    ]
    t0 = time.monotonic()
    before = slurm2.link_bytes()["node1"]["tx_bytes"]
    with open(tmp_path / "hydra.out", "w") as out, open(tmp_path / "hydra.err", "w") as err:
        hydra = subprocess.Popen(cmd, env=job_env(slurm2), cwd=tmp_path, stdout=out, stderr=err)
    try:
        # training has run a few steps once node1 has sent more than the gradients of two steps
        deadline = time.monotonic() + JOB_TIMEOUT
        while slurm2.link_bytes()["node1"]["tx_bytes"] - before < 2 * 30_000_000:
            assert hydra.poll() is None, (tmp_path / "hydra.err").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no training traffic from node1\n{job_logs(sweep, '*_log.*')}"
            time.sleep(0.5)
        killed_at = time.monotonic()
        assert slurm2.kill_node(1)  # its slurmd, slurmstepd and both ranks
        rc = hydra.wait(timeout=JOB_TIMEOUT)
        returned_after = time.monotonic() - killed_at
    finally:
        if hydra.poll() is None:
            hydra.kill()
            hydra.wait(timeout=10)
            slurm2.run("scancel", "--user=root", timeout=10, check=False)
    stderr = (tmp_path / "hydra.err").read_text(errors="replace")
    logs = job_logs(sweep, "*_log.out", "*_log.err", tail=20_000)
    diagnostics = f"rc={rc}\n{stderr[-3000:]}\n{logs[-6000:]}"
    assert rc != 0 and "UncompletedJobError" in stderr, diagnostics
    assert "NODE_FAIL" in stderr or "FAILED" in stderr, diagnostics
    # the survivors on node0 failed naming a lost rank (2 or 3, node1's): Hydra's job wrapper keeps the error
    # in the task's result (submitit logs "completed"), where the launcher would raise it
    errors = [str(survivor_error(sweep, task)) for task in (0, 1)]
    lost = re.search(
        r"FireCaffe all-reduce on rank 0: (ranks? [0-9, and]+) closed (its connection|their connections)", errors[0]
    )
    assert lost and ("2" in lost.group(1) or "3" in lost.group(1)) and "rank 0 " not in lost.group(1), errors
    assert all("gradient bucket" in e for e in errors), errors
    assert returned_after < slurm2.slurmd_timeout + STALL_TIMEOUT + 60, returned_after
    assert not list(sweep.glob("0/ranks/*.json"))
    slurm2.restart_node(1)  # leave the cluster whole
    print(
        f"\ndead node: survivors failed, launcher returned {returned_after:.1f} s after the kill "
        f"(stall timeout {STALL_TIMEOUT} s, SlurmdTimeout {slurm2.slurmd_timeout} s); {time.monotonic() - t0:.1f} s"
    )
