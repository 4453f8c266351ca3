"""The timeline: marks in state.json under the run identity rules, their order, the durations,
the one-line summary, the table, Slurm's submit/start times and the ``timeline`` command."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from slurm_vllm import cli, slurm, timeline
from slurm_vllm.job import combine
from slurm_vllm.jobdir import JobDir, Mark, Phase, Run, StateRecord, add_marks, write_json, write_state
from slurm_vllm.timeline import (
    ALLOCATED,
    ENGINE_READY,
    FIRST_COMPLETION,
    JOINED,
    RAY_HEAD,
    STARTED,
    SUBMITTED,
    VLLM_STARTED,
    Moment,
)
from tests.unit.fake_slurm import FakeSlurm, fail, ok

US = slurm.SEP
T0 = 1_767_268_800.0  # 2026-01-01 12:00:00 UTC


@pytest.fixture
def jd(tmp_path: Path) -> JobDir:
    d = JobDir(tmp_path / "job").create()
    write_json(d.spec, {"model": {"name": "m"}})
    d.job_id_file.write_text("42\n")
    return d


RUN = Run("42")


def a_run(jd: JobDir, run: Run = RUN) -> StateRecord:
    """The marks a whole run of 2 nodes leaves, at T0 + the given seconds."""
    write_state(jd, run, Phase.STARTING_RAY, nodes_expected=2, marks=[Mark(name=ALLOCATED, at=T0 + 30)])
    add_marks(jd, run, Mark(name=SUBMITTED, at=T0), Mark(name=STARTED, at=T0 + 20))
    add_marks(jd, run, Mark(name=RAY_HEAD, at=T0 + 32))
    write_state(jd, run, Phase.STARTING_RAY, marks=timeline.joined_marks(1, 2, at=T0 + 33))
    write_state(jd, run, Phase.LOADING_MODEL, marks=timeline.joined_marks(2, 2, at=T0 + 36))
    add_marks(jd, run, Mark(name=VLLM_STARTED, at=T0 + 37))
    add_marks(jd, run, Mark(name=ENGINE_READY, at=T0 + 132))
    add_marks(jd, run, Mark(name=FIRST_COMPLETION, at=T0 + 132.5))
    record = write_state(jd, run, Phase.READY)
    # READY's own time is the clock's; pin it for the durations.
    record = record.model_copy(update={"phase_times": {**record.phase_times, "READY": T0 + 133}})
    record.write(jd.state)
    return record


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


def test_a_mark_keeps_the_time_it_was_first_reached(jd: JobDir) -> None:
    run = Run("42")
    write_state(jd, run, Phase.STARTING_RAY, marks=timeline.joined_marks(1, 3, at=T0))
    write_state(jd, run, Phase.STARTING_RAY, marks=timeline.joined_marks(3, 3, at=T0 + 5))  # a jump 1 -> 3
    write_state(jd, run, Phase.STARTING_RAY, marks=timeline.joined_marks(2, 3, at=T0 + 9))  # down and up again
    state = jd.read_state(run)
    assert state is not None
    assert [(m.detail, m.at) for m in state.timeline] == [("1/3", T0), ("2/3", T0 + 5), ("3/3", T0 + 5)]


def test_marks_keep_the_phase_and_need_the_runs_state(jd: JobDir) -> None:
    assert add_marks(jd, Run("42"), Mark(name=RAY_HEAD, at=T0)) is None  # nothing to add to yet
    write_state(jd, Run("42"), Phase.LOADING_MODEL)
    record = add_marks(jd, Run("42"), Mark(name=VLLM_STARTED, at=T0))
    assert record is not None and record.phase is Phase.LOADING_MODEL
    assert list(record.phase_times) == ["LOADING_MODEL"]


def test_a_requeued_run_starts_a_timeline_of_its_own(jd: JobDir) -> None:
    a_run(jd, Run("42", 0))
    assert add_marks(jd, Run("42", 1), Mark(name=RAY_HEAD, at=T0)) is None  # not the new run's record
    write_state(jd, Run("42", 1), Phase.STARTING_RAY, marks=[Mark(name=ALLOCATED, at=T0 + 999)])
    state = jd.read_state(Run("42", 1))
    assert state is not None and [m.name for m in state.timeline] == [ALLOCATED]


def test_marks_from_two_threads_are_all_kept(jd: JobDir) -> None:
    run = Run("42")
    write_state(jd, run, Phase.STARTING_RAY)
    threads = [threading.Thread(target=add_marks, args=(jd, run, Mark(name=f"m{i}", at=T0 + i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = jd.read_state(run)
    assert state is not None and {m.name for m in state.timeline} == {f"m{i}" for i in range(8)}


def test_a_state_file_of_an_older_writer_reads_with_an_empty_timeline(jd: JobDir) -> None:
    jd.state.write_text(json.dumps({"job_id": "42", "phase": "READY", "phase_times": {"READY": T0}}))
    state = jd.read_state(Run("42"))
    assert state is not None and state.timeline == []
    assert [m.name for m in timeline.build(state)] == ["READY"]


# --------------------------------------------------------------------------------------------
# order, durations, one line, table
# --------------------------------------------------------------------------------------------


def test_the_moments_come_in_the_order_of_a_run(jd: JobDir) -> None:
    moments = timeline.build(a_run(jd))
    assert [(m.name, m.detail) for m in moments] == [
        (SUBMITTED, ""), (STARTED, ""), (ALLOCATED, ""), (RAY_HEAD, ""), (JOINED, "1/2"), (JOINED, "2/2"),
        (VLLM_STARTED, ""), (ENGINE_READY, ""), (FIRST_COMPLETION, ""), ("READY", "")]


def test_order_is_the_runs_even_when_clocks_disagree() -> None:
    state = StateRecord(job_id="1", phase=Phase.READY, timeline=[
        Mark(name=ALLOCATED, at=T0 + 10), Mark(name=STARTED, at=T0 + 11)])  # the controller runs 1 s ahead
    moments = timeline.build(state)
    assert [m.name for m in moments] == [STARTED, ALLOCATED]
    assert timeline.durations(moments)["setup"] == 0.0  # a skew never shows as a negative stretch


def test_the_head_s_moments_are_in_time_order_where_they_overlap() -> None:
    """The pre-flight's verdict is reached while Ray forms: it shows where it happened."""
    state = StateRecord(job_id="1", phase=Phase.READY, timeline=[
        Mark(name=ALLOCATED, at=T0), Mark(name=RAY_HEAD, at=T0 + 3),
        Mark(name=timeline.PREFLIGHT, at=T0 + 4), Mark(name=JOINED, at=T0 + 5, detail="2/2")])
    assert [m.name for m in timeline.build(state)] == [ALLOCATED, RAY_HEAD, timeline.PREFLIGHT, JOINED]


