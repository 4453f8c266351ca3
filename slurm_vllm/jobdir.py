"""The job directory: one folder per job on the shared filesystem, and its files.

The login side creates it (mode 0700) and writes ``spec.json`` and the secrets; the head node
writes ``state.json``, ``head.json`` and ``endpoint.json``; every node writes its log under
``logs/``. Writers replace files atomically (temporary name in the same folder, then rename) so a
reader on another node never sees half a file; readers treat a missing file as "not yet".
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Phases written by the head into ``state.json`` (PENDING comes from Slurm, never from here).
STARTING_RAY = "STARTING_RAY"
LOADING_MODEL = "LOADING_MODEL"
READY = "READY"
ENDED = "ENDED"
FAILED = "FAILED"
PHASES = (STARTING_RAY, LOADING_MODEL, READY, ENDED, FAILED)
FINAL_PHASES = (ENDED, FAILED)

#: Marker in ``sbatch --comment`` that tags jobs of this tool for ``list``.
JOB_COMMENT = "slurm_vllm"


def default_jobs_root() -> Path:
    """Where job directories go unless the spec says otherwise (``$SLURM_VLLM_HOME/jobs``)."""
    home = os.environ.get("SLURM_VLLM_HOME")
    return (Path(home) if home else Path.home() / ".slurm_vllm") / "jobs"


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a mix."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode)


def read_json(path: Path) -> dict[str, Any] | None:
    """Read a JSON file written by :func:`write_json`; ``None`` while it does not exist."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        return None
    return obj if isinstance(obj, dict) else None


@dataclass(frozen=True)
class JobDir:
    """Paths inside one job directory; constructing one touches nothing on disk."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser().absolute())

    # what the login side writes
    @property
    def spec(self) -> Path:
        return self.path / "spec.json"

    @property
    def script(self) -> Path:
        return self.path / "job.sbatch"

    @property
    def api_key(self) -> Path:
        return self.path / "api_key"

    @property
    def ray_token(self) -> Path:
        return self.path / "ray_token"

    @property
    def job_id_file(self) -> Path:
        """Holds the Slurm job id; written by ``submit`` and again by the job when it starts."""
        return self.path / "job_id"

    # what the job writes
    @property
    def state(self) -> Path:
        return self.path / "state.json"

    @property
    def head(self) -> Path:
        """Where the head publishes its address and Ray port for the other nodes."""
        return self.path / "head.json"

    @property
    def endpoint(self) -> Path:
        return self.path / "endpoint.json"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def node_log(self, rank: int) -> Path:
        return self.logs / f"node-{rank}.log"

    @property
    def vllm_log(self) -> Path:
        return self.logs / "vllm.log"

    def create(self) -> "JobDir":
        """Create the directory tree, private to the user (0700), refusing to reuse a used one."""
        if self.spec.exists():
            raise FileExistsError(f"job directory {self.path} is already in use; choose another --job-dir")
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        self.logs.mkdir(exist_ok=True, mode=0o700)
        return self

    def write_secret(self, path: Path, value: str | None = None) -> str:
        """Write a secret readable by the user only (0600); generate one when ``value`` is None."""
        value = value or secrets.token_urlsafe(32)
        atomic_write(path, value + "\n", mode=0o600)
        return value

    def read_secret(self, path: Path) -> str | None:
        try:
            return path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def read_state(self) -> dict[str, Any] | None:
        return read_json(self.state)

    def read_endpoint(self) -> dict[str, Any] | None:
        return read_json(self.endpoint)

    def read_job_id(self) -> str | None:
        try:
            return self.job_id_file.read_text().strip() or None
        except FileNotFoundError:
            return None


def write_state(jobdir: JobDir, phase: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``state.json`` with a new phase and timestamp, atomically.

    Only the head writes this file, so read-modify-write needs no lock.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    state = jobdir.read_state() or {}
    now = time.time()
    state.setdefault("started_at", now)
    if state.get("phase") != phase:
        state.setdefault("phase_times", {})[phase] = now
    state.update(fields)
    state["phase"] = phase
    state["updated_at"] = now
    write_json(jobdir.state, state)
    return state
