"""The Python API's submission path (via=, the deprecated backend=), the Job's notebook display,
and the models command."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from slurm_vllm import api, cli, slurm
from slurm_vllm import job as jobmod
from slurm_vllm.errors import SpecError
from slurm_vllm.job import Job
from slurm_vllm.jobdir import JobDir, Run, write_json, write_state
from tests.unit.fake_slurm import FakeSlurm, fail, ok

US = slurm.SEP
SITE = "partition: gpu\nmodels:\n  tiny: {model: org/tiny-model, nodes: 2, gpus_per_node: 1, max_model_len: 512}\n"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "home"))
    for var in ("SLURM_VLLM_PROFILE", "SLURM_VLLM_PARTITION", "SLURM_VLLM_TIME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(slurm, "POLLER", slurm.Poller(min_interval=0))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(SITE)
    return path


def sq(jid: str, state: str, reason: str = "None") -> str:
    return US.join([jid, state, reason, "vllm", "2", "n[1-2]", "1:00", "1:00:00", "slurm_vllm", "0", "/x"]) + "\n"


# --------------------------------------------------------------------------------------------
# submit(spec, via=...)
# --------------------------------------------------------------------------------------------


def test_submit_via_sbatch_is_the_default() -> None:
    fake = FakeSlurm(sbatch=ok(["sbatch"], "4242\n"))
    with slurm.use_runner(fake), warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        job = api.submit("org/m", nodes=1)
    assert job.job_id == "4242" and fake.count("sbatch") == 1


def test_submit_via_submitit_calls_the_submitit_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm_vllm import submitit_backend

    seen: list[str] = []
    monkeypatch.setattr(submitit_backend, "submit", lambda spec, jobdir: seen.append(spec.model.name) or "77")
    job = api.submit("org/m", via="submitit")
    assert job.job_id == "77" and seen == ["org/m"]


def test_the_old_backend_spelling_still_submits_with_a_deprecation_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm_vllm import submitit_backend

    monkeypatch.setattr(submitit_backend, "submit", lambda spec, jobdir: "78")
    with pytest.warns(DeprecationWarning, match="via='submitit'"):
        job = api.submit("org/m", backend="submitit")
    assert job.job_id == "78" and json.loads((job.job_dir / "spec.json").read_text())["backend"] == "ray"
    with pytest.warns(DeprecationWarning), slurm.use_runner(FakeSlurm(sbatch=ok(["sbatch"], "79\n"))):
        assert api.submit("org/m", backend="sbatch").job_id == "79"


def test_backend_is_the_executor_everywhere() -> None:
    fake = FakeSlurm(sbatch=ok(["sbatch"], "80\n"))
    with slurm.use_runner(fake):
        job = api.submit("org/m", backend="mp", via="sbatch")
    spec = json.loads((job.job_dir / "spec.json").read_text())
    assert spec["backend"] == "mp"


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"via": "ssh"}, "via='ssh' is not a submission path: choose one of sbatch, submitit"),
    ({"via": "sbatch", "backend": "submitit"}, "via='sbatch' contradicts backend"),
])
def test_a_bad_submission_path_names_via_and_the_fix(kwargs: dict[str, str], words: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(SpecError) as exc, slurm.use_runner(FakeSlurm()):
            api.submit("org/m", **kwargs)
    assert exc.value.field == "via" and words in str(exc.value)


def test_submit_and_render_of_a_name_layer_as_the_cli_does(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_PROFILE", str(site))
    script = api.render("tiny", time="00:30:00")
    assert "#SBATCH --job-name=tiny" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --nodes=2" in script and "org/tiny-model" in script


# --------------------------------------------------------------------------------------------
# the notebook display
# --------------------------------------------------------------------------------------------


@pytest.fixture
def jd(tmp_path: Path) -> JobDir:
    d = JobDir(tmp_path / "job").create()
    write_json(d.spec, {"model": {"name": "org/m"}})
    d.job_id_file.write_text("42\n")
    return d


class Pretty:
    """IPython's pretty printer, as far as _repr_pretty_ uses it."""

    def __init__(self) -> None:
        self.out = ""

    def text(self, s: str) -> None:
        self.out += s


