"""Every rule of the spec that can be checked on the login node, each failure naming the field,
the value and the fix."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slurm_vllm import shell
from slurm_vllm.errors import SpecError, SpecErrors
from slurm_vllm.sbatch_options import check_sbatch_args
from slurm_vllm.spec.fields import SECTIONS
from slurm_vllm.vllm_args import check_extra_args

if TYPE_CHECKING:
    from slurm_vllm.spec.model import ServeSpec


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

    errors.extend(_replica_problems(spec))
    if errors:
        return errors

    tp, pp = _effective(spec)
    # Each replica has nodes / replicas nodes: TP x PP must fill one replica, not the allocation.
    per, what = (spec.nodes_per_replica, "nodes per replica") if spec.replicas > 1 else (r.nodes, "nodes")
    gpus = per * r.gpus_per_node
    if r.gpus_per_node > 0:
        if tp * pp > gpus:
            add(SpecError(
                "tensor_parallel_size", tp,
                f"TP x PP = {tp} x {pp} = {tp * pp} needs more GPUs than {what} x gpus_per_node = "
                f"{per} x {r.gpus_per_node} = {gpus}; lower TP/PP or ask for more nodes/GPUs",
                problem="does not fit the allocation"))
        elif tp * pp < gpus and not p.allow_partial:
            add(SpecError(
                "tensor_parallel_size", tp,
                f"TP x PP = {tp} x {pp} = {tp * pp} leaves GPUs idle ({what} x gpus_per_node = {gpus}); "
                f"set TP x PP = {gpus} (e.g. tensor_parallel_size={r.gpus_per_node}, "
                f"pipeline_parallel_size={per}) or set allow_partial: true",
                problem="does not use the allocation"))
        if spec.executor == "mp" and tp > r.gpus_per_node:
            other = ("replicas of several nodes run vLLM's mp backend, which" if spec.replicas > 1 else
                     "with backend 'mp' this tool")
            add(SpecError(
                "tensor_parallel_size", tp,
                f"{other} keeps each tensor-parallel group inside one node: set "
                f"tensor_parallel_size <= gpus_per_node ({r.gpus_per_node}) and use "
                f"pipeline_parallel_size across nodes"
                + ("" if spec.replicas > 1 else ", or use backend 'ray', which places TP workers across nodes"),
                problem="is larger than gpus_per_node"))
    if spec.executor == "mp" and (tp * pp) % per != 0:
        add(SpecError(
            "pipeline_parallel_size", pp,
            f"vLLM's mp backend starts TP x PP / nodes workers on every node, so TP x PP = {tp * pp} "
            f"must be a multiple of {what} = {per}", problem="does not divide over the nodes"))

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
    if e.python is not None and not e.python.strip():
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

    if e.cache_dir is not None and not e.cache_dir.strip():
        add(SpecError("cache_dir", e.cache_dir, "give a folder, none (no caches), or leave it unset for the "
                                                "default", problem="is empty"))
    elif e.container and e.cache_dir is not None and any(c in e.cache_dir for c in ":,"):
        add(SpecError("cache_dir", e.cache_dir, "choose a path without ':' or ',' (the cache folder is bound "
                                                "into the container with --bind, which splits on them)",
                      problem="cannot be bound"))

    if spec.model.stage_weights != "none" and not spec.is_local_model:
        add(SpecError("stage_weights", spec.model.stage_weights,
                      "staging copies a local model directory: download the model to the shared filesystem "
                      "first (e.g. huggingface-cli download ORG/NAME --local-dir ~/models/NAME) and give that "
                      "path as model, or set stage_weights: none",
                      problem="needs a local model path, not a hub id"))

    if e.container and spec.is_local_model and any(c in spec.model.name for c in ":,"):
        add(SpecError("model", spec.model.name,
                      "choose a model path without ':' or ',' (a local model is bound into the container "
                      "with --bind, which splits on them)", problem="cannot be bound"))

    # Extra vLLM args that fight the tool.
    errors.extend(check_extra_args(spec))

    if check_paths:
        errors.extend(check_paths_exist(spec))
    return errors


def _replica_problems(spec: ServeSpec) -> list[SpecError]:
    """Replicas split the nodes evenly; the replica settings stay in range."""
    r, s, k = spec.resources, spec.serve, spec.parallel.replicas
    if k < 1:
        return [SpecError("replicas", k, "use 1 (one copy, no router) or more", problem="is below 1")]
    out = []
    if r.nodes % k:
        out.append(SpecError("replicas", k, f"nodes ({r.nodes}) must be a multiple of replicas: each replica gets "
                                            f"nodes / replicas nodes; e.g. nodes={k * max(r.nodes // k, 1)}",
                             problem="does not divide the nodes"))
    if s.min_ready_replicas is not None and not 1 <= s.min_ready_replicas <= k:
        out.append(SpecError("min_ready_replicas", s.min_ready_replicas, f"use 1 to replicas ({k}), or leave it "
                                                                         "unset for all", problem="is out of range"))
    if not 0 <= s.replica_restarts <= 100:
        out.append(SpecError("replica_restarts", s.replica_restarts, "use 0 (never restart) to 100",
                             problem="is out of range"))
    return out


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
