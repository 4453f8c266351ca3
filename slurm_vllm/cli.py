"""``python -m slurm_vllm`` / ``slurm-vllm``: commands -> library calls, errors -> exit codes.

Exit codes: 0 ok, 2 bad usage or spec, 3 Slurm refused or failed, 4 the job failed or ended
before it was ready, 5 timed out waiting (1: anything else, e.g. no endpoint yet). Errors are one
line on stderr (a traceback only with ``--debug``).

Start-up stays fast on a busy login node: nothing heavy (ray, vllm, submitit, openai, rich) is
imported until a command needs it. ``leader``, ``worker`` and ``node`` hand their raw arguments
to the node program, which keeps the flags of vLLM's ``multi-node-serving.sh``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from slurm_vllm.errors import ExitCode, SlurmCommandError, SlurmVllmError, SpecError

NODE_COMMANDS = ("leader", "worker", "node")


EPILOG = """\
exit codes: 0 ok, 2 bad usage or spec, 3 Slurm refused or failed, 4 job failed or ended before
ready, 5 timed out waiting. JOB is a Slurm job id or a job directory.
"""


# --------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """Shows a job's progress on stderr: a live rich line on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._status: Any = None
        self._console: Any = None
        self._last_phase: str | None = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console  # noqa: PLC0415 - only for a live terminal

            self._console = Console(stderr=True)
            self._status = self._console.status("submitting")
            self._status.start()

    def __call__(self, st: Any) -> None:
        if self.quiet:
            return
        line = st.summary()
        stamp = time.strftime("%H:%M:%S")
        if self._console is not None:
            from rich.markup import escape  # noqa: PLC0415

            if st.phase != self._last_phase and self._last_phase is not None:
                self._console.print(f"[dim]{stamp}[/dim] {escape(line)}")
            self._status.update(f"job {st.job_id}: {escape(line)}")
        else:
            _err(f"{stamp} job {st.job_id}: {line}")
        self._last_phase = st.phase

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


# --------------------------------------------------------------------------------------------
# Spec flags (shared by submit and render)
# --------------------------------------------------------------------------------------------


def _add_spec_flags(p: argparse.ArgumentParser) -> None:
    """MODEL, --config, --profile, --template and every spec flag (from :mod:`slurm_vllm.options`)."""
    from slurm_vllm import spec_flags  # noqa: PLC0415 - plain data: no pydantic for --help

    spec_flags.add_spec_options(p)


