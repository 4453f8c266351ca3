"""slurm_vllm: serve an LLM with vLLM across the nodes of a Slurm allocation.

Public API only; heavy libraries (ray, vllm, submitit, openai) are imported where used.
"""

from __future__ import annotations

from slurm_vllm.errors import (
    JobFailedError,
    SlurmCommandError,
    SlurmVllmError,
    SpecError,
    WaitTimeoutError,
)
from slurm_vllm.spec import ServeSpec

__version__ = "0.1.0"

__all__ = [
    "JobFailedError",
    "ServeSpec",
    "SlurmCommandError",
    "SlurmVllmError",
    "SpecError",
    "WaitTimeoutError",
    "__version__",
]
