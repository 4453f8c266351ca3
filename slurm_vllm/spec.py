"""ServeSpec: what the user asks for, validated once, with the same field names everywhere.

SKELETON — the spec issue fills in loading (YAML/TOML/profile layering), flat keyword names,
and the validation rules. The section and field names below are the contract that the
renderer and the node program read; extend, do not rename.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """The model to serve and the vLLM arguments passed through verbatim."""

    name: str = Field(description="Hub id or local path of the model (vllm serve MODEL).")
    served_name: str | None = None
    extra_args: list[str] = Field(default_factory=list)


class ResourcesSection(_Section):
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    job_name: str = "vllm"
    sbatch_args: list[str] = Field(default_factory=list)


class ParallelSection(_Section):
    tensor_parallel_size: int | None = None  # None: GPUs per node
    pipeline_parallel_size: int | None = None  # None: number of nodes


class RaySection(_Section):
    join_timeout: float = 300.0  # a worker gives up joining after this many seconds
    cluster_timeout: float = 600.0  # the head gives up waiting for all nodes after this


class NetworkSection(_Section):
    interface: str | None = None
    cidr: str | None = None


class EnvironmentSection(_Section):
    setup: list[str] = Field(default_factory=list)
    venv: str | None = None
    container: str | None = None
    container_binds: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    python: str = "python3"


class ServeSection(_Section):
    port: int | None = None  # vLLM API port; None: planned per job
    api_key: bool = True  # --no-api-key turns it off


class ServeSpec(_Section):
    model: ModelSection
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    backend: Literal["ray", "mp"] = "ray"
    ray: RaySection = Field(default_factory=RaySection)
    network: NetworkSection = Field(default_factory=NetworkSection)
    environment: EnvironmentSection = Field(default_factory=EnvironmentSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    job_dir: str | None = None
