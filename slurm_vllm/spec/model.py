"""ServeSpec: the validated whole, built from flat names or sections."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from slurm_vllm.errors import SpecError, SpecErrors
from slurm_vllm.spec.bridge import _convert
from slurm_vllm.spec.fields import (
    SECTIONS,
    TOP_FIELDS,
    EnvironmentSection,
    ModelSection,
    NetworkSection,
    ParallelSection,
    RaySection,
    ResourcesSection,
    ServeSection,
    _Section,
    parse_bool,
)
from slurm_vllm.spec.names import ALIASES, FLAT_NAMES, _all_names, _suggest, job_name_for, normalize
from slurm_vllm.spec.rules import check_spec

#: Whether validation also checks files on this machine. pydantic routes ``model_validate``
#: through our ``__init__`` (which drops the validation context), so the flag travels here.
_CHECK_PATHS: ContextVar[bool] = ContextVar("slurm_vllm_check_paths", default=True)


#: Environment variables whose values a repr hides (``HF_TOKEN``, ``WANDB_API_KEY``, ...).
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSW", re.IGNORECASE)


def _masked(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for showing: values of secret-looking names replaced by ``***``."""
    return {k: "***" if _SECRET_NAME.search(k) else v for k, v in env.items()}


def _base_getattr(obj: BaseModel, name: str) -> Any:
    """pydantic's own attribute fallback (private attributes), which mypy's stubs do not show."""
    fallback = getattr(BaseModel, "__getattr__", None)
    if fallback is None:
        raise AttributeError(name)
    return fallback(obj, name)


