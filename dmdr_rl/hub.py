"""Whether the Hugging Face hub can be reached, asked once per process before a model loads from it.

Offline, huggingface_hub retries every request with backoff (about 50 s for each file) before it gives
up or falls back to its cache. The loaders ask `hub_reachable()` first and, when the hub cannot be
reached, load with `local_files_only=True`: from the hub cache at once, or at once an error that says
to pass a local directory."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit

# with one of these set, requests go through a proxy and a direct connection says nothing
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_reachable(endpoint: str | None = None, timeout_s: float = 3.0) -> bool:
    """False when huggingface_hub is set offline (HF_HUB_OFFLINE) or the endpoint (HF_ENDPOINT, else
    huggingface.co) takes no TCP connection within `timeout_s`; True behind a proxy (left to the hub client)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    return _connects(endpoint or constants.ENDPOINT, timeout_s)


@functools.lru_cache(maxsize=None)
def _connects(endpoint: str, timeout_s: float) -> bool:
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return True
    except (OSError, UnicodeError):  # no route, refused, timed out, a name that does not resolve
        return False


def hub_host() -> str:
    from huggingface_hub import constants

    return urlsplit(constants.ENDPOINT).hostname or constants.ENDPOINT


def local_files_only(requested: bool, *names: str) -> bool:
    """What to pass as `local_files_only` when loading `names` (local paths or hub ids): as requested, or
    True when one of them is a hub id and the hub cannot be reached (the cache alone, no retries)."""
    return requested or (any(not os.path.isdir(os.path.expanduser(name)) for name in names) and not hub_reachable())


def looks_like_a_path(text: str) -> bool:
    """A file system path rather than a hub id ("org/name") or another option's text: absolute, or
    relative by ./ ../ ~, or with more than one '/'."""
    return os.path.isabs(text) or text.startswith(("./", "../", "~")) or text.count("/") > 1


def unreachable_note() -> str:
    """Said in a load error when the hub could not be reached (empty when it could)."""
    return "" if hub_reachable() else (f"The hub ({hub_host()}) cannot be reached from this machine, and the files are not "
                                      "in its cache. ")