def _build_spec(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The validated spec and the explanation rows (field, value, source)."""
    from slurm_vllm import options  # noqa: PLC0415

    return options.spec_from_args(args, vllm_args=args.extra_args)


def _print_explain(rows: list[Any]) -> None:
    from slurm_vllm import options  # noqa: PLC0415

    _err(options.format_explain(rows))


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _attach(job: str) -> Any:
    from slurm_vllm.catalog import find  # noqa: PLC0415

    return find(job)


def cmd_submit(args: argparse.Namespace) -> int:
    from slurm_vllm import api  # noqa: PLC0415

    spec, rows = _build_spec(args)
    if args.explain:
        _print_explain(rows)
    if args.dry_run:
        sys.stdout.write(api.render(spec, template=getattr(args, "template", None)))
        return ExitCode.OK
    job = api.submit(spec, via=args.via, template=getattr(args, "template", None))
    if args.json and not args.wait:
        _print_json({"job_id": job.job_id, "job_dir": str(job.job_dir)})
        return ExitCode.OK
    if not args.json:
        print(f"Submitted job {job.job_id}", flush=True)
        print(f"job directory: {job.job_dir}", flush=True)
    if args.wait:
        return _wait(job, args.timeout, args.json, quiet=args.json)
    if not args.json:
        _err(f"follow it with: slurm-vllm wait {job.job_id}")
    return ExitCode.OK


def cmd_render(args: argparse.Namespace) -> int:
    from slurm_vllm import api  # noqa: PLC0415

    spec, rows = _build_spec(args)
    if args.explain:
        _print_explain(rows)
        if not args.output:  # a question about the settings: answer it, create nothing
            sys.stdout.write(api.render(spec, template=getattr(args, "template", None)))
            _err("nothing written: add -o FILE to write the script and create its job directory")
            return ExitCode.OK
    jobdir = api.prepare(spec, template=getattr(args, "template", None))
    script = jobdir.script.read_text()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(script)
        _err(f"wrote {args.output}")
    else:
        sys.stdout.write(script)
    _err(f"job directory: {jobdir.path} (submit with: sbatch {args.output or jobdir.script})")
    return ExitCode.OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from slurm_vllm import doctor, options  # noqa: PLC0415

    def build(given: Any) -> Any:
        return options.spec_from_args(given, vllm_args=args.extra_args, check_paths=False)[0]

    spec, model_given, spec_checks = doctor.spec_for_doctor(build, vars(args))
    checks = doctor.run_checks(spec, model_given, spec_checks)
    if args.json:
        _print_json([c.to_dict() for c in checks])
    else:
        print(doctor.format_checks(checks), flush=True)
        counts = {s: sum(c.status == s for c in checks) for s in ("fail", "warn")}
        _err(f"{counts['fail']} failed, {counts['warn']} warning(s)" if any(counts.values()) else "all checks passed")
    return ExitCode.USAGE if doctor.failed(checks) else ExitCode.OK


def cmd_models(args: argparse.Namespace) -> int:
    """The site profile's presets: what ``submit NAME`` would serve, and how."""
    import os  # noqa: PLC0415

    from slurm_vllm.spec.layers import profile_path  # noqa: PLC0415
    from slurm_vllm.spec.presets import PRESETS_KEY, list_presets  # noqa: PLC0415

    profile = profile_path(args.profile)
    if profile is None:
        raise SpecError("profile", None, "give --profile FILE, or set $SLURM_VLLM_PROFILE to your site profile",
                        problem="is not given")
    rows = list_presets(profile, os.environ)
    if args.json:
        _print_json([r.to_dict() for r in rows])
        return ExitCode.OK
    if not rows:
        _err(f"{profile}: no presets (add a {PRESETS_KEY}: table, see docs/spec.md)")
        return ExitCode.OK
    print("NAME\tMODEL\tNODES\tGPUS/NODE\tTPxPP\tJOB NAME\tEXTRA ARGS")
    for r in rows:
        if r.spec is None:
            print(f"{r.name}\t{r.model}\tinvalid: {r.error}")
            continue
        s = r.spec
        print("\t".join(str(x) for x in (
            r.name, r.model, s["nodes"], s["gpus_per_node"],
            f"{s['tensor_parallel_size']}x{s['pipeline_parallel_size']}", s["job_name"], " ".join(s["extra_args"]))))
    return ExitCode.OK


#: Options whose value is a file or a directory, for the completion script.
PATH_OPTIONS = {"config": "file", "profile": "file", "template": "file", "output": "file", "container": "file",
                "venv": "dir", "job_dir": "dir"}


def cmd_completion(args: argparse.Namespace) -> int:
    """Print a static completion script: the shell completes from it, never starting Python."""
    try:
        import shtab  # noqa: PLC0415 - only this command needs it
    except ImportError:
        raise SpecError("shell", args.shell, "install shtab next to slurm-vllm (pip install shtab)",
                        problem="cannot be completed without shtab") from None
    parser = build_parser(None)  # every command with every option
    kinds = {"file": shtab.FILE, "dir": shtab.DIRECTORY}
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if action.dest in PATH_OPTIONS:
                action.complete = kinds[PATH_OPTIONS[action.dest]]  # type: ignore[attr-defined]
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    from slurm_vllm.catalog import attach_many  # noqa: PLC0415
    from slurm_vllm.job import statuses  # noqa: PLC0415

    jobs = attach_many(list(args.job))
    sts = statuses(jobs)
    if args.json:
        dicts = [s.to_dict() for s in sts]
        _print_json(dicts[0] if len(dicts) == 1 else dicts)
    else:
        from slurm_vllm.timeline import one_line  # noqa: PLC0415

        for s in sts:
            print(f"{s.job_id}\t{s.summary()}")
            if s.durations:
                print(f"  time to ready: {one_line(s.durations)}")
            for c in s.preflight:
                if c.get("status") == "warn":
                    print(f"  pre-flight warning: {c.get('node')}: {c.get('detail')}")
            if s.phase == "FAILED":
                if s.log_tail:
                    print("  " + s.log_tail.replace("\n", "\n  "))
                if s.reason.startswith("preflight:"):
                    print(f"  next: slurm-vllm status {s.job_id} --json   (every node's pre-flight checks; each "
                          "diagnosis and its fix: docs/troubleshooting.md, \"Pre-flight\")")
                else:
                    print(f"  next: slurm-vllm logs {s.job_id} --node vllm   (vLLM's log; --node 0 the head's node "
                          "program, --node batch the batch script)")
    return ExitCode.OK


def _wait(job: Any, timeout: float | None, as_json: bool, quiet: bool = False) -> int:
    progress = Progress(quiet=quiet)
    try:
        job.wait_ready(timeout=timeout, on_progress=progress)
    finally:
        progress.close()
    ep = job.endpoint
    st = job._last
    if as_json:
        d = st.to_dict() if st else {}
        d.update({"base_url": ep.base_url, "model": ep.model})
        _print_json(d)
    else:
        line = st.summary() if st is not None and st.phase.serving else f"READY {ep.base_url}"
        print(f"{line}  model={ep.model}")
        if st is not None and st.durations:
            from slurm_vllm.timeline import one_line  # noqa: PLC0415

            _err(f"time to ready: {one_line(st.durations)}")
        _show_how_to_reach(job, ep)
        _err(f'use it with: eval "$(slurm-vllm endpoint {job.job_id} --env)"')
    return ExitCode.OK


def _show_how_to_reach(job: Any, ep: Any) -> None:
    from slurm_vllm.reach import how_to_reach  # noqa: PLC0415

    key_file = job.jobdir.api_key if ep.api_key else None
    for line in how_to_reach(ep, key_file):
        _err(line)


def cmd_wait(args: argparse.Namespace) -> int:
    return _wait(_attach(args.job), args.timeout, args.json, quiet=args.quiet)


def cmd_endpoint(args: argparse.Namespace) -> int:
    from slurm_vllm import shell  # noqa: PLC0415

    job = _attach(args.job)
    job.status()
    ep = job.endpoint  # raises for a job that is over (exit 4) or not serving yet (exit 1)
    if args.json:
        _print_json({"base_url": ep.base_url, "model": ep.model, "api_key": ep.api_key, "host": ep.host,
                     "port": ep.port, "job_id": job.job_id})
    elif args.env:
        for k, v in ep.env().items():
            print(f"export {k}={shell.quote(v)}")
    else:
        print(ep.base_url)
        _show_how_to_reach(job, ep)
    return ExitCode.OK


def cmd_tunnel(args: argparse.Namespace) -> int:
    import os  # noqa: PLC0415

    from slurm_vllm import shell  # noqa: PLC0415
    from slurm_vllm.reach import local_port, tunnel_argv  # noqa: PLC0415

    job = _attach(args.job)
    job.status()
    ep = job.endpoint
    argv = tunnel_argv(ep, args.local_port, args.login)
    if args.print:
        print(shell.join(argv))
        return ExitCode.OK
    _err(f"forwarding localhost:{local_port(ep, args.local_port)} to the job's server; Ctrl-C ends it")
    os.execvp(argv[0], argv)
    return ExitCode.ERROR  # not reached: exec replaces this process


def cmd_metrics(args: argparse.Namespace) -> int:
    from slurm_vllm.metrics import table_rows  # noqa: PLC0415

    job = _attach(args.job)
    while True:
        m = job.metrics(interval=args.interval)
        if args.json:
            _print_json(m.to_dict())
        else:
            from rich.console import Console  # noqa: PLC0415
            from rich.table import Table  # noqa: PLC0415

            table = Table("replica", "url", "answers", "running", "waiting", "KV cache", "tokens/s", "finished",
                          "routed", title=f"job {job.job_id}" + (
                              f"  router: {sum(m.router_requests.values()):.0f} requests"
                              if m.router_answering else "  router: not answering" if m.router_answering is False
                              else ""))
            for row in table_rows(m):
                table.add_row(*row)
            Console().print(table)
        if not args.watch:
            return ExitCode.OK
        try:
            time.sleep(max(0.0, args.every - args.interval))
        except KeyboardInterrupt:
            return ExitCode.OK


def cmd_timeline(args: argparse.Namespace) -> int:
    from slurm_vllm import slurm, timeline  # noqa: PLC0415

    job = _attach(args.job)
    st = job.status()
    moments = timeline.from_dicts(st.timeline)
    names = {m.name for m in moments}
    if job.job_id and not {timeline.SUBMITTED, timeline.STARTED} <= names:
        # The head could not ask Slurm (or the job never started): one question from here.
        try:
            times = slurm.job_times(job.job_id)
            moments = timeline.merge(moments, {timeline.SUBMITTED: times.submitted, timeline.STARTED: times.started})
        except SlurmCommandError as exc:
            _err(f"warning: Slurm's submit and start times are unknown ({exc})")
    spans = timeline.durations(moments)
    if args.json:
        _print_json({"job_id": job.job_id, "phase": st.phase.value, "restart": st.restart,
                     "timeline": [m.to_dict() for m in moments], "durations": spans})
        return ExitCode.OK
    if not moments:
        _err(f"job {job.job_id}: nothing recorded yet ({st.summary()})")
        return ExitCode.OK
    from rich.console import Console  # noqa: PLC0415 - only for this command

    attempt = f", attempt {st.restart}" if st.restart else ""
    Console().print(timeline.table(moments, title=f"job {job.job_id}{attempt}: {st.summary()}"))
    if spans:
        print(f"time to ready: {timeline.one_line(spans)}")
    return ExitCode.OK


def cmd_logs(args: argparse.Namespace) -> int:
    job = _attach(args.job)
    node: int | str | None = args.node
    if args.follow:
        try:
            for chunk in job.follow_logs(node):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            return ExitCode.OK
        return ExitCode.OK
    text = job.logs(node, tail=args.tail, attempt=args.attempt)
    if not text:
        _err(f"{job.log_path(node, args.attempt)}: nothing logged yet")
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return ExitCode.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    job = _attach(args.job)
    st = job.cancel(timeout=args.timeout)
    if args.json:
        _print_json(st.to_dict())
    else:
        print(f"{job.job_id}\t{st.summary()}")
    return ExitCode.OK


def cmd_list(args: argparse.Namespace) -> int:
    from slurm_vllm.catalog import list_jobs  # noqa: PLC0415

    rows = []
    for row in list_jobs(include_ended=args.all):
        st, sj = row.status, row.slurm
        rows.append({
            "job_id": st.job_id, "name": sj.name if sj else "", "phase": st.phase.value,
            "slurm_state": st.slurm_state, "reason": st.reason, "model": st.model,
            "nodes": st.nodes_expected, "elapsed": st.elapsed, "time_limit": sj.time_limit if sj else "",
            "url": st.url, "job_dir": st.job_dir, "restart": st.restart,
        })
    if args.json:
        _print_json(rows)
        return ExitCode.OK
    if not rows:
        _err("no queued or running slurm_vllm jobs" + ("" if args.all else " (--all: ended ones too)"))
        return ExitCode.OK
    print("JOBID\tNAME\tMODEL\tPHASE\tSLURM\tNODES\tELAPSED\tURL/REASON\tJOB DIR")
    for r in rows:
        print("\t".join(str(x) for x in (
            r["job_id"], r["name"], r["model"] or "", r["phase"], r["slurm_state"], r["nodes"] or "",
            r["elapsed"], r["url"] or r["reason"] or "", r["job_dir"])))
    return ExitCode.OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    from slurm_vllm.catalog import cleanup  # noqa: PLC0415

    removed = cleanup(older_than_days=args.older_than, dry_run=args.dry_run)
    if args.json:
        _print_json([{"job_id": r.job_id, "job_dir": str(r.path), "phase": r.phase,
                      "age_days": round(r.age_days, 2), "removed": not args.dry_run} for r in removed])
        return ExitCode.OK
    verb = "would remove" if args.dry_run else "removed"
    for r in removed:
        print(f"{verb}\t{r.job_id or '-'}\t{r.phase}\t{r.age_days:.1f} days\t{r.path}")
    if not removed:
        _err("nothing to clean up (only ended jobs' directories are removed)")
    return ExitCode.OK


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def _node_arg(text: str) -> int | str:
    if text.isdigit():
        return int(text)
    if text in ("vllm", "batch"):
        return text
    raise argparse.ArgumentTypeError("give a node number, 'vllm' or 'batch'")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. With ``command`` given, only that subcommand gets the spec's flags: they
    come from the spec model (pydantic), which ``--help``, ``--version`` and the other commands
    need not load."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's own default must not undo a --debug given before it.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    parser = argparse.ArgumentParser(
        prog="slurm-vllm",
        description="Serve an LLM with vLLM across the nodes of a Slurm allocation.",
        epilog=EPILOG,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from slurm_vllm import __version__  # noqa: PLC0415

    parser.add_argument("--version", action="version", version=f"slurm-vllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, parents=[common], epilog=EPILOG)
        p.set_defaults(func=func)
        return p

    p = add("submit", cmd_submit, "validate, render and submit a server job; print its id and directory at once")
    if command in (None, "submit"):
        _add_spec_flags(p)
    p.add_argument("--via", choices=("sbatch", "submitit"), default="sbatch", help="submission path (default: sbatch)")
    p.add_argument("--wait", action="store_true", help="then wait until the server answers (as `wait`)")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after S seconds (exit 5)")
    p.add_argument("--dry-run", action="store_true", help="print the script; submit nothing, write nothing")
    p.add_argument("--explain", action="store_true", help="show where each setting came from (stderr)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("render", cmd_render, "write the sbatch script (and create its job directory) for submitting by hand")
    if command in (None, "render"):
        _add_spec_flags(p)
    p.add_argument("-o", "--output", help="write the script to FILE instead of stdout")
    p.add_argument("--explain", action="store_true", help="show where each setting came from (stderr)")

    p = add("doctor", cmd_doctor, "check from the login node what a job needs: Slurm, the partition and its nodes, "
                                  "account/QOS, the nodes' Python, the model, the job directory")
    if command in (None, "doctor"):
        _add_spec_flags(p)
    p.add_argument("--json", action="store_true", help="a list of {check, status, detail, fix}")

    p = add("models", cmd_models, "list the presets of the site profile (its models: table): submit NAME uses them")
    p.add_argument("--profile", default=None, metavar="FILE", help="site profile (default: $SLURM_VLLM_PROFILE)")
    p.add_argument("--json", action="store_true", help="a list of {name, model, fields, spec, error}")

    p = add("status", cmd_status, "show the phase of one or more jobs (one Slurm call for all)")
    p.add_argument("job", nargs="+", metavar="JOB")
    p.add_argument("--json", action="store_true")

    p = add("wait", cmd_wait, "wait until the job's server answers, with live progress")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--timeout", type=float, default=None, help="give up after S seconds (exit 5); the job goes on")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true")

    p = add("endpoint", cmd_endpoint, "print the server's base URL (or JSON, or shell exports)")
    p.add_argument("job", metavar="JOB")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="base_url, model, api_key, host, port")
    g.add_argument("--env", action="store_true", help="export OPENAI_BASE_URL/OPENAI_API_KEY lines for eval")

    p = add("tunnel", cmd_tunnel, "run (or --print) the ssh -L line that reaches the server from a laptop")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--local-port", type=int, default=None, metavar="P", help="local port (default: the server's)")
    p.add_argument("--login", default=None, metavar="USER@HOST", help="the host to tunnel through (default: this one)")
    p.add_argument("--print", action="store_true", help="print the command instead of running it")

    p = add("metrics", cmd_metrics, "running and waiting requests, KV cache, tokens/s of every replica and the router")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true", help="print again every --every seconds until Ctrl-C")
    p.add_argument("--every", type=float, default=5.0, metavar="S", help="with --watch: seconds between readings")
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between the two readings a rate (tokens/s) is computed from")

    p = add("timeline", cmd_timeline, "when each step of the job's start began, and how long each took")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--json", action="store_true")

    p = add("logs", cmd_logs, "print a node's log (default: the head, node 0)")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--node", type=_node_arg, default=None, help="node number, 'vllm' or 'batch'")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.add_argument("--tail", type=int, default=None, help="only the last N lines")
    p.add_argument("--attempt", type=int, default=None, metavar="N",
                   help="the run of a requeued job (0 the first; default the latest)")

    p = add("cancel", cmd_cancel, "cancel the job and return once Slurm says it has ended")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true")

    p = add("list", cmd_list, "this user's queued and running jobs of this tool (one Slurm call)")
    p.add_argument("--all", action="store_true", help="also recently ended jobs and the jobs root's ended jobs")
    p.add_argument("--json", action="store_true")

    p = add("cleanup", cmd_cleanup, "remove the job directories of ended jobs under the jobs root")
    p.add_argument("--older-than", type=float, default=0.0, metavar="DAYS",
                   help="only directories untouched for DAYS days")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.add_argument("--json", action="store_true")

    p = add("completion", cmd_completion, 'print a shell completion script (eval "$(slurm-vllm completion bash)")')
    p.add_argument("shell", choices=("bash", "zsh"))

    for name, what in (
        ("leader", "start the Ray head (drop-in for multi-node-serving.sh leader)"),
        ("worker", "join the Ray head (drop-in for multi-node-serving.sh worker)"),
        ("node", "the node program run by the batch script on every node (internal)"),
    ):
        sub.add_parser(name, help=what, add_help=False)
    return parser


def _show_warnings() -> None:
    """The library's warnings (e.g. a corrupt file in a job directory) as one stderr line each."""
    import logging  # noqa: PLC0415

    class ToStderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _err(f"warning: {record.getMessage()}")  # the stderr of now, not of set-up time

    logger = logging.getLogger("slurm_vllm")
    if not any(type(h).__name__ == "ToStderr" for h in logger.handlers):
        logger.addHandler(ToStderr(logging.WARNING))
        logger.setLevel(logging.WARNING)


#: Options of this tool that vLLM does not have: after ``--`` they are a mistake (a
#: ``-- --dry-run`` would really submit), never an argument meant for ``vllm serve``.
TOOL_ONLY_OPTIONS = frozenset({"--dry-run", "--wait", "--timeout", "--json", "--explain", "-o", "--output",
                               "--config", "--profile", "--template", "--job-dir", "--debug", "--quiet"})


def split_vllm_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` at the first ``--``: our arguments, then vLLM's, passed through verbatim.

    One of this tool's own options after ``--`` is refused (SpecError) instead of being handed
    to vLLM.
    """
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    ours, theirs = argv[:i], argv[i + 1:]
    for k, arg in enumerate(theirs):
        name = arg.split("=", 1)[0]
        if name in TOOL_ONLY_OPTIONS:
            raise SpecError(f"extra_args[{k}]", arg, f"put {name} before --: everything after -- goes to "
                                                     "vllm serve, and this is an option of slurm_vllm",
                            problem="is not a vLLM option")
    return ours, theirs


def _command_of(argv: list[str]) -> str:
    """The subcommand named in ``argv`` ("" when none): the first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), "")


#: Options whose value is itself an option (``--sbatch-arg --mail-type=END``, as the docs write it).
OPTION_VALUED = ("--sbatch-arg",)


def _join_option_values(argv: list[str]) -> list[str]:
    """``--sbatch-arg --mail-type=END`` -> ``--sbatch-arg=--mail-type=END``: argparse would read
    the value as an option of its own."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in OPTION_VALUED and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _dispatch_node(command: str, rest: list[str]) -> int:
    from slurm_vllm.node import cli as node_cli  # noqa: PLC0415 - compute-node code

    fn = {"leader": "leader_main", "worker": "worker_main", "node": "node_main"}[command]
    return int(getattr(node_cli, fn)(rest) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in NODE_COMMANDS:
        return _dispatch_node(args_list[0], args_list[1:])
    try:
        head, extra = split_vllm_args(args_list)
    except SpecError as exc:
        _err(f"error: {exc}")
        return exc.exit_code
    parser = build_parser(_command_of(head))
    args = parser.parse_args(_join_option_values(head))
    args.debug = getattr(args, "debug", False)
    if extra and args.command not in ("submit", "render", "doctor"):
        parser.error("arguments after -- are vLLM arguments, for submit, render and doctor only")
    args.extra_args = extra
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    _show_warnings()
    try:
        return int(args.func(args))
    except SlurmVllmError as exc:
        if args.debug:
            traceback.print_exc()
        text = str(exc)
        if isinstance(exc, SlurmCommandError):  # Slurm's words, kept, on one line
            text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
        _err(f"error: {text}")
        return exc.exit_code
    except KeyboardInterrupt:
        _err("interrupted")
        return 128 + 2  # as a shell reports SIGINT
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        if args.debug:
            traceback.print_exc()
        _err(f"error: {exc}")
        return ExitCode.USAGE
    except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback on request
        if args.debug:
            traceback.print_exc()
        _err(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return ExitCode.ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
