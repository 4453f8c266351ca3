"""The lab is a real multi-node Slurm cluster: distinct nodes, fake GPUs, cgroup process tracking.

These tests pin down what the rest of the suite relies on; if one fails, every multi-node test
above it would be testing something other than a cluster.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.lab.lab import Lab

pytestmark = pytest.mark.lab


def test_three_node_step_sees_distinct_hosts_ips_and_two_gpus(lab: Lab, tmp_path: Path) -> None:
    """One srun task per node: 3 hostnames, 3 IPs, and both fake GPUs visible on each."""
    out = tmp_path / "out"
    out.mkdir()
    job = lab.sbatch(
        "#!/bin/bash\n"
        "#SBATCH --nodes=3 --ntasks-per-node=1 --gpus-per-node=2 --time=2\n"
        "#SBATCH --output=batch.out\n"
        "srun bash -c 'printf \"%s %s %s %s\\n\" \"$(hostname)\" "
        "\"$(hostname -I | cut -d\" \" -f1)\" \"$CUDA_VISIBLE_DEVICES\" \"$SLURM_GPUS_ON_NODE\""
        f" > {out}/$SLURM_NODEID'\n",
        tmp_path,
    )
    result = lab.wait_job(job, timeout=60)
    assert result.state == "COMPLETED", (result, (tmp_path / "batch.out").read_text())
    rows = [(out / name).read_text().split() for name in sorted(os.listdir(out))]
    assert len(rows) == 3, rows
    hosts = {row[0] for row in rows}
    ips = {row[1] for row in rows}
    assert len(hosts) == 3 and hosts <= set(lab.nodes), rows
    assert len(ips) == 3 and ips <= set(lab.node_ips), rows
    assert all(row[2] == "0,1" and row[3] == "2" for row in rows), rows


def test_accounting_knows_the_job(lab: Lab, tmp_path: Path) -> None:
    """sacct answers from slurmdbd (what submitit's job states rely on)."""
    job = lab.sbatch("#!/bin/bash\n#SBATCH --nodes=1 --time=1 --output=o\ntrue\n", tmp_path)
    assert lab.wait_job(job, timeout=60).state == "COMPLETED"
    deadline = time.monotonic() + 20
    line = ""
    while time.monotonic() < deadline:
        proc = lab.run(["sacct", "-n", "-X", "-P", "-j", str(job), "-o", "JobID,State"])
        line = proc.stdout.strip()
        if line == f"{job}|COMPLETED":
            break
        time.sleep(0.5)
    assert line == f"{job}|COMPLETED"


def test_process_left_in_background_dies_with_its_step(lab: Lab, tmp_path: Path) -> None:
    """cgroup process tracking: a daemonised child of a step is killed when the step ends.

    The batch script keeps running (with a background process of its own, which must stay
    visible) so it is the end of the step, not of the job, that removes the escaped process.
    """
    job = lab.sbatch(
        "#!/bin/bash\n"
        "#SBATCH --nodes=1 --time=2 --output=batch.out\n"
        "srun bash -c 'setsid nohup sleep 4242 >/dev/null 2>&1 </dev/null & echo $! > escaped.pid'\n"
        "sleep 4343 &\n"
        "touch step-done\n"
        "wait\n",
        tmp_path,
    )
    try:
        lab.wait_running(job)
        deadline = time.monotonic() + 60
        while not (tmp_path / "step-done").exists():
            assert time.monotonic() < deadline, "the step never finished"
            time.sleep(0.2)
        assert (tmp_path / "escaped.pid").read_text().strip(), "the step did not start its child"
        deadline = time.monotonic() + 10
        while True:
            cmds = [p.cmdline for p in lab.job_processes(job)]
            if "sleep 4242" not in cmds or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "sleep 4343" in cmds, f"the batch step's own child should still run: {cmds}"
        assert "sleep 4242" not in cmds, f"the step's escaped child survived the step: {cmds}"
    finally:
        lab.cancel(job)
    lab.wait_job(job, timeout=60)
    lab.assert_no_job_processes(job)


@pytest.mark.parametrize("request_arg", ["--gpus-per-node=3", "--gres=gpu:3"])
def test_more_gpus_than_a_node_has_is_refused(lab: Lab, tmp_path: Path, request_arg: str) -> None:
    """Asking 3 GPUs on 2-GPU nodes is refused at submission, as on a real cluster."""
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\ntrue\n")
    proc = lab.run(["sbatch", f"--partition={lab.partition}", "--nodes=1", request_arg, str(script)])
    assert proc.returncode != 0, proc.stdout
    assert "Requested node configuration is not available" in proc.stderr, proc.stderr


def test_nodes_are_idle_with_declared_resources(lab: Lab) -> None:
    """sinfo lists every lab node in the partition with 2 GPUs and the declared memory."""
    proc = lab.run(["sinfo", "-h", "-N", "-p", lab.partition, "-o", "%N %G %m"], check=True)
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.strip().splitlines()}
    assert set(rows) == set(lab.nodes)
    assert all(row[0] == f"gpu:{lab.gpus_per_node}" for row in rows.values()), rows


