"""The one place that turns values into shell words.

Every value that reaches a generated script passes through :func:`quote`. Values holding a
newline or a NUL are refused outright: no quoting survives every editor, ``#SBATCH`` parser and
copy-paste, and no legitimate path, name or argument needs one.
"""

from __future__ import annotations

import shlex


class UnsafeValueError(ValueError):
    """A value cannot be written into a script safely."""


def check_line(value: str, what: str = "value") -> str:
    """Return ``value`` unchanged, or raise if it cannot live on one script line."""
    if "\n" in value or "\r" in value or "\x00" in value:
        raise UnsafeValueError(f"{what} {value!r} holds a newline or NUL; remove it")
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
    lowered = text.lower()
    if "hetjob" in lowered or "packjob" in lowered:
        raise UnsafeValueError(
            f"{what} {text!r} holds 'hetjob'/'packjob', which sbatch reads as a job separator; rename it"
        )
    if text and not any(c in _SBATCH_SPECIAL for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
