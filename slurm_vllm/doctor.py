"""``slurm-vllm doctor``: what the login side can check before a job waits in the queue for nothing.

One :class:`Check` per question, each ``ok``, ``warn``, ``fail`` (with the fix) or ``skip``
(cannot be answered from here): Slurm answers; the partition exists and is up; its nodes' GPUs,
CPUs and memory, and whether the request fits one node; the account and QOS when Slurm can say;
the nodes' Python (:mod:`slurm_vllm.node_env`); the model path; the job-directory root. Nothing is
created or submitted. Slurm is asked through the one runner (:mod:`slurm_vllm.cluster`), once for
``sinfo`` and once for ``sacctmgr``.
"""

from __future__ import annotations

import getpass
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slurm_vllm import cluster, node_env
from slurm_vllm.errors import SlurmCommandError, SpecError, SpecErrors
from slurm_vllm.jobdir import default_jobs_root
from slurm_vllm.spec import ServeSpec, check_paths_exist

STATUSES = ("ok", "warn", "fail", "skip")
#: Stands in for MODEL when none is given: the cluster can be checked without one.
NO_MODEL = "doctor/no-model-given"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's answer."""

    check: str
    status: str  #: ok, warn, fail or skip
    detail: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        text = f"{self.status:<4}  {self.check:<11}  {self.detail}"
        return f"{text}; fix: {self.fix}" if self.fix else text


def format_checks(checks: list[Check]) -> str:
    """The answer as text, one line per check."""
    return "\n".join(c.line() for c in checks)


def failed(checks: list[Check]) -> bool:
    return any(c.status == "fail" for c in checks)


# --------------------------------------------------------------------------------------------
# Slurm: reachable, the partition, its nodes, the fit
# --------------------------------------------------------------------------------------------


def check_slurm() -> tuple[Check, list[cluster.NodeGroup] | None]:
    try:
        groups = cluster.node_groups()
    except SlurmCommandError as exc:
        return Check("slurm", "fail", f"sinfo: {_one_line(exc.stderr) or exc}",
                     "run this on a login node of the cluster, where `sinfo` answers"), None
    names = sorted({g.partition + ("*" if g.default else "") for g in groups})
    return Check("slurm", "ok", f"sinfo answered: {len(names)} partition(s) ({', '.join(names)})"), groups


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _shape(gpus: int, cpus: int | None, mem: int | None) -> str:
    return f"{gpus} GPU, {'?' if cpus is None else cpus} CPU, {'?' if mem is None else f'{mem / 1024:.0f}G'}"


def _shapes(groups: list[cluster.NodeGroup]) -> str:
    """``4 x (8 GPU, 64 CPU, 500G), 2 x (...)``: the node shapes, the most common first."""
    shapes: dict[tuple[int, int | None, int | None], int] = {}
    for g in groups:
        key = (g.gpus, g.cpus, g.memory_mb)
        shapes[key] = shapes.get(key, 0) + g.count
    return ", ".join(f"{count} x ({_shape(*key)})" for key, count in sorted(shapes.items(), key=lambda kv: -kv[1]))


def check_partition(spec: ServeSpec, groups: list[cluster.NodeGroup]) -> list[Check]:
    """The partition the job would go to, its nodes, and whether the request fits them."""
    r = spec.resources
    names = sorted({g.partition for g in groups})
    name = r.partition
    if name is None:
        default = next((g.partition for g in groups if g.default), None)
        if default is None:
            return [Check("partition", "fail", "none given, and the cluster has no default partition",
                          f"give --partition, one of: {', '.join(names) or '(none listed)'}")]
        name = default
    mine = [g for g in groups if g.partition == name]
    if not mine:
        return [Check("partition", "fail", f"{name!r} is not a partition of this cluster",
                      f"use --partition with one of: {', '.join(names) or '(none listed)'}")]
    how = "the default partition" if r.partition is None else "partition"
    avail = mine[0].available
    out = [Check("partition", "ok", f"{how} {name!r} is {avail}, {sum(g.count for g in mine)} node(s)")
           if avail == "up" else
           Check("partition", "warn", f"{how} {name!r} is {avail}: jobs wait until it is up again",
                 "ask the site's admins, or choose another partition")]
    out.append(Check("nodes", "ok", f"{name}: {_shapes(mine)}"))
    out.append(_fit(spec, name, mine))
    return out


