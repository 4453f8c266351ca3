"""ServeSpec: what the user asks for, validated once, with the same field names everywhere.

A spec is built from CLI flags, a YAML/TOML file, a site profile, environment variables or
Python, and always ends up in the same sections (``model``, ``resources``, ``parallel``, ``ray``,
``network``, ``environment``, ``serve``). Flat names (``nodes=2``, ``partition="gpu"``) are
accepted everywhere and mapped into their section, so users never need to know the layout.

Every rule that can be checked on the login node is checked here, before anything is written
or submitted; each failure is a :class:`~slurm_vllm.errors.SpecError` naming the field, the
value and the fix. The renderer and the node program read the section and field names below;
extend them, do not rename them.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from slurm_vllm import shell
from slurm_vllm.errors import SpecError, SpecErrors, cut
from slurm_vllm.sbatch_options import check_sbatch_args
from slurm_vllm.vllm_args import check_extra_args

_TRUE_WORDS, _FALSE_WORDS = ("true", "1"), ("false", "0")


def parse_bool(value: Any, field: str) -> bool:
    """A boolean from a file, a flag, the environment or Python, parsed strictly.

    true/false (any case) and 1/0 only: "no", "off" or "False " must never be read as the
    opposite of what was meant, least of all for a switch that turns authentication off.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise SpecError(field, value, "write true or false (or 1 or 0)", problem="is not a boolean")


def _strict_bool(value: Any, info: ValidationInfo) -> bool:
    return parse_bool(value, info.field_name or "value")


#: A bool field that accepts true/false and 1/0 only (pydantic's own bool takes yes/no/on/off).
StrictBool = Annotated[bool, BeforeValidator(_strict_bool)]


def _env_value(value: Any, info: ValidationInfo) -> Any:
    """``env`` as a mapping of strings: a whole number becomes its text (``OMP_NUM_THREADS: 8``);
    list items are NAME=value. A decimal is refused: ``12.10`` would arrive as ``12.1``."""
    out = {}
    for name, v in _env_mapping(value).items():
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise SpecError(f"env.{name}", v, f"quote the value in the file: {name}: \"...\" (a string)",
                            problem="is not a string")
        out[str(name)] = v if isinstance(v, str) else str(v)
    return out


def _env_mapping(value: Any) -> Mapping[str, Any]:
    """``env`` as a mapping: given as one already, or as a list of NAME=value strings."""
    if isinstance(value, (list, tuple)):
        out: dict[str, Any] = {}
        for i, item in enumerate(value):
            if not isinstance(item, str) or "=" not in item:
                raise SpecError(f"env[{i}]", item, "write env as a mapping (NAME: value), or as a list "
                                                   "of NAME=value strings", problem="is not NAME=value")
            name, _, text = item.partition("=")
            out[name] = text
        return out
    if not isinstance(value, Mapping):
        raise SpecError("env", value, "write env as a mapping of NAME: value, or a list of NAME=value strings",
                        problem="is not a mapping")
    return value


def _time_value(value: Any, info: ValidationInfo) -> Any:
    """A time limit written as a bare number means minutes, as in Slurm (``time: 90``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """The model to serve and the vLLM arguments passed through verbatim."""

    name: str = Field(description="Hub id (org/name) or local path of the model (vllm serve MODEL).")
    served_name: str | None = Field(default=None, description="Name clients use in requests (--served-model-name).")
    extra_args: list[str] = Field(
        default_factory=list, description="Extra `vllm serve` arguments, passed through verbatim."
    )


class ResourcesSection(_Section):
    """What the job asks Slurm for; each field becomes one ``#SBATCH`` line."""

    nodes: int = Field(default=1, description="Number of nodes (#SBATCH --nodes).")
    gpus_per_node: int = Field(default=1, description="GPUs per node (#SBATCH --gpus-per-node); 0 for CPU-only nodes.")
    cpus_per_task: int | None = Field(default=None, description="CPUs for the one task per node (--cpus-per-task).")
    mem: str | None = Field(default=None, description="Memory per node, Slurm syntax such as 64G (--mem).")
    time: Annotated[str | None, BeforeValidator(_time_value)] = Field(
        default=None, description="Time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.")
    partition: str | None = Field(default=None, description="Slurm partition (--partition).")
    account: str | None = Field(default=None, description="Slurm account (--account).")
    qos: str | None = Field(default=None, description="Slurm QOS (--qos).")
    constraint: str | None = Field(default=None, description="Node features (--constraint).")
    exclusive: StrictBool = Field(default=False, description="Whole nodes only (--exclusive).")
    job_name: str = Field(default="vllm", description="Slurm job name; also names the default job directory.")
    signal_grace: int = Field(
        default=120, description="Seconds before the time limit at which SIGUSR2 asks the job to shut down."
    )
    sbatch_args: list[str] = Field(
        default_factory=list, description="Extra `--option=value` sbatch options from an allow-list."
    )


