"""Ray cluster bootstrap on the real Slurm lab: real sbatch/srun, real Ray, real signals.

Each lab node is its own network/PID/UTS namespace with its own IP, so "distinct IPs" and
"no process left on any node" are checked for real. No vLLM here: the head holds the formed
cluster (SLURM_VLLM_NODE_NO_SERVE=1).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lab.lab import (
    assert_no_processes,
    job_nodes,
    job_processes,
    make_job,
    node_log,
    read_state,
    sbatch,
    scancel,
    squeue_state,
    wait_for,
    wait_gone,
    wait_running,
    wrap_node_command,
)

pytestmark = pytest.mark.lab


def _formed(jd, n: int):
    def check():
        s = read_state(jd)
        return s if s.get("nodes_joined") == n and s.get("phase") == "LOADING_MODEL" else None
    return check


@pytest.mark.parametrize("n", [2, 3])
def test_cluster_forms_with_distinct_ips_and_progress(lab, jobs, workdir: Path, n: int) -> None:
    jd = make_job(workdir, lab, nodes=n, name=f"form{n}")
    job = jobs.start(jd.script)
    t0 = time.monotonic()
    seen: list[tuple[str, int]] = []

    def progress():
        s = read_state(jd)
        if s.get("phase"):
            key = (s["phase"], s.get("nodes_joined", -1))
            if not seen or seen[-1] != key:
                seen.append(key)
        return s if s.get("phase") == "LOADING_MODEL" else None

    try:
        state = wait_for(progress, 150, f"{n}-node cluster to form", poll=0.05)
    except AssertionError as e:
        logs = "\n".join(f"--- node {r}:\n{node_log(jd, r)[-1500:]}" for r in range(n))
        raise AssertionError(f"{e}; job {job} {squeue_state(job)}; dir {jd.path}; state {read_state(jd)}\n{logs}") from None
    took = time.monotonic() - t0
    assert state["nodes_joined"] == state["nodes_expected"] == n and state["missing_hosts"] == []
    ips = [node["ip"] for node in state["nodes"]]
    assert len(set(ips)) == n, state["nodes"]
    lab_ips = set(lab.node_ips)
    assert set(ips) <= lab_ips, (ips, lab_ips)
    assert {node["host"] for node in state["nodes"]} == set(job_nodes(job))
    # STARTING_RAY with k < n came before readiness; the head log shows each step.
    assert seen[0][0] == "STARTING_RAY" and seen[-1] == ("LOADING_MODEL", n), seen
    assert any(p == "STARTING_RAY" and k < n for p, k in seen)
    head_log = node_log(jd, 0)
    assert f"nodes {n}/{n}" in head_log and "ray cluster ready" in head_log
    for r in range(1, n):  # a worker confirms its own join a poll after the head counts it
        wait_for(lambda r=r: "joined the Ray cluster" in node_log(jd, r), 15, f"node {r} to log its join")
    print(f"{n} nodes formed in {took:.1f}s from job start; progress {seen}")
    scancel(job)
    wait_gone(job)
    assert read_state(jd)["phase"] == "ENDED" and read_state(jd)["reason"] == "cancelled"
    assert_no_processes(job)


def test_scancel_of_formed_cluster_leaves_nothing(lab, jobs, workdir: Path) -> None:
    jd = make_job(workdir, lab, nodes=3, name="cancel3")
    job = jobs.start(jd.script)
    wait_for(_formed(jd, 3), 150, "3-node cluster")
    t0 = time.monotonic()
    scancel(job)
    gone = wait_gone(job)
    state = read_state(jd)
    assert state["phase"] == "ENDED" and state["reason"] == "cancelled"
    assert_no_processes(job, timeout=5)
    for r in range(3):
        assert "ENDED: cancelled" in node_log(jd, r), node_log(jd, r)[-500:]
    print(f"scancel -> job gone in {gone:.1f}s ({time.monotonic() - t0:.1f}s)")


def _log_with(jd: Any, rank: int, text: str) -> str | None:
    log = node_log(jd, rank)
    return log if text in log else None


def test_workers_started_before_a_delayed_head_still_join(lab, jobs, workdir: Path) -> None:
    jd = make_job(workdir, lab, nodes=3, name="late-head", join_timeout=90)
    script = wrap_node_command(jd, 'if [ "$SLURM_NODEID" = 0 ]; then sleep 25; fi')
    jobs.start(script)
    state = wait_for(_formed(jd, 3), 180, "cluster with a late head")
    published = float(__import__("json").loads(jd.head.read_text())["published_at"])
    ready = state["updated_at"]
    for r in (1, 2):
        # The head may see a raylet a poll before its own node program does.
        log = wait_for(lambda r=r: _log_with(jd, r, "joined the Ray cluster"), 10, f"rank {r} logging its join")
        assert "waiting for the head" in log
    # Workers were already waiting: once the head published, joining took one backoff step
    # plus a raylet start, not a fixed 5 s polling cycle per try.
    print(f"head published -> all joined in {ready - published:.1f}s")
    assert ready - published < 30


def test_head_never_up_workers_fail_by_deadline_naming_head(lab, jobs, workdir: Path) -> None:
    jd = make_job(workdir, lab, nodes=3, name="no-head", join_timeout=20)
    script = wrap_node_command(jd, 'if [ "$SLURM_NODEID" = 0 ]; then exec sleep 100000; fi')
    job = jobs.start(script)
    head = job_nodes(job)
    t0 = time.monotonic()
    gone = wait_gone(job, 120)
    total = time.monotonic() - t0
    state = read_state(jd)
    assert state["phase"] == "FAILED", state
    # The workers' own checks passed, so they went on to join at once; the join's deadline
    # names the head (the pre-flight's own wait, beside it, ends later: one diagnosis).
    assert re.search(rf"head {head[0]} never published its address .* within 2\ds", state["reason"]), state["reason"]
    logs = [node_log(jd, r) for r in (1, 2)]
    assert any(f"FAILED: head {head[0]} never published its address" in log for log in logs), logs
    assert total < 20 + 45, f"job took {total:.0f}s to end with a 20s join deadline"
    assert_no_processes(job, timeout=10)
    print(f"workers gave up and the job ended {total:.1f}s after it started (job gone wait {gone:.1f}s) {head}")


def test_node_that_never_joins_fails_head_at_deadline_naming_it(lab, jobs, workdir: Path) -> None:
    jd = make_job(workdir, lab, nodes=3, name="lost-node", cluster_timeout=35)
    script = wrap_node_command(jd, 'if [ "$SLURM_NODEID" = 2 ]; then exec sleep 100000; fi')
    job = jobs.start(script)
    hosts = job_nodes(job)
    wait_gone(job, 150)
    state = read_state(jd)
    assert state["phase"] == "FAILED", state
    # Ray's formation, with the pre-flight's exchange beside it, names the node missing at the
    # cluster deadline and what it last logged.
    assert "only 2/3 nodes joined the Ray cluster within 3" in state["reason"], state["reason"]
    assert f"missing: {hosts[2]}" in state["reason"] and "last log line of" in state["reason"], state["reason"]
    assert state["missing_hosts"] == [hosts[2]]
    assert "FAILED: only 2/3 nodes joined" in node_log(jd, 0)
    assert_no_processes(job, timeout=10)


def _burn_job_ids_until(next_id: int) -> None:
    """Submit and cancel held no-op jobs until Slurm's next job id is ``next_id``."""
    burnt: list[str] = []
    while True:
        out = subprocess.run(["sbatch", "--parsable", "--hold", "--output=/dev/null", "--wrap=true"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        burnt.append(out.strip().split(";")[0])
        if int(burnt[-1]) >= next_id - 1:
            break
    subprocess.run(["scancel", *burnt], timeout=60, check=False)


def _first_worker_ports(job_id: str) -> set[int]:
    """The first Ray worker port of each of the job's raylets (from their command lines)."""
    return {int(m) for p in job_processes(job_id, width=100_000)
            for m in re.findall(r"--min[-_]worker[-_]port=(\d+)", p.cmdline)}


def test_two_jobs_sharing_nodes_both_form(lab, jobs, workdir: Path) -> None:
    """Two jobs on the same two nodes, their ids one port-plan cycle apart (ports.SLOTS): each
    rank's first-choice slot is the same for both, and only the slot claims keep the second
    job's Ray worker ports (bound later, so a bind test cannot see them) apart from the first's."""
    from slurm_vllm.node.ports import SLOTS

    nodes = "--nodelist=" + ",".join(lab.nodes[:2])
    a = make_job(workdir, lab, nodes=2, name="share-a", gpus=1, cpus=1, mem="1G", sbatch_args=[nodes])
    b = make_job(workdir, lab, nodes=2, name="share-b", gpus=1, cpus=1, mem="1G", sbatch_args=[nodes])
    ja = sbatch(a.script)
    jobs.append(ja)
    _burn_job_ids_until(int(ja) + SLOTS)
    jb = sbatch(b.script)
    jobs.append(jb)
    assert int(jb) == int(ja) + SLOTS, (ja, jb)
    wait_running(ja)
    wait_running(jb)
    sa = wait_for(_formed(a, 2), 200, "job A cluster")
    sb = wait_for(_formed(b, 2), 200, "job B cluster")
    shared = set(job_nodes(ja)) & set(job_nodes(jb))
    assert shared, "two 2-node jobs on a 3-node lab must share a node"
    assert sa["ray_address"] != sb["ray_address"]
    pa, pb = _first_worker_ports(ja), _first_worker_ports(jb)
    assert pa and pb and pa.isdisjoint(pb), (pa, pb)
    # Both clusters are still intact after both formed: their ports did not collide.
    time.sleep(3)
    assert read_state(a)["phase"] == "LOADING_MODEL" and read_state(b)["phase"] == "LOADING_MODEL"
    assert squeue_state(ja) == squeue_state(jb) == "RUNNING"
    for j in (ja, jb):
        scancel(j)
    for j in (ja, jb):
        wait_gone(j)
        assert_no_processes(j)


_GCS_PROBE = r"""
import os, sys
from ray._raylet import GcsClient
try:
    nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)
    print("NODES", sum(1 for n in nodes.values() if n.state == 0))
except Exception as e:
    print("REFUSED", type(e).__name__, e)
"""


def test_node_without_the_token_cannot_join(lab, jobs, workdir: Path) -> None:
    jd = make_job(workdir, lab, nodes=2, name="token")
    jobs.start(jd.script)
    state = wait_for(_formed(jd, 2), 150, "2-node cluster")
    address = state["ray_address"]
    ray = str(Path(sys.executable).parent / "ray")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(workdir), RAY_USAGE_STATS_ENABLED="0")  # no ~/.ray/auth_token either
    host_ip = lab.host_ip
    tries = {
        "no token": dict(base),
        "wrong token": dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-job-token"),
    }
    for what, env in tries.items():
        out = subprocess.run(
            [ray, "start", f"--address={address}", f"--node-ip-address={host_ip}", "--temp-dir=/tmp/svl-intruder",
             "--disable-usage-stats", "--num-cpus=1"],
            capture_output=True, text=True, timeout=120, env=env, check=False)
        text = out.stdout + out.stderr
        assert out.returncode != 0, f"{what}: ray start joined: {out.stdout[-500:]}"
        assert "AuthenticationError" in text or "InvalidAuthToken" in text, (what, text[-800:])
        print(what, "->", [line for line in text.splitlines() if "Auth" in line][-1][:200])
        probe = subprocess.run([sys.executable, "-c", _GCS_PROBE, address], capture_output=True, text=True,
                               timeout=90, env=env, check=False)
        assert "REFUSED" in probe.stdout, (what, probe.stdout, probe.stderr[-500:])
    # Positive control: the job's own token is accepted and the cluster still has 2 nodes.
    good = dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(jd.ray_token))
    probe = subprocess.run([sys.executable, "-c", _GCS_PROBE, address], capture_output=True, text=True,
                           timeout=90, env=good, check=False)
    assert "NODES 2" in probe.stdout, (probe.stdout, probe.stderr[-500:])
    subprocess.run(["rm", "-rf", "/tmp/svl-intruder"], timeout=30, check=False)