def test_durations_of_a_whole_run(jd: JobDir) -> None:
    spans = timeline.durations(timeline.build(a_run(jd)))
    assert spans == {"queued": 20.0, "setup": 10.0, "ray": 6.0, "loading": 95.0, "first_completion": 0.5,
                     "total": 133.0}
    assert timeline.one_line(spans) == "queued 20s, setup 10s, Ray 6.0s, loading 95s, first token 0.5s; total 2m13s"


def test_durations_only_for_stretches_whose_ends_are_known() -> None:
    moments = [Moment(ALLOCATED, T0), Moment(JOINED, T0 + 3, "1/2")]
    assert timeline.durations(moments) == {}
    assert timeline.one_line({}) == ""
    moments.append(Moment(JOINED, T0 + 4, "2/2"))
    assert timeline.durations(moments) == {"ray": 4.0}


def test_seconds_text() -> None:
    assert [timeline.seconds_text(s) for s in (0.44, 12.4, 125, 3725)] == ["0.4s", "12s", "2m05s", "1h02m"]


def test_a_failed_first_completion_is_shown_as_failed() -> None:
    m = Moment(FIRST_COMPLETION, T0, "HTTP 400: this model does not support completions", ok=False)
    assert m.label == "first completion failed: HTTP 400: this model does not support completions"
    assert m.to_dict()["ok"] is False and m.to_dict()["label"] == m.label


