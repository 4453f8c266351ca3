"""slurm_vllm: serve an LLM with vLLM across the nodes of a Slurm allocation.

Public API only; heavy libraries (ray, vllm, submitit, openai) are imported where used.

>>> import slurm_vllm
>>> job = slurm_vllm.submit(slurm_vllm.ServeSpec("org/model", nodes=2, gpus_per_node=8))  # doctest: +SKIP
>>> job.wait_ready()                                                                      # doctest: +SKIP
>>> client = job.openai_client()                                                          # doctest: +SKIP
"""

from __future__ import annotations

from slurm_vllm.api import attach, render, submit
from slurm_vllm.errors import (
    JobFailedError,
    JobNotFoundError,
    SlurmCommandError,
    SlurmVllmError,
    SpecError,
    SpecErrors,
    WaitTimeoutError,
)
from slurm_vllm.job import Endpoint, Job, JobBlockedError, JobStatus
from slurm_vllm.spec import ServeSpec

__version__ = "0.1.0"

__all__ = [
    "Endpoint",
    "Job",
    "JobBlockedError",
    "JobFailedError",
    "JobNotFoundError",
    "JobStatus",
    "ServeSpec",
    "SlurmCommandError",
    "SlurmVllmError",
    "SpecError",
    "SpecErrors",
    "WaitTimeoutError",
    "__version__",
    "attach",
    "render",
    "submit",
]
