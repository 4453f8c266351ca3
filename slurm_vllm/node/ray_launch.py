"""How the node program runs ``ray``: Ray's own CLI, in a launcher that starts it sooner.

``ray start`` spends most of its first seconds importing its CLI, and most of that is the Ray
Serve and Ray Jobs subcommands, which ``ray start`` never uses. The launcher runs the click group
behind the ``ray`` executable (Ray's own code, in this process) with those two imports left out
(Ray's CLI already treats them as optional): about 1 s less CPU per start on every node.

A worker goes further. Its ``ray start --address`` can do nothing useful until the head's raylet
has registered (it reads the head's node record first, and re-reads it only every 2 s). So the
worker's node program starts the launcher with no arguments while the head is still coming up:
it imports the CLI and waits for an order on stdin, one JSON line::

    {"args": ["start", "--address=...", ...],   # what to run, as `ray ARGS`
     "await_head": "IP:PORT",                   # first wait until the head's own node is alive
     "timeout": 300,                            # ... for at most this long (then exit 75)
     "report_fd": 5,                            # write events here, one word per line:
     "node": ["IP", PORT]}                      #   "started" when ray start begins, "joined"
                                                #   once this node (IP, node-manager PORT or
                                                #   null for any) is alive in the GCS

The launcher already holds Ray's GCS client, so the worker's node program never imports Ray.
``python -m slurm_vllm.node.ray_launch ARGS...`` runs ``ray ARGS...`` at once. End of input
before any order: exit 0 having started nothing.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from slurm_vllm.node.lifecycle import OwnedProcess
from slurm_vllm.node.ray_cluster import HEAD_NEVER_REGISTERED, GcsWatcher

#: Subcommands Ray's CLI adds only if they import; ``ray start`` needs neither.
UNUSED_CLI_MODULES = ("ray.serve.scripts", "ray.dashboard.modules.job.cli")


def launcher_argv(python: str = sys.executable) -> list[str]:
    """The command that runs the launcher in this interpreter (which must have Ray)."""
    return [python, "-m", "slurm_vllm.node.ray_launch"]


# ---------------------------------------------------------------- inside the launcher


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    for name in UNUSED_CLI_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: "cannot be imported"
    try:
        from ray.scripts.scripts import cli  # the click group behind the `ray` console script
    except ImportError as e:
        print(f"ray_launch: cannot import Ray's CLI ({e})", file=sys.stderr)
        return 3
    if not args:
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        order = json.loads(line)
        args = list(order["args"])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # Ray's processes must not inherit the pipe
        os.close(devnull)
        report = Reporter(order.get("report_fd"))
        head = order.get("await_head")
        if head and not await_head(head, float(order.get("timeout", 300))):
            return HEAD_NEVER_REGISTERED
        report.say("started")
        if order.get("node"):
            node_ip, port = order["node"]
            threading.Thread(target=report_joined, args=(report, head or _address_arg(args), node_ip, port),
                             name="report-joined", daemon=True).start()
        else:
            report.close()
    sys.argv = ["ray", *args]
    return int(cli.main(args=args, prog_name="ray") or 0)


class Reporter:
    """Writes one-word events to the node program's pipe (nothing when there is none)."""

    def __init__(self, fd: int | None) -> None:
        self.stream = os.fdopen(fd, "w") if fd is not None else None

    def say(self, word: str) -> None:
        if self.stream is not None:
            try:
                self.stream.write(word + "\n")
                self.stream.flush()
            except OSError:
                self.stream = None

    def close(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()
            except OSError:
                pass
            self.stream = None


def await_head(address: str, timeout: float) -> bool:
    """Wait until the GCS at ``address`` lists the head's own node alive; False at the deadline."""
    deadline = time.monotonic() + timeout
    print(f"ray_launch: waiting for the head's Ray node to register at {address}", file=sys.stderr, flush=True)
    watcher = GcsWatcher(address)
    delay = 0.05
    while time.monotonic() < deadline:
        if watcher.connect(timeout=max(0.5, deadline - time.monotonic())) and \
                watcher.nodes(timeout=1.0, is_head_node=True):
            return True
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(0.1, delay * 2)
    print(f"ray_launch: the head's Ray node did not register at {address} within {timeout:.0f}s",
          file=sys.stderr, flush=True)
    return False


def report_joined(report: Reporter, address: str, node_ip: str, port: int | None) -> None:
    """Say "joined" once this node's raylet is alive in the GCS (runs beside ``ray start``)."""
    watcher = GcsWatcher(address)
    while not any(port is None or n.port == int(port)
                  for n in watcher.nodes(timeout=1.0, node_ip_address=node_ip) or ()):
        time.sleep(0.2)
    report.say("joined")
    report.close()


def _address_arg(args: Sequence[str]) -> str:
    for a in args:
        if a.startswith("--address="):
            return a.split("=", 1)[1]
    raise SystemExit("ray_launch: a 'node' to report needs 'await_head' or --address=")


# ---------------------------------------------------------------- in the node program


class Launch:
    """A launcher process waiting for its order, and the pipe its events come back on."""

    def __init__(self, proc: OwnedProcess, env: Mapping[str, str], events_fd: int, report_fd: int) -> None:
        self.proc = proc
        self.env = dict(env)
        self._fd = events_fd
        self._report_fd = report_fd  # the number the launcher knows its end by
        self._buf = b""
        self.ordered = False

    @classmethod
    def spawn(cls, name: str, env: Mapping[str, str], stdout: IO[Any] | int | None) -> Launch:
        """Start a launcher with no arguments: it imports Ray's CLI and waits for ``order``."""
        r, w = os.pipe()
        try:
            proc = OwnedProcess(name, launcher_argv(), env, stdout=stdout, stdin=subprocess.PIPE, pass_fds=(w,))
        finally:
            os.close(w)
        return cls(proc, env, r, w)

    def order(self, args: Sequence[str], *, await_head: str | None = None, timeout: float = 300.0,
              node: tuple[str, int | None] | None = None) -> None:
        """Tell the launcher what to run (``ray ARGS``), after waiting for the head if asked."""
        stdin = self.proc.popen.stdin
        assert stdin is not None and not self.ordered
        self.ordered = True
        line = json.dumps({"args": list(args), "await_head": await_head, "timeout": max(1.0, timeout),
                           "report_fd": self._report_fd, "node": list(node) if node else None})
        try:
            stdin.write((line + "\n").encode())
            stdin.close()
        except OSError:
            pass  # it already exited: next_event reports the end of its pipe
        self.proc.argv = [*launcher_argv(), *args]

    def next_event(self, timeout: float) -> str | None:
        """The next event word; "" when the launcher has gone (end of its pipe); None: none yet."""
        while b"\n" not in self._buf:
            if self._fd < 0:
                return ""
            ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
            if not ready:
                return None
            chunk = os.read(self._fd, 256)
            if not chunk:
                self.close()
                if not self._buf:
                    return ""
                self._buf += b"\n"
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Stop listening; a launcher never ordered exits without starting anything."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self.ordered:
            stdin = self.proc.popen.stdin
            if stdin is not None and not stdin.closed:
                try:
                    stdin.close()
                except OSError:
                    pass


class Launches:
    """A node's launchers: one spawned ahead of need, a fresh one for every later attempt."""

    def __init__(self, spawn: Callable[[Mapping[str, str]], Launch], env: Mapping[str, str]) -> None:
        self.spawn = spawn
        self.all = [spawn(env)]

    def next(self, env: Mapping[str, str]) -> Launch:
        """The waiting launcher if it can still serve (same environment: Ray reads some of it
        at import), else a new one."""
        launch = self.all[-1]
        if launch.ordered or launch.env != dict(env) or not launch.proc.running:
            launch.close()
            launch = self.spawn(env)
            self.all.append(launch)
        return launch

    def close(self) -> None:
        for launch in self.all:
            launch.close()


if __name__ == "__main__":
    sys.exit(main())
