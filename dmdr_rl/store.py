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
lost reply is not counted twice. Records Redis never got by the time the run closed are saved to
`<run dir>/store-unflushed.jsonl`, and reading the run with its directory counts them again. A resumed
run appends to the same records.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import math
import os
import re
import shutil
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
# scheme://user:password@ says unambiguously where its password ends when every @ of the URL is in the part
# urlparse reads as user and host (before any /, ? or #), and at most one is there. Any other @ (a password with
# an unencoded @, /, ? or #, or an @ in the path or query) leaves it to a guess, which shown or saved would leak
# a piece of the password one way and break the URL the other: such a URL is refused (check_store_url), and
# shown as its scheme alone (redact_url).
_USER_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^:@/?#]*):[^@/?#]*@")


def password_is_ambiguous(url: str) -> bool:
    """Whether the URL has an @ that urlparse would not read as the end of its user part (see above)."""
    _, separator, rest = url.partition("://")
    if not separator:
        return "@" in url
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    return authority.count("@") > 1 or "@" in rest[len(authority):]


def _rebuild(parsed, netloc: str, query: str) -> str:
    """urlunparse, but keeping `scheme://` when the host part is empty (unix:///path/to/socket)."""
    url = f"{parsed.scheme}://{netloc}{parsed.path}"
    return url + (f";{parsed.params}" if parsed.params else "") + (f"?{query}" if query else "") + (
        f"#{parsed.fragment}" if parsed.fragment else "")


def redact_url(url: str | None) -> str | None:
    """`url` with its password (in the user part or a `password=` query field) shown as ***: what configs,
    logs and errors carry. An ambiguous URL (`password_is_ambiguous`) is shown as `scheme://***`."""
    if not url:
        return url
    scheme, separator, _ = url.partition("://")
    hidden = f"{scheme}://{REDACTED}" if separator else REDACTED
    if password_is_ambiguous(url):
        return hidden
    url = _USER_PASSWORD.sub(lambda m: f"{m[1]}{m[2]}:{REDACTED}@", url, count=1)
    try:
        parsed = urlparse(url)
    except ValueError:  # e.g. an unclosed [IPv6 host: its query cannot be read for a password field
        return hidden if "password" in url else url
    fields = parse_qsl(parsed.query, keep_blank_values=True)
    if not any(k == "password" for k, _ in fields):
        return url
    return _rebuild(parsed, parsed.netloc, urlencode([(k, REDACTED if k == "password" else v) for k, v in fields], safe="*/"))


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
             "checkpoints", "samples", "eval", "tensorboard", "wandb", "ray_train", "train_summary.json",
             "train_partial.json")


