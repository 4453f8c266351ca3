"""The head's view of its Ray cluster, from a child process that holds Ray's GCS client.

Ray's GCS client lives in Ray's compiled core (``ray._raylet``): loading it into the node
program would add about 50 MB to a process that otherwise needs under 40. So the head asks a
child instead, started when the head starts (its Ray import overlaps ``ray start --head``):

    parent -> child, one JSON line per question:  {"id": 3, "timeout": 2.0}
    child -> parent, one JSON line per answer:    {"id": 3, "nodes": [{...RayNode...}, ...]}
                                               or {"id": 3, "error": "RpcError: ..."}

:class:`GcsWatcherProcess` has :class:`~slurm_vllm.node.ray_cluster.GcsWatcher`'s ``nodes()``,
so the head's wait for its nodes and its watchdog read it the same way. An answer that comes
after its question timed out is recognised by its id and dropped. The child ends when its
stdin closes (or with the node program: it is an owned process).

``python -m slurm_vllm.node.gcs_watch ADDRESS`` runs the child.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import IO, Any

from slurm_vllm.node.lifecycle import OwnedProcess
from slurm_vllm.node.ray_cluster import GcsWatcher, RayNode

#: The first question may wait for the GCS client to connect (GcsWatcher.connect, 15 s at most).
CONNECT_SLACK = 16.0


def child_argv(address: str) -> list[str]:
    return [sys.executable, "-m", "slurm_vllm.node.gcs_watch", address]


class GcsWatcherProcess:
    """GcsWatcher's ``nodes()``, answered by a child process (see the module's docstring)."""

    def __init__(self, address: str, env: Mapping[str, str], owned: list[OwnedProcess] | None = None,
                 argv: list[str] | None = None) -> None:
        self.address = address
        self.last_error: str | None = None
        self.proc = OwnedProcess("gcs-watch", argv or child_argv(address), env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if owned is not None:
            owned.append(self.proc)  # the node program's teardown ends it
        assert self.proc.popen.stdin is not None and self.proc.popen.stdout is not None
        self._to: IO[bytes] = self.proc.popen.stdin
        self._from: IO[bytes] = self.proc.popen.stdout
        self._lock = threading.Lock()
        self._asked = 0
        self._connected = False
        self._buffer = b""

    def nodes(self, timeout: float = 2.0) -> list[RayNode] | None:
        """Every node the GCS knows; None when it did not answer in time (``last_error`` says why)."""
        with self._lock:
            self._asked += 1
            ask = self._asked
            try:
                self._to.write(json.dumps({"id": ask, "timeout": timeout}).encode() + b"\n")
                self._to.flush()
            except (BrokenPipeError, ValueError, OSError):
                self.last_error = f"the GCS watcher process exited (code {self.proc.poll()})"
                return None
            wait = timeout + 1.0 + (0.0 if self._connected else CONNECT_SLACK)
            answer = self._answer(ask, time.monotonic() + wait)
        if answer is None:
            self.last_error = (f"no answer from the GCS watcher within {wait:.0f}s"
                               if self.proc.running else f"the GCS watcher process exited (code {self.proc.poll()})")
            return None
        if "error" in answer:
            self.last_error = str(answer["error"])
            return None
        self._connected = True
        return [RayNode(**n) for n in answer.get("nodes", [])]

    def _answer(self, ask: int, deadline: float) -> dict[str, Any] | None:
        fd = self._from.fileno()
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                try:
                    got = json.loads(line)
                except ValueError:
                    continue  # not ours (a stray line of Ray's)
                if isinstance(got, dict) and got.get("id") == ask:
                    return got
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk

    def close(self) -> None:
        try:
            self._to.close()
        except OSError:
            pass


def main(argv: list[str]) -> int:
    """The child: answer each question on stdin with the GCS's nodes, until stdin closes."""
    watcher = GcsWatcher(argv[0])
    out = sys.stdout
    for line in sys.stdin:
        try:
            ask = json.loads(line)
            timeout = float(ask.get("timeout", 2.0))
        except (ValueError, AttributeError):
            continue
        nodes = watcher.nodes(timeout=timeout)
        if nodes is None:
            reply: dict[str, object] = {"id": ask.get("id"), "error": watcher.last_error or "no answer"}
        else:
            reply = {"id": ask.get("id"), "nodes": [dataclasses.asdict(n) for n in nodes]}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
