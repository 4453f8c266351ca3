"""The Slurm lab for the tests: one reader of its settings, one way to say it is up, its jobs,
its processes (one finder), and the CLI run for real against it.

``scripts/slurm-lab up`` brings the lab up; tests get it through the ``lab`` fixture
(tests/lab/conftest.py). When it is down they are skipped with the reason, except under
``make test`` / CI, which set ``SLURM_LAB_REQUIRED=1`` so that a missing lab fails instead.

Jobs of the bootstrap tests are prepared with the library's own ``prepare_job`` (so they run the
rendered script) with ``SLURM_VLLM_NODE_NO_SERVE=1``: the head holds the formed cluster instead
of serving. Tests that need a node to misbehave wrap the node command of that script in a tiny
per-rank shell wrapper; everything else is exactly what users submit.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB_SCRIPT = REPO / "scripts" / "slurm-lab"
LAB_PROFILE = os.environ.get("SLURM_VLLM_LAB_PROFILE", str(REPO / "scripts" / "lab" / "profile.yaml"))
#: Nodes of the served jobs (the lab has three; two leave room for a second job).
LAB_NODES = int(os.environ.get("SLURM_VLLM_LAB_NODES", "2"))

#: Slurm job states after which nothing of the job runs any more.
TERMINAL_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                             "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"})


# ------------------------------------------------------------------------- the lab's settings


def read_lab_env(timeout: float = 60) -> dict[str, str]:
    """``scripts/slurm-lab env`` as a dict (LAB_UP, LAB_NODES, LAB_NODE_IPS, LAB_HOME, ...)."""
    proc = subprocess.run([str(LAB_SCRIPT), "env"], capture_output=True, text=True, timeout=timeout, check=True)
    env: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            env[key.strip()] = value.strip().strip('"')
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


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _job_id_of(pid: int) -> str | None:
    for entry in _environ(pid):
        if entry.startswith(b"SLURM_JOB_ID="):
            return entry.split(b"=", 1)[1].decode()
    return None


def host_pids() -> list[int]:
    """Every PID on this machine as the host sees it."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


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

    def get(self, key: str, default: str = "") -> str:
        """One of the lab's raw settings (``scripts/slurm-lab env``)."""
        return self.env.get(key, default)

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
        for node, pid in zip(self.nodes, self.node_pids, strict=False):
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

    def job_processes(self, job_id: int | str) -> list[NodeProcess]:
        """Processes of one job still alive on any node (the one finder, :func:`job_processes`)."""
        return job_processes(str(job_id), width=100_000)

    def assert_no_job_processes(self, job_id: int | str, timeout: float = 20) -> None:
        """Fail unless, within ``timeout``, no process of the job remains on any lab node."""
        assert_no_processes(str(job_id), timeout)


# ------------------------------------------------------------------------- processes


def _node_of_pid() -> dict[str, str]:
    """PID-namespace id -> lab node name (from each node's PID 1, recorded by the lab)."""
    try:
        env = read_lab_env()
    except (OSError, subprocess.SubprocessError):
        return {}
    spaces = {}
    for node, pid in zip(env.get("LAB_NODES", "").split(), env.get("LAB_NODE_PIDS", "").split(), strict=False):
        ns = _ns(int(pid), "pid")
        if ns is not None:
            spaces[ns] = node
    return spaces


def job_processes(job_id: str, width: int = 160) -> list[NodeProcess]:
    """Every live process on the machine (all lab nodes) of this job: by ``SLURM_JOB_ID`` in its
    environment or by its Ray temp dir (``svl-<job>-``) in its command line; Slurm's own step
    daemons excluded. Command lines are cut to ``width``."""
    needle_env = f"SLURM_JOB_ID={job_id}".encode()
    needle_dir = f"svl-{job_id}-"
    spaces = _node_of_pid()
    found = []
    for pid in host_pids():
        try:
            stat_text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat_text[stat_text.rfind(")") + 2:].split()[:1] == ["Z"]:
            continue
        cmd = _cmdline(pid)
        if not cmd or "slurmstepd" in cmd:
            continue
        if needle_env in _environ(pid) or needle_dir in cmd:
            found.append(NodeProcess(spaces.get(_ns(pid, "pid") or "", "?"), pid, cmd[:width], job_id))
    return found


