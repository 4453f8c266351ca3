"""Teardown of owned process groups with real processes (no Ray): nothing may survive."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from slurm_vllm.node import lifecycle
from slurm_vllm.node.lifecycle import OwnedProcess, Stopper, terminate

# A parent that starts a grandchild which ignores SIGTERM and a daemonised one that leaves the
# group (setsid) - the cases `kill <pid>` alone would miss.
SCRIPT = r"""
import os, signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print("ready", flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    st = lifecycle._stat(pid)
    return st is not None and st[0] != "Z"


def test_terminate_kills_group_descendants_and_stubborn_ones(tmp_path):
    out = tmp_path / "out"
    with open(out, "w") as f:
        p = OwnedProcess("tree", [sys.executable, "-c", SCRIPT], os.environ, stdout=f)
    deadline = time.time() + 30
    while "ready" not in out.read_text() and time.time() < deadline:
        time.sleep(0.05)
    members = p.members(lifecycle.descendants(os.getpid()))
    assert len(members) >= 3, members
    assert os.getpgid(p.pid) == p.pid != os.getpgid(0)
    t0 = time.monotonic()
    terminate([p], grace=1.0)
    assert time.monotonic() - t0 < 5
    time.sleep(0.2)
    assert not [m for m in members if _alive(m)]
    assert p.poll() is not None


def test_terminate_is_quick_for_well_behaved_children():
    p = OwnedProcess("sleep", ["sleep", "600"], os.environ)
    t0 = time.monotonic()
    terminate([p], grace=10.0)
    assert time.monotonic() - t0 < 2
    assert p.poll() == -signal.SIGTERM


def test_signal_reasons_and_stopper():
    s = Stopper()
    lifecycle.install_signal_handlers(s)
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert s.wait(2.0)
        assert s.reason == "time limit" and not s.failed
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not change the reason
        assert s.reason == "time limit"
    finally:
        for sig in lifecycle.SIGNAL_REASONS:
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    f = Stopper()
    f.fail("node x left")
    assert f.failed and f.reason == "node x left"


def test_a_child_dying_of_the_cancel_is_a_stop_not_a_failure():
    """scancel signals the whole step at once: a child (the Ray head) may die of it before this
    process runs its handler. The signal that arrives within the grace decides the reason."""
    s = Stopper()
    threading.Timer(0.1, s.stop, args=("cancelled",)).start()
    assert s.fail_unless_signalled("the Ray head process exited (code -15)", grace=5.0) is False
    assert s.reason == "cancelled" and not s.failed
    alone = Stopper()
    t0 = time.monotonic()
    assert alone.fail_unless_signalled("the Ray head process exited (code 1)", grace=0.2) is True
    assert alone.failed and alone.reason == "the Ray head process exited (code 1)"
    assert time.monotonic() - t0 >= 0.2


def test_slurm_kill_wait_is_read_from_scontrol_inside_a_job(monkeypatch):
    from slurm_vllm import slurm

    calls = []

    def answers(argv, timeout):
        calls.append(argv)
        return slurm.Completed(argv, 0, "JobCompType             = jobcomp/none\n"
                                        "KillWait                = 45 sec\n", "")

    def fails(argv, timeout):
        return slurm.Completed(argv, 1, "", "slurm_load_ctl_conf error")

    with slurm.use_runner(answers):
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        assert lifecycle.slurm_kill_wait() is None and not calls  # not in a job: nothing to ask
        monkeypatch.setenv("SLURM_JOB_ID", "42")
        assert lifecycle.slurm_kill_wait() == 45.0 and calls == [["scontrol", "show", "config"]]
    with slurm.use_runner(fails):
        assert lifecycle.slurm_kill_wait() is None


# A "node program" that starts an owned child, reports its pid and waits to be killed.
NODE = r"""
import os, sys, time
from slurm_vllm.node.lifecycle import OwnedProcess
child = OwnedProcess("sleep", ["sleep", "600"], os.environ)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_owned_children_die_with_a_node_program_killed_by_sigkill(tmp_path):
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(os.getcwd()), *sys.path]))
    node = subprocess.Popen([sys.executable, "-c", NODE], stdout=subprocess.PIPE, text=True, env=env)
    assert node.stdout is not None
    child = int(node.stdout.readline())
    assert _alive(child)
    node.kill()
    node.wait()
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the owned child outlived a SIGKILLed node program"


def test_a_reaped_leaders_group_id_is_never_signalled(monkeypatch):
    p = OwnedProcess("true", ["true"], os.environ)
    p.popen.wait()  # reaped: its id may now belong to anyone
    groups: list[int] = []
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: groups.append(pgid))
    lifecycle.stop(p, grace=0.5)
    terminate([p], grace=0.5)
    assert p.pid not in groups


def test_stop_ends_one_child_and_leaves_the_others():
    keep = OwnedProcess("keep", ["sleep", "600"], os.environ)
    gone = OwnedProcess("gone", ["sleep", "600"], os.environ)
    try:
        assert lifecycle.stop(gone, grace=2.0) == -signal.SIGTERM
        assert keep.running
    finally:
        terminate([keep], grace=1.0)


def test_owned_children_ignore_the_time_limit_warning():
    """Slurm may signal every process of the step; only the node program acts on SIGUSR2."""
    p = OwnedProcess("sleep", ["sleep", "600"], os.environ)
    try:
        time.sleep(0.2)
        os.kill(p.pid, signal.SIGUSR2)
        time.sleep(0.3)
        assert p.running, "SIGUSR2 killed an owned child"
    finally:
        terminate([p], grace=1.0)


def test_a_worker_notes_the_warning_and_keeps_running():
    s = Stopper(stop_on_warning=False)
    lifecycle.install_signal_handlers(s)
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.1)
        assert s.warned and not s.stopped
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.wait(2.0) and s.reason == "cancelled"
    finally:
        for sig in lifecycle.SIGNAL_REASONS:
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