def test_the_display_asks_for_the_status_each_time(jd: JobDir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobmod, "DISPLAY_REUSE_S", 0.0)
    job = Job("42", jd)
    with slurm.use_runner(FakeSlurm(squeue=ok(["squeue"], sq("42", "PENDING", "Resources")))):
        assert "PENDING" in job._repr_html_() and "Resources" in job._repr_html_()
    write_state(jd, Run("42"), "STARTING_RAY", nodes_joined=1, nodes_expected=2)
    with slurm.use_runner(FakeSlurm(squeue=ok(["squeue"], sq("42", "RUNNING")))):
        page = job._repr_html_()
        pretty = Pretty()
        job._repr_pretty_(pretty, False)
    assert "STARTING_RAY 1/2 nodes" in page and "PENDING" not in page
    assert "STARTING_RAY 1/2 nodes" in pretty.out


def test_one_display_asks_slurm_once_for_its_text_and_html(jd: JobDir) -> None:
    fake = FakeSlurm(squeue=ok(["squeue"], sq("42", "PENDING", "Priority")))
    job = Job("42", jd)
    with slurm.use_runner(fake):
        job._repr_html_()
        job._repr_pretty_(Pretty(), False)
    assert fake.count("squeue") == 1


def test_the_display_never_raises_and_says_slurm_is_unreachable(jd: JobDir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobmod, "DISPLAY_REUSE_S", 0.0)
    down = FakeSlurm(squeue=fail(["squeue"], "slurm_load_jobs error: Unable to contact slurm controller"),
                     sacct=fail(["sacct"], "Unable to contact slurm controller"))
    job = Job("42", jd)
    with slurm.use_runner(down):
        page = job._repr_html_()
        pretty = Pretty()
        job._repr_pretty_(pretty, False)
    assert "Slurm unreachable" in page and "Unable to contact slurm controller" in page
    assert "Slurm unreachable" in pretty.out and "42" in pretty.out
    with slurm.use_runner(FakeSlurm(squeue=FileNotFoundError("squeue"))):
        assert "unavailable" in job._repr_html_() or "unreachable" in job._repr_html_()


def test_the_display_escapes_what_it_shows(jd: JobDir) -> None:
    write_state(jd, Run("42"), "FAILED", reason="<script>alert(1)</script>", log_tail="<b>boom</b>")
    with slurm.use_runner(FakeSlurm(squeue=ok(["squeue"], sq("42", "RUNNING")))):
        page = Job("42", jd)._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;boom" in page


def test_repr_asks_nothing_and_shows_the_last_status_with_its_age(jd: JobDir) -> None:
    job = Job("42", jd)
    with slurm.use_runner(FakeSlurm()):  # any Slurm call would fail the test
        assert repr(job) == f"<Job 42 {jd.path}>"
    with slurm.use_runner(FakeSlurm(squeue=ok(["squeue"], sq("42", "PENDING", "Resources")))):
        job.status()
    with slurm.use_runner(FakeSlurm()):
        assert "PENDING (Resources" in repr(job) and "s ago)" in repr(job)


# --------------------------------------------------------------------------------------------
# slurm-vllm models, and submit NAME
# --------------------------------------------------------------------------------------------


def test_models_lists_the_presets(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--profile", str(site)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("NAME\tMODEL\tNODES")
    assert out[1].split("\t") == ["tiny", "org/tiny-model", "2", "1", "1x2", "tiny", "--max-model-len 512"]


def test_models_json_and_the_profile_variable(site: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_PROFILE", str(site))
    assert cli.main(["models", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "tiny" and row["spec"]["nodes"] == 2 and row["error"] is None


def test_models_without_a_profile_is_a_usage_error_with_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models"]) == 2
    assert "give --profile FILE, or set $SLURM_VLLM_PROFILE" in capsys.readouterr().err


def test_models_with_an_empty_table_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("partition: gpu\n")
    assert cli.main(["models", "--profile", str(site)]) == 0
    assert "no presets" in capsys.readouterr().err


def test_models_does_not_load_the_spec_model_for_its_help() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom slurm_vllm.cli import main\ntry:\n    main(['models', '--help'])\n"
            "except SystemExit:\n    pass\nprint('pydantic' in sys.modules, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.stderr.strip().splitlines()[-1] == "False"


def test_submit_a_preset_name_flags_win(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeSlurm(sbatch=ok(["sbatch"], "4300\n"))
    with slurm.use_runner(fake):
        rc = cli.main(["submit", "tiny", "--profile", str(site), "--nodes", "1", "--json"])
    assert rc == 0
    job_dir = Path(json.loads(capsys.readouterr().out)["job_dir"])
    spec = json.loads((job_dir / "spec.json").read_text())
    assert spec["model"]["name"] == "org/tiny-model" and spec["resources"]["nodes"] == 1
    assert spec["resources"]["job_name"] == "tiny" and job_dir.name.startswith("tiny-")
    assert spec["model"]["extra_args"] == ["--max-model-len", "512"]
