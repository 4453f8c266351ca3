"""ServeSpec: what the user asks for, validated once, with the same field names everywhere.

A spec is built from CLI flags, a YAML/TOML file, a site profile, environment variables or
Python, and always ends up in the same sections (``model``, ``resources``, ``parallel``, ``ray``,
``network``, ``environment``, ``serve``). Flat names (``nodes=2``, ``partition="gpu"``) are
accepted everywhere and mapped into their section, so users never need to know the layout.

Every rule that can be checked on the login node is checked here, before anything is written
or submitted; each failure is a :class:`~slurm_vllm.errors.SpecError` naming the field, the
value and the fix. The renderer and the node program read the section and field names below;
extend them, do not rename them.
"""

from __future__ import annotations

from slurm_vllm.spec.fields import (
    SECTIONS,
    TOP_FIELDS,
    EnvironmentSection,
    ModelSection,
    NetworkSection,
    ParallelSection,
    RaySection,
    ResourcesSection,
    ServeSection,
    StrictBool,
    parse_bool,
)
from slurm_vllm.spec.layers import (
    MAX_FILE_VALUES,
    Explained,
    build_spec,
    env_layer,
    explain,
    load_spec,
    load_spec_file,
    load_spec_json,
    profile_path,
    read_spec_file,
)
from slurm_vllm.spec.model import ServeSpec
from slurm_vllm.spec.names import ALIASES, ENV_VARS, FLAT_NAMES, PROFILE_ENV_VAR, field_names, job_name_for, normalize
from slurm_vllm.spec.presets import PRESETS_KEY, Preset, split_profile
from slurm_vllm.spec.rules import (
    MAX_TIMEOUT,
    MIN_RUN_AFTER_WARNING,
    check_paths_exist,
    check_spec,
    time_limit_seconds,
    validate_spec,
)

__all__ = [
    "ALIASES",
    "ENV_VARS",
    "FLAT_NAMES",
    "MAX_FILE_VALUES",
    "MAX_TIMEOUT",
    "MIN_RUN_AFTER_WARNING",
    "PRESETS_KEY",
    "PROFILE_ENV_VAR",
    "SECTIONS",
    "TOP_FIELDS",
    "EnvironmentSection",
    "Explained",
    "ModelSection",
    "NetworkSection",
    "ParallelSection",
    "Preset",
    "RaySection",
    "ResourcesSection",
    "ServeSection",
    "ServeSpec",
    "StrictBool",
    "build_spec",
    "check_paths_exist",
    "check_spec",
    "env_layer",
    "explain",
    "field_names",
    "job_name_for",
    "load_spec",
    "load_spec_file",
    "load_spec_json",
    "normalize",
    "parse_bool",
    "profile_path",
    "read_spec_file",
    "split_profile",
    "time_limit_seconds",
    "validate_spec",
]
