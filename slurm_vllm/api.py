"""The Python API for notebooks and scripts: ``submit``, ``render``, ``attach``.

A model name given instead of a :class:`ServeSpec` is built as the CLI builds it
(:func:`~slurm_vllm.spec.load_spec`: site profile and presets, spec file, environment, keywords).

``submit`` prepares the job directory and submits, returning a :class:`~slurm_vllm.job.Job` at
once (or after the server is ready with ``wait=True``). ``render`` has no side effects: it returns
the script a submission *would* use, for reading. To get a script you can edit and ``sbatch`` by
hand, use the CLI's ``render`` command (or :func:`prepare`), which also creates the job directory
the script refers to (its spec, secrets and log folder).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from slurm_vllm import slurm
from slurm_vllm.errors import SpecError
from slurm_vllm.job import Job, ProgressFn
from slurm_vllm.jobdir import JobDir, atomic_write
from slurm_vllm.spec import ServeSpec, load_spec

#: How a job can be submitted (``via=``); ``backend`` is the spec's executor (ray or mp).
VIAS = ("sbatch", "submitit")


def _as_spec(spec: ServeSpec | str, options: dict[str, Any]) -> ServeSpec:
    """A ServeSpec as given, or one built from a model (or preset) name as the CLI builds it."""
    if isinstance(spec, ServeSpec):
        if options:
            raise TypeError("give options either in the ServeSpec or as keywords, not both")
        return spec
    return load_spec(spec, **options)  # flat names; profile, preset, config, environment as on the CLI


def _submission_path(via: str | None, options: dict[str, Any]) -> str:
    """``via``, or the old ``backend="sbatch"|"submitit"`` spelling (deprecated: ``backend`` is
    the spec's executor, ray or mp, everywhere)."""
    old = options.get("backend")
    if old in VIAS:
        options.pop("backend")
        warnings.warn(f"submit(..., backend={old!r}) is deprecated: write via={old!r} (backend= is the "
                      "executor, 'ray' or 'mp')", DeprecationWarning, stacklevel=3)
        if via is not None and via != old:
            raise SpecError("via", via, f"give the submission path once (backend={old!r} says otherwise)",
                            problem="contradicts backend")
        via = old
    via = "sbatch" if via is None else via
    if via not in VIAS:
        raise SpecError("via", via, f"choose one of {', '.join(VIAS)}", problem="is not a submission path")
    return via


def render(spec: ServeSpec | str, template: str | os.PathLike[str] | None = None, **options: Any) -> str:
    """The sbatch script for ``spec``, without writing anything (a preview)."""
    from slurm_vllm.render import preview_job_dir, render_script, resolve_node_env  # noqa: PLC0415 - Jinja2
    from slurm_vllm.spec import validate_spec  # noqa: PLC0415

    spec, node_env = resolve_node_env(validate_spec(_as_spec(spec, options), check_paths=True))
    return render_script(spec, preview_job_dir(spec), template=template, node_env=node_env)


def prepare(spec: ServeSpec | str, template: str | os.PathLike[str] | None = None, **options: Any) -> JobDir:
    """Create the job directory (spec, secrets, ``job.sbatch``) without submitting it."""
    from slurm_vllm.render import prepare_job  # noqa: PLC0415

    return prepare_job(_as_spec(spec, options), template=template)


def submit(
    spec: ServeSpec | str,
    via: str | None = None,
    wait: bool = False,
    timeout: float | None = None,
    template: str | os.PathLike[str] | None = None,
    on_progress: ProgressFn | None = None,
    **options: Any,
) -> Job:
    """Submit ``spec`` and return its job handle.

    ``via="sbatch"`` (default) submits the rendered script; ``"submitit"`` submits the same node
    program through submitit. Both use the same job directory and return the same handle.
    (``backend=`` is the spec's executor, ``"ray"`` or ``"mp"``, as on the CLI; the old
    ``backend="submitit"`` still works, with a DeprecationWarning.) With ``wait=True`` this
    returns once the server answers (see :meth:`Job.wait_ready`). ``spec`` may also be a model
    or preset name with options as keywords, built as :func:`load_spec` (and the CLI) builds it:
    ``submit("org/model", nodes=2, gpus_per_node=8, partition="gpu")``.
    """
    via = _submission_path(via, options)
    from slurm_vllm.render import prepare_submission  # noqa: PLC0415

    spec = _as_spec(spec, options)
    created = prepare_submission(spec, template=template)
    jobdir = created.jobdir
    try:
        if via == "submitit":
            from slurm_vllm import submitit_backend  # noqa: PLC0415 - imports submitit

            job_id = submitit_backend.submit(spec, jobdir)
        else:
            job_id = slurm.sbatch(jobdir.script, jobdir.path)
    except BaseException:
        created.undo()  # a refused submission leaves nothing behind, fresh secrets least of all
        raise
    atomic_write(jobdir.job_id_file, job_id + "\n", mode=0o600)
    job = Job(job_id, jobdir)
    if wait:
        job.wait_ready(timeout=timeout, on_progress=on_progress)
    return job


def attach(job: str | int | os.PathLike[str]) -> Job:
    """A handle for an existing job, named by its Slurm id or its job directory.

    Works for jobs submitted by hand from a rendered script: their id leads to their directory
    through the working directory Slurm records for them.
    """
    return Job.attach(str(job) if isinstance(job, int) else job)


def jobs(include_ended: bool = False) -> list[Job]:
    """Handles for this user's queued and running jobs of this tool (one Slurm call)."""
    from slurm_vllm.catalog import list_jobs  # noqa: PLC0415

    return [row.job for row in list_jobs(include_ended=include_ended)]
