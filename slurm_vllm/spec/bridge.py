"""pydantic's error reports turned into :class:`~slurm_vllm.errors.SpecError`: the field by its
flat name, the value, and a fix a user can act on."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from slurm_vllm.errors import SpecError, SpecErrors
from slurm_vllm.spec.fields import SECTIONS
from slurm_vllm.spec.names import FLAT_NAMES, _all_names, _suggest


def _convert(exc: ValidationError) -> SpecErrors:
    """Turn pydantic's error report into our SpecErrors, keeping SpecErrors raised inside."""
    out: list[SpecError] = []
    for err in exc.errors():
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, SpecErrors):
            out.extend(inner.errors)
            continue
        if isinstance(inner, SpecError):
            out.append(inner)
            continue
        loc = [str(p) for p in err.get("loc", ())]
        field = _flat_field_name(loc)
        msg = err.get("msg", "is not valid")
        if err.get("type") == "missing":
            fix = "give the model to serve: a hub id like org/name or a local path" if field == "model" \
                else f"set {field}"
            out.append(SpecError(field, None, fix, problem="is missing"))
            continue
        if err.get("type") == "extra_forbidden":
            out.append(SpecError(field, err.get("input"), _suggest(loc[-1], _all_names()),
                                 problem="is not a known field"))
            continue
        out.append(SpecError(field, err.get("input"), _fix_for_type(field, msg), problem=msg.lower()))
    return SpecErrors(out)


def _kind(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    for marker, words in (("dict", "a mapping of NAME: value"), ("list", "a list of strings"),
                          ("bool", "true or false"), ("float", "a number"), ("int", "a whole number"),
                          ("Literal", "one of the listed choices"), ("str", "a string")):
        if marker in text:
            return words
    return "a valid value"


def _fix_for_type(field: str, msg: str) -> str:
    if field == "backend":
        return "use 'ray' (default) or 'mp'"
    if field == "container_runtime":
        return "use 'apptainer' (default) or 'singularity'"
    name = field.rsplit(".", maxsplit=1)[-1].split("[", maxsplit=1)[0]
    if field == "model":
        return "give a hub id like org/name or a local path"
    if name in FLAT_NAMES:
        section, fname = FLAT_NAMES[name]
        info = SECTIONS[section].model_fields[fname]
        return f"give {_kind(info.annotation)}" + (f" ({info.description})" if info.description else "")
    return "fix the value"


def _flat_field_name(loc: list[str]) -> str:
    if not loc:
        return "spec"
    if loc[0] == "model" and (len(loc) == 1 or loc[1] == "name"):
        return "model"
    if loc[0] in SECTIONS and len(loc) > 1:
        rest = loc[1:]
        if rest[0] in FLAT_NAMES:
            return ".".join(rest)
        return ".".join(loc)
    return ".".join(loc)
