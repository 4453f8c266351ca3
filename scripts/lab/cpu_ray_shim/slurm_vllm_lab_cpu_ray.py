"""LAB-ONLY shim: let vLLM's Ray executor place its workers on CPU raylets.

vLLM's Ray executor asks the current platform for the Ray resource that names one device
(``ray_device_key``: "GPU" on CUDA/ROCm). Its CPU platform declares none, so
``--distributed-executor-backend ray`` stops with "current platform cpu does not support ray".
On GPU nodes nothing here is needed, and nothing here is part of the slurm_vllm package: the
lab installs this module with a ``.pth`` file into its own venv only.

When ``SLURM_VLLM_LAB_CPU_RAY=1`` is set, every Python process of the venv (the API server,
the engine core, and the Ray actors that run vLLM's workers, which is why a vLLM plugin would
be too late) patches two things as soon as vLLM imports them:

* ``vllm.platforms.cpu.CpuPlatform.ray_device_key`` becomes the custom Ray resource that the
  lab gives each raylet (``SLURM_VLLM_LAB_CPU_RAY_RESOURCE``, default ``vllm_cpu``; the raylet
  gets it from ``RAY_OVERRIDE_RESOURCES='{"vllm_cpu": 1}'``), so placement groups ask for it.
* the Ray worker classes' ``get_node_and_physical_gpu_ids`` (``RayWorkerWrapper`` and
  ``RayWorkerProc``) return one device (id 0) instead of
  reading Ray's accelerator ids, which know nothing about a custom resource.

* vLLM's CPU communicator uses its shared-memory collectives (``/dev/shm``) for a TP/PP group
  only when all its ranks really share ``/dev/shm``; across nodes it falls back to
  torch.distributed (gloo). Stock vLLM assumes one machine and fails on the remote rank with
  "open shm in SHMManager failed". This one matters for the ``mp`` backend too.

Unset (or any other value), the module does nothing beyond reading one variable.
This reaches into vLLM internals (0.32.0): adapt it when the pinned vllm-cpu version changes.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

ENABLE_VAR = "SLURM_VLLM_LAB_CPU_RAY"
RESOURCE_VAR = "SLURM_VLLM_LAB_CPU_RAY_RESOURCE"
DEFAULT_RESOURCE = "vllm_cpu"


def _resource() -> str:
    return os.environ.get(RESOURCE_VAR) or DEFAULT_RESOURCE


def _patch_platform(module: Any) -> None:
    module.CpuPlatform.ray_device_key = _resource()


def _patch_worker_class(module: Any, class_name: str) -> None:
    wrapper = getattr(module, class_name, None)
    if wrapper is None:  # ray not importable in this process: nothing to place
        return

    def get_node_and_physical_gpu_ids(self: Any) -> tuple[str, list[int]]:
        import ray

        return ray.get_runtime_context().get_node_id(), [0]

    wrapper.get_node_and_physical_gpu_ids = get_node_and_physical_gpu_ids


def _patch_cpu_communicator(module: Any) -> None:
    """Use vLLM's CPU shared-memory collectives only when every rank of a group shares /dev/shm.

    vLLM's CPU communicator picks its /dev/shm fast path for TP/PP groups whenever the ranks
    agree on a group name, assuming one machine. Across nodes (the lab's nodes each have their
    own /dev/shm) the remote rank then fails with "open shm in SHMManager failed. errno: 2".
    Adding the host and /dev/shm identity to the name the ranks compare makes a group that spans
    nodes fall back to torch.distributed (gloo), as it does when names differ.
    """
    communicator = getattr(module, "CpuCommunicator", None)
    shm = getattr(module, "_CPUSHMDistributed", None)
    if communicator is None or shm is None:
        return

    def all_ranks_share_shm(self: Any) -> bool:
        import socket

        import torch

        try:
            st = os.stat("/dev/shm")
            where = f"{socket.gethostname()}:{st.st_dev}:{st.st_ino}"
        except OSError:
            where = socket.gethostname()
        local = f"{shm.make_group_name(self)}@{where}"
        names: list[str] = [""] * self.world_size
        torch.distributed.all_gather_object(names, local, group=self.device_group)
        return len(set(names)) == 1

    communicator._all_group_ranks_share_shm_group_name = all_ranks_share_shm


PATCHES: dict[str, Callable[[Any], None]] = {
    "vllm.platforms.cpu": _patch_platform,
    # the classic Ray executor's worker ...
    "vllm.v1.executor.ray_utils": lambda m: _patch_worker_class(m, "RayWorkerWrapper"),
    # ... and RayExecutorV2's (the default in 0.32: VLLM_USE_RAY_V2_EXECUTOR_BACKEND=1)
    "vllm.v1.executor.ray_executor_v2": lambda m: _patch_worker_class(m, "RayWorkerProc"),
    # both backends (ray and mp) across nodes that do not share /dev/shm
    "vllm.distributed.device_communicators.cpu_communicator": _patch_cpu_communicator,
}


class _PatchAfterImport:
    """A meta-path finder that runs a patch right after a named module executes."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        patch = PATCHES.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> bool:
    """Install the import hook when the lab asks for it; True when installed."""
    if os.environ.get(ENABLE_VAR) != "1":
        return False
    if any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        return True
    for name, patch in PATCHES.items():  # already imported (unlikely at start-up): patch now
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, _PatchAfterImport())
    return True


install()
