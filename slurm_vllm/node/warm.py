"""Starting faster the second time, decided on each node (it knows the installed vLLM):

- **compile caches**: vLLM's, torch inductor's and Triton's caches go into the user's cache
  directory on the shared filesystem (``cache_dir``), in a folder per vLLM version
  (``vllm-<version>/``), so the next job of the same model skips what this one compiled and
  different vLLM versions never share an entry. Two jobs may fill it at once: the caches write
  their entries atomically themselves, and the folders are created with ``exist_ok``;
- **weights on a network filesystem**: when the model is a local path on NFS, Lustre, GPFS,
  BeeGFS or CephFS (the mount's type, read from ``/proc/mounts``) and the user chose no
  ``--safetensors-load-strategy``, vLLM reads the checkpoint into the page cache first
  (``prefetch``) instead of in small random reads, where the installed vLLM has that strategy.

Everything here is a pure function of its inputs (mount table, environment, vLLM install)
except :func:`prepare_caches`, which creates folders.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from slurm_vllm.jobdir import cache_root, mkdir_private
from slurm_vllm.vllm_args import LOAD_STRATEGY_FLAG, VllmInstall, installed_vllm, user_sets, vllm_executable

#: The variables that place the caches, and the folder each gets under ``vllm-<version>/``.
CACHE_VARS = {"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}

#: Mount types of network and parallel filesystems (where random reads of a checkpoint are slow).
NETWORK_FS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "fuse.ceph", "fuse.ceph-fuse", "fuse.cephfs",
    "glusterfs", "fuse.glusterfs", "wekafs", "panfs", "cifs", "smb3",
})

MOUNTS = "/proc/mounts"


# --------------------------------------------------------------------------------------------
# Compile caches
# --------------------------------------------------------------------------------------------


def cache_key(version: str) -> str:
    """The per-version folder name: ``vllm-0.11.0`` (characters a path should not hold become _)."""
    return "vllm-" + re.sub(r"[^A-Za-z0-9._+-]", "_", version.strip())


def cache_env(root: Path | None, version: str | None, env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The cache variables to set, and those left as the environment has them.

    A value already set (by the spec's ``env``, a setup line, a module, the submitting shell)
    is the user's choice and stays. Without a cache directory or a known vLLM version nothing is
    set: an unknown version could share entries with another one.
    """
    if root is None or not version:
        return {}, []
    base = root / cache_key(version)
    kept = [name for name in CACHE_VARS if env.get(name)]
    return {name: str(base / sub) for name, sub in CACHE_VARS.items() if name not in kept}, kept


def prepare_caches(cache_dir: str | None, install: VllmInstall, env: Mapping[str, str],
                   log: Callable[[str], None]) -> dict[str, str]:
    """Create this vLLM version's cache folders and return the variables to set (logged)."""
    root = cache_root(cache_dir)
    if root is None:
        return {}
    if not install.version:
        log("compile caches: the vLLM version is unknown here, so the caches stay vLLM's defaults")
        return {}
    add, kept = cache_env(root, install.version, env)
    try:
        for value in add.values():
            mkdir_private(Path(value))
    except OSError as exc:
        log(f"compile caches: cannot create {root / cache_key(install.version)} ({exc.strerror or exc}); "
            "the caches stay vLLM's defaults")
        return {}
    if add:
        log(f"compile caches in {root / cache_key(install.version)}"
            + (f" ({', '.join(kept)} kept as the environment sets it)" if kept else ""))
    return add


def cache_vars(cache_dir: str | None, env: Mapping[str, str], log: Callable[[str], None]) -> dict[str, str]:
    """What the node program adds to its environment (so Ray's workers and vLLM inherit it)."""
    if cache_root(cache_dir) is None:
        return {}
    return prepare_caches(cache_dir, installed_vllm(tuple(vllm_executable(env))), env, log)


# --------------------------------------------------------------------------------------------
# Filesystem type of the model
# --------------------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    """A /proc/mounts field: spaces, tabs, newlines and backslashes are octal escapes there."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_type(path: str, mounts_text: str) -> str | None:
    """The filesystem type of the mount that holds ``path``: the longest matching mount point."""
    best: tuple[int, str] | None = None
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape(fields[1]).rstrip("/") or "/", fields[2]
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):  # a later mount over the same point wins
            best = (len(point), fstype)
    return best[1] if best else None


def read_mounts(path: str = MOUNTS) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def load_strategy(model: str, user_args: Sequence[str], install: VllmInstall,
                  mounts_text: str) -> tuple[str | None, str]:
    """``prefetch`` for a local model on a network filesystem, else None; and why, for the log.

    Nothing is added when the user chose a strategy, when the model is a hub id (vLLM reads it
    from its download cache), or when the installed vLLM lacks the ``prefetch`` strategy.
    """
    if user_sets(user_args, LOAD_STRATEGY_FLAG):
        return None, ""
    if not model.startswith("/"):
        return None, ""
    fstype = mount_type(os.path.realpath(model), mounts_text)
    if fstype not in NETWORK_FS:
        return None, ""
    if not install.has_prefetch_load:
        return None, (f"the model lies on {fstype}, but this vLLM ({install.version or 'version unknown'}) has no "
                      f"{LOAD_STRATEGY_FLAG} prefetch: weights are read as vLLM reads them by default")
    return "prefetch", (f"the model lies on {fstype}: passing {LOAD_STRATEGY_FLAG} prefetch (reads the "
                        "checkpoint into the page cache first); set the option yourself to choose otherwise")


def load_strategy_for(model: str, user_args: Sequence[str], env: Mapping[str, str],
                      log: Callable[[str], None]) -> str | None:
    """:func:`load_strategy` on this node (its mount table, its vLLM), said in the node log."""
    strategy, why = load_strategy(model, user_args, installed_vllm(tuple(vllm_executable(env))), read_mounts())
    if why:
        log(why)
    return strategy
