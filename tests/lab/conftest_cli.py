"""Helpers for the lab tests of the CLI, the API and submitit: run the real CLI, ask real Slurm."""

from __future__ import annotations

import json
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


def lab_serve_flags() -> list[str]:
    """Flags that serve the lab's tiny model with CPU vLLM (override with SLURM_VLLM_LAB_SERVE_FLAGS)."""
    override = os.environ.get("SLURM_VLLM_LAB_SERVE_FLAGS")
    if override:
        return json.loads(override)
    return [
        LAB_MODEL, "--nodes", "1", "--gpus-per-node", "1", "--partition", PARTITION, "--time", "00:15:00",
        "--venv", LAB_VENV,
        "--env", "VLLM_TARGET_DEVICE=cpu", "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--env", "HF_HUB_OFFLINE=1",
        "--env", "VLLM_NO_USAGE_STATS=1", "--env", "RAY_USAGE_STATS_ENABLED=0",
        "--env", "SLURM_VLLM_LAB_CPU_RAY=1", "--env", 'RAY_OVERRIDE_RESOURCES={"vllm_cpu": 1}',
        "--", "--max-model-len", "256", "--dtype", "float32",
    ]


def lab_serve_kwargs() -> dict[str, object]:
    """The same as keyword arguments for ``ServeSpec``."""
    flags = lab_serve_flags()
    model, rest = flags[0], flags[1:]
    extra: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, extra = rest[:i], rest[i + 1:]
    kw: dict[str, object] = {"model": model, "extra_args": extra}
    env: dict[str, str] = {}
    it = iter(rest)
    for flag in it:
        value = next(it)
        key = flag[2:].replace("-", "_")
        if key == "env":
            k, _, v = value.partition("=")
            env[k] = v
        elif key in ("nodes", "gpus_per_node"):
            kw[key] = int(value)
        else:
            kw[key] = value
    kw["env"] = env
    return kw
