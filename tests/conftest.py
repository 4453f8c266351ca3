"""Shared fixtures: the local Slurm lab (``scripts/slurm-lab``) and helpers to run jobs on it.

Tests under ``tests/lab`` talk to a real Slurm cluster brought up by ``scripts/slurm-lab up``.
When it is down they are skipped with the reason, except under ``make test`` / CI, which set
``SLURM_LAB_REQUIRED=1`` so that a missing lab fails instead of passing silently.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAB_SCRIPT = REPO / "scripts" / "slurm-lab"

#: Slurm job states after which nothing of the job runs any more.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of the test that takes the lab down (it must run last)."""
    config.addinivalue_line(
        "markers", "lab_teardown: takes the lab down and up again; always ordered last"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything under tests/lab as ``lab``; move ``lab_teardown`` tests to the end."""
    lab_dir = REPO / "tests" / "lab"
    for item in items:
        if lab_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.lab)
    items.sort(key=lambda item: item.get_closest_marker("lab_teardown") is not None)


def pytest_collectstart(collector: pytest.Collector) -> None:
    """Let each test directory's ``conftest_<name>.py`` helpers be imported by their own tests.

    Helper modules are imported by plain name (``from conftest_cli import ...``) from the test
    file's directory, so two tiers may both have, say, ``conftest_cli.py``. Before a test module
    is imported, drop a same-named helper that came from another directory and put this
    directory first on ``sys.path``, so the import finds the module next to the test.
    """
    if not isinstance(collector, pytest.Module):
        return
    here = Path(str(collector.path)).parent
    helpers = [p.stem for p in here.glob("conftest_*.py")]
    if not helpers:
        return
    for name in helpers:
        loaded = sys.modules.get(name)
        origin = getattr(loaded, "__file__", None)
        if loaded is not None and (origin is None or Path(origin).parent != here):
            del sys.modules[name]
    if sys.path[:1] != [str(here)]:
        if str(here) in sys.path:
            sys.path.remove(str(here))
        sys.path.insert(0, str(here))


@dataclass(frozen=True)
class JobResult:
    """How a Slurm job ended: its state (``COMPLETED``, ``FAILED``...) and exit code."""

    job_id: int
    state: str
    exit_code: str


@dataclass(frozen=True)
class NodeProcess:
    """A process running inside one lab node (seen from the host)."""

    node: str
    pid: int
    cmdline: str
    job_id: str | None


def read_lab_env(timeout: float = 60) -> dict[str, str]:
    """Run ``scripts/slurm-lab env`` and parse its ``KEY=value`` lines."""
    proc = subprocess.run(
        [str(LAB_SCRIPT), "env"], capture_output=True, text=True, timeout=timeout, check=True
    )
    env: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            env[key] = value
    return env


def _ns(pid: int, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _job_id_of(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for entry in raw.split(b"\0"):
        if entry.startswith(b"SLURM_JOB_ID="):
            return entry.split(b"=", 1)[1].decode()
    return None


def host_pids() -> list[int]:
    """Every PID on this machine as the host sees it."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


@dataclass(frozen=True)
class Lab:
    """The running lab: what ``scripts/slurm-lab env`` reported, plus helpers to use it."""

    home: Path
    partition: str
    nodes: tuple[str, ...]
    node_ips: tuple[str, ...]
    node_pids: tuple[int, ...]
    host_ip: str
    gpus_per_node: int
    venv: Path
    model: Path
    env: dict[str, str] = field(repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Lab:
        """Build from the ``KEY=value`` mapping of ``scripts/slurm-lab env``."""
        return cls(
            home=Path(env["LAB_HOME"]),
            partition=env["LAB_PARTITION"],
            nodes=tuple(env["LAB_NODES"].split()),
            node_ips=tuple(env["LAB_NODE_IPS"].split()),
            node_pids=tuple(int(p) for p in env.get("LAB_NODE_PIDS", "").split()),
            host_ip=env["LAB_HOST_IP"],
            gpus_per_node=int(env["LAB_GPUS_PER_NODE"]),
            venv=Path(env["LAB_VENV"]),
            model=Path(env["LAB_MODEL"]),
            env=env,
        )

    @property
    def python(self) -> Path:
        """The lab venv's interpreter: what compute nodes run."""
        return self.venv / "bin" / "python"

    def run(
        self, argv: Sequence[str], timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (usually a Slurm client) against the lab, with a timeout."""
        env = dict(os.environ, SLURM_CONF=self.env["SLURM_CONF"])
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=check, env=env
        )

    def sbatch(self, script: str, workdir: Path, args: Sequence[str] = ()) -> int:
        """Write ``script`` to ``workdir/job.sbatch``, submit it, return the job id.

        The job runs in ``workdir`` (shared by all nodes) on the lab's partition.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "job.sbatch"
        path.write_text(script)
        proc = self.run(
            [
                "sbatch",
                "--parsable",
                f"--partition={self.partition}",
                f"--chdir={workdir}",
                *args,
                str(path),
            ]
        )
        if proc.returncode != 0:
            raise AssertionError(f"sbatch refused the job: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> JobResult | None:
        """The job's current state, from slurmctld, else from accounting; None if unknown."""
        proc = self.run(["scontrol", "show", "job", "--oneliner", str(job_id)], timeout=15)
        if proc.returncode == 0:
            state = re.search(r"\bJobState=(\S+)", proc.stdout)
            code = re.search(r"\bExitCode=(\S+)", proc.stdout)
            if state:
                return JobResult(job_id, state.group(1), code.group(1) if code else "")
        proc = self.run(
            ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,ExitCode"], timeout=15
        )
        line = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and line:
            state, _, code = line[0].partition("|")
            return JobResult(job_id, state.split()[0], code)
        return None

    def wait_job(self, job_id: int, timeout: float = 120, pending_timeout: float = 600) -> JobResult:
        """Poll until the job reaches a terminal state; fail the test at a deadline.

        ``timeout`` counts from the moment the job leaves PENDING; time spent queued behind
        other jobs has its own, longer ``pending_timeout``.
        """
        pending_deadline = time.monotonic() + pending_timeout
        run_deadline: float | None = None
        last: JobResult | None = None
        while True:
            last = self.job_state(job_id)
            if last is not None and last.state in TERMINAL_STATES:
                return last
            now = time.monotonic()
            if last is None or last.state == "PENDING":
                expired = now > pending_deadline
            else:
                run_deadline = run_deadline or now + timeout
                expired = now > run_deadline
            if expired:
                self.run(["scancel", str(job_id)])
                raise AssertionError(f"job {job_id} did not finish in time (last: {last})")
            time.sleep(0.5)

    def wait_running(self, job_id: int, timeout: float = 600) -> None:
        """Poll until the job runs (fails if it ends first or is still queued at the deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.job_state(job_id)
            if result is not None and result.state == "RUNNING":
                return
            if result is not None and result.state in TERMINAL_STATES:
                raise AssertionError(f"job {job_id} ended before running: {result}")
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not start within {timeout} s")

    def cancel(self, job_id: int) -> None:
        """scancel the job (no error if it already ended)."""
        self.run(["scancel", str(job_id)])

    script = LAB_SCRIPT

    def lab_command(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``scripts/slurm-lab ARGS`` (``up``/``down``/``status``) with a timeout."""
        return subprocess.run(
            [str(LAB_SCRIPT), *args], capture_output=True, text=True, timeout=timeout
        )

    @staticmethod
    def current_env() -> dict[str, str]:
        """Re-read ``scripts/slurm-lab env`` (after the lab was restarted)."""
        return read_lab_env()

    @staticmethod
    def pid_namespace(pid: int) -> str | None:
        """The PID namespace id of a host PID (None once it is gone)."""
        return _ns(pid, "pid")

    @staticmethod
    def host_pids() -> list[int]:
        """Every PID on this machine, as the host sees it."""
        return host_pids()

    @staticmethod
    def cmdline(pid: int) -> str:
        """A PID's command line ('' for zombies and vanished processes)."""
        return _cmdline(pid)

    def node_namespaces(self) -> dict[str, str]:
        """PID-namespace id -> node name, from each node's PID 1 (tini) recorded by the lab."""
        spaces: dict[str, str] = {}
        for node, pid in zip(self.nodes, self.node_pids):
            ns = _ns(pid, "pid")
            if ns is not None:
                spaces[ns] = node
        return spaces

    def node_processes(self) -> list[NodeProcess]:
        """Every process inside any lab node, found by walking /proc and comparing namespaces."""
        spaces = self.node_namespaces()
        found = []
        for pid in host_pids():
            ns = _ns(pid, "pid")
            if ns in spaces:
                cmd = _cmdline(pid)
                if cmd:  # zombies and kernel threads have none
                    found.append(NodeProcess(spaces[ns], pid, cmd, _job_id_of(pid)))
        return found

    def job_processes(self, job_id: int) -> list[NodeProcess]:
        """Processes of one job still alive on any node (by ``SLURM_JOB_ID`` in their environment)."""
        return [p for p in self.node_processes() if p.job_id == str(job_id)]

    def assert_no_job_processes(self, job_id: int, timeout: float = 15) -> None:
        """Fail unless, within ``timeout``, no process of the job remains on any lab node."""
        deadline = time.monotonic() + timeout
        left = self.job_processes(job_id)
        while left and time.monotonic() < deadline:
            time.sleep(0.3)
            left = self.job_processes(job_id)
        assert not left, f"processes of job {job_id} left on the nodes: {left}"


def lab_required() -> bool:
    """True under ``make test``/CI, where a lab that is down is an error, not a skip."""
    return os.environ.get("SLURM_LAB_REQUIRED", "") not in ("", "0")


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The running Slurm lab; skips (or fails under make test) when it is down."""
    try:
        env = read_lab_env()
    except (OSError, subprocess.SubprocessError) as exc:
        reason = f"cannot read the lab's settings from {LAB_SCRIPT} env: {exc}"
        if lab_required():
            pytest.fail(reason)
        pytest.skip(reason)
    if env.get("LAB_UP") != "1":
        reason = "the Slurm lab is down: run `scripts/slurm-lab up` (make test does it for you)"
        if lab_required():
            pytest.fail(reason)
        pytest.skip(reason)
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    yield Lab.from_env(env)