def test_up_when_already_up_changes_nothing(lab: Lab) -> None:
    """``up`` is idempotent: on a running lab it says so and restarts nothing."""
    before = lab.current_env()["LAB_NODE_PIDS"]
    proc = lab.lab_command("up", str(len(lab.nodes)), "--no-venv", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "already up" in proc.stderr
    assert lab.current_env()["LAB_NODE_PIDS"] == before


def test_up_refuses_to_start_over_leftovers(lab: Lab, tmp_path: Path) -> None:
    """A crashed lab's state is named, with ``down`` as the fix, and nothing is started."""
    home = tmp_path / "crashed-lab"
    (home / "run").mkdir(parents=True)
    env = dict(
        os.environ,
        SLURM_LAB_HOME=str(home),
        SLURM_LAB_NODE_PREFIX="lefttest",
        SLURM_LAB_BRIDGE="lefttest0",
        SLURM_LAB_NET="10.234.77",
    )
    proc = subprocess.run(
        [str(lab.script), "up", "--no-venv"], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode != 0
    assert f"state directory {home}/run" in proc.stderr, proc.stderr
    assert "scripts/slurm-lab down" in proc.stderr, proc.stderr
    assert sorted(p.name for p in home.iterdir()) == ["run"], "up wrote state over leftovers"

    # `down` for that lab home clears it and leaves the running lab alone.
    hosts_before = Path("/etc/hosts").read_text()
    down = subprocess.run(
        [str(lab.script), "down"], capture_output=True, text=True, timeout=120, env=env
    )
    assert down.returncode == 0, down.stderr
    assert not (home / "run").exists()
    assert Path("/etc/hosts").read_text() == hosts_before
    assert lab.current_env()["LAB_UP"] == "1"


def _process_start(pid: int) -> str | None:
    """Start time of a PID (field 22 of /proc/PID/stat): tells a reused PID from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


@pytest.mark.lab_teardown
def test_down_leaves_no_process_of_the_lab(lab: Lab, tmp_path: Path) -> None:
    """``scripts/slurm-lab down`` with Ray running in a job leaves no Slurm or Ray process.

    Ordered last (it takes the lab down); it brings the lab up again for whoever runs next.
    """
    script = (
        "#!/bin/bash\n"
        f"#SBATCH --nodes={len(lab.nodes)} --ntasks-per-node=1 --time=5 --output=batch.out\n"
        "export RAY_USAGE_STATS_ENABLED=0\n"
        "srun bash -c 'exec \"$0\" start --head --block --disable-usage-stats"
        " --node-ip-address=\"$(hostname -I | cut -d\" \" -f1)\" --port=$((20000 + SLURM_JOB_ID % 5000))"
        " --num-cpus=1 --include-dashboard=false --temp-dir=/tmp/ray/down-$SLURM_JOB_ID'"
        f" {lab.venv / 'bin' / 'ray'}\n"
    )
    job = lab.sbatch(script, tmp_path)
    lab.wait_running(job)
    deadline = time.monotonic() + 90
    while True:
        raylets = {p.node for p in lab.job_processes(job) if "/raylet " in p.cmdline}
        if raylets == set(lab.nodes):
            break
        assert time.monotonic() < deadline, f"raylets only on {raylets}"
        time.sleep(0.5)

    namespaces = set(lab.node_namespaces())
    daemon_pids = [int(p.read_text()) for p in (lab.home / "run").glob("*.pid")]
    watched = {p.pid: _process_start(p.pid) for p in lab.node_processes()}
    watched.update({pid: _process_start(pid) for pid in daemon_pids})
    assert len(watched) > 10, watched

    down = lab.lab_command("down", timeout=180)
    try:
        assert down.returncode == 0, down.stderr
        survivors = [
            (pid, lab.cmdline(pid))
            for pid, start in watched.items()
            if start is not None and _process_start(pid) == start and lab.cmdline(pid)
        ]
        assert not survivors, f"processes of the lab survived down: {survivors}"
        in_nodes = [
            (pid, lab.cmdline(pid))
            for pid in lab.host_pids()
            if lab.pid_namespace(pid) in namespaces and lab.cmdline(pid)
        ]
        assert not in_nodes, f"processes left in the nodes' namespaces: {in_nodes}"
        netns = {p.name for p in Path("/run/netns").glob("*")} if Path("/run/netns").is_dir() else set()
        assert not netns & set(lab.nodes), netns
        hosts = Path("/etc/hosts").read_text().split()
        assert not set(lab.nodes) & set(hosts)
        assert lab.current_env()["LAB_UP"] == "0"
    finally:
        up = lab.lab_command("up", str(len(lab.nodes)), "--no-venv")
    assert up.returncode == 0, up.stderr
    assert lab.current_env()["LAB_UP"] == "1"
