"""The submitit backend: the parameters submitit really accepts, the script it would write,
and what every task runs."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from slurm_vllm.jobdir import JobDir


def test_submitit_parameters_make_the_expected_script(tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")
    import shutil

    if shutil.which("srun") is None:
        pytest.skip("submitit's Slurm executor needs srun on PATH")
    from slurm_vllm import submitit_backend
    from slurm_vllm.spec import ServeSpec

    spec = ServeSpec("org/m", nodes=3, gpus_per_node=2, partition="gpu", account="proj", qos="high",
                     time="01:00:00", mem="64G", env={"A": "x y"}, setup=["module load cuda"],
                     sbatch_args=["--mail-type=END"])
    jd = JobDir(tmp_path / "job with space").create()
    params = submitit_backend.executor_parameters(spec, jd)
    ex = submitit.SlurmExecutor(folder=tmp_path / "sub")
    ex.update_parameters(**params)  # raises on any name submitit does not know
    text = ex._make_submission_file_text("python -u -m submitit.core._submit F", "uid")
    for line in ("--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=2", "--partition=gpu", "--account=proj",
                 "--qos=high", "--time=01:00:00", "--mem=64G", "--comment=slurm_vllm", "--signal=USR2@120",
                 "--mail-type=END"):
        assert f"#SBATCH {line}" in text, line
    assert f"#SBATCH --chdir='{jd.path}'" in text
    assert "export 'A=x y'" in text and "module load cuda" in text
    assert "--kill-on-bad-exit=1" in text and "/logs/node-%t.log" in text


def test_submitit_passes_exactly_the_specs_resources(tmp_path: Path) -> None:
    """No --time=5 or --wckey=submitit of submitit's own: an unset time is the partition's default."""
    submitit = pytest.importorskip("submitit")
    import shutil

    if shutil.which("srun") is None:
        pytest.skip("submitit's Slurm executor needs srun on PATH")
    from slurm_vllm import submitit_backend
    from slurm_vllm.spec import ServeSpec

    jd = JobDir(tmp_path / "j").create()
    ex = submitit.SlurmExecutor(folder=tmp_path / "sub")
    ex.update_parameters(**submitit_backend.executor_parameters(ServeSpec("org/m"), jd))
    text = ex._make_submission_file_text("python -u -m submitit.core._submit F", "uid")
    assert "#SBATCH --time" not in text and "#SBATCH --wckey" not in text, text
    ex.update_parameters(**submitit_backend.executor_parameters(
        ServeSpec("org/m", time="90", sbatch_args=["--wckey=mine"]), jd))
    text = ex._make_submission_file_text("python -u -m submitit.core._submit F", "uid")
    assert "#SBATCH --time=90" in text and "#SBATCH --wckey=mine" in text


def test_submitit_refuses_a_job_dir_with_a_percent(tmp_path: Path) -> None:
    from slurm_vllm import submitit_backend
    from slurm_vllm.errors import SpecError
    from slurm_vllm.spec import ServeSpec

    with pytest.raises(SpecError, match="without '%'"):
        submitit_backend.executor_parameters(ServeSpec("org/m"), JobDir(tmp_path / "100%j"))


def test_submitit_refuses_containers_with_a_clear_fix(tmp_path: Path) -> None:
    from slurm_vllm import submitit_backend
    from slurm_vllm.errors import SpecError
    from slurm_vllm.spec import ServeSpec

    img = tmp_path / "img.sif"
    img.write_text("x")
    spec = ServeSpec("org/m", container=str(img))
    with pytest.raises(SpecError) as ei:
        submitit_backend.executor_parameters(spec, JobDir(tmp_path / "j"))
    assert "via='sbatch'" in str(ei.value)


def test_submitit_task_runs_the_node_program_and_propagates_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm_vllm import submitit_backend

    seen: list[list[str]] = []
    fake_mod = types.ModuleType("slurm_vllm.node.cli")
    fake_mod.node_main = lambda argv: seen.append(argv) or 3  # type: ignore[attr-defined]
    import slurm_vllm.node as node_pkg

    monkeypatch.setitem(sys.modules, "slurm_vllm.node.cli", fake_mod)
    monkeypatch.setattr(node_pkg, "cli", fake_mod, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as ei:
        submitit_backend.run_node(str(tmp_path))
    assert ei.value.code == 3 and seen == [["--job-dir", str(tmp_path)]]