def assert_no_processes(job_id: str, timeout: float = 20) -> None:
    """Nothing of the job may remain on any node (checked for a while: teardown is async)."""
    t0 = time.monotonic()
    left = job_processes(job_id)
    while left and time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        left = job_processes(job_id)
    assert not left, f"processes of job {job_id} left behind: {[(p.node, p.pid, p.cmdline) for p in left]}"


# ------------------------------------------------------------------------- is it up?


def lab_required() -> bool:
    """True under ``make test``/CI, where a lab that is down is an error, not a skip."""
    return os.environ.get("SLURM_LAB_REQUIRED", "") not in ("", "0")


def open_lab() -> Lab:
    """The running lab; skips (or fails under make test) when it is down."""
    try:
        env = read_lab_env()
    except (OSError, subprocess.SubprocessError) as exc:
        _unavailable(f"cannot read the lab's settings from {LAB_SCRIPT} env: {exc}")
    if env.get("LAB_UP") != "1":
        _unavailable("the Slurm lab is down: run `scripts/slurm-lab up` (make test does it for you)")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    return Lab.from_env(env)


def _unavailable(reason: str) -> Any:
    if lab_required():
        pytest.fail(reason)
    pytest.skip(reason)


# ------------------------------------------------------------------------- jobs


def make_job(tmp_path: Path, lab: Lab, *, nodes: int, name: str = "boot", join_timeout: float = 60,
             cluster_timeout: float = 90, gpus: int = 1, cpus: int = 1, mem: str = "1500M",
             extra_env: dict[str, str] | None = None, sbatch_args: list[str] | None = None,
             preflight: str = "quick") -> Any:
    """A real job directory and rendered script for a bootstrap-only job (no vLLM).

    The pre-flight's all-reduce (``preflight: full``, a torch import per node) is left out by
    default: these jobs test forming the cluster; the serving tests run the full pre-flight."""
    from slurm_vllm.render import prepare_job
    from slurm_vllm.spec import ServeSpec

    spec = ServeSpec(
        "org/bootstrap-only", nodes=nodes, gpus_per_node=gpus, cpus_per_task=cpus, mem=mem,
        partition=lab.partition, time="00:10:00", job_name=name,
        venv=str(lab.venv), env={"SLURM_VLLM_NODE_NO_SERVE": "1", **(extra_env or {})},
        ray={"join_timeout": join_timeout, "cluster_timeout": cluster_timeout, "preflight": preflight},
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


def serve_pids(job_id: str, host: str) -> list[int]:
    """The job's ``vllm serve`` processes on ``host``, lowest pid (the one started first) first."""
    return sorted(p.pid for p in job_processes(job_id) if p.node == host and " serve " in f" {p.cmdline} ")


def kill_then_back(job: Any, pid: int, timeout: float) -> list[str]:
    """SIGKILL ``pid`` (a replica's vLLM), then wait for the job to show DEGRADED and READY
    again; every summary seen, in order."""
    os.kill(pid, 9)
    seen: list[str] = []

    def back() -> bool:
        s = job.status()
        if not seen or seen[-1] != s.summary():
            seen.append(s.summary())
        return bool(s.phase.value == "READY" and any(x.startswith("DEGRADED") for x in seen))

    wait_for(back, timeout, "DEGRADED, then READY again", poll=1.0)
    return seen


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


# ------------------------------------------------------------------------- the CLI, for real


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


#: Set by the lab tier's session fixture: the compile caches every vLLM job of the suite shares.
ENV_LAB_CACHE = "SLURM_VLLM_LAB_CACHE"


def lab_cache_dir() -> str:
    """The suite's shared compile-cache folder (a later job of the same model finds the earlier
    one's entries, as a user's next job does in their own ``cache_dir``)."""
    return os.environ[ENV_LAB_CACHE]


def lab_serve_flags(lab: Lab) -> list[str]:
    """CLI flags that serve the lab's tiny model with CPU vLLM over LAB_NODES nodes (the lab profile)."""
    return ["--profile", LAB_PROFILE, str(lab.model), "--nodes", str(LAB_NODES), "--gpus-per-node", "1",
            "--mem", "5000M", "--cache-dir", lab_cache_dir()]


def lab_serve_kwargs(lab: Lab) -> dict[str, object]:
    """The same as keyword arguments for ``ServeSpec`` (the profile's fields, flat)."""
    from slurm_vllm.spec import read_spec_file

    kw: dict[str, object] = dict(read_spec_file(LAB_PROFILE))
    kw.update(model=str(lab.model), nodes=LAB_NODES, gpus_per_node=1, mem="5000M", cache_dir=lab_cache_dir())
    return kw