class ParallelSection(_Section):
    """How vLLM splits the model over the allocation's GPUs."""

    tensor_parallel_size: int | None = Field(default=None, description="Tensor parallel size; default GPUs per node.")
    pipeline_parallel_size: int | None = Field(default=None, description="Pipeline parallel size; default nodes.")
    allow_partial: StrictBool = Field(
        default=False, description="Allow TP x PP to use fewer GPUs than nodes x gpus_per_node."
    )


class RaySection(_Section):
    """Deadlines for forming the Ray cluster inside the job."""

    join_timeout: float = Field(default=300.0,
                                description="A worker gives up joining the head after this many seconds.")
    cluster_timeout: float = Field(default=600.0, description="The head gives up waiting for all nodes after this.")


class NetworkSection(_Section):
    """Which network the nodes talk over (default: the route to the head)."""

    interface: str | None = Field(default=None, description="Network interface name for Ray/NCCL/Gloo, e.g. ib0.")
    cidr: str | None = Field(default=None, description="Pick each node's address from this network, e.g. 10.1.0.0/16.")


class EnvironmentSection(_Section):
    """How the batch script prepares the environment before launching the node program."""

    setup: list[str] = Field(
        default_factory=list, description="Trusted shell lines (e.g. module load), written verbatim."
    )
    venv: str | None = Field(default=None, description="Python virtual environment to activate.")
    container: str | None = Field(default=None, description="Apptainer/Singularity image to run the node program in.")
    container_runtime: Literal["apptainer", "singularity"] = Field(
        default="apptainer", description="Which container command to call."
    )
    container_binds: list[str] = Field(
        default_factory=list, description="Extra --bind SRC[:DST[:OPTS]] for the container."
    )
    env: Annotated[dict[str, str], BeforeValidator(_env_value)] = Field(
        default_factory=dict, description="Environment variables to export.")
    python: str = Field(default="python3", description="Python that runs `-m slurm_vllm node` on each node.")


class ServeSection(_Section):
    """The HTTP endpoint vLLM serves."""

    port: int | None = Field(default=None, description="vLLM API port; default: chosen per job on the head node.")
    api_key: StrictBool = Field(
        default=True, description="Require an API key (generated per job); --no-api-key turns it off.")
    ready_timeout: float = Field(
        default=3600.0, description="Seconds the head waits for vLLM to load and answer before giving up."
    )


#: Top-level keys that are whole sections.
SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSection,
    "resources": ResourcesSection,
    "parallel": ParallelSection,
    "ray": RaySection,
    "network": NetworkSection,
    "environment": EnvironmentSection,
    "serve": ServeSection,
}

#: Top-level keys that are plain values.
TOP_FIELDS = ("backend", "job_dir")


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
    image = env.get("container")
    if isinstance(image, str) and image and "://" not in image:
        env["container"] = _absolute(image)
    job_dir = out.get("job_dir")
    if isinstance(job_dir, str) and job_dir:
        out["job_dir"] = _absolute(job_dir)


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


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
        """PP as vLLM will get it: the spec's value, else the number of nodes."""
        pp = self.parallel.pipeline_parallel_size
        return pp if pp is not None else self.resources.nodes

    @property
    def is_local_model(self) -> bool:
        """True when the model is a path on the shared filesystem rather than a hub id."""
        return self.model.name.startswith("/")


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


# ---------------------------------------------------------------------------------------------
# Validation rules
# ---------------------------------------------------------------------------------------------

_TIME_RE = re.compile(
    r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{1,2}|\d+-\d{1,2}:\d{1,2}:\d{1,2})$"
)
_TIME_WORDS = ("infinite", "unlimited")
#: Upper bound of every timeout (seconds): longer than any time limit a site grants.
MAX_TIMEOUT = 30 * 86400.0
#: A job must have this long between its start and its time-limit warning (seconds).
MIN_RUN_AFTER_WARNING = 60