SEED_SCRIPT = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=1500M
#SBATCH --time=00:05:00
#SBATCH --partition={partition}
#SBATCH --output={out}/batch-%j.out
set -euo pipefail
source {venv}/bin/activate
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
# The seed's own usage: leader on rank 0 (then the serving command), worker elsewhere.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output={out}/seed-%t.log bash -c '
if [ "$SLURM_NODEID" = 0 ]; then
    python3 -m slurm_vllm leader --ray_port=6379 --ray_cluster_size={size} --ray_init_timeout={timeout}
    rc=$?
    echo "$rc" > {out}/leader-rc
    [ "$rc" = 0 ] && sleep 300
    exit $rc
else
    python3 -m slurm_vllm worker --ray_address='"$HEAD"' --ray_port=6379 --ray_init_timeout={timeout}
fi'
"""


@pytest.mark.parametrize("size, expect_rc", [(2, "0"), (3, "1")])
def test_seed_usage_leader_and_worker(lab, jobs, workdir: Path, size: int, expect_rc: str) -> None:
    out = workdir / f"seed{size}"
    out.mkdir()
    script = out / "seed.sbatch"
    script.write_text(SEED_SCRIPT.format(partition=lab.partition, out=out,
                                         venv=lab.venv, size=size, timeout=25))
    job = jobs.start(script)
    t0 = time.monotonic()
    rc = wait_for(lambda: (out / "leader-rc").exists() and (out / "leader-rc").read_text().strip(), 120,
                  "leader exit code")
    took = time.monotonic() - t0
    assert rc == expect_rc, (out / "seed-0.log").read_text()[-1500:]
    if expect_rc == "0":
        assert f"all {size} Ray nodes are alive" in (out / "seed-0.log").read_text()
        assert "worker: joined" in (out / "seed-1.log").read_text()
        assert squeue_state(job) == "RUNNING"  # the head stays up for the serving command
        scancel(job)
    else:
        assert took < 25 + 60
    wait_gone(job, 90)
    assert_no_processes(job)


def test_time_limit_signal_ends_the_job_with_its_reason(lab, jobs, workdir: Path) -> None:
    """SIGUSR2 is what `#SBATCH --signal=USR2@grace` delivers before the time limit."""
    jd = make_job(workdir, lab, nodes=2, name="usr2")
    job = jobs.start(jd.script)
    wait_for(_formed(jd, 2), 150, "2-node cluster")
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    gone = wait_gone(job, 60)
    state = read_state(jd)
    assert state["phase"] == "ENDED" and state["reason"] == "time limit", state
    assert_no_processes(job)
    print(f"USR2 -> job gone in {gone:.1f}s")


def _node_program_pid(job_id: str, rank: int) -> int | None:
    """The pid of the job's node program on node ``rank`` (by its environment)."""
    for proc in job_processes(job_id, width=400):
        pid, cmd = proc.pid, proc.cmdline
        if "slurm_vllm node" not in cmd:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_NODEID={rank}".encode() in environ:
            return pid
    return None


def test_kill_9_of_the_heads_node_program_leaves_no_process(lab, jobs, workdir: Path) -> None:
    """A node program killed outright cannot tear down: its children must die with it."""
    import signal

    jd = make_job(workdir, lab, nodes=2, name="kill9")
    job = jobs.start(jd.script)
    wait_for(_formed(jd, 2), 150, "2-node cluster")
    pid = wait_for(lambda: _node_program_pid(job, 0), 10, "the head's node program")
    assert any("raylet" in p.cmdline or "gcs_server" in p.cmdline for p in job_processes(job)), "nothing to leave behind"
    os.kill(pid, signal.SIGKILL)
    wait_gone(job, 90)
    assert_no_processes(job)
