"""``python -m slurm_vllm``: the CLI."""

from slurm_vllm.cli import main

raise SystemExit(main())
