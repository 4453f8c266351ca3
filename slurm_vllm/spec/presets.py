"""Presets: the site profile's ``models:`` table, per-model defaults under a short name.

A site profile may hold::

    models:
      llama-70b: {model: /shared/models/Llama-3-70B, nodes: 2, gpus_per_node: 8, max_model_len: 8192}

so that ``submit llama-70b`` serves that model with those settings. A preset is one more layer of
the spec, above the profile's own settings and below the spec file, the environment and the flags,
so anything given explicitly wins. Presets live in the profile only: they are the site's names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from slurm_vllm.errors import SpecError, SpecErrors
from slurm_vllm.spec.names import job_name_for, normalize

#: The profile's key that holds the presets.
PRESETS_KEY = "models"

#: Preset keys that are not spec fields: each becomes ``vllm serve`` arguments.
PRESET_ONLY = {"max_model_len": "--max-model-len"}


@dataclass(frozen=True)
class Preset:
    """One entry of the ``models:`` table: its short name and its fields as written."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        """What ``vllm serve`` loads: the entry's ``model``, else the name itself (a hub id)."""
        return str(self.fields.get("model") or self.name)

    def layer(self) -> dict[str, Any]:
        """The spec layer this preset adds: its fields with flat names (not ``model``, which
        replaces the name the user gave), ``max_model_len`` as extra args, and a job name from the
        preset's name unless it sets one. Unknown fields are refused naming the preset."""
        out = {k: v for k, v in self.fields.items() if k != "model" and k not in PRESET_ONLY}
        extra = list(out.get("extra_args", out.get("vllm_args", [])) or [])
        for key, flag in PRESET_ONLY.items():
            if key in self.fields:
                extra += [flag, _positive_int(self.name, key, self.fields[key])]
        if extra:
            out.pop("vllm_args", None)
            out["extra_args"] = extra
        if "job_name" not in out and "job_name" not in _resources(out):
            out["job_name"] = job_name_for(self.name)
        try:
            normalize(out)
        except SpecErrors as exc:
            raise SpecErrors([_in_preset(self.name, e) for e in exc.errors]) from None
        return out


def _resources(out: Mapping[str, Any]) -> Mapping[str, Any]:
    res = out.get("resources")
    return res if isinstance(res, Mapping) else {}


def _positive_int(name: str, key: str, value: Any) -> str:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise SpecError(f"{PRESETS_KEY}.{name}.{key}", value, "give a whole number of tokens, e.g. 8192",
                        problem="is not a positive whole number")
    return text


def _in_preset(name: str, err: SpecError) -> SpecError:
    """The same error, its field named inside the preset (``models.llama-70b.nodez``)."""
    return SpecError(f"{PRESETS_KEY}.{name}.{err.field}", err.value, err.fix, problem=err.problem)


def split_profile(data: Mapping[str, Any], source: str = "profile") -> tuple[dict[str, Any], dict[str, Preset]]:
    """A profile's own fields, and its presets by name.

    The table's shape is checked here (a mapping of name: mapping); each preset's fields are
    checked when it is used, so one broken entry does not stop the others.
    """
    own = {k: v for k, v in data.items() if k != PRESETS_KEY}
    table = data.get(PRESETS_KEY)
    if table is None:
        return own, {}
    if not isinstance(table, Mapping):
        raise SpecError(PRESETS_KEY, table, f"write {PRESETS_KEY}: in {source} as a mapping of NAME: "
                                            "{model: ..., nodes: ...}", problem="is not a mapping")
    presets: dict[str, Preset] = {}
    errors: list[SpecError] = []
    for raw_name, written in table.items():
        name, entry = str(raw_name), {} if written is None else written
        if not name.strip() or name.startswith("-") or any(ord(c) < 32 for c in name):
            errors.append(SpecError(f"{PRESETS_KEY}.{name}", name, "name the preset with letters, digits, '-', "
                                    "'.' or '/', not starting with '-'", problem="is not a usable preset name"))
            continue
        if not isinstance(entry, Mapping):
            errors.append(SpecError(f"{PRESETS_KEY}.{name}", entry, f"write the preset as a mapping: {name}: "
                                    "{model: ..., nodes: ...}", problem="is not a mapping"))
            continue
        model = entry.get("model")
        if model is not None and not isinstance(model, str):
            errors.append(SpecError(f"{PRESETS_KEY}.{name}.model", model, "give the model as a hub id or a path",
                                    problem="is not a string"))
            continue
        presets[name] = Preset(name, {str(k): v for k, v in entry.items()})
    if errors:
        raise SpecErrors(errors)
    return own, presets


@dataclass(frozen=True)
class PresetRow:
    """One line of ``slurm-vllm models``: a preset as written, and the spec it gives (or why not)."""

    name: str
    model: str
    fields: dict[str, Any]
    spec: dict[str, Any] | None  # the resolved settings users care about; None when invalid
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "fields": self.fields, "spec": self.spec, "error": self.error}


def list_presets(profile: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> list[PresetRow]:
    """Every preset of ``profile``, each built as ``submit NAME`` would build it (without
    checking local paths), so a broken entry shows its error instead of failing at submission."""
    from slurm_vllm.spec.layers import build_spec, read_spec_file  # noqa: PLC0415 - layers imports this module

    _own, presets = split_profile(read_spec_file(profile), f"profile {profile}")
    rows = []
    for name, preset in presets.items():
        try:
            spec, _ = build_spec({"model": name}, profile=profile, check_paths=False,
                                 environ=os.environ if environ is None else environ)
        except SpecErrors as exc:
            rows.append(PresetRow(name, preset.model, preset.fields, None, "; ".join(str(e) for e in exc.errors)))
            continue
        except SpecError as exc:
            rows.append(PresetRow(name, preset.model, preset.fields, None, str(exc)))
            continue
        rows.append(PresetRow(name, spec.model.name, preset.fields, {
            "nodes": spec.resources.nodes, "gpus_per_node": spec.resources.gpus_per_node,
            "tensor_parallel_size": spec.tensor_parallel_size, "pipeline_parallel_size": spec.pipeline_parallel_size,
            "job_name": spec.resources.job_name, "served_name": spec.model.served_name,
            "extra_args": list(spec.model.extra_args), "partition": spec.resources.partition,
        }, None))
    return rows
