"""How the node program runs ``ray``: Ray's own CLI, in a launcher that starts it sooner.

``ray start`` spends most of its first seconds importing its CLI, and most of that is the Ray
Serve and Ray Jobs subcommands, which ``ray start`` never uses. The launcher runs the click group
behind the ``ray`` executable (Ray's own code, in this process) with those two imports left out (Ray's
CLI already treats them as optional): about 1 s less CPU per start on every node.

A worker goes further. Its ``ray start --address`` can do nothing useful until the head's raylet
has registered (it reads the head's node record first, and re-reads it only every 2 s), so it
launches the launcher with no arguments while the head is still coming up: it imports the CLI
and waits on stdin. When the head is registered the node program writes the ``ray`` arguments
as one JSON line, and the process becomes exactly that ``ray start``, its import already paid.

``python -m slurm_vllm.node.ray_launch ARGS...`` runs ``ray ARGS...`` at once; with no
arguments it reads them from stdin first (end of input: exit 0 having started nothing).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

from slurm_vllm.errors import NodeError
from slurm_vllm.node.lifecycle import OwnedProcess

#: Subcommands Ray's CLI adds only if they import; ``ray start`` needs neither.
UNUSED_CLI_MODULES = ("ray.serve.scripts", "ray.dashboard.modules.job.cli")


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
        args = json.loads(line)
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            print(f"ray_launch: expected a JSON list of strings, got {line.strip()[:200]!r}", file=sys.stderr)
            return 2
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # Ray's processes must not inherit the pipe
        os.close(devnull)
    sys.argv = ["ray", *args]
    return int(cli.main(args=args, prog_name="ray") or 0)


def launcher_argv(python: str = sys.executable) -> list[str]:
    """The command that runs the launcher in this interpreter."""
    return [python, "-m", "slurm_vllm.node.ray_launch"]


def ray_command() -> list[str]:
    """How to run ``ray``: the launcher when this interpreter has Ray, else the ``ray`` on PATH."""
    if importlib.util.find_spec("ray") is not None:
        return launcher_argv()
    found = shutil.which("ray")
    if not found:
        raise NodeError(f"node {socket.gethostname()}: Ray is not installed for {sys.executable} "
                        f"and there is no `ray` command on PATH (pip install 'ray[default]')")
    return [found]


class WarmRayStart:
    """A launcher started with no arguments (stdin=PIPE), waiting to be told what to run."""

    def __init__(self, proc: OwnedProcess | None, env: Mapping[str, str]) -> None:
        self.proc = proc
        self.env = dict(env)

    def hand_over(self, argv: Sequence[str], env: Mapping[str, str]) -> OwnedProcess | None:
        """Make the waiting launcher run ``argv``; None when it cannot, and the caller starts it.

        Only once, only for a launcher command line, and only when the launcher is still alive
        and was started with exactly ``env`` (Ray reads some settings at import).
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        prefix = launcher_argv()
        stdin = proc.popen.stdin
        if (list(argv[: len(prefix)]) == prefix and proc.running and dict(env) == self.env
                and stdin is not None):
            try:
                stdin.write((json.dumps(list(argv[len(prefix):])) + "\n").encode())
                stdin.close()
                proc.argv = list(argv)
                return proc
            except OSError:
                pass  # it died between the check and the write
        _close(stdin)
        return None

    def close(self) -> None:
        """Let a still-waiting launcher exit without starting anything (end of its input)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _close(proc.popen.stdin)


def _close(stream: IO[Any] | None) -> None:
    if stream is not None and not stream.closed:
        try:
            stream.close()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
