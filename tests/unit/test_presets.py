"""Presets (the profile's models: table) and load_spec: the CLI's one layering, from Python too."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_vllm import options
from slurm_vllm.errors import SpecError, SpecErrors
from slurm_vllm.spec import Preset, ServeSpec, build_spec, load_spec, split_profile
from slurm_vllm.spec.presets import list_presets

SITE = """\
partition: gpu
gpus_per_node: 4
time: "01:00:00"
models:
  llama-70b: {model: org/Llama-3-70B, nodes: 2, gpus_per_node: 8, max_model_len: 8192}
  tiny: {model: org/tiny, extra_args: ["--enforce-eager"], max_model_len: 512, served_name: tiny, job_name: t1}
  org/plain:
"""


@pytest.fixture(autouse=True)
def _no_site_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_VLLM_PROFILE", "SLURM_VLLM_PARTITION", "SLURM_VLLM_TIME", "SLURM_VLLM_ACCOUNT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(SITE)
    return path


def errors_of(exc: pytest.ExceptionInfo[BaseException]) -> list[SpecError]:
    value = exc.value
    return value.errors if isinstance(value, SpecErrors) else [value]  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------


def test_a_profile_without_models_has_no_presets() -> None:
    own, presets = split_profile({"partition": "gpu"})
    assert own == {"partition": "gpu"} and presets == {}


def test_an_entry_without_a_model_serves_its_name() -> None:
    _, presets = split_profile({"models": {"org/plain": None}})
    assert presets["org/plain"].model == "org/plain"


@pytest.mark.parametrize(("table", "field", "words"), [
    (["llama"], "models", "is not a mapping"),
    ({"llama": ["org/x"]}, "models.llama", "is not a mapping"),
    ({"-x": {"model": "org/x"}}, "models.-x", "not starting with '-'"),
    ({"llama": {"model": 7}}, "models.llama.model", "is not a string"),
])
def test_a_malformed_table_names_the_entry(table: object, field: str, words: str) -> None:
    with pytest.raises((SpecError, SpecErrors)) as exc:
        split_profile({"models": table}, "profile site.yaml")
    (err,) = errors_of(exc)
    assert err.field == field and words in str(err)


def test_max_model_len_becomes_vllm_arguments_after_the_presets_own() -> None:
    layer = Preset("tiny", {"model": "org/tiny", "extra_args": ["--enforce-eager"], "max_model_len": 512}).layer()
    assert layer["extra_args"] == ["--enforce-eager", "--max-model-len", "512"]
    assert "model" not in layer and "max_model_len" not in layer


@pytest.mark.parametrize("value", [0, -1, "8k", True, 1.5])
def test_a_bad_max_model_len_is_refused_naming_the_preset(value: object) -> None:
    with pytest.raises(SpecError) as exc:
        Preset("p", {"max_model_len": value}).layer()
    assert exc.value.field == "models.p.max_model_len" and "whole number" in str(exc.value)


def test_an_unknown_field_in_a_preset_names_the_preset_and_the_closest_field() -> None:
    with pytest.raises(SpecErrors) as exc:
        Preset("llama", {"nodez": 2}).layer()
    (err,) = exc.value.errors
    assert err.field == "models.llama.nodez" and "did you mean 'nodes'?" in str(err)


def test_the_job_name_comes_from_the_preset_unless_it_sets_one() -> None:
    assert Preset("llama 70b/v2", {}).layer()["job_name"] == "v2"
    assert Preset("llama-70b", {}).layer()["job_name"] == "llama-70b"
    assert Preset("x", {"job_name": "mine"}).layer()["job_name"] == "mine"
    assert "job_name" not in Preset("x", {"resources": {"job_name": "mine"}}).layer()


# --------------------------------------------------------------------------------------------
# the preset as a layer
# --------------------------------------------------------------------------------------------


def test_submit_name_uses_the_preset_and_says_so(site: Path) -> None:
    spec, rows = build_spec({"model": "llama-70b"}, profile=site, environ={})
    assert spec.model.name == "org/Llama-3-70B"
    assert (spec.nodes, spec.gpus_per_node, spec.partition) == (2, 8, "gpu")
    assert spec.extra_args == ["--max-model-len", "8192"] and spec.job_name == "llama-70b"
    src = {f: s for f, _, s in rows}
    assert src["model"] == src["nodes"] == src["gpus_per_node"] == f"preset llama-70b (profile {site})"
    assert src["partition"] == f"profile {site}"


def test_flags_config_and_environment_win_over_the_preset(site: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("gpus_per_node: 4\nallow_partial: true\n")
    spec, rows = build_spec({"model": "llama-70b", "nodes": 1, "job_name": "mine"}, config=config, profile=site,
                            environ={"SLURM_VLLM_TIME": "02:00:00"})
    assert (spec.nodes, spec.gpus_per_node, spec.time, spec.job_name) == (1, 4, "02:00:00", "mine")
    assert spec.model.name == "org/Llama-3-70B"
    assert {f: s for f, _, s in rows}["gpus_per_node"] == f"config {config}"


def test_extra_args_given_later_replace_the_presets_whole(site: Path) -> None:
    spec, _ = build_spec({"model": "tiny", "extra_args": ["--max-num-seqs", "4"]}, profile=site, environ={})
    assert spec.extra_args == ["--max-num-seqs", "4"]
    assert (spec.served_name, spec.job_name) == ("tiny", "t1")


def test_a_config_file_may_name_the_preset(site: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model: llama-70b\ntime: '03:00:00'\n")
    spec, _ = build_spec({}, config=config, profile=site, environ={})
    assert spec.model.name == "org/Llama-3-70B" and spec.time == "03:00:00"


def test_a_model_that_is_no_preset_is_served_as_given(site: Path) -> None:
    spec, _ = build_spec({"model": "org/other"}, profile=site, environ={})
    assert (spec.model.name, spec.nodes, spec.gpus_per_node, spec.job_name) == ("org/other", 1, 4, "other")


def test_the_profile_from_the_environment_brings_its_presets(site: Path) -> None:
    spec, _ = build_spec({"model": "llama-70b"}, environ={"SLURM_VLLM_PROFILE": str(site)})
    assert spec.model.name == "org/Llama-3-70B"


def test_a_broken_preset_stops_only_its_own_use(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("models:\n  bad: {nodez: 2}\n  good: {model: org/good}\n")
    assert build_spec({"model": "good"}, profile=site, environ={})[0].model.name == "org/good"
    with pytest.raises(SpecErrors, match=r"models\.bad\.nodez"):
        build_spec({"model": "bad"}, profile=site, environ={})


def test_a_local_preset_model_is_checked_like_any_local_model(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(f"models:\n  here: {{model: {tmp_path / 'missing'}}}\n")
    with pytest.raises(SpecErrors, match="model="):
        build_spec({"model": "here"}, profile=site, environ={})


# --------------------------------------------------------------------------------------------
# Python: load_spec and ServeSpec(profile=, config=)
# --------------------------------------------------------------------------------------------


def test_load_spec_builds_what_the_cli_builds(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("time: '03:00:00'\n")
    monkeypatch.setenv("SLURM_VLLM_ACCOUNT", "proj")
    ns = {"model": "llama-70b", "profile": str(site), "config": str(config), "nodes": 1, "allow_partial": True}
    from_cli, _ = options.spec_from_args(ns)
    from_python = load_spec("llama-70b", profile=site, config=config, nodes=1, allow_partial=True)
    assert from_python == from_cli
    assert from_python.account == "proj" and from_python.time == "03:00:00"


def test_load_spec_honours_the_profile_variable_as_the_cli_does(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_PROFILE", str(site))
    assert load_spec("llama-70b").model.name == "org/Llama-3-70B"
    assert load_spec("org/M").partition == "gpu"


def test_servespec_with_a_profile_or_config_is_load_spec(site: Path, tmp_path: Path) -> None:
    assert ServeSpec("llama-70b", profile=site, time="02:00:00") == load_spec("llama-70b", profile=site,
                                                                               time="02:00:00")
    config = tmp_path / "c.yaml"
    config.write_text("model: org/from-config\nnodes: 2\ngpus_per_node: 1\n")
    assert ServeSpec(config=config).model.name == "org/from-config"


def test_plain_servespec_reads_no_file_and_no_environment(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_PROFILE", str(site))
    monkeypatch.setenv("SLURM_VLLM_PARTITION", "env")
    spec = ServeSpec("llama-70b")
    assert (spec.model.name, spec.partition) == ("llama-70b", None)


def test_load_spec_names_a_bad_keyword_with_the_closest_field() -> None:
    with pytest.raises(SpecErrors, match="did you mean 'gpus_per_node'"):
        load_spec("org/M", gpus_per_nod=2)


# --------------------------------------------------------------------------------------------
# listing
# --------------------------------------------------------------------------------------------


def test_list_presets_resolves_each_and_shows_a_broken_ones_error(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE + "  bad: {model: org/x, nodez: 2}\n")
    rows = {r.name: r for r in list_presets(site, environ={})}
    assert list(rows) == ["llama-70b", "tiny", "org/plain", "bad"]
    llama = rows["llama-70b"].to_dict()
    assert llama["spec"]["tensor_parallel_size"] == 8 and llama["spec"]["pipeline_parallel_size"] == 2
    assert llama["fields"]["max_model_len"] == 8192 and llama["error"] is None
    assert rows["bad"].spec is None and "models.bad.nodez" in (rows["bad"].error or "")
