"""Fixtures of the lab tier: the running lab, and job directories and job ids cleaned up after."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.lab import ENV_LAB_CACHE, Lab, open_lab, sbatch, scancel, wait_gone, wait_running


@pytest.fixture(scope="session", autouse=True)
def shared_compile_cache() -> Iterator[str]:
    """One compile-cache folder for every vLLM job of the suite (spec ``cache_dir``), removed
    at the end: later jobs of the tiny model start warm, and no test writes into a real home."""
    path = Path(tempfile.mkdtemp(prefix="svl-cache-", dir=os.environ.get("SLURM_VLLM_LAB_TMP", "/tmp")))
    path.chmod(0o755)
    os.environ[ENV_LAB_CACHE] = str(path)
    yield str(path)
    os.environ.pop(ENV_LAB_CACHE, None)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def lab() -> Lab:
    """The running Slurm lab; skips (or fails under make test) when it is down."""
    return open_lab()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Job directories outside pytest's tmp_path: concurrent pytest runs on the same machine
    prune each other's old tmp_path trees, which would delete a running job's directory."""
    path = Path(tempfile.mkdtemp(prefix="svl-boot-", dir=os.environ.get("SLURM_VLLM_LAB_TMP", "/tmp")))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Jobs(list[str]):
    """Job ids a test submitted, so the fixture can cancel them whatever happened."""

    def start(self, script: Path) -> str:
        """Submit ``script``, remember its id, and wait through PENDING until it runs."""
        job = sbatch(script)
        self.append(job)
        wait_running(job)
        return job


@pytest.fixture
def jobs(lab: Lab, workdir: Path) -> Iterator[Jobs]:
    """Job ids a test submitted; cancelled at the end whatever happened (before its directory goes)."""
    ids = Jobs()
    yield ids
    for j in ids:
        scancel(j)
    for j in ids:
        try:
            wait_gone(j, 60)
        except AssertionError:
            pass


@pytest.fixture
def home(lab: Lab, tmp_path: Path) -> Iterator[Path]:
    """A jobs root of its own (``SLURM_VLLM_HOME``); every job submitted from it is cancelled
    afterwards."""
    h = tmp_path / "home"
    yield h
    for jid_file in (h / "jobs").glob("*/job_id") if (h / "jobs").exists() else []:
        jid = jid_file.read_text().strip()
        if jid:
            scancel(jid)
