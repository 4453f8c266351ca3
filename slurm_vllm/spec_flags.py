"""The spec's CLI flags for ``submit``/``render``/``doctor`` without loading the spec model.

The flags are generated from the spec's fields (options.py) into ``_flag_table.py``, plain data
that imports nothing, so building the parser (and ``submit --help``) stays light; a unit test
keeps the table in step with the fields.
"""

from __future__ import annotations

import argparse

from slurm_vllm._flag_table import FLAGS

S = argparse.SUPPRESS
_TYPES = {"int": int, "float": float}


def add_spec_options(parser: argparse.ArgumentParser, model_required: bool = False) -> None:
    """Add MODEL, ``--config``, ``--profile``, ``--template`` and every spec flag to ``parser``.

    Flags left out do not appear in the parsed namespace at all (SUPPRESS), so they never
    override a value from the site profile, the spec file or the environment.
    """
    parser.add_argument("model", nargs=None if model_required else "?", default=S, metavar="MODEL",
                        help="hub id (org/name) or local path of the model")
    parser.add_argument("--config", default=S, metavar="FILE", help="spec file (YAML or TOML)")
    parser.add_argument("--profile", default=S, metavar="FILE",
                        help="site profile (YAML or TOML); default $SLURM_VLLM_PROFILE")
    parser.add_argument("--template", default=S, metavar="FILE", help="your own Jinja2 sbatch template")
    group = parser.add_argument_group("spec options (same names as the spec file's fields)")
    for flags, field, kwargs in FLAGS:
        kw = dict(kwargs)
        if "type" in kw:
            kw["type"] = _TYPES[kw["type"]]
        group.add_argument(*flags, dest=field, default=S, **kw)