def _fit(spec: ServeSpec, name: str, groups: list[cluster.NodeGroup]) -> Check:
    r = spec.resources
    mem = cluster.memory_mb(r.mem) if r.mem else None
    asked = [f"{r.gpus_per_node} GPU"]
    if r.cpus_per_task is not None:
        asked.append(f"{r.cpus_per_task} CPU")
    if r.mem:
        asked.append(f"{r.mem} memory")
    want = f"{r.nodes} node(s) with {', '.join(asked)} each"

    def fits(g: cluster.NodeGroup) -> bool:
        return (g.gpus >= r.gpus_per_node and (r.cpus_per_task is None or g.cpus is None or g.cpus >= r.cpus_per_task)
                and (mem is None or g.memory_mb is None or g.memory_mb >= mem))

    fitting = [g for g in groups if fits(g)]
    total = sum(g.count for g in fitting)
    usable = sum(g.count for g in fitting if g.usable)
    note = " (node features of --constraint not checked)" if r.constraint else ""
    if total == 0:
        biggest = max(groups, key=lambda g: (g.gpus, g.cpus or 0, g.memory_mb or 0))
        return Check("fit", "fail", f"asked {want}; no node of {name!r} has that (the largest: "
                     f"{_shape(biggest.gpus, biggest.cpus, biggest.memory_mb)})"
                     f"{note}", "ask for less per node (more nodes, a smaller TP), or choose another partition")
    if total < r.nodes:
        return Check("fit", "fail", f"asked {want}; only {total} node(s) of {name!r} have that{note}",
                     f"ask for at most {total} node(s), or choose another partition")
    if usable < r.nodes:
        return Check("fit", "warn", f"asked {want}; {total} node(s) fit, but only {usable} take jobs now "
                     f"(the others are down or drained){note}", "the job waits until enough are back")
    return Check("fit", "ok", f"asked {want}; {total} node(s) of {name!r} fit ({usable} take jobs now){note}")


# --------------------------------------------------------------------------------------------
# Accounting: account and QOS
# --------------------------------------------------------------------------------------------


def check_accounting(spec: ServeSpec, user: str | None = None) -> list[Check]:
    """The account and QOS against this user's associations, when Slurm's accounting says."""
    r = spec.resources
    user = user or getpass.getuser()
    try:
        assocs = cluster.associations(user)
    except SlurmCommandError as exc:
        why = "sacctmgr is not installed here" if exc.returncode == 127 else f"sacctmgr: {_one_line(exc.stderr)}"
        status = "skip" if exc.returncode == 127 else "warn"
        return [Check("account", status, f"{why}; Slurm cannot say which accounts and QOS you may use",
                      None if status == "skip" else "sbatch will say at submission if they are refused")]
    if not assocs:
        return [Check("account", "skip", f"Slurm lists no associations for {user} (accounting not enforced?)")]
    accounts = sorted({a.account for a in assocs})
    partition = r.partition
    usable = [a for a in assocs if not a.partition or partition is None or a.partition == partition]
    out = []
    if r.account is None:
        out.append(Check("account", "ok", f"none given: Slurm uses your default (yours: {', '.join(accounts)})"))
    elif r.account not in accounts:
        out.append(Check("account", "fail", f"{r.account!r} is not one of your accounts",
                         f"use --account with one of: {', '.join(accounts)}"))
        return out
    elif not any(a.account == r.account for a in usable):
        out.append(Check("account", "fail", f"{r.account!r} may not use partition {partition!r}",
                         "choose another partition or account"))
        return out
    else:
        out.append(Check("account", "ok", f"{r.account!r} is yours"))
    if r.qos is None:
        return out
    pool = [a for a in usable if r.account is None or a.account == r.account]
    allowed = sorted({q for a in pool for q in a.qos})
    if not allowed:
        out.append(Check("qos", "skip", "Slurm lists no QOS for your associations"))
    elif r.qos not in allowed:
        out.append(Check("qos", "fail", f"{r.qos!r} is not allowed for your association(s)",
                         f"use --qos with one of: {', '.join(allowed)}"))
    else:
        out.append(Check("qos", "ok", f"{r.qos!r} is allowed"))
    return out


# --------------------------------------------------------------------------------------------
# Files: the nodes' Python, the model, the job-directory root
# --------------------------------------------------------------------------------------------


