"""The ``#SBATCH`` options, owned beside the template that writes them: which ones the
template sets (and from which spec field), and which extra ones a user may add with
``sbatch_args``. tests/unit/test_render.py renders every field and checks this table against
the script's ``#SBATCH`` lines."""

from __future__ import annotations

import difflib

from slurm_vllm import shell
from slurm_vllm.errors import SpecError

#: Every option the template writes -> the spec field it comes from (None: the tool's own value).
SET_BY_TEMPLATE: dict[str, str | None] = {
    "job-name": "job_name", "nodes": "nodes", "ntasks-per-node": None, "gpus-per-node": "gpus_per_node",
    "cpus-per-task": "cpus_per_task", "mem": "mem", "time": "time", "partition": "partition",
    "account": "account", "qos": "qos", "constraint": "constraint", "exclusive": "exclusive",
    "signal": "signal_grace", "output": "job_dir", "open-mode": None, "chdir": "job_dir", "comment": None,
}
#: Options the template leaves out on purpose but a user must not set either.
REFUSED_FOR_FIELD: dict[str, str] = {"error": "job_dir"}

#: sbatch options a user may add with sbatch_args; the rest are either set by the tool from spec
#: fields or would break the job's contract (output files, working directory, environment).
USER_ALLOWED = frozenset({
    "mail-type", "mail-user", "reservation", "gres", "gpus", "gpus-per-task", "gpu-bind", "gpu-freq",
    "cpus-per-gpu", "mem-per-cpu", "mem-per-gpu", "nodelist", "exclude", "begin", "dependency",
    "requeue", "no-requeue", "hold", "licenses", "clusters", "wckey", "priority", "nice", "switches",
    "time-min", "deadline", "tmp", "sockets-per-node", "cores-per-socket", "threads-per-core",
    "hint", "mem-bind", "cpu-freq", "network", "core-spec", "thread-spec", "kill-on-invalid-dep",
    "spread-job", "contiguous", "mincpus", "bb", "bbf", "container", "uid", "gid", "prefer",
    "cluster-constraint", "delay-boot", "distribution", "extra-node-info", "power", "profile",
    "propagate", "reboot", "oversubscribe", "get-user-env", "no-kill",
})


def check_sbatch_args(args: list[str]) -> list[SpecError]:
    """Each extra sbatch option must be ``--name[=value]`` with ``name`` on the allow-list."""
    errors: list[SpecError] = []
    for i, arg in enumerate(args):
        field = f"sbatch_args[{i}]"
        if not arg.startswith("--"):
            errors.append(SpecError(field, arg, "write each option in long form, --option=value",
                                    problem="is not a long option"))
            continue
        name = arg[2:].split("=", 1)[0]
        if name in SET_BY_TEMPLATE or name in REFUSED_FOR_FIELD:
            owner = SET_BY_TEMPLATE.get(name) or REFUSED_FOR_FIELD.get(name)
            fix = f"set {owner} instead" if owner else "remove it: the job's layout needs the tool's own value"
            errors.append(SpecError(field, arg, fix, problem="is set by the tool"))
        elif name not in USER_ALLOWED:
            close = difflib.get_close_matches(name, sorted(USER_ALLOWED), n=1, cutoff=0.7)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            errors.append(SpecError(
                field, arg,
                f"use one of the allowed sbatch options{hint}; --ntasks, --export, --output and the like "
                f"would break the job's layout", problem="is not an allowed sbatch option"))
        elif shell.job_separator(arg):
            errors.append(SpecError(field, arg, "remove 'hetjob'/'packjob' from the value",
                                    problem="cannot be written on an #SBATCH line"))
    return errors
