"""Spec files and layers: YAML/TOML/JSON read safely, the site profile, the spec file, the
environment and the flags merged in order, and where each value came from."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from slurm_vllm.errors import SpecError, cut
from slurm_vllm.spec.fields import SECTIONS, _env_mapping
from slurm_vllm.spec.model import ServeSpec
from slurm_vllm.spec.names import ENV_VARS, PROFILE_ENV_VAR, normalize
from slurm_vllm.spec.presets import Preset, split_profile

#: Most values a spec file may expand to: a spec has a few dozen; nested YAML aliases can make
#: a few hundred bytes expand to billions.
MAX_FILE_VALUES = 10_000


def _expanded_size(data: Any, limit: int = MAX_FILE_VALUES) -> int:
    """How many values ``data`` holds with every shared (aliased) part counted per use; stops
    counting past ``limit`` (so a self-referencing or exploding structure costs no more)."""
    count, todo = 0, [data]
    while todo and count <= limit:
        item = todo.pop()
        count += 1
        if isinstance(item, Mapping):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return count


def _yaml_loader() -> Any:
    """PyYAML's safe loader, minus YAML 1.1's base-60, hex, octal and underscored numbers:
    ``time: 1:30:00`` stays the text 1:30:00 instead of the integer 5400. Plain integers and
    decimals are still numbers."""
    import yaml  # noqa: PLC0415 - only for YAML files

    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"

    loader: Any = type("SpecLoader", (yaml.SafeLoader,), {})
    loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (int_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    # Plain decimal integers only: 0x10, 0o17 and 1_000 stay the text written.
    loader.add_implicit_resolver(int_tag, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
    loader.add_implicit_resolver(
        float_tag, re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                              r"|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return loader


def _load_yaml(text: str) -> Any:
    import yaml  # noqa: PLC0415

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


def read_spec_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) spec or profile into a mapping.

    Unreadable or malformed files raise a :class:`SpecError` naming the file.
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise SpecError(str(path), str(path), "use a .yaml, .yml, .toml or .json file",
                        problem="has an unknown file type")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(path), str(path), f"check the path and permissions ({exc.strerror or exc})",
                        problem="cannot be read") from None
    except UnicodeDecodeError:
        raise SpecError(str(path), str(path), "save the file as UTF-8", problem="is not UTF-8 text") from None
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data: Any = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            data = _load_yaml(text)
    except Exception as exc:  # each parser has its own error type
        detail = cut(" ".join(str(exc).split()), 300)
        raise SpecError(str(path), str(path), f"fix the syntax: {detail}", problem="is malformed") from None
    if data is None:
        return {}
    if _expanded_size(data) > MAX_FILE_VALUES:
        raise SpecError(str(path), str(path), f"write at most {MAX_FILE_VALUES} values (YAML aliases count once "
                                              "per use)", problem="expands to too many values")
    if not isinstance(data, dict):
        raise SpecError(str(path), str(path), "write the file as a mapping of field: value",
                        problem="is not a mapping")
    return data


def load_spec_file(path: str | os.PathLike[str], **overrides: Any) -> ServeSpec:
    """Load one YAML/TOML spec file, with flat-name overrides on top."""
    data = read_spec_file(path)
    layered = _merge_layers([("config", data), ("python", overrides)])
    return ServeSpec.model_validate(_unflatten(layered))


def load_spec_json(path: str | os.PathLike[str]) -> ServeSpec:
    """Load ``spec.json`` from a job directory (no filesystem checks: it may run on a node)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(str(path), str(path), f"check the job directory ({exc.strerror or exc})",
                        problem="cannot be read") from None
    except json.JSONDecodeError as exc:
        raise SpecError(str(path), str(path), f"the file is damaged: {exc}", problem="is malformed") from None
    return ServeSpec.model_validate(data, context={"check_paths": False})