def check_environment(spec: ServeSpec) -> list[Check]:
    """The nodes' Python, as ``render``/``submit`` check it, plus the venv and image paths."""
    out = [Check("environment", "fail", f"{e.field}={e.value!r} {e.problem}", e.fix)
           for e in check_paths_exist(spec) if e.field in ("venv", "container")]
    if out:
        return out
    env = node_env.inspect(spec)
    out = [Check("environment", "fail" if f.level == "error" else "warn", f"{f.field}={f.value!r} {f.problem}",
                 f.fix) for f in env.findings]
    return out or [Check("environment", "ok", f"nodes run {env.summary()}")]


def check_model(spec: ServeSpec, model_given: bool) -> Check:
    if not model_given:
        return Check("model", "skip", "no MODEL given")
    if not spec.is_local_model:
        return Check("model", "skip", f"{spec.model.name!r} is a hub id: the nodes download it or read their "
                     "cache (HF_HOME); a gated model needs HF_TOKEN")
    problems = [e for e in check_paths_exist(spec) if e.field == "model"]
    if problems:
        return Check("model", "fail", f"{spec.model.name!r} {problems[0].problem}", problems[0].fix)
    config = Path(spec.model.name, "config.json")
    if not os.access(config, os.R_OK):
        return Check("model", "fail", f"{config} is not readable", "make the model directory readable to you")
    local = node_env.node_local_prefix(spec.model.name)
    if local in node_env.NODE_LOCAL_PREFIXES:
        return Check("model", "warn", f"{spec.model.name} is under {local}, which compute nodes do not share",
                     "put the model on the shared filesystem")
    return Check("model", "ok", f"{spec.model.name} holds a readable config.json")


def check_job_dir(spec: ServeSpec, root: Path | None = None) -> Check:
    """The directory job directories go to: writable, private (0700), on a shared filesystem."""
    path = Path(spec.job_dir) if spec.job_dir else (root or default_jobs_root())
    what = "job_dir" if spec.job_dir else "jobs root"
    local = node_env.node_local_prefix(str(path))
    if local in node_env.NODE_LOCAL_PREFIXES:
        return Check("job_dir", "warn", f"{what} {path} is under {local}, which compute nodes do not share",
                     "choose a directory on the shared filesystem (--job-dir, or $SLURM_VLLM_HOME)")
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK | os.X_OK):
            return Check("job_dir", "fail", f"{what} {path} cannot be created: {parent} is not writable",
                         "choose a writable place (--job-dir, or $SLURM_VLLM_HOME)")
        return Check("job_dir", "ok", f"{what} {path} will be created (mode 0700)")
    if not path.is_dir():
        return Check("job_dir", "fail", f"{what} {path} is not a directory", "remove it or choose another place")
    if not os.access(path, os.W_OK | os.X_OK):
        return Check("job_dir", "fail", f"{what} {path} is not writable",
                     "choose a writable place (--job-dir, or $SLURM_VLLM_HOME)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check("job_dir", "warn", f"{what} {path} has mode {mode:04o}: other users can list it (the "
                     "secrets inside are 0600 all the same)", f"chmod 700 {path}")
    return Check("job_dir", "ok", f"{what} {path} is writable, mode 0700")


# --------------------------------------------------------------------------------------------
# All of it
# --------------------------------------------------------------------------------------------


def spec_for_doctor(build: Callable[[Mapping[str, Any]], ServeSpec], given: Mapping[str, Any]) -> tuple[
        ServeSpec | None, bool, list[Check]]:
    """The spec the checks are about, built by ``build`` from ``given`` (parsed flags) without
    checking local paths (those are checks of their own). Without a MODEL the cluster is still
    checked. Returns (spec or None, whether a model was given, the spec's own failures)."""
    try:
        return build(given), True, []
    except (SpecErrors, SpecError) as exc:
        errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
        if not all(e.field == "model" and e.problem == "is missing" for e in errors):
            return None, True, [Check("spec", "fail", f"{e.field}={e.value!r} {e.problem}", e.fix) for e in errors]
    return build({**given, "model": NO_MODEL}), False, []


def run_checks(spec: ServeSpec | None, model_given: bool = True, spec_checks: list[Check] | None = None,
               user: str | None = None) -> list[Check]:
    """Every check, in the order a user reads them; Slurm is asked once per command."""
    checks = list(spec_checks or [])
    slurm_check, groups = check_slurm()
    checks.append(slurm_check)
    if spec is None:
        return checks
    if groups is not None:
        checks += check_partition(spec, groups)
        checks += check_accounting(spec, user)
    checks += check_environment(spec)
    checks.append(check_model(spec, model_given))
    checks.append(check_job_dir(spec))
    return checks
