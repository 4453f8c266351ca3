"""The pre-flight all-reduce: one tensor of ones summed across the nodes of one replica, through
``torch.distributed`` over the same interface vLLM will use (Gloo; NCCL where GPUs are usable).

It proves, before vLLM loads anything, that every node reaches the head's rendezvous and every
other node's collective sockets: the failure vLLM would otherwise report minutes later, deep in
a traceback. It runs in its own process (``python -m slurm_vllm.node.allreduce``) so the node
program never imports torch (seconds, and memory the node program keeps), and so a hung
collective can be killed with its whole process group. The child is started early and imports
torch while the nodes exchange their records; it learns the head's address on its stdin
(``ADDR PORT``, or an empty line to exit), runs once, and prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from slurm_vllm.node import lifecycle
from slurm_vllm.node.lifecycle import OwnedProcess

#: Seconds the nodes have to meet at the rendezvous and sum, once every child has torch imported.
TIMEOUT = 60.0
#: Seconds a child may take to import torch (a cold venv on a network filesystem is slow).
IMPORT_TIMEOUT = 120.0


def torch_importable() -> bool:
    """Whether this Python has torch, found without importing it (a file lookup)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Outcome:
    """What the child reported: ``ok`` with the sum, or why not; times in seconds."""

    ok: bool
    detail: str
    backend: str = ""
    seconds: float = 0.0  # from the address given to the child's answer
    import_seconds: float | None = None
    aborted: bool = False  # stopped because the caller no longer needed it


class AllReduce:
    """The parent's handle on one child: :meth:`spawn`, then :meth:`go`, :meth:`wait`, :meth:`close`."""

    def __init__(self, proc: OwnedProcess, out: IO[bytes], world: int,
                 owned: list[OwnedProcess] | None = None) -> None:
        self.proc, self._out, self.world, self._owned = proc, out, world, owned
        self.spawned = time.monotonic()
        self.went: float | None = None

    @classmethod
    def spawn(cls, *, rank: int, world: int, gpus: int, env: Mapping[str, str], timeout: float = TIMEOUT,
              python: str = sys.executable, owned: list[OwnedProcess] | None = None) -> AllReduce:
        """Start the child (it imports torch, then waits for :meth:`go`). ``owned`` is the node
        program's list of processes it stops on a signal; the child is in it while it runs."""
        out = tempfile.TemporaryFile()  # noqa: SIM115 - the handle keeps it until close()
        argv = [python, "-m", "slurm_vllm.node.allreduce", "--rank", str(rank), "--world", str(world),
                "--gpus", str(gpus), "--timeout", str(timeout)]
        proc = OwnedProcess("preflight-allreduce", argv, env, stdout=out, stdin=subprocess.PIPE)
        if owned is not None:
            owned.append(proc)
        return cls(proc, out, world, owned)

    def go(self, addr: str, port: int) -> None:
        """Give the child the head's rendezvous; it runs the all-reduce at once."""
        self.went = time.monotonic()
        self._send(f"{addr} {port}\n")

    def _send(self, line: str) -> None:
        stdin = self.proc.popen.stdin
        if stdin is None:
            return
        try:
            stdin.write(line.encode())
            stdin.close()
        except (OSError, ValueError):
            pass  # the child is gone: wait() reports why

    def wait(self, timeout: float = TIMEOUT, abort: Callable[[], bool] | None = None,
             poll: float = 0.1) -> Outcome:
        """The child's answer; it is killed past its deadline (the import's, then ``timeout``
        after :meth:`go`, with a margin) or when ``abort()`` says the job no longer needs it."""
        went = self.went if self.went is not None else time.monotonic()
        deadline = max(self.spawned + IMPORT_TIMEOUT, went) + timeout + 10.0
        while self.proc.poll() is None:
            if time.monotonic() >= deadline:
                self._stop()
                return self._outcome(f"no answer within {time.monotonic() - went:.0f} s (killed)")
            if abort is not None and abort():
                self._stop()
                return Outcome(False, "stopped: the job no longer needs it", aborted=True)
            time.sleep(poll)
        return self._outcome(f"exited with code {self.proc.poll()}")

    def _outcome(self, otherwise: str) -> Outcome:
        went = self.went if self.went is not None else self.spawned
        seconds = round(time.monotonic() - went, 2)
        text = self._output()
        for line in reversed(text.splitlines()):
            if line.startswith("{"):
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                return Outcome(bool(d.get("ok")), str(d.get("detail", "")), str(d.get("backend", "")), seconds,
                               d.get("import_seconds"))
        last = text.strip().splitlines()[-1:] or [""]
        return Outcome(False, otherwise + (f": {last[0][:200]}" if last[0] else ""), seconds=seconds)

    def _output(self) -> str:
        try:
            self._out.seek(0)
            return self._out.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self._send("\n")
            lifecycle.stop(self.proc, grace=1.0)

    def close(self) -> None:
        """Stop the child and its group if still running; nothing of it is left afterwards."""
        self._stop()
        if self._owned is not None and self.proc in self._owned:
            self._owned.remove(self.proc)
        self._out.close()


# ---------------------------------------------------------------- the child


def _answer(ok: bool, detail: str, **more: object) -> int:
    print(json.dumps({"ok": ok, "detail": detail, **more}), flush=True)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """The child: import torch, wait for ``ADDR PORT`` on stdin, all-reduce ones, print the result."""
    ap = argparse.ArgumentParser(prog="python -m slurm_vllm.node.allreduce")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=TIMEOUT)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    from datetime import timedelta  # noqa: PLC0415

    import torch  # noqa: PLC0415 - the point of this process
    import torch.distributed as dist  # noqa: PLC0415

    imported = round(time.monotonic() - t0, 2)
    line = sys.stdin.readline().split()
    if len(line) != 2:
        return 0  # the parent no longer needs it
    addr, port = line[0], int(line[1])
    nccl = args.gpus > 0 and torch.cuda.is_available()
    backend = "nccl" if nccl else "gloo"
    facts: dict[str, object] = {"backend": backend, "import_seconds": imported}
    t1 = time.monotonic()
    try:
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=args.rank,
                                world_size=args.world, timeout=timedelta(seconds=args.timeout))
    except Exception as e:  # noqa: BLE001 - the reason is the answer
        return _answer(False, f"{backend} rendezvous at {addr}:{port} failed after "
                              f"{time.monotonic() - t1:.1f} s: {_first_line(e)}", **facts)
    try:
        if nccl:
            torch.cuda.set_device(0)
        x = torch.ones(4, device="cuda" if nccl else "cpu")
        t2 = time.monotonic()
        dist.all_reduce(x)
        total = float(x.sum().item()) / 4
        took = time.monotonic() - t2
    except Exception as e:  # noqa: BLE001
        return _answer(False, f"{backend} all-reduce over {args.world} nodes failed: {_first_line(e)}", **facts)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001, S110 - the process ends next
            pass
    if total != args.world:
        return _answer(False, f"{backend} all-reduce over {args.world} nodes summed {total:g}, "
                              f"expected {args.world}", **facts)
    return _answer(True, f"{backend} all-reduce over {args.world} nodes: sum {total:g} (rendezvous "
                         f"{t2 - t1:.2f} s, all-reduce {took * 1000:.0f} ms, torch import {imported:.1f} s)",
                   **facts)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # Skip the interpreter's teardown: with torch loaded it takes a second or two, and the
    # answer is already out.
    os._exit(code)
