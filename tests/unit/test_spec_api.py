"""ServeSpec from Python: flat reads as well as writes, a compact repr, the job name from the model."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest

from slurm_vllm.errors import SpecErrors
from slurm_vllm.spec import ServeSpec, explain, job_name_for


def test_flat_names_read_as_they_write() -> None:
    spec = ServeSpec("org/M", nodes=2, gpus_per_node=8, partition="gpu", env={"A": "1"}, served_name="m")
    assert (spec.nodes, spec.gpus_per_node, spec.partition, spec.env, spec.served_name) == (2, 8, "gpu", {"A": "1"}, "m")
    assert (spec.join_timeout, spec.ray_join_timeout, spec.modules, spec.no_api_key) == (300.0, 300.0, [], False)
    spec.partition = "other"
    assert spec.partition == "other" == spec.resources.partition


def test_aliases_of_derived_sizes_read_the_sizes_vllm_gets() -> None:
    spec = ServeSpec("org/M", nodes=2, gpus_per_node=4)
    assert (spec.tp, spec.pp) == (spec.tensor_parallel_size, spec.pipeline_parallel_size) == (4, 2)


def test_an_unknown_name_is_an_attribute_error_with_the_closest_field() -> None:
    spec = ServeSpec("org/M")
    with pytest.raises(AttributeError, match="did you mean 'nodes'"):
        _ = spec.nodez
    assert not hasattr(spec, "no_such_thing")
    assert getattr(spec, "no_such_thing", "fallback") == "fallback"


def test_the_repr_shows_only_what_differs_from_the_defaults() -> None:
    spec = ServeSpec("org/M", nodes=2, gpus_per_node=8, partition="gpu")
    assert repr(spec) == "ServeSpec('org/M', nodes=2, gpus_per_node=8, partition='gpu')"
    assert str(spec) == repr(spec)
    assert repr(ServeSpec("org/M")) == "ServeSpec('org/M')"
    other = ServeSpec("org/M", job_name="x", no_api_key=True, backend="mp", extra_args=["--enforce-eager"])
    assert repr(other) == "ServeSpec('org/M', extra_args=['--enforce-eager'], job_name='x', no_api_key=True, backend='mp')"


def test_the_repr_evaluates_back_to_the_same_spec() -> None:
    spec = ServeSpec("org/M", nodes=2, gpus_per_node=4, time="01:00:00", env={"A": "1"}, sbatch_args=["--requeue"])
    assert eval(repr(spec), {"ServeSpec": ServeSpec}) == spec  # noqa: S307 - our own repr


def test_the_repr_hides_secret_looking_env_values() -> None:
    spec = ServeSpec("org/M", env={"HF_TOKEN": "hf_secret", "WANDB_API_KEY": "k", "HF_HOME": "/hf"})
    text = repr(spec)
    assert "hf_secret" not in text and "'k'" not in text and "'/hf'" in text


def test_copies_and_pickles_keep_working() -> None:
    spec = ServeSpec("org/M", nodes=2, gpus_per_node=1)
    assert copy.deepcopy(spec) == spec and pickle.loads(pickle.dumps(spec)) == spec  # noqa: S301


@pytest.mark.parametrize(("model", "name"), [
    ("org/Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"),
    ("/shared/models/Llama 3 70B/", "Llama-3-70B"),
    ("org/" + "x" * 80, "x" * 40),
    ("org/$(rm -rf ~)", "rm-rf"),
    ("org/...", "vllm"),
    ("org/my-hetjob", "vllm"),
])
def test_the_job_name_is_derived_slurm_safe_and_short(model: str, name: str) -> None:
    assert job_name_for(model) == name


def test_the_job_name_defaults_from_the_model_and_a_given_one_wins() -> None:
    assert ServeSpec("org/tiny-model").job_name == "tiny-model"
    assert ServeSpec("org/tiny-model", job_name="vllm").job_name == "vllm"
    with pytest.raises(SpecErrors, match="non-empty"):
        ServeSpec("org/M", job_name=" ")


def test_the_derived_job_name_follows_a_new_model_but_a_given_one_stays() -> None:
    spec = ServeSpec("org/first")
    spec.model = "org/second"
    assert spec.job_name == "second"
    named = ServeSpec("org/first", job_name="mine")
    named.model = "org/second"
    assert named.job_name == "mine"


def test_the_job_name_survives_spec_json(tmp_path: Path) -> None:
    from slurm_vllm.spec import load_spec_json

    path = tmp_path / "spec.json"
    path.write_text(ServeSpec("org/tiny-model").model_dump_json())
    assert load_spec_json(path).job_name == "tiny-model"


def test_explain_says_a_derived_job_name_came_from_the_model() -> None:
    rows = {f: (v, s) for f, v, s in explain(ServeSpec("org/tiny-model"))}
    assert rows["job_name"] == ("tiny-model", "default (from the model)")
