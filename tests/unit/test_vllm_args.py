"""vLLM's command line: the argv built for each backend and rank, the flags the tool owns
(refused even in a spec edited after validation), and whether the installed vLLM can drain."""

from __future__ import annotations

import sys

import pytest

from slurm_vllm import vllm_args
from slurm_vllm.errors import SpecErrors
from slurm_vllm.spec import ServeSpec


def test_ray_command_has_parallel_sizes_backend_address_and_no_key() -> None:
    spec = ServeSpec("org/tiny", nodes=2, gpus_per_node=4, served_name="tiny",
                     extra_args=["--max-model-len", "256", "--dtype", "float32"])
    argv = vllm_args.build_serve_argv(spec, host="10.0.0.5", port=23456, executable=["/venv/bin/vllm"])
    assert argv[:3] == ["/venv/bin/vllm", "serve", "org/tiny"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"  # default: GPUs per node
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"  # default: nodes
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert argv[argv.index("--host") + 1] == "10.0.0.5"
    assert argv[argv.index("--port") + 1] == "23456"
    assert argv[argv.index("--served-model-name") + 1] == "tiny"
    assert argv[-4:] == ["--max-model-len", "256", "--dtype", "float32"]  # the user's, verbatim, last
    assert "--api-key" not in argv and "--nnodes" not in argv and "--headless" not in argv


def test_explicit_parallel_sizes_win_over_defaults() -> None:
    spec = ServeSpec("org/tiny", nodes=2, gpus_per_node=1, tensor_parallel_size=1, pipeline_parallel_size=2)
    argv = vllm_args.build_serve_argv(spec, host="h", port=1)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "1"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"


def test_mp_rank0_serves_api_and_other_ranks_are_headless() -> None:
    spec = ServeSpec("org/tiny", nodes=2, gpus_per_node=1, backend="mp", extra_args=["--dtype", "float32"])
    head = vllm_args.build_serve_argv(spec, host="10.0.0.5", port=23456, nnodes=2, node_rank=0,
                                  master_addr="10.0.0.5", master_port=20001)
    other = vllm_args.build_serve_argv(spec, host="10.0.0.5", port=23456, nnodes=2, node_rank=1,
                                   master_addr="10.0.0.5", master_port=20001)
    for argv, rank in ((head, "0"), (other, "1")):
        assert argv[argv.index("--nnodes") + 1] == "2"
        assert argv[argv.index("--node-rank") + 1] == rank
        assert argv[argv.index("--master-addr") + 1] == "10.0.0.5"
        assert argv[argv.index("--master-port") + 1] == "20001"
        assert "--distributed-executor-backend" not in argv
        assert argv[-2:] == ["--dtype", "float32"]
    assert "--headless" not in head and head[head.index("--port") + 1] == "23456"
    assert "--headless" in other and "--port" not in other and "--host" not in other


def test_mp_needs_a_master_address() -> None:
    spec = ServeSpec("org/tiny", nodes=2, gpus_per_node=1, backend="mp")
    with pytest.raises(ValueError):
        vllm_args.build_serve_argv(spec, host="h", port=1, nnodes=2, node_rank=0)


@pytest.mark.parametrize("extra", [["--port=9000"], ["--tensor-parallel-size", "8"], ["-tp", "2"],
                                   ["--api-key", "x"], ["--distributed_executor_backend", "mp"],
                                   ["--headless"], ["--host", "0.0.0.0"]])
def test_conflicting_extra_args_are_refused_even_after_validation(extra: list[str]) -> None:
    spec = ServeSpec("org/tiny", nodes=1, gpus_per_node=1)
    spec.model.extra_args = extra  # edited after the spec was validated
    with pytest.raises(SpecErrors) as err:
        vllm_args.build_serve_argv(spec, host="h", port=1)
    assert "set by the tool" in str(err.value)


def test_shutdown_timeout_is_passed_unless_the_user_set_it():
    spec = ServeSpec("org/M")
    argv = vllm_args.build_serve_argv(spec, host="h", port=1, shutdown_timeout=108)
    assert argv[argv.index("--shutdown-timeout") + 1] == "108"
    assert "--shutdown-timeout" not in vllm_args.build_serve_argv(spec, host="h", port=1)
    mine = ServeSpec("org/M", extra_args=["--shutdown_timeout=5"])
    argv = vllm_args.build_serve_argv(mine, host="h", port=1, shutdown_timeout=108)
    assert "--shutdown-timeout" not in argv and argv[-1] == "--shutdown_timeout=5"


def test_vllm_drain_support_is_read_from_the_vllm_the_command_runs(tmp_path):
    """The interpreter on the command's #! line decides, not this process's own packages."""
    site = tmp_path / "site" / "vllm" / "engine"
    site.mkdir(parents=True)
    (site.parent / "__init__.py").write_text("raise SystemExit('imported')\n")
    (site / "arg_utils.py").write_text('parser.add_argument("--shutdown-timeout", type=int)\n')
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path / 'site'} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    vllm = tmp_path / "vllm"
    vllm.write_text(f"#!{python}\nprint('vllm')\n")
    assert vllm_args.vllm_drains_on_sigterm([str(vllm)]) is True
    (site / "arg_utils.py").write_text("# an older vLLM\n")
    assert vllm_args.vllm_drains_on_sigterm([str(vllm)]) is False
    vllm.write_text("\x7fELF not a script")
    assert vllm_args.vllm_drains_on_sigterm([str(vllm)]) is False
    assert vllm_args.vllm_drains_on_sigterm([str(tmp_path / "missing")]) is False


