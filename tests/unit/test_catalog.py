"""Readers that answer truthfully: requeues, ended jobs, forgotten jobs, stray files; list and cleanup.

Slurm is replaced at the runner boundary (tests/unit/fake_slurm.py); the job directories are real.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from slurm_vllm import cli, slurm
from slurm_vllm import job as jobmod
from slurm_vllm.catalog import cleanup, list_jobs
from slurm_vllm.errors import EndpointNotReadyError, JobEndedError, JobFailedError
from slurm_vllm.job import Job, combine
from slurm_vllm.jobdir import EndpointRecord, JobDir, Phase, Run, write_json, write_state
from tests.unit.fake_slurm import FakeSlurm, fail, ok

US = slurm.SEP


def sq(jid: str, state: str, workdir: str, reason: str = "None", restarts: int = 0, comment: str = "slurm_vllm") -> str:
    return US.join([jid, state, reason, "vllm", "2", "n[1-2]", "1:00", "1:00:00", comment, str(restarts), workdir]) + "\n"


def sa(jid: str, state: str, workdir: str) -> str:
    return US.join([jid, state, "None", "vllm", "2", "n[1-2]", "00:01:00", "01:00:00", "0:0", workdir]) + "\n"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLURM_VLLM_POLL_INTERVAL", "0.01")
    monkeypatch.setattr(slurm, "POLLER", slurm.Poller(min_interval=0))
    monkeypatch.setattr(jobmod, "PROBE", lambda url, key: (True, ""))


def job_dir(jid: str, name: str | None = None) -> JobDir:
    root = Path(os.environ["SLURM_VLLM_HOME"]) / "jobs"
    jd = JobDir(root / (name or f"j{jid}")).create()
    write_json(jd.spec, {"model": {"name": "org/m", "served_name": "tiny"}})
    jd.job_id_file.write_text(jid + "\n")
    jd.write_secret(jd.api_key, "sekret")
    return jd


def serving(jd: JobDir, run: Run, url: str = "http://10.0.0.1:8000/v1") -> None:
    write_state(jd, run, Phase.READY)
    EndpointRecord(job_id=run.job_id, restart=run.restart or 0, base_url=url, model="tiny").write(jd.endpoint)


def run_cli(argv: list[str], fake: FakeSlurm, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with slurm.use_runner(fake):
        rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------------------------
# requeue
# --------------------------------------------------------------------------------------------


def test_requeued_and_running_again_ignores_the_previous_runs_ready_state() -> None:
    jd = job_dir("42")
    serving(jd, Run("42", 0))
    sj = slurm.parse_squeue(sq("42", "RUNNING", str(jd.path), restarts=1))[0]
    st = combine("42", jd, sj, jd.read_state(), jd.read_endpoint(), None, lambda u, k: (True, ""))
    assert st.phase is Phase.STARTING_RAY and st.url is None and st.restart == 1


def test_requeued_job_pending_says_requeued() -> None:
    jd = job_dir("42")
    serving(jd, Run("42", 0))
    sj = slurm.parse_squeue(sq("42", "PENDING", str(jd.path), reason="BeginTime", restarts=1))[0]
    st = combine("42", jd, sj, jd.read_state(), jd.read_endpoint(), None, lambda u, k: (True, ""))
    assert st.phase is Phase.PENDING and st.summary().startswith("PENDING (requeued;")


def test_requeued_job_still_completing_its_first_run_is_not_ended() -> None:
    jd = job_dir("42")
    write_state(jd, Run("42", 0), Phase.ENDED, reason="cancelled")
    sj = slurm.parse_squeue(sq("42", "COMPLETING", str(jd.path), restarts=1))[0]
    st = combine("42", jd, sj, jd.read_state(), None, None, lambda u, k: (True, ""))
    assert st.phase is Phase.PENDING and not st.final and "requeued" in st.reason


def test_requeued_job_reaches_ready_with_the_new_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    jd = job_dir("42")
    serving(jd, Run("42", 0), "http://old:1/v1")
    jd.archive_previous_run(Run("42", 1))
    serving(jd, Run("42", 1), "http://new:2/v1")
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "RUNNING", str(jd.path), restarts=1)))
    rc, out, _ = run_cli(["endpoint", "42"], fake, capsys)
    assert rc == 0 and out.strip() == "http://new:2/v1"


def test_endpoint_of_the_previous_run_is_not_handed_out(capsys: pytest.CaptureFixture[str]) -> None:
    jd = job_dir("42")
    serving(jd, Run("42", 0))
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "RUNNING", str(jd.path), restarts=1)))
    rc, out, err = run_cli(["endpoint", "42"], fake, capsys)
    assert rc == 1 and out == "" and "no endpoint yet" in err


def test_wait_through_a_requeue_does_not_stop_at_the_old_state(tmp_path: Path) -> None:
    jd = job_dir("42")
    write_state(jd, Run("42", 0), Phase.FAILED, reason="node lost")
    answers = [ok(["squeue"], sq("42", "PENDING", str(jd.path), reason="BeginTime", restarts=1))] * 2
    answers += [ok(["squeue"], sq("42", "RUNNING", str(jd.path), restarts=1))]
    fake = FakeSlurm(squeue=answers, sacct=ok(["sacct"], ""))
    polls = {"n": 0}

    def sleep(_: float) -> None:
        polls["n"] += 1
        if polls["n"] == 3:
            jd.archive_previous_run(Run("42", 1))
            serving(jd, Run("42", 1), "http://new:2/v1")

    seen: list[str] = []
    with slurm.use_runner(fake):
        ep = Job("42", jd).wait_ready(timeout=60, interval=0, sleep=sleep, on_progress=lambda s: seen.append(s.summary()))
    assert ep.base_url == "http://new:2/v1"
    assert seen[0].startswith("PENDING (requeued") and seen[-1] == "READY http://new:2/v1"


# --------------------------------------------------------------------------------------------
# ended and forgotten jobs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", [[], ["--env"], ["--json"]])
def test_endpoint_of_a_cancelled_job_exits_4_and_prints_no_key(form: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    jd = job_dir("42")
    serving(jd, Run("42", 0))
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "CANCELLED by 1000", str(jd.path))))
    rc, out, err = run_cli(["endpoint", "42", *form], fake, capsys)
    assert rc == 4 and out == "" and "sekret" not in err
    assert "ENDED" in err and "cancelled" in err


def test_job_endpoint_raises_typed_errors() -> None:
    jd = job_dir("42")
    serving(jd, Run("42", 0))
    with slurm.use_runner(FakeSlurm(squeue=ok(["squeue"], sq("42", "TIMEOUT", str(jd.path))))):
        with pytest.raises(JobEndedError) as ended:
            Job("42", jd).endpoint  # noqa: B018 - the property is the call under test
    assert ended.value.exit_code == 4 and isinstance(ended.value, JobFailedError)
    write_state(jd, Run("42", 0), Phase.FAILED, reason="vllm exited with code 1")
    with slurm.use_runner(FakeSlurm(squeue=ok(["squeue"], sq("42", "FAILED", str(jd.path))))):
        with pytest.raises(JobFailedError) as failed:
            Job("42", jd).endpoint  # noqa: B018
    assert not isinstance(failed.value, JobEndedError) and "vllm exited" in str(failed.value)


def test_endpoint_while_loading_is_not_ready() -> None:
    jd = job_dir("42")
    write_state(jd, Run("42", 0), Phase.LOADING_MODEL)
    with slurm.use_runner(FakeSlurm(squeue=ok(["squeue"], sq("42", "RUNNING", str(jd.path))))):
        with pytest.raises(EndpointNotReadyError):
            Job("42", jd).endpoint  # noqa: B018


def test_wait_on_a_job_slurm_has_forgotten_ends_after_a_grace(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(jobmod, "FORGOTTEN_GRACE", 0.3)
    jd = job_dir("42")
    write_state(jd, Run("42", 0), Phase.LOADING_MODEL)
    fake = FakeSlurm(squeue=ok(["squeue"], ""), sacct=ok(["sacct"], ""))
    t0 = time.monotonic()
    rc, _, err = run_cli(["wait", "42", "--timeout", "30", "--quiet"], fake, capsys)
    assert rc == 4 and time.monotonic() - t0 < 10
    assert "no record of job 42" in err


def test_stray_files_in_the_jobs_root_do_not_break_status_or_list(capsys: pytest.CaptureFixture[str]) -> None:
    jd = job_dir("42")
    root = jd.path.parent
    (root / "notes.txt").write_text("mine")
    (root / "empty-folder").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "job_id").write_text("\x00\x01")
    jd.state.write_text('{"job_id": "42", "pha')  # truncated
    jd.endpoint.write_text('{"job_id": "42"}')  # no base_url
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "RUNNING", str(jd.path))), sacct=ok(["sacct"], ""))
    rc, out, err = run_cli(["status", "42"], fake, capsys)
    assert rc == 0 and "STARTING_RAY" in out and err.count("warning:") == 2
    rc, out, _ = run_cli(["list", "--all"], fake, capsys)
    assert rc == 0 and "42" in out


# --------------------------------------------------------------------------------------------
# refused submissions leave nothing
# --------------------------------------------------------------------------------------------


def test_refused_submission_leaves_no_job_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeSlurm(sbatch=fail(["sbatch"], "sbatch: error: invalid partition specified: nope"))
    rc, _, err = run_cli(["submit", "org/m", "--partition", "nope"], fake, capsys)
    assert rc == 3 and "invalid partition" in err
    root = tmp_path / "home" / "jobs"
    assert root.is_dir() and list(root.iterdir()) == []


def test_submission_without_slurm_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def missing(argv: list[str]) -> slurm.Completed:
        raise FileNotFoundError(argv[0])

    explicit = tmp_path / "mine"
    explicit.mkdir()
    rc, _, err = run_cli(["submit", "org/m", "--job-dir", str(explicit)], FakeSlurm(sbatch=missing), capsys)
    assert rc == 3 and "command not found" in err
    assert explicit.is_dir() and list(explicit.iterdir()) == []  # the user's folder stays, empty


# --------------------------------------------------------------------------------------------
# list and cleanup
# --------------------------------------------------------------------------------------------


def test_list_is_built_on_status_and_shows_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    live = job_dir("50")
    serving(live, Run("50", 0))
    ended = job_dir("51")
    lines = sq("50", "RUNNING", str(live.path)) + sq("51", "COMPLETED", str(ended.path))
    lines += sq("52", "RUNNING", "/elsewhere", comment="(null)")  # not ours
    fake = FakeSlurm(squeue=ok(["squeue"], lines), sacct=ok(["sacct"], ""))
    rc, out, _ = run_cli(["list"], fake, capsys)
    assert rc == 0 and out.splitlines()[0].split("\t")[:4] == ["JOBID", "NAME", "MODEL", "PHASE"]
    rows = out.splitlines()[1:]
    assert len(rows) == 1 and rows[0].split("\t")[2:4] == ["tiny", "READY"]
    assert fake.count("squeue") == 1
    rc, out, _ = run_cli(["list", "--all", "--json"], fake, capsys)
    data = {r["job_id"]: r for r in json.loads(out)}
    assert data["51"]["phase"] == "ENDED" and data["50"]["url"] == "http://10.0.0.1:8000/v1"


def test_list_all_includes_ended_jobs_slurm_forgot(capsys: pytest.CaptureFixture[str]) -> None:
    old = job_dir("40")
    write_state(old, Run("40", 0), Phase.ENDED, reason="cancelled")
    fake = FakeSlurm(squeue=ok(["squeue"], ""), sacct=ok(["sacct"], sa("40", "CANCELLED by 0", str(old.path))))
    with slurm.use_runner(fake):
        rows = list_jobs(include_ended=True)
    assert [(r.job.job_id, r.status.phase.value, r.status.reason) for r in rows] == [("40", "ENDED", "cancelled")]


def test_cleanup_removes_only_ended_marked_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    live = job_dir("60")
    ended = job_dir("61")
    pending_by_hand = job_dir("62")
    pending_by_hand.job_id_file.unlink()  # rendered and sbatch'ed by hand; not started yet
    root = live.path.parent
    foreign = root / "users-own"
    foreign.mkdir()
    (foreign / "spec.json").write_text("{}")
    lines = sq("60", "RUNNING", str(live.path)) + sq("99", "PENDING", str(pending_by_hand.path))
    fake = FakeSlurm(squeue=ok(["squeue"], lines), sacct=ok(["sacct"], sa("61", "COMPLETED", str(ended.path))))
    rc, out, _ = run_cli(["cleanup", "--dry-run"], fake, capsys)
    assert rc == 0 and "would remove" in out and str(ended.path) in out and ended.path.exists()
    rc, out, _ = run_cli(["cleanup", "--older-than", "1"], fake, capsys)
    assert ended.path.exists()  # younger than a day
    with slurm.use_runner(fake):
        removed = cleanup()
    assert [r.path for r in removed] == [ended.path] and not ended.path.exists()
    assert live.path.exists() and pending_by_hand.path.exists() and (foreign / "spec.json").exists()
