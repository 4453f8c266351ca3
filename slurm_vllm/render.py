"""Spec + job directory -> sbatch script, through Jinja2 templates; the only writer of shell.

The environment is strict on purpose: ``StrictUndefined`` makes a misspelt name fail the render,
and a ``finalize`` hook refuses any interpolated string that did not come out of one of the
quoting filters (``q``, ``qjoin``, ``sbatch``, ``comment``,
``trusted_shell``). A template that forgets a
filter therefore fails loudly instead of writing an unquoted value into a script. Whole numbers
pass through as they are (they cannot carry shell syntax).
"""

from __future__ import annotations

import datetime as _dt
import importlib.resources
import os
import re
from pathlib import Path
from typing import Any

import jinja2

from slurm_vllm import shell
from slurm_vllm.errors import SpecError
from slurm_vllm.jobdir import (
    JOB_COMMENT,
    Created,
    JobDir,
    JobDirError,
    atomic_write,
    cache_root,
    create_job_dir,
    default_jobs_root,
    mkdir_private,
    write_json,
)
from slurm_vllm.node_env import NodeEnv, require
from slurm_vllm.spec import ServeSpec, validate_spec
from slurm_vllm.vllm_args import LOAD_STRATEGY_FLAG, user_sets

DEFAULT_TEMPLATE = "serve.sbatch.j2"
#: Where each ``stage_weights`` choice copies the model, in the script's words (node/staged_store.py).
STAGE_WHERE = {"local": "node-local disk ($SLURM_TMPDIR, else $TMPDIR, else /tmp)", "shm": "/dev/shm"}


class Quoted(str):
    """A string made safe for its place in the script by one of the quoting filters."""


class UnquotedValueError(jinja2.TemplateError):
    """A template interpolated a value without a quoting filter."""


def _q(value: Any) -> Quoted:
    """One shell word (bash reads it back byte for byte)."""
    return Quoted(shell.quote(value))


def _sbatch(value: Any) -> Quoted:
    """One argument on an ``#SBATCH`` line (sbatch's own parser reads it back byte for byte)."""
    return Quoted(shell.sbatch_value(str(value)))


def _slurm_file(value: Any) -> str:
    """Escape ``%`` for Slurm filename patterns; still needs ``q`` or ``sbatch`` after it."""
    return shell.slurm_filename(str(value))


def _comment(value: Any) -> Quoted:
    """Text inside a ``#`` comment: inert as long as it stays on one line."""
    return Quoted(shell.check_line(str(value), "comment text"))


def _trusted_shell(value: Any) -> Quoted:
    """A setup line the user wrote as shell: verbatim, one line, never re-quoted or eval'd."""
    return Quoted(shell.check_line(str(value), "setup line"))


def _qjoin(values: Any) -> Quoted:
    """A list of shell words, each quoted, joined by spaces."""
    return Quoted(shell.join([str(v) for v in values]))


def _finalize(value: Any) -> Any:
    if isinstance(value, Quoted):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise UnquotedValueError(
        f"template interpolated {value!r} without a quoting filter; use | q (shell word), | qjoin, "
        f"| sbatch (#SBATCH value), | comment or | trusted_shell"
    )


def _package_template(name: str) -> str:
    resource = importlib.resources.files("slurm_vllm") / "sbatch_templates" / name
    return resource.read_text(encoding="utf-8")


def make_environment() -> jinja2.Environment:
    """The one Jinja2 environment: packaged templates, StrictUndefined, quoting enforced."""
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_package_template),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=_finalize,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["q"] = _q
    env.filters["qjoin"] = _qjoin
    env.filters["sbatch"] = _sbatch
    env.filters["slurm_file"] = _slurm_file
    env.filters["comment"] = _comment
    env.filters["trusted_shell"] = _trusted_shell
    return env


