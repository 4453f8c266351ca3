"""CLI flags <-> spec fields, shared by ``submit`` and ``render`` so both take the same options.

Every flag is the spec's flat field name with dashes (``--gpus-per-node`` -> ``gpus_per_node``).
Flags left out do not appear in the parsed namespace at all (``argparse.SUPPRESS``), so they
never override a value from the site profile, the spec file or the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

from slurm_vllm.errors import SpecError, SpecErrors
from slurm_vllm.spec import Explained, ServeSpec, build_spec

S = argparse.SUPPRESS

#: (flags, flat field, argparse keyword arguments). The first flag is the one shown in --explain.
SPEC_FLAGS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--served-name",), "served_name", {"metavar": "NAME", "help": "name clients use in requests"}),
    (("--nodes", "-N"), "nodes", {"type": int, "metavar": "N", "help": "number of nodes (default 1)"}),
    (("--gpus-per-node",), "gpus_per_node", {"type": int, "metavar": "G",
                                             "help": "GPUs per node (default 1; 0 for CPU-only nodes)"}),
    (("--cpus-per-task",), "cpus_per_task", {"type": int, "metavar": "C", "help": "CPUs per node task"}),
    (("--mem",), "mem", {"metavar": "SIZE", "help": "memory per node, e.g. 64G"}),
    (("--time", "-t"), "time", {"metavar": "HH:MM:SS", "help": "time limit (Slurm formats)"}),
    (("--partition", "-p"), "partition", {"metavar": "P", "help": "Slurm partition"}),
    (("--account", "-A"), "account", {"metavar": "A", "help": "Slurm account"}),
    (("--qos",), "qos", {"metavar": "Q", "help": "Slurm QOS"}),
    (("--constraint",), "constraint", {"metavar": "FEATURES", "help": "node features"}),
    (("--exclusive",), "exclusive", {"action": "store_const", "const": True, "help": "whole nodes only"}),
    (("--job-name", "-J"), "job_name", {"metavar": "NAME", "help": "Slurm job name (default vllm)"}),
    (("--signal-grace",), "signal_grace", {"type": int, "metavar": "S",
                                           "help": "seconds of warning before the time limit (default 120)"}),
    (("--sbatch-arg",), "sbatch_args", {"action": "append", "metavar": "--OPT=VALUE",
                                        "help": "extra sbatch option (allow-listed; repeatable)"}),
    (("--tensor-parallel-size", "-tp"), "tensor_parallel_size", {"type": int, "metavar": "T",
                                                                 "help": "default: GPUs per node"}),
    (("--pipeline-parallel-size", "-pp"), "pipeline_parallel_size", {"type": int, "metavar": "P",
                                                                     "help": "default: number of nodes"}),
    (("--allow-partial",), "allow_partial", {"action": "store_const", "const": True,
                                             "help": "allow TP x PP below nodes x GPUs per node"}),
    (("--backend",), "backend", {"choices": ["ray", "mp"], "help": "vLLM executor backend (default ray)"}),
    (("--ray-join-timeout",), "join_timeout", {"type": float, "metavar": "S",
                                               "help": "seconds a worker tries to join the head"}),
    (("--ray-cluster-timeout",), "cluster_timeout", {"type": float, "metavar": "S",
                                                     "help": "seconds the head waits for all nodes"}),
    (("--interface",), "interface", {"metavar": "IFACE", "help": "network interface, e.g. ib0"}),
    (("--cidr",), "cidr", {"metavar": "NET", "help": "pick node addresses from this network"}),
    (("--setup",), "setup", {"action": "append", "metavar": "LINE",
                             "help": "trusted shell line run before the node program (repeatable)"}),
    (("--venv",), "venv", {"metavar": "PATH", "help": "virtual environment to activate"}),
    (("--container",), "container", {"metavar": "IMAGE", "help": "Apptainer/Singularity image"}),
    (("--container-runtime",), "container_runtime", {"choices": ["apptainer", "singularity"]}),
    (("--bind",), "container_binds", {"action": "append", "metavar": "SRC[:DST]",
                                      "help": "extra container bind (repeatable)"}),
    (("--env",), "env", {"action": "append", "metavar": "KEY=VALUE",
                         "help": "environment variable for the job (repeatable)"}),
    (("--python",), "python", {"metavar": "CMD", "help": "python on the nodes (default python3)"}),
    (("--job-dir",), "job_dir", {"metavar": "DIR", "help": "job directory (default ~/.slurm_vllm/jobs/NAME-TIME)"}),
    (("--port",), "port", {"type": int, "metavar": "PORT", "help": "vLLM API port (default: chosen per job)"}),
    (("--ready-timeout",), "ready_timeout", {"type": float, "metavar": "S",
                                             "help": "seconds allowed for loading the model (default 3600)"}),
    (("--no-api-key",), "api_key", {"action": "store_const", "const": False,
                                    "help": "serve without an API key"}),
]


def add_spec_options(parser: argparse.ArgumentParser, model_required: bool = False) -> None:
    """Add MODEL, ``--config``, ``--profile``, ``--template`` and every spec flag to ``parser``."""
    parser.add_argument("model", nargs=None if model_required else "?", default=S, metavar="MODEL",
                        help="hub id (org/name) or local path of the model")
    parser.add_argument("--config", default=S, metavar="FILE", help="spec file (YAML or TOML)")
    parser.add_argument("--profile", default=S, metavar="FILE",
                        help="site profile (YAML or TOML); default $SLURM_VLLM_PROFILE")
    parser.add_argument("--template", default=S, metavar="FILE", help="your own Jinja2 sbatch template")
    group = parser.add_argument_group("spec options (same names as the spec file's fields)")
    for flags, field, kwargs in SPEC_FLAGS:
        group.add_argument(*flags, dest=field, default=S, **kwargs)


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    errors = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            errors.append(SpecError("env", item, "write --env KEY=VALUE", problem="is not KEY=VALUE"))
            continue
        out[key] = value
    if errors:
        raise SpecErrors(errors)
    return out


def flags_from_namespace(ns: argparse.Namespace | Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The spec fields given as flags, and the flag each came from (for ``--explain``)."""
    given = dict(vars(ns)) if isinstance(ns, argparse.Namespace) else dict(ns)
    flags: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if "model" in given and given["model"] is not None:
        flags["model"] = given["model"]
        sources["model"] = "argument MODEL"
    for names, field, _kwargs in SPEC_FLAGS:
        if field not in given or given[field] is None:
            continue
        value = given[field]
        if field == "env":
            value = _parse_env(value)
        flags[field] = value
        sources[field] = f"flag {names[0]}"
    return flags, sources


