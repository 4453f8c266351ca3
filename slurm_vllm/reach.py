"""Reaching a job's endpoint from where the user is: a ``curl`` line that reads the key from
its file (the key itself is never printed), and the ``ssh -L`` tunnel a laptop runs to reach a
compute node through the login node."""

from __future__ import annotations

import getpass
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from slurm_vllm import shell

if TYPE_CHECKING:
    from slurm_vllm.job import Endpoint


def login_host() -> str:
    """``user@host`` of this (login) machine, as a laptop would name it for ssh."""
    return f"{getpass.getuser()}@{socket.getfqdn()}"


def curl_line(ep: Endpoint, key_file: Path | None) -> str:
    """A ``curl`` of ``/v1/models`` that reads the key from its file when it runs."""
    url = shell.quote(ep.base_url.rstrip("/") + "/models")
    if key_file is None:
        return f"curl -s {url}"
    return f'curl -s -H "Authorization: Bearer $(cat {shell.quote(str(key_file))})" {url}'


def _address(ep: Endpoint) -> tuple[str, int]:
    """The server's node address and port, from its base URL."""
    node, _, rest = ep.base_url.split("//", 1)[1].rpartition(":")
    return node, ep.port or int(rest.split("/", 1)[0])


def local_port(ep: Endpoint, wanted: int | None = None) -> int:
    """The laptop's end of the tunnel: ``wanted``, else the server's own port."""
    return wanted or _address(ep)[1]


def tunnel_argv(ep: Endpoint, wanted_port: int | None = None, login: str | None = None) -> list[str]:
    """``ssh -N -L LOCAL:NODE:PORT LOGIN``: run on a laptop, then use ``http://localhost:LOCAL/v1``."""
    node, port = _address(ep)
    return ["ssh", "-N", "-L", f"{local_port(ep, wanted_port)}:{node}:{port}", login or login_host()]


def how_to_reach(ep: Endpoint, key_file: Path | None) -> list[str]:
    """The lines shown at READY after the URL: the curl check here, the tunnel from a laptop."""
    return [
        f"test it here:    {curl_line(ep, key_file)}",
        f"from a laptop:   {shell.join(tunnel_argv(ep))}   then use http://localhost:{local_port(ep)}/v1",
    ]
