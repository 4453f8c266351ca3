"""Rank 0 with replicas: the router's command line, the job's phase from the replicas' records,
and how the router is steered (a fake admin API)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_vllm.jobdir import Phase, ReplicaRecord
from slurm_vllm.node import router
from slurm_vllm.node.router import RouterSupervisor, summarize
from tests.unit.node.test_replica import make_ctx


def rec(index: int, phase: str = "ready", reason: str = "", restarts: int = 0) -> ReplicaRecord:
    return ReplicaRecord(job_id="55", index=index, url=f"http://10.0.0.{index + 1}:8000/v1", phase=phase,  # type: ignore[arg-type]
                         reason=reason, restarts=restarts, nodes=[f"n{index + 1}"])


def test_router_listens_on_loopback_only_and_its_key_stays_in_a_file(tmp_path: Path) -> None:
    argv = router.router_argv(port=21211, metrics_port=21212, policy="round_robin", key_file=tmp_path / "k")
    assert argv[1:4] == ["-m", "slurm_vllm.node.router", "--key-file"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--prometheus-host") + 1] == "127.0.0.1"
    assert argv[argv.index("--policy") + 1] == "round_robin"
    assert "--api-key" not in argv and "--worker-urls" not in argv  # workers are added once they answer
    assert "--policy" not in router.router_argv(port=1, metrics_port=2, policy=None, key_file=None)


def test_the_launcher_hands_the_key_from_its_file_to_vllm_router(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm_router.launch_router as launcher

    seen = []
    monkeypatch.setattr(launcher, "launch_router", seen.append)
    (tmp_path / "k").write_text("the-key\n")
    argv = router.router_argv(port=21211, metrics_port=21212, policy="round_robin", key_file=tmp_path / "k")
    assert router.main(argv[3:]) == 0
    args = seen[0]
    assert (args.api_key, args.host, args.port, args.policy) == ("the-key", "127.0.0.1", 21211, "round_robin")
    assert args.worker_urls == []


def test_the_front_reads_the_key_from_its_file(tmp_path: Path) -> None:
    argv = router.front_argv(host="10.0.0.1", port=21210, router_port=21211, metrics_port=21212,
                             key_file=tmp_path / "api_key")
    assert argv[argv.index("--key-file") + 1] == str(tmp_path / "api_key")
    assert "--router" in argv and argv[argv.index("--router") + 1] == "http://127.0.0.1:21211"
    assert "--key-file" not in router.front_argv(host="h", port=1, router_port=2, metrics_port=3, key_file=None)


def test_worker_url_is_the_replicas_base_without_v1() -> None:
    assert router.worker_url("http://10.0.0.1:8000/v1") == "http://10.0.0.1:8000"


@pytest.mark.parametrize(("records", "routed", "served", "min_ready", "phase", "ready"), [
    ([rec(0, "starting"), rec(1, "starting"), rec(2, "starting")], set(), False, 3, Phase.LOADING_MODEL, 0),
    ([rec(0), rec(1), rec(2, "starting")], {0, 1}, False, 3, Phase.LOADING_MODEL, 2),
    ([rec(0), rec(1), rec(2)], {0, 1, 2}, True, 3, Phase.READY, 3),
    ([rec(0), rec(1), rec(2, "restarting", "vllm exited")], {0, 1}, True, 3, Phase.DEGRADED, 2),
    ([rec(0), rec(1), rec(2, "failed", "gone")], {0, 1}, True, 2, Phase.READY, 2),
    ([rec(0, "restarting"), rec(1, "restarting"), rec(2, "restarting")], set(), True, 3, Phase.DEGRADED, 0),
    ([None, rec(1), rec(2)], {1, 2}, True, 3, Phase.DEGRADED, 2),
])
def test_the_jobs_phase_follows_its_replicas(records, routed, served, min_ready, phase, ready) -> None:
    s = summarize(records, routed, min_ready=min_ready, served_before=served)
    assert (s.phase, s.ready, s.expected) == (phase, ready, 3)


def test_degraded_names_the_replicas_down_and_why() -> None:
    s = summarize([rec(0), rec(1), rec(2, "restarting", "vllm exited with code 1")], {0, 1}, min_ready=3,
                  served_before=True)
    assert s.reason == "replica 2: restarting (vllm exited with code 1)"


def test_failed_only_when_no_replica_is_left_with_every_reason() -> None:
    dead = [rec(i, "failed", f"replica {i}: oom") for i in range(3)]
    s = summarize(dead, set(), min_ready=3, served_before=True)
    assert s.phase is Phase.FAILED and all(f"replica {i}: oom" in s.reason for i in range(3))
    assert summarize([*dead[:2], rec(2, "restarting")], set(), min_ready=3, served_before=True).phase is Phase.DEGRADED


class FakeAdmin:
    def __init__(self, urls: set[str]) -> None:
        self.urls, self.calls = set(urls), []

    def workers(self) -> set[str]:
        return set(self.urls)

    def add(self, url: str) -> bool:
        self.calls.append(("add", url))
        self.urls.add(url)
        return True

    def remove(self, url: str) -> bool:
        self.calls.append(("remove", url))
        self.urls.discard(url)
        return True


def test_answering_replicas_are_added_and_silent_ones_taken_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = make_ctx(tmp_path, rank=0)
    silent = {"http://10.0.0.2:8000/v1"}
    monkeypatch.setattr(router, "healthy", lambda url: url not in silent)
    admin = FakeAdmin({"http://10.0.0.2:8000", "http://10.0.0.3:8000"})
    sup = RouterSupervisor(ctx, start=lambda *a: None)  # type: ignore[arg-type,return-value]
    routed = sup._steer(admin, [rec(0), rec(1), rec(2, "restarting")])  # type: ignore[arg-type]
    assert routed == {0}
    assert admin.calls == [("add", "http://10.0.0.1:8000"), ("remove", "http://10.0.0.2:8000"),
                           ("remove", "http://10.0.0.3:8000")]
    assert sup._steer(_Down(), [rec(0)]) == set()  # type: ignore[arg-type]


def test_a_worker_the_job_never_added_is_taken_out_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = make_ctx(tmp_path, rank=0)
    logged: list[str] = []
    ctx.log = logged.append
    monkeypatch.setattr(router, "healthy", lambda url: True)
    admin = FakeAdmin({"http://10.0.0.1:8000", "http://10.9.9.9:1"})  # a neighbour's, through loopback
    sup = RouterSupervisor(ctx, start=lambda *a: None)  # type: ignore[arg-type,return-value]
    assert sup._steer(admin, [rec(0)]) == {0}  # type: ignore[arg-type]
    assert admin.calls == [("remove", "http://10.9.9.9:1")] and admin.urls == {"http://10.0.0.1:8000"}
    assert any("took http://10.9.9.9:1 out of the router: the job never added it" in line for line in logged)


class _Down:
    def workers(self) -> None:
        return None


def test_state_is_written_only_when_a_reader_would_see_a_change(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, rank=0)
    sup = RouterSupervisor(ctx, start=lambda *a: None)  # type: ignore[arg-type,return-value]
    records = [rec(0), rec(1), rec(2)]
    sup._publish(summarize(records, {0, 1, 2}, min_ready=3, served_before=True), records)
    first = ctx.jobdir.state.stat().st_mtime_ns
    sup._publish(summarize(records, {0, 1, 2}, min_ready=3, served_before=True), records)
    assert ctx.jobdir.state.stat().st_mtime_ns == first
    st = ctx.jobdir.read_state(ctx.run)
    assert st is not None and st.phase is Phase.READY and (st.replicas_ready, st.replicas_expected) == (3, 3)
    assert [r.url for r in st.replicas] == [r.url for r in records]
    assert st.router_address == f"127.0.0.1:{ctx.ports.router}"


def test_a_missing_router_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(router.NodeError, match=r"pip install 'slurm-vllm\[node\]'"):
        router.require_router()
