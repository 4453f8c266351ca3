"""Helpers for the lab tests of the CLI, the API and submitit: run the real CLI, ask real Slurm."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

PARTITION = os.environ.get("SLURM_VLLM_LAB_PARTITION", "debug")
LAB_HOME = Path(os.environ.get("SLURM_LAB_HOME", "/var/lib/slurm-lab"))
LAB_MODEL = os.environ.get("SLURM_VLLM_LAB_MODEL", str(LAB_HOME / "models" / "tiny-llama"))
LAB_VENV = os.environ.get("SLURM_VLLM_LAB_VENV", str(LAB_HOME / "venv"))


def slurm_answers() -> bool:
    try:
        proc = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%D"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stdout.strip() != ""


def require_lab() -> None:
    if not slurm_answers():
        why = f"the Slurm lab does not answer (partition {PARTITION}); run scripts/slurm-lab up"
        if os.environ.get("SLURM_LAB_REQUIRED", "") not in ("", "0"):
            pytest.fail(why)
        pytest.skip(why)


def cli(args: list[str], home: Path, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m slurm_vllm ARGS`` for real, with job directories under ``home``."""
    e = dict(os.environ)
    e["SLURM_VLLM_HOME"] = str(home)
    e["SLURM_VLLM_POLL_INTERVAL"] = "1"
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "slurm_vllm", *args], capture_output=True, text=True, timeout=timeout, env=e, check=False)


def squeue_me() -> list[tuple[str, str, str]]:
    """(job id, state, work dir) of this user's jobs, straight from squeue."""
    proc = subprocess.run(["squeue", "--me", "-h", "-o", "%i|%T|%Z"], capture_output=True, text=True, timeout=30, check=True)
    return [tuple(line.split("|", 2)) for line in proc.stdout.splitlines() if line.strip()]  # type: ignore[misc]


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for the nodes' python: the batch script runs it as the node program."""
    path = tmp_path / "fakepython"
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def scancel_quietly(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30, check=False)


def wait_gone(job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(j[0] != job_id for j in squeue_me()):
            return
        time.sleep(0.5)


REPO = Path(__file__).resolve().parents[2]
LAB_PROFILE = os.environ.get("SLURM_VLLM_LAB_PROFILE", str(REPO / "scripts" / "lab" / "profile.yaml"))
LAB_NODES = int(os.environ.get("SLURM_VLLM_LAB_NODES", "2"))


def lab_serve_flags() -> list[str]:
    """CLI flags that serve the lab's tiny model with CPU vLLM over LAB_NODES nodes (the lab profile)."""
    return ["--profile", LAB_PROFILE, LAB_MODEL, "--nodes", str(LAB_NODES), "--gpus-per-node", "1", "--mem", "5000M"]


def lab_serve_kwargs() -> dict[str, object]:
    """The same as keyword arguments for ``ServeSpec`` (the profile's fields, flat)."""
    from slurm_vllm.spec import read_spec_file

    kw: dict[str, object] = dict(read_spec_file(LAB_PROFILE))
    kw.update(model=LAB_MODEL, nodes=LAB_NODES, gpus_per_node=1, mem="5000M")
    return kw
