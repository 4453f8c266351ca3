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

from slurm_vllm.jobdir import HeadlessRecord, JobDir, ReplicaRecord, Run
from slurm_vllm.node import lifecycle, replica, serve
from slurm_vllm.node.context import NodeContext
from slurm_vllm.node.lifecycle import Stopper
from slurm_vllm.node.ports import plan_ports
from slurm_vllm.node.topology import Topology
from slurm_vllm.spec import ServeSpec
from tests.unit.node.test_serve import FAKE_VLLM, KEY, pid_alive


def make_ctx(tmp_path: Path, rank: int = 1, mode: str = "serve", nodes: int = 3, replicas: int = 3,
             **spec_kw: object) -> NodeContext:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    fake = bin_dir / "vllm"
    fake.write_text(FAKE_VLLM.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    jobdir = JobDir(tmp_path / "job").create()
    jobdir.write_secret(jobdir.api_key, KEY)
    spec = ServeSpec("org/tiny", nodes=nodes, replicas=replicas, gpus_per_node=1, ready_timeout=30, **spec_kw)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_ARGV_FILE": str(tmp_path / "argv.json"),
           "FAKE_PIDS_FILE": str(tmp_path / "pids"), "FAKE_MODE": mode, "FAKE_DELAY": "0.2"}
    hosts = tuple(f"n{i + 1}" for i in range(nodes))
    topo = Topology(job_id="55", rank=rank, num_nodes=nodes, hostname=hosts[rank], hosts=hosts, head_host="n1",
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
    assert [replica.place_of(make_ctx(tmp_path / str(r), rank=r)).index for r in range(3)] == [0, 1, 2]
    assert [replica.backoff(n) for n in (1, 2, 3, 4, 5, 9)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


def test_a_replica_that_keeps_crashing_is_restarted_then_given_up(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, mode="crash-later", replica_restarts=1)
    phases: list[tuple[str, int]] = []
    reasons: dict[str, str] = {}
    real = replica.Reporter.__call__

    def record(self: replica.Reporter, phase: str, reason: str = "", log_tail: str = "", master: str = "") -> None:
        phases.append((phase, self.restarts))
        reasons[phase] = reason
        real(self, phase, reason, log_tail, master)  # type: ignore[arg-type]

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


# --------------------------------------------------------------------------- replicas of several nodes


def test_replicas_take_consecutive_nodes_the_first_serves_the_api() -> None:
    hosts = ("a", "b", "c", "d")
    places = [replica.place(rank, 2, hosts) for rank in range(4)]
    assert [(p.index, p.member, p.first) for p in places] == [(0, 0, True), (0, 1, False), (1, 0, True), (1, 1, False)]
    assert places[3].ranks == (2, 3) and places[3].hosts == ("c", "d") and places[3].size == 2
    assert replica.place(2, 1, hosts[:3]).ranks == (2,)


def wait_for(what: str, check, timeout: float = 20):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def argv_of(tmp_path: Path) -> list[str]:
    import json

    return list(json.loads((tmp_path / "argv.json").read_text())["argv"])


def test_a_replicas_first_node_names_the_rendezvous_and_restarts_it_all_when_a_headless_part_exits(
        tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, rank=2, nodes=4, replicas=2)  # replica 1 = n3 (serves) + n4 (headless)
    t = threading.Thread(target=replica.serve_replica, args=(ctx,))
    t.start()
    try:
        wait_until_ready(ctx)
        rec = ctx.jobdir.read_replica(1, ctx.run)
        assert rec is not None and rec.nodes == ["n3", "n4"] and rec.master == f"127.0.0.1:{ctx.ports.mp_master_port}"
        argv = argv_of(tmp_path)
        assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--node-rank") + 1] == "0"
        assert argv[argv.index("--master-port") + 1] == str(ctx.ports.mp_master_port) and "--headless" not in argv
        first_pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
        # A part of another attempt says nothing about this one.
        HeadlessRecord(job_id="55", index=1, rank=3, host="n4", attempt=5, phase="exited", reason="old").write(
            ctx.jobdir.headless(3))
        time.sleep(1.5)
        assert ctx.jobdir.read_replica(1, ctx.run).restarts == 0  # type: ignore[union-attr]
        HeadlessRecord(job_id="55", index=1, rank=3, host="n4", attempt=0, phase="exited",
                       reason="vllm exited with code 9 on n4").write(ctx.jobdir.headless(3))
        between = wait_for("the replica restarting, its rendezvous withdrawn", lambda: (
            r := ctx.jobdir.read_replica(1, ctx.run)) is not None and r.phase == "restarting" and r)
        assert between.restarts == 1 and "vllm exited with code 9 on n4" in between.reason
        assert not any(pid_alive(pid) for pid in first_pids), "the first node's vLLM of the lost launch still runs"
        again = wait_for("the replica ready again", lambda: (r := ctx.jobdir.read_replica(1, ctx.run)) is not None
                         and r.phase == "ready" and r)
        assert again.restarts == 1 and again.master == f"127.0.0.1:{ctx.ports.mp_master_port}" and not between.master
    finally:
        ctx.stopper.stop("cancelled")
        t.join(30)
    assert not t.is_alive()
    assert ctx.jobdir.read_replica(1, ctx.run).phase == "ended"  # type: ignore[union-attr]


def replica_record(ctx: NodeContext, *, master: str = "127.0.0.1:29999", restarts: int = 0,
                   phase: str = "starting") -> ReplicaRecord:
    return ReplicaRecord(job_id="55", index=1, nodes=["n3", "n4"], url="http://127.0.0.1:1/v1", phase=phase,  # type: ignore[arg-type]
                         restarts=restarts, master=master)


def test_a_headless_node_follows_its_replicas_launches(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, rank=3, nodes=4, replicas=2)
    part = replica.Headless(ctx, replica.place_of(ctx))
    try:
        assert part.step(replica_record(ctx, master=""), job_over=False) and part.proc is None  # no launch yet
        assert part.step(replica_record(ctx), job_over=False) and part.proc is not None
        argv = wait_for("the headless argv", lambda: (tmp_path / "argv.json").exists() and argv_of(tmp_path))
        assert "--headless" in argv and argv[argv.index("--node-rank") + 1] == "1"
        assert (argv[argv.index("--master-addr") + 1], argv[argv.index("--master-port") + 1]) == ("127.0.0.1", "29999")
        assert "--port" not in argv and "--host" not in argv
        rec = ctx.jobdir.read_headless(3, ctx.run)
        assert rec is not None and (rec.phase, rec.attempt, rec.index) == ("running", 0, 1)
        first = part.proc
        assert part.step(replica_record(ctx, restarts=1), job_over=False)  # a new launch: a new part
        assert first.poll() is not None and part.proc is not None and part.proc is not first
        assert part.attempt == 1
        second = part.proc
        assert part.step(replica_record(ctx, master="", restarts=2, phase="restarting"), job_over=False)
        assert second.poll() is not None and part.proc is None  # the launch is over: its part too
        assert not part.step(replica_record(ctx, master="", restarts=2, phase="failed"), job_over=False)
        assert not part.step(replica_record(ctx, restarts=2), job_over=True)
        assert part.proc is None
    finally:
        part.stop()


def test_a_headless_part_that_exits_by_itself_is_reported_once_for_its_launch(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, rank=3, mode="crash-later", nodes=4, replicas=2)
    part = replica.Headless(ctx, replica.place_of(ctx))
    try:
        part.step(replica_record(ctx), job_over=False)
        proc = part.proc
        assert proc is not None
        wait_for("the headless part's crash", lambda: proc.poll() is not None, timeout=10)
        assert part.step(replica_record(ctx), job_over=False) and part.proc is None
        rec = ctx.jobdir.read_headless(3, ctx.run)
        assert rec is not None and (rec.phase, rec.attempt) == ("exited", 0)
        assert "vllm exited with code 7 on n4 (replica 1, headless)" in rec.reason
        assert replica.headless_lost(ctx, replica.place_of(ctx), 0) == rec.reason
        assert replica.headless_lost(ctx, replica.place_of(ctx), 1) is None
        part.step(replica_record(ctx), job_over=False)
        assert part.proc is None, "the same launch must not be joined twice"
        part.step(replica_record(ctx, restarts=1, phase="restarting"), job_over=False)
        assert part.proc is not None and part.attempt == 1  # the restarted launch is joined
    finally:
        part.stop()


def test_only_the_nodes_serving_an_api_act_on_the_time_limit_warning() -> None:
    """They drain their vLLM, which needs the replica's other nodes until it has."""
    from slurm_vllm.node.program import serves_api

    two_by_two = ServeSpec("org/tiny", nodes=4, replicas=2, gpus_per_node=1)
    assert [serves_api(two_by_two, r) for r in range(4)] == [True, False, True, False]
    assert [serves_api(ServeSpec("org/tiny", nodes=3, replicas=3, gpus_per_node=1), r) for r in range(3)] == [True] * 3
    assert [serves_api(ServeSpec("org/tiny", nodes=2, gpus_per_node=1), r) for r in range(2)] == [True, False]