def _leaves(section_data: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted path, value)`` for a normalised mapping; env keys are leaves of their own."""
    for key, value in section_data.items():
        if key in SECTIONS and isinstance(value, Mapping):
            for field, v in value.items():
                if field == "env":
                    env = _env_mapping(v)
                    if not env:
                        yield f"{key}.env", {}
                    for k, vv in env.items():
                        yield f"{key}.env.{k}", vv
                else:
                    yield f"{key}.{field}", v
        else:
            yield key, value


def _merge_layers(layers: list[tuple[str, Mapping[str, Any]]]) -> dict[str, tuple[Any, str]]:
    """Merge layers (lowest first) into ``{dotted path: (value, source)}``.

    Later layers win field by field; ``env`` merges key by key; lists are replaced whole.
    """
    merged: dict[str, tuple[Any, str]] = {}
    for source, data in layers:
        for path, value in _leaves(normalize(data)):
            if path == "environment.env":
                # An explicitly empty env in a later layer clears earlier keys.
                for old in [k for k in merged if k.startswith("environment.env.")]:
                    del merged[old]
                continue
            merged[path] = (value, source)
    return merged


def _unflatten(merged: Mapping[str, tuple[Any, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, (value, _source) in merged.items():
        parts = path.split(".", 2)
        if len(parts) == 1:
            out[parts[0]] = value
        elif len(parts) == 2:
            out.setdefault(parts[0], {})[parts[1]] = value
        else:
            out.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = value
    return out


def env_layer(environ: Mapping[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """The ``SLURM_VLLM_*`` variables that are set, as one single-field layer each."""
    out = []
    for var, field in ENV_VARS.items():
        value = environ.get(var)
        if value:
            out.append((f"environment variable {var}", {field: value}))
    return out


#: One row of ``render --explain``: the flat field name, its value, where the value came from.
Explained = tuple[str, Any, str]


def build_spec(
    flags: Mapping[str, Any] | None = None,
    *,
    config: str | os.PathLike[str] | None = None,
    profile: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    flag_sources: Mapping[str, str] | None = None,
    check_paths: bool = True,
) -> tuple[ServeSpec, list[Explained]]:
    """Build the spec from its layers and say where each value came from.

    Precedence, lowest first: defaults < site profile < the profile's preset for the model named
    (its ``models:`` table) < spec file (``--config``) < environment variables (``SLURM_VLLM_*``)
    < flags. ``profile`` defaults to ``$SLURM_VLLM_PROFILE``.
    ``flags`` uses flat names; ``flag_sources`` names the flag each came from (for the
    explanation). Returns the validated spec and ``[(field, value, source), ...]`` for every
    field, defaults included.
    """
    environ = os.environ if environ is None else environ
    flags = dict(flags or {})
    flag_sources = dict(flag_sources or {})
    layers: list[tuple[str, Mapping[str, Any]]] = []
    profile = profile_path(profile, environ)
    presets: dict[str, Preset] = {}
    if profile is not None:
        own, presets = split_profile(read_spec_file(profile), f"profile {profile}")
        layers.append((f"profile {profile}", own))
    if config is not None:
        layers.append((f"config {config}", read_spec_file(config)))
    layers.extend(env_layer(environ))
    for name, value in flags.items():
        layers.append((flag_sources.get(name, f"flag --{name.replace('_', '-')}"), {name: value}))
    merged = _merge_layers(layers)
    chosen = merged.get("model.name", (None, ""))[0]
    if isinstance(chosen, str) and chosen in presets:
        # The model named is a preset: its fields go in just above the profile's own, and the
        # name the user gave is replaced by the preset's model.
        preset = presets[chosen]
        source = f"preset {preset.name} (profile {profile})"
        layers.insert(1 if profile is not None else 0, (source, preset.layer()))
        merged = _merge_layers(layers)
        merged["model.name"] = (normalize({"model": preset.model})["model"]["name"], source)
    spec = ServeSpec.model_validate(_unflatten(merged), context={"check_paths": check_paths})
    return spec, explain(spec, merged)


def profile_path(profile: str | os.PathLike[str] | None,
                 environ: Mapping[str, str] | None = None) -> str | os.PathLike[str] | None:
    """The site profile in use: the one given, else ``$SLURM_VLLM_PROFILE``, else none."""
    environ = os.environ if environ is None else environ
    if profile is None and environ.get(PROFILE_ENV_VAR):
        return environ[PROFILE_ENV_VAR]
    return profile


def load_spec(
    model: str | None = None,
    *,
    profile: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    **options: Any,
) -> ServeSpec:
    """The spec exactly as ``slurm-vllm submit`` builds it, for notebooks and scripts.

    Same layers, same order: defaults < site profile (``profile``, else ``$SLURM_VLLM_PROFILE``)
    < the profile's preset when ``model`` names one < spec file (``config``) < ``SLURM_VLLM_*``
    environment variables < ``options`` (flat names, as the CLI's flags with underscores)::

        spec = load_spec("llama-70b", profile="~/cluster.yaml", time="02:00:00")

    :class:`ServeSpec` itself takes only what it is given (no files, no environment) unless it
    gets ``profile=`` or ``config=``, when it is built by this function.
    """
    flags = dict(options)
    sources = {name: f"keyword {name}=" for name in flags}
    if model is not None:
        flags["model"], sources["model"] = model, "argument model"
    return build_spec(flags, config=config, profile=profile, flag_sources=sources)[0]


def explain(spec: ServeSpec, merged: Mapping[str, tuple[Any, str]] | None = None) -> list[Explained]:
    """Every field of ``spec`` with its value and source (``default`` when no layer set it)."""
    merged = merged or {}
    rows: list[Explained] = []
    dumped = spec.model_dump(mode="json")
    for key, value in dumped.items():
        if key in SECTIONS:
            for field, v in value.items():
                name = "model" if (key, field) == ("model", "name") else field
                if field == "env":
                    for k, vv in v.items():
                        rows.append((f"env.{k}", vv, merged.get(f"{key}.env.{k}", (None, "default"))[1]))
                    continue
                fallback = "default (from the model)" if field == "job_name" else "default"
                rows.append((name, v, merged.get(f"{key}.{field}", (None, fallback))[1]))
        else:
            rows.append((key, value, merged.get(key, (None, "default"))[1]))
    return rows
