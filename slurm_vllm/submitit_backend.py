"""The same node program, submitted through submitit instead of the rendered sbatch script.

For users whose tooling already speaks submitit. The job directory (spec, secrets, logs,
``state.json``, ``endpoint.json``) is the one the sbatch path uses, and the returned handle is the
same :class:`~slurm_vllm.job.Job`; only the batch script is submitit's. submitit runs one task per
node through its own ``srun`` (``nodes=N``, ``tasks_per_node=1``), and every task calls
:func:`run_node`, which runs the node program for the job directory in-process: the node program
installs its own SIGTERM/SIGUSR2 handlers over submitit's, so cancel and time-limit warnings behave
as in the sbatch path. submitit's own files (pickles, its script, the batch log) go to
``<job dir>/submitit/``; each node's output goes to ``logs/node-<rank>.log`` as usual.

``submitit`` is imported only when this path is used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from slurm_vllm import shell
from slurm_vllm.errors import SlurmCommandError, SpecError
from slurm_vllm.jobdir import JOB_COMMENT, JobDir

#: Seconds between Slurm's time-limit warning (SIGUSR2) and the kill, if the spec sets none.
DEFAULT_SIGNAL_GRACE_S = 120


def run_node(job_dir: str) -> None:
    """What every submitit task runs: the node program for ``job_dir`` (rank from Slurm's env).

    Exits non-zero when the node program fails, so ``srun --kill-on-bad-exit`` ends the others.
    """
    os.chdir(job_dir)
    from slurm_vllm.node.cli import node_main  # noqa: PLC0415 - compute-node code, imported there

    rc = node_main(["--job-dir", job_dir])
    if rc:
        raise SystemExit(rc)


def _sbatch_args_to_params(args: list[str]) -> dict[str, Any]:
    """``["--mail-type=END", "--requeue"]`` -> ``{"mail-type": "END", "requeue": True}``."""
    params: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("--"):
            raise SpecError("sbatch_args", arg, "give long options as --name=value for the submitit backend")
        key, sep, value = arg[2:].partition("=")
        params[key] = value if sep else True
    return params


def executor_parameters(spec: Any, jobdir: JobDir) -> dict[str, Any]:
    """The ``submitit.SlurmExecutor`` parameters for ``spec``: resources, Slurm options, setup.

    SlurmExecutor rather than AutoExecutor: only it lets ``None`` switch off submitit's own
    defaults (AutoExecutor reads ``None`` as "not set" and keeps them).
    """
    res = spec.resources
    env = spec.environment
    if env.container:
        raise SpecError(
            "container", env.container,
            "submitting via submitit runs Python directly; submit via='sbatch' (the default) for containers",
        )
    setup: list[str] = [f"export {shell.quote(k + '=' + v, 'env')}" for k, v in sorted(env.env.items())]
    if env.venv:
        setup.append(f"source {shell.quote(str(Path(env.venv) / 'bin' / 'activate'), 'venv')}")
    setup.extend(shell.check_line(line, "setup line") for line in env.setup)

    additional: dict[str, Any] = {
        "chdir": str(jobdir.path),
        "comment": JOB_COMMENT,
    }
    if res.mem:
        additional["mem"] = res.mem
    if res.constraint:
        additional["constraint"] = res.constraint
    if res.exclusive:
        additional["exclusive"] = True
    additional.update(_sbatch_args_to_params(list(res.sbatch_args)))

    grace = getattr(getattr(spec, "resources", None), "signal_grace", None) or DEFAULT_SIGNAL_GRACE_S
    node_log = shell.slurm_filename(str(jobdir.logs)) + "/node-%t.log"  # %t: Slurm's task rank
    if "%" in str(jobdir.path):
        raise SpecError("job_dir", str(jobdir.path),
                        "choose a job directory (or job name) without '%' for the submitit backend: submitit "
                        "writes its own Slurm file patterns under it, and Slurm would expand the '%'",
                        problem="holds '%'")
    params: dict[str, Any] = {
        # Exactly the spec's resources: submitit's own defaults (--time=5, --wckey=submitit) are
        # switched off by None; an unset time is the partition's default, as on the sbatch path.
        "time": res.time,
        "wckey": None,
        "job_name": res.job_name,
        "nodes": res.nodes,
        "ntasks_per_node": 1,
        "gpus_per_node": res.gpus_per_node,
        "signal_delay_s": int(grace),
        "setup": setup,
        "additional_parameters": additional,
        "stderr_to_stdout": True,
        "srun_args": ["--kill-on-bad-exit=1", f"--output={node_log}"],
    }
    if res.cpus_per_task:
        params["cpus_per_task"] = res.cpus_per_task
    for key in ("partition", "account", "qos"):
        value = getattr(res, key)
        if value:
            params[key] = value
    return params


def _python_for(spec: Any) -> str:
    """The interpreter submitit starts on each node: as the sbatch path would run the node program
    (the spec's python, else the venv's, else python3 after setup lines, else this one)."""
    env = spec.environment
    if env.python:
        return shell.quote(env.python)
    if env.venv:
        return shell.quote(str(Path(env.venv) / "bin" / "python"))
    if env.setup:
        return "python3"
    return shell.quote(sys.executable)


def submit(spec: Any, jobdir: JobDir) -> str:
    """Submit the node program for an already prepared ``jobdir``; return the Slurm job id."""
    try:
        import submitit  # noqa: PLC0415 - optional path; heavy-ish import
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SpecError("via", "submitit", "install submitit (pip install submitit) or submit via='sbatch' "
                        "(--via sbatch)", problem="needs the submitit package") from exc

    folder = jobdir.path / "submitit"
    folder.mkdir(mode=0o700, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, python=_python_for(spec))
    executor.update_parameters(**executor_parameters(spec, jobdir))
    try:
        job = executor.submit(run_node, str(jobdir.path))
    except Exception as exc:  # submitit wraps sbatch's failure in its own error types
        raise SlurmCommandError(["sbatch"], 1, str(exc)) from exc
    job_id = str(job.job_id)
    # job.sbatch must be the exact script submitted: submitit's, for this path.
    script = folder / f"{job_id}_submission.sh"
    if script.exists():
        jobdir.script.write_text(script.read_text())
    return job_id