def test_the_table_names_each_moment_and_its_step(jd: JobDir) -> None:
    moments = timeline.build(a_run(jd))
    rows = timeline.rows(moments)
    assert rows[0][0] == "submitted (Slurm)" and rows[0][2:] == ("+0.0s", "")
    assert rows[5][0] == "nodes 2/2 joined" and rows[5][3] == "3.0s"
    assert rows[7][0] == "engine ready: /health answers" and rows[7][2:] == ("+2m12s", "95s")
    text = timeline.render_table(moments, title="job 42")
    assert "job 42" in text and "vLLM started: loading weights" in text and "\x1b[" not in text
    for label, _clock, since, step in rows:
        assert label in text and since in text and step in text


def test_json_round_trip_and_merge_with_slurm_times() -> None:
    moments = [Moment(ALLOCATED, T0 + 30), Moment("READY", T0 + 90)]
    back = timeline.from_dicts([m.to_dict() for m in moments] + [{"name": "broken"}])
    assert back == moments
    merged = timeline.merge(back, {SUBMITTED: T0, STARTED: None, ALLOCATED: T0 + 99})
    assert [(m.name, m.at) for m in merged] == [(SUBMITTED, T0), (ALLOCATED, T0 + 30), ("READY", T0 + 90)]


# --------------------------------------------------------------------------------------------
# status carries it
# --------------------------------------------------------------------------------------------


def test_status_carries_the_current_runs_timeline_only(jd: JobDir) -> None:
    a_run(jd, Run("42", 0))
    sjob = slurm.SlurmJob("42", slurm.parse_state("RUNNING"), restarts=0)
    st = combine("42", jd, sjob, jd.read_state(), None, None, lambda u, k: (True, ""))
    assert st.durations["total"] == 133.0 and st.timeline[0]["name"] == SUBMITTED
    assert json.loads(json.dumps(st.to_dict()))["durations"]["ray"] == 6.0
    requeued = slurm.SlurmJob("42", slurm.parse_state("RUNNING"), restarts=1)
    st = combine("42", jd, requeued, jd.read_state(), None, None, lambda u, k: (True, ""))
    assert st.timeline == [] and st.durations == {}


# --------------------------------------------------------------------------------------------
# Slurm's submit and start times
# --------------------------------------------------------------------------------------------


def test_job_times_from_squeue_then_sacct() -> None:
    fake = FakeSlurm(squeue=ok(["squeue"], US.join(["42", "RUNNING", "2026-01-01T12:00:00", "2026-01-01T12:00:20"])
                                + "\n"))
    with slurm.use_runner(fake):
        times = slurm.job_times("42")
    assert times.queue_wait == 20.0 and times.submitted == slurm.parse_slurm_time("2026-01-01T12:00:00")
    assert any(a.startswith("--Format=JobID:0") and "SubmitTime" in a for a in fake.calls[0])
    gone = FakeSlurm(squeue=fail(["squeue"], "slurm_load_jobs error: Invalid job id specified"),
                     sacct=ok(["sacct"], US.join(["42", "COMPLETED", "2026-01-01T12:00:00", "2026-01-01T12:05:00"])
                              + "\n" + US.join(["42.batch", "COMPLETED", "2026-01-01T12:00:00", "Unknown"]) + "\n"))
    with slurm.use_runner(gone):
        assert slurm.job_times("42").queue_wait == 300.0


def test_a_pending_jobs_start_time_is_only_an_estimate() -> None:
    fake = FakeSlurm(squeue=ok(["squeue"], US.join(["42", "PENDING", "2026-01-01T12:00:00", "2026-01-01T13:00:00"])))
    with slurm.use_runner(fake):
        times = slurm.job_times("42")
    assert times.started is None and times.queue_wait is None and times.submitted is not None


def test_slurm_times_that_are_not_dates() -> None:
    assert slurm.parse_slurm_time("Unknown") is None and slurm.parse_slurm_time("N/A") is None
    assert slurm.parse_slurm_time(" 2026-01-01T12:00:00 ") is not None


def test_slurm_commands_print_dates_in_iso_whatever_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run(argv, **kwargs):
        seen.update(kwargs["env"])
        raise FileNotFoundError(argv[0])

    monkeypatch.setenv("SLURM_TIME_FORMAT", "%d/%m %H:%M")
    monkeypatch.setattr(slurm.subprocess, "run", fake_run)
    with pytest.raises(FileNotFoundError):
        slurm._subprocess_runner(["squeue"], 1.0)
    assert seen["SLURM_TIME_FORMAT"] == "standard"