def container_binds(spec: ServeSpec, job_dir: str) -> list[str]:
    """The container's ``--bind`` list: the job directory; the compile caches' folder; a local
    model, read-only, unless one of the user's binds already shows it at its own path; then the
    user's binds."""
    binds = [job_dir]
    cache = cache_root(spec.environment.cache_dir)
    if cache is not None and not any(_shows_at_own_path(b, str(cache)) for b in spec.environment.container_binds):
        binds.append(str(cache))
    if spec.is_local_model:
        model = spec.model.name
        if not any(_shows_at_own_path(bind, model) for bind in spec.environment.container_binds):
            binds.append(f"{model}:{model}:ro")
    return binds + list(spec.environment.container_binds)


def _shows_at_own_path(bind: str, path: str) -> bool:
    """Whether ``--bind SRC[:DST[:OPTS]]`` makes ``path`` visible at the same path inside."""
    src, _, rest = bind.partition(":")
    dst = rest.partition(":")[0] or src
    src = src.rstrip("/") or "/"
    return src == dst.rstrip("/") and (path == src or path.startswith(src.rstrip("/") + "/"))


def _context(spec: ServeSpec, jobdir: JobDir, node_env: NodeEnv | None = None) -> dict[str, Any]:
    from slurm_vllm import __version__

    r, e = spec.resources, spec.environment
    job_dir = str(jobdir.path)
    pattern_dir = shell.slurm_filename(job_dir)
    wrapper: list[str] = []
    if e.container:
        wrapper = [e.container_runtime, "exec", "--nv"]
        for bind in container_binds(spec, job_dir):
            wrapper += ["--bind", bind]
        wrapper.append(e.container)
    node_argv = [e.python or "python3", "-m", "slurm_vllm", "node", "--job-dir", job_dir]
    srun_opts = ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if r.cpus_per_task is not None:
        srun_opts.append(f"--cpus-per-task={r.cpus_per_task}")
    return {
        "spec": spec,
        "version": __version__,
        "job_dir": job_dir,
        "job_comment": JOB_COMMENT,
        "batch_output": f"{pattern_dir}/logs/batch-%j.out",
        "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size,
        "srun_opts": srun_opts,
        "node_log_dir": f"{pattern_dir}/logs",  # a Slurm file pattern: % escaped
        "container_argv": wrapper,
        "node_argv": node_argv,
        "activate": os.path.join(e.venv, "bin", "activate") if e.venv else None,
        "node_env_comment": node_env.comment_lines() if node_env is not None else [],
        "cache_dir": str(cache_root(e.cache_dir) or ""),
        "prefetch_note": (spec.is_local_model and spec.model.stage_weights == "none"
                          and not user_sets(spec.model.extra_args, LOAD_STRATEGY_FLAG)),
        "stage_where": STAGE_WHERE.get(spec.model.stage_weights, ""),
    }


def render_script(spec: ServeSpec, jobdir: JobDir, template: str | os.PathLike[str] | None = None,
                  node_env: NodeEnv | None = None) -> str:
    """Render the batch script for ``spec`` running in ``jobdir``; writes nothing.

    ``node_env`` (from :func:`resolve_node_env`) adds what the login side found about the nodes'
    Python to the script's comments; the interpreter itself comes from ``spec``.

    ``template`` is a path to the user's own Jinja2 template, rendered under the same rules
    (quoting filters enforced, StrictUndefined). Raises :class:`SpecError` for an unreadable
    template and :class:`UnquotedValueError` / ``jinja2.UndefinedError`` for a faulty one.
    """
    env = make_environment()
    if template is None:
        tmpl = env.get_template(DEFAULT_TEMPLATE)
    else:
        try:
            source = Path(template).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError("template", str(template), f"check the path ({exc.strerror or exc})",
                            problem="cannot be read") from None
        tmpl = env.from_string(source)
    try:
        return tmpl.render(_context(spec, jobdir, node_env))
    except shell.UnsafeValueError as exc:
        raise SpecError("spec", str(exc), "remove the character the message names",
                        problem="cannot be written into the script") from None


