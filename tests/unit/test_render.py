"""Rendering: golden scripts, a hostile-value run through real bash, and prepare_job's files.

Update the golden scripts after an intended change with::

    UPDATE_GOLDEN=1 python -m pytest tests/unit/test_render.py

then read the diff (``git diff tests/unit/golden``) before committing it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from slurm_vllm import shell
from slurm_vllm.errors import SpecError, SpecErrors
from slurm_vllm.jobdir import JobDir
from slurm_vllm.render import UnquotedValueError, prepare_job, render_script
from slurm_vllm.spec import ServeSpec, load_spec_json
from tests.unit.script_checks import (
    bash_n,
    hostile,
    make_stub,
    read_nul,
    run_script,
    sbatch_options,
    shellcheck,
)

GOLDEN = Path(__file__).parent / "golden"
JOB_DIR = "/scratch/alice/slurm_vllm/jobs/demo-20260101-120000"


def unchecked(**fields) -> ServeSpec:
    """A spec whose local paths (venv, image) need not exist on this machine."""
    return ServeSpec.model_validate(fields, context={"check_paths": False})


CASES = {
    "one_node": lambda: unchecked(model="org/tiny-model", gpus_per_node=1, time="00:30:00",
                                  partition="gpu"),
    "two_nodes_pp2": lambda: unchecked(model="org/big-model", nodes=2, gpus_per_node=1,
                                       pipeline_parallel_size=2, time="04:00:00", partition="gpu",
                                       account="proj42", job_name="pp2"),
    "four_gpus_tp4": lambda: unchecked(model="org/mid-model", gpus_per_node=4, tensor_parallel_size=4,
                                       cpus_per_task=32, mem="256G", time="1-00:00:00", qos="high",
                                       constraint="a100", exclusive=True,
                                       sbatch_args=["--mail-type=END,FAIL", "--reservation=demo"]),
    "container": lambda: unchecked(model="/models/llama", nodes=2, gpus_per_node=8, time="08:00:00",
                                   container="/images/vllm.sif", container_binds=["/models", "/data:/mnt:ro"],
                                   env={"HF_HUB_OFFLINE": "1"}),
    "modules_venv": lambda: unchecked(model="org/tiny-model", nodes=2, gpus_per_node=2,
                                      setup=["module purge", "module load cuda/12.4 gcc/12"],
                                      venv="/home/alice/venvs/vllm", interface="ib0",
                                      env={"NCCL_DEBUG": "WARN", "HF_HOME": "/scratch/alice/hf cache"}),
    "mp_backend": lambda: unchecked(model="org/big-model", nodes=2, gpus_per_node=4, backend="mp",
                                    tensor_parallel_size=4, pipeline_parallel_size=2, time="12:00:00",
                                    signal_grace=300, python="/opt/py/bin/python3"),
}


@pytest.fixture
def golden_home(monkeypatch):
    """The default compile-cache folder (beside the jobs root) as the golden scripts name it."""
    monkeypatch.setenv("SLURM_VLLM_HOME", "/home/alice/.slurm_vllm")


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name, tmp_path, golden_home):
    script = render_script(CASES[name](), JobDir(JOB_DIR))
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(script)
    assert path.exists(), f"no golden file {path}; run UPDATE_GOLDEN=1 pytest {__file__}"
    assert script == path.read_text(), f"{name} differs from its golden file; see the module docstring"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_scripts_pass_bash_n_and_shellcheck(name, tmp_path, golden_home):
    path = tmp_path / "job.sbatch"
    path.write_text(render_script(CASES[name](), JobDir(JOB_DIR)))
    assert bash_n(path).returncode == 0, bash_n(path).stderr
    sc = shellcheck(path)
    assert sc.returncode == 0, sc.stdout


@pytest.mark.parametrize("name", sorted(CASES))
def test_script_shape(name):
    spec = CASES[name]()
    script = render_script(spec, JobDir(JOB_DIR))
    assert script.startswith("#!/bin/bash\n")
    opts = sbatch_options(script)
    assert f"--nodes={spec.resources.nodes}" in opts
    assert "--ntasks-per-node=1" in opts
    assert f"--signal=USR2@{spec.resources.signal_grace}" in opts
    assert not any("USR1" in o for o in opts)
    assert f"--output={JOB_DIR}/logs/batch-%j.out" in opts
    assert f"--chdir={JOB_DIR}" in opts and "--comment=slurm_vllm" in opts
    if spec.resources.gpus_per_node:
        assert f"--gpus-per-node={spec.resources.gpus_per_node}" in opts
    srun_lines = [line for line in script.split("\n") if line.startswith("srun ")]
    assert len(srun_lines) == 1
    assert "--kill-on-bad-exit=1" in srun_lines[0]
    assert "-m slurm_vllm node --job-dir" in script


def test_no_gpu_line_for_cpu_nodes():
    script = render_script(ServeSpec("org/M", gpus_per_node=0), JobDir(JOB_DIR))
    assert "--gpus-per-node" not in script


# --- hostile values through real bash -----------------------------------------------------


@pytest.fixture
def hostile_run(tmp_path):
    """Render a spec full of hostile values, run the script with recording stubs; return all."""
    canary = tmp_path / "canary"
    h = hostile(canary)
    # in paths: short (one path component), no slash, no backslash (refused in job_dir: Slurm
    # file patterns); a `touch` here reaches the recording stub, never the real command
    h_path = "p 'q' \"d\" $(touch canary) `touch canary` ; touch canary & % %j é #x"
    job_dir = tmp_path / f"jobs/{h_path}"
    venv = tmp_path / f"venv {h_path}"
    (venv / "bin").mkdir(parents=True)
    marker = tmp_path / "activated"
    (venv / "bin" / "activate").write_text(f"printf '%s\\n' activated >> {shlex.quote(str(marker))}\n")
    setup_out = tmp_path / "setup.out"
    counter = tmp_path / "counter"
    setup = [
        f"printf '%s\\n' {shlex.quote(h)} >> {shlex.quote(str(setup_out))}",
        f"echo ran >> {shlex.quote(str(counter))}  # a comment with {h[:20]}",
    ]
    image = tmp_path / f"image {h_path}.sif"
    image.write_text("")
    spec = ServeSpec(
        f"org/{h}",
        job_name=h,
        nodes=2,
        gpus_per_node=2,
        env={"HOSTILE": h, "EMPTY": "", "PLAIN": "x"},
        setup=setup,
        venv=str(venv),
        container=str(image),
        container_binds=[f"/data/{h_path}"],
        extra_args=["--chat-template", h, f"--x={h}"],
        served_name=h,
        job_dir=str(job_dir),
        cache_dir=str(tmp_path / f"cache {h_path}"),
        partition=h.replace("#", "_"),
    )
    jobdir = prepare_job(spec)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for stub in ("srun", "python3", "apptainer", "singularity", "touch"):
        make_stub(bindir, stub)
    record = tmp_path / "record"
    record.mkdir()
    proc = run_script(jobdir.script, bindir, record, {"RECORD_ENV": "HOSTILE EMPTY PLAIN SLURM_VLLM_JOB_DIR"},
                      cwd=tmp_path)
    return {"spec": spec, "jobdir": jobdir, "proc": proc, "canary": canary, "h": h, "record": record,
            "setup_out": setup_out, "counter": counter, "marker": marker, "image": image,
            "script": jobdir.script.read_text(), "venv": venv, "h_path": h_path,
            "cache": tmp_path / f"cache {h_path}"}


def test_hostile_script_passes_bash_n_and_shellcheck(hostile_run):
    path = hostile_run["jobdir"].script
    assert bash_n(path).returncode == 0, bash_n(path).stderr
    sc = shellcheck(path)
    assert sc.returncode == 0, sc.stdout


def test_hostile_script_runs_and_executes_nothing_injected(hostile_run):
    proc = hostile_run["proc"]
    assert proc.returncode == 0, proc.stderr.decode()
    assert not hostile_run["canary"].exists()
    # the `touch` stub would have recorded a call had anything reached a shell unquoted
    assert not (hostile_run["record"] / "touch.argv").exists()


def test_hostile_srun_gets_exact_argv(hostile_run):
    jd = str(hostile_run["jobdir"].path)
    argv = read_nul(hostile_run["record"] / "srun.argv")
    assert argv == [
        "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        f"--output={shell.slurm_filename(jd)}/logs/node-%t.log",
        "apptainer", "exec", "--nv", "--bind", jd, "--bind", str(hostile_run["cache"]),
        "--bind", f"/data/{hostile_run['h_path']}",
        str(hostile_run["image"]),
        "python3", "-m", "slurm_vllm", "node", "--job-dir", jd,
    ]
    assert not (hostile_run["record"] / "python3.argv").exists()  # only srun starts it


def test_hostile_env_values_byte_for_byte(hostile_run):
    rec = read_nul(hostile_run["record"] / "srun.env")
    env = dict(zip(rec[::2], rec[1::2], strict=True))
    assert env["HOSTILE"] == hostile_run["h"]
    assert env["EMPTY"] == "" and env["PLAIN"] == "x"
    assert env["SLURM_VLLM_JOB_DIR"] == str(hostile_run["jobdir"].path)


def test_hostile_job_id_written_into_job_dir(hostile_run):
    assert hostile_run["jobdir"].read_job_id() == "4242"


def test_setup_lines_verbatim_once_and_not_reexpanded(hostile_run):
    script = hostile_run["script"]
    for line in hostile_run["spec"].environment.setup:
        assert script.split("\n").count(line) == 1
    assert hostile_run["setup_out"].read_text() == hostile_run["h"] + "\n"
    assert hostile_run["counter"].read_text() == "ran\n"
    assert hostile_run["marker"].read_text() == "activated\n"


def test_hostile_sbatch_values_byte_for_byte(hostile_run):
    opts = sbatch_options(hostile_run["script"])
    h, jd = hostile_run["h"], str(hostile_run["jobdir"].path)
    assert f"--job-name={h}" in opts
    assert f"--partition={h.replace('#', '_')}" in opts
    assert f"--chdir={jd}" in opts
    assert f"--output={shell.slurm_filename(jd)}/logs/batch-%j.out" in opts


def test_hostile_values_in_spec_json_byte_for_byte(hostile_run):
    loaded = load_spec_json(hostile_run["jobdir"].spec)
    h = hostile_run["h"]
    assert loaded.model.name == f"org/{h}"
    assert loaded.model.extra_args == ["--chat-template", h, f"--x={h}"]
    assert loaded.model.served_name == h
    assert loaded.environment.env["HOSTILE"] == h
    assert loaded.job_dir == str(hostile_run["jobdir"].path)


# --- prepare_job ------------------------------------------------------------------------------


def test_prepare_job_writes_files_with_modes(tmp_path):
    spec = ServeSpec("org/M", job_dir=str(tmp_path / "jd"))
    jd = prepare_job(spec)
    assert stat.S_IMODE(jd.path.stat().st_mode) == 0o700
    for secret in (jd.api_key, jd.ray_token):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert len(secret.read_text().strip()) >= 32
    assert jd.read_secret(jd.api_key) != jd.read_secret(jd.ray_token)
    assert json.loads(jd.spec.read_text())["job_dir"] == str(jd.path)
    assert jd.script.read_text().startswith("#!/bin/bash\n")
    assert jd.logs.is_dir()


def test_prepare_job_without_api_key(tmp_path):
    jd = prepare_job(ServeSpec("org/M", job_dir=str(tmp_path / "jd"), no_api_key=True))
    assert not jd.api_key.exists() and jd.ray_token.exists()


def test_prepare_job_refuses_used_dir_and_overwrites_nothing(tmp_path):
    target = tmp_path / "jd"
    target.mkdir()
    (target / "job.sbatch").write_text("mine")
    with pytest.raises(SpecError) as info:
        prepare_job(ServeSpec("org/M", job_dir=str(target)))
    assert "did not create" in str(info.value) and "job.sbatch" in str(info.value) and "--job-dir" in info.value.fix
    assert (target / "job.sbatch").read_text() == "mine"
    assert not (target / "spec.json").exists()


def test_prepare_job_validates_before_writing(tmp_path):
    spec = ServeSpec("org/M", job_dir=str(tmp_path / "jd"))
    spec.resources.nodes = 2  # in-place edit that breaks TP x PP (2 nodes x 1 GPU, TP 1, PP 2 ok)
    spec.parallel.pipeline_parallel_size = 1
    with pytest.raises(SpecErrors, match="does not use the allocation"):
        prepare_job(spec)
    assert not (tmp_path / "jd").exists()


def test_default_job_dir_is_named_and_unique(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path))
    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    spec = ServeSpec("org/M", job_name="my job/x")
    first = prepare_job(spec, now=now)
    second = prepare_job(spec, now=now)
    assert first.path == tmp_path / "jobs" / "my_job_x-20260102-030405"
    assert second.path == tmp_path / "jobs" / "my_job_x-20260102-030405-2"
    assert prepare_job(spec, now=now).path.name == "my_job_x-20260102-030405-3"


# --- user templates ---------------------------------------------------------------------------


def test_user_template_same_rules(tmp_path):
    good = tmp_path / "good.j2"
    good.write_text("#!/bin/bash\n#SBATCH --nodes={{ spec.resources.nodes }}\n"
                    "exec {{ node_argv | qjoin }}\n")
    out = render_script(ServeSpec("org/M"), JobDir(JOB_DIR), template=good)
    assert out.endswith(f"exec python3 -m slurm_vllm node --job-dir {JOB_DIR}\n")
    bad = tmp_path / "bad.j2"
    bad.write_text("echo {{ spec.model.name }}\n")
    with pytest.raises(UnquotedValueError):
        render_script(ServeSpec("org/M"), JobDir(JOB_DIR), template=bad)


def test_missing_user_template(tmp_path):
    with pytest.raises(SpecError, match="template"):
        render_script(ServeSpec("org/M"), JobDir(JOB_DIR), template=tmp_path / "none.j2")


def test_packaged_template_shipped_with_the_package():
    import importlib.resources

    res = importlib.resources.files("slurm_vllm") / "sbatch_templates" / "serve.sbatch.j2"
    assert "srun" in res.read_text()


# --- the real sbatch parser (binary only: it stops at a bad option, before any controller) ---


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="sbatch binary not installed")
def test_real_sbatch_reads_hostile_values_byte_for_byte(hostile_run, tmp_path):
    """sbatch's own parser reads our #SBATCH block exactly as the tests' model of it does.

    A sentinel ``--nodes`` with a bad value, placed after the block, makes sbatch exit during
    option processing, so nothing is submitted and no controller is contacted.
    """
    script = hostile_run["script"].split("\n")
    last = max(i for i, line in enumerate(script) if line.startswith("#SBATCH"))
    script.insert(last + 1, "#SBATCH --nodes=invalid-sentinel")
    probe = tmp_path / "probe.sbatch"
    probe.write_text("\n".join(script))
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=probe\nSlurmctldHost=localhost\nSlurmctldPort=1\n")
    out = subprocess.run(["sbatch", "-vvvvv", str(probe)], capture_output=True, timeout=30,
                         env={"PATH": os.environ["PATH"], "SLURM_CONF": str(conf), "LANG": "C.UTF-8"})
    assert out.returncode != 0
    text = out.stderr.decode("utf-8", "replace")
    found = re.findall(r'Found in script, argument "(.*)"$', text, flags=re.M)
    if not found:
        pytest.skip(f"this sbatch does not report parsed arguments: {text[:200]}")
    assert found[-1] == "--nodes=invalid-sentinel"
    assert found[:-1] == sbatch_options(hostile_run["script"])
    assert f"--job-name={hostile_run['h']}" in found


# --- containers: what the node program needs is bound in ---------------------------------


@pytest.mark.parametrize("binds,expect_model_bind", [
    ([], True),                                  # nothing given: the model is bound read-only
    (["/models"], False),                        # a parent at its own path already shows it
    (["/models/llama:/models/llama:ro"], False),
    (["/models:/mnt"], True),                    # shown elsewhere: vLLM is given /models/llama
    (["/mod"], True),                            # a name prefix is not a parent directory
])
def test_a_local_model_is_bound_into_the_container(binds, expect_model_bind):
    from slurm_vllm.render import container_binds

    spec = unchecked(model="/models/llama", container="/images/vllm.sif", container_binds=binds, cache_dir="none")
    got = container_binds(spec, "/home/u/job")
    assert got[0] == "/home/u/job" and got[len(got) - len(binds):] == binds
    added = got[1:len(got) - len(binds)]
    assert added == (["/models/llama:/models/llama:ro"] if expect_model_bind else [])


def test_a_hub_model_adds_no_bind():
    from slurm_vllm.render import container_binds

    spec = unchecked(model="org/m", container="/images/vllm.sif", cache_dir="none")
    assert container_binds(spec, "/j") == ["/j"]


def test_the_compile_cache_folder_is_bound_unless_a_bind_shows_it():
    from slurm_vllm.render import container_binds

    spec = unchecked(model="org/m", container="/images/vllm.sif", cache_dir="/scratch/u/cache")
    assert container_binds(spec, "/j") == ["/j", "/scratch/u/cache"]
    spec = unchecked(model="org/m", container="/images/vllm.sif", cache_dir="/scratch/u/cache",
                     container_binds=["/scratch"])
    assert container_binds(spec, "/j") == ["/j", "/scratch"]


def test_a_model_path_that_cannot_be_bound_is_refused(tmp_path):
    image = tmp_path / "i.sif"
    image.write_text("x")
    with pytest.raises(SpecErrors, match="model=.*cannot be bound"):
        unchecked(model="/models/a:b", container=str(image))


# --- the #SBATCH table (sbatch_options.py) against what the template really writes -------


def test_every_sbatch_option_the_template_writes_is_in_the_table_and_back():
    from slurm_vllm.sbatch_options import SET_BY_TEMPLATE
    from slurm_vllm.spec import FLAT_NAMES

    spec = unchecked(model="org/m", nodes=2, gpus_per_node=2, cpus_per_task=4, mem="8G", time="01:00:00",
                     partition="p", account="a", qos="q", constraint="c", exclusive=True, job_name="every",
                     signal_grace=90, sbatch_args=["--mail-type=END"])
    jd = JobDir(Path(JOB_DIR))
    options = sbatch_options(render_script(spec, jd))
    written = [o[2:].split("=", 1)[0] for o in options]
    assert sorted(set(written) - {"mail-type"}) == sorted(SET_BY_TEMPLATE), written
    assert "mail-type" in written  # the user's own, after the table's
    for option, field in SET_BY_TEMPLATE.items():
        assert field is None or field == "job_dir" or field in FLAT_NAMES, (option, field)


@pytest.mark.parametrize("option", ["--nodes=3", "--ntasks-per-node=2", "--comment=x", "--error=e.log", "--open-mode=truncate"])
def test_options_the_template_sets_are_refused_in_sbatch_args(option):
    with pytest.raises(SpecErrors, match="is set by the tool"):
        ServeSpec("org/m", sbatch_args=[option])


# --- compile caches -----------------------------------------------------------------------------


def test_spec_json_fixes_the_cache_folder_at_submission(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "home"))
    jd = prepare_job(ServeSpec("org/M", job_dir=str(tmp_path / "a")))
    assert load_spec_json(jd.spec).environment.cache_dir == str(tmp_path / "home" / "cache")
    assert not (tmp_path / "home" / "cache").exists()  # the nodes create it; no container needs it now
    jd = prepare_job(ServeSpec("org/M", job_dir=str(tmp_path / "b"), cache_dir="none"))
    assert load_spec_json(jd.spec).environment.cache_dir == "none"
    assert "Compile caches" not in jd.script.read_text()


def test_a_container_job_creates_its_cache_folder_private(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "home"))
    image = tmp_path / "i.sif"
    image.write_text("x")
    jd = prepare_job(ServeSpec("org/M", job_dir=str(tmp_path / "a"), container=str(image),
                               cache_dir=str(tmp_path / "c" / "cache")))
    assert stat.S_IMODE((tmp_path / "c" / "cache").stat().st_mode) == 0o700
    assert f"--bind {tmp_path / 'c' / 'cache'}" in jd.script.read_text()


def test_the_prefetch_note_only_for_a_local_model_without_the_users_choice(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert "--safetensors-load-strategy prefetch" in render_script(ServeSpec(str(model)), JobDir(JOB_DIR))
    assert "prefetch" not in render_script(ServeSpec("org/M"), JobDir(JOB_DIR))
    mine = ServeSpec(str(model), extra_args=["--safetensors-load-strategy", "lazy"])
    assert "passes --safetensors-load-strategy" not in render_script(mine, JobDir(JOB_DIR))


def test_the_script_says_the_weights_are_staged(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    script = render_script(ServeSpec(str(model), stage_weights="shm"), JobDir(JOB_DIR))
    assert "# Weights are staged: before `vllm serve`, every node copies the model to its own" in script
    assert "# /dev/shm (under svl-u<uid>/models/)" in script and f"(--served-model-name {model})" in script
    assert "removed when the job ends" in script and "prefetch" not in script
    kept = render_script(ServeSpec(str(model), stage_weights="local", keep_staged=True, served_name="m"),
                         JobDir(JOB_DIR))
    assert "node-local disk ($SLURM_TMPDIR, else $TMPDIR, else /tmp)" in kept and "keep_staged: the copy stays" in kept
    assert "--served-model-name" not in kept
    assert "Weights are staged" not in render_script(ServeSpec(str(model)), JobDir(JOB_DIR))
    path = tmp_path / "staged.sbatch"
    path.write_text(script)
    assert bash_n(path).returncode == 0, bash_n(path).stderr