# --------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(slurm, "POLLER", slurm.Poller(min_interval=0))
    from slurm_vllm import job as jobmod

    monkeypatch.setattr(jobmod, "PROBE", lambda url, key: (True, ""))


def sq(jd: JobDir, state: str = "RUNNING") -> str:
    return US.join(["42", state, "None", "vllm", "2", "n[1-2]", "1:00", "1:00:00", "slurm_vllm", "0", str(jd.path)]) + "\n"


def test_timeline_command_prints_the_table_and_the_line(jd: JobDir, cli_env: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    a_run(jd)
    write_json(jd.endpoint, {"base_url": "http://10.0.0.5:8001/v1", "model": "m", "job_id": "42"})
    with slurm.use_runner(FakeSlurm(squeue=ok(["squeue"], sq(jd)))):
        rc = cli.main(["timeline", str(jd.path)])
    out = capsys.readouterr().out
    assert rc == 0 and "nodes 2/2 joined" in out and "first completion" in out
    assert out.rstrip().endswith("time to ready: queued 20s, setup 10s, Ray 6.0s, loading 95s, first token 0.5s; "
                                 "total 2m13s")


def test_timeline_json_asks_slurm_when_the_head_could_not(jd: JobDir, cli_env: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    write_state(jd, Run("42"), Phase.STARTING_RAY, marks=[Mark(name=ALLOCATED, at=T0 + 30)])
    times = US.join(["42", "RUNNING", "2026-01-01T12:00:00", "2026-01-01T12:00:20"]) + "\n"
    fake = FakeSlurm(squeue=lambda argv: ok(argv, times if any("SubmitTime" in a for a in argv) else sq(jd)))
    with slurm.use_runner(fake):
        rc = cli.main(["timeline", str(jd.path), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["phase"] == "STARTING_RAY"
    assert [m["name"] for m in data["timeline"]] == [SUBMITTED, STARTED, ALLOCATED]
    assert data["durations"]["queued"] == 20.0


def test_status_shows_the_durations_in_one_line(jd: JobDir, cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    a_run(jd)
    write_json(jd.endpoint, {"base_url": "http://10.0.0.5:8001/v1", "model": "m", "job_id": "42"})
    with slurm.use_runner(FakeSlurm(squeue=ok(["squeue"], sq(jd)))):
        rc = cli.main(["status", str(jd.path)])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and lines[0] == "42\tREADY http://10.0.0.5:8001/v1"
    assert lines[1] == "  time to ready: queued 20s, setup 10s, Ray 6.0s, loading 95s, first token 0.5s; total 2m13s"


def test_wait_ends_with_the_durations_on_stderr(jd: JobDir, cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    a_run(jd)
    write_json(jd.endpoint, {"base_url": "http://10.0.0.5:8001/v1", "model": "m", "job_id": "42"})
    with slurm.use_runner(FakeSlurm(squeue=ok(["squeue"], sq(jd)))):
        rc = cli.main(["wait", str(jd.path), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith("READY http://10.0.0.5:8001/v1")
    assert "time to ready: queued 20s" in err and "time to ready" not in out


def test_staging_has_its_own_stretch_before_ray() -> None:
    marks = [Mark(name=timeline.ALLOCATED, at=10.0), Mark(name=timeline.STAGING, at=11.0),
             Mark(name=timeline.STAGED, at=41.0, detail="reused"), Mark(name=timeline.JOINED, at=45.0, detail="2/2")]
    state = StateRecord(job_id="1", phase=Phase.STARTING_RAY, timeline=marks)
    moments = timeline.build(state)
    assert [m.name for m in moments] == [timeline.ALLOCATED, timeline.STAGING, timeline.STAGED, timeline.JOINED]
    assert moments[2].label == "weights staged (reused)"
    spans = timeline.durations(moments)
    assert spans["staging"] == 30.0 and spans["ray"] == 4.0
    assert timeline.one_line(spans).startswith("staging 30s, Ray 4.0s")
