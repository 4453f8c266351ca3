"""The job handle: phases from Slurm + state.json + probe, waiting, endpoint, cancel, finding jobs."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_vllm import job as jobmod
from slurm_vllm import slurm
from slurm_vllm.errors import JobFailedError, JobNotFoundError, WaitTimeoutError
from slurm_vllm.job import Job, JobBlockedError, JobStatus, combine
from slurm_vllm.jobdir import JobDir, Phase, Run, write_json, write_state
from tests.unit.fake_slurm import FakeSlurm, fail, ok

US = slurm.SEP


def sq(jid: str, state: str, reason: str = "None", workdir: str = "/x", nodes: str = "2", restarts: str = "0") -> str:
    return US.join([jid, state, reason, "vllm", nodes, "n[1-2]", "1:00", "1:00:00", "slurm_vllm", restarts, workdir]) + "\n"


def sa(jid: str, state: str, exit_code: str = "0:0", workdir: str = "/x") -> str:
    return US.join([jid, state, "None", "vllm", "2", "n[1-2]", "00:01:00", "01:00:00", exit_code, workdir]) + "\n"


def sjob(state: str, reason: str = "None", exit_code: str = "") -> slurm.SlurmJob:
    st = slurm.parse_state(state)
    return slurm.SlurmJob(
        "42", st, reason=slurm.parse_reason(reason) if st.category is slurm.Category.PENDING else None,
        nodes=2, exit_code=exit_code,
    )


@pytest.fixture
def jd(tmp_path: Path) -> JobDir:
    d = JobDir(tmp_path / "job").create()
    write_json(d.spec, {"model": {"name": "m"}})
    d.job_id_file.write_text("42\n")
    d.write_secret(d.api_key, "sekret")
    return d


def never_probe(url: str, key: str | None) -> tuple[bool, str]:
    raise AssertionError("probe must not be called")


def up(url: str, key: str | None) -> tuple[bool, str]:
    return True, ""


# --------------------------------------------------------------------------------------------
# combine(): every source combination
# --------------------------------------------------------------------------------------------


def test_pending_shows_slurm_reason(jd: JobDir) -> None:
    st = combine("42", jd, sjob("PENDING", "Priority"), None, None, None, never_probe)
    assert st.phase == "PENDING" and "Priority" in st.reason and not st.blocked


def test_pending_blocked_reason_is_flagged(jd: JobDir) -> None:
    st = combine("42", jd, sjob("PENDING", "InvalidQOS"), None, None, None, never_probe)
    assert st.phase == "PENDING" and st.blocked and "InvalidQOS" in st.reason


def test_requeued_job_ignores_its_old_state_file(jd: JobDir) -> None:
    state = {"job_id": "42", "phase": "READY"}
    st = combine("42", jd, sjob("REQUEUED", "BeginTime"), state, {"base_url": "http://h:1/v1"}, None, never_probe)
    assert st.phase == "PENDING" and "requeued" in st.reason


def test_running_without_state_file_is_starting(jd: JobDir) -> None:
    st = combine("42", jd, sjob("RUNNING"), None, None, None, never_probe)
    assert st.phase == "STARTING_RAY" and st.nodes_joined == 0 and st.nodes_expected == 2


def test_running_with_progress(jd: JobDir) -> None:
    state = {"job_id": "42", "phase": "STARTING_RAY", "nodes_joined": 1, "nodes_expected": 2}
    st = combine("42", jd, sjob("RUNNING"), state, None, None, never_probe)
    assert st.phase == "STARTING_RAY" and st.summary() == "STARTING_RAY 1/2 nodes"


def test_state_file_of_another_job_is_ignored(jd: JobDir) -> None:
    state = {"job_id": "41", "phase": "FAILED", "reason": "old"}
    st = combine("42", jd, sjob("RUNNING"), state, None, None, never_probe)
    assert st.phase == "STARTING_RAY"


def test_ready_needs_endpoint_and_probe(jd: JobDir) -> None:
    state = {"job_id": "42", "phase": "READY"}
    ep = {"base_url": "http://10.0.0.1:8000/v1", "model": "m", "job_id": "42"}
    st = combine("42", jd, sjob("RUNNING"), state, ep, "k", up)
    assert st.ready and st.url == ep["base_url"] and st.summary() == "READY http://10.0.0.1:8000/v1"
    down = combine("42", jd, sjob("RUNNING"), state, ep, "k", lambda u, k: (False, "/health unreachable: refused"))
    assert down.phase == "READY" and not down.ready and "refused" in down.summary()
    no_ep = combine("42", jd, sjob("RUNNING"), state, None, "k", never_probe)
    assert no_ep.phase == "LOADING_MODEL"


def test_head_reported_failure_wins_while_slurm_still_runs(jd: JobDir) -> None:
    state = {"job_id": "42", "phase": "FAILED", "reason": "node 1 never joined", "log_tail": "boom"}
    st = combine("42", jd, sjob("RUNNING"), state, None, None, never_probe)
    assert (st.phase, st.reason, st.log_tail) == ("FAILED", "node 1 never joined", "boom")


def test_a_failed_preflight_is_the_reason_and_every_check_is_in_the_status(jd: JobDir) -> None:
    checks = [{"node": "labnode1", "check": "gpus", "status": "ok", "detail": "GPUs visible 2, asked 2"},
              {"node": "labnode2", "check": "gpus", "status": "fail", "detail": "GPUs visible 1, asked 2"},
              {"node": "labnode2", "check": "shm", "status": "warn", "detail": "small"}]
    state = {"job_id": "42", "phase": "FAILED", "reason": "preflight: labnode2: GPUs visible 1, asked 2",
             "preflight": checks}
    st = combine("42", jd, sjob("RUNNING"), state, None, None, never_probe)
    assert st.summary() == "FAILED (preflight: labnode2: GPUs visible 1, asked 2)"
    assert st.to_dict()["preflight"] == checks


@pytest.mark.parametrize(
    "state,phase,words",
    [
        ("CANCELLED by 1000", "ENDED", "cancelled by 1000"),
        ("TIMEOUT", "ENDED", "time limit"),
        ("COMPLETED", "ENDED", "finished"),
        ("NODE_FAIL", "FAILED", "node"),
        ("OUT_OF_MEMORY", "FAILED", "memory"),
        ("PREEMPTED", "FAILED", "preempted"),
        ("FAILED", "FAILED", "exit code 1:0"),
        ("BOOT_FAIL", "FAILED", "boot"),
    ],
)
def test_final_slurm_states_without_state_file(jd: JobDir, state: str, phase: str, words: str) -> None:
    st = combine("42", jd, sjob(state, exit_code="1:0" if state == "FAILED" else "0:0"), None, None, None, never_probe)
    assert st.phase == phase and words in st.reason.lower(), st.reason
    assert st.final


def test_failed_status_carries_the_failing_nodes_log(jd: JobDir) -> None:
    (jd.logs / "node-0.log").write_text("head ok\n")
    import os
    import time

    p = jd.logs / "node-1.log"
    p.write_text("".join(f"line {i}\n" for i in range(100)) + "RuntimeError: cannot reach head\n")
    later = time.time() + 5
    os.utime(p, (later, later))
    st = combine("42", jd, sjob("FAILED", exit_code="1:0"), None, None, None, never_probe)
    assert "node-1.log" in st.log_tail and "cannot reach head" in st.log_tail
    assert len(st.log_tail.splitlines()) <= jobmod.LOG_TAIL_LINES + 1


def test_state_file_final_phase_beats_slurm_cancelled(jd: JobDir) -> None:
    state = {"job_id": "42", "phase": "ENDED", "reason": "time limit"}
    st = combine("42", jd, sjob("CANCELLED"), state, None, None, never_probe)
    assert (st.phase, st.reason) == ("ENDED", "time limit")


def test_no_slurm_record(jd: JobDir) -> None:
    st = combine("42", jd, None, None, None, None, never_probe)
    assert st.phase == "UNKNOWN" and "no record" in st.reason
    st2 = combine("42", jd, None, {"job_id": "42", "phase": "ENDED", "reason": "cancelled"}, None, None, never_probe)
    assert st2.phase == "ENDED"


def test_unknown_slurm_state_is_reported_not_raised(jd: JobDir) -> None:
    st = combine("42", jd, sjob("WARP_SPEED"), None, None, None, never_probe)
    assert st.phase == "UNKNOWN" and "WARP_SPEED" in st.reason


def test_suspended_keeps_phase_and_says_so(jd: JobDir) -> None:
    state = {"job_id": "42", "phase": "LOADING_MODEL"}
    st = combine("42", jd, sjob("SUSPENDED"), state, None, None, never_probe)
    assert st.phase == "LOADING_MODEL" and "suspended" in st.reason


# --------------------------------------------------------------------------------------------
# the handle, with Slurm faked at the runner boundary
# --------------------------------------------------------------------------------------------


def _sequence(states: list[str]) -> FakeSlurm:
    return FakeSlurm(squeue=[ok(["squeue"], s) for s in states], sacct=ok(["sacct"], ""))


def test_wait_ready_keeps_waiting_while_pending_then_returns_endpoint(jd: JobDir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobmod, "PROBE", up)
    fake = _sequence([sq("42", "PENDING", "Resources")] * 5 + [sq("42", "RUNNING")])
    seen: list[str] = []
    polls = {"n": 0}

    def sleep(_s: float) -> None:
        polls["n"] += 1
        if polls["n"] == 7:
            write_state(jd, Run("42"), "READY")
            write_json(jd.endpoint, {"base_url": "http://127.0.0.1:9/v1", "model": "m", "job_id": "42"})

    job = Job("42", jd, poller=slurm.Poller(min_interval=0))
    with slurm.use_runner(fake):
        ep = job.wait_ready(timeout=None, on_progress=lambda s: seen.append(s.summary()), sleep=sleep)
    assert ep.base_url == "http://127.0.0.1:9/v1" and ep.api_key == "sekret" and ep.model == "m"
    assert seen[0].startswith("PENDING (Resources") and seen[-1].startswith("READY")
    assert len(seen) == len(set(seen)), "progress reports changes only"
    assert "sekret" not in repr(ep)


def test_wait_ready_failed_job_raises_exit_4(jd: JobDir) -> None:
    write_state(jd, Run("42"), "FAILED", reason="vLLM exited during loading (exit 1)")
    fake = _sequence([sq("42", "RUNNING")])
    job = Job("42", jd, poller=slurm.Poller(min_interval=0))
    with slurm.use_runner(fake), pytest.raises(JobFailedError) as ei:
        job.wait_ready(timeout=10, sleep=lambda s: None)
    assert ei.value.exit_code == 4 and "vLLM exited during loading" in str(ei.value)


def test_wait_ready_times_out_exit_5(jd: JobDir) -> None:
    fake = _sequence([sq("42", "PENDING", "Priority")])
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    job = Job("42", jd, poller=slurm.Poller(min_interval=0, clock=lambda: now[0]))
    with slurm.use_runner(fake), pytest.raises(WaitTimeoutError) as ei:
        job.wait_ready(timeout=30, sleep=sleep, clock=lambda: now[0], interval=5)
    assert ei.value.exit_code == 5 and "Priority" in str(ei.value)
    assert 6 <= fake.count("squeue") <= 8


def test_wait_ready_blocked_reason_fails_fast_exit_3(jd: JobDir) -> None:
    fake = _sequence([sq("42", "PENDING", "AssocMaxNodePerJobLimit")])
    job = Job("42", jd, poller=slurm.Poller(min_interval=0))
    with slurm.use_runner(fake), pytest.raises(JobBlockedError) as ei:
        job.wait_ready(timeout=100, sleep=lambda s: None)
    assert ei.value.exit_code == 3 and "still queued" in str(ei.value)


def test_endpoint_before_ready_is_a_clear_error(jd: JobDir) -> None:
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "RUNNING", workdir=str(jd.path))))
    with slurm.use_runner(fake), pytest.raises(jobmod.EndpointNotReadyError):
        _ = Job("42", jd, poller=slurm.Poller(min_interval=0)).endpoint


def test_endpoint_of_another_job_is_not_used(jd: JobDir) -> None:
    write_json(jd.endpoint, {"base_url": "http://h:1/v1", "model": "m", "job_id": "41"})
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "RUNNING", workdir=str(jd.path))))
    with slurm.use_runner(fake), pytest.raises(jobmod.EndpointNotReadyError):
        _ = Job("42", jd, poller=slurm.Poller(min_interval=0)).endpoint


def test_cancel_waits_until_slurm_says_ended(jd: JobDir) -> None:
    fake = FakeSlurm(
        scancel=ok(["scancel"]),
        squeue=[ok(["squeue"], sq("42", "RUNNING")), ok(["squeue"], sq("42", "COMPLETING")), ok(["squeue"], sq("42", "CANCELLED by 0"))],
        sacct=ok(["sacct"], ""),
    )
    job = Job("42", jd, poller=slurm.Poller(min_interval=0))
    with slurm.use_runner(fake):
        st = job.cancel(sleep=lambda s: None)
    assert fake.calls[0] == ["scancel", "42"]
    assert st.phase == "ENDED" and "cancelled" in st.reason


def test_context_manager_cancels(jd: JobDir) -> None:
    fake = FakeSlurm(scancel=ok(["scancel"]), squeue=ok(["squeue"], sq("42", "CANCELLED")), sacct=ok(["sacct"], ""))
    with slurm.use_runner(fake):
        with Job("42", jd, poller=slurm.Poller(min_interval=0)) as job:
            assert job.job_id == "42"
    assert fake.count("scancel") == 1


def test_context_manager_cancels_on_error_too(jd: JobDir) -> None:
    fake = FakeSlurm(scancel=ok(["scancel"]), squeue=ok(["squeue"], sq("42", "CANCELLED")), sacct=ok(["sacct"], ""))
    with slurm.use_runner(fake), pytest.raises(KeyError):
        with Job("42", jd, poller=slurm.Poller(min_interval=0)):
            raise KeyError("user code failed")
    assert fake.count("scancel") == 1


def test_attach_by_job_dir(jd: JobDir) -> None:
    job = Job.attach(str(jd.path))
    assert job.job_id == "42" and job.job_dir == jd.path


def test_attach_dir_without_job_id(tmp_path: Path) -> None:
    d = JobDir(tmp_path / "j").create()
    write_json(d.spec, {})
    with pytest.raises(JobNotFoundError):
        Job.attach(str(d.path))


def test_attach_by_id_finds_hand_submitted_job_through_workdir(jd: JobDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "empty-home"))
    jd.job_id_file.unlink()  # submitted by hand: the batch script has not started yet
    fake = FakeSlurm(squeue=ok(["squeue"], sq("77", "PENDING", "Priority", workdir=str(jd.path))))
    monkeypatch.setattr(slurm, "POLLER", slurm.Poller(min_interval=0))
    with slurm.use_runner(fake):
        job = Job.attach("77")
        assert job.job_dir == jd.path and job.job_id == "77"
        assert job.status().phase == "PENDING"


def test_attach_foreign_job_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "empty-home"))
    fake = FakeSlurm(squeue=ok(["squeue"], sq("78", "RUNNING", workdir=str(tmp_path))))
    monkeypatch.setattr(slurm, "POLLER", slurm.Poller(min_interval=0))
    with slurm.use_runner(fake), pytest.raises(JobNotFoundError) as ei:
        Job.attach("78")
    assert "not a slurm_vllm job" in str(ei.value)


def test_attach_unknown_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "empty-home"))
    fake = FakeSlurm(squeue=fail(["squeue"], "slurm_load_jobs error: Invalid job id specified"), sacct=ok(["sacct"], ""))
    monkeypatch.setattr(slurm, "POLLER", slurm.Poller(min_interval=0))
    with slurm.use_runner(fake), pytest.raises(JobNotFoundError):
        Job.attach("99999")


def test_many_statuses_one_slurm_call(tmp_path: Path) -> None:
    jobs = []
    lines = ""
    for i in range(30):
        d = JobDir(tmp_path / f"j{i}").create()
        jobs.append(Job(str(100 + i), d))
        lines += sq(str(100 + i), "PENDING", "Priority", workdir=str(d.path))
    fake = FakeSlurm(squeue=ok(["squeue"], lines), sacct=ok(["sacct"], ""))
    with slurm.use_runner(fake):
        sts = jobmod.statuses(jobs, poller=slurm.Poller())
    assert [s.phase for s in sts] == ["PENDING"] * 30
    assert fake.count("squeue") == 1 and fake.count("sacct") == 0


def test_logs(jd: JobDir) -> None:
    (jd.logs / "node-0.log").write_text("a\nb\nc\n")
    (jd.logs / "vllm.log").write_text("v\n")
    job = Job("42", jd)
    assert job.logs() == "a\nb\nc\n" and job.logs(tail=1) == "c" and job.logs("vllm") == "v\n"
    assert job.logs(3) == ""
    with pytest.raises(ValueError):
        job.logs("nope")


def test_repr_and_html(jd: JobDir) -> None:
    job = Job("42", jd)
    assert "42" in repr(job)
    job._last = combine("42", jd, sjob("PENDING", "Resources"), None, None, None, never_probe)
    page = job._repr_html_()
    assert "<table>" in page and "PENDING" in page and "Resources" in page


# --------------------------------------------------------------------------------------------
# the probe, against a real local HTTP server
# --------------------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[str]:
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_probe_health_real_http(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://10.255.255.1:1")  # must be bypassed
    assert jobmod.probe_health(server, "k") == (True, "")
    ok_, why = jobmod.probe_health("http://127.0.0.1:1/v1", None, timeout=1)
    assert not ok_ and "unreachable" in why


def test_colour_codes_from_vllm_do_not_reach_the_terminal(jd: JobDir) -> None:
    state = {"job_id": "42", "phase": "FAILED", "reason": "vllm exited: \x1b[36mray::Worker()\x1b[39m failed", "log_tail": "\x1b[31mboom\x1b[0m"}
    st = combine("42", jd, sjob("RUNNING"), state, None, None, never_probe)
    assert st.reason == "vllm exited: ray::Worker() failed" and st.log_tail == "boom"


def test_just_submitted_reason_reads_well(jd: JobDir) -> None:
    st = combine("42", jd, sjob("PENDING", "None"), None, None, None, never_probe)
    assert st.summary() == "PENDING (just submitted; not scheduled yet)"


def test_replica_counts_in_the_summary_line() -> None:
    st = JobStatus(job_id="1", job_dir="/j", phase=Phase.READY, url="http://h:1/v1", healthy=True,
                   replicas_ready=3, replicas_expected=3)
    assert st.summary() == "READY 3/3 replicas http://h:1/v1"
    st.phase, st.replicas_ready = Phase.DEGRADED, 2
    assert st.summary() == "DEGRADED 2/3 replicas http://h:1/v1"
    loading = JobStatus(job_id="1", job_dir="/j", phase=Phase.LOADING_MODEL, replicas_ready=1, replicas_expected=3)
    assert loading.summary() == "LOADING_MODEL 1/3 replicas ready"
    assert JobStatus(job_id="1", job_dir="/j", phase=Phase.READY, url="u", healthy=True).summary() == "READY u"
