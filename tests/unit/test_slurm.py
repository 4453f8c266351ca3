"""The Slurm runner, parsers, state table, pending reasons, poller and the no-duplicate sbatch retry."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_vllm import slurm
from slurm_vllm.errors import SlurmCommandError
from slurm_vllm.slurm import Category, ReasonKind, parse_reason, parse_state
from tests.unit.fake_slurm import FIXTURES, FakeSlurm, fail, fixture, ok, timeout_exc

# --------------------------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------------------------


def test_run_passes_argv_list_and_timeout() -> None:
    fake = FakeSlurm(squeue=ok(["squeue"], "x"))
    with slurm.use_runner(fake):
        done = slurm.run(["squeue", "--me"], timeout=7)
    assert done.stdout == "x"
    assert fake.calls == [["squeue", "--me"]]


def test_run_failure_keeps_stderr_and_argv() -> None:
    fake = FakeSlurm(sbatch=fail(["sbatch"], "sbatch: error: invalid partition specified: nope\n"))
    with slurm.use_runner(fake), pytest.raises(SlurmCommandError) as ei:
        slurm.run(["sbatch", "x.sbatch"])
    assert ei.value.returncode == 1
    assert ei.value.stderr == "sbatch: error: invalid partition specified: nope"
    assert ei.value.argv == ["sbatch", "x.sbatch"]
    assert ei.value.exit_code == 3


def test_run_timeout_is_a_typed_error() -> None:
    fake = FakeSlurm(squeue=timeout_exc(["squeue"]))
    with slurm.use_runner(fake), pytest.raises(SlurmCommandError) as ei:
        slurm.run(["squeue"], timeout=1)
    assert ei.value.returncode is None
    assert slurm.is_transient(ei.value)


def test_run_missing_command() -> None:
    with pytest.raises(SlurmCommandError) as ei:
        slurm.run(["definitely-not-a-slurm-command-xyz"], timeout=5)
    assert ei.value.returncode == 127
    assert "not found" in ei.value.stderr


def test_real_subprocess_runner_with_a_real_program() -> None:
    done = slurm.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], check=False, timeout=10)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_real_subprocess_runner_times_out() -> None:
    with pytest.raises(SlurmCommandError) as ei:
        slurm.run(["/bin/sleep", "5"], timeout=0.2)
    assert ei.value.returncode is None


@pytest.mark.parametrize(
    "stderr,transient",
    [
        ("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", True),
        ("sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying", True),
        ("squeue: error: Unable to contact slurm controller (connect failure)", True),
        ("sbatch: error: Batch job submission failed: Invalid partition name specified", False),
        ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified", False),
        ("sbatch: error: Batch job submission failed: Requested node configuration is not available", False),
    ],
)
def test_transient_classification(stderr: str, transient: bool) -> None:
    assert slurm.is_transient(SlurmCommandError(["sbatch"], 1, stderr)) is transient


# --------------------------------------------------------------------------------------------
# state table
# --------------------------------------------------------------------------------------------

ALL_STATES = {
    "PENDING": Category.PENDING, "CONFIGURING": Category.PENDING, "REQUEUED": Category.PENDING,
    "REQUEUE_FED": Category.PENDING, "REQUEUE_HOLD": Category.PENDING, "RESV_DEL_HOLD": Category.PENDING,
    "RUNNING": Category.RUNNING, "RESIZING": Category.RUNNING, "SIGNALING": Category.RUNNING,
    "SUSPENDED": Category.SUSPENDED, "STOPPED": Category.SUSPENDED,
    "COMPLETING": Category.ENDING, "STAGE_OUT": Category.ENDING,
    "COMPLETED": Category.COMPLETED, "CANCELLED": Category.CANCELLED, "REVOKED": Category.CANCELLED,
    "TIMEOUT": Category.TIMEOUT, "FAILED": Category.FAILED, "NODE_FAIL": Category.FAILED,
    "BOOT_FAIL": Category.FAILED, "OUT_OF_MEMORY": Category.FAILED, "PREEMPTED": Category.FAILED,
    "DEADLINE": Category.FAILED, "SPECIAL_EXIT": Category.FAILED,
}


@pytest.mark.parametrize("name,category", sorted(ALL_STATES.items()))
def test_every_documented_state_has_a_category(name: str, category: Category) -> None:
    st = parse_state(name)
    assert st.category is category
    assert st.name == name
    assert st.meaning


def test_short_codes_map_to_the_same_states() -> None:
    for code, name in slurm.SHORT_CODES.items():
        assert parse_state(code).name == name
        assert parse_state(code).category is ALL_STATES.get(name, slurm.STATE_TABLE[name][0])


def test_cancelled_by_uid_keeps_the_detail() -> None:
    st = parse_state("CANCELLED by 1234")
    assert (st.name, st.category, st.detail) == ("CANCELLED", Category.CANCELLED, "by 1234")
    assert st.category.final


@pytest.mark.parametrize("raw", ["", None, "   ", "WIBBLE", "FUTURE_STATE_X", "cancelled+", "+", "by 12"])
def test_unknown_or_odd_states_never_raise(raw: str | None) -> None:
    st = parse_state(raw)
    assert isinstance(st.category, Category)


def test_unknown_state_is_unknown_and_kept() -> None:
    st = parse_state("QUANTUM_TUNNELLING")
    assert st.category is Category.UNKNOWN
    assert "QUANTUM_TUNNELLING" in st.meaning
    assert not st.category.final


def test_sacct_truncation_and_flag_forms() -> None:
    assert parse_state("CANCELLED+").category is Category.CANCELLED
    assert parse_state("RUNNING+COMPLETING").category is Category.RUNNING
    assert parse_state("out_of_memory").category is Category.FAILED


def test_final_and_active_flags() -> None:
    assert {c for c in Category if c.final} == {Category.COMPLETED, Category.CANCELLED, Category.TIMEOUT, Category.FAILED}
    assert Category.RUNNING.active and not Category.PENDING.active


# --------------------------------------------------------------------------------------------
# pending reasons
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,kind",
    [
        ("Resources", ReasonKind.WAITING),
        ("Priority", ReasonKind.WAITING),
        ("None", ReasonKind.WAITING),
        ("(null)", ReasonKind.WAITING),
        ("", ReasonKind.WAITING),
        ("ReqNodeNotAvail, UnavailableNodes:node[1-2]", ReasonKind.WAITING),
        ("AssocGrpGRES", ReasonKind.WAITING),
        ("QOSMaxJobsPerUserLimit", ReasonKind.WAITING),
        ("PartitionDown", ReasonKind.WAITING),
        ("InvalidAccount", ReasonKind.BLOCKED),
        ("InvalidQOS", ReasonKind.BLOCKED),
        ("PartitionNodeLimit", ReasonKind.BLOCKED),
        ("PartitionTimeLimit", ReasonKind.BLOCKED),
        ("BadConstraints", ReasonKind.BLOCKED),
        ("AccountNotAllowed", ReasonKind.BLOCKED),
        ("QOSNotAllowed", ReasonKind.BLOCKED),
        ("DependencyNeverSatisfied", ReasonKind.BLOCKED),
        ("AssocMaxWallDurationPerJobLimit", ReasonKind.BLOCKED),
        ("AssocMaxNodePerJobLimit", ReasonKind.BLOCKED),
        ("QOSMaxGRESPerJob", ReasonKind.BLOCKED),
        ("QOSMaxCpuPerJobLimit", ReasonKind.BLOCKED),
        ("QOSMinGRES", ReasonKind.BLOCKED),
        ("AssocGrpCPUMinutesLimit", ReasonKind.BLOCKED),
        ("AssocGrpCPURunMinutesLimit", ReasonKind.WAITING),
        ("JobHeldUser", ReasonKind.HELD),
        ("JobHeldAdmin", ReasonKind.HELD),
        ("launch failed requeued held", ReasonKind.HELD),
        ("SomethingNew", ReasonKind.WAITING),
    ],
)
def test_pending_reasons(raw: str, kind: ReasonKind) -> None:
    r = parse_reason(raw)
    assert r.kind is kind, (raw, r)
    assert str(r)


def test_blocked_reason_says_why() -> None:
    r = parse_reason("InvalidAccount")
    assert r.blocked and "account" in r.hint


# --------------------------------------------------------------------------------------------
# parsers on recorded and synthetic output
# --------------------------------------------------------------------------------------------


def test_parse_squeue_synthetic_line_with_hostile_name_and_path() -> None:
    line = slurm.SEP.join(["42", "PENDING", "Resources", "my job | x", "2", "", "0:00", "1:00:00", "slurm_vllm", "0", "/tmp/a b|c"])
    (job,) = slurm.parse_squeue(line + "\n")
    assert job.job_id == "42" and job.name == "my job | x" and job.workdir == "/tmp/a b|c"
    assert job.reason is not None and job.reason.code == "Resources"
    assert job.nodes == 2 and job.comment == "slurm_vllm"


def test_parse_squeue_skips_foreign_lines() -> None:
    assert slurm.parse_squeue("squeue: warning: something\n\n") == []


def test_parse_sacct_drops_steps() -> None:
    f = slurm.SACCT_FIELDS
    rows = [
        slurm.SEP.join(["7", "FAILED", "None", "n", "1", "node1", "00:00:03", "00:10:00", "1:0", "/w"]),
        slurm.SEP.join(["7.batch", "FAILED", "", "batch", "1", "node1", "00:00:03", "", "1:0", ""]),
    ]
    jobs = slurm.parse_sacct("\n".join(rows))
    assert len(f) == 10 and [j.job_id for j in jobs] == ["7"]
    assert jobs[0].exit_code == "1:0" and jobs[0].source == "sacct"


SYNTHETIC_SACCT = "sacct_synthetic_states.txt"


def test_synthetic_sacct_states_for_what_the_lab_cannot_produce() -> None:
    jobs = {j.job_id: j for j in slurm.parse_sacct(fixture(SYNTHETIC_SACCT))}
    expect = {
        "9001": ("NODE_FAIL", Category.FAILED),
        "9002": ("OUT_OF_MEMORY", Category.FAILED),
        "9003": ("PREEMPTED", Category.FAILED),
        "9004": ("REQUEUED", Category.PENDING),
        "9005": ("CANCELLED", Category.CANCELLED),
        "9006": ("BRAND_NEW_STATE", Category.UNKNOWN),
        "9007": ("TIMEOUT", Category.TIMEOUT),
        "9008": ("BOOT_FAIL", Category.FAILED),
        "9009": ("DEADLINE", Category.FAILED),
    }
    assert set(jobs) == set(expect)
    for jid, (name, cat) in expect.items():
        assert (jobs[jid].state.name, jobs[jid].category) == (name, cat), jid
    assert jobs["9005"].state.detail == "by 1000"


def _recorded(prefix: str) -> list[Path]:
    return sorted(FIXTURES.glob(prefix + "*.txt"))


@pytest.mark.parametrize("path", _recorded("squeue_lab"), ids=lambda p: p.name)
def test_recorded_squeue_parses_completely(path: Path) -> None:
    text = fixture(path.name)
    lines = [line for line in text.splitlines() if line.strip()]
    jobs = slurm.parse_squeue(text)
    assert len(jobs) == len(lines)
    for j in jobs:
        assert j.job_id.isdigit()
        assert j.state.category is not Category.UNKNOWN, j.state.raw
        if j.category is Category.PENDING:
            assert j.reason is not None


@pytest.mark.parametrize("path", _recorded("sacct_lab"), ids=lambda p: p.name)
def test_recorded_sacct_parses_completely(path: Path) -> None:
    text = fixture(path.name)
    jobs = slurm.parse_sacct(text)
    assert jobs
    for j in jobs:
        assert "." not in j.job_id
        assert j.state.category is not Category.UNKNOWN, j.state.raw


# --------------------------------------------------------------------------------------------
# the poller: one call for many jobs, rate-limited
# --------------------------------------------------------------------------------------------


def _squeue_lines(ids: list[str], state: str = "RUNNING") -> str:
    return "".join(
        slurm.SEP.join([i, state, "None", "vllm", "2", "n[1-2]", "1:00", "1:00:00", "slurm_vllm", "0", f"/jobs/{i}"]) + "\n"
        for i in ids
    )


def test_poller_one_squeue_call_for_many_jobs_and_one_sacct_for_the_rest() -> None:
    running = [str(i) for i in range(100, 150)]
    gone = ["7", "8"]
    sacct_out = "".join(
        slurm.SEP.join([i, "COMPLETED", "None", "vllm", "1", "n1", "00:01:00", "00:10:00", "0:0", f"/jobs/{i}"]) + "\n"
        for i in gone
    )
    fake = FakeSlurm(squeue=ok(["squeue"], _squeue_lines(running)), sacct=ok(["sacct"], sacct_out))
    clock = [0.0]
    poller = slurm.Poller(min_interval=5, clock=lambda: clock[0])
    with slurm.use_runner(fake):
        res = poller.get(running + gone)
        assert fake.count("squeue") == 1 and fake.count("sacct") == 1
        assert all(res[i] is not None and res[i].category is Category.RUNNING for i in running)
        assert res["7"].category is Category.COMPLETED
        # within the interval: served from the cache
        clock[0] = 2
        poller.get(running + gone)
        assert fake.count("squeue") == 1
        # after it: one more squeue for the unfinished ones only; finished jobs are never asked again
        clock[0] = 6
        poller.get(running + gone)
        assert fake.count("squeue") == 2 and fake.count("sacct") == 1
        asked = fake.calls[-1][-1].removeprefix("--jobs=").split(",")
        assert set(asked) == set(running)


def test_poller_unknown_everywhere_is_none() -> None:
    fake = FakeSlurm(
        squeue=fail(["squeue"], "slurm_load_jobs error: Invalid job id specified"),
        sacct=ok(["sacct"], ""),
    )
    with slurm.use_runner(fake):
        assert slurm.Poller().get(["999"]) == {"999": None}


def test_sacct_without_accounting_is_empty_not_an_error() -> None:
    fake = FakeSlurm(sacct=fail(["sacct"], "sacct: error: Slurm accounting storage is disabled"))
    with slurm.use_runner(fake):
        assert slurm.sacct(["1"]) == []


# --------------------------------------------------------------------------------------------
# sbatch: parsable output and a retry that never makes a second job
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out,jid", [("123\n", "123"), ("456;cluster1\n", "456"), ("\n789\n", "789")])
def test_parse_sbatch_parsable(out: str, jid: str) -> None:
    assert slurm.parse_sbatch_parsable(out) == jid


def test_parse_sbatch_garbage_is_an_error() -> None:
    with pytest.raises(SlurmCommandError):
        slurm.parse_sbatch_parsable("Submitted batch job\n")


def test_sbatch_refusal_is_not_retried(tmp_path: Path) -> None:
    fake = FakeSlurm(sbatch=fail(["sbatch"], "sbatch: error: invalid partition specified: nope"))
    with slurm.use_runner(fake), pytest.raises(SlurmCommandError) as ei:
        slurm.sbatch(tmp_path / "job.sbatch", tmp_path, sleep=lambda s: None)
    assert "invalid partition specified: nope" in str(ei.value)
    assert fake.count("sbatch") == 1 and fake.count("squeue") == 0


def test_sbatch_lost_answer_finds_the_queued_job_instead_of_resubmitting(tmp_path: Path) -> None:
    # First sbatch times out although slurmctld queued the job; squeue then shows it from our dir.
    fake = FakeSlurm(
        sbatch=[fail(["sbatch"], "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"),
                ok(["sbatch"], "999\n")],
        squeue=ok(["squeue"], _squeue_lines(["555"]).replace("/jobs/555", str(tmp_path))),
    )
    with slurm.use_runner(fake):
        jid = slurm.sbatch(tmp_path / "job.sbatch", tmp_path, sleep=lambda s: None)
    assert jid == "555"
    assert fake.count("sbatch") == 1
    assert any("--me" in c for c in fake.calls if c[0] == "squeue")


def test_sbatch_retries_when_nothing_was_queued(tmp_path: Path) -> None:
    fake = FakeSlurm(
        sbatch=[fail(["sbatch"], "sbatch: error: Slurm temporarily unable to accept job"), ok(["sbatch"], "321\n")],
        squeue=ok(["squeue"], _squeue_lines(["555"])),  # another job, another directory
    )
    with slurm.use_runner(fake):
        assert slurm.sbatch(tmp_path / "job.sbatch", tmp_path, sleep=lambda s: None) == "321"
    assert fake.count("sbatch") == 2


def test_sbatch_gives_up_rather_than_risking_a_duplicate(tmp_path: Path) -> None:
    fake = FakeSlurm(
        sbatch=timeout_exc(["sbatch"]),
        squeue=fail(["squeue"], "squeue: error: Unable to contact slurm controller (connect failure)"),
    )
    with slurm.use_runner(fake), pytest.raises(SlurmCommandError) as ei:
        slurm.sbatch(tmp_path / "job.sbatch", tmp_path, sleep=lambda s: None)
    assert fake.count("sbatch") == 1
    assert "could not tell whether" in str(ei.value)


def test_scancel_of_finished_job_is_fine() -> None:
    fake = FakeSlurm(scancel=fail(["scancel"], "scancel: error: Kill job error on job id 5: Job/step already completing or completed"))
    with slurm.use_runner(fake):
        slurm.scancel("5")
    assert fake.calls == [["scancel", "5"]]


def test_no_shell_anywhere_in_the_runner() -> None:
    import inspect

    src = inspect.getsource(slurm)
    assert "shell=True" not in src


# --------------------------------------------------------------------------------------------
# what the recorded lab output says, job by job
# --------------------------------------------------------------------------------------------


def test_recorded_squeue_jobs_map_as_expected() -> None:
    jobs = {j.job_id: j for j in slurm.parse_squeue(fixture("squeue_lab_mixed.txt"))}
    assert jobs["17"].category is Category.RUNNING and jobs["17"].nodes == 2 and jobs["17"].nodelist == "labnode[1-2]"
    assert jobs["18"].category is Category.CANCELLED
    assert jobs["19"].category is Category.FAILED
    assert jobs["20"].category is Category.COMPLETED
    assert jobs["21"].reason is not None and jobs["21"].reason.kind is ReasonKind.HELD
    assert jobs["22"].reason is not None and jobs["22"].reason.blocked
    assert jobs["23"].reason is not None and jobs["23"].reason.kind is ReasonKind.WAITING
    assert jobs["24"].reason is not None and jobs["24"].reason.code == "Resources"
    assert all(j.comment == "slurm_vllm" and j.workdir == "/home/alice/.slurm_vllm/jobs/wrap-20250101-120000" for j in jobs.values())
    limits = {j.job_id: j for j in slurm.parse_squeue(fixture("squeue_lab_limits.txt"))}
    assert limits["26"].reason is not None and limits["26"].reason.blocked  # 9 nodes asked of a 3-node partition


def test_recorded_sacct_jobs_map_as_expected() -> None:
    jobs = {j.job_id: j for j in slurm.parse_sacct(fixture("sacct_lab_mixed.txt"))}
    assert jobs["18"].state.name == "CANCELLED" and jobs["18"].state.detail == "by 0"
    assert jobs["19"].category is Category.FAILED and jobs["19"].exit_code == "3:0"
    assert jobs["20"].category is Category.COMPLETED
    assert jobs["24"].category is Category.PENDING and jobs["24"].nodelist == "None assigned"


@pytest.mark.parametrize("name", ["sbatch_lab_bad_partition.txt", "sbatch_lab_too_many_gpus.txt"])
def test_recorded_sbatch_refusals_are_not_transient(name: str) -> None:
    head, _, stderr = fixture(name).partition("\n")
    err = SlurmCommandError(["sbatch"], int(head.split("=")[1]), stderr)
    assert not slurm.is_transient(err) and err.exit_code == 3
    assert "sbatch: error:" in str(err)


def test_recorded_unknown_id_answer_means_no_jobs() -> None:
    head, _, stderr = fixture("stderr_lab_squeue_unknown_id.txt").partition("\n")
    fake = FakeSlurm(squeue=fail(["squeue"], stderr, int(head.split("=")[1])))
    with slurm.use_runner(fake):
        assert slurm.squeue(["99999999"]) == []
