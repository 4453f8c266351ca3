"""ServeSpec: the validated whole, built from flat names or sections."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from slurm_vllm.errors import SpecError, SpecErrors
from slurm_vllm.spec.bridge import _convert
from slurm_vllm.spec.fields import (
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
from slurm_vllm.spec.names import ALIASES, FLAT_NAMES, normalize
from slurm_vllm.spec.rules import check_spec

#: Whether validation also checks files on this machine. pydantic routes ``model_validate``
#: through our ``__init__`` (which drops the validation context), so the flag travels here.
_CHECK_PATHS: ContextVar[bool] = ContextVar("slurm_vllm_check_paths", default=True)


class ServeSpec(_Section):
    """Everything one serving job needs, validated.

    Build it with flat names, the same as the CLI flags with underscores::

        ServeSpec("org/M", nodes=2, gpus_per_node=8, partition="gpu", backend="ray")

    or with the sections (``resources={"nodes": 2}``), or from a file with
    :func:`load_spec_file` / :func:`build_spec`. Invalid input raises :class:`SpecErrors` (a
    ``ValueError``) listing every problem, each naming the field, the value and the fix.
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

    def __init__(self, model: Any = None, /, **data: Any) -> None:
        if model is not None:
            if "model" in data:
                raise SpecErrors([SpecError("model", model, "give the model once", problem="is given twice")])
            data["model"] = model
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

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return normalize(data)
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
    def min_ready_replicas(self) -> int:
        """Replicas that must answer before the job is READY (default all)."""
        wanted = self.serve.min_ready_replicas
        return self.replicas if wanted is None else min(max(wanted, 1), self.replicas)

    @property
    def is_local_model(self) -> bool:
        """True when the model is a path on the shared filesystem rather than a hub id."""
        return self.model.name.startswith("/")
