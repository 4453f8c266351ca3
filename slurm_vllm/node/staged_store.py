"""Where staged copies live on a node, and who uses them: the target folder of each
``stage_weights`` choice, the space check, the user's private folders, the per-user lock and the
registry of node programs using a copy (node/staging.py does the copying)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from slurm_vllm.errors import NodeError
from slurm_vllm.node.warm import NETWORK_FS, mount_type

SHM = "/dev/shm"
TMP = "/tmp"
#: The variables naming node-local scratch, in the order they are tried for ``local``.
LOCAL_VARS = ("SLURM_TMPDIR", "TMPDIR")
#: Bytes kept free beyond the model: this fraction of it, at least MIN_MARGIN.
MARGIN_FRACTION = 0.02
MIN_MARGIN = 256 * 2**20
#: Overrides the margin (bytes, or with a K/M/G/T suffix): e.g. to keep room in /dev/shm for NCCL.
ENV_RESERVE = "SLURM_VLLM_STAGE_RESERVE"

StatVfs = Callable[[str], Any]


class StagingError(NodeError):
    """Staging failed on a node; the message names the node, the place, the cause and the fix."""


def gib(n: float) -> str:
    """A size as people read it on a node: GiB with one decimal, MiB below 1 GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------------------------
# Where it goes, and whether it fits
# --------------------------------------------------------------------------------------------


def target_dir(mode: str, env: Mapping[str, str], mounts_text: str) -> tuple[Path, str]:
    """The storage ``mode`` names on this node, and how it was chosen (for the log)."""
    if mode == "shm":
        if not os.path.isdir(SHM):
            raise StagingError(f"{SHM} does not exist on this node: use stage_weights: local or none")
        return Path(SHM), "shm"
    for var in LOCAL_VARS:
        value = env.get(var)
        if value and os.path.isdir(value):
            fstype = mount_type(os.path.realpath(value), mounts_text)
            if fstype not in NETWORK_FS:
                return Path(value), f"${var}"
    fstype = mount_type(os.path.realpath(TMP), mounts_text)
    if fstype in NETWORK_FS:
        raise StagingError(f"no node-local disk: {TMP} is on {fstype} and neither of {', '.join(LOCAL_VARS)} "
                           "names a local one: use stage_weights: shm or none")
    return Path(TMP), TMP


def margin(total: int, env: Mapping[str, str]) -> int:
    """Bytes to leave free beside the copy: ``$SLURM_VLLM_STAGE_RESERVE``, else 2 %, at least 256 MiB."""
    given = (env.get(ENV_RESERVE) or "").strip()
    m = re.fullmatch(r"(\d+)([KMGTkmgt]?)i?[Bb]?", given)
    if m:
        return int(m.group(1)) * int(1024 ** " KMGT".index(m.group(2).upper() or " "))
    return max(MIN_MARGIN, int(total * MARGIN_FRACTION))


def check_space(target: Path, total: int, reserve: int, host: str, mode: str, statvfs: StatVfs = os.statvfs) -> None:
    """Refuse, with the numbers and the other choices, when the copy would not fit."""
    st = statvfs(str(target))
    free = st.f_bavail * st.f_frsize
    if free < total + reserve:
        other = "local" if mode == "shm" else "shm"
        raise StagingError(f"{host}: {target} has {gib(free)} free, the model needs {gib(total + reserve)} "
                           f"({gib(total)} and {gib(reserve)} kept free): use stage_weights: {other} or none")


def private_dir(path: Path, uid: int) -> Path:
    """``path`` as a folder of this user alone (0700), created if missing.

    On a shared ``/tmp`` another user could have made the name first (a link, their folder):
    weights copied there could be read or replaced, so that is refused, never used.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        raise StagingError(f"{path} is not a folder of this user (a link, or owned by uid {st.st_uid}): "
                           "remove it, or use another stage_weights")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


# --------------------------------------------------------------------------------------------
# Who uses a copy (per-user lock, one entry per node program)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(models: Path) -> Iterator[None]:
    """The user's staging lock on this node: registering, renaming and removing hold it."""
    fd = os.open(models / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def me(host: str) -> str:
    """This node program's entry name: ``pid@host``."""
    return f"{os.getpid()}@{host}"


def _dead(owner: str, host: str) -> bool:
    """Whether ``pid@host`` names a process of this host that is gone (other hosts: unknown)."""
    pid, _, on = owner.partition("@")
    if on != host or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def users_dir(models: Path, name: str) -> Path:
    """The registry of node programs using copy ``name``."""
    return models / ".users" / name


def live_users(models: Path, name: str, host: str) -> list[str]:
    """The entries of node programs still using copy ``name``; dead ones of this host removed."""
    folder = users_dir(models, name)
    live = []
    for entry in sorted(folder.glob("*@*")) if folder.is_dir() else []:
        if _dead(entry.name, host):
            entry.unlink(missing_ok=True)
        else:
            live.append(entry.name)
    return live


def register(models: Path, name: str, host: str, job_id: str, keep: bool) -> None:
    """Record that this node program uses copy ``name`` (and that it is to be kept). Under the lock."""
    folder = users_dir(models, name)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    (folder / me(host)).write_text(job_id + "\n")
    if keep:
        (folder / "keep").write_text(job_id + "\n")


def temp_path(models: Path, kind: str, name: str, host: str) -> Path:
    """A hidden sibling (a copy being made or removed) named after its owner, so sweep can find it."""
    return models / f".{kind}-{name}-{secrets.token_hex(3)}~{me(host)}"


def sweep(models: Path, host: str) -> list[Path]:
    """Remove what dead node programs of this host left: half copies, copies being removed, and
    copies whose every user died (Slurm's SIGKILL skips the teardown) unless one is to be kept.
    Called under the lock."""
    removed = []
    for entry in models.glob(".*~*@*"):
        if _dead(entry.name.rpartition("~")[2], host):
            removed.append(entry)
    for entry in models.iterdir():
        users = users_dir(models, entry.name)
        if (not entry.name.startswith(".") and entry.is_dir() and users.is_dir()
                and not (users / "keep").exists() and not live_users(models, entry.name, host)):
            removed += [entry, users]
    for entry in removed:
        shutil.rmtree(entry, ignore_errors=True)
    return removed
