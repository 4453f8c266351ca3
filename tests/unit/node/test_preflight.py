"""Pre-flight across nodes: the head's comparison, the diagnosis, and the exchange of records
between node programs (threads sharing one job directory, each node's checks faked)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from slurm_vllm import timeline
from slurm_vllm.errors import NodeError
from slurm_vllm.jobdir import JobDir, Phase, PreflightCheck, PreflightRecord, Run, update_state, write_state
from slurm_vllm.node import preflight
from slurm_vllm.node.lifecycle import Stopper
from slurm_vllm.node.ports import plan_ports, port_is_free
from slurm_vllm.node.topology import Topology
from slurm_vllm.spec import ServeSpec

RUN = Run("77", 0)


def rec(rank: int, host: str, fp: str = "aa" * 32, checks: list[PreflightCheck] | None = None) -> PreflightRecord:
    return PreflightRecord(job_id="77", rank=rank, host=host, model_fingerprint=fp, checks=checks or [])


def check(node: str, name: str, status: Any = "ok", detail: str = "fine") -> PreflightCheck:
    return PreflightCheck(node=node, check=name, status=status, detail=detail)


# ---------------------------------------------------------------- comparison and diagnosis


def test_a_missing_record_is_named_with_the_node_s_last_log_line():
    out = preflight.compare({0: rec(0, "n1")}, ["n1", "n2", "n3"], 60.0,
                            last_words=lambda r: "joining" if r == 1 else "")
    assert [(c.node, c.check, c.status) for c in out] == [("n2", "record", "fail"), ("n3", "record", "fail")]
    assert out[0].detail == "no pre-flight record within 60 s; its last log line: 'joining'"
    assert out[1].detail == "no pre-flight record within 60 s; no log yet (its node program never started?)"


def test_a_node_whose_config_json_differs_from_the_head_s_fails():
    records = {0: rec(0, "n1"), 1: rec(1, "n2"), 2: rec(2, "n3", fp="bb" * 32)}
    out = preflight.compare(records, ["n1", "n2", "n3"], 1.0)
    assert len(out) == 1 and (out[0].node, out[0].check, out[0].status) == ("n3", "model_same", "fail")
    assert out[0].detail == ("the model's config.json differs from the head's (sha256 bbbbbbbbbbbb here, sha256 "
                             "aaaaaaaaaaaa on n1): every node must read the same model")


def test_a_node_that_already_failed_its_model_check_is_not_blamed_twice():
    records = {0: rec(0, "n1"), 1: rec(1, "n2", fp="", checks=[check("n2", "model", "fail", "missing")])}
    assert preflight.compare(records, ["n1", "n2"], 1.0) == []
    assert preflight.compare({0: rec(0, "n1", fp=""), 1: rec(1, "n2", fp="cc")}, ["n1", "n2"], 1.0) == []


def test_diagnosis_names_each_failing_node_and_check():
    found = [check("labnode1", "gpus"), check("labnode2", "gpus", "fail", "GPUs visible 1, asked 2"),
             check("labnode2", "shm", "warn", "small")]
    assert preflight.diagnosis(found) == "preflight: labnode2: GPUs visible 1, asked 2"
    many = [check(f"n{i}", "model", "fail", "missing") for i in range(6)]
    assert preflight.diagnosis(many) == ("preflight: n0: missing; n1: missing; n2: missing; n3: missing; "
                                         "and 2 more (status --json)")


def test_modes_and_the_all_reduce_rule():
    spec = ServeSpec("org/m", nodes=2, gpus_per_node=0)
    assert spec.ray.preflight == "full" and preflight.wants_allreduce(spec, 2)
    assert not preflight.wants_allreduce(spec, 1)
    assert not preflight.wants_allreduce(ServeSpec("org/m", nodes=2, gpus_per_node=0, preflight="quick"), 2)
    assert not preflight.wants_allreduce(ServeSpec("org/m", nodes=2, gpus_per_node=0, replicas=2), 2)
    assert preflight.wants_allreduce(ServeSpec("org/m", nodes=4, gpus_per_node=0, replicas=2), 4)  # 2 nodes each


# ---------------------------------------------------------------- the exchange between nodes


class FakeProgram:
    """What Preflight uses of the node program."""

    def __init__(self, jobdir: JobDir, rank: int, env: dict[str, str] | None = None) -> None:
        self.jobdir, self.rank = jobdir, rank
        self.env = env or {}
        self.stopper = Stopper()
        self.lines: list[str] = []
        self.log = self.lines.append
        self.temp_dir = f"/tmp/svl-u1/svl-77-{rank}"
        self.owned: list[Any] = []
        self.started_at = time.time()

    def current_run(self) -> Run:
        return RUN

    def write_state(self, phase: Phase, **fields: Any) -> None:
        if self.rank == 0:
            write_state(self.jobdir, RUN, phase, **fields)

    def update_state(self, otherwise: Phase | None = None, **fields: Any) -> None:
        if self.rank == 0:
            update_state(self.jobdir, RUN, otherwise=otherwise, **fields)


def topo(rank: int, n: int) -> Topology:
    return Topology(job_id="77", rank=rank, num_nodes=n, hostname=f"n{rank + 1}",
                    hosts=tuple(f"n{i + 1}" for i in range(n)), head_host="n1", head_ip="127.0.0.1",
                    node_ip="127.0.0.1", interface="lo")


def faked(fail: dict[int, str] | None = None, fp: dict[int, str] | None = None):
    def checker(spec: ServeSpec, t: Topology, ports: Any, env: Any, temp_dir: str):
        detail = (fail or {}).get(t.rank)
        gpus = check(t.hostname, "gpus", "fail" if detail else "ok", detail or "GPUs visible 2, asked 2")
        return [check(t.hostname, "address"), gpus], (fp or {}).get(t.rank, "aa" * 32), 2
    return checker


def run_nodes(tmp_path: Path, n: int, spec: ServeSpec, checker: Any, ranks: list[int] | None = None,
              start_delay: dict[int, float] | None = None,
              env: dict[str, str] | None = None) -> tuple[JobDir, dict[int, Any], list[FakeProgram]]:
    jd = JobDir(tmp_path)
    results: dict[int, Any] = {}
    programs = [FakeProgram(jd, r, env) for r in range(n)]

    def node(rank: int) -> None:
        time.sleep((start_delay or {}).get(rank, 0.0))
        p = programs[rank]
        try:
            ports = plan_ports("77", rank, is_free=port_is_free)
            results[rank] = preflight.Preflight(p, spec, topo(rank, n), ports, checker=checker).run()  # type: ignore[arg-type]
        except NodeError as e:
            results[rank] = e
    threads = [threading.Thread(target=node, args=(r,)) for r in (ranks if ranks is not None else range(n))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return jd, results, programs


def quick(n: int, **kw: Any) -> ServeSpec:
    return ServeSpec("org/m", nodes=n, gpus_per_node=2, preflight="quick", **kw)


def test_every_node_passes_and_the_head_records_all_checks(tmp_path: Path):
    jd, results, programs = run_nodes(tmp_path, 3, quick(3), faked(), start_delay={2: 0.3})
    assert results == {0: True, 1: True, 2: True}
    state = jd.read_state(RUN)
    assert state is not None and state.phase is Phase.STARTING_RAY and state.reason == ""
    assert [(c.node, c.check) for c in state.preflight] == [
        ("n1", "address"), ("n1", "gpus"), ("n2", "address"), ("n2", "gpus"), ("n3", "address"), ("n3", "gpus")]
    assert [m.name for m in state.timeline] == [timeline.ALLOCATED, timeline.PREFLIGHT]
    assert state.timeline[1].ok and state.timeline[1].detail.startswith("3 node(s), ")
    head = jd.read_preflight(0, RUN)
    assert head is not None and head.verdict == "passed" and head.rendezvous_port is None
    assert any(line.startswith("preflight passed on 3 node(s)") for line in programs[0].lines)


def test_a_failing_check_on_a_worker_fails_the_job_on_every_node(tmp_path: Path):
    jd, results, _ = run_nodes(tmp_path, 2, quick(2), faked(fail={1: "GPUs visible 1, asked 2"}))
    diag = "preflight: n2: GPUs visible 1, asked 2"
    assert isinstance(results[0], NodeError) and str(results[0]) == diag
    assert isinstance(results[1], NodeError) and str(results[1]) == diag
    state = jd.read_state(RUN)
    assert state is not None and state.phase is Phase.FAILED and state.reason == diag
    assert state.reported_by == "n1"
    assert ("n2", "gpus", "fail") in [(c.node, c.check, c.status) for c in state.preflight]
    mark = [m for m in state.timeline if m.name == timeline.PREFLIGHT][0]
    assert not mark.ok and mark.detail == "n2: GPUs visible 1, asked 2"
    head = jd.read_preflight(0, RUN)
    assert head is not None and (head.verdict, head.reason) == ("failed", diag)


def test_a_different_model_on_one_node_is_named(tmp_path: Path):
    _, results, _ = run_nodes(tmp_path, 2, quick(2), faked(fp={1: "bb" * 32}))
    assert str(results[0]).startswith("preflight: n2: the model's config.json differs from the head's")


def test_a_node_that_never_writes_its_record_fails_the_job_by_the_deadline(tmp_path: Path):
    t0 = time.monotonic()
    jd, results, _ = run_nodes(tmp_path, 2, quick(2, cluster_timeout=1), faked(), ranks=[0])
    assert 1.0 <= time.monotonic() - t0 < 5
    assert str(results[0]) == ("preflight: n2: no pre-flight record within 1 s; no log yet "
                               "(its node program never started?)")
    state = jd.read_state(RUN)
    assert state is not None and state.phase is Phase.FAILED


def test_the_head_says_whom_it_waits_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(preflight, "PROGRESS_AFTER", 0.1)
    seen: list[str] = []
    jd = JobDir(tmp_path)

    def watch() -> None:
        for _ in range(40):
            st = jd.read_state(RUN)
            if st is not None and st.reason:
                seen.append(st.reason)
                return
            time.sleep(0.05)
    w = threading.Thread(target=watch)
    w.start()
    _, results, _ = run_nodes(tmp_path, 2, quick(2), faked(), start_delay={1: 1.0})
    w.join()
    assert results == {0: True, 1: True}
    assert seen == ["pre-flight: waiting for n2"]


def test_records_of_another_run_are_never_taken_for_this_one(tmp_path: Path):
    jd = JobDir(tmp_path)
    PreflightRecord(job_id="77", restart=1, rank=1, host="n2", verdict="").write(jd.preflight(1))
    _, results, _ = run_nodes(tmp_path, 2, quick(2, cluster_timeout=1), faked(), ranks=[0])
    assert "n2: no pre-flight record within 1 s" in str(results[0])
    moved = jd.archive_previous_run(Run("77", 2))
    assert [p.name for p in moved if p.name.startswith("preflight-")] == ["preflight-0.json", "preflight-1.json"]


def test_a_worker_stops_when_the_head_never_writes_its_record(tmp_path: Path):
    _, results, _ = run_nodes(tmp_path, 2, quick(2, join_timeout=1), faked(), ranks=[1])
    assert str(results[1]) == ("preflight: the head n1 wrote no pre-flight record within 1 s "
                               "(its node program never started?)")


def test_a_worker_follows_a_head_that_failed_otherwise(tmp_path: Path):
    jd = JobDir(tmp_path)
    write_state(jd, RUN, Phase.FAILED, reason="the head broke")
    _, results, _ = run_nodes(tmp_path, 2, quick(2), faked(), ranks=[1])
    assert str(results[1]) == "the head reported FAILED: the head broke"


def test_off_runs_nothing_and_a_stop_returns_false(tmp_path: Path):
    jd = JobDir(tmp_path)
    spec = ServeSpec("org/m", nodes=2, gpus_per_node=2, preflight="off")
    p = FakeProgram(jd, 0)
    assert preflight.run(p, spec, topo(0, 2), plan_ports("77", 0, is_free=lambda x: True)) is True  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    p.stopper.stop("cancelled")
    ok = preflight.Preflight(p, quick(2), topo(0, 2), plan_ports("77", 0, is_free=lambda x: True),  # type: ignore[arg-type]
                             checker=faked()).run()
    assert ok is False


def test_full_mode_without_torch_warns_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(preflight, "torch_importable", lambda: False)
    jd, results, _ = run_nodes(tmp_path, 2, ServeSpec("org/m", nodes=2, gpus_per_node=2), faked())
    assert results == {0: True, 1: True}
    state = jd.read_state(RUN)
    assert state is not None
    assert [(c.node, c.status, c.detail) for c in state.preflight if c.check == "allreduce"] == [
        (node, "warn", "skipped: torch is not importable by the node program's Python") for node in ("n1", "n2")]


def test_the_mp_backend_and_replicas_go_on_to_loading(tmp_path: Path):
    jd, results, _ = run_nodes(tmp_path, 2, quick(2, backend="mp"), faked())
    assert results == {0: True, 1: True}
    state = jd.read_state(RUN)
    assert state is not None and state.phase is Phase.LOADING_MODEL and len(state.preflight) == 4


def test_the_node_program_ends_failed_before_ray_when_a_check_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The hook in the node program: a one-node job whose model is missing never reaches Ray."""
    from slurm_vllm.jobdir import write_json
    from slurm_vllm.node import program

    monkeypatch.setattr(program.lifecycle, "install_signal_handlers", lambda stopper: None)
    monkeypatch.setattr(program.lifecycle, "become_subreaper", lambda on=True: False)
    monkeypatch.setattr(program.NodeProgram, "_sweep_stale_temp_dirs", lambda self, topo: None)
    monkeypatch.setattr(program.topology, "slurm_hostnames", lambda nodelist, run=None: ["localhost"])
    started: list[Any] = []
    monkeypatch.setattr(program.Head, "run", lambda self, *args: started.append(args) or 0)
    jd = JobDir(tmp_path / "job").create()
    model = tmp_path / "missing-model"
    spec = ServeSpec.model_validate({"model": str(model), "gpus_per_node": 0, "cache_dir": "none"},
                                    context={"check_paths": False})
    write_json(jd.spec, spec.model_dump(mode="json"))
    jd.write_secret(jd.ray_token)
    env = {"SLURM_JOB_ID": "91", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_VLLM_SHM_DIR": str(tmp_path)}
    rc = program.NodeProgram(jd.path, env=env, hostname="localhost").run()
    assert rc == 1 and started == []
    state = jd.read_state(Run("91"))
    assert state is not None and state.phase is Phase.FAILED
    assert state.reason == (f"preflight: localhost: model path {model} does not exist on this node "
                            "(is its filesystem mounted here?)")
    assert {c.check for c in state.preflight} == {"address", "ports", "shm", "temp_dir", "gpus", "model"}
    assert jd.read_preflight(0, Run("91")) is not None


def test_a_node_that_fails_before_it_knows_its_place_still_names_the_reason(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    """No address on the interface the spec names: discovery fails, and rank 0 says why in state.json."""
    from slurm_vllm.jobdir import write_json
    from slurm_vllm.node import program

    monkeypatch.setattr(program.lifecycle, "install_signal_handlers", lambda stopper: None)
    monkeypatch.setattr(program.lifecycle, "become_subreaper", lambda on=True: False)
    monkeypatch.setattr(program.topology, "slurm_hostnames", lambda nodelist, run=None: ["localhost"])
    jd = JobDir(tmp_path / "job").create()
    spec = ServeSpec.model_validate({"model": "org/m", "gpus_per_node": 0, "interface": "ib9", "cache_dir": "none"},
                                    context={"check_paths": False})
    write_json(jd.spec, spec.model_dump(mode="json"))
    env = {"SLURM_JOB_ID": "92", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost"}
    assert program.NodeProgram(jd.path, env=env, hostname="localhost").run() == 1
    state = jd.read_state(Run("92"))
    assert state is not None and state.phase is Phase.FAILED and "network.interface='ib9'" in state.reason


# ---------------------------------------------------------------- beside Ray's formation


def begin_nodes(tmp_path: Path, n: int, spec: ServeSpec, checker: Any, start_delay: dict[int, float] | None = None,
                while_forming: Any = None) -> tuple[JobDir, dict[int, Any], list[FakeProgram], dict[int, float]]:
    """Each node calls begin() (as the node program does before Ray), runs ``while_forming``
    (standing in for Ray's formation), then waits for the verdict (as the head does before vLLM)."""
    jd = JobDir(tmp_path)
    results: dict[int, Any] = {}
    returned_after: dict[int, float] = {}
    programs = [FakeProgram(jd, r) for r in range(n)]

    def node(rank: int) -> None:
        time.sleep((start_delay or {}).get(rank, 0.0))
        p, t0 = programs[rank], time.monotonic()
        try:
            ports = plan_ports("77", rank, is_free=port_is_free)
            verdict = preflight.begin(p, spec, topo(rank, n), ports, checker=checker)  # type: ignore[arg-type]
            returned_after[rank] = time.monotonic() - t0
            if while_forming is not None:
                while_forming(rank, jd)
            results[rank] = verdict.wait()
        except NodeError as e:
            results[rank] = e
    threads = [threading.Thread(target=node, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return jd, results, programs, returned_after


def test_beside_ray_a_node_goes_on_at_once_and_the_verdict_keeps_ray_s_phase(tmp_path: Path):
    """The head does not wait for a late worker's record before starting Ray; the verdict,
    reached later, adds the checks to state.json without undoing Ray's progress."""
    def forming(rank: int, jd: JobDir) -> None:
        if rank == 0:
            write_state(jd, RUN, Phase.STARTING_RAY, nodes_joined=1, nodes_expected=2, missing_hosts=["n2"])

    jd, results, _, returned = begin_nodes(tmp_path, 2, quick(2), faked(), start_delay={1: 0.6}, while_forming=forming)
    assert results == {0: True, 1: True}
    assert returned[0] < 0.3  # not the 0.6 s the worker took to write its record
    state = jd.read_state(RUN)
    assert state is not None and state.phase is Phase.STARTING_RAY and state.nodes_joined == 1
    assert len(state.preflight) == 4 and [m.name for m in state.timeline] == [timeline.ALLOCATED, timeline.PREFLIGHT]


def test_beside_ray_a_worker_s_failed_check_stops_the_formation_with_the_diagnosis(tmp_path: Path):
    diag = "preflight: n2: GPUs visible 1, asked 2"
    jd, results, programs, _ = begin_nodes(tmp_path, 2, quick(2), faked(fail={1: "GPUs visible 1, asked 2"}))
    assert isinstance(results[0], NodeError) and str(results[0]) == diag
    assert isinstance(results[1], NodeError) and str(results[1]) == diag  # the failing node decided at once
    assert programs[0].stopper.failed and programs[0].stopper.reason == diag  # Ray's wait ends now
    state = jd.read_state(RUN)
    assert state is not None and state.phase is Phase.FAILED and state.reason == diag


def test_beside_ray_a_late_progress_line_does_not_undo_the_failure(tmp_path: Path):
    def forming(rank: int, jd: JobDir) -> None:
        if rank == 0:
            programs_stopped = time.monotonic() + 5
            while jd.read_state(RUN) is None or not jd.read_state(RUN).phase.final:  # type: ignore[union-attr]
                if time.monotonic() > programs_stopped:
                    return
                time.sleep(0.02)
            write_state(jd, RUN, Phase.STARTING_RAY, nodes_joined=1, nodes_expected=2)  # Ray's, too late

    jd, results, _, _ = begin_nodes(tmp_path, 2, quick(2), faked(fp={1: "bb" * 32}), while_forming=forming)
    assert isinstance(results[0], NodeError)
    state = jd.read_state(RUN)
    assert state is not None and state.phase is Phase.FAILED and "differs from the head's" in state.reason
