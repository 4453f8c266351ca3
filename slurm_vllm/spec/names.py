"""Flat names, aliases and environment variables, and turning any of them (flat, sectioned,
nested) into the sectioned layout; paths are made absolute here, on the login node."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from slurm_vllm import shell
from slurm_vllm.errors import SpecError, SpecErrors
from slurm_vllm.spec.fields import SECTIONS, TOP_FIELDS, parse_bool


def _build_flat_names() -> dict[str, tuple[str, str]]:
    names: dict[str, tuple[str, str]] = {}
    for section, cls in SECTIONS.items():
        for field in cls.model_fields:
            if section == "model" and field == "name":
                continue  # the flat name of the model is ``model`` itself
            names[field] = (section, field)
    return names


#: Flat name -> (section, field). Every field name is unique across sections, so the flat name is
#: the field name; ``model`` (the name) and the aliases below are the only special cases.
FLAT_NAMES: dict[str, tuple[str, str]] = _build_flat_names()

#: Other spellings users reach for; mapped onto the canonical flat name.
ALIASES: dict[str, str] = {
    "vllm_args": "extra_args",
    "ray_join_timeout": "join_timeout",
    "ray_cluster_timeout": "cluster_timeout",
    "binds": "container_binds",
    "modules": "setup",
    "tp": "tensor_parallel_size",
    "pp": "pipeline_parallel_size",
}

#: Environment variables read as one layer of the spec (see :func:`build_spec`).
ENV_VARS: dict[str, str] = {
    "SLURM_VLLM_PARTITION": "partition",
    "SLURM_VLLM_ACCOUNT": "account",
    "SLURM_VLLM_QOS": "qos",
    "SLURM_VLLM_CONSTRAINT": "constraint",
    "SLURM_VLLM_TIME": "time",
    "SLURM_VLLM_VENV": "venv",
    "SLURM_VLLM_CONTAINER": "container",
    "SLURM_VLLM_INTERFACE": "interface",
}
#: Names the site profile file when ``--profile`` is not given.
PROFILE_ENV_VAR = "SLURM_VLLM_PROFILE"


def _all_names() -> list[str]:
    names = set(FLAT_NAMES) | set(ALIASES) | set(SECTIONS) | set(TOP_FIELDS) | {"no_api_key"}
    return sorted(names)


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "valid names: " + ", ".join(candidates)


# ---------------------------------------------------------------------------------------------
# Normalising input: flat names, aliases, nested dicts -> the sectioned layout
# ---------------------------------------------------------------------------------------------


def _looks_local(name: str) -> bool:
    """A model name is a local path when it starts like one; anything else is a hub id."""
    return name in (".", "..", "~") or name.startswith(("/", "./", "../", "~/"))


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def normalize(data: Mapping[str, Any]) -> dict[str, Any]:
    """Turn flat names, aliases and nested sections into the sectioned layout.

    Raises :class:`SpecErrors` listing every unknown name (with the closest valid one) and every
    field given twice. Paths are made absolute here, on the login node, because the job runs
    in its job directory where a relative path would point somewhere else.
    """
    errors: list[SpecError] = []
    out: dict[str, Any] = {}
    seen: dict[tuple[str, str], str] = {}

    def put(section: str, field: str, value: Any, given_as: str) -> None:
        key = (section, field)
        if key in seen:
            errors.append(
                SpecError(given_as, value, f"give {field!r} once (it was also given as {seen[key]!r})",
                          problem="is given twice")
            )
            return
        seen[key] = given_as
        out.setdefault(section, {})[field] = value

    for raw_key, given in data.items():
        key = str(raw_key)
        # A section object (assignment, or a copied spec) counts as its fields.
        value = given.model_dump() if isinstance(given, BaseModel) else given
        if key == "model":
            if isinstance(value, Mapping):
                for sub, v in value.items():
                    _put_section_field("model", str(sub), v, put, errors)
            elif value is not None:
                put("model", "name", value, "model")
            continue
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                errors.append(SpecError(key, value, f"write {key}: as a mapping of its fields",
                                        problem="is not a section"))
                continue
            for sub, v in value.items():
                _put_section_field(key, str(sub), v, put, errors)
            continue
        if key in TOP_FIELDS:
            if key in out:
                errors.append(SpecError(key, value, f"give {key!r} once", problem="is given twice"))
            out[key] = value
            continue
        if key == "no_api_key":
            try:
                put("serve", "api_key", not parse_bool(value, "no_api_key"), "no_api_key")
            except SpecError as exc:
                errors.append(exc)
            continue
        flat = ALIASES.get(key, key)
        if flat in FLAT_NAMES:
            section, field = FLAT_NAMES[flat]
            put(section, field, value, key)
            continue
        errors.append(SpecError(key, value, _suggest(key, _all_names()), problem="is not a known field"))

    if errors:
        raise SpecErrors(errors)
    _absolutize(out)
    return out


def _put_section_field(section: str, sub: str, value: Any, put: Any, errors: list[SpecError]) -> None:
    fields = list(SECTIONS[section].model_fields)
    name = ALIASES.get(sub, sub)
    if name in fields:
        put(section, name, value, f"{section}.{sub}")
    else:
        errors.append(
            SpecError(f"{section}.{sub}", value, _suggest(sub, fields), problem=f"is not a field of {section}")
        )


def _absolutize(out: dict[str, Any]) -> None:
    model = out.get("model", {})
    name = model.get("name")
    # A relative path that exists here is what vLLM would load too; pin it down.
    if isinstance(name, str) and name and shell.line_problem(name) is None and (
            _looks_local(name) or ("/" in name and not name.startswith("/") and os.path.isdir(name)
                                   and os.path.exists(os.path.join(name, "config.json")))):
        model["name"] = _absolute(name)
    env = out.get("environment", {})
    for key in ("venv",):
        if isinstance(env.get(key), str) and env[key]:
            env[key] = _absolute(env[key])
    cache = env.get("cache_dir")
    if isinstance(cache, str) and cache.strip() and cache.strip().lower() != "none":
        env["cache_dir"] = _absolute(cache)
    image = env.get("container")
    if isinstance(image, str) and image and "://" not in image:
        env["container"] = _absolute(image)
    job_dir = out.get("job_dir")
    if isinstance(job_dir, str) and job_dir:
        out["job_dir"] = _absolute(job_dir)


#: Characters a derived job name keeps; anything else becomes ``-``.
_UNSAFE_IN_JOB_NAME = re.compile(r"[^A-Za-z0-9._-]+")
#: Longest derived job name: squeue shows few characters, a directory name holds it too.
MAX_DERIVED_JOB_NAME = 40
#: The job name when nothing usable can be derived.
FALLBACK_JOB_NAME = "vllm"


def job_name_for(model: str) -> str:
    """The job name a spec gets when none is given: the model's last path component (or a
    preset's name), made Slurm-safe and short, so ``squeue`` and the job directory say what runs.

    ``org/Llama-3.1-8B-Instruct`` -> ``Llama-3.1-8B-Instruct``; nothing usable -> ``vllm``.
    """
    last = str(model).rstrip("/").rsplit("/", maxsplit=1)[-1]
    name = re.sub(r"-{2,}", "-", _UNSAFE_IN_JOB_NAME.sub("-", last)).strip("-._")[:MAX_DERIVED_JOB_NAME].rstrip("-._")
    if not name or any(word in name.lower() for word in ("hetjob", "packjob")):  # sbatch scans for those
        return FALLBACK_JOB_NAME
    return name


def field_names() -> list[str]:
    """Every flat field name a spec accepts (for docs, completion and suggestions)."""
    return sorted(["model", "backend", "job_dir", "no_api_key", *FLAT_NAMES])
