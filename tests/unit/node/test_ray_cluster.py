"""Backoff schedule, the head's wait for N nodes and a worker's join loop, on a fake clock."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from slurm_vllm.node import ray_cluster
from slurm_vllm.node.lifecycle import Stopper
from slurm_vllm.node.ray_cluster import Backoff, ClusterTimeout, HeadUnreachable, RayNode


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, d: float) -> None:
        self.t += d


class ClockStopper(Stopper):
    """A Stopper whose wait() advances the fake clock instead of blocking."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float) -> bool:
        self.clock.t += timeout
        return self.stopped


def test_backoff_grows_to_cap_with_jitter():
    b = Backoff(initial=0.2, factor=2.0, cap=2.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    nominal = [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 2.0]
    for d, n in zip(delays, nominal, strict=True):
        assert n / 2 <= d <= n
    assert delays[3] > delays[0]
    assert len(set(delays)) == len(delays)  # jitter: no two equal


def test_two_workers_do_not_retry_in_lockstep():
    a = Backoff(rng=random.Random(1))
    b = Backoff(rng=random.Random(2))
    assert [round(a.next_delay(), 3) for _ in range(5)] != [round(b.next_delay(), 3) for _ in range(5)]


def test_sleep_never_passes_the_deadline():
    clock = FakeClock()
    b = Backoff(initial=10, cap=10)
    assert ray_cluster.sleep_until_next(b, 3.0, None, clock, clock.sleep)
    assert clock.t <= 3.0
    assert not ray_cluster.sleep_until_next(b, 3.0, None, clock, clock.sleep)


def node(name: str, alive: bool = True, ip: str = "10.0.0.1", port: int = 1) -> RayNode:
    return RayNode(node_id=name, name=name, hostname=name, ip=ip, port=port, alive=alive, is_head=False)



class FakeWatcher:
    def __init__(self, script: list[list[RayNode] | None]) -> None:
        self.script = script
        self.calls = 0
        self.last_error: str | None = None

    def nodes(self, timeout: float = 2.0) -> list[RayNode] | None:
        self.calls += 1
        return self.script[min(self.calls - 1, len(self.script) - 1)]

    def connect(self, timeout: float = 1.0) -> bool:
        return True


def test_wait_for_nodes_reports_progress_and_returns_when_all_alive():
    clock = FakeClock()
    w = FakeWatcher([[], [node("a")], [node("a")], [node("a"), node("b", alive=False)],
                     [node("a"), node("b"), node("c")]])
    seen = []
    alive = ray_cluster.wait_for_nodes(w, expected=3, hosts=["a", "b", "c"], timeout=60,
                                       stopper=ClockStopper(clock), clock=clock,
                                       on_progress=lambda k, m: seen.append((k, m)))
    assert [n.name for n in alive] == ["a", "b", "c"]
    assert seen == [(0, ["a", "b", "c"]), (1, ["b", "c"]), (3, [])]  # only on change
    assert clock.t < 2  # polled often, not every 5 s


def test_wait_for_nodes_names_missing_hosts_at_deadline():
    clock = FakeClock()
    w = FakeWatcher([[node("a"), node("c")]])
    with pytest.raises(ClusterTimeout) as e:
        ray_cluster.wait_for_nodes(w, expected=3, hosts=["a", "b", "c"], timeout=30,
                                   stopper=ClockStopper(clock), clock=clock)
    assert e.value.missing == ["b"] and "2/3" in str(e.value) and "missing: b" in str(e.value)
    assert 30 <= clock.t < 31


def test_wait_for_nodes_stops_on_signal():
    clock = FakeClock()
    s = ClockStopper(clock)
    s.stop("cancelled")
    assert ray_cluster.wait_for_nodes(FakeWatcher([[]]), expected=2, hosts=["a", "b"], timeout=30,
                                      stopper=s, clock=clock) is None


class FakeProc:
    def __init__(self, code: int | None = None) -> None:
        self.code = code

    @property
    def running(self) -> bool:
        return self.code is None

    def poll(self) -> int | None:
        return self.code


class FakeLaunch:
    """A launcher that says its events at given (fake-clock) times, then exits with ``code``."""

    def __init__(self, clock: FakeClock, events: list[tuple[float, str]], code: int | None = None) -> None:
        self.clock = clock
        self.events = [(clock.t + at, word) for at, word in events]
        self.proc = FakeProc()
        self.code = code
        self.closed = False

    def next_event(self, timeout: float) -> str | None:
        if self.events:
            at, word = self.events[0]
            if at <= self.clock.t + timeout:
                self.clock.t = max(self.clock.t, at)
                self.events.pop(0)
                if word == "":
                    self.proc.code = self.code
                return word
        self.clock.t += timeout
        return None

    def wait_exit(self, timeout: float) -> int | None:
        return self.proc.code

    def close(self) -> None:
        self.closed = True


def join(clock: FakeClock, start, timeout: float = 100, **kw):
    kw.setdefault("backoff", Backoff(rng=random.Random(0)))
    return ray_cluster.join_cluster(start=start, head_host="gpu01", head_ip="10.0.0.1", gcs_port=4321,
                                    timeout=timeout, stopper=ClockStopper(clock), log=kw.pop("log", lambda m: None),
                                    terminate=lambda p: None, clock=clock, **kw)


@pytest.fixture
def fake_sleep(monkeypatch):
    def install(clock: FakeClock) -> None:
        monkeypatch.setattr(ray_cluster, "sleep_until_next",
                            lambda b, d, s, c=None, sl=None: (clock.sleep(max(0, min(b.next_delay(), d - clock.t))), True)[1])
    return install


def test_join_probes_the_gcs_port_with_growing_backoff_then_hands_over_once(monkeypatch, fake_sleep):
    clock = FakeClock()
    fake_sleep(clock)
    opened_at = 20.0
    probes: list[float] = []

    def tcp_open(ip: str, port: int, timeout: float = 0.5) -> bool:
        probes.append(clock.t)
        return clock.t >= opened_at

    monkeypatch.setattr(ray_cluster, "tcp_open", tcp_open)
    starts: list[tuple[float, float]] = []

    def start(seconds_left: float) -> FakeLaunch:
        starts.append((clock.t, seconds_left))
        return FakeLaunch(clock, [(3.0, "started"), (5.0, "joined")])

    res = join(clock, start)
    assert res is not None and res.attempts == 1 and len(starts) == 1
    at, left = starts[0]
    assert opened_at <= at <= opened_at + 0.5  # within one capped probe step of the head opening
    assert left == pytest.approx(100 - at)  # the launcher waits for the head within our deadline
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps[0] < gaps[3] <= 0.5


def test_join_retries_launchers_that_exit_then_gives_up_naming_the_head(monkeypatch, fake_sleep):
    clock = FakeClock()
    fake_sleep(clock)
    monkeypatch.setattr(ray_cluster, "tcp_open", lambda *a, **k: True)
    starts: list[float] = []

    def start(seconds_left: float) -> FakeLaunch:
        starts.append(clock.t)
        return FakeLaunch(clock, [(0.5, "started"), (1.0, "")], code=1)  # ray start exits (e.g. rejected)

    with pytest.raises(HeadUnreachable, match=r"could not join head gpu01 at 10.0.0.1:4321 within 30s .*exited with code 1"):
        join(clock, start, timeout=30, backoff=Backoff(rng=random.Random(0), cap=5.0))
    assert len(starts) >= 4
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[-1] > gaps[0]
    assert 30 <= clock.t <= 36


def test_join_retries_an_attempt_that_started_but_never_registered(monkeypatch, fake_sleep):
    clock = FakeClock()
    fake_sleep(clock)
    monkeypatch.setattr(ray_cluster, "tcp_open", lambda *a, **k: True)
    launches: list[FakeLaunch] = []

    def start(seconds_left: float) -> FakeLaunch:
        launches.append(FakeLaunch(clock, [(1.0, "started")] if not launches else [(1.0, "started"), (2.0, "joined")]))
        return launches[-1]

    res = join(clock, start, attempt_timeout=10)
    assert res is not None and res.attempts == 2 and launches[0].closed
    assert 11 <= clock.t < 20  # gave the first attempt 10 s after it started


def test_join_names_a_head_that_never_answered(monkeypatch, fake_sleep):
    clock = FakeClock()
    fake_sleep(clock)
    monkeypatch.setattr(ray_cluster, "tcp_open", lambda *a, **k: False)
    with pytest.raises(HeadUnreachable, match=r"^head gpu01 never answered at 10.0.0.1:4321 within 12s$"):
        join(clock, lambda left: pytest.fail("must not start ray"), timeout=12)


def test_join_names_a_head_whose_raylet_never_registered(monkeypatch, fake_sleep):
    clock = FakeClock()
    fake_sleep(clock)
    monkeypatch.setattr(ray_cluster, "tcp_open", lambda *a, **k: True)
    with pytest.raises(HeadUnreachable, match=r"head gpu01's GCS answered at 10.0.0.1:4321 but its own Ray node "
                                              r"never registered within 12s"):
        join(clock, lambda left: FakeLaunch(clock, [(left, "")], code=ray_cluster.HEAD_NEVER_REGISTERED), timeout=12)


def test_join_logs_when_the_head_is_ready_and_ray_start_runs(monkeypatch, fake_sleep):
    clock = FakeClock()
    fake_sleep(clock)
    monkeypatch.setattr(ray_cluster, "tcp_open", lambda *a, **k: True)
    logs: list[str] = []
    join(clock, lambda left: FakeLaunch(clock, [(4.0, "started"), (6.0, "joined")]), log=logs.append)
    assert any("once the head's raylet is registered" in m for m in logs)
    assert any("ray start is running" in m for m in logs)


def test_ray_env_retries_local_connections_in_short_steps_with_the_same_budget():
    env = ray_cluster.ray_env({"RAY_ADDRESS": "x:1"}, node_ip="10.0.0.9", interface="ib0", token_path=None)
    step = int(env["RAY_raylet_client_connect_timeout_milliseconds"])
    tries = int(env["RAY_raylet_client_num_connect_attempts"])
    assert step <= 100 and step * tries == 1000 * 10  # Ray's default budget: 10 tries, 1 s apart
    assert "RAY_ADDRESS" not in env and env["VLLM_HOST_IP"] == "10.0.0.9" and env["GLOO_SOCKET_IFNAME"] == "ib0"
    site = ray_cluster.ray_env({"RAY_raylet_client_num_connect_attempts": "40"}, node_ip="10.0.0.9",
                               interface=None, token_path=None)
    assert site["RAY_raylet_client_num_connect_attempts"] == "40"
    assert "RAY_raylet_client_connect_timeout_milliseconds" not in site  # a site's own setting wins whole


# --- the Ray temp dir: private, fresh, short; stale ones swept


def test_sweep_removes_only_old_dirs_of_jobs_no_longer_running(tmp_path):
    import time as _t

    from slurm_vllm.node.ray_cluster import sweep_stale_temp_dirs

    old, running, young, other = (tmp_path / n for n in ("svl-11-0", "svl-12-1", "svl-13-0", "svl-x-y"))
    for d in (old, running, young, other):
        d.mkdir()
        (d / "f").write_text("x")
    past = _t.time() - 3600
    for d in (old, running, other):
        os.utime(d, (past, past))
    removed = sweep_stale_temp_dirs({"12"}, root=str(tmp_path))
    assert removed == [str(old)]
    assert not old.exists() and running.exists() and young.exists() and other.exists()


@pytest.fixture
def short_root():
    """A short directory under /tmp (pytest's tmp_path is too long for a socket-path budget)."""
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="t", dir="/tmp")
    yield Path(root)
    shutil.rmtree(root, ignore_errors=True)


