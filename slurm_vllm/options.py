"""CLI flags <-> spec fields, shared by ``submit`` and ``render`` so both take the same options.

Every flag is the spec's flat field name with dashes (``--gpus-per-node`` -> ``gpus_per_node``).
Flags left out do not appear in the parsed namespace at all (``argparse.SUPPRESS``), so they
never override a value from the site profile, the spec file or the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

from slurm_vllm.errors import SpecError, SpecErrors
from slurm_vllm.spec import FLAT_NAMES, SECTIONS, TOP_FIELDS, Explained, ServeSpec, build_spec

S = argparse.SUPPRESS

#: What the spec's fields cannot say about their flag: other spellings, short flags, metavars,
#: and the help of a negated switch. Names, types, help text and defaults come from the fields.
OVERRIDES: dict[str, dict[str, Any]] = {
    "served_name": {"flags": ("--served-name",), "metavar": "NAME"},
    "nodes": {"flags": ("--nodes", "-N"), "metavar": "N"},
    "gpus_per_node": {"metavar": "G"},
    "cpus_per_task": {"metavar": "C"},
    "mem": {"metavar": "SIZE"},
    "time": {"flags": ("--time", "-t"), "metavar": "HH:MM:SS"},
    "partition": {"flags": ("--partition", "-p"), "metavar": "P"},
    "account": {"flags": ("--account", "-A"), "metavar": "A"},
    "qos": {"metavar": "Q"},
    "constraint": {"metavar": "FEATURES"},
    "job_name": {"flags": ("--job-name", "-J"), "metavar": "NAME"},
    "signal_grace": {"metavar": "S"},
    "sbatch_args": {"flags": ("--sbatch-arg",), "metavar": "--OPT=VALUE"},
    "tensor_parallel_size": {"flags": ("--tensor-parallel-size", "-tp"), "metavar": "T"},
    "pipeline_parallel_size": {"flags": ("--pipeline-parallel-size", "-pp"), "metavar": "P"},
    "join_timeout": {"flags": ("--ray-join-timeout",), "metavar": "S"},
    "cluster_timeout": {"flags": ("--ray-cluster-timeout",), "metavar": "S"},
    "interface": {"metavar": "IFACE"},
    "cidr": {"metavar": "NET"},
    "setup": {"metavar": "LINE"},
    "venv": {"metavar": "PATH"},
    "container": {"metavar": "IMAGE"},
    "container_binds": {"flags": ("--bind",), "metavar": "SRC[:DST]"},
    "env": {"metavar": "KEY=VALUE"},
    "python": {"metavar": "CMD"},
    "job_dir": {"metavar": "DIR"},
    "port": {"metavar": "PORT"},
    "ready_timeout": {"metavar": "S"},
    "api_key": {"flags": ("--no-api-key",), "const": False, "help": "serve without an API key"},
}
#: Fields that have no flag of their own: the positional MODEL, and what follows ``--``.
NO_FLAG = frozenset({"extra_args"})


def _literal_choices(annotation: Any) -> list[Any]:
    """The values of a ``Literal[...]`` field, also when it is optional (``Literal[...] | None``)."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    for arg in get_args(annotation):
        if get_origin(arg) is Literal:
            return list(get_args(arg))
    return []


def _default_text(default: Any) -> str:
    if default is None or default in ([], {}, ""):
        return ""
    if isinstance(default, bool):
        return ""  # a switch: its help says what it turns on
    return f" (default: {default})"


def _flag_for(field: str, info: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """argparse arguments for one spec field, from its annotation, description and default."""
    over = dict(OVERRIDES.get(field, {}))
    flags = over.pop("flags", ("--" + field.replace("_", "-"),))
    text = str(info.annotation)
    kwargs: dict[str, Any] = {}
    if "bool" in text:
        kwargs.update(action="store_const", const=over.pop("const", True))
    elif "list" in text or "dict" in text:
        kwargs["action"] = "append"
    elif "Literal" in text:
        kwargs["choices"] = _literal_choices(info.annotation)
    elif "float" in text:
        kwargs["type"] = float
    elif "int" in text:
        kwargs["type"] = int
    default = None if info.default_factory is not None else info.default
    description = (info.description or "").rstrip(".")
    kwargs["help"] = (over.pop("help", None) or (description + _default_text(default))).replace("%", "%%")
    kwargs.update(over)
    return tuple(flags), kwargs


def spec_flags() -> list[tuple[tuple[str, ...], str, dict[str, Any]]]:
    """(flags, flat field, argparse keyword arguments) for every spec field that has a flag; the
    first flag is the one ``--explain`` names."""
    fields = [(field, SECTIONS[section].model_fields[name]) for field, (section, name) in FLAT_NAMES.items()
              if field not in NO_FLAG]
    fields += [(name, ServeSpec.model_fields[name]) for name in TOP_FIELDS]
    out = []
    for field, info in fields:
        flags, kwargs = _flag_for(field, info)
        out.append((flags, field, kwargs))
    return out


SPEC_FLAGS = spec_flags()


def add_spec_options(parser: argparse.ArgumentParser, model_required: bool = False) -> None:
    """Add MODEL, ``--config``, ``--profile``, ``--template`` and every spec flag to ``parser``
    (the light path the CLI uses is :func:`slurm_vllm.spec_flags.add_spec_options`, from the
    table generated here)."""
    from slurm_vllm import spec_flags as light  # noqa: PLC0415

    light.add_spec_options(parser, model_required=model_required)


def flag_table_text() -> str:
    """The source of ``slurm_vllm/_flag_table.py``: every spec flag as plain data, so that
    ``submit --help`` builds its parser without importing pydantic. A unit test keeps the file
    in step with the fields; ``python -m slurm_vllm.options`` rewrites it."""
    rows = []
    for flags, field, kwargs in SPEC_FLAGS:
        data = {k: (v.__name__ if isinstance(v, type) else v) for k, v in kwargs.items()}
        rows.append(f"    ({flags!r}, {field!r}, {data!r}),")
    return ('"""Generated by ``python -m slurm_vllm.options`` from the spec\'s fields: do not edit.\n\n'
            "Every spec flag as (flags, field, argparse keyword arguments; ``type`` by name), read by\n"
            '``spec_flags`` so that ``--help`` needs no pydantic."""\n\n'
            "from typing import Any\n\n"
            "FLAGS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [\n" + "\n".join(rows) + "\n]\n")


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


if __name__ == "__main__":
    from pathlib import Path

    target = Path(__file__).with_name("_flag_table.py")
    target.write_text(flag_table_text())
    print(f"wrote {target}")