def test_a_switch_the_node_adds_yields_to_the_users_own() -> None:
    from slurm_vllm.vllm_args import SCALE_OUT_FLAG, build_serve_argv

    spec = ServeSpec("org/m", nodes=2, replicas=2, gpus_per_node=1)
    argv = build_serve_argv(spec, host="h", port=1, backend="local", extra_flags=[SCALE_OUT_FLAG])
    assert argv.count(SCALE_OUT_FLAG) == 1 and "--distributed-executor-backend" not in argv
    mine = ServeSpec("org/m", nodes=2, replicas=2, gpus_per_node=1, extra_args=["--enable-scale"])
    assert SCALE_OUT_FLAG not in build_serve_argv(mine, host="h", port=1, backend="local",
                                                  extra_flags=[SCALE_OUT_FLAG])


def test_a_staged_copy_is_loaded_under_the_models_own_name() -> None:
    spec = ServeSpec.model_validate({"model": "/shared/models/llama", "stage_weights": "shm"},
                                    context={"check_paths": False})
    argv = vllm_args.build_serve_argv(spec, host="h", port=1, model_path="/dev/shm/svl-u1/models/llama-abc")
    assert argv[1:3] == ["serve", "/dev/shm/svl-u1/models/llama-abc"]
    assert argv[argv.index("--served-model-name") + 1] == "/shared/models/llama"
    named = ServeSpec.model_validate({"model": "/shared/models/llama", "served_name": "llama"},
                                     context={"check_paths": False})
    argv = vllm_args.build_serve_argv(named, host="h", port=1, model_path="/dev/shm/x")
    assert argv.count("--served-model-name") == 1 and argv[argv.index("--served-model-name") + 1] == "llama"
    # Not staged: vLLM's default served name is the model itself; nothing is added.
    assert "--served-model-name" not in vllm_args.build_serve_argv(spec, host="h", port=1)
    # A headless mp rank serves no API and gets no name.
    mp = ServeSpec.model_validate({"model": "/shared/models/llama", "nodes": 2, "backend": "mp"},
                                  context={"check_paths": False})
    other = vllm_args.build_serve_argv(mp, host="h", port=1, nnodes=2, node_rank=1, master_addr="h",
                                       master_port=2, model_path="/dev/shm/x")
    assert other[2] == "/dev/shm/x" and "--served-model-name" not in other
