"""ServeSpec: construction, files and layers, and every validation rule's message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slurm_vllm.errors import SpecError, SpecErrors, shown
from slurm_vllm.spec import (
    ServeSpec,
    build_spec,
    check_spec,
    load_spec_file,
    load_spec_json,
    read_spec_file,
)


def errors_of(*args, **kwargs) -> list[SpecError]:
    with pytest.raises(SpecErrors) as info:
        ServeSpec(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value.errors


def one_error(field: str, *args, **kwargs) -> SpecError:
    """The error about ``field``; its message must name the field and the value."""
    errs = [e for e in errors_of(*args, **kwargs) if e.field == field]
    assert errs, f"no error for {field}: {errors_of(*args, **kwargs)}"
    err = errs[0]
    text = str(err)
    assert text.startswith(f"{field}=")
    assert shown(err.value) in text
    assert err.fix and err.fix in text
    return err


# --- construction ------------------------------------------------------------------------


def test_flat_names_map_into_sections():
    s = ServeSpec("org/M", nodes=2, gpus_per_node=8, partition="gpu", backend="ray", env={"A": "b"},
                  setup=["module load cuda"], job_name="j", port=8123, no_api_key=True,
                  vllm_args=["--max-model-len", "256"], time="01:00:00", sbatch_args=["--mail-type=END"])
    assert s.model.name == "org/M"
    assert s.resources.nodes == 2 and s.resources.gpus_per_node == 8
    assert s.resources.partition == "gpu" and s.resources.time == "01:00:00"
    assert s.environment.env == {"A": "b"} and s.environment.setup == ["module load cuda"]
    assert s.serve.port == 8123 and s.serve.api_key is False
    assert s.model.extra_args == ["--max-model-len", "256"]
    assert s.tensor_parallel_size == 8 and s.pipeline_parallel_size == 2


def test_api_key_false_and_extra_args_spelling():
    s = ServeSpec("org/M", api_key=False, extra_args=["--dtype", "half"])
    assert s.serve.api_key is False and s.model.extra_args == ["--dtype", "half"]


def test_nested_sections_accepted_and_equal_to_flat():
    nested = ServeSpec(model={"name": "org/M", "served_name": "m"}, resources={"nodes": 2, "gpus_per_node": 4})
    flat = ServeSpec("org/M", served_name="m", nodes=2, gpus_per_node=4)
    assert nested == flat


def test_defaults():
    s = ServeSpec("org/M")
    assert s.backend == "ray" and s.serve.api_key is True
    assert s.tensor_parallel_size == 1 and s.pipeline_parallel_size == 1
    assert s.resources.signal_grace == 120


def test_spec_json_round_trip(tmp_path):
    s = ServeSpec("org/M", nodes=2, gpus_per_node=2, env={"K": "v w"}, setup=["echo hi"])
    data = s.model_dump(mode="json")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    assert ServeSpec.model_validate(data) == s
    assert load_spec_json(path) == s


def test_load_spec_json_skips_filesystem_checks(tmp_path):
    data = ServeSpec("org/M").model_dump(mode="json")
    data["model"]["name"] = "/nowhere/on/this/node"
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    assert load_spec_json(path).model.name == "/nowhere/on/this/node"


def test_load_spec_json_damaged_names_the_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text("{not json")
    with pytest.raises(SpecError) as info:
        load_spec_json(path)
    assert str(path) in str(info.value) and "malformed" in str(info.value)


def test_model_given_twice():
    err = one_error("model", "org/M", model="org/N")
    assert "once" in err.fix


def test_field_given_twice_flat_and_nested():
    errs = errors_of("org/M", nodes=2, resources={"nodes": 3})
    assert any("given twice" in str(e) for e in errs)


def test_missing_model():
    err = one_error("model", nodes=1)
    assert "hub id" in err.fix


# --- files -----------------------------------------------------------------------------


def test_yaml_and_toml_files_same_names(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("model: org/M\nnodes: 2\ngpus_per_node: 2\nenv:\n  A: b\nresources:\n  time: '10'\n")
    t = tmp_path / "s.toml"
    t.write_text('model = "org/M"\nnodes = 2\ngpus_per_node = 2\n[env]\nA = "b"\n[resources]\ntime = "10"\n')
    assert load_spec_file(y) == load_spec_file(t)
    assert load_spec_file(y).resources.time == "10"


def test_unreadable_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        read_spec_file(missing)
    assert str(missing) in str(info.value) and "cannot be read" in str(info.value)


@pytest.mark.parametrize("name,text", [("bad.yaml", "model: [unclosed\n"), ("bad.toml", "model = \n")])
def test_malformed_file_names_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        read_spec_file(path)
    assert str(path) in str(info.value) and "malformed" in str(info.value)
    assert "fix the syntax" in info.value.fix


def test_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="not a mapping"):
        read_spec_file(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "spec.ini"
    path.write_text("x")
    with pytest.raises(SpecError, match=r"\.yaml, \.yml, \.toml"):
        read_spec_file(path)


# --- layering ---------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_defaults_profile_config_env_flags(tmp_path):
    profile = _write(tmp_path / "site.yaml",
                     "partition: p-profile\naccount: a-profile\nqos: q-profile\ntime: '5'\n"
                     "env: {SITE: '1', SHARED: profile}\nsetup: ['module load cuda']\n")
    config = _write(tmp_path / "model.yaml",
                    "model: org/M\naccount: a-config\nqos: q-config\ntime: '6'\nenv: {SHARED: config}\n")
    environ = {"SLURM_VLLM_QOS": "q-env", "SLURM_VLLM_TIME": "7"}
    spec, rows = build_spec({"time": "8"}, config=config, profile=profile, environ=environ,
                            flag_sources={"time": "flag --time"})
    r = spec.resources
    assert (r.partition, r.account, r.qos, r.time) == ("p-profile", "a-config", "q-env", "8")
    assert spec.environment.env == {"SITE": "1", "SHARED": "config"}
    assert spec.environment.setup == ["module load cuda"]
    src = {f: s for f, _v, s in rows}
    assert src["partition"] == f"profile {profile}"
    assert src["account"] == f"config {config}"
    assert src["qos"] == "environment variable SLURM_VLLM_QOS"
    assert src["time"] == "flag --time"
    assert src["nodes"] == "default"
    assert src["env.SHARED"] == f"config {config}" and src["env.SITE"] == f"profile {profile}"
    values = {f: v for f, v, _s in rows}
    assert values["time"] == "8" and values["model"] == "org/M"


def test_profile_from_environment_variable(tmp_path):
    profile = _write(tmp_path / "site.toml", 'partition = "from-env-profile"\n')
    spec, rows = build_spec({"model": "org/M"}, environ={"SLURM_VLLM_PROFILE": str(profile)})
    assert spec.resources.partition == "from-env-profile"


def test_unknown_field_in_file_suggests(tmp_path):
    config = _write(tmp_path / "s.yaml", "model: org/M\ngpus_per_nod: 2\n")
    with pytest.raises(SpecErrors) as info:
        build_spec(config=config, environ={})
    assert "gpus_per_nod" in str(info.value) and "did you mean 'gpus_per_node'" in str(info.value)


# --- validation rules: each message names field, value and fix --------------------------


def test_unknown_field_suggests_closest():
    err = one_error("partiton", "org/M", partiton="gpu")
    assert "did you mean 'partition'" in err.fix


def test_unknown_nested_field_suggests_closest():
    err = one_error("resources.gpu_per_node", "org/M", resources={"gpu_per_node": 2})
    assert "did you mean 'gpus_per_node'" in err.fix
    err = one_error("resources.gpus", "org/M", resources={"gpus": 2})
    assert "valid names: nodes, gpus_per_node" in err.fix


def test_tp_times_pp_must_fill_the_allocation():
    err = one_error("tensor_parallel_size", "org/M", nodes=2, gpus_per_node=8, tensor_parallel_size=4)
    assert "leaves GPUs idle" in str(err) and "allow_partial" in err.fix and "16" in err.fix


def test_allow_partial_permits_fewer_gpus():
    s = ServeSpec("org/M", nodes=2, gpus_per_node=8, tensor_parallel_size=4, allow_partial=True)
    assert s.tensor_parallel_size * s.pipeline_parallel_size == 8


def test_tp_times_pp_above_the_allocation_refused_even_with_allow_partial():
    err = one_error("tensor_parallel_size", "org/M", nodes=1, gpus_per_node=2, tensor_parallel_size=4,
                    allow_partial=True)
    assert "needs more GPUs" in err.fix


def test_tp_above_gpus_per_node_refused_with_mp():
    err = one_error("tensor_parallel_size", "org/M", nodes=2, gpus_per_node=4, tensor_parallel_size=8,
                    pipeline_parallel_size=1, backend="mp")
    assert "larger than gpus_per_node" in str(err) and "backend 'ray'" in err.fix


def test_tp_above_gpus_per_node_allowed_with_ray():
    s = ServeSpec("org/M", nodes=2, gpus_per_node=4, tensor_parallel_size=8, pipeline_parallel_size=1)
    assert s.tensor_parallel_size == 8


def test_mp_world_size_must_divide_over_nodes():
    err = one_error("pipeline_parallel_size", "org/M", nodes=3, gpus_per_node=0, tensor_parallel_size=1,
                    pipeline_parallel_size=2, backend="mp")
    assert "multiple of nodes" in err.fix


def test_cpu_only_nodes_skip_gpu_count():
    s = ServeSpec("org/M", nodes=2, gpus_per_node=0, tensor_parallel_size=2, pipeline_parallel_size=1)
    assert s.tensor_parallel_size == 2


@pytest.mark.parametrize("good", ["30", "30:00", "01:00:00", "2-12", "2-12:30", "2-12:30:00", "UNLIMITED"])
def test_good_times(good):
    assert ServeSpec("org/M", time=good).resources.time == good


@pytest.mark.parametrize("bad", ["1h", "1:2:3:4", "-1", "01:00:00:00", "2-", "1.5", ""])
def test_bad_times(bad):
    err = one_error("time", "org/M", time=bad)
    assert "HH:MM:SS" in err.fix


@pytest.mark.parametrize("bad", [0, 80, 1023, 65536, -1])
def test_ports_out_of_range(bad):
    err = one_error("port", "org/M", port=bad)
    assert "1024..65535" in err.fix


def test_port_in_range():
    assert ServeSpec("org/M", port=1024).serve.port == 1024


def test_local_model_missing(tmp_path):
    missing = tmp_path / "no-model"
    err = one_error("model", str(missing))
    assert "does not exist" in str(err) and "hub id" in err.fix


def test_local_model_without_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    err = one_error("model", str(tmp_path / "m"))
    assert "config.json" in str(err)


def test_local_model_relative_path_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    s = ServeSpec("./m")
    assert s.model.name == str(tmp_path / "m") and s.is_local_model


def test_hub_id_not_checked():
    assert ServeSpec("org/does-not-exist-here").model.name == "org/does-not-exist-here"


@pytest.mark.parametrize("where", [
    {"job_name": "a\nb"}, {"env": {"K": "a\nb"}}, {"setup": ["echo a\rb"]}, {"extra_args": ["x\x00"]},
    {"partition": "p\n"}, {"served_name": "x\ny"},
])
def test_newlines_refused_everywhere(where):
    errs = errors_of("org/M", **where)
    assert any(("holds a newline" in str(e) and "remove the newline" in e.fix)
               or ("holds a NUL" in str(e) and "remove the NUL" in e.fix) for e in errs)
    field = next(iter(where))
    assert any(e.field.startswith(field) for e in errs)


def test_newline_in_model_refused():
    err = one_error("model", "org/M\nx")
    assert "newline" in str(err)


def test_job_dir_with_backslash_refused(tmp_path):
    err = one_error("job_dir", "org/M", job_dir=str(tmp_path / "a\\b"))
    assert "backslash" in err.fix


@pytest.mark.parametrize("arg,fix_word", [
    (["--tensor-parallel-size", "4"], "set tensor_parallel_size"),
    (["--tensor_parallel_size=4"], "set tensor_parallel_size"),
    (["-tp", "4"], "set tensor_parallel_size"),
    (["--pipeline-parallel-size=3"], "set pipeline_parallel_size"),
    (["--distributed-executor-backend", "mp"], "set backend"),
    (["--port", "9000"], "set port"),
    (["--host", "0.0.0.0"], "remove it"),
    (["--api-key", "k"], "api_key"),
    (["--nnodes", "2"], "set nodes"),
    (["--node-rank", "1"], "rank comes from Slurm"),
    (["--master-addr", "h"], "remove it"),
    (["--master-port", "1"], "remove it"),
    (["--headless"], "remove it"),
])
def test_conflicting_vllm_args_refused(arg, fix_word):
    err = one_error("extra_args[0]", "org/M", extra_args=arg)
    assert fix_word in err.fix


def test_vllm_args_repeating_the_spec_are_refused_too():
    # the node program refuses duplicates of flags it sets; catch them before submission
    err = one_error("extra_args[0]", "org/M", nodes=1, gpus_per_node=2, extra_args=["--tensor-parallel-size", "2"])
    assert "now 2" in err.fix


def test_other_vllm_args_pass_through():
    s = ServeSpec("org/M", extra_args=["--max-model-len", "256", "--dtype=float32"])
    assert s.model.extra_args == ["--max-model-len", "256", "--dtype=float32"]


@pytest.mark.parametrize("name", ["1BAD", "A-B", "A B", ""])
def test_bad_env_names(name):
    err = one_error(f"env.{name}", "org/M", env={name: "v"})
    assert "letters, digits and _" in err.fix


def test_reserved_env_name():
    err = one_error("env.SLURM_VLLM_JOB_DIR", "org/M", env={"SLURM_VLLM_JOB_DIR": "/x"})
    assert "reserved" in str(err)


@pytest.mark.parametrize("arg,word", [
    ("--ntasks=4", "not an allowed sbatch option"),
    ("--output=/x", "set job_dir instead"),
    ("--nodes=3", "set nodes instead"),
    ("-p gpu", "long form"),
    ("--mail-typ=END", "--mail-type"),
    ("--export=NONE", "not an allowed"),
])
def test_sbatch_args_allow_list(arg, word):
    err = one_error("sbatch_args[0]", "org/M", sbatch_args=[arg])
    assert word in str(err)


def test_sbatch_args_allowed():
    s = ServeSpec("org/M", sbatch_args=["--mail-type=END,FAIL", "--reservation=r1", "--requeue"])
    assert len(s.resources.sbatch_args) == 3


@pytest.mark.parametrize("field,value,word", [
    ("nodes", 0, "at least 1"),
    ("gpus_per_node", -1, "0 (CPU-only nodes)"),
    ("cpus_per_task", 0, "1 or more"),
    ("tensor_parallel_size", 0, "1 or more"),
    ("mem", "lots", "64G"),
    ("signal_grace", 0, "1..65535"),
    ("join_timeout", 0, "positive"),
    ("ready_timeout", -1, "positive"),
    ("interface", "not an iface!", "ib0"),
    ("cidr", "10.0.0.0/99", "10.1.0.0/16"),
    ("python", " ", "python3"),
    ("job_name", " ", "non-empty"),
    ("container_binds", ["relative/dir"], "absolute"),
    ("setup", [" "], "empty setup line"),
    ("nodes", "two", "whole number"),
    ("backend", "slurm", "'ray' (default) or 'mp'"),
    ("exclusive", "maybe", "true or false"),
    ("job_name", "my-hetjob", "hetjob"),
    ("job_dir", "/scratch/packjob-runs", "packjob"),
])
def test_other_rules(field, value, word):
    errs = errors_of("org/M", **{field: value})
    assert any(e.field.split("[")[0] == field and word in str(e) and repr(e.value) in str(e) for e in errs), errs


def test_interface_and_cidr_conflict():
    err = one_error("cidr", "org/M", interface="ib0", cidr="10.0.0.0/8")
    assert "not both" in err.fix


def test_venv_and_container_checked(tmp_path):
    err = one_error("venv", "org/M", venv=str(tmp_path))
    assert "bin/activate" in err.fix
    err = one_error("container", "org/M", container=str(tmp_path / "img.sif"))
    assert ".sif" in err.fix
    assert ServeSpec("org/M", container="docker://org/image:1").environment.container == "docker://org/image:1"


def test_several_errors_reported_together():
    errs = errors_of("org/M", time="soon", port=1, mem="x")
    assert {e.field for e in errs} >= {"time", "port", "mem"}


def test_check_spec_after_in_place_edit():
    s = ServeSpec("org/M")
    s.resources.nodes = 2  # section-level assignment cannot see the cross-field rules
    s.resources.gpus_per_node = 2
    s.parallel.tensor_parallel_size = 1
    assert any(e.field == "tensor_parallel_size" for e in check_spec(s, check_paths=False))


# --- CLI options -> spec ----------------------------------------------------------------------


def test_cli_flags_build_the_same_spec(tmp_path):
    import argparse

    from slurm_vllm.cli import split_vllm_args
    from slurm_vllm.options import add_spec_options, format_explain, spec_from_args

    parser = argparse.ArgumentParser()
    add_spec_options(parser)
    own, vllm = split_vllm_args(["org/M", "--nodes", "2", "--gpus-per-node", "4", "-p", "gpu",
                                 "--env", "A=b=c", "--setup", "module load x", "--no-api-key",
                                 "--sbatch-arg=--mail-type=END", "--", "--max-model-len", "256"])
    ns = parser.parse_args(own)
    assert not hasattr(ns, "time")  # unset flags never override lower layers
    spec, rows = spec_from_args(ns, vllm, environ={"SLURM_VLLM_PARTITION": "env-part"})
    assert spec == ServeSpec("org/M", nodes=2, gpus_per_node=4, partition="gpu", env={"A": "b=c"},
                             setup=["module load x"], api_key=False, sbatch_args=["--mail-type=END"],
                             extra_args=["--max-model-len", "256"])
    src = {f: s for f, _v, s in rows}
    assert src["partition"] == "flag --partition" and src["api_key"] == "flag --no-api-key"
    assert src["model"] == "argument MODEL" and src["extra_args"] == "arguments after --"
    text = format_explain(rows)
    assert "partition" in text and "flag --partition" in text


def test_cli_env_flag_needs_key_value():
    from slurm_vllm.options import flags_from_namespace

    with pytest.raises(SpecErrors, match="KEY=VALUE"):
        flags_from_namespace({"env": ["NOEQUALS"]})


def test_assignment_revalidates_whole_spec():
    s = ServeSpec("org/M", nodes=2, gpus_per_node=1)
    s.nodes = 4  # flat names work on assignment too
    assert s.resources.nodes == 4 and s.pipeline_parallel_size == 4
    s.resources = {"nodes": 2, "gpus_per_node": 2}
    assert s.tensor_parallel_size == 2
    with pytest.raises(SpecErrors) as info:
        s.port = 80
    assert info.value.errors[0].field == "port"
    assert s.serve.port is None  # unchanged after a refused assignment
    s.job_dir = "relative/dir"
    assert Path(s.job_dir).is_absolute()


def test_job_dir_with_colon_refused_with_container():
    err = one_error("job_dir", "org/M", job_dir="/scratch/a:b", container="docker://org/img:1")
    assert "--bind" in err.fix
    assert ServeSpec("org/M", job_dir="/scratch/a:b").job_dir == "/scratch/a:b"


# --- hardening: no value switches security off or escapes ----------------------------------


@pytest.mark.parametrize("word", ["false", "False", "FALSE", "0", 0, False])
def test_no_api_key_false_words_keep_the_key(word):
    assert ServeSpec("org/M", no_api_key=word).serve.api_key is True


@pytest.mark.parametrize("word", ["true", "True", "1", 1, True])
def test_no_api_key_true_words_turn_it_off(word):
    assert ServeSpec("org/M", no_api_key=word).serve.api_key is False


@pytest.mark.parametrize("field", ["no_api_key", "exclusive", "allow_partial", "api_key"])
@pytest.mark.parametrize("word", ["no", "off", "yes", "on", "n", "2", "", "maybe"])
def test_unclear_booleans_are_refused_naming_the_field(field, word):
    err = one_error(field, "org/M", **{field: word})
    assert err.problem == "is not a boolean" and "true or false" in err.fix


def test_no_api_key_from_a_file_is_strict_too(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text('model: org/M\nno_api_key: "false"\n')
    spec, _ = build_spec(config=cfg, environ={})
    assert spec.serve.api_key is True
    cfg.write_text('model: org/M\nserve: {api_key: "off"}\n')
    with pytest.raises(SpecErrors, match="api_key='off' is not a boolean"):
        build_spec(config=cfg, environ={})


def test_assigning_no_api_key_is_strict():
    spec = ServeSpec("org/M")
    spec.no_api_key = "false"
    assert spec.serve.api_key is True
    with pytest.raises(SpecErrors, match="not a boolean"):
        spec.no_api_key = "no"


@pytest.mark.parametrize("field,value", [("model", "--api-key=stolen"), ("model", "-x"),
                                         ("served_name", "--api-key=x"), ("served_name", "-m")])
def test_names_starting_with_a_dash_are_refused(field, value):
    kwargs = {"served_name": value} if field == "served_name" else {}
    err = one_error(field, value if field == "model" else "org/M", **kwargs)
    assert err.problem == "starts with '-'"


@pytest.mark.parametrize("arg,flag", [
    (["--api-k=x"], "--api-key"), (["--api_k", "x"], "--api-key"), (["--tensor-parallel=4"], "--tensor-parallel-size"),
    (["--pipeline-par", "2"], "--pipeline-parallel-size"), (["--hos", "0.0.0.0"], "--host"),
    (["--served-model", "x"], "--served-model-name"), (["-n2"], "-n"), (["-r1"], "-r"), (["-t", "4"], "-tp"),
    (["--distributed-exec=mp"], "--distributed-executor-backend"), (["--head"], "--headless"),
    (["--api-key.x=v"], "--api-key"), (["--api-k.x=v"], "--api-key"), (["--served-model-name.a", "b"], "--served-model-name"),
    (["--port+=1"], "--port"), (["--config", "vllm.yaml"], "--config"), (["--conf=vllm.yaml"], "--config"),
])
def test_abbreviated_owned_vllm_flags_are_refused(arg, flag):
    err = one_error("extra_args[0]", "org/M", extra_args=arg)
    assert err.problem == "is set by the tool" and flag in str(err)


def test_vllm_flags_that_only_share_a_prefix_pass():
    args = ["--model-impl", "vllm", "--max-model-len", "64", "--port-offset-x", "-O0", "--trust-remote-code",
            "--config-format=auto", "--compilation-config.level=3"]
    assert ServeSpec("org/M", extra_args=args).model.extra_args == args


@pytest.mark.parametrize("value", ["a\x1fb", "a\x1bb", "a\x7fb", "a\x01b"])
@pytest.mark.parametrize("field", ["job_name", "partition", "model", "job_dir"])
def test_control_characters_are_refused_like_newlines(field, value):
    kwargs = {field: value} if field != "model" else {}
    err = one_error(field, value if field == "model" else "org/M", **kwargs)
    assert err.problem.startswith("holds a control character 0x")


def test_a_tab_is_not_a_control_character_to_refuse():
    assert ServeSpec("org/M", setup=["\tmodule load x"]).environment.setup == ["\tmodule load x"]


@pytest.mark.parametrize("time", ["1", "2", "2:59", "00:02:00"])
def test_time_limits_shorter_than_the_warning_are_refused(time):
    err = one_error("time", "org/M", time=time, signal_grace=120)
    assert "00:03:00" in err.fix and "signal_grace" in err.fix


@pytest.mark.parametrize("time,grace", [("3", 120), ("00:03:00", 120), ("1-0", 120), ("2", 30), ("infinite", 120),
                                        ("0", 120), ("0-0", 120)])
def test_time_limits_leaving_room_after_the_warning_pass(time, grace):
    assert ServeSpec("org/M", time=time, signal_grace=grace).resources.time == time


@pytest.mark.parametrize("field", ["join_timeout", "cluster_timeout", "ready_timeout"])
@pytest.mark.parametrize("value", [float("inf"), 1e10, float("nan"), -1, 0])
def test_unbounded_timeouts_are_refused_with_the_bounds(field, value):
    errs = [e for e in errors_of("org/M", **{field: value}) if e.field == field]
    assert errs and "2592000" in errs[0].fix


def test_yaml_sexagesimal_time_stays_the_text_written(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("model: org/M\ntime: 1:30:00\nnodes: 2\njoin_timeout: 30.5\n")
    spec, _ = build_spec(config=cfg, environ={})
    assert spec.resources.time == "1:30:00" and spec.resources.nodes == 2 and spec.ray.join_timeout == 30.5


def test_a_bare_number_time_means_minutes():
    assert ServeSpec("org/M", time=90).resources.time == "90"


def test_env_numbers_become_text_and_lists_of_assignments_are_read(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("model: org/M\nenv: {X: 8, Y: 0x10, Z: 1_000}\n")
    assert build_spec(config=cfg, environ={})[0].environment.env == {"X": "8", "Y": "0x10", "Z": "1_000"}
    cfg.write_text("model: org/M\nenv: [A=1, B=x=y]\n")
    assert build_spec(config=cfg, environ={})[0].environment.env == {"A": "1", "B": "x=y"}


@pytest.mark.parametrize("env,field,fix", [
    ({"X": True}, "env.X", 'quote the value'), ({"X": None}, "env.X", "quote the value"),
    ({"CUDA_VER": 12.10}, "env.CUDA_VER", "quote the value"),
    ({"X": [1]}, "env.X", "quote the value"), ("A=1", "env", "mapping"), (["A"], "env[0]", "NAME=value"),
])
def test_env_values_that_are_not_text_say_how_to_write_them(env, field, fix):
    err = one_error(field, "org/M", env=env)
    assert fix in err.fix


def test_env_given_as_a_list_in_a_file_is_not_dropped(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("model: org/M\nenv: [NOPE]\n")
    with pytest.raises(SpecError, match="NAME=value"):
        build_spec(config=cfg, environ={})


def test_a_yaml_alias_bomb_is_refused_fast_with_a_short_message(tmp_path):
    import time

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\nmodel: org/M\nextra_args: *i\n")
    t0 = time.monotonic()
    with pytest.raises(SpecError) as info:
        build_spec(config=cfg, environ={})
    assert time.monotonic() - t0 < 5
    assert info.value.problem == "expands to too many values" and len(str(info.value)) < 1000


def test_error_messages_cut_long_values():
    err = one_error("job_name", "org/M", job_name="x\x01" + "y" * 5000)
    assert len(str(err)) < 600 and "characters)" in str(err)


# --------------------------------------------------------------------------- replicas


def test_replicas_split_the_nodes_and_tp_pp_fill_one_replica() -> None:
    s = ServeSpec("org/m", nodes=3, replicas=3, gpus_per_node=2)
    assert (s.replicas, s.nodes_per_replica, s.tensor_parallel_size, s.pipeline_parallel_size) == (3, 1, 2, 1)
    assert s.min_ready_replicas == 3
    assert ServeSpec("org/m", nodes=2, replicas=2, min_ready_replicas=1).min_ready_replicas == 1
    assert (s.executor, ServeSpec("org/m", nodes=2).executor, ServeSpec("org/m", backend="mp").executor) == \
        ("local", "ray", "mp")


def test_a_replica_of_several_nodes_runs_vllms_mp_backend_over_them() -> None:
    s = ServeSpec("org/m", nodes=4, replicas=2, gpus_per_node=2)
    assert (s.nodes_per_replica, s.tensor_parallel_size, s.pipeline_parallel_size, s.executor) == (2, 2, 2, "mp")


@pytest.mark.parametrize(("kw", "field", "words"), [
    ({"nodes": 3, "replicas": 2}, "replicas", "must be a multiple of replicas"),
    ({"nodes": 2, "replicas": 0}, "replicas", "use 1"),
    ({"nodes": 4, "replicas": 2, "gpus_per_node": 2, "tensor_parallel_size": 4, "pipeline_parallel_size": 1},
     "tensor_parallel_size", "replicas of several nodes run vLLM's mp backend"),
    ({"nodes": 2, "replicas": 2, "min_ready_replicas": 3}, "min_ready_replicas", "use 1 to replicas (2)"),
    ({"nodes": 2, "replicas": 2, "replica_restarts": -1}, "replica_restarts", "0 (never restart) to 100"),
    ({"nodes": 2, "replicas": 2, "router_policy": "fastest"}, "router_policy", "round_robin"),
    ({"nodes": 2, "replicas": 2, "gpus_per_node": 2, "tensor_parallel_size": 4}, "tensor_parallel_size",
     "nodes per replica x gpus_per_node = 1 x 2"),
])
def test_replica_settings_are_checked_with_field_and_fix(kw: dict, field: str, words: str) -> None:
    with pytest.raises(SpecErrors) as info:
        ServeSpec("org/m", **kw)
    assert any(e.field == field and words in str(e) for e in info.value.errors), str(info.value)


def test_cache_dir_is_made_absolute_none_stays_a_word(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ServeSpec("org/M", cache_dir="c").environment.cache_dir == str(tmp_path / "c")
    assert ServeSpec("org/M", cache_dir="none").environment.cache_dir == "none"
    assert ServeSpec("org/M").environment.cache_dir is None


def test_cache_dir_empty_or_unbindable_is_refused(tmp_path):
    err = one_error("cache_dir", "org/M", cache_dir=" ")
    assert "none" in err.fix
    err = one_error("cache_dir", "org/M", cache_dir="/scratch/a:b", container="docker://org/img:1")
    assert "--bind" in err.fix


def test_stage_weights_needs_a_local_model(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    spec = ServeSpec(str(model), stage_weights="shm", keep_staged="true")
    assert (spec.model.stage_weights, spec.model.keep_staged) == ("shm", True)
    assert ServeSpec(str(model)).model.stage_weights == "none"
    with pytest.raises(SpecErrors, match=r"stage_weights='local' needs a local model path, not a hub id: .*"
                                         r"give that path as model, or set stage_weights: none"):
        ServeSpec("org/M", stage_weights="local")
    with pytest.raises(SpecErrors, match="stage_weights"):
        ServeSpec(str(model), stage_weights="nvme")
