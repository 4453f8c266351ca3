"""Signals, the processes this node program owns, and a teardown that leaves nothing behind.

Ray must never be stopped with ``ray stop`` here: it kills Ray processes by name on the whole
node, other jobs' included. Instead every child is started in its own session (so its process
group is ours alone), the node program makes itself a child subreaper (so anything a child
daemonises is re-parented to us, not to init), and teardown signals exactly those process
groups and descendants: SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

#: The reason of the time-limit warning (SIGUSR2, ``#SBATCH --signal``).
TIME_LIMIT = "time limit"
#: Reasons written to state.json for each signal.
SIGNAL_REASONS = {
    signal.SIGTERM: "cancelled",
    signal.SIGUSR2: TIME_LIMIT,
    signal.SIGINT: "interrupted",
    signal.SIGHUP: "hangup",
}

PR_SET_CHILD_SUBREAPER = 36
#: SIGTERM-to-SIGKILL wait when the node program tears its Ray processes down: Ray keeps nothing
#: worth a longer wait, and Slurm's KillWait may be 3 s or less.
TEARDOWN_GRACE = 1.5
#: After a child dies, how long to wait for a stop signal that may be racing with its death:
#: scancel signals every process of the step at once, and a child may die of it a moment
#: before this process has run its own handler. Then it is a stop, not a failure.
SIGNAL_RACE_GRACE = 2.0


def log(msg: str, stream: IO[str] | None = None) -> None:
    """One timestamped line on the node log (srun's per-task output file)."""
    out = stream or sys.stdout
    out.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    out.flush()


@dataclass
class Stopper:
    """Set once, by a signal or a failure, with the reason the node stops."""

    event: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None
    signum: int | None = None
    failed: bool = False
    #: Whether the time-limit warning stops this node. A worker holds part of the model: it
    #: stays until the head has drained vLLM and ended the job (or Slurm's own end comes).
    stop_on_warning: bool = True
    warned: bool = False

    def stop(self, reason: str, signum: int | None = None) -> None:
        """Ask for an orderly end (a signal, or the work is done): the job ENDS."""
        if not self.event.is_set():
            self.reason = reason
            self.signum = signum
            self.event.set()

    def fail(self, reason: str) -> None:
        """Ask for an end because something broke: the job FAILS with ``reason``."""
        if not self.event.is_set():
            self.failed = True
            self.reason = reason
            self.event.set()

    def signalled_soon(self, grace: float | None = None) -> bool:
        """After a child died: whether a stop arrives within ``grace`` seconds
        (:data:`SIGNAL_RACE_GRACE`), so that the child died of the same signal."""
        return self.event.wait(SIGNAL_RACE_GRACE if grace is None else grace)

    def fail_unless_signalled(self, reason: str, grace: float | None = None) -> bool:
        """:meth:`fail` for a child that died, unless :meth:`signalled_soon`: then the signal's
        reason stands. True if it failed."""
        if self.signalled_soon(grace):
            return False
        self.fail(reason)
        return self.failed

    @property
    def stopped(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float) -> bool:
        return self.event.wait(timeout)


def slurm_kill_wait(timeout: float = 5.0) -> float | None:
    """Slurm's KillWait: seconds between a step's SIGTERM and its SIGKILL; None if unknown.

    Everything the node program does after scancel or the time limit must fit in it. Outside
    a Slurm job (no SLURM_JOB_ID) there is none. Asked through the one Slurm runner (slurm.py).
    """
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    from slurm_vllm import slurm  # noqa: PLC0415 - only inside a job; the launcher never needs it

    return slurm.kill_wait(timeout)


def install_signal_handlers(stopper: Stopper) -> None:
    """Turn SIGTERM/SIGUSR2/SIGINT/SIGHUP into a stop request; the main loop does the teardown."""

    def handler(signum: int, _frame: Any) -> None:
        if signum == signal.SIGUSR2:
            stopper.warned = True
            if not stopper.stop_on_warning:
                return
        stopper.stop(SIGNAL_REASONS.get(signal.Signals(signum), f"signal {signum}"), signum)

    for sig in SIGNAL_REASONS:
        signal.signal(sig, handler)


def become_subreaper(on: bool = True) -> bool:
    """Make orphaned descendants re-parent to this process (Linux); False where unsupported."""
    libc = _libc()
    if not libc:
        return False
    return int(libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)) == 0