def spec_from_args(
    ns: argparse.Namespace | Mapping[str, Any],
    vllm_args: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    check_paths: bool = True,
) -> tuple[ServeSpec, list[Explained]]:
    """Build the spec from parsed flags (plus ``--config``/``--profile`` and the environment).

    ``vllm_args`` (what followed ``--``) become ``extra_args``; when given they replace any from
    the spec file.
    """
    given = dict(vars(ns)) if isinstance(ns, argparse.Namespace) else dict(ns)
    flags, sources = flags_from_namespace(given)
    if vllm_args:
        flags["extra_args"] = list(vllm_args)
        sources["extra_args"] = "arguments after --"
    return build_spec(
        flags,
        config=given.get("config"),
        profile=given.get("profile"),
        environ=os.environ if environ is None else environ,
        flag_sources=sources,
        check_paths=check_paths,
    )


def format_explain(rows: Sequence[Explained]) -> str:
    """``render --explain`` as aligned text: field, value, source."""
    import json

    shown = [(f, json.dumps(v, ensure_ascii=False), src) for f, v, src in rows]
    w1 = max((len(f) for f, _, _ in shown), default=5)
    w2 = min(max((len(v) for _, v, _ in shown), default=5), 48)
    return "\n".join(f"{f:<{w1}}  {v:<{w2}}  {src}" for f, v, src in shown)