def time_limit_seconds(text: str | None) -> int | None:
    """A Slurm time limit in seconds; None when unset, unlimited (also ``0``) or malformed."""
    if text is None or not _TIME_RE.match(text):
        return None
    days, _, clock = text.rpartition("-") if "-" in text else ("", "", text)
    parts = [int(x) for x in clock.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
        total = ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    elif len(parts) == 1:  # MM
        total = parts[0] * 60
    elif len(parts) == 2:  # MM:SS
        total = parts[0] * 60 + parts[1]
    else:  # HH:MM:SS
        total = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return total or None  # Slurm reads a zero time limit as no limit


def _clock(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
_MEM_RE = re.compile(r"^\d+[KMGTkmgt]?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_RESERVED_ENV = {"SLURM_VLLM_JOB_DIR"}

def _effective(spec: ServeSpec) -> tuple[int, int]:
    return spec.tensor_parallel_size, spec.pipeline_parallel_size


def _walk_strings(obj: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk_strings(str(k), f"{path}.{k}" if path else str(k))
            yield from _walk_strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_strings(v, f"{path}[{i}]")


def _flat_path(path: str) -> str:
    head, _, rest = path.partition(".")
    if head == "model" and rest.startswith("name"):
        return "model" + rest[len("name"):]
    if head in SECTIONS and rest:
        return rest
    return path


def check_spec(spec: ServeSpec, check_paths: bool = True) -> list[SpecError]:
    """Every rule of the spec; returns the problems (empty when the spec is fine).

    ``check_paths`` also checks files on this machine (the local model, the venv, the image);
    it is off when a compute node reloads ``spec.json``.
    """
    errors: list[SpecError] = []
    add = errors.append
    r, p, e, s = spec.resources, spec.parallel, spec.environment, spec.serve

    # Newlines, NULs, other control characters: no value needs one, none survives a script line.
    for path, text in _walk_strings(spec.model_dump(mode="python"), ""):
        problem = shell.line_problem(text)
        if problem is not None:
            add(SpecError(_flat_path(path), text, f"remove the {problem}: every value must fit on one line "
                          "and hold no control characters", problem=f"holds a {problem}"))
    if errors:
        return errors

    if not spec.model.name.strip():
        add(SpecError("model", spec.model.name, "give a hub id like org/name or a local path", problem="is empty"))
    # vllm serve reads a leading "-" as an option: "--api-key=x" as a model would replace the key.
    for name, given in (("model", spec.model.name), ("served_name", spec.model.served_name)):
        if given is not None and given.startswith("-"):
            add(SpecError(name, given, "give a name that does not start with '-' (vllm serve would read it "
                                       "as an option); write a local path as ./-name", problem="starts with '-'"))

    # Sizes.
    if r.nodes < 1:
        add(SpecError("nodes", r.nodes, "ask for at least 1 node", problem="is below 1"))
    if r.gpus_per_node < 0:
        add(SpecError("gpus_per_node", r.gpus_per_node, "use 0 (CPU-only nodes) or more", problem="is negative"))
    if r.cpus_per_task is not None and r.cpus_per_task < 1:
        add(SpecError("cpus_per_task", r.cpus_per_task, "use 1 or more, or leave it unset", problem="is below 1"))
    for name, value in (("tensor_parallel_size", p.tensor_parallel_size),
                        ("pipeline_parallel_size", p.pipeline_parallel_size)):
        if value is not None and value < 1:
            add(SpecError(name, value, "use 1 or more, or leave it unset for the default", problem="is below 1"))
    if errors:
        return errors

    tp, pp = _effective(spec)
    gpus = r.nodes * r.gpus_per_node
    if r.gpus_per_node > 0:
        if tp * pp > gpus:
            add(SpecError(
                "tensor_parallel_size", tp,
                f"TP x PP = {tp} x {pp} = {tp * pp} needs more GPUs than nodes x gpus_per_node = "
                f"{r.nodes} x {r.gpus_per_node} = {gpus}; lower TP/PP or ask for more nodes/GPUs",
                problem="does not fit the allocation"))
        elif tp * pp < gpus and not p.allow_partial:
            add(SpecError(
                "tensor_parallel_size", tp,
                f"TP x PP = {tp} x {pp} = {tp * pp} leaves GPUs idle (nodes x gpus_per_node = {gpus}); "
                f"set TP x PP = {gpus} (e.g. tensor_parallel_size={r.gpus_per_node}, "
                f"pipeline_parallel_size={r.nodes}) or set allow_partial: true",
                problem="does not use the allocation"))
        if spec.backend == "mp" and tp > r.gpus_per_node:
            add(SpecError(
                "tensor_parallel_size", tp,
                f"with backend 'mp' this tool keeps each tensor-parallel group inside one node: set "
                f"tensor_parallel_size <= gpus_per_node ({r.gpus_per_node}) and use "
                f"pipeline_parallel_size across nodes, or use backend 'ray', which places TP workers "
                f"across nodes", problem="is larger than gpus_per_node"))
    if spec.backend == "mp" and (tp * pp) % r.nodes != 0:
        add(SpecError(
            "pipeline_parallel_size", pp,
            f"vLLM's mp backend starts TP x PP / nodes workers on every node, so TP x PP = {tp * pp} "
            f"must be a multiple of nodes = {r.nodes}", problem="does not divide over the nodes"))

    # Time, memory, signal.
    if r.time is not None and not (_TIME_RE.match(r.time) or r.time.lower() in _TIME_WORDS):
        add(SpecError("time", r.time,
                      "use a Slurm time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 04:00:00)",
                      problem="is not a Slurm time limit"))
    if r.mem is not None and not _MEM_RE.match(r.mem):
        add(SpecError("mem", r.mem, "use a number with an optional K/M/G/T suffix, e.g. 64G",
                      problem="is not a Slurm memory size"))
    if not 1 <= r.signal_grace <= 65535:
        add(SpecError("signal_grace", r.signal_grace, "use 1..65535 seconds (e.g. 120)", problem="is out of range"))
    else:
        limit = time_limit_seconds(r.time)
        if limit is not None and limit < r.signal_grace + MIN_RUN_AFTER_WARNING:
            add(SpecError("time", r.time,
                          f"ask for at least {_clock(r.signal_grace + MIN_RUN_AFTER_WARNING)}: the job is told "
                          f"to stop signal_grace={r.signal_grace}s before its time limit, and needs "
                          f"{MIN_RUN_AFTER_WARNING}s before that to start; or lower signal_grace",
                          problem="is shorter than the time-limit warning"))
    if not r.job_name.strip():
        add(SpecError("job_name", r.job_name, "give a non-empty job name", problem="is empty"))
    for name in ("job_name", "partition", "account", "qos", "constraint", "job_dir"):
        sbatch_text: str | None = spec.job_dir if name == "job_dir" else getattr(r, name)
        if sbatch_text is not None and shell.job_separator(sbatch_text):
            add(SpecError(name, sbatch_text, "choose a value without 'hetjob'/'packjob' (sbatch reads them as "
                                       "a job separator)", problem="cannot be written on an #SBATCH line"))
    errors.extend(check_sbatch_args(r.sbatch_args))

    # Deadlines: positive and finite (inf or 1e10 would overflow the node's timers).
    for name, seconds in (("join_timeout", spec.ray.join_timeout), ("cluster_timeout", spec.ray.cluster_timeout),
                          ("ready_timeout", s.ready_timeout)):
        if not 0 < seconds <= MAX_TIMEOUT:
            add(SpecError(name, seconds, f"use a positive number of seconds, at most {MAX_TIMEOUT:.0f} "
                                         f"({MAX_TIMEOUT / 86400:.0f} days)", problem="is out of range"))

    # Network.
    n = spec.network
    if n.interface is not None and n.cidr is not None:
        add(SpecError("cidr", n.cidr, "set either interface or cidr, not both", problem="conflicts with interface"))
    if n.interface is not None and not _IFACE_RE.match(n.interface):
        add(SpecError("interface", n.interface, "give an interface name such as ib0 or eth0 (1-15 characters)",
                      problem="is not an interface name"))
    if n.cidr is not None:
        try:
            ipaddress.ip_network(n.cidr, strict=False)
        except ValueError:
            add(SpecError("cidr", n.cidr, "give a network such as 10.1.0.0/16", problem="is not a network"))

    # Port.
    if s.port is not None and not 1024 <= s.port <= 65535:
        add(SpecError("port", s.port,
                      "use a port in 1024..65535 (ports below 1024 need root on the compute node), "
                      "or leave it unset to have one chosen per job", problem="is out of range"))

    # Environment.
    for key in e.env:
        if not _ENV_NAME_RE.match(key):
            add(SpecError(f"env.{key}", key, "use letters, digits and _ only, not starting with a digit",
                          problem="is not a valid environment variable name"))
        elif key in _RESERVED_ENV:
            add(SpecError(f"env.{key}", key, "remove it: the batch script sets it to the job directory",
                          problem="is reserved"))
    for i, line in enumerate(e.setup):
        if not line.strip():
            add(SpecError(f"setup[{i}]", line, "remove the empty setup line", problem="is empty"))
    if not e.python.strip():
        add(SpecError("python", e.python, "give a python command such as python3", problem="is empty"))
    for i, bind in enumerate(e.container_binds):
        src = bind.split(":", 1)[0]
        if not src.startswith("/"):
            add(SpecError(f"container_binds[{i}]", bind, "give an absolute source path: /data or /data:/mnt",
                          problem="is not an absolute path"))

    # Job directory: Slurm file patterns give up on a backslash.
    if spec.job_dir is not None:
        if "\\" in spec.job_dir:
            add(SpecError("job_dir", spec.job_dir,
                          "choose a path without a backslash (Slurm's --output patterns stop "
                          "substituting %j/%t when the path holds one)", problem="holds a backslash"))
        if e.container and any(c in spec.job_dir for c in ":,"):
            add(SpecError("job_dir", spec.job_dir,
                          "choose a path without ':' or ',' (the job directory is bound into the "
                          "container with --bind, which splits on them)", problem="cannot be bound"))
        if spec.job_dir.strip() == "":
            add(SpecError("job_dir", spec.job_dir, "give a path or leave it unset", problem="is empty"))

    if e.container and spec.is_local_model and any(c in spec.model.name for c in ":,"):
        add(SpecError("model", spec.model.name,
                      "choose a model path without ':' or ',' (a local model is bound into the container "
                      "with --bind, which splits on them)", problem="cannot be bound"))

    # Extra vLLM args that fight the tool.
    errors.extend(check_extra_args(spec))

    if check_paths:
        errors.extend(check_paths_exist(spec))
    return errors


def check_paths_exist(spec: ServeSpec) -> list[SpecError]:
    """Files the job will need that this machine can check: the local model, venv, image."""
    errors: list[SpecError] = []
    name = spec.model.name
    if spec.is_local_model:
        path = Path(name)
        if not path.exists():
            errors.append(SpecError("model", name, "give an existing model directory on the shared "
                                                   "filesystem, or a hub id like org/name",
                                    problem="does not exist"))
        elif not (path / "config.json").is_file():
            errors.append(SpecError("model", name, "point at the directory that holds the model's "
                                                   "config.json", problem="has no config.json"))
    venv = spec.environment.venv
    if venv is not None and not Path(venv, "bin", "activate").is_file():
        errors.append(SpecError("venv", venv, "give a virtual environment directory that has bin/activate",
                                problem="is not a virtual environment"))
    image = spec.environment.container
    if image is not None and "://" not in image and not Path(image).exists():
        errors.append(SpecError("container", image, "give an existing .sif image or a URI such as "
                                                    "docker://org/image:tag", problem="does not exist"))
    return errors


def validate_spec(spec: ServeSpec, check_paths: bool = True) -> ServeSpec:
    """Re-run every rule (after a section was edited in place); raise :class:`SpecErrors`."""
    errors = check_spec(spec, check_paths=check_paths)
    if errors:
        raise SpecErrors(errors)
    return spec


# ---------------------------------------------------------------------------------------------
# Files and layers
# ---------------------------------------------------------------------------------------------


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

    Precedence, lowest first: defaults < site profile < spec file (``--config``) < environment
    variables (``SLURM_VLLM_*``) < flags. ``profile`` defaults to ``$SLURM_VLLM_PROFILE``.
    ``flags`` uses flat names; ``flag_sources`` names the flag each came from (for the
    explanation). Returns the validated spec and ``[(field, value, source), ...]`` for every
    field, defaults included.
    """
    environ = os.environ if environ is None else environ
    flags = dict(flags or {})
    flag_sources = dict(flag_sources or {})
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if profile is None and environ.get(PROFILE_ENV_VAR):
        profile = environ[PROFILE_ENV_VAR]
    if profile is not None:
        layers.append((f"profile {profile}", read_spec_file(profile)))
    if config is not None:
        layers.append((f"config {config}", read_spec_file(config)))
    layers.extend(env_layer(environ))
    for name, value in flags.items():
        layers.append((flag_sources.get(name, f"flag --{name.replace('_', '-')}"), {name: value}))
    merged = _merge_layers(layers)
    spec = ServeSpec.model_validate(_unflatten(merged), context={"check_paths": check_paths})
    return spec, explain(spec, merged)


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
                rows.append((name, v, merged.get(f"{key}.{field}", (None, "default"))[1]))
        else:
            rows.append((key, value, merged.get(key, (None, "default"))[1]))
    return rows


def field_names() -> list[str]:
    """Every flat field name a spec accepts (for docs, completion and suggestions)."""
    return sorted(["model", "backend", "job_dir", "no_api_key", *FLAT_NAMES])