def _resolved(spec: ServeSpec, jobdir: JobDir) -> ServeSpec:
    """The spec as the job will read it (``spec.json``): its job directory, and the compile
    caches' folder fixed now, so the nodes need not know this side's ``$SLURM_VLLM_HOME``.

    A container can only bind a folder that exists: for one, the caches' folder is created here
    (0700; an existing one is left as it is).
    """
    data = spec.model_dump(mode="json")
    cache = cache_root(spec.environment.cache_dir)
    data["job_dir"] = str(jobdir.path)
    data["environment"]["cache_dir"] = str(cache) if cache is not None else "none"
    if cache is not None and spec.environment.container:
        mkdir_private(cache)
    return ServeSpec.model_validate(data, context={"check_paths": False})


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _dir_name(job_name: str) -> str:
    """The job name made safe for a directory name (the real name stays in the spec)."""
    name = _SAFE_NAME.sub("_", job_name).strip("._") or "job"
    return name[:64]


def resolve_node_env(spec: ServeSpec) -> tuple[ServeSpec, NodeEnv]:
    """Check the nodes' Python (:mod:`slurm_vllm.node_env`); the spec with the chosen one in it.

    Raises :class:`SpecErrors` before anything is created when the nodes would not find the
    package; says its warnings (logging) once.
    """
    env = require(spec)
    if env.python is None:
        return spec, env
    data = spec.model_dump(mode="json")
    data["environment"]["python"] = env.python
    return ServeSpec.model_validate(data, context={"check_paths": False}), env


def preview_job_dir(spec: ServeSpec, now: _dt.datetime | None = None) -> JobDir:
    """The job directory a submission would create (for a preview; nothing is created)."""
    if spec.job_dir:
        return JobDir(Path(spec.job_dir))
    now = now or _dt.datetime.now()
    return JobDir(default_jobs_root() / f"{_dir_name(spec.resources.job_name)}-{now:%Y%m%d-%H%M%S}")


def prepare_job(
    spec: ServeSpec,
    template: str | os.PathLike[str] | None = None,
    now: _dt.datetime | None = None,
) -> JobDir:
    """Validate, create the job directory, and write spec.json, secrets and job.sbatch.

    After this the script can be submitted by hand with plain ``sbatch``.
    """
    return prepare_submission(spec, template, now).jobdir


def prepare_submission(
    spec: ServeSpec,
    template: str | os.PathLike[str] | None = None,
    now: _dt.datetime | None = None,
) -> Created:
    """:func:`prepare_job`, returning what was created so a refused submission can ``undo()`` it.

    The spec is validated before anything is created; the directory is created atomically and
    uniquely (:func:`~slurm_vllm.jobdir.create_job_dir`), and removed again if anything after
    that fails.
    """
    validate_spec(spec, check_paths=True)
    spec, node_env = resolve_node_env(spec)  # a refusal here leaves nothing behind
    stamp = f"{now or _dt.datetime.now():%Y%m%d-%H%M%S}"
    try:
        created = create_job_dir(spec.job_dir, _dir_name(spec.resources.job_name), stamp=stamp)
    except JobDirError as exc:
        raise SpecError("job_dir", str(exc.path), exc.fix, problem=exc.problem) from None
    except OSError as exc:
        raise SpecError("job_dir", spec.job_dir or str(default_jobs_root()),
                        f"choose a writable place ({exc.strerror or exc})", problem="cannot be created") from None
    jobdir = created.jobdir
    try:
        resolved = _resolved(spec, jobdir)
        script = render_script(resolved, jobdir, template, node_env=node_env)
        write_json(jobdir.spec, resolved.model_dump(mode="json"), mode=0o600)
        if resolved.serve.api_key:
            jobdir.write_secret(jobdir.api_key)
        jobdir.write_secret(jobdir.ray_token)
        atomic_write(jobdir.script, script, mode=0o700)
    except BaseException:
        created.undo()
        raise
    return created