# ---------------------------------------------------------------- /proc helpers


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[2])


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def descendants(root: int) -> set[int]:
    """Every live descendant of ``root`` (by parent links in /proc)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[1], []).append(pid)
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def group_members(pgid: int) -> set[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = set()
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None and st[2] == pgid and st[0] != "Z":
            out.add(pid)
    return out


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def reap_orphans(keep: Iterable[int] = ()) -> None:
    """Collect exit statuses of zombie children we did not start ourselves (re-parented orphans).

    ``keep`` are children a Popen object waits for; their status must stay for Popen.
    """
    me, skip = os.getpid(), set(keep)
    for pid in _all_pids():
        if pid in skip:
            continue
        st = _stat(pid)
        if st is not None and st[0] == "Z" and st[1] == me:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


# ---------------------------------------------------------------- owned processes

PR_SET_PDEATHSIG = 1
SIG_IGN = 1  # the C constant
_LIBC: Any = None


def _libc() -> Any:
    """libc, loaded once in the parent: a child between fork and exec must not load libraries."""
    global _LIBC
    if _LIBC is None and sys.platform.startswith("linux"):
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
            _LIBC.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
            _LIBC.signal.restype = ctypes.c_void_p
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def _child_setup(die_with_parent: bool = True) -> Any:
    """A ``preexec_fn`` that makes the child get SIGKILL when the node program dies, and
    ignore the time-limit warning (the node program decides what it means).

    On a site without cgroup process tracking nothing else would stop a child after a
    ``kill -9`` of the node program. Linux ties this to the *thread* that starts the child, so
    children are started from the node program's main thread. Elsewhere: None (no such thing).
    """
    libc, parent = _libc(), os.getpid()
    if not libc:
        return None

    def preexec() -> None:
        if die_with_parent:
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        # Slurm may send the time-limit warning to every process of the step; only the node
        # program acts on it (an ignored signal stays ignored across exec).
        libc.signal(int(signal.SIGUSR2), SIG_IGN)
        if die_with_parent and os.getppid() != parent:  # the parent died before prctl: follow it
            os._exit(1)

    return preexec


class OwnedProcess:
    """A child started in its own session (its process group is this job's alone) that dies
    with the node program, unless ``outlive_parent`` (the ``leader`` drop-in's Ray head, which
    must outlast the leader command by design)."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], *,
                 stdout: IO[Any] | int | None = None, cwd: str | None = None,
                 stdin: int = subprocess.DEVNULL, pass_fds: Sequence[int] = (),
                 outlive_parent: bool = False) -> None:
        self.name = name
        self.argv = list(argv)
        self.popen = subprocess.Popen(self.argv, env=dict(env), stdout=stdout, stderr=subprocess.STDOUT,
                                      stdin=stdin, start_new_session=True, cwd=cwd, pass_fds=tuple(pass_fds),
                                      # only prctl/signal through a preloaded libc: see _child_setup
                                      preexec_fn=_child_setup(die_with_parent=not outlive_parent))  # noqa: PLW1509
        self.pid = self.popen.pid
        self.started = time.monotonic()

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def members(self, mine: set[int]) -> set[int]:
        """Everything this child started that is certainly this job's.

        While the leader is unreaped its pid, and so its group id, cannot be reused: its group
        and descendants are ours. Once it is reaped, either could belong to anyone; then only
        what is among ``mine`` (the node program's descendants: as a subreaper, it keeps its
        orphans) counts.
        """
        found = descendants(self.pid) | group_members(self.pid)
        if self.running:
            return found | {self.pid}
        return found & mine

    def __repr__(self) -> str:
        return f"OwnedProcess({self.name!r}, pid={self.pid})"


def _signal(procs: Sequence[OwnedProcess], pids: Iterable[int], sig: int) -> None:
    """Signal each process group whose leader is unreaped (its id is certainly ours), then ``pids``."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _left(procs: Sequence[OwnedProcess], targets: set[int], sweep: bool) -> set[int]:
    mine = descendants(os.getpid())
    left = {pid for pid in targets if _alive(pid)}
    for p in procs:
        left |= {pid for pid in p.members(mine) if _alive(pid)}
    if sweep:
        left |= {pid for pid in mine if _alive(pid)}
    return left


def _stop(procs: Sequence[OwnedProcess], grace: float, sweep: bool, log_fn: Any = None) -> None:
    """SIGTERM ``procs`` and all they started, wait up to ``grace`` s, then SIGKILL what is left.

    ``sweep`` also takes every other descendant of the node program (the final teardown).
    A process is signalled only while it is certainly this job's (see ``OwnedProcess.members``).
    """
    procs = [p for p in procs if p is not None]
    targets = _left(procs, set(), sweep)
    _signal(procs, targets, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for p in procs:
            p.poll()
        if not _left(procs, targets, sweep):
            break
        if sweep:  # only the final teardown may reap: other children's status belongs to their Popen
            reap_orphans(keep=[p.pid for p in procs])
        time.sleep(0.05)
    else:
        if log_fn:
            log_fn(f"processes still alive after {grace:.0f}s: SIGKILL")
    # SIGKILL whatever is left, including anything started while we waited.
    for _ in range(3):
        left = _left(procs, targets, sweep)
        if not left:
            break
        _signal(procs, left, signal.SIGKILL)
        time.sleep(0.1)
    for p in procs:
        try:
            p.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    if sweep:
        reap_orphans(keep=[])


def stop(proc: OwnedProcess, grace: float, log_fn: Any = None) -> int | None:
    """Stop one child and everything it started (vLLM before Ray); returns its exit code."""
    _stop([proc], grace, sweep=False, log_fn=log_fn)
    return proc.popen.returncode


def terminate(procs: Sequence[OwnedProcess], grace: float = 10.0, log_fn: Any = None) -> None:
    """The node's teardown: stop these children, all they started and every orphan re-parented
    to the node program (subreaper), so nothing outlives it."""
    _stop(procs, grace, sweep=True, log_fn=log_fn)
