"""The head's GCS watcher child: its question/answer protocol with stand-in children, and the
child's loop with a stand-in GCS client (Ray's real one is exercised by the lab's bootstrap tests)."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Any

import pytest

from slurm_vllm.node import gcs_watch
from slurm_vllm.node.gcs_watch import GcsWatcherProcess
from slurm_vllm.node.ray_cluster import RayNode

NODE = {"node_id": "ab", "name": "n1", "hostname": "n1.lab", "ip": "10.0.0.1", "port": 1234, "alive": True,
        "is_head": True}

# A child that answers every question after a stale answer, a line that is not JSON, and Ray's
# chatter: only the answer with the question's id counts.
ANSWERING = f"""
import json, sys
for line in sys.stdin:
    ask = json.loads(line)
    print(json.dumps({{"id": ask["id"] - 1, "nodes": []}}))
    print("[2026-12-02 04:00:00] some log line of Ray's")
    print(json.dumps({{"id": ask["id"], "nodes": [{NODE!r}]}}), flush=True)
"""


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_the_answer_to_the_question_is_taken_and_the_rest_dropped() -> None:
    owned: list[Any] = []
    w = GcsWatcherProcess("10.0.0.1:6379", dict(os.environ), owned=owned, argv=child(ANSWERING))
    try:
        assert owned == [w.proc]
        for _ in range(3):
            assert w.nodes(timeout=5.0) == [RayNode(**NODE)]
    finally:
        w.close()
        w.proc.popen.wait(10)


def test_an_error_is_none_with_the_reason() -> None:
    code = 'import json, sys\nfor line in sys.stdin:\n    print(json.dumps({"id": json.loads(line)["id"], ' \
           '"error": "RpcError: unauthenticated"}), flush=True)\n'
    w = GcsWatcherProcess("10.0.0.1:6379", dict(os.environ), argv=child(code))
    try:
        assert w.nodes(timeout=5.0) is None and w.last_error == "RpcError: unauthenticated"
    finally:
        w.close()
        w.proc.popen.wait(10)


def test_no_answer_in_time_is_none_and_a_late_one_is_not_mistaken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcs_watch, "CONNECT_SLACK", 0.0)
    code = ('import json, sys, time\nfor line in sys.stdin:\n    ask = json.loads(line)\n'
            '    time.sleep(2.0 if ask["id"] == 1 else 0)\n'
            '    print(json.dumps({"id": ask["id"], "nodes": [] if ask["id"] == 1 else [' + repr(NODE) + ']}), flush=True)\n')
    w = GcsWatcherProcess("10.0.0.1:6379", dict(os.environ), argv=child(code))
    try:
        t0 = time.monotonic()
        assert w.nodes(timeout=0.1) is None and "no answer from the GCS watcher" in (w.last_error or "")
        assert time.monotonic() - t0 < 2.0
        assert w.nodes(timeout=5.0) == [RayNode(**NODE)]  # the late answer to question 1 was dropped
    finally:
        w.close()
        w.proc.popen.wait(10)


def test_a_child_that_exited_is_named() -> None:
    w = GcsWatcherProcess("10.0.0.1:6379", dict(os.environ), argv=child("raise SystemExit(3)"))
    w.proc.popen.wait(10)
    assert w.nodes(timeout=0.5) is None and w.last_error == "the GCS watcher process exited (code 3)"


def test_the_child_answers_each_question_from_its_gcs_client(monkeypatch: pytest.MonkeyPatch) -> None:
    class Client:
        def __init__(self, address: str) -> None:
            self.address, self.calls, self.last_error = address, 0, None

        def nodes(self, timeout: float = 2.0) -> list[RayNode] | None:
            self.calls += 1
            if self.calls == 1:
                self.last_error = "RpcError: not yet"
                return None
            return [RayNode(**NODE)]

    monkeypatch.setattr(gcs_watch, "GcsWatcher", Client)
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"id": 1, "timeout": 1}\nnot json\n{"id": 2}\n'))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert gcs_watch.main(["10.0.0.1:6379"]) == 0
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"id": 1, "error": "RpcError: not yet"}, {"id": 2, "nodes": [NODE]}]


def test_the_node_program_never_loads_rays_core() -> None:
    """The point of the child: importing the head's code loads no part of Ray."""
    import subprocess

    code = "import sys, slurm_vllm.node.head, slurm_vllm.node.program; print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