@contextmanager
def written_whole(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; on success it replaces `path` in one step, so a
    crash or a reader never sees a file half written (a checkpoint's `latest`, a Parquet file, a summary)."""
    path = Path(path)
    pending = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield pending
        _fsync(pending)  # its bytes on disk before the name points at them (else a power cut can leave it empty)
        os.replace(pending, path)
        try:
            _fsync(path.parent)  # the rename itself
        except OSError:
            pass  # a file system that cannot sync a directory (some network mounts): the file is whole all the same
    finally:
        pending.unlink(missing_ok=True)


@contextmanager
def directory_written_whole(path: str | Path) -> Iterator[Path]:
    """Yields an empty temporary directory beside `path` to fill; on success it takes `path`'s place (an
    older `path` moved aside, then removed), so a checkpoint that `latest` names is never half written."""
    path = Path(path)
    pending, aside = (path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{kind}") for kind in ("tmp", "old"))
    shutil.rmtree(pending, ignore_errors=True)
    pending.mkdir(parents=True)
    try:
        yield pending
        for file in pending.rglob("*"):
            if file.is_file():
                _fsync(file)
        if path.exists():
            os.replace(path, aside)
        os.replace(pending, path)
        try:
            _fsync(path.parent)
        except OSError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        if aside.exists() and not path.exists():  # stopped between the two renames: the older one goes back
            os.replace(aside, path)
        shutil.rmtree(pending, ignore_errors=True)


def current_umask() -> int:
    """The process's umask, read where Linux tells it (os.umask only sets it: swapping it to read it would let
    another thread create a file under the wrong mask meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_states(path: str | Path) -> dict[Path, tuple[int, int]]:
    """(inode, mtime in ns) of every file under `path`: which of them a later write leaves as they were."""
    path = Path(path)
    return {p: (s.st_ino, s.st_mtime_ns) for p in path.rglob("*") if p.is_file() and (s := p.stat())} if path.is_dir() else {}


def readable_as_umask_allows(path: str | Path, leave: dict[Path, tuple[int, int]] | None = None) -> None:
    """`path`'s files (or the file itself) get the mode open() would have given them: safetensors writes
    through a temporary file of mode 0600 (safetensors#782), which would keep a checkpoint or an export from
    the other users of a shared volume, or from a container that runs as another user. `leave`: the
    `file_states` taken before writing into a directory that holds others' files too (those stay as they are)."""
    path = Path(path)
    mode = 0o666 & ~current_umask()
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        if leave is None or file not in leave or leave[file] != ((s := file.stat()).st_ino, s.st_mtime_ns):
            os.chmod(file, mode)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_whole(path: str | Path, text: str) -> None:
    with written_whole(path) as pending:
        pending.write_text(text)


def json_text(value: object, indent: int | None = 2) -> str:
    """Strict JSON (what jq, JavaScript and other readers accept): a non-finite number (a mean over no
    finite score, a diverged loss) is written as null, not as Python's bare NaN or Infinity."""
    return json.dumps(_finite_or_none(value), indent=indent, allow_nan=False) + "\n"


def _finite_or_none(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def write_json_whole(path: str | Path, value: object) -> None:
    """A report or summary as strict JSON, written in one step (see `written_whole`)."""
    write_text_whole(path, json_text(value))


EARLIER_RUNS = "previous"  # where a run directory's earlier runs are set aside, each a run directory of its own


def set_aside_earlier_run(run_dir: str | Path) -> Path | None:
    """Before a fresh (not resumed) run writes anything: an earlier run's files in the same directory move
    to `previous/<time>/` (a run directory of its own, config.yaml included), so the new run's metrics,
    ledger and `checkpoints/latest` are its own alone. Files that are not a run's stay where they are."""
    run_dir = Path(run_dir)
    old = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not old:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    destination, suffix = run_dir / EARLIER_RUNS / stamp, 1
    while destination.exists():
        destination, suffix = run_dir / EARLIER_RUNS / f"{stamp}-{suffix}", suffix + 1
    destination.mkdir(parents=True)
    for path in old:
        path.rename(destination / path.name)
    print(f"dmdr_rl: {run_dir} held an earlier run: its files moved to {destination}", flush=True)
    return destination


class RunLock:
    """A training run's hold on its directory, from its start to its store's close (or the process's end):
    a second run started in the same directory while the first is running would set the first run's files
    aside and then receive its records. Readers (`watch`, `sample`) take no lock; `watch` only asks
    whether it is held (`held`)."""

    NAME = ".run.lock"
    PROBE_WAIT_S = 0.5  # how long a starting run waits out a reader's probe (`held`) before it is refused

    def __init__(self, run_dir: str | Path):
        path = Path(run_dir) / self.NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.PROBE_WAIT_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(self.fd)
                self.fd = None
                raise StoreError(f"another run is writing to {run_dir} right now: wait for it to end, or give this "
                                 "run another output.dir") from None

    @classmethod
    def held(cls, run_dir: str | Path) -> bool | None:
        """Whether a live process holds `run_dir`'s lock; None when that cannot be told (no lock file: a run
        from before the lock, or none). The probe takes a shared lock and lets go of it at once, and a run
        starting in that instant waits it out, so asking never disturbs a run."""
        try:
            fd = os.open(Path(run_dir) / cls.NAME, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without flock
            return None
        finally:
            os.close(fd)  # closing releases the probe's lock
        return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def check_store_url(url: str) -> str:
    if password_is_ambiguous(url):
        raise ValueError(f"store.url {redact_url(url)!r}: an @ outside its user part (a password with an unencoded "
                         "@, /, ? or #, or an @ in the path or query) leaves where the password ends to a guess: "
                         f"percent-encode those characters (@ %40, / %2F, ? %3F, # %23), or better, give the password "
                         f"in {PASSWORD_ENV}")
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


def _after_last_whole_line(fd: int) -> int:
    """The file's length once a last line without its newline (a record cut short) is cut off."""
    end = os.lseek(fd, 0, os.SEEK_END)
    if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
        return end
    whole = os.pread(fd, end, 0).rfind(b"\n") + 1  # rare (after a full disk): the whole file is read once
    os.ftruncate(fd, whole)
    return whole


def append_whole_lines(path: Path, lines: bytes) -> None:
    """Appends `lines` (each ending in a newline) all or none, under an exclusive lock: a write cut short (a full
    disk) is undone and raised, and a last line an earlier write left cut short is dropped first, so a new
    record never joins it."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        end = _after_last_whole_line(fd)
        written = os.write(fd, lines)
        if written != len(lines):
            os.ftruncate(fd, end)
            what = "a record" if lines.count(b"\n") == 1 else "records"
            raise StoreError(f"{path}: only {written} of {len(lines)} bytes of {what} could be written (is the disk "
                             "full?)")
    finally:
        os.close(fd)  # closing releases the lock


def read_jsonl(path: Path) -> list[dict]:
    """The records of one JSON-lines file ([] when there is none), read under a shared lock so that no
    write is half done; a last record cut short (e.g. a full disk) is not a record."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        raw = f.read()
    try:
        data = raw.decode()
    except UnicodeDecodeError as err:  # the store writes ASCII JSON: the file was damaged, or is not a stream
        line = raw[: err.start].count(b"\n") + 1
        raise StoreError(f"{path}:{line} is not a JSON record (not UTF-8 text)") from None
    lines = data.split("\n")
    if lines and lines[-1] and not data.endswith("\n"):
        lines = lines[:-1]
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise StoreError(f"{path}:{number} is not a JSON record ({err})") from err
    return records


def merge_by_time(ordered: list[dict], late: list[dict]) -> list[dict]:
    """`ordered` kept in its own order, with each of `late` placed before the first record written after
    it (by the `time` every record carries; on a tie, after: a late record was saved after everything
    its writer had sent, and times are rounded to the millisecond)."""
    late = sorted(late, key=lambda r: r.get("time", 0.0))
    out, i = [], 0
    for record in ordered:
        while i < len(late) and late[i].get("time", 0.0) < record.get("time", 0.0):  # a tie: after (times are ms)
            out.append(late[i])
            i += 1
        out.append(record)
    return out + late[i:]


class FileStore:
    run_lock: RunLock | None = None  # a training run's (see open_run_directory), released by close()

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.location = str(self.run_dir)

    def path(self, stream: str) -> Path:
        return self.run_dir / f"{stream}.jsonl"

    def append(self, stream: str, record: dict) -> None:
        """One whole line or none: a write cut short (a full disk) is undone and raised, and a record an
        earlier write left cut short is dropped first, so the next record never joins it."""
        append_whole_lines(self.path(stream), json_text(new_record(record), indent=None).encode())

    def read(self, stream: str) -> list[dict]:
        return unique(read_jsonl(self.path(stream)))

    def require_new(self) -> None:
        """Nothing to check: `set_aside_earlier_run` has already moved an earlier run's files away."""

    def flush(self, timeout_s: float = 0.0) -> bool:
        return True

    def close(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()


class RedisStore:
    """Redis streams with a write buffer: `append` never blocks on Redis; a background thread sends
    what is buffered and keeps retrying (with backoff) while Redis is unreachable."""

    RETRY_S = (0.2, 5.0)
    run_lock: RunLock | None = None  # a training run's (see open_run_directory), released by close()
    _claim: str | None = None  # the token of this run's claim on its name (require_new)

    def __init__(self, url: str, run: str, run_dir: str | Path | None = None, connect_timeout_s: float = 5.0,
                 joining: bool = False):
        """`joining`: a process that joins a run already started (a learner after a restart), whose store
        was reachable when the run began: an outage now is waited out like one mid-run (records buffered
        and retried), not an error. Otherwise an unreachable store stops the caller at once."""
        import redis

        try:
            check_store_url(url)
        except ValueError as err:
            raise StoreError(str(err)) from None
        self.url, self.run = redact_url(url), run  # what messages show
        self.location = self.url
        self.run_dir = Path(run_dir) if run_dir is not None else None
        try:
            self.client = redis.Redis.from_url(_connect_url(url), socket_connect_timeout=connect_timeout_s,
                                               socket_timeout=10.0)
        except ValueError as err:  # e.g. ?socket_timeout=x
            raise StoreError(f"store.url {self.url!r}: {err}") from None
        try:
            self.client.ping()
        except redis.RedisError as err:
            if not joining:
                raise StoreError(f"cannot reach the run store at {self.url} ({type(err).__name__}: {err}); start Redis "
                                 f"there or fix store.url (null keeps the records in the run directory; a password goes "
                                 f"in {PASSWORD_ENV})") from err
            log.warning("run store %s unreachable for now (%s); its records wait and are sent when it is back",
                        self.url, type(err).__name__)
        self._buffer: collections.deque[tuple[str, str]] = collections.deque()  # (stream, record as JSON)
        self._refused: dict[tuple[str, str], int] = {}  # how often Redis refused a buffered record
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

    @contextmanager
    def _reading(self, what: str):
        """A Redis error while reading is a StoreError (a reader such as `watch` says so and keeps going)."""
        import redis

        try:
            yield
        except redis.RedisError as err:
            raise StoreError(f"cannot read {what} from the run store at {self.url} ({type(err).__name__}: {err})") from err

    def existing_streams(self) -> list[str]:
        with self._reading(f"the records of {self.run!r}"):
            return [s for s in STREAMS if self.client.exists(self.key(s))]

    CLAIM_S = 600  # how long a fresh run's claim on its name outlives a start that died before its close()

    def require_new(self) -> None:
        """A fresh run must not mix its records with another run's of the same name, also one starting at
        the same moment: the name is claimed atomically (SET NX), until this store closes."""
        existing = self.existing_streams()
        if existing:
            raise StoreError(f"the run store {self.url} already holds records of a run named {self.run!r} "
                             f"({', '.join(existing)}): give this run another name=..., or resume that run "
                             "(trainer.resume_from=...)")
        token = uuid.uuid4().hex
        with self._reading(f"the claim on {self.run!r}"):
            claimed = self.client.set(self.key("claim"), token, nx=True, ex=self.CLAIM_S)
        if not claimed:
            raise StoreError(f"another run named {self.run!r} is starting against the run store {self.url} (its claim "
                             f"{self.key('claim')} lasts until it ends, or {self.CLAIM_S} s after a crash): give this "
                             "run another name=...")
        self._claim = token

    def append(self, stream: str, record: dict) -> None:
        # encoded once, here: a record JSON cannot hold fails in its writer, as with files
        entry = (stream, json_text(new_record(record), indent=None).rstrip("\n"))
        with self._lock:
            if not self._closed:
                self._buffer.append(entry)
                self._work.set()
                return
        self._save_unflushed([entry])  # after close: kept on disk, never dropped

    UNFLUSHED = "store-unflushed.jsonl"

    def read(self, stream: str) -> list[dict]:
        """The stream as Redis holds it, plus the records this run saved next to itself because Redis never
        got them (see close): an audit after an outage at shutdown still counts them."""
        with self._reading(self.key(stream)):
            entries = self.client.xrange(self.key(stream))
        records = [json.loads(fields[b"json"]) for _, fields in entries]
        saved = [{k: v for k, v in r.items() if k not in ("run", "stream")} for r in self._unflushed()
                 if r.get("stream") == stream and r.get("run", self.run) == self.run]  # a watched name's, not the cwd's
        return unique(merge_by_time(records, saved) if saved else records)

    def _unflushed(self) -> list[dict]:
        return read_jsonl(self.run_dir / self.UNFLUSHED) if self.run_dir is not None else []

    def runs(self) -> list[str]:
        with self._reading("the run names"):
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
        self._release_claim()
        if self.run_lock is not None:
            self.run_lock.release()

    def _release_claim(self) -> None:
        """Deletes this run's claim on its name (only its own: compared and deleted in one script)."""
        import redis

        if self._claim is None:
            return
        try:
            self.client.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
                             1, self.key("claim"), self._claim)
        except redis.RedisError:
            pass  # it expires by itself
        self._claim = None

    def _save_unflushed(self, entries: list[tuple[str, str]]) -> None:
        target = (self.run_dir or Path(".")) / self.UNFLUSHED
        target.parent.mkdir(parents=True, exist_ok=True)
        append_whole_lines(target, "".join(json.dumps({"run": self.run, "stream": stream, **json.loads(text)}) + "\n"
                                           for stream, text in entries).encode())
        log.error("run store %s: %d records could not be sent; saved to %s", self.url, len(entries), target)

    REFUSALS_KEPT = 10  # times Redis may refuse one record (WRONGTYPE, NOPERM, OOM) before it is saved beside the run

    def _keep_refused(self, batch: list[tuple[str, str]], refusals: list[tuple[tuple[str, str], Exception]]) -> None:
        """After a send in which Redis refused some records: the others are in, so only the refused stay
        buffered (re-sending the rest would store them again); one refused REFUSALS_KEPT times is saved
        to store-unflushed.jsonl (read back with the stream, as at close) instead of growing the buffer for ever."""
        given_up = []
        with self._lock:
            if self._closed:  # close() took the buffer meanwhile and saves it
                return
            for entry in batch:
                self._buffer.popleft()
            refused_now = {entry for entry, _ in refusals}
            for entry in [e for e in self._refused if e not in refused_now]:  # went in this time
                del self._refused[entry]
            kept = []
            for entry, err in refusals:
                self._refused[entry] = self._refused.get(entry, 0) + 1
                if self._refused[entry] >= self.REFUSALS_KEPT:
                    given_up.append((entry, err))
                    del self._refused[entry]
                else:
                    kept.append(entry)
            self._buffer.extendleft(reversed(kept))  # in their order, before what came since
            if given_up:  # (saved before a flush waiting on the buffer can return)
                log.error("run store %s refused %d records %d times (%s)", self.url, len(given_up),
                          self.REFUSALS_KEPT, given_up[0][1])
                self._save_unflushed([entry for entry, _ in given_up])
            self._drained.notify_all()

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
                # (a connection error still raises; a command Redis refused is its result, the others went in)
                results = pipe.execute(raise_on_error=False)
                refusals = [(entry, result) for entry, result in zip(batch, results) if isinstance(result, Exception)]
                if refusals:
                    self._keep_refused(batch, refusals)
                    raise refusals[0][1]
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
                self._refused.clear()  # (every record went in)
                if not self._buffer:
                    self._work.clear()
                self._drained.notify_all()


def open_store(url: str | None, run_dir: str | Path, run: str, joining: bool = False):
    """The run's store: files in `run_dir` when `url` is None, else Redis at `url` (records keyed by `run`;
    `joining`: see RedisStore)."""
    return FileStore(run_dir) if url is None else RedisStore(url, run, run_dir, joining=joining)