def test_the_ray_temp_dir_is_fresh_private_and_short(short_root):
    from slurm_vllm.node.ray_cluster import TEMP_DIR_MAX, make_temp_dir

    root = short_root
    path = make_temp_dir("123", 1, root=str(root))
    assert path == f"{root}/svl-u{os.getuid()}/svl-123-1" and len(path) <= TEMP_DIR_MAX
    parent = os.path.dirname(path)
    assert os.stat(parent).st_mode & 0o777 == 0o700 and os.stat(path).st_mode & 0o777 == 0o700
    (Path(path) / "left-by-an-earlier-run").write_text("x")
    assert make_temp_dir("123", 1, root=str(root)) == path and os.listdir(path) == []


def test_a_temp_dir_parent_someone_else_made_first_is_refused_and_avoided(short_root, tmp_path):
    from slurm_vllm.errors import NodeError
    from slurm_vllm.node.ray_cluster import make_temp_dir, private_dir, remove_temp_dir

    root = short_root
    squatted = root / f"svl-u{os.getuid()}"
    squatted.mkdir(mode=0o777)
    if os.getuid() != 0:
        pytest.skip("needs root to make a directory another user owns")
    os.chown(squatted, 4242, 4242)
    with pytest.raises(NodeError, match="belongs to uid 4242"):
        private_dir(str(squatted))
    # The job still gets a private temp dir: under a fresh parent with an unpredictable name.
    path = Path(make_temp_dir("9", 0, root=str(root)))
    assert path.parent != squatted and path.parent.name.startswith(f"svl-u{os.getuid()}-")
    assert path.parent.stat().st_uid == os.getuid() and path.parent.stat().st_mode & 0o777 == 0o700
    squatted.rmdir()
    os.symlink(tmp_path, squatted)
    with pytest.raises(NodeError, match="not a directory"):
        private_dir(str(squatted))
    fallback = Path(make_temp_dir("9", 0, root=str(root)))
    assert fallback.parent != squatted
    remove_temp_dir(str(fallback))  # the one-off parent goes with it
    assert not fallback.parent.exists() and squatted.is_symlink()


def test_a_temp_dir_parent_of_ours_that_others_can_write_is_tightened(short_root):
    from slurm_vllm.node.ray_cluster import make_temp_dir

    (short_root / f"svl-u{os.getuid()}").mkdir(mode=0o777)
    os.chmod(short_root / f"svl-u{os.getuid()}", 0o777)
    make_temp_dir("9", 0, root=str(short_root))
    assert os.stat(short_root / f"svl-u{os.getuid()}").st_mode & 0o777 == 0o700


def test_too_long_a_temp_dir_is_refused(tmp_path):
    from slurm_vllm.errors import NodeError
    from slurm_vllm.node.ray_cluster import make_temp_dir

    with pytest.raises(NodeError, match="too long for socket paths"):
        make_temp_dir("1", 0, root=str(tmp_path / ("x" * 40)))
