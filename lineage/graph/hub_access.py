"""Reaching the Hugging Face Hub: at once, or a one-line error within about a second.

huggingface_hub retries a failed request five times with growing waits (about 24 s offline) and logs
a line for each try. Before the first download of a command, one TCP connection to the hub's host
(`HF_ENDPOINT`, else huggingface.co) is tried with a short timeout; when it fails, the card is not
read and the message says the hub cannot be reached (one line: the first card's failure stops
`hub import`, a parent's is listed as not followed, as for any card that cannot be read). Behind a
proxy (`HTTPS_PROXY`, `ALL_PROXY`) or with `HF_HUB_OFFLINE` set (cached files only) the probe is
left out: huggingface_hub knows the way.
The library's own retry messages are silenced while it reads a card; its error still reaches us.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from huggingface_hub import constants

PROBE_TIMEOUT_S = 1.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class HubUnreachable(ConnectionError):
    """The hub's host did not answer: a card that needs it is not read (the others still are)."""


@functools.cache
def _probe(host: str, port: int) -> str | None:
    """Why `host:port` cannot be reached (None when it can); asked once per process."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
    return None


def check_hub_reachable() -> None:
    """Raise HubUnreachable (an OSError, like huggingface_hub's own connection errors) when the hub's
    host does not answer within PROBE_TIMEOUT_S."""
    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return
    endpoint = urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    problem = _probe(host, port)
    if problem:
        raise HubUnreachable(f"cannot reach the Hugging Face Hub at {host} ({problem}); check the network, or "
                             "read saved cards with --cards DIR")


@contextmanager
def hub_quiet() -> Iterator[None]:
    """huggingface_hub's log lines (retries, warnings) held back while it works; its errors still raise."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)
