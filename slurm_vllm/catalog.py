"""This user's jobs: finding one by id or directory, listing them, cleaning up ended ones.

Jobs are found without asking Slurm where possible: every job directory under the jobs root
names its job id. A job submitted by hand from a rendered script (whose directory may live
elsewhere) is found through the working directory Slurm records for it (``--chdir``). Listing
and cleaning up decide "live or ended" with the same status function as ``status``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from slurm_vllm import slurm
from slurm_vllm.errors import JobNotFoundError
from slurm_vllm.job import Job, JobStatus, status_of, statuses
from slurm_vllm.jobdir import JOB_COMMENT, JobDir, default_jobs_root


def _looks_like_jobdir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in (".slurm_vllm", "spec.json", "job.sbatch"))


def local_index(root: Path | None = None) -> dict[str, JobDir]:
    """Job id -> job directory for the directories under the jobs root (no Slurm call).

    Anything that is not a job directory (a stray file, a folder of the user's) is skipped.
    """
    root = root or default_jobs_root()
    out: dict[str, JobDir] = {}
    try:
        entries = list(root.iterdir())
    except OSError:
        return out
    for d in entries:
        if not d.is_dir():
            continue
        jd = JobDir(d)
        jid = jd.read_job_id()
        if jid:
            out[jid] = jd
    return out


def _jobdir_from_record(job_id: str, sjob: slurm.SlurmJob | None) -> JobDir:
    if sjob is None:
        raise JobNotFoundError(f"job {job_id}: Slurm has no record of it and no job directory names it")
    workdir = Path(sjob.workdir) if sjob.workdir else None
    if workdir is None or not _looks_like_jobdir(workdir):
        raise JobNotFoundError(
            f"job {job_id} is not a slurm_vllm job: its working directory {sjob.workdir or '(unknown)'} "
            "is not a job directory (no spec.json or job.sbatch)"
        )
    return JobDir(workdir)


def find(job: str | os.PathLike[str], poller: slurm.Poller | None = None) -> Job:
    """A handle for a job named by its Slurm id or its job directory."""
    text = os.fspath(job)
    path = Path(text).expanduser()
    if not text.isdigit() or path.is_dir():
        if not _looks_like_jobdir(path):
            raise JobNotFoundError(f"{text!r} is neither a Slurm job id nor a job directory (no spec.json)")
        jd = JobDir(path)
        jid = jd.read_job_id()
        if jid is None:
            raise JobNotFoundError(f"job directory {jd.path} has no job_id file: was it ever submitted?")
        return Job(jid, jd, poller=poller)
    return Job(text, find_jobdir(text, poller), poller=poller)


def find_jobdir(job_id: str, poller: slurm.Poller | None = None) -> JobDir:
    """The job directory of ``job_id``: the local index first, then Slurm's WorkDir for the job.

    Jobs submitted by hand from a rendered script are found the second way: the script sets
    ``--chdir`` to its job directory, which squeue/sacct report as the job's working directory.
    """
    local = local_index().get(str(job_id))
    if local is not None:
        return local
    sjob = (poller or slurm.POLLER).get([str(job_id)]).get(str(job_id))
    return _jobdir_from_record(str(job_id), sjob)


def attach_many(names: list[str], poller: slurm.Poller | None = None) -> list[Job]:
    """Handles for several jobs (ids or directories), asking Slurm once for all unknown ids."""
    poller = poller or slurm.POLLER
    index = local_index()
    need = [n for n in names if n.isdigit() and not Path(n).is_dir() and n not in index]
    records = poller.get(need) if need else {}
    jobs = []
    for n in names:
        if n in records:
            jobs.append(Job(n, _jobdir_from_record(n, records[n]), poller=poller))
        elif n in index and n.isdigit():
            jobs.append(Job(n, index[n], poller=poller))
        else:
            jobs.append(find(n, poller))
    return jobs


@dataclass(frozen=True)
class Listed:
    """One row of ``list``: the handle, Slurm's record of the job (if any), and its status."""

    job: Job
    slurm: slurm.SlurmJob | None
    status: JobStatus


def list_jobs(include_ended: bool = False, poller: slurm.Poller | None = None) -> list[Listed]:
    """This user's jobs of this tool with their status: one squeue call (+ one for ``--all``).

    Live jobs come from squeue (tagged ``--comment=slurm_vllm``, so hand-submitted rendered
    scripts are listed too); with ``include_ended``, also the jobs Slurm lists as ended and the
    job directories under the jobs root whose job Slurm no longer lists (asked in one more
    squeue + sacct round trip). Statuses come from the same function as ``status``.
    """
    poller = poller or slurm.POLLER
    listed = [j for j in slurm.squeue(me=True) if j.comment == JOB_COMMENT and j.workdir]
    if not include_ended:
        listed = [j for j in listed if not j.category.final]
    rows = []
    for sj in listed:
        job = Job(sj.job_id, JobDir(Path(sj.workdir)), poller=poller)
        job._last = status_of(job, sj)
        rows.append(Listed(job, sj, job._last))
    if include_ended:
        known = {sj.job_id for sj in listed}
        extra = [Job(jid, jd, poller=poller) for jid, jd in local_index().items() if jid not in known]
        records = poller.get([j.job_id for j in extra if j.job_id]) if extra else {}
        for job in extra:
            record = records.get(str(job.job_id))
            job._last = status_of(job, record)
            rows.append(Listed(job, record, job._last))
    return sorted(rows, key=lambda r: int(r.job.job_id or 0))


@dataclass(frozen=True)
class Removal:
    """One job directory ``cleanup`` removed (or would remove, with ``dry_run``)."""

    job_id: str | None
    path: Path
    phase: str
    age_days: float


def cleanup(older_than_days: float = 0.0, dry_run: bool = False, root: Path | None = None,
            poller: slurm.Poller | None = None) -> list[Removal]:
    """Remove the job directories of ended jobs under the jobs root.

    Only directories this tool marked, whose job is ENDED or FAILED, forgotten by Slurm, or never
    submitted, and whose newest file is older than ``older_than_days``. The directory of a job
    Slurm lists as queued or running (a hand-submitted script included) is never touched.
    """
    root = root or default_jobs_root()
    poller = poller or slurm.POLLER
    try:
        dirs = [JobDir(d) for d in sorted(root.iterdir()) if d.is_dir()]
    except OSError:
        return []
    live = {os.path.realpath(j.workdir) for j in slurm.squeue(me=True) if j.workdir and not j.category.final}
    dirs = [d for d in dirs if d.is_ours and os.path.realpath(d.path) not in live]
    jobs = [Job(d.read_job_id(), d, poller=poller) for d in dirs]
    submitted = [j for j in jobs if j.job_id]
    phases = {id(j): s for j, s in zip(submitted, statuses(submitted, poller=poller), strict=True)}
    now = time.time()
    out = []
    for j in jobs:
        st = phases.get(id(j))
        if st is not None and not (st.final or st.forgotten):
            continue
        age = (now - _newest_mtime(j.jobdir.path)) / 86400
        if age < older_than_days:
            continue
        out.append(Removal(j.job_id, j.jobdir.path, st.phase.value if st else "never submitted", age))
        if not dry_run:
            shutil.rmtree(j.jobdir.path, ignore_errors=True)
    return out


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                pass
    return newest
