"""The one place that turns values into shell words, and decides which values cannot be one.

Every value that reaches a generated script passes through :func:`quote`. Values holding a
newline, a NUL or another control character (a tab aside) are refused outright: no quoting
survives every editor, ``#SBATCH`` parser and copy-paste; Slurm's own tools use ``\x1f`` as a
field separator; and no legitimate path, name or argument needs one. The spec's rules call
:func:`line_problem` too, so a bad value is refused by field name before anything is written.
"""

from __future__ import annotations

import re
import shlex

#: Control characters no value may hold: C0 (tab aside) and DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: Words sbatch scans every ``#SBATCH`` line for, to split heterogeneous jobs.
JOB_SEPARATORS = ("hetjob", "packjob")


class UnsafeValueError(ValueError):
    """A value cannot be written into a script safely."""


def line_problem(value: str) -> str | None:
    """What keeps ``value`` off one script line ("newline", "control character 0x1f"), or None."""
    match = _CONTROL.search(value)
    if match is None:
        return None
    char = match.group()
    if char in "\n\r":
        return "newline"
    return "NUL" if char == "\x00" else f"control character 0x{ord(char):02x}"


def job_separator(value: str) -> str | None:
    """The ``hetjob``/``packjob`` word ``value`` holds (sbatch would split the job there), or None."""
    lowered = value.lower()
    return next((w for w in JOB_SEPARATORS if w in lowered), None)


def check_line(value: str, what: str = "value") -> str:
    """Return ``value`` unchanged, or raise if it cannot live on one script line."""
    problem = line_problem(value)
    if problem is not None:
        raise UnsafeValueError(f"{what} {value!r} holds a {problem}; remove it")
    return value


def quote(value: object, what: str = "value") -> str:
    """Quote one value as a single shell word that bash reads back byte for byte."""
    text = check_line(str(value), what)
    return shlex.quote(text)


def join(argv: list[str], what: str = "argument") -> str:
    """Quote each element of an argv list and join them with spaces."""
    return " ".join(quote(a, what) for a in argv)


def slurm_filename(path: str) -> str:
    """Escape ``%`` so Slurm's filename patterns (``%j``, ``%t``) leave the path alone."""
    return check_line(path, "path").replace("%", "%%")


#: Characters sbatch's ``#SBATCH`` parser treats specially: whitespace splits arguments, both
#: quote characters open a quoted run, a backslash escapes the next character, and an unescaped
#: ``#`` starts a comment.
_SBATCH_SPECIAL = frozenset(" \t\v\f\"'\\#")


def sbatch_value(value: str, what: str = "value") -> str:
    """Write one value for a ``#SBATCH --opt=VALUE`` line.

    ``#SBATCH`` lines are parsed by sbatch, not bash: it splits on whitespace, honours single
    and double quotes, treats a backslash as "take the next character literally" (inside quotes
    too, but an escaped blank still ends the argument) and an unescaped ``#`` outside quotes as
    the start of a comment. So a value holding any of those is wrapped in double quotes, with
    ``"`` and ``\\`` escaped by a backslash; sbatch reads it back byte for byte. The words
    ``hetjob``/``packjob`` are refused: sbatch scans the whole line for them to split
    heterogeneous jobs.
    """
    text = check_line(str(value), what)
    if job_separator(text) is not None:
        raise UnsafeValueError(
            f"{what} {text!r} holds 'hetjob'/'packjob', which sbatch reads as a job separator; rename it"
        )
    if text and not any(c in _SBATCH_SPECIAL for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
