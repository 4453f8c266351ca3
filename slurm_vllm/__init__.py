"""slurm_vllm: serve an LLM with vLLM across the nodes of a Slurm allocation.

Public API only; heavy libraries (ray, vllm, submitit, openai) are imported where used.

>>> import slurm_vllm
>>> job = slurm_vllm.submit(slurm_vllm.ServeSpec("org/model", nodes=2, gpus_per_node=8))  # doctest: +SKIP
>>> job.wait_ready()                                                                      # doctest: +SKIP
>>> client = job.openai_client()                                                          # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slurm_vllm.api import attach, render, submit
    from slurm_vllm.errors import (
        EndpointNotReadyError,
        JobBlockedError,
        JobEndedError,
        JobFailedError,
        JobNotFoundError,
        SlurmCommandError,
        SlurmVllmError,
        SpecError,
        SpecErrors,
        WaitTimeoutError,
    )
    from slurm_vllm.job import Endpoint, Job, JobStatus
    from slurm_vllm.spec import ServeSpec, load_spec

__version__ = "0.1.0"

#: The public API (tests/unit/test_packaging.py checks that it and _EXPORTS agree).
__all__ = [
    "Endpoint",
    "EndpointNotReadyError",
    "Job",
    "JobBlockedError",
    "JobEndedError",
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
    "load_spec",
    "render",
    "submit",
]

#: Public name -> the module that defines it. Imported on first use, so the compute-node entries
#: (``python -m slurm_vllm.node...``) do not load the spec model and pydantic when they need neither.
_EXPORTS = {
    **dict.fromkeys(("attach", "render", "submit"), "slurm_vllm.api"),
    **dict.fromkeys(("EndpointNotReadyError", "JobBlockedError", "JobEndedError", "JobFailedError", "JobNotFoundError",
                     "SlurmCommandError", "SlurmVllmError", "SpecError", "SpecErrors", "WaitTimeoutError"),
                    "slurm_vllm.errors"),
    **dict.fromkeys(("Endpoint", "Job", "JobStatus"), "slurm_vllm.job"),
    **dict.fromkeys(("ServeSpec", "load_spec"), "slurm_vllm.spec"),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'slurm_vllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
