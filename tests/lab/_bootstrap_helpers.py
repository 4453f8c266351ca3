"""Helpers for the bootstrap lab tests: real sbatch, real srun, real Ray, no vLLM.

Jobs are prepared with the library's own ``prepare_job`` (so they run the rendered script) with
``SLURM_VLLM_NODE_NO_SERVE=1``: the head holds the formed cluster instead of serving. Tests
that need a node to misbehave wrap the node command of that script in a tiny per-rank shell
wrapper; everything else is exactly what users submit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PARTITION = os.environ.get("SLURM_VLLM_LAB_PARTITION", "debug")


def lab_env() -> dict[str, str]:
    """``scripts/slurm-lab env`` as a dict (LAB_NODES, LAB_NODE_IPS, LAB_HOME, ...)."""
    try:
        out = subprocess.run([str(REPO / "scripts" / "slurm-lab"), "env"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    env = {}
    for line in out.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            env[k.strip()] = v.strip().strip('"')
    return env


def require_lab() -> dict[str, str]:
    """Skip unless the lab's partition answers with usable nodes."""
    env = lab_env()
    try:
        out = subprocess.run(["sinfo", "-h", "-p", env.get("LAB_PARTITION", PARTITION), "-o", "%n %t"],
                             capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("sinfo not available: the Slurm lab is not up (scripts/slurm-lab up)")
    states = [line.split() for line in out.stdout.splitlines() if line.strip()]
    bad = ("down", "drain", "drng", "drained", "fail", "failg", "inval", "unk", "maint", "boot", "powered_down")
    usable = [s for s in states if len(s) == 2 and s[1].rstrip("*~#!%$@^-") not in bad]
    if out.returncode != 0 or len(usable) < 3:
        pytest.skip(f"the Slurm lab is not up with 3 usable nodes: {out.stdout.strip() or out.stderr.strip()}")
    return env


def lab_venv(env: dict[str, str]) -> str:
    return os.environ.get("SLURM_VLLM_LAB_VENV") or env.get("LAB_VENV") or str(Path(env.get("LAB_HOME", "/var/lib/slurm-lab")) / "venv")


def make_job(tmp_path: Path, env: dict[str, str], *, nodes: int, name: str = "boot", join_timeout: float = 60,
             cluster_timeout: float = 90, gpus: int = 1, cpus: int = 1, mem: str = "1500M",
             extra_env: dict[str, str] | None = None, sbatch_args: list[str] | None = None) -> Any:
    """A real job directory and rendered script for a bootstrap-only job (no vLLM)."""
    from slurm_vllm.render import prepare_job
    from slurm_vllm.spec import ServeSpec

    spec = ServeSpec(
        "org/bootstrap-only", nodes=nodes, gpus_per_node=gpus, cpus_per_task=cpus, mem=mem,
        partition=env.get("LAB_PARTITION", PARTITION), time="00:10:00", job_name=name,
        venv=lab_venv(env), env={"SLURM_VLLM_NODE_NO_SERVE": "1", **(extra_env or {})},
        ray={"join_timeout": join_timeout, "cluster_timeout": cluster_timeout},
        job_dir=str(tmp_path / name), sbatch_args=list(sbatch_args or []),
    )
    return prepare_job(spec)


def wrap_node_command(jd: Any, wrapper_body: str) -> Path:
    """Write a copy of the job's script whose node command runs through ``wrapper_body`` first.

    The wrapper is bash; it sees SLURM_NODEID and ends with ``exec "$@"`` to run the real node
    program unless it decided otherwise (sleep forever, delay, ...).
    """
    wrapper = jd.path / "wrap.sh"
    wrapper.write_text("#!/bin/bash\n" + wrapper_body + '\nexec "$@"\n')
    wrapper.chmod(0o755)
    text = jd.script.read_text()
    marker = "python3 -m slurm_vllm node"
    assert marker in text, "the rendered script changed; update the test wrapper"
    script = jd.path / "job-wrapped.sbatch"
    script.write_text(text.replace(marker, f"{wrapper} {marker}", 1))
    return script


def sbatch(script: Path, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def squeue_state(job_id: str) -> str | None:
    """The job's state, or None once Slurm no longer lists it (a failing squeue is retried)."""
    for _ in range(10):
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                             timeout=30, check=False)
        if out.returncode == 0 or "Invalid job id" in out.stderr:
            return out.stdout.strip() or None
        time.sleep(1)
    raise AssertionError(f"squeue keeps failing: {out.stderr.strip()}")


def wait_running(job_id: str, timeout: float = 300) -> None:
    """Other tests may hold the lab: wait through PENDING before any timing starts."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        state = squeue_state(job_id)
        if state in ("RUNNING", None):
            return
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not start within {timeout}s: {squeue_state(job_id)}")


def job_nodes(job_id: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%N"], capture_output=True, text=True,
                         timeout=30, check=False).stdout.strip()
    if not out:
        return []
    return subprocess.run(["scontrol", "show", "hostnames", out], capture_output=True, text=True,
                          timeout=30, check=False).stdout.split()


def wait_gone(job_id: str, timeout: float = 90) -> float:
    """Wait until squeue no longer lists the job; returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if squeue_state(job_id) is None:
            return time.monotonic() - t0
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still listed after {timeout}s: {squeue_state(job_id)}")


def scancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30, check=False)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_state(jd: Any) -> dict[str, Any]:
    try:
        return json.loads(jd.state.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def node_log(jd: Any, rank: int) -> str:
    try:
        return jd.node_log(rank).read_text()
    except FileNotFoundError:
        return ""


def job_processes(job_id: str, width: int = 160) -> list[tuple[int, str]]:
    """Every process on the machine (all lab nodes) started for this job: by its environment or
    by its Ray temp dir, with its command line cut to ``width``. Excludes Slurm's step daemons."""
    needle_env = f"SLURM_JOB_ID={job_id}\0".encode()
    needle_dir = f"svl-{job_id}-".encode()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{d}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        state = stat[stat.rfind(")") + 2:].split()[0]
        if state == "Z":
            continue
        text = cmd.replace(b"\0", b" ").decode(errors="replace").strip()
        if "slurmstepd" in text or not text:
            continue
        if needle_env in environ or needle_dir in cmd:
            found.append((int(d), text[:width]))
    return found


def assert_no_processes(job_id: str, timeout: float = 20) -> None:
    """Nothing of the job may remain on any node (checked for a while: teardown is async)."""
    t0 = time.monotonic()
    left = job_processes(job_id)
    while left and time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        left = job_processes(job_id)
    assert not left, f"processes of job {job_id} left behind: {left}"


def python() -> str:
    return sys.executable
