"""The run store: one place where every process of a run appends its records -- the prompt ledger,
metrics and events -- as streams of JSON records, and from which `watch`, the audit and resumed runs
read them back.

    store = open_store(cfg.store.url, cfg.output_dir, cfg.name)   # files by default, Redis when a URL is set
    store.append("ledger", {"event": "consumed", "iteration": 3, "rank": 0})
    store.read("ledger")

Files (`store.url: null`): `<run dir>/<stream>.jsonl`, each record written with one O_APPEND write under
an exclusive lock, so concurrent processes never interleave or lose lines. Redis (`redis://host:port/db`):
one Redis stream per run and stream (`dmdr:<run>:<stream>`); records are buffered and retried while Redis
is away (a restart does not stop the run), and each carries a unique id so that a write retried after a
lost reply is not counted twice. A resumed run appends to the same records.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import parse_qsl, quote, urlencode, urlparse

log = logging.getLogger(__name__)

STREAMS = ("ledger", "metrics", "events")
URL_SCHEMES = ("redis", "rediss", "unix")


class StoreError(RuntimeError):
    """A store that cannot be opened or written; the message names the URL or path."""


PASSWORD_ENV = "DMDR_RL_STORE_PASSWORD"  # Redis's password, kept out of store.url (and so out of config.yaml)


REDACTED = "***"


def _rebuild(parsed, netloc: str, query: str) -> str:
    """urlunparse, but keeping `scheme://` when the host part is empty (unix:///path/to/socket)."""
    url = f"{parsed.scheme}://{netloc}{parsed.path}"
    return url + (f";{parsed.params}" if parsed.params else "") + (f"?{query}" if query else "") + (
        f"#{parsed.fragment}" if parsed.fragment else "")


def redact_url(url: str | None) -> str | None:
    """`url` with its password (in the user part or a `password=` query field) shown as ***: what configs,
    logs and errors carry."""
    if not url:
        return url
    parsed = urlparse(url)
    netloc = parsed.netloc
    if parsed.password:
        netloc = f"{parsed.username or ''}:{REDACTED}@{netloc.rpartition('@')[2]}"
    fields = parse_qsl(parsed.query, keep_blank_values=True)
    if netloc == parsed.netloc and not any(k == "password" for k, _ in fields):
        return url
    query = urlencode([(k, REDACTED if k == "password" else v) for k, v in fields], safe="*/") if fields else parsed.query
    return _rebuild(parsed, netloc, query)


def _connect_url(url: str) -> str:
    """The URL to connect with: the password from DMDR_RL_STORE_PASSWORD unless the URL has one of its own
    (*** is a redacted one, e.g. from a run's config.yaml, and does not count)."""
    parsed, password = urlparse(url), os.environ.get(PASSWORD_ENV)
    fields = parse_qsl(parsed.query, keep_blank_values=True)
    in_query = [v for k, v in fields if k == "password" and v != REDACTED]
    given = (parsed.password and parsed.password != REDACTED) or in_query
    if given or not password:
        return url
    host = parsed.netloc.rpartition("@")[2]
    if parsed.scheme == "unix" or any(k == "password" for k, _ in fields):  # a socket path has no user part
        fields = [(k, v) for k, v in fields if k != "password"] + [("password", password)]
        netloc = host if parsed.password == REDACTED else parsed.netloc
        return _rebuild(parsed, netloc, urlencode(fields))
    return _rebuild(parsed, f"{parsed.username or ''}:{quote(password, safe='')}@{host}", parsed.query)


# what a run leaves in its directory: its streams (files store), config and outputs
RUN_FILES = ("metrics.jsonl", "ledger.jsonl", "events.jsonl", "store-unflushed.jsonl", "config.yaml",
             "checkpoints", "samples", "eval", "tensorboard", "ray_train", "train_summary.json")


def set_aside_earlier_run(run_dir: str | Path) -> Path | None:
    """Before a fresh (not resumed) run writes anything: an earlier run's files in the same directory move
    to `previous/<time>/` (a run directory of its own, config.yaml included), so the new run's metrics,
    ledger and `checkpoints/latest` are its own alone. Files that are not a run's stay where they are."""
    run_dir = Path(run_dir)
    old = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not old:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    destination, suffix = run_dir / "previous" / stamp, 1
    while destination.exists():
        destination, suffix = run_dir / "previous" / f"{stamp}-{suffix}", suffix + 1
    destination.mkdir(parents=True)
    for path in old:
        path.rename(destination / path.name)
    print(f"dmdr_rl: {run_dir} held an earlier run: its files moved to {destination}", flush=True)
    return destination


def check_store_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in URL_SCHEMES or (parsed.scheme != "unix" and not parsed.hostname):
        raise ValueError(f"store.url {redact_url(url)!r} is not a Redis URL: use redis://HOST:PORT/DB (e.g. redis://127.0.0.1:6380/0), "
                         "rediss:// for TLS, unix:///path/to/redis.sock, or null for files in the run directory")
    try:
        parsed.port
    except ValueError:
        raise ValueError(f"store.url {redact_url(url)!r}: the port must be a number from 0 to 65535 "
                         "(e.g. redis://127.0.0.1:6380/0)") from None
    return url


def new_record(record: dict) -> dict:
    return {"id": uuid.uuid4().hex, "time": round(time.time(), 3), **record}


@contextmanager
def run_events(store, **started: object) -> Iterator[dict]:
    """Brackets a training run on the store's `events` stream: `started` (with `started`'s fields) on entry,
    then `finished`, `failed` (with the error) or `stopped` (Ctrl-C) on exit. The body fills the yielded
    dict with the fields every ending carries (e.g. the generator step reached)."""
    store.append("events", {"event": "started", **started})
    ending: dict = {}
    try:
        yield ending
    except KeyboardInterrupt:
        store.append("events", {"event": "stopped", **ending})
        raise
    except BaseException as err:
        store.append("events", {"event": "failed", **ending, "error": f"{type(err).__name__}: {err}"[:2000]})
        raise
    store.append("events", {"event": "finished", **ending})


def unique(records: Iterable[dict]) -> list[dict]:
    """Records in order, each id once (a retried write may have landed twice)."""
    seen, out = set(), []
    for record in records:
        key = record.get("id")
        if key is None or key not in seen:
            seen.add(key)
            out.append(record)
    return out


class FileStore:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.location = str(self.run_dir)

    def path(self, stream: str) -> Path:
        return self.run_dir / f"{stream}.jsonl"

    def append(self, stream: str, record: dict) -> None:
        line = (json.dumps(new_record(record)) + "\n").encode()
        fd = os.open(self.path(stream), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
        finally:
            os.close(fd)  # closing releases the lock

    def read(self, stream: str) -> list[dict]:
        path = self.path(stream)
        if not path.exists():
            return []
        with path.open("rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # no write is half done while we read
            data = f.read().decode()
        lines = data.split("\n")
        if lines and lines[-1] and not data.endswith("\n"):
            lines = lines[:-1]  # a record cut short (e.g. a full disk) is not a record
        records = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise StoreError(f"{path}:{number} is not a JSON record ({err})") from err
        return unique(records)

    def require_new(self) -> None:
        """Nothing to check: `set_aside_earlier_run` has already moved an earlier run's files away."""

    def flush(self, timeout_s: float = 0.0) -> bool:
        return True

    def close(self) -> None:
        pass


class RedisStore:
    """Redis streams with a write buffer: `append` never blocks on Redis; a background thread sends
    what is buffered and keeps retrying (with backoff) while Redis is unreachable."""

    RETRY_S = (0.2, 5.0)

    def __init__(self, url: str, run: str, run_dir: str | Path | None = None, connect_timeout_s: float = 5.0):
        import redis

        try:
            check_store_url(url)
        except ValueError as err:
            raise StoreError(str(err)) from None
        self.url, self.run = redact_url(url), run  # what messages show
        self.location = self.url
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.client = redis.Redis.from_url(_connect_url(url), socket_connect_timeout=connect_timeout_s,
                                           socket_timeout=10.0)
        try:
            self.client.ping()
        except redis.RedisError as err:
            raise StoreError(f"cannot reach the run store at {self.url} ({type(err).__name__}: {err}); start Redis there "
                             f"or fix store.url (null keeps the records in the run directory; a password goes in "
                             f"{PASSWORD_ENV})") from err
        self._buffer: collections.deque[tuple[str, str]] = collections.deque()  # (stream, record as JSON)
        self._lock = threading.Lock()
        self._work = threading.Event()  # set by append: there is something to send
        self._hurry = threading.Event()  # set by flush/close: cut a retry wait short
        self._drained = threading.Condition(self._lock)
        self._closed = False
        self.failed_flushes = 0
        self._thread = threading.Thread(target=self._flush_forever, name="run-store-flush", daemon=True)
        self._thread.start()

    def key(self, stream: str) -> str:
        return f"dmdr:{self.run}:{stream}"

    def existing_streams(self) -> list[str]:
        return [s for s in STREAMS if self.client.exists(self.key(s))]

    def require_new(self) -> None:
        """A fresh run must not mix its records with another run's of the same name."""
        existing = self.existing_streams()
        if existing:
            raise StoreError(f"the run store {self.url} already holds records of a run named {self.run!r} "
                             f"({', '.join(existing)}): give this run another name=..., or resume that run "
                             "(trainer.resume_from=...)")

    def append(self, stream: str, record: dict) -> None:
        # encoded once, here: a record JSON cannot hold fails in its writer, as with files
        entry = (stream, json.dumps(new_record(record)))
        with self._lock:
            if not self._closed:
                self._buffer.append(entry)
                self._work.set()
                return
        self._save_unflushed([entry])  # after close: kept on disk, never dropped

    def read(self, stream: str) -> list[dict]:
        entries = self.client.xrange(self.key(stream))
        return unique(json.loads(fields[b"json"]) for _, fields in entries)

    def runs(self) -> list[str]:
        return sorted({k.decode().split(":")[1] for k in self.client.scan_iter("dmdr:*:*")})

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything appended so far is in Redis (False if `timeout_s` ran out first)."""
        deadline = time.monotonic() + timeout_s
        self._hurry.set()
        with self._lock:
            while self._buffer and time.monotonic() < deadline:
                self._drained.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            return not self._buffer

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush, then stop; records Redis never got are saved next to the run, not dropped."""
        self.flush(timeout_s)
        with self._lock:
            self._closed = True
            pending = list(self._buffer)
            self._buffer.clear()
        self._work.set()
        self._hurry.set()
        self._thread.join(timeout=5)
        if pending:
            self._save_unflushed(pending)

    def _save_unflushed(self, entries: list[tuple[str, str]]) -> None:
        target = (self.run_dir or Path(".")) / "store-unflushed.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a") as f:
            for stream, text in entries:
                f.write(json.dumps({"stream": stream, **json.loads(text)}) + "\n")
        log.error("run store %s: %d records could not be sent; saved to %s", self.url, len(entries), target)

    def _flush_forever(self) -> None:
        import redis

        wait = self.RETRY_S[0]
        while True:
            self._work.wait()
            with self._lock:
                if self._closed:
                    return
                batch = list(self._buffer)
                if not batch:
                    self._work.clear()
                    continue
            try:
                pipe = self.client.pipeline(transaction=False)
                for stream, text in batch:
                    pipe.xadd(self.key(stream), {"json": text})
                pipe.execute()
            except Exception as err:  # noqa: BLE001 - Redis or not, the thread must live on and retry
                if not isinstance(err, redis.RedisError):
                    log.exception("run store %s: unexpected error while sending; retrying", self.url)
                self.failed_flushes += 1
                if self.failed_flushes == 1 or self.failed_flushes % 20 == 0:
                    log.warning("run store %s: %s; %d records buffered, retrying", self.url, err, len(batch))
                self._hurry.wait(wait)  # appends do not shorten the backoff; flush and close do
                self._hurry.clear()
                wait = min(2 * wait, self.RETRY_S[1])
                continue
            wait = self.RETRY_S[0]
            with self._lock:
                if self._closed:  # close() took the buffer (this batch too) meanwhile: nothing left to pop
                    return
                for _ in batch:
                    self._buffer.popleft()
                if not self._buffer:
                    self._work.clear()
                self._drained.notify_all()


def open_store(url: str | None, run_dir: str | Path, run: str):
    """The run's store: files in `run_dir` when `url` is None, else Redis at `url` (records keyed by `run`)."""
    return FileStore(run_dir) if url is None else RedisStore(url, run, run_dir)
