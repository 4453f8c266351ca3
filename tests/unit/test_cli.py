"""The CLI: exit codes, --json shapes, fast --help, one Slurm call per poll, node dispatch."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from slurm_vllm import cli, slurm
from slurm_vllm.jobdir import JobDir, Run, write_json, write_state
from tests.unit.fake_slurm import FakeSlurm, fail, ok

US = slurm.SEP
HEAVY = ("ray", "vllm", "submitit", "openai", "rich", "torch", "jinja2")


def sq(jid: str, state: str, reason: str = "None", workdir: str = "/x", comment: str = "slurm_vllm") -> str:
    return US.join([jid, state, reason, "vllm", "2", "n[1-2]", "1:00", "1:00:00", comment, "0", workdir]) + "\n"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLURM_VLLM_POLL_INTERVAL", "0.01")
    monkeypatch.delenv("SLURM_VLLM_PROFILE", raising=False)
    monkeypatch.setattr(slurm, "POLLER", slurm.Poller(min_interval=0))


def run_cli(argv: list[str], fake: FakeSlurm | None = None, capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str, str]:
    fake = fake or FakeSlurm()
    with slurm.use_runner(fake):
        rc = cli.main(argv)
    out, err = capsys.readouterr() if capsys else ("", "")
    return rc, out, err


def make_job(tmp_path: Path, jid: str = "42", name: str = "j") -> JobDir:
    d = JobDir(tmp_path / name).create()
    write_json(d.spec, {"model": {"name": "m"}})
    d.job_id_file.write_text(jid + "\n")
    d.write_secret(d.api_key, "sekret")
    return d


# --------------------------------------------------------------------------------------------
# start-up
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["submit", "--help"], ["status", "--help"], ["wait", "--help"]])
def test_help_imports_nothing_heavy(argv: list[str]) -> None:
    code = (
        "import sys, json\n"
        "from slurm_vllm.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    assert loaded == [], f"--help imported {loaded}"
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["status", "--help"], ["wait", "--help"],
                                  ["tunnel", "--help"], ["submit", "--help"], ["render", "--help"],
                                  ["doctor", "--help"]])
def test_help_and_version_do_not_load_the_spec_model(argv: list[str]) -> None:
    """The spec's flags come from the generated table: no help needs pydantic or the spec model."""
    code = (
        "import sys\n"
        "from slurm_vllm.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('pydantic' in sys.modules, 'slurm_vllm.spec' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "False False", proc.stderr


def test_submit_help_still_lists_every_spec_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from slurm_vllm.options import SPEC_FLAGS

    with pytest.raises(SystemExit):
        cli.main(["submit", "--help"])
    out = capsys.readouterr().out
    assert all(flags[0] in out for flags, _, _ in SPEC_FLAGS)


def test_python_dash_m_and_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "slurm_vllm", "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "slurm-vllm" in proc.stdout


def test_no_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli([], capsys=capsys)
    assert rc == 2 and "usage" in err


def test_unknown_flag_is_usage_error() -> None:
    with pytest.raises(SystemExit) as ei:
        cli.main(["status", "--bogus", "1"])
    assert ei.value.code == 2


# --------------------------------------------------------------------------------------------
# submit / render
# --------------------------------------------------------------------------------------------


def test_bad_spec_exit_2_one_line_no_slurm_call(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeSlurm()
    rc, out, err = run_cli(["submit", "org/m", "--nodes", "2", "--gpus-per-node", "2", "--tensor-parallel-size", "3"], fake, capsys)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and "tensor_parallel_size" in err
    assert "Traceback" not in err and fake.calls == []


def test_debug_shows_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["submit", "--debug", "org/m", "--tensor-parallel-size", "3"], capsys=capsys)
    assert rc == 2 and "Traceback" in err


def test_dry_run_prints_script_and_submits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeSlurm()
    rc, out, _ = run_cli(["submit", "--dry-run", "org/m", "--nodes", "2", "--partition", "debug", "--", "--max-model-len", "256", "--x=$(id)"], fake, capsys)
    assert rc == 0 and out.startswith("#!/bin/bash")
    assert "--nodes=2" in out and "--partition=debug" in out
    assert fake.calls == []
    assert not (tmp_path / "home").exists(), "a dry run writes nothing"


@pytest.mark.parametrize("trap", ["--dry-run", "--wait", "--json", "--config=x.yaml", "-o", "--job-dir=/j", "--timeout"])
def test_the_tools_own_options_after_the_double_dash_are_refused(trap: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`submit MODEL -- --dry-run` would really submit, with --dry-run handed to vLLM."""
    fake = FakeSlurm(sbatch=ok(["sbatch"], "4242\n"))
    rc, out, err = run_cli(["submit", "org/m", "--partition", "debug", "--", "--max-model-len", "64", trap], fake, capsys)
    assert rc == 2 and out == "" and fake.calls == []
    assert f"put {trap.split('=', maxsplit=1)[0]} before --" in err and "extra_args[2]" in err


def test_submit_prints_id_and_dir_and_records_job_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeSlurm(sbatch=ok(["sbatch"], "4242\n"))
    rc, out, _ = run_cli(["submit", "org/m", "--partition", "debug"], fake, capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "Submitted job 4242"
    jobdir = Path(lines[1].split(": ", 1)[1])
    assert (jobdir / "job_id").read_text().strip() == "4242"
    assert (jobdir / "job.sbatch").exists() and (jobdir / "spec.json").exists()
    (argv,) = [c for c in fake.calls if c[0] == "sbatch"]
    assert argv[:2] == ["sbatch", "--parsable"] and argv[-1] == str(jobdir / "job.sbatch")


def test_submit_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(["submit", "org/m", "--json"], FakeSlurm(sbatch=ok(["sbatch"], "7;clusterA\n")), capsys)
    data = json.loads(out)
    assert rc == 0 and set(data) == {"job_id", "job_dir"} and data["job_id"] == "7"


def test_submit_refused_by_slurm_exit_3_with_slurms_words(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.unit.fake_slurm import fixture

    recorded = fixture("sbatch_lab_bad_partition.txt").partition("\n")[2]  # two lines from real sbatch
    fake = FakeSlurm(sbatch=fail(["sbatch"], recorded))
    rc, out, err = run_cli(["submit", "org/m", "--partition", "nope"], fake, capsys)
    assert rc == 3 and out == ""
    assert len(err.strip().splitlines()) == 1
    for line in recorded.strip().splitlines():
        assert line in err
    assert fake.count("sbatch") == 1


def test_submit_wait_continues_as_wait(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm_vllm import job as jobmod

    monkeypatch.setattr(jobmod, "PROBE", lambda url, key: (True, ""))

    def squeue(argv: list[str]) -> slurm.Completed:
        jobdir = next((tmp_path / "home" / "jobs").iterdir())
        write_state(JobDir(jobdir), Run("5"), "READY")
        write_json(jobdir / "endpoint.json", {"base_url": "http://10.1.1.1:8000/v1", "model": "m", "job_id": "5"})
        return ok(argv, sq("5", "RUNNING", workdir=str(jobdir)))

    fake = FakeSlurm(sbatch=ok(["sbatch"], "5\n"), squeue=squeue, sacct=ok(["sacct"], ""))
    rc, out, _ = run_cli(["submit", "org/m", "--wait", "--timeout", "30"], fake, capsys)
    assert rc == 0
    assert out.splitlines()[0] == "Submitted job 5" and "READY http://10.1.1.1:8000/v1" in out


def test_render_creates_job_dir_and_writes_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "serve.sbatch"
    fake = FakeSlurm()
    rc, out, err = run_cli(["render", "org/m", "--nodes", "2", "--gpus-per-node", "1", "-o", str(target)], fake, capsys)
    assert rc == 0 and out == "" and fake.calls == []
    text = target.read_text()
    assert "#SBATCH --chdir=" in text and "#SBATCH --comment=slurm_vllm" in text
    jobdir = Path(err.split("job directory: ", 1)[1].split(" ", 1)[0])
    assert (jobdir / "spec.json").exists() and f"--chdir={jobdir}" in text


def test_render_explain_names_sources(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["render", "org/m", "--nodes", "2", "--explain"], capsys=capsys)
    assert rc == 0 and "flag --nodes" in err and "default" in err


# --------------------------------------------------------------------------------------------
# status / list / wait / endpoint / logs / cancel
# --------------------------------------------------------------------------------------------


def test_status_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_job(tmp_path)
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "PENDING", "Resources", str(d.path))))
    rc, out, _ = run_cli(["status", str(d.path), "--json"], fake, capsys)
    data = json.loads(out)
    assert rc == 0
    assert {"job_id", "job_dir", "phase", "reason", "slurm_state", "nodes_joined", "nodes_expected", "url", "blocked", "log_tail"} <= set(data)
    assert data["phase"] == "PENDING" and data["job_id"] == "42" and "Resources" in data["reason"]


def test_status_names_a_failed_preflight_its_warnings_and_where_to_look(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    d = make_job(tmp_path)
    checks = [{"node": "labnode1", "check": "shm", "status": "warn", "detail": "/dev/shm has 512 MiB free"},
              {"node": "labnode2", "check": "gpus", "status": "fail", "detail": "GPUs visible 1, asked 2"}]
    write_state(d, Run("42"), "FAILED", reason="preflight: labnode2: GPUs visible 1, asked 2", preflight=checks)
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "RUNNING", workdir=str(d.path))))
    rc, out, _ = run_cli(["status", str(d.path)], fake, capsys)
    assert rc == 0
    assert "42\tFAILED (preflight: labnode2: GPUs visible 1, asked 2)" in out
    assert "  pre-flight warning: labnode1: /dev/shm has 512 MiB free" in out
    assert "next: slurm-vllm status 42 --json   (every node's pre-flight checks" in out


def test_status_of_many_jobs_is_one_slurm_call(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = [make_job(tmp_path, str(100 + i), f"j{i}") for i in range(25)]
    lines = "".join(sq(str(100 + i), "RUNNING", workdir=str(d.path)) for i, d in enumerate(dirs))
    fake = FakeSlurm(squeue=ok(["squeue"], lines), sacct=ok(["sacct"], ""))
    rc, out, _ = run_cli(["status", "--json", *[str(d.path) for d in dirs]], fake, capsys)
    data = json.loads(out)
    assert rc == 0 and len(data) == 25 and {d["phase"] for d in data} == {"STARTING_RAY"}
    assert fake.count("squeue") == 1 and fake.count("sacct") == 0


def test_status_of_many_hand_submitted_ids_is_one_slurm_call(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # ids not in the local index: their directories come from Slurm's WorkDir, in the same call
    monkeypatch.setattr(slurm, "POLLER", slurm.Poller(min_interval=2))
    dirs = [make_job(tmp_path, str(300 + i), f"h{i}") for i in range(20)]
    for d in dirs:
        d.job_id_file.unlink()
    lines = "".join(sq(str(300 + i), "PENDING", "Priority", workdir=str(d.path)) for i, d in enumerate(dirs))
    fake = FakeSlurm(squeue=ok(["squeue"], lines), sacct=ok(["sacct"], ""))
    rc, out, _ = run_cli(["status", "--json", *[str(300 + i) for i in range(20)]], fake, capsys)
    data = json.loads(out)
    assert rc == 0 and [d["job_dir"] for d in data] == [str(d.path) for d in dirs]
    assert {d["phase"] for d in data} == {"PENDING"}
    assert fake.count("squeue") == 1 and fake.count("sacct") == 0


def test_list_is_one_call_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = [make_job(tmp_path, str(200 + i), f"l{i}") for i in range(40)]
    write_state(dirs[0], Run("200"), "READY")
    write_json(dirs[0].endpoint, {"base_url": "http://h:1/v1", "model": "m", "job_id": "200"})
    lines = "".join(sq(str(200 + i), "RUNNING", workdir=str(d.path)) for i, d in enumerate(dirs))
    lines += sq("999", "RUNNING", comment="(null)")  # not ours
    fake = FakeSlurm(squeue=ok(["squeue"], lines))
    rc, out, _ = run_cli(["list", "--json"], fake, capsys)
    data = json.loads(out)
    assert rc == 0 and len(data) == 40 and fake.calls == [slurm.squeue_argv(me=True)]
    assert data[0]["phase"] == "READY" and data[0]["url"] == "http://h:1/v1"
    assert {"job_id", "name", "phase", "slurm_state", "reason", "nodes", "url", "job_dir"} <= set(data[0])


def test_wait_failed_exit_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_job(tmp_path)
    (d.logs / "node-0.log").write_text("Traceback...\nOSError: model not found\n")
    fake = FakeSlurm(squeue=ok(["squeue"], ""), sacct=ok(["sacct"], US.join(["42", "FAILED", "None", "vllm", "1", "n1", "00:00:05", "00:10:00", "1:0", str(d.path)]) + "\n"))
    rc, _, err = run_cli(["wait", str(d.path)], fake, capsys)
    assert rc == 4
    assert "FAILED" in err and "model not found" in err


def test_wait_timeout_exit_5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_job(tmp_path)
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "PENDING", "Priority", str(d.path))))
    rc, _, err = run_cli(["wait", str(d.path), "--timeout", "0.2"], fake, capsys)
    assert rc == 5 and "Priority" in err


def test_wait_blocked_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_job(tmp_path)
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "PENDING", "InvalidAccount", str(d.path))))
    rc, _, err = run_cli(["wait", str(d.path)], fake, capsys)
    assert rc == 3 and "InvalidAccount" in err and "will not start" in err


def test_endpoint_forms(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm_vllm import job as jobmod

    monkeypatch.setattr(jobmod, "PROBE", lambda url, key: (True, ""))
    d = make_job(tmp_path)
    write_state(d, Run("42"), "READY")
    write_json(d.endpoint, {"base_url": "http://10.0.0.5:8001/v1", "model": "m", "job_id": "42", "host": "n1", "port": 8001})
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "RUNNING", workdir=str(d.path))))
    rc, out, _ = run_cli(["endpoint", str(d.path)], fake, capsys)
    assert rc == 0 and out.strip() == "http://10.0.0.5:8001/v1"
    rc, out, _ = run_cli(["endpoint", str(d.path), "--json"], fake, capsys)
    data = json.loads(out)
    assert data["api_key"] == "sekret" and data["model"] == "m" and data["port"] == 8001
    rc, out, _ = run_cli(["endpoint", str(d.path), "--env"], fake, capsys)
    assert out.splitlines() == ["export OPENAI_BASE_URL=http://10.0.0.5:8001/v1", "export OPENAI_API_KEY=sekret"]
    # the --env form is valid shell
    proc = subprocess.run(["bash", "-c", out + 'printf "%s|%s" "$OPENAI_BASE_URL" "$OPENAI_API_KEY"'], capture_output=True, text=True, timeout=10, check=True)
    assert proc.stdout == "http://10.0.0.5:8001/v1|sekret"


def test_ready_endpoint_says_how_to_reach_it_without_printing_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm_vllm import job as jobmod
    from slurm_vllm import reach

    monkeypatch.setattr(jobmod, "PROBE", lambda url, key: (True, ""))
    monkeypatch.setattr(reach, "login_host", lambda: "alice@login1.example.org")
    d = make_job(tmp_path)
    write_state(d, Run("42"), "READY")
    write_json(d.endpoint, {"base_url": "http://10.0.0.5:8001/v1", "model": "m", "job_id": "42", "host": "n1", "port": 8001})
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "RUNNING", workdir=str(d.path))))
    rc, out, err = run_cli(["endpoint", str(d.path)], fake, capsys)
    assert rc == 0 and out.strip() == "http://10.0.0.5:8001/v1"  # stdout stays the URL alone
    assert f'curl -s -H "Authorization: Bearer $(cat {d.api_key})" http://10.0.0.5:8001/v1/models' in err
    assert "ssh -N -L 8001:10.0.0.5:8001 alice@login1.example.org" in err and "http://localhost:8001/v1" in err
    assert "sekret" not in out + err
    rc, out, err = run_cli(["tunnel", str(d.path), "--print", "--local-port", "9000"], fake, capsys)
    assert rc == 0 and out.strip() == "ssh -N -L 9000:10.0.0.5:8001 alice@login1.example.org"
    rc, out, _ = run_cli(["tunnel", str(d.path), "--print", "--login", "bob@gw"], fake, capsys)
    assert out.strip() == "ssh -N -L 8001:10.0.0.5:8001 bob@gw"


def test_the_curl_line_reads_the_key_from_its_file_when_run(tmp_path: Path) -> None:
    from slurm_vllm.job import Endpoint
    from slurm_vllm.reach import curl_line

    key = tmp_path / "key file"
    key.write_text("k3y\n")
    line = curl_line(Endpoint(base_url="http://h:1/v1", model="m", api_key="k3y"), key)
    assert "k3y" not in line
    shown = subprocess.run(["bash", "-c", "curl() { printf '%s\\n' \"$@\"; }; " + line], capture_output=True,
                           text=True, timeout=10, check=True).stdout.splitlines()
    assert shown == ["-s", "-H", "Authorization: Bearer k3y", "http://h:1/v1/models"]


def test_render_explain_creates_nothing_unless_asked_to_write(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "home"))
    rc, out, err = run_cli(["render", "org/m", "--partition", "debug", "--explain"], capsys=capsys)
    assert rc == 0 and out.startswith("#!/bin/bash") and "partition" in err and "nothing written" in err
    assert not (tmp_path / "home").exists()
    rc, _, err = run_cli(["render", "org/m", "--partition", "debug", "--explain", "-o", str(tmp_path / "j.sbatch")],
                         capsys=capsys)
    assert rc == 0 and (tmp_path / "j.sbatch").exists() and (tmp_path / "home" / "jobs").exists()


def test_top_level_debug_before_the_command_works(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["--debug", "submit", "org/m", "--tensor-parallel-size", "3"], capsys=capsys)
    assert rc == 2 and "Traceback" in err


def test_sbatch_arg_in_the_space_form_the_docs_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(["submit", "--dry-run", "org/m", "--sbatch-arg", "--mail-type=END",
                            "--sbatch-arg=--requeue"], capsys=capsys)
    assert rc == 0, err
    assert "#SBATCH --mail-type=END" in out and "#SBATCH --requeue" in out


def test_endpoint_not_ready_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_job(tmp_path)
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "PENDING", "Priority", str(d.path))))
    rc, out, err = run_cli(["endpoint", str(d.path)], fake, capsys)
    assert rc == 1 and out == "" and "no endpoint yet" in err


def test_logs_and_node_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_job(tmp_path)
    (d.logs / "node-1.log").write_text("worker says hi\n")
    rc, out, _ = run_cli(["logs", str(d.path), "--node", "1"], capsys=capsys)
    assert rc == 0 and out == "worker says hi\n"
    with pytest.raises(SystemExit) as ei:
        cli.main(["logs", str(d.path), "--node", "x"])
    assert ei.value.code == 2


def test_logs_follow_stops_when_job_ends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_job(tmp_path)
    (d.logs / "node-0.log").write_text("one\ntwo\n")
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "COMPLETED", workdir=str(d.path))))
    rc, out, _ = run_cli(["logs", str(d.path), "--follow"], fake, capsys)
    assert rc == 0 and out == "one\ntwo\n"


def test_cancel_returns_once_ended(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_job(tmp_path)
    fake = FakeSlurm(
        scancel=ok(["scancel"]),
        squeue=[ok(["squeue"], sq("42", "COMPLETING", workdir=str(d.path))), ok(["squeue"], sq("42", "CANCELLED by 0", workdir=str(d.path)))],
    )
    rc, out, _ = run_cli(["cancel", str(d.path), "--json"], fake, capsys)
    assert rc == 0 and json.loads(out)["phase"] == "ENDED"
    assert fake.calls[0] == ["scancel", "42"]


def test_job_not_found_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeSlurm(squeue=fail(["squeue"], "slurm_load_jobs error: Invalid job id specified"), sacct=ok(["sacct"], ""))
    rc, _, err = run_cli(["status", "123456"], fake, capsys)
    assert rc == 2 and "123456" in err


def test_extra_args_only_for_submit_and_render() -> None:
    with pytest.raises(SystemExit) as ei:
        cli.main(["status", "1", "--", "--x"])
    assert ei.value.code == 2


# --------------------------------------------------------------------------------------------
# leader / worker / node go to the node program with their raw arguments
# --------------------------------------------------------------------------------------------


def test_node_commands_dispatch_raw_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, list[str]]] = []
    fake_mod = types.ModuleType("slurm_vllm.node.cli")
    fake_mod.leader_main = lambda argv: seen.append(("leader", argv)) or 0  # type: ignore[attr-defined]
    fake_mod.worker_main = lambda argv: seen.append(("worker", argv)) or 7  # type: ignore[attr-defined]
    fake_mod.node_main = lambda argv: seen.append(("node", argv)) or 0  # type: ignore[attr-defined]
    import slurm_vllm.node as node_pkg

    monkeypatch.setitem(sys.modules, "slurm_vllm.node.cli", fake_mod)
    monkeypatch.setattr(node_pkg, "cli", fake_mod, raising=False)
    assert cli.main(["leader", "--ray_port=6379", "--ray_cluster_size=2", "--", "--x"]) == 0
    assert cli.main(["worker", "--ray_address=1.2.3.4", "--help"]) == 7
    assert cli.main(["node", "--job-dir", "/j"]) == 0
    assert seen == [
        ("leader", ["--ray_port=6379", "--ray_cluster_size=2", "--", "--x"]),
        ("worker", ["--ray_address=1.2.3.4", "--help"]),
        ("node", ["--job-dir", "/j"]),
    ]


# --------------------------------------------------------------------------------------------
# completion
# --------------------------------------------------------------------------------------------


def _complete(script: str, words: list[str]) -> list[str]:
    """What bash offers after ``words`` (the last one being typed), with ``script`` sourced."""
    code = (f"source {script}\nCOMP_WORDS=({' '.join(words)})\nCOMP_CWORD={len(words) - 1}\n"
            "_shtab_slurm_vllm\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    proc = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_completion_completes_commands_and_spec_options(tmp_path, capsys):
    rc, out, _ = run_cli(["completion", "bash"], capsys=capsys)
    assert rc == 0 and "complete -o bashdefault -F _shtab_slurm_vllm slurm-vllm" in out
    script = tmp_path / "slurm-vllm.bash"
    script.write_text(out)
    assert subprocess.run(["bash", "-n", str(script)], timeout=30, check=False).returncode == 0
    assert _complete(str(script), ["slurm-vllm", "do"]) == ["doctor"]
    assert _complete(str(script), ["slurm-vllm", "submit", "--gpus-"]) == ["--gpus-per-node"]
    assert "--json" in _complete(str(script), ["slurm-vllm", "doctor", "--js"])
    assert "_shtab_compgen_files" in out  # --config, --profile, -o complete file names


def test_zsh_completion_is_a_compdef_script(capsys):
    rc, out, _ = run_cli(["completion", "zsh"], capsys=capsys)
    assert rc == 0 and out.startswith("#compdef slurm-vllm") and "--gpus-per-node" in out


def test_completion_needs_shtab_only_when_asked(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "shtab", None)  # an install without it
    rc, _, err = run_cli(["completion", "bash"], capsys=capsys)
    assert rc == 2 and "pip install shtab" in err
    code = ("import sys\nfrom slurm_vllm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('shtab' in sys.modules, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.stderr.strip().splitlines()[-1] == "False" and "completion" in proc.stdout