class ServeSpec(_Section):
    """Everything one serving job needs, validated.

    Build it with flat names, the same as the CLI flags with underscores::

        ServeSpec("org/M", nodes=2, gpus_per_node=8, partition="gpu", backend="ray")

    or with the sections (``resources={"nodes": 2}``). That takes exactly what it is given. With
    ``profile=`` or ``config=`` it is built as the CLI builds it (:func:`load_spec`: site profile
    and its presets, spec file, ``SLURM_VLLM_*`` variables, then the keywords)::

        ServeSpec("llama-70b", profile="~/cluster.yaml", time="02:00:00")

    Flat names read as they write (``spec.nodes``, ``spec.partition``); the repr shows only what
    differs from the defaults. Invalid input raises :class:`SpecErrors` (a ``ValueError``)
    listing every problem, each naming the field, the value and the fix.
    """

    model: ModelSection
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    backend: Literal["ray", "mp"] = Field(
        default="ray", description="vLLM's executor across nodes: ray (a Ray cluster formed in the job) or mp "
                                   "(vLLM's own multi-node mode).")
    ray: RaySection = Field(default_factory=RaySection)
    network: NetworkSection = Field(default_factory=NetworkSection)
    environment: EnvironmentSection = Field(default_factory=EnvironmentSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    job_dir: str | None = Field(default=None, description="Job directory; unset: a new one under "
                                                          "~/.slurm_vllm/jobs, named after the job and the time.")

    def __init__(self, model: Any = None, /, *, profile: str | os.PathLike[str] | None = None,
                 config: str | os.PathLike[str] | None = None, **data: Any) -> None:
        if model is not None:
            if "model" in data:
                raise SpecErrors([SpecError("model", model, "give the model once", problem="is given twice")])
            data["model"] = model
        if profile is not None or config is not None:
            # A file named: build as the CLI does (profile, preset, config, environment, keywords).
            from slurm_vllm.spec.layers import load_spec  # noqa: PLC0415 - layers imports this module

            data = load_spec(data.pop("model", None), profile=profile, config=config, **data).model_dump()
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _convert(exc) from None

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning a section, a top-level field or a flat name re-validates the whole spec.

        ``spec.nodes = 2`` works like the keyword; an invalid result raises
        :class:`SpecErrors` and leaves the spec unchanged. (Editing inside a section,
        ``spec.resources.nodes = 2``, checks that field only; :func:`validate_spec` re-checks
        the rest, and ``prepare_job`` always does.)
        """
        flat = ALIASES.get(name, name)
        if name not in type(self).model_fields and flat not in FLAT_NAMES and name != "no_api_key":
            super().__setattr__(name, value)
            return
        data = self.model_dump()
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if name == "model" and self.resources.job_name == job_name_for(self.model.name):
            del data["resources"]["job_name"]  # derived from the old model: derive it again
        if name in type(self).model_fields:
            data[name] = value
        elif name == "no_api_key":
            try:
                data["serve"]["api_key"] = not parse_bool(value, "no_api_key")
            except SpecError as exc:
                raise SpecErrors([exc]) from None
        else:
            section, field = FLAT_NAMES[flat]
            data[section][field] = value
        new = type(self).model_validate(data)
        for field_name in type(self).model_fields:
            super().__setattr__(field_name, getattr(new, field_name))

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> ServeSpec:
        """Validate a mapping (flat or sectioned); errors come out as :class:`SpecErrors`.

        ``context={"check_paths": False}`` skips the checks of local files (for ``spec.json``
        read back on a compute node).
        """
        context = kwargs.get("context")
        check = True
        if isinstance(context, Mapping):
            check = bool(context.get("check_paths", True))
        token = _CHECK_PATHS.set(check)
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise _convert(exc) from None
        finally:
            _CHECK_PATHS.reset(token)

    def __getattr__(self, name: str) -> Any:
        """Flat names read as they write: ``spec.nodes`` is ``spec.resources.nodes``."""
        if name.startswith("_") or name in type(self).model_fields:
            return _base_getattr(self, name)
        flat = ALIASES.get(name, name)
        if flat != name and hasattr(type(self), flat):  # tp, pp: the sizes vLLM gets, as the properties
            return getattr(self, flat)
        if flat in FLAT_NAMES:
            section, field = FLAT_NAMES[flat]
            return getattr(getattr(self, section), field)
        if name == "no_api_key":
            return not self.serve.api_key
        raise AttributeError(f"ServeSpec has no field {name!r}: {_suggest(name, _all_names())}")

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """What the repr shows: the model, then only the flat fields that differ from their
        defaults, in the order of the sections, e.g. ``ServeSpec('org/M', nodes=2)``."""
        yield None, self.model.name
        derived_name = job_name_for(self.model.name)
        for flat, (section, field) in FLAT_NAMES.items():
            value = getattr(getattr(self, section), field)
            info = SECTIONS[section].model_fields[field]
            if field == "job_name":
                default: Any = derived_name
            else:
                default = info.get_default(call_default_factory=True)
            if field == "api_key":
                if not value:
                    yield "no_api_key", True
                continue
            if value != default:
                yield flat, _masked(value) if field == "env" else value
        for top in TOP_FIELDS:
            value = getattr(self, top)
            if value != type(self).model_fields[top].get_default(call_default_factory=True):
                yield top, value

    def __str__(self) -> str:
        return repr(self)

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            out = normalize(data)
            name = out.get("model", {}).get("name")
            if isinstance(name, str) and "job_name" not in out.get("resources", {}):
                out.setdefault("resources", {})["job_name"] = job_name_for(name)
            return out
        return data

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> ServeSpec:
        check_paths = _CHECK_PATHS.get()
        if isinstance(info.context, Mapping):
            check_paths = bool(info.context.get("check_paths", True))
        errors = check_spec(self, check_paths=check_paths)
        if errors:
            raise SpecErrors(errors)
        return self

    # -- derived values the renderer and the node program share --------------------------------

    @property
    def tensor_parallel_size(self) -> int:
        """TP as vLLM will get it: the spec's value, else GPUs per node (1 on CPU-only nodes)."""
        tp = self.parallel.tensor_parallel_size
        return tp if tp is not None else max(self.resources.gpus_per_node, 1)

    @property
    def pipeline_parallel_size(self) -> int:
        """PP as vLLM will get it: the spec's value, else the nodes of one replica."""
        pp = self.parallel.pipeline_parallel_size
        return pp if pp is not None else self.nodes_per_replica

    @property
    def replicas(self) -> int:
        """Copies of the model served behind one router (1: no router)."""
        return max(self.parallel.replicas, 1)

    @property
    def nodes_per_replica(self) -> int:
        """Consecutive nodes each replica runs on (``nodes / replicas``)."""
        return max(self.resources.nodes // self.replicas, 1)

    @property
    def executor(self) -> Literal["ray", "mp", "local"]:
        """How vLLM runs on the nodes: one copy uses ``backend``; with replicas no Ray is formed,
        a one-node replica runs vLLM on its own (``local``), a replica of several nodes runs vLLM's
        own multi-node mode over them (``mp``)."""
        if self.replicas == 1:
            return self.backend
        return "mp" if self.nodes_per_replica > 1 else "local"

    @property
    def min_ready_replicas(self) -> int:
        """Replicas that must answer before the job is READY (default all)."""
        wanted = self.serve.min_ready_replicas
        return self.replicas if wanted is None else min(max(wanted, 1), self.replicas)

    @property
    def is_local_model(self) -> bool:
        """True when the model is a path on the shared filesystem rather than a hub id."""
        return self.model.name.startswith("/")
