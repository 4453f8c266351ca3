"""``doctor``: sinfo/sacctmgr parsing and every login-side check, against a fake Slurm."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slurm_vllm import cli, cluster, doctor, node_env, slurm
from slurm_vllm.errors import SlurmCommandError
from slurm_vllm.spec import ServeSpec
from tests.unit.fake_slurm import FakeSlurm, fail, ok

US = slurm.SEP


def sinfo_row(part: str, count: int, cpus: int, mem_mb: int, gres: str, state: str = "idle",
              avail: str = "up") -> str:
    return US.join([part, avail, str(count), str(cpus), str(mem_mb), gres, state]) + "\n"


SINFO = (sinfo_row("debug*", 2, 4, 8000, "(null)")
         + sinfo_row("gpu", 3, 64, 512000, "gpu:a100:8(S:0-1)")
         + sinfo_row("gpu", 1, 64, 512000, "gpu:a100:8(S:0-1)", state="drain")
         + sinfo_row("gpu", 2, 32, 256000, "gpu:4", state="mix"))
ASSOC = "proj42||normal,high\nproj42|gpu|normal\nother|debug|normal\n"


def fake(sinfo: str = SINFO, assoc: str | Exception = ASSOC) -> FakeSlurm:
    return FakeSlurm(
        sinfo=lambda argv: ok(argv, sinfo),
        sacctmgr=assoc if isinstance(assoc, Exception) else (lambda argv: ok(argv, assoc)),
    )


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("SLURM_VLLM_HOME", str(home))
    monkeypatch.delenv("SLURM_VLLM_PROFILE", raising=False)
    # these tests' temporary directories stand for the shared filesystem
    monkeypatch.setattr(node_env, "NODE_LOCAL_PREFIXES", tuple(p for p in node_env.NODE_LOCAL_PREFIXES if p != "/tmp"))


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.check: c for c in checks}


def spec(**fields) -> ServeSpec:
    return ServeSpec.model_validate({"model": "org/M", **fields}, context={"check_paths": False})


# --- parsers ----------------------------------------------------------------------------------


def test_parse_sinfo_reads_partitions_shapes_and_states():
    groups = cluster.parse_sinfo(SINFO + "a line in another format\n")
    assert [g.partition for g in groups] == ["debug", "gpu", "gpu", "gpu"]
    assert groups[0].default and not groups[1].default
    assert (groups[1].count, groups[1].cpus, groups[1].memory_mb, groups[1].gpus) == (3, 64, 512000, 8)
    assert groups[0].gpus == 0 and groups[0].gres == ""
    assert groups[1].usable and not groups[2].usable and groups[3].usable
    assert "--exact" in cluster.sinfo_argv()


@pytest.mark.parametrize("gres,gpus", [
    ("gpu:8", 8), ("gpu:a100:4(S:0-1),gpu:v100:2", 6), ("(null)", 0), ("", 0), ("shard:8,gpu:2", 2),
    ("gpu:h100:4(S:0,1)", 4), ("gpu", 1),
])
def test_gpus_in_gres(gres, gpus):
    assert cluster.gpus_in(gres) == gpus


@pytest.mark.parametrize("state,usable", [("idle", True), ("mix", True), ("alloc", True), ("idle*", False),
                                          ("down*", False), ("drain", False), ("drng", False), ("maint", False)])
def test_node_states(state, usable):
    [g] = cluster.parse_sinfo(sinfo_row("p", 1, 1, 1, "gpu:1", state=state))
    assert g.usable is usable


def test_memory_sizes():
    assert cluster.memory_mb("64G") == 65536 and cluster.memory_mb("1000") == 1000
    assert cluster.memory_mb("2T") == 2 * 1024 * 1024 and cluster.memory_mb("lots") is None


def test_parse_associations():
    assocs = cluster.parse_associations(ASSOC + "\n")
    assert assocs[0] == cluster.Association("proj42", "", ("normal", "high"))
    assert cluster.sacctmgr_argv("alice")[:3] == ["sacctmgr", "--noheader", "--parsable2"]


# --- Slurm checks -------------------------------------------------------------------------------


def test_slurm_unreachable_is_one_failure_and_skips_the_partition_checks():
    f = FakeSlurm(sinfo=lambda argv: fail(argv, "sinfo: error: Unable to contact slurm controller"))
    with slurm.use_runner(f):
        checks = doctor.run_checks(spec(partition="gpu"))
    c = by_name(checks)
    assert c["slurm"].status == "fail" and "Unable to contact slurm controller" in c["slurm"].detail
    assert "partition" not in c and "account" not in c
    assert f.count("sinfo") == 1 and f.count("sacctmgr") == 0


def test_a_partition_that_does_not_exist_names_the_ones_that_do():
    with slurm.use_runner(fake()):
        [check] = doctor.check_partition(spec(partition="gpux"), cluster.node_groups())
    assert check.status == "fail" and "'gpux' is not a partition" in check.detail
    assert check.fix == "use --partition with one of: debug, gpu"


def test_no_partition_uses_the_default_one():
    with slurm.use_runner(fake()):
        checks = by_name(doctor.check_partition(spec(gpus_per_node=0), cluster.node_groups()))
    assert checks["partition"].status == "ok" and "the default partition 'debug' is up" in checks["partition"].detail
    assert checks["fit"].status == "ok"


def test_the_nodes_shapes_and_a_request_that_fits():
    with slurm.use_runner(fake()):
        checks = by_name(doctor.check_partition(spec(partition="gpu", nodes=2, gpus_per_node=8, mem="400G",
                                                     cpus_per_task=32), cluster.node_groups()))
    assert checks["nodes"].detail == "gpu: 4 x (8 GPU, 64 CPU, 500G), 2 x (4 GPU, 32 CPU, 250G)"
    assert checks["fit"].status == "ok" and "4 node(s) of 'gpu' fit (3 take jobs now)" in checks["fit"].detail


def test_a_request_too_big_for_any_node():
    with slurm.use_runner(fake()):
        fit = by_name(doctor.check_partition(spec(partition="gpu", gpus_per_node=16, tensor_parallel_size=16),
                                             cluster.node_groups()))["fit"]
    assert fit.status == "fail" and "no node of 'gpu' has that (the largest: 8 GPU, 64 CPU, 500G)" in fit.detail
    assert "ask for less per node" in fit.fix


def test_too_many_nodes_of_that_shape_and_too_few_up():
    with slurm.use_runner(fake()):
        groups = cluster.node_groups()
    many = by_name(doctor.check_partition(spec(partition="gpu", nodes=5, gpus_per_node=8), groups))["fit"]
    assert many.status == "fail" and "only 4 node(s)" in many.detail and "at most 4 node(s)" in many.fix
    down = by_name(doctor.check_partition(spec(partition="gpu", nodes=4, gpus_per_node=8), groups))["fit"]
    assert down.status == "warn" and "only 3 take jobs now" in down.detail


def test_a_partition_that_is_down_is_a_warning():
    with slurm.use_runner(fake(sinfo=sinfo_row("gpu", 2, 8, 1000, "gpu:1", avail="down"))):
        check = by_name(doctor.check_partition(spec(partition="gpu"), cluster.node_groups()))["partition"]
    assert check.status == "warn" and "is down" in check.detail


# --- accounting --------------------------------------------------------------------------------


def test_account_and_qos_checked_against_the_associations():
    with slurm.use_runner(fake()):
        good = by_name(doctor.check_accounting(spec(partition="gpu", account="proj42", qos="high"), "alice"))
        bad_acct = doctor.check_accounting(spec(account="nope"), "alice")
        bad_part = doctor.check_accounting(spec(partition="gpu", account="other"), "alice")
        bad_qos = by_name(doctor.check_accounting(spec(account="other", qos="high"), "alice"))
        default = doctor.check_accounting(spec(), "alice")
    assert good["account"].status == "ok" and good["qos"].status == "ok"
    assert bad_acct[0].status == "fail" and bad_acct[0].fix == "use --account with one of: other, proj42"
    assert bad_part[0].status == "fail" and "may not use partition 'gpu'" in bad_part[0].detail
    assert bad_qos["qos"].status == "fail" and bad_qos["qos"].fix == "use --qos with one of: normal"
    assert default[0].status == "ok" and "Slurm uses your default" in default[0].detail


def test_without_sacctmgr_or_accounting_the_checks_say_so():
    with slurm.use_runner(fake(assoc=FileNotFoundError("sacctmgr"))):
        [absent] = doctor.check_accounting(spec(account="x"), "alice")
    assert absent.status == "skip" and "sacctmgr is not installed here" in absent.detail
    f = FakeSlurm(sacctmgr=lambda argv: fail(argv, "sacctmgr: error: Problem talking to the database"))
    with slurm.use_runner(f):
        [broken] = doctor.check_accounting(spec(account="x"), "alice")
    assert broken.status == "warn" and "Problem talking to the database" in broken.detail
    with slurm.use_runner(fake(assoc="")):
        [empty] = doctor.check_accounting(spec(account="x"), "alice")
    assert empty.status == "skip"


# --- files ---------------------------------------------------------------------------------------


def test_the_nodes_python_as_render_checks_it(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    checks = doctor.check_environment(spec(venv=str(venv)))
    assert [c.status for c in checks] == ["fail", "fail", "warn"]  # slurm_vllm, ray: missing; vllm: a warning
    assert "does not hold slurm_vllm" in checks[0].detail and "pip install" in checks[0].fix
    [missing] = doctor.check_environment(spec(venv=str(tmp_path / "nope")))
    assert missing.status == "fail" and "is not a virtual environment" in missing.detail
    [ok_check] = doctor.check_environment(spec(container="docker://org/image:tag"))
    assert ok_check.status == "ok" and "container" in ok_check.detail


def test_the_model_path(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    assert doctor.check_model(spec(model=str(model)), True).status == "fail"
    (model / "config.json").write_text("{}")
    assert doctor.check_model(spec(model=str(model)), True).status == "ok"
    assert doctor.check_model(spec(model=str(tmp_path / "gone")), True).detail.endswith("does not exist")
    assert doctor.check_model(spec(), True).status == "skip"
    assert doctor.check_model(spec(), False).detail == "no MODEL given"


def test_the_job_dir_root(tmp_path):
    root = tmp_path / "jobs"
    assert "will be created" in doctor.check_job_dir(spec(), root).detail
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    loose = doctor.check_job_dir(spec(), root)
    assert loose.status == "warn" and loose.fix == f"chmod 700 {root}"
    os.chmod(root, 0o700)
    assert doctor.check_job_dir(spec(), root).status == "ok"
    afile = tmp_path / "file"
    afile.write_text("")
    assert doctor.check_job_dir(spec(job_dir=str(afile))).status == "fail"


def test_a_job_dir_on_a_node_local_path_is_a_warning(monkeypatch):
    monkeypatch.setattr(node_env, "NODE_LOCAL_PREFIXES", ("/tmp",))
    check = doctor.check_job_dir(spec(job_dir="/tmp/somewhere/job"))
    assert check.status == "warn" and "compute nodes do not share" in check.detail


# --- the command -----------------------------------------------------------------------------------


def run_doctor(argv: list[str], f: FakeSlurm, capsys) -> tuple[int, str, str]:
    with slurm.use_runner(f):
        rc = cli.main(["doctor", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_doctor_prints_one_line_per_check_and_exits_0(capsys, tmp_path):
    rc, out, err = run_doctor(["org/M", "--partition", "gpu", "--gpus-per-node", "8", "--account", "proj42"],
                              fake(), capsys)
    lines = out.splitlines()
    assert rc == 0, out + err
    assert [line.split()[1] for line in lines] == ["slurm", "partition", "nodes", "fit", "account", "environment",
                                                   "model", "job_dir"]
    assert all(line.split()[0] in ("ok", "skip", "warn") for line in lines)


def test_doctor_json_and_exit_2_on_a_failure(capsys):
    rc, out, _ = run_doctor(["org/M", "--partition", "gpux", "--json"], fake(), capsys)
    assert rc == 2
    rows = json.loads(out)
    assert all(set(r) == {"check", "status", "detail", "fix"} for r in rows)
    part = next(r for r in rows if r["check"] == "partition")
    assert part["status"] == "fail" and part["fix"] == "use --partition with one of: debug, gpu"


def test_doctor_without_a_model_still_checks_the_cluster(capsys):
    rc, out, _ = run_doctor(["--partition", "debug", "--gpus-per-node", "0", "--json"], fake(), capsys)
    rows = {r["check"]: r for r in json.loads(out)}
    assert rc == 0 and rows["model"]["status"] == "skip" and rows["fit"]["status"] == "ok"


def test_doctor_reports_a_bad_spec_and_still_asks_slurm(capsys):
    f = fake()
    rc, out, _ = run_doctor(["org/M", "--nodes", "0", "--json"], f, capsys)
    rows = json.loads(out)
    assert rc == 2 and rows[0]["check"] == "spec" and rows[0]["status"] == "fail" and "nodes=0" in rows[0]["detail"]
    assert rows[-1]["check"] == "slurm" and f.count("sinfo") == 1


def test_doctor_help_is_light():
    import subprocess
    import sys

    code = ("import sys\nfrom slurm_vllm.cli import main\ntry:\n    main(['doctor', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('ray', 'vllm', 'submitit', 'openai', 'rich', 'jinja2')"
            " if m in sys.modules), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "--partition" in proc.stdout and "--json" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "[]"


def test_sinfo_goes_through_the_runner_with_a_timeout():
    f = FakeSlurm(sinfo=SlurmCommandError(["sinfo"], None, "x"))
    with slurm.use_runner(f):
        check, groups = doctor.check_slurm()
    assert check.status == "fail" and groups is None
