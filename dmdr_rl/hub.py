"""Whether the Hugging Face hub can be reached, asked before a model loads from it.

Offline, huggingface_hub retries every request with backoff (about 50 s for each file) before it gives
up or falls back to its cache. The loaders ask `hub_reachable()` first and, when the hub cannot be
reached (or HF_HUB_OFFLINE is set), load with `local_files_only=True`: from the hub cache at once, or at once
an error that says why only the cache was read and to pass a local directory."""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import urllib.request
from urllib.parse import urlsplit

from .errors import in_cause_chain

UNREACHABLE_FOR_S = 60.0  # how long a failed check stands before the next load checks again


def hub_reachable(endpoint: str | None = None, timeout_s: float = 3.0) -> bool:
    """False when huggingface_hub is set offline (HF_HUB_OFFLINE) or the endpoint (HF_ENDPOINT, else
    huggingface.co) takes no TCP connection within `timeout_s` (name lookup included); True behind a
    proxy, which the hub client uses and a direct connection says nothing about. A success stands for the
    process; a failure for `UNREACHABLE_FOR_S`, so a passing network blip does not make it cache-only."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    proxies = urllib.request.getproxies()  # the environment's, and on macOS / Windows the system's
    if any(proxies.get(scheme) for scheme in ("https", "http", "all")):
        return True
    endpoint = endpoint or constants.ENDPOINT
    if endpoint in _REACHED:
        return True
    if time.monotonic() - _FAILED_AT.get(endpoint, -math.inf) < UNREACHABLE_FOR_S:
        return False
    if _connects(endpoint, timeout_s):
        _REACHED.add(endpoint)
        return True
    _FAILED_AT[endpoint] = time.monotonic()
    return False


_REACHED: set[str] = set()
_FAILED_AT: dict[str, float] = {}


def _connects(endpoint: str, timeout_s: float) -> bool:
    """One TCP connection to the endpoint's host within `timeout_s` in all: the name lookup (in a thread,
    which the deadline does not wait for) and then each of its addresses in turn."""
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    deadline = time.monotonic() + timeout_s
    found: list = []

    def look_up() -> None:
        try:
            found.extend(socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError):  # a name that does not resolve, no resolver
            pass

    lookup = threading.Thread(target=look_up, daemon=True)
    lookup.start()
    lookup.join(timeout_s)
    for family, kind, protocol, _, address in list(found):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.socket(family, kind, protocol) as connection:
                connection.settimeout(left)
                connection.connect(address)
                return True
        except OSError:  # refused, no route, timed out: the next address
            continue
    return False


def hub_host() -> str:
    from huggingface_hub import constants

    return urlsplit(constants.ENDPOINT).hostname or constants.ENDPOINT


def local_files_only(requested: bool, *names: str) -> bool:
    """What to pass as `local_files_only` when loading `names` (local paths or hub ids): as requested, or
    True when one of them is a hub id and the hub cannot be reached (the cache alone, no retries)."""
    return requested or (any(not os.path.isdir(os.path.expanduser(name)) for name in names) and not hub_reachable())


def expand_home(name: str) -> str:
    """`~/models/x` as the directory it names (the hub clients would take it for a hub id)."""
    return os.path.expanduser(name) if name.startswith("~") else name


def looks_like_a_path(text: str) -> bool:
    """A file system path rather than a hub id ("org/name") or another option's text: absolute, or
    relative by ./ ../ ~, or with more than one '/'."""
    return os.path.isabs(text) or text.startswith(("./", "../", "~")) or text.count("/") > 1


def missed_offline(err: BaseException) -> bool:
    """Whether a load error is the hub client's "not in the cache, and no network to fetch it" (its own
    error class, or transformers' words for it), here or in what it was raised from."""
    return in_cause_chain(err, lambda seen: type(seen).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
                          or "couldn't connect to" in str(seen))


def offline_note() -> str:
    """Said in a load error when the files were looked for in the hub cache alone: why (the user's HF_HUB_OFFLINE,
    or a hub that cannot be reached), and the way to the hub; empty when the hub was asked."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # the user's setting: the network may be fine
        return ("HF_HUB_OFFLINE is set, so only the hub cache is read, and the files are not in it (to download them, "
                "unset HF_HUB_OFFLINE on a machine that can reach the hub). ")
    return "" if hub_reachable() else (f"The hub ({hub_host()}) cannot be reached from this machine, and the files are not "
                                      "in its cache. ")
