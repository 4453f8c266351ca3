"""Backoff schedule, the head's wait for N nodes and a worker's join loop, on a fake clock."""

from __future__ import annotations

import random

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
    for d, n in zip(delays, nominal):
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


def node(name: str, alive: bool = True, ip: str = "10.0.0.1", port: int = 1, head: bool = False) -> RayNode:
    return RayNode(node_id=name, name=name, hostname=name, ip=ip, port=port, alive=alive, is_head=head)


HEAD = node("h", head=True)


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
    def __init__(self, lives: bool) -> None:
        self.lives = lives

    @property
    def running(self) -> bool:
        return self.lives

    def poll(self) -> int | None:
        return None if self.lives else 1


def test_join_waits_for_head_with_growing_backoff(monkeypatch):
    clock = FakeClock()
    opened_at = 20.0
    probes: list[float] = []

    def tcp_open(ip: str, port: int, timeout: float = 0.5) -> bool:
        probes.append(clock.t)
        return clock.t >= opened_at

    monkeypatch.setattr(ray_cluster, "tcp_open", tcp_open)
    monkeypatch.setattr(ray_cluster, "GcsWatcher", lambda addr: FakeWatcher([[HEAD, node("me", ip="10.0.0.9", port=5)]]))
    monkeypatch.setattr(ray_cluster, "sleep_until_next",
                        lambda b, d, s, c=None, sl=None: (clock.sleep(min(b.next_delay(), d - clock.t)), True)[1])
    starts = []
    res = ray_cluster.join_cluster(
        start=lambda: starts.append(clock.t) or FakeProc(True), head_host="h", head_ip="10.0.0.1", gcs_port=1,
        node_ip="10.0.0.9", node_manager_port=5, timeout=100, stopper=ClockStopper(clock), log=lambda m: None,
        terminate=lambda p: None, backoff=Backoff(rng=random.Random(0)), clock=clock)
    assert res is not None and res.attempts == 1
    assert starts and starts[0] >= opened_at
    assert starts[0] - opened_at <= 0.5  # joins within one capped probe step of the head opening
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps[0] < gaps[3] <= 0.5


def test_join_retries_failed_attempts_then_gives_up_naming_the_head(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(ray_cluster, "tcp_open", lambda *a, **k: True)
    monkeypatch.setattr(ray_cluster, "GcsWatcher", lambda addr: FakeWatcher([[HEAD]]))
    monkeypatch.setattr(ray_cluster, "sleep_until_next",
                        lambda b, d, s, c=None, sl=None: (clock.sleep(max(0, min(b.next_delay(), d - clock.t))), True)[1])
    starts = []

    def start():
        starts.append(clock.t)
        clock.t += 1.0
        return FakeProc(False)  # ray start exits at once (e.g. rejected)

    with pytest.raises(HeadUnreachable, match=r"could not join head gpu01 at 10.0.0.1:4321 within 30s .*exited with code 1"):
        ray_cluster.join_cluster(start=start, head_host="gpu01", head_ip="10.0.0.1", gcs_port=4321,
                                 node_ip="10.0.0.9", node_manager_port=5, timeout=30,
                                 stopper=ClockStopper(clock), log=lambda m: None, terminate=lambda p: None,
                                 backoff=Backoff(rng=random.Random(0), cap=5.0), clock=clock)
    assert len(starts) >= 4
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[-1] > gaps[0]
    assert 30 <= clock.t <= 36


def test_join_names_a_head_that_never_answered(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(ray_cluster, "tcp_open", lambda *a, **k: False)
    monkeypatch.setattr(ray_cluster, "sleep_until_next",
                        lambda b, d, s, c=None, sl=None: (clock.sleep(max(0, min(b.next_delay(), d - clock.t))), True)[1])
    with pytest.raises(HeadUnreachable, match=r"^head gpu01 never answered at 10.0.0.1:4321 within 12s$"):
        ray_cluster.join_cluster(start=lambda: pytest.fail("must not start ray"), head_host="gpu01",
                                 head_ip="10.0.0.1", gcs_port=4321, node_ip="10.0.0.9", node_manager_port=5,
                                 timeout=12, stopper=ClockStopper(clock), log=lambda m: None,
                                 terminate=lambda p: None, clock=clock)


def test_join_starts_ray_only_once_the_heads_own_node_is_registered(monkeypatch):
    """`ray start --address` re-reads the head's node record only every 2 s: start after it exists."""
    clock = FakeClock()
    registered_at = 7.0
    watcher = FakeWatcher([])
    watcher.nodes = lambda timeout=2.0: [HEAD] if clock.t >= registered_at else []  # type: ignore[method-assign]
    monkeypatch.setattr(ray_cluster, "tcp_open", lambda *a, **k: True)
    monkeypatch.setattr(ray_cluster, "GcsWatcher", lambda addr: watcher)
    monkeypatch.setattr(ray_cluster, "sleep_until_next",
                        lambda b, d, s, c=None, sl=None: (clock.sleep(min(b.next_delay(), d - clock.t)), True)[1])
    starts: list[float] = []
    logs: list[str] = []

    def start():
        starts.append(clock.t)
        watcher.nodes = lambda timeout=2.0: [HEAD, node("me", ip="10.0.0.9", port=5)]  # type: ignore[method-assign]
        return FakeProc(True)

    res = ray_cluster.join_cluster(
        start=start, head_host="h", head_ip="10.0.0.1", gcs_port=1, node_ip="10.0.0.9", node_manager_port=5,
        timeout=60, stopper=ClockStopper(clock), log=logs.append, terminate=lambda p: None,
        backoff=Backoff(rng=random.Random(0)), clock=clock)
    assert res is not None and res.attempts == 1
    assert registered_at <= starts[0] <= registered_at + 0.5
    assert any("waiting for its raylet to register" in m for m in logs)


def test_join_names_a_head_whose_raylet_never_registered(monkeypatch):
    clock = FakeClock()
    watcher = FakeWatcher([[]])
    monkeypatch.setattr(ray_cluster, "tcp_open", lambda *a, **k: True)
    monkeypatch.setattr(ray_cluster, "GcsWatcher", lambda addr: watcher)
    monkeypatch.setattr(ray_cluster, "sleep_until_next",
                        lambda b, d, s, c=None, sl=None: (clock.sleep(max(0, min(b.next_delay(), d - clock.t))), True)[1])
    with pytest.raises(HeadUnreachable, match=r"head gpu01's GCS answered at 10.0.0.1:4321 but its own Ray node "
                                              r"never registered within 12s"):
        ray_cluster.join_cluster(start=lambda: pytest.fail("must not start ray"), head_host="gpu01",
                                 head_ip="10.0.0.1", gcs_port=4321, node_ip="10.0.0.9", node_manager_port=5,
                                 timeout=12, stopper=ClockStopper(clock), log=lambda m: None,
                                 terminate=lambda p: None, clock=clock)


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
