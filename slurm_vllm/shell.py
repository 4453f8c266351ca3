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


def sbatch_value(value: str, what: str = "value") -> str:
    """Write one value for a ``#SBATCH --opt=VALUE`` line.

    ``#SBATCH`` lines are parsed by sbatch, not bash: it splits on whitespace and honours double
    quotes, with no escape for a quote inside them. So a value with whitespace is double-quoted,
    and a value holding a double quote is refused.
    """
    check_line(value, what)
    if '"' in value:
        raise UnsafeValueError(f"{what} {value!r} holds a double quote, which #SBATCH cannot carry")
    if any(c.isspace() for c in value) or value == "":
        return f'"{value}"'
    return value
