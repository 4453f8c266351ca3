"""The job-directory protocol: records, tolerant readers, the run identity, creation and undo."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from pathlib import Path

import pytest

from slurm_vllm.errors import SpecError
from slurm_vllm.jobdir import (
    MARKER,
    EndpointRecord,
    HeadRecord,
    JobDir,
    JobDirError,
    Phase,
    ReplicaRecord,
    Run,
    StateRecord,
    create_job_dir,
    is_current,
    write_state,
)
from slurm_vllm.render import prepare_job
from slurm_vllm.spec import ServeSpec


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------------------------
# phases and the run identity
# --------------------------------------------------------------------------------------------


def test_phase_final_and_serving() -> None:
    assert {p for p in Phase if p.final} == {Phase.ENDED, Phase.FAILED}
    assert {p for p in Phase if p.serving} == {Phase.READY, Phase.DEGRADED}
    assert Phase("READY") == "READY" and str(Phase.PENDING) == "PENDING"


def test_run_from_slurm_environment() -> None:
    assert Run.from_env({"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "2"}) == Run("12", 2)
    assert Run.from_env({"SLURM_JOB_ID": "12"}) == Run("12", 0)
    assert Run.from_env({"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "x"}) == Run("12", 0)
    assert Run.from_env({}) is None
    assert str(Run("12", 0)) == "12" and str(Run("12", 3)) == "12 (attempt 3)"


@pytest.mark.parametrize(
    "record_run,reader_run,current",
    [
        (("42", 0), Run("42", 0), True),
        (("42", 1), Run("42", 1), True),
        (("42", 0), Run("42", 1), False),  # the previous attempt of a requeued job
        (("41", 0), Run("42", 0), False),  # another job that used the directory
        (("42", 3), Run("42", None), True),  # the reader cannot know the attempt
        (("42", 0), None, False),  # never submitted: nothing is current
    ],
)
def test_is_current_is_the_one_rule(record_run: tuple[str, int], reader_run: Run | None, current: bool) -> None:
    rec = StateRecord(job_id=record_run[0], restart=record_run[1], phase=Phase.READY)
    assert is_current(rec, reader_run) is current
    assert is_current(None, Run("42")) is False


# --------------------------------------------------------------------------------------------
# readers that cannot be fooled
# --------------------------------------------------------------------------------------------


@pytest.fixture
def jd(tmp_path: Path) -> JobDir:
    return JobDir(tmp_path / "job").create()


def test_records_round_trip(jd: JobDir) -> None:
    run = Run("7", 1)
    write_state(jd, run, Phase.STARTING_RAY, nodes_joined=1, nodes_expected=2)
    st = write_state(jd, run, Phase.READY)
    assert st.nodes_joined == 1 and set(st.phase_times) == {"STARTING_RAY", "READY"}
    assert jd.read_state(run) == st and json.loads(jd.state.read_text())["restart"] == 1
    ep = EndpointRecord(job_id="7", restart=1, base_url="http://h:1/v1", model="m")
    ep.write(jd.endpoint, mode=0o600)
    assert jd.read_endpoint(run) == ep and mode(jd.endpoint) == 0o600
    head = HeadRecord(job_id="7", restart=1, ip="10.0.0.1", gcs_port=20000)
    head.write(jd.head)
    assert jd.read_head(run) == head and jd.read_head(Run("7", 0)) is None


@pytest.mark.parametrize(
    "text",
    [
        '{"job_id": "7", "phase": "REA',  # truncated mid-write by a foreign tool
        "",  # empty
        "not json at all",
        "[1, 2, 3]",  # JSON, not a record
        '{"phase": "READY"}',  # no run
        '{"job_id": "7", "phase": "DANCING"}',  # a phase this tool never writes
        '{"job_id": {"x": 1}, "phase": "READY"}',
    ],
)
def test_state_reader_treats_bad_files_as_absent_with_one_warning(jd: JobDir, text: str, caplog: pytest.LogCaptureFixture) -> None:
    jd.state.write_text(text)
    with caplog.at_level(logging.WARNING, logger="slurm_vllm"):
        assert jd.read_state() is None
        assert jd.read_state() is None  # asked again: no second warning for the same file
    assert len(caplog.records) == 1 and str(jd.state) in caplog.records[0].getMessage()


def test_missing_files_are_absent_silently(jd: JobDir, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="slurm_vllm"):
        assert jd.read_state() is None and jd.read_endpoint() is None and jd.read_head() is None
    assert not caplog.records


def test_endpoint_without_base_url_is_absent(jd: JobDir) -> None:
    jd.endpoint.write_text(json.dumps({"job_id": "7", "model": "m"}))
    assert jd.read_endpoint() is None


def test_unknown_keys_from_a_newer_writer_are_ignored(jd: JobDir) -> None:
    jd.state.write_text(json.dumps({"job_id": "7", "phase": "DEGRADED", "replicas": [{"index": 0}]}))
    st = jd.read_state(Run("7"))
    assert st is not None and st.phase is Phase.DEGRADED


def test_write_state_does_not_merge_into_another_runs_file(jd: JobDir) -> None:
    write_state(jd, Run("7", 0), Phase.READY, reason="old", nodes_joined=3)
    st = write_state(jd, Run("7", 1), Phase.STARTING_RAY)
    assert (st.restart, st.reason, st.nodes_joined) == (1, "", None)


def test_previous_attempt_records_are_kept_beside_its_logs(jd: JobDir) -> None:
    write_state(jd, Run("7", 0), Phase.READY)
    EndpointRecord(job_id="7", restart=0, base_url="http://old:1/v1").write(jd.endpoint)
    HeadRecord(job_id="7", restart=0, ip="10.0.0.1", gcs_port=1).write(jd.head)
    moved = jd.archive_previous_run(Run("7", 1))
    assert sorted(p.name for p in moved) == ["endpoint.json", "head.json", "state.json"]
    assert not jd.state.exists() and not jd.endpoint.exists()
    kept = StateRecord.read(jd.attempt_logs(0) / "state.json")
    assert kept is not None and kept.restart == 0 and kept.phase is Phase.READY
    # the second requeue keeps the first requeue's records apart from the first run's
    write_state(jd, Run("7", 1), Phase.FAILED, reason="node lost")
    jd.archive_previous_run(Run("7", 2))
    assert (jd.logs / "attempt-1" / "state.json").exists() and (jd.logs / "state.json").exists()
    assert jd.attempts == [0, 1]
    assert jd.archive_previous_run(Run("7", 2)) == []  # nothing left of another run


def test_current_runs_records_stay_in_place(jd: JobDir) -> None:
    write_state(jd, Run("7", 1), Phase.LOADING_MODEL)
    assert jd.archive_previous_run(Run("7", 1)) == []
    assert jd.read_state(Run("7", 1)) is not None


def test_job_id_file_reader_ignores_junk(jd: JobDir) -> None:
    jd.job_id_file.write_text("garbage\n")
    assert jd.read_job_id() is None
    jd.job_id_file.write_text("123\n")
    assert jd.read_job_id() == "123"


# --------------------------------------------------------------------------------------------
# creation
# --------------------------------------------------------------------------------------------


def test_jobs_root_and_job_dirs_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "home"))
    jd = prepare_job(ServeSpec("org/M"))
    assert mode(tmp_path / "home") == 0o700 and mode(tmp_path / "home" / "jobs") == 0o700
    assert mode(jd.path) == 0o700 and jd.is_ours and mode(jd.marker) == 0o600


def test_sixteen_concurrent_prepares_get_sixteen_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "home"))
    import datetime as dt

    now = dt.datetime(2026, 1, 2, 3, 4, 5)  # the same second for all of them
    spec = ServeSpec("org/M", job_name="same")
    results: list[JobDir] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def one() -> None:
        try:
            barrier.wait()
            results.append(prepare_job(spec, now=now))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({jd.path for jd in results}) == 16
    tokens = {jd.read_secret(jd.ray_token) for jd in results}
    assert len(tokens) == 16  # nobody's token was overwritten by another's
    for jd in results:
        assert json.loads(jd.spec.read_text())["job_dir"] == str(jd.path)


def test_job_dir_on_a_foreign_non_empty_directory_is_refused_untouched(tmp_path: Path) -> None:
    shared = tmp_path / "group"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    (shared / "job.sbatch").write_text("mine")
    (shared / "notes.txt").write_text("keep")
    with pytest.raises(SpecError) as info:
        prepare_job(ServeSpec("org/M", job_dir=str(shared)))
    msg = str(info.value)
    assert str(shared) in msg and "--job-dir" in msg and "notes.txt" in msg
    assert mode(shared) == 0o2775
    assert sorted(p.name for p in shared.iterdir()) == ["job.sbatch", "notes.txt"]
    assert (shared / "job.sbatch").read_text() == "mine"


def test_job_dir_on_home_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "alice"
    home.mkdir(mode=0o755)
    (home / ".bashrc").write_text("")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(SpecError):
        prepare_job(ServeSpec("org/M", job_dir="~"))
    assert mode(home) == 0o755


def test_empty_existing_directory_is_used_without_changing_its_mode(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    os.chmod(d, 0o750)
    jd = prepare_job(ServeSpec("org/M", job_dir=str(d)))
    assert jd.path == d and mode(d) == 0o750 and jd.is_ours
    assert mode(jd.api_key) == 0o600 and mode(jd.ray_token) == 0o600


def test_a_directory_this_tool_made_may_be_reused_and_keeps_the_old_files(tmp_path: Path) -> None:
    d = tmp_path / "reuse"
    first = prepare_job(ServeSpec("org/M", job_dir=str(d)))
    first.job_id_file.write_text("31\n")
    old_token = first.read_secret(first.ray_token)
    second = prepare_job(ServeSpec("org/M", job_dir=str(d)))
    assert second.read_secret(second.ray_token) != old_token
    assert (d / "previous" / "31" / "ray_token").read_text().strip() == old_token
    assert not second.job_id_file.exists()


def test_a_file_is_not_a_job_dir(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(JobDirError):
        create_job_dir(f, "n")


def test_undo_removes_a_made_folder_and_only_our_files_otherwise(tmp_path: Path) -> None:
    made = create_job_dir(tmp_path / "new", "n")
    made.undo()
    assert not (tmp_path / "new").exists()
    d = tmp_path / "users"
    d.mkdir()
    kept = create_job_dir(d, "n")
    (d / "spec.json").write_text("{}")
    kept.undo()
    assert d.is_dir() and list(d.iterdir()) == []


def test_remove_refuses_an_unmarked_directory(tmp_path: Path) -> None:
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "spec.json").write_text("{}")
    JobDir(d).remove()
    assert (d / "spec.json").exists()
    assert not (d / MARKER).exists()


def test_replica_records_of_a_previous_run_are_kept_aside_and_never_read(jd: JobDir) -> None:
    ReplicaRecord(job_id="7", restart=0, index=1, url="http://old:1/v1", phase="ready").write(jd.replica(1))
    assert jd.read_replica(1, Run("7", 1)) is None
    moved = jd.archive_previous_run(Run("7", 1))
    assert jd.attempt_logs(0) / "replica-1.json" in moved and not jd.replica(1).exists()
    ReplicaRecord(job_id="7", restart=1, index=1, url="http://new:1/v1").write(jd.replica(1))
    rec = jd.read_replica(1, Run("7", 1))
    assert rec is not None and rec.url == "http://new:1/v1" and rec.phase == "starting"
