"""A replica's node: where it sits, how it backs off, and its vLLM restarted in place (a fake
`vllm` that answers like vLLM, then crashes)."""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

from slurm_vllm.jobdir import JobDir, Run
from slurm_vllm.node import lifecycle, replica, serve
from slurm_vllm.node.context import NodeContext
from slurm_vllm.node.lifecycle import Stopper
from slurm_vllm.node.ports import plan_ports
from slurm_vllm.node.topology import Topology
from slurm_vllm.spec import ServeSpec
from tests.unit.node.test_serve import FAKE_VLLM, KEY, pid_alive


def make_ctx(tmp_path: Path, rank: int = 1, mode: str = "serve", **spec_kw: object) -> NodeContext:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    fake = bin_dir / "vllm"
    fake.write_text(FAKE_VLLM.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    jobdir = JobDir(tmp_path / "job").create()
    jobdir.write_secret(jobdir.api_key, KEY)
    spec = ServeSpec("org/tiny", nodes=3, replicas=3, gpus_per_node=1, ready_timeout=30, **spec_kw)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_ARGV_FILE": str(tmp_path / "argv.json"),
           "FAKE_PIDS_FILE": str(tmp_path / "pids"), "FAKE_MODE": mode, "FAKE_DELAY": "0.2"}
    hosts = ("n1", "n2", "n3")
    topo = Topology(job_id="55", rank=rank, num_nodes=3, hostname=hosts[rank], hosts=hosts, head_host="n1",
                    head_ip="127.0.0.1", node_ip="127.0.0.1", interface="lo")
    return NodeContext(spec=spec, jobdir=jobdir, run=Run("55", 0), topology=topo,
                       ports=plan_ports("55", rank), env=env, stopper=Stopper(), ray_address=None,
                       temp_dir=str(tmp_path / "t"))


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve, "POLL_INTERVAL", 0.2)
    monkeypatch.setattr(lifecycle, "SIGNAL_RACE_GRACE", 0.2)
    monkeypatch.setattr(replica, "BACKOFF_FIRST", 0.1)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


@pytest.fixture(autouse=True, scope="module")
def as_the_node_program():
    lifecycle.become_subreaper()
    yield
    lifecycle.become_subreaper(False)


def wait_until_ready(ctx: NodeContext, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = ctx.jobdir.read_replica(1, ctx.run)
        if rec is not None and rec.phase == "ready":
            return
        time.sleep(0.1)
    raise AssertionError(f"replica 1 not ready within {timeout} s")


def test_each_node_is_one_replica_and_backoff_doubles_to_a_ceiling(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica, "BACKOFF_FIRST", 5.0)
    assert [replica.replica_index(make_ctx(tmp_path / str(r), rank=r)) for r in range(3)] == [0, 1, 2]
    assert [replica.backoff(n) for n in (1, 2, 3, 4, 5, 9)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


def test_a_replica_that_keeps_crashing_is_restarted_then_given_up(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, mode="crash-later", replica_restarts=1)
    phases: list[tuple[str, int]] = []
    reasons: dict[str, str] = {}
    real = replica.Reporter.__call__

    def record(self: replica.Reporter, phase: str, reason: str = "", log_tail: str = "") -> None:
        phases.append((phase, self.restarts))
        reasons[phase] = reason
        real(self, phase, reason, log_tail)  # type: ignore[arg-type]

    replica.Reporter.__call__ = record  # type: ignore[method-assign]
    try:
        replica.serve_replica(ctx)
    finally:
        replica.Reporter.__call__ = real  # type: ignore[method-assign]
    # One "restarting" write, with the reason, kept until the restarted vLLM is ready.
    assert phases == [("starting", 0), ("ready", 0), ("restarting", 1), ("ready", 1), ("failed", 1)]
    assert reasons["restarting"].startswith("replica 1 on n2: vllm exited with code 7 while serving")
    rec = ctx.jobdir.read_replica(1, ctx.run)
    assert rec is not None and rec.phase == "failed" and rec.restarts == 1
    assert "replica 1 on n2: vllm exited with code 7 while serving" in rec.reason
    assert "after 1 restart(s)" in rec.reason
    assert rec.url == f"http://127.0.0.1:{ctx.ports.api}/v1"


def test_a_stop_ends_the_replica_and_its_vllm(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    t = threading.Thread(target=replica.serve_replica, args=(ctx,))
    t.start()
    wait_until_ready(ctx)
    ctx.stopper.stop("cancelled")
    t.join(30)
    assert not t.is_alive()
    rec = ctx.jobdir.read_replica(1, ctx.run)
    assert rec is not None and (rec.phase, rec.reason) == ("ended", "cancelled")
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    time.sleep(0.2)
    assert not [pid for pid in pids if pid_alive(pid)]


def test_an_error_before_vllm_starts_is_the_replicas_failure_not_the_nodes(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    ctx.jobdir.api_key.unlink()  # the job was rendered with a key: its file must be there
    replica.serve_logged(ctx)
    rec = ctx.jobdir.read_replica(1, ctx.run)
    assert rec is not None and rec.phase == "failed" and "FileNotFoundError" in rec.reason


def test_the_time_limit_warning_drains_the_replica_then_ends_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = make_ctx(tmp_path)
    drained: list[float] = []
    monkeypatch.setattr(serve, "drain_then_stop", lambda proc, base, key, budget: drained.append(budget) or
                        lifecycle.stop(proc, 1.0) is None)
    t = threading.Thread(target=replica.serve_replica, args=(ctx,))
    t.start()
    wait_until_ready(ctx)
    ctx.stopper.stop(lifecycle.TIME_LIMIT)
    t.join(30)
    rec = ctx.jobdir.read_replica(1, ctx.run)
    assert rec is not None and (rec.phase, rec.reason) == ("ended", lifecycle.TIME_LIMIT)
    assert drained == [serve.drain_budget(ctx.spec.resources.signal_grace)]
