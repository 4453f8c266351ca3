"""The spec's sections and fields: what each holds, its type, its default and its meaning, and
the strict value types (booleans, ``env``, a bare-number time) a careless value cannot slip past."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo

from slurm_vllm.errors import SpecError

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


#: vllm-router's load-balancing policies (``vllm-router --policy``).
RouterPolicy = Literal["random", "round_robin", "cache_aware", "kv_aware", "power_of_two", "consistent_hash",
                       "sticky_least_loaded"]


#: Where ``stage_weights`` copies a local model on each node (node/staging.py).
StageWeights = Literal["none", "local", "shm"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """The model to serve and the vLLM arguments passed through verbatim."""

    name: str = Field(description="Hub id (org/name) or local path of the model (vllm serve MODEL).")
    served_name: str | None = Field(default=None, description="Name clients use in requests (--served-model-name).")
    extra_args: list[str] = Field(
        default_factory=list, description="Extra `vllm serve` arguments, passed through verbatim."
    )
    stage_weights: StageWeights = Field(
        default="none", description="Copy a local model to each node's own storage before vllm serve and serve "
                                    "that copy: none, local (node-local disk) or shm (/dev/shm).")
    keep_staged: StrictBool = Field(
        default=False, description="Keep the staged copy on the nodes after the job, for the next job to reuse.")


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
    job_name: str = Field(default="", description="Slurm job name; also names the default job directory. Default: "
                                                  "from the model (a preset's name, else the model's last path "
                                                  "component).")
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
    replicas: int = Field(
        default=1, description="Copies of the model, each on nodes / replicas nodes, behind one router and one URL.")


class RaySection(_Section):
    """Forming the cluster inside the job: its deadlines and the pre-flight checks before it."""

    join_timeout: float = Field(default=300.0,
                                description="A worker gives up joining the head after this many seconds.")
    cluster_timeout: float = Field(default=600.0, description="The head gives up waiting for all nodes after this.")
    preflight: Literal["full", "quick", "off"] = Field(
        default="full", description="Checks on every node before vLLM starts: full, quick (no cross-node "
                                    "all-reduce) or off.")


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
    python: str | None = Field(
        default=None, description="Python that runs `-m slurm_vllm node` on each node; unset: python3 after "
                                  "venv/container/setup, else the submitting interpreter.")
    cache_dir: str | None = Field(
        default=None, description="Compile caches (vLLM, inductor, Triton) kept per vLLM version for the next job; "
                                  "default: cache/ beside the jobs root; none turns them off.")


class ServeSection(_Section):
    """The HTTP endpoint vLLM serves."""

    port: int | None = Field(default=None, description="vLLM API port; default: chosen per job on the head node.")
    api_key: StrictBool = Field(
        default=True, description="Require an API key (generated per job); --no-api-key turns it off.")
    ready_timeout: float = Field(
        default=3600.0, description="Seconds the head waits for vLLM to load and answer before giving up."
    )
    router_policy: RouterPolicy | None = Field(
        default=None, description="vllm-router's load-balancing policy with replicas; default: the router's own.")
    min_ready_replicas: int | None = Field(
        default=None, description="Replicas that must answer before the job is READY; default: all.")
    replica_restarts: int = Field(
        default=2, description="Restarts in place of a replica whose vLLM exits, before it is given up.")


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
