"""The pre-flight all-reduce for real: two child processes on localhost summing over Gloo, a peer
that never comes (failing by the deadline), and no child left behind either way."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from slurm_vllm.node import allreduce
from slurm_vllm.node.allreduce import AllReduce
from slurm_vllm.spec import ServeSpec
from tests.unit.node.test_preflight import RUN, faked, run_nodes

pytestmark = pytest.mark.skipif(not allreduce.torch_importable(), reason="torch is not installed")

ROOT = str(Path(__file__).resolve().parents[3])


def env() -> dict[str, str]:
    return dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_world_size_two_on_localhost_sums_to_two():
    port, owned = free_port(), []  # type: ignore[var-annotated]
    t0 = time.monotonic()
    nodes = [AllReduce.spawn(rank=r, world=2, gpus=0, env=env(), owned=owned) for r in range(2)]
    assert len(owned) == 2
    try:
        for n in nodes:
            n.go("127.0.0.1", port)
        outcomes = [n.wait(timeout=30) for n in nodes]
    finally:
        for n in nodes:
            n.close()
    took = time.monotonic() - t0
    for o in outcomes:
        assert o.ok, o.detail
        assert o.backend == "gloo" and o.detail.startswith("gloo all-reduce over 2 nodes: sum 2 (rendezvous ")
        assert o.import_seconds is not None and o.import_seconds < took
    assert owned == [] and all(gone(n.proc.pid) for n in nodes)
    assert took < 60


def test_a_peer_that_never_comes_fails_by_the_deadline():
    node = AllReduce.spawn(rank=0, world=2, gpus=0, env=env(), timeout=1.0)
    try:
        node.go("127.0.0.1", free_port())
        outcome = node.wait(timeout=1.0)
    finally:
        node.close()
    assert not outcome.ok
    assert outcome.detail.startswith("gloo rendezvous at 127.0.0.1:"), outcome.detail
    assert gone(node.proc.pid)


def test_close_before_go_leaves_nothing_and_an_abort_stops_the_wait():
    node = AllReduce.spawn(rank=1, world=2, gpus=0, env=env())
    node.close()
    assert gone(node.proc.pid)
    node = AllReduce.spawn(rank=1, world=2, gpus=0, env=env())
    outcome = node.wait(abort=lambda: True)
    node.close()
    assert (outcome.ok, outcome.detail) == (False, "stopped: the job no longer needs it")
    assert gone(node.proc.pid)


def test_the_nodes_meet_through_their_records_on_the_head_s_planned_port(tmp_path: Path):
    """Two node programs' pre-flights (threads) in full mode: the head's record carries its
    rendezvous port, the worker reads it, both children sum, the head records the outcome."""
    spec = ServeSpec("org/m", nodes=2, gpus_per_node=2)
    jd, results, programs = run_nodes(tmp_path, 2, spec, faked(), env={"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert results == {0: True, 1: True}, results
    head = jd.read_preflight(0, RUN)
    assert head is not None and head.rendezvous_port and head.verdict == "passed"
    state = jd.read_state(RUN)
    assert state is not None
    done = [c for c in state.preflight if c.check == "allreduce"]
    assert [(c.node, c.status) for c in done] == [("n1", "ok")]
    assert done[0].detail.startswith("gloo all-reduce over 2 nodes: sum 2")
    worker = jd.read_preflight(1, RUN)
    assert worker is not None and [c.status for c in worker.checks if c.check == "allreduce"] in ([], ["ok"])
    assert all(p.owned == [] for p in programs)
