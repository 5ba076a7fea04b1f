"""The run store on files and on a real redis-server (started here on a free loopback port): records
round-trip, many processes append without loss or duplicates, a Redis restart mid-run loses nothing,
and bad URLs or an unreachable Redis fail with the URL in the message."""

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from dmdr_rl.config import ConfigError, load_config
from dmdr_rl.store import FileStore, RedisStore, StoreError, open_store, run_events
from conftest import tiny_run


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    def __init__(self, directory):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
        self.port, self.directory, self.process = _free_port(), directory, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                redis.Redis(port=self.port).ping()
                return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        self.process.terminate()  # SIGTERM: Redis flushes its append-only file and exits
        self.process.wait(timeout=20)


@pytest.fixture
def redis_server(tmp_path):
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    yield server
    if server.process.poll() is None:
        server.stop()


def _stores(tmp_path, redis_server, run="run-a"):
    return {"files": FileStore(tmp_path / run), "redis": RedisStore(redis_server.url, run, tmp_path / run)}


def test_records_round_trip_and_a_reopened_store_continues_them(tmp_path, redis_server):
    for name, store in _stores(tmp_path, redis_server).items():
        store.append("ledger", {"event": "issued", "iteration": 0, "rank": 0})
        store.append("metrics", {"step": 1, "loss/dmd": 0.5})
        store.close()
        reopened = open_store(None if name == "files" else redis_server.url, tmp_path / "run-a", "run-a")
        reopened.append("ledger", {"event": "consumed", "iteration": 0, "rank": 0})
        reopened.close()
        ledger = reopened.read("ledger")
        assert [r["event"] for r in ledger] == ["issued", "consumed"], name
        assert len({r["id"] for r in ledger}) == 2 and all("time" in r for r in ledger)
        assert reopened.read("metrics")[0]["loss/dmd"] == 0.5
        assert reopened.read("events") == []


def _append_many(url, run_dir, writer, count):
    store = open_store(url, run_dir, "many")
    for seq in range(count):
        store.append("ledger", {"event": "consumed", "writer": writer, "seq": seq})
    store.close()


@pytest.mark.parametrize("backend", ["files", "redis"])
def test_many_processes_append_to_one_ledger_without_loss_or_duplicates(tmp_path, request, backend):
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None  # files: no server
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_many, args=(url, tmp_path / "many", w, 150)) for w in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
        assert process.exitcode == 0
    records = open_store(url, tmp_path / "many", "many").read("ledger")
    assert sorted((r["writer"], r["seq"]) for r in records) == [(w, s) for w in range(4) for s in range(150)]
    for w in range(4):  # each writer's records keep their order
        assert [r["seq"] for r in records if r["writer"] == w] == list(range(150))


def test_a_redis_restart_mid_run_loses_nothing(tmp_path, redis_server):
    store = RedisStore(redis_server.url, "restart", tmp_path)
    stop, appended = threading.Event(), []

    def write():
        while not stop.is_set():
            store.append("metrics", {"step": len(appended)})
            appended.append(len(appended))
            time.sleep(0.005)

    writer = threading.Thread(target=write)
    writer.start()
    while len(store.read("metrics")) < 50:
        time.sleep(0.01)
    redis_server.stop()
    at_stop = len(appended)
    time.sleep(1.0)
    assert len(appended) > at_stop + 20  # the run kept appending while Redis was down
    redis_server.start()
    time.sleep(0.5)
    stop.set()
    writer.join(timeout=60)
    store.close()
    assert store.failed_flushes > 0  # Redis really was away while the run wrote
    assert store.failed_flushes < 20  # retries back off instead of one attempt per append
    assert [r["step"] for r in store.read("metrics")] == list(range(len(appended)))
    assert not (tmp_path / "store-unflushed.jsonl").exists()


def test_records_redis_refuses_are_not_sent_again_with_the_others_and_end_up_beside_the_run(tmp_path, redis_server,
                                                                                           monkeypatch):
    """A command Redis refuses (here WRONGTYPE: the metrics key holds a string) while the others in the same
    send go in: only the refused records stay buffered (the rest are not stored twice), and after
    REFUSALS_KEPT refusals they are saved beside the run, where reading the stream finds them."""
    import redis

    monkeypatch.setattr(RedisStore, "RETRY_S", (0.01, 0.02))
    monkeypatch.setattr(RedisStore, "REFUSALS_KEPT", 3)
    redis.Redis.from_url(redis_server.url).set("dmdr:refused:metrics", "not a stream")
    store = RedisStore(redis_server.url, "refused", tmp_path)
    for i in range(3):
        store.append("ledger", {"event": "issued", "iteration": i})
        store.append("metrics", {"step": i})
    assert store.flush(timeout_s=10)  # drained: the metrics records given up on, not buffered for ever
    assert store.failed_flushes >= 2  # (the third refusal drains the buffer before it is counted)
    raw = redis.Redis.from_url(redis_server.url).xrange("dmdr:refused:ledger")
    assert len(raw) == 3  # each ledger record once, though it shared its sends with refused ones
    saved = [json.loads(line) for line in (tmp_path / "store-unflushed.jsonl").read_text().splitlines()]
    assert [(r["stream"], r["step"]) for r in saved] == [("metrics", 0), ("metrics", 1), ("metrics", 2)]
    with pytest.raises(StoreError, match="WRONGTYPE"):  # (reading the key fails the same way: named)
        store.read("metrics")
    redis.Redis.from_url(redis_server.url).delete("dmdr:refused:metrics")
    assert [r["step"] for r in store.read("metrics")] == [0, 1, 2]  # read back from beside the run
    store.close()


def test_a_record_redis_refused_for_a_while_goes_in_once_it_can_and_its_count_is_forgotten(tmp_path, redis_server,
                                                                                             monkeypatch):
    import redis

    monkeypatch.setattr(RedisStore, "RETRY_S", (0.01, 0.02))
    client = redis.Redis.from_url(redis_server.url)
    client.set("dmdr:later:metrics", "not a stream")
    store = RedisStore(redis_server.url, "later", tmp_path)
    store.append("metrics", {"step": 1})
    deadline = time.monotonic() + 10
    while store.failed_flushes < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.failed_flushes >= 2 and len(store._refused) == 1  # refused twice, still buffered
    client.delete("dmdr:later:metrics")
    assert store.flush(timeout_s=10)
    assert [r["step"] for r in store.read("metrics")] == [1] and store._refused == {}
    store.close()


def test_nothing_is_dropped_after_close_or_mixed_into_another_run(tmp_path, redis_server):
    store = RedisStore(redis_server.url, "closing", tmp_path)
    store.append("ledger", {"event": "issued"})
    store.close()
    store.append("ledger", {"event": "consumed"})  # too late for Redis: kept on disk instead
    saved = (tmp_path / "store-unflushed.jsonl").read_text()
    assert '"event": "consumed"' in saved and '"stream": "ledger"' in saved
    # read back with the run's directory (the audit, watch): the saved record counts, in its place
    reader = RedisStore(redis_server.url, "closing", tmp_path)
    assert [r["event"] for r in reader.read("ledger")] == ["issued", "consumed"]
    assert reader.read("metrics") == [] and {"run", "stream"}.isdisjoint(reader.read("ledger")[1])
    assert [r["event"] for r in RedisStore(redis_server.url, "closing").read("ledger")] == ["issued"]  # no directory
    other = RedisStore(redis_server.url, "a-new-name", tmp_path)  # another run's name: not its records
    assert other.read("ledger") == []
    other.close()
    reader.close()
    with pytest.raises(StoreError, match="already holds records of a run named 'closing' \\(ledger\\)"):
        RedisStore(redis_server.url, "closing").require_new()
    RedisStore(redis_server.url, "a-new-name").require_new()


def test_records_saved_beside_a_run_do_not_join_a_line_an_earlier_save_cut_short(tmp_path, redis_server):
    store = RedisStore(redis_server.url, "cut-save", tmp_path)
    store.close()
    store.append("ledger", {"event": "first"})
    with (tmp_path / "store-unflushed.jsonl").open("a") as f:
        f.write('{"run": "cut-save", "stream": "ledger", "ev')  # a save the disk cut short
    store.append("ledger", {"event": "second"})
    reader = RedisStore(redis_server.url, "cut-save", tmp_path)
    assert [r["event"] for r in reader.read("ledger")] == ["first", "second"]
    reader.close()


def test_a_record_cut_short_is_skipped_not_fatal(tmp_path):
    store = FileStore(tmp_path)
    store.append("metrics", {"step": 1})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"id": "x", "step": 2, "loss')  # a write cut short (disk full) or still in progress
    assert [r["step"] for r in store.read("metrics")] == [1]
    store.append("metrics", {"step": 3})  # drops the cut record first: the new one does not join it
    assert [r["step"] for r in store.read("metrics")] == [1, 3]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(StoreError, match="metrics.jsonl:2 is not a JSON record"):
        store.read("metrics")
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n{"step": 2, "note": "\xff"}\n')  # damaged: not UTF-8
    with pytest.raises(StoreError, match="metrics.jsonl:2 is not a JSON record \\(not UTF-8 text\\)"):
        store.read("metrics")


def test_a_write_the_disk_cuts_short_is_undone_and_raised(tmp_path):
    import resource
    import signal

    store = FileStore(tmp_path)
    store.append("metrics", {"step": 1})
    size = (tmp_path / "metrics.jsonl").stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20, hard))  # a full disk, 20 bytes into the next record
    try:
        with pytest.raises(StoreError, match=r"only 20 of \d+ bytes of a record could be written"):
            store.append("metrics", {"step": 2, "loss/dmd": 0.25})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert (tmp_path / "metrics.jsonl").stat().st_size == size
    store.append("metrics", {"step": 3})
    assert [r["step"] for r in store.read("metrics")] == [1, 3]


@pytest.mark.parametrize("raised, ending", [(None, "finished"), (ValueError("bad batch"), "failed"),
                                            (KeyboardInterrupt(), "stopped")])
def test_run_events_bracket_a_run_with_how_it_ended(tmp_path, raised, ending):
    store, propagated = FileStore(tmp_path), None
    try:
        with run_events(store, backend="local", max_steps=5) as fields:
            fields["generator_step"] = 3
            if raised is not None:
                raise raised
    except (ValueError, KeyboardInterrupt) as err:
        propagated = err
    assert propagated is raised  # re-raised, not swallowed
    events = store.read("events")
    assert [e["event"] for e in events] == ["started", ending]
    assert events[0]["backend"] == "local" and events[0]["max_steps"] == 5
    assert events[1]["generator_step"] == 3
    assert ("error" in events[1]) == (ending == "failed")
    if ending == "failed":
        assert events[1]["error"] == "ValueError: bad batch"


def test_bad_urls_and_an_unreachable_redis_name_the_url(tmp_path):
    with pytest.raises(ConfigError, match="store.url 'http://example.com' is not a Redis URL"):
        load_config("toy-dmdr", ["store.url=http://example.com"])
    with pytest.raises(StoreError, match="is not a Redis URL"):
        open_store("redis:///0", tmp_path, "x")
    url = f"redis://127.0.0.1:{_free_port()}/0"
    with pytest.raises(StoreError, match=f"cannot reach the run store at {url}"):
        open_store(url, tmp_path, "x")


def test_a_run_whose_redis_does_not_answer_leaves_no_run_directory_behind(tmp_path):
    from dmdr_rl.trainer import open_run_directory

    url, out = f"redis://127.0.0.1:{_free_port()}/0", tmp_path / "runs" / "new"  # nothing listens there
    cfg = load_config("toy-dmdr", [f"store.url={url}", f"output.dir={out}"])
    with pytest.raises(StoreError, match=f"cannot reach the run store at {url} .*start Redis there or fix store.url"):
        open_run_directory(cfg, out, fresh=True)
    assert not (tmp_path / "runs").exists()


def test_a_ray_run_whose_redis_does_not_answer_is_refused_before_ray_starts(tmp_path, monkeypatch):
    import dmdr_rl.distributed as distributed

    url = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    cfg = load_config("toy-demo", [f"store.url={url}", f"output.dir={tmp_path / 'run'}"])
    monkeypatch.setattr(distributed, "connect", lambda cfg: pytest.fail("Ray started before the store was reached"))
    with pytest.raises(StoreError, match=f"cannot reach the run store at {url} .*start Redis there or fix store.url"):
        distributed.train_distributed(cfg)
    assert not (tmp_path / "run").exists()


def test_a_training_run_writes_its_metrics_to_redis(tmp_path, redis_server):
    from dmdr_rl.trainer import LocalTrainer

    cfg = load_config("toy-dmdr", tiny_run(f"output.dir={tmp_path / 'run'}", f"store.url={redis_server.url}", "name=redis-run"))
    LocalTrainer(cfg).train()
    rows = RedisStore(redis_server.url, "redis-run").read("metrics")
    assert [r["step"] for r in rows] == [1, 2] and "loss/reward/toy-align" in rows[1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_watch_shows_a_run_from_files_or_redis_and_names_missing_runs(tmp_path, redis_server, capsys):
    from dmdr_rl.trainer import LocalTrainer
    from dmdr_rl.watch import main

    for url, name in ((None, "file-run"), (redis_server.url, "watched")):
        overrides = tiny_run("output.sample_every=2", f"output.dir={tmp_path / name}", f"name={name}",
                             *([f"store.url={url}"] if url else []))
        LocalTrainer(load_config("toy-dmdr", overrides)).train()
        main([str(tmp_path / name), "--once"])
        shown = capsys.readouterr().out
        assert "[finished] last logged at generator step 2/2" in shown and "loss/dmd=" in shown and "reward/toy-align=" in shown
        assert "newest samples:" in shown and (url or str(tmp_path)) in shown
    main(["watched", "--store", redis_server.url, "--once"])
    assert "generator step 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["nope", "--store", redis_server.url, "--once"])
    error = capsys.readouterr().err
    assert "no run named 'nope'" in error and "watched" in error  # the runs that do exist are listed
    with pytest.raises(SystemExit):
        main([str(tmp_path / "not-a-run"), "--once"])
    assert "is not a run directory" in capsys.readouterr().err


def test_a_training_run_goes_on_through_a_redis_restart_and_loses_no_metric(tmp_path, redis_server):
    from dmdr_rl.trainer import LocalTrainer

    cfg = load_config("toy-dmdr", tiny_run("trainer.max_steps=30", f"output.dir={tmp_path / 'run'}",
                                           f"store.url={redis_server.url}", "name=restarted"))
    trainer = LocalTrainer(cfg)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=trainer.train()))
    thread.start()
    reader = RedisStore(redis_server.url, "restarted")
    while len(reader.read("metrics")) < 5:
        time.sleep(0.05)
    redis_server.stop()
    stopped_at = trainer.generator_step
    time.sleep(1.5)
    assert trainer.generator_step > stopped_at  # training went on while Redis was down
    redis_server.start()
    thread.join(timeout=300)
    assert outcome["summary"]["generator_steps"] == 30
    reader = RedisStore(redis_server.url, "restarted")
    assert [r["step"] for r in reader.read("metrics")] == list(range(1, 31))
    assert [e["event"] for e in reader.read("events")] == ["started", "finished"]


def test_a_redis_password_stays_out_of_configs_and_messages(tmp_path, monkeypatch):
    from dmdr_rl.config import load_config
    from dmdr_rl.store import PASSWORD_ENV, _connect_url, redact_url
    from dmdr_rl.trainer import write_run_config

    assert redact_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("redis://user:s3cret@redis:6379/0") == "redis://user:***@redis:6379/0"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"
    assert redact_url("unix:///run/redis.sock?password=s3cret&db=1") == "unix:///run/redis.sock?password=***&db=1"
    assert redact_url("unix:///run/redis.sock") == "unix:///run/redis.sock"
    assert redact_url("redis://u:p:w@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://:p%40ss%2Fw@h:1/0?x=a%40b") == "redis://:***@h:1/0?x=a%40b"  # percent-encoded: plain
    # an @ outside the user part leaves where the password ends to a guess: refused, and shown as the scheme alone
    from dmdr_rl.config import ConfigError
    from dmdr_rl.store import check_store_url

    for url in ("redis://:s3cret/pw@10.0.0.5:6379/0", "redis://user:p#w@h:1/0", "redis://:pa?ss@host:6379/0",
                "redis://:p@ss@h:1/0?x=a@b", "redis://u:1234?x@host/0", "redis://:p@ss?word@127.0.0.1:6379/0",
                "redis://default:2024?k=v@redis.internal:6379/0", "redis://:pw@host?x@y", "redis://[::1]:6379?x@y",
                "redis://redis:6379/0?client_name=me@box"):
        assert redact_url(url) == "redis://***", url
        with pytest.raises(ConfigError, match=r"store.url 'redis://\*\*\*': an @ outside its user part .* percent-encode") as refused:
            load_config("toy-dmdr", [f"store.url={url}"])
        assert url[:12] not in str(refused.value) and "(got 'redis://***')" in str(refused.value)  # none of it shown
        with pytest.raises(ValueError):
            check_store_url(url)
    assert redact_url("redis://[::1:6379?password=x") == "redis://***"  # unreadable by urlparse, a password field
    write_run_config(load_config("toy-dmdr", ["store.url=redis://:s3cret@redis:6379/0"]), tmp_path)
    saved = (tmp_path / "config.yaml").read_text()
    assert "s3cret" not in saved and "redis://:***@redis:6379/0" in saved
    # the password then comes from the environment, also for a config.yaml's redacted URL (watch)
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    assert _connect_url("redis://:***@redis:6379/0") == _connect_url("redis://redis:6379/0") == "redis://:s3cret@redis:6379/0"
    assert _connect_url("unix:///run/redis.sock?password=***") == "unix:///run/redis.sock?password=s3cret"
    assert _connect_url("redis://:own@redis:6379/0") == "redis://:own@redis:6379/0"  # the URL's own wins
    with pytest.raises(StoreError, match=r"redis://:\*\*\*@127.0.0.1:1/0") as raised:
        open_store("redis://:s3cret@127.0.0.1:1/0", tmp_path, "run")
    assert "s3cret" not in str(raised.value)


def test_a_record_json_cannot_hold_fails_in_its_writer_and_the_store_goes_on(tmp_path, redis_server):
    for name, store in _stores(tmp_path, redis_server, run="bad-record").items():
        with pytest.raises(TypeError, match="not JSON serializable"):
            store.append("metrics", {"step": 1, "loss": object()})
        store.append("metrics", {"step": 2, "loss": 0.5})
        assert store.flush(10.0)
        assert [r["step"] for r in store.read("metrics")] == [2], name
        store.close()


def test_watch_names_a_damaged_run_instead_of_a_traceback(tmp_path, capsys):
    from dmdr_rl.trainer import write_run_config
    from dmdr_rl.watch import main

    write_run_config(load_config("toy-dmdr", [f"output.dir={tmp_path}"]), tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 1.0}\n{"step": 2, "ti\n{"step": 3, "time": 2.0}\n')
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--once"])
    assert exit_info.value.code == 2 and "metrics.jsonl:2" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 1.0, "loss/policy": 0.5, "rl/clipped": 0.25}\n')
    main([str(tmp_path), "--once"])  # (GRPO's rl/* metrics are shown too)
    assert "rl/clipped=0.25" in capsys.readouterr().out
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "time": 1.0}\n{"step": 2, "note": "\xff"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--once"])
    assert exit_info.value.code == 2 and "metrics.jsonl:2 is not a JSON record (not UTF-8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--interval", "nan"])
    assert "--interval must be >= 0.1 seconds, got nan" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("critic: {lora: 7}\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--once"])
    assert exit_info.value.code == 2 and "critic.lora" in capsys.readouterr().err


def test_watch_shows_the_error_of_a_run_that_failed_before_its_first_step(tmp_path, capsys):
    from dmdr_rl.trainer import write_run_config
    from dmdr_rl.watch import main

    write_run_config(load_config("toy-dmdr", [f"output.dir={tmp_path}"]), tmp_path)
    store = FileStore(tmp_path)
    store.append("events", {"event": "started"})
    store.append("events", {"event": "failed", "error": "RuntimeError: CUDA out of memory"})
    main([str(tmp_path), "--once"])
    shown = capsys.readouterr().out
    assert "failed: no generator step recorded" in shown and "error: RuntimeError: CUDA out of memory" in shown
    assert "waiting" not in shown


def test_watch_tells_a_killed_run_from_a_running_one_by_its_directory_lock(tmp_path):
    import os
    import signal
    import sys
    from pathlib import Path

    from dmdr_rl.store import RunLock
    from dmdr_rl.trainer import write_run_config
    from dmdr_rl.watch import snapshot

    write_run_config(load_config("toy-dmdr", [f"output.dir={tmp_path}"]), tmp_path)
    store = FileStore(tmp_path)
    store.append("events", {"event": "started"})
    text, ended, _ = snapshot(store, tmp_path, 10)  # no lock file (a run from before the lock): running, as before
    assert text.startswith("running: waiting") and not ended
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dmdr_rl.store import RunLock; "
                               f"RunLock({str(tmp_path)!r}); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert RunLock.held(tmp_path) is True
        text, ended, _ = snapshot(store, tmp_path, 10)
        assert text.startswith("running: waiting") and not ended
        store.append("metrics", {"step": 3})
        text, ended, _ = snapshot(store, tmp_path, 10)
        assert text.startswith("[running] last logged at generator step 3/10") and not ended
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert RunLock.held(tmp_path) is False
    text, ended, _ = snapshot(store, tmp_path, 10)
    assert text.startswith("[not running] last logged at generator step 3/10") and ended
    assert "its process ended without a final event (killed?)" in text
    assert "[running]" in snapshot(store, None, 10)[0]  # by name in a store (no directory): cannot tell


def test_a_run_starting_while_watch_probes_its_lock_waits_the_probe_out(tmp_path):
    import fcntl
    import os

    from dmdr_rl.store import RunLock

    RunLock(tmp_path).release()
    probe = os.open(tmp_path / RunLock.NAME, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # as RunLock.held does, held here a little longer
    threading.Timer(0.1, os.close, [probe]).start()
    RunLock(tmp_path).release()  # not "another run is writing"


def test_watch_measures_the_rate_since_a_learner_restart(tmp_path):
    from dmdr_rl.trainer import write_run_config
    from dmdr_rl.watch import snapshot

    write_run_config(load_config("toy-dmdr", [f"output.dir={tmp_path}"]), tmp_path)
    store = FileStore(tmp_path)
    # steps 1-6, a restart from the checkpoint of step 4, then steps 5-6 again (at 1 step/s throughout)
    for step, when in [(1, 0.0), (2, 1.0), (3, 2.0), (4, 3.0), (5, 4.0), (6, 5.0), (5, 10.0), (6, 11.0)]:
        store.append("metrics", {"step": step, "time": when})
    text = snapshot(store, tmp_path, 10).text
    assert "generator step 6/10   1.000 steps/s" in text
    # launched again at t=100 from its last step (no step repeats): the downtime is not counted either
    store.append("events", {"event": "started", "time": 100.0})
    for step, when in [(7, 101.0), (8, 102.0)]:
        store.append("metrics", {"step": step, "time": when})
    text = snapshot(store, tmp_path, 10).text
    assert "generator step 8/10   1.000 steps/s" in text and "evaluated" not in text


def test_watch_says_where_a_run_stopped_before_its_first_metrics_record(tmp_path):
    from dmdr_rl.trainer import write_run_config
    from dmdr_rl.watch import snapshot

    write_run_config(load_config("toy-dmdr", [f"output.dir={tmp_path}"]), tmp_path)
    store = FileStore(tmp_path)
    store.append("events", {"event": "started", "time": 1.0, "generator_step": 0})
    store.append("events", {"event": "stopped", "time": 9.0, "generator_step": 9})  # (Ctrl-C at step 9 of log_every 10)
    text, ended, _ = snapshot(store, tmp_path, 600)
    assert text.startswith("stopped: at generator step 9, before its first metrics record") and ended


def test_watch_says_its_step_is_the_last_logged_and_waits_for_a_resume_with_follow(tmp_path, capsys, monkeypatch):
    """The step shown is the last metrics record's (every output.log_every steps), with where a stopped run ended.
    A run stopped, then launched again (a resume) before it has written its `started` event: watch says how to
    follow it, and with --follow goes on watching instead of exiting."""
    from dmdr_rl import watch
    from dmdr_rl.trainer import write_run_config

    write_run_config(load_config("toy-dmdr", [f"output.dir={tmp_path}", "trainer.max_steps=60"]), tmp_path)
    store = FileStore(tmp_path)
    store.append("events", {"event": "started", "time": 1.0, "generator_step": 0, "max_steps": 60})
    for step in (10, 20):
        store.append("metrics", {"step": step, "time": 1.0 + step})
    store.append("events", {"event": "stopped", "time": 30.0, "generator_step": 25})
    shown = watch.snapshot(store, tmp_path, 60)
    assert shown.text.startswith("[stopped] last logged at generator step 20/60 (stopped at step 25)")
    assert shown.ended and shown.state == "stopped"
    watch.main([str(tmp_path), "--interval", "0.1"])  # live: it ends at once, and says how to follow a resume
    assert "the run is stopped, so watching ends here" in capsys.readouterr().out
    sleeps = []

    def launched_again(seconds):  # the resume writes its `started` event while watch waits
        sleeps.append(seconds)
        if len(sleeps) == 1:
            store.append("events", {"event": "started", "time": 40.0, "generator_step": 25, "max_steps": 80,
                                    "resume_from": str(tmp_path / "checkpoints" / "step_000025")})
        else:
            raise KeyboardInterrupt  # (Ctrl-C ends watching)

    monkeypatch.setattr(watch.time, "sleep", launched_again)
    watch.main([str(tmp_path), "--interval", "0.1", "--follow"])
    assert len(sleeps) == 2  # not ended at the stopped state: it went on to see the new launch
    assert "watching ends" not in capsys.readouterr().out
    shown = watch.snapshot(store, tmp_path, 60)  # the new launch's max_steps (a resume may raise it)
    assert shown.text.startswith("[running] last logged at generator step 20/80") and not shown.ended


def test_watch_shows_the_newest_evaluation_during_training(tmp_path):
    """val/ metrics come every output.eval_every steps: the newest is shown whichever row is last."""
    from dmdr_rl.trainer import write_run_config
    from dmdr_rl.watch import snapshot

    write_run_config(load_config("toy-dmdr", [f"output.dir={tmp_path}"]), tmp_path)
    store = FileStore(tmp_path)
    for step in (1, 2, 3):
        store.append("metrics", {"step": step, "time": float(step), "loss/dmd": 0.5,
                                 **({"val/judge_accuracy": 0.625, "val/fid": 301.5,
                                     "val/judge_accuracy_by_category/single/colour": 1.0} if step == 2 else {})})
    text = snapshot(store, tmp_path, 10).text
    assert "  evaluated at step 2: val/fid=301.5  val/judge_accuracy=0.625\n" in text + "\n"


def test_watch_into_a_log_appends_what_changes_unwrapped_and_shows_the_closing_evaluation(tmp_path, capsys, monkeypatch):
    """Piped or redirected, each snapshot that says something new is printed whole (a terminal's redrawing wrapped
    its lines at 80 columns in a log); a finished run shows the evaluation the run made after training."""
    from dmdr_rl import watch
    from dmdr_rl.trainer import write_run_config

    write_run_config(load_config("toy-dmdr", [f"output.dir={tmp_path}", "trainer.max_steps=3"]), tmp_path)
    store = FileStore(tmp_path)
    store.append("events", {"event": "started", "time": 1.0, "generator_step": 0, "max_steps": 3})
    losses = {f"loss/{name}": 0.123456 for name in ("dmd", "generator", "critic", "reward/toy-align", "policy")}
    store.append("metrics", {"step": 1, "time": 2.0, **losses})
    refreshes = []

    def next_refresh(_):
        refreshes.append(1)
        if len(refreshes) == 3:  # two refreshes with nothing new, then the run's last step and its end
            store.append("metrics", {"step": 3, "time": 4.0, **losses})
            store.append("events", {"event": "finished", "time": 5.0, "generator_step": 3})

    monkeypatch.setattr(watch.time, "sleep", next_refresh)
    watch.main([str(tmp_path), "--interval", "0.1"])
    printed = capsys.readouterr().out
    assert printed.count("last logged at generator step") == 2  # the first snapshot, then the finished one: no repeats
    long_line = "  " + "  ".join(f"{k}=0.1235" for k in sorted(losses))
    assert len(long_line) > 80 and long_line + "\n" in printed  # not wrapped
    assert "[finished] last logged at generator step 3/3   1.000 steps/s" in printed
    assert "closing evaluation" not in printed  # (none written yet)
    (tmp_path / "eval").mkdir()
    report = tmp_path / "eval" / "report.json"
    report.write_text(json.dumps({"num_images": 256, "judge_accuracy": 0.594, "fid": 469.77,
                                  "judge_accuracy_by_category": {"single": 0.5}}))
    text = watch.snapshot(FileStore(tmp_path), tmp_path, 3).text
    assert "  closing evaluation (256 images): fid=469.8  judge_accuracy=0.594\n" in text + "\n"
    os.utime(report, (0.5, 0.5))  # written before this launch started (time 1.0): a resumed run's earlier one
    assert "closing evaluation" not in watch.snapshot(FileStore(tmp_path), tmp_path, 3).text
    one_record = FileStore(tmp_path / "one")
    one_record.append("metrics", {"step": 3, "time": 4.0})
    one_record.append("events", {"event": "finished", "time": 5.0, "generator_step": 3})
    assert "3/3   - steps/s   last update" in watch.snapshot(one_record, None, 3).text  # (not "too few records yet")


def test_a_fresh_run_refused_by_the_store_leaves_the_earlier_runs_files_in_place(tmp_path, redis_server):
    from dmdr_rl.config import load_config
    from dmdr_rl.trainer import open_run_directory

    earlier = RedisStore(redis_server.url, "taken", tmp_path)
    earlier.append("metrics", {"step": 1})
    earlier.close()
    (tmp_path / "config.yaml").write_text("the earlier run's config\n")
    cfg = load_config("toy-dmdr", ["name=taken", f"store.url={redis_server.url}", f"output.dir={tmp_path}"])
    with pytest.raises(StoreError, match="already holds records of a run named 'taken'"):
        open_run_directory(cfg, tmp_path, fresh=True)
    assert (tmp_path / "config.yaml").read_text() == "the earlier run's config\n" and not (tmp_path / "previous").exists()
    new = tmp_path / "runs" / "new"  # a directory this run would make: not left behind, holding its lock file only
    with pytest.raises(StoreError, match="already holds records of a run named 'taken'"):
        open_run_directory(cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(new)})}), new, fresh=True)
    assert not new.exists()


def test_two_runs_cannot_start_in_one_directory_or_under_one_name_at_once(tmp_path, redis_server):
    from dmdr_rl.config import load_config
    from dmdr_rl.trainer import open_run_directory

    cfg = load_config("toy-dmdr", [f"output.dir={tmp_path / 'a'}"])
    first = open_run_directory(cfg, tmp_path / "a", fresh=True)
    with pytest.raises(StoreError, match="another run is writing to .*a right now"):
        open_run_directory(cfg, tmp_path / "a", fresh=True)
    assert not (tmp_path / "a" / "previous").exists()  # the running run's files stay where they are
    first.close()
    open_run_directory(cfg, tmp_path / "a", fresh=True).close()  # free again once it has ended
    # one name in one Redis: the second start is refused while the first has not written a record yet
    starting = RedisStore(redis_server.url, "same-name", tmp_path / "b")
    starting.require_new()
    second = RedisStore(redis_server.url, "same-name", tmp_path / "c")
    with pytest.raises(StoreError, match="another run named 'same-name' is starting"):
        second.require_new()
    starting.close()  # ended without a record: the name is free again
    second.require_new()
    second.close()


def test_a_redis_that_goes_away_is_a_store_error_for_readers(tmp_path, redis_server, capsys):
    from dmdr_rl import watch

    store = RedisStore(redis_server.url, "gone", tmp_path)
    store.append("metrics", {"step": 1})
    assert store.flush(10)
    redis_server.stop()
    with pytest.raises(StoreError, match="cannot read dmdr:gone:metrics from the run store"):
        store.read("metrics")
    store.close(timeout_s=0.1)
    with pytest.raises(StoreError, match=r"store.url 'redis://127.0.0.1:1/0\?socket_timeout=x': Invalid value"):
        RedisStore("redis://127.0.0.1:1/0?socket_timeout=x", "x", tmp_path)
    with pytest.raises(SystemExit):
        watch.main(["nope", "--store", f"redis://:s3cret@127.0.0.1:{_free_port()}/0", "--once"])
    assert "s3cret" not in capsys.readouterr().err


def test_late_records_are_merged_by_time_without_reordering_the_stream():
    from dmdr_rl.store import merge_by_time

    stream = [{"id": "a", "time": 1.0}, {"id": "b", "time": 3.0}, {"id": "c", "time": 2.5}]  # two writers' clocks
    late = [{"id": "y", "time": 9.0}, {"id": "x", "time": 2.0}]
    assert [r["id"] for r in merge_by_time(stream, late)] == ["a", "x", "b", "c", "y"]
    assert merge_by_time(stream, []) == stream
    assert [r["id"] for r in merge_by_time([{"id": "sent", "time": 5.0}], [{"id": "saved", "time": 5.0}])] == ["sent", "saved"]


def test_a_checkpoint_directory_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from dmdr_rl.store import directory_written_whole

    target = tmp_path / "checkpoints" / "step_000002"
    with directory_written_whole(target) as pending:
        (pending / "generator.safetensors").write_text("first")
        (pending / "stale.pt").write_text("only in the first")
    with pytest.raises(RuntimeError, match="killed while writing"):
        with directory_written_whole(target) as pending:
            (pending / "generator.safetensors").write_text("half")
            raise RuntimeError("killed while writing")
    assert (target / "generator.safetensors").read_text() == "first"  # the whole older one stands
    with directory_written_whole(target) as pending:
        (pending / "generator.safetensors").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["generator.safetensors"]  # nothing left of the first
    assert (target / "generator.safetensors").read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["step_000002"]  # no temporary directories
    # stopped (SIGTERM, Ctrl-C) between moving the older one aside and moving the new one in: the older one is back
    import dmdr_rl.store as store_module

    real_replace, calls = store_module.os.replace, []

    def stopped_after_the_first(source, destination):
        calls.append(source)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(store_module.os, "replace", stopped_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        with directory_written_whole(target) as pending:
            (pending / "generator.safetensors").write_text("third")
    monkeypatch.undo()
    assert (target / "generator.safetensors").read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["step_000002"]


@pytest.mark.parametrize("kind", ["files", "redis"])
def test_a_non_finite_metric_is_stored_as_strict_json(tmp_path, kind, request):
    """null, not Python's bare NaN, which jq and other JSON readers refuse."""
    url = request.getfixturevalue("redis_server").url if kind == "redis" else None
    store = open_store(url, tmp_path, f"strict-{kind}")
    store.append("metrics", {"step": 1, "loss/generator": float("nan"), "reward/x/mean": float("inf"), "loss/dmd": 0.5})
    assert store.flush(10.0) is not False
    (row,) = store.read("metrics")
    assert row["loss/generator"] is None and row["reward/x/mean"] is None and row["loss/dmd"] == 0.5
    if kind == "files":
        assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    store.close()


def test_a_process_joining_a_started_run_waits_out_a_redis_outage_instead_of_failing(tmp_path):
    """A learner restarted while Redis restarts: its records wait; a run's start still stops on it at once."""
    url = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    with pytest.raises(StoreError, match="cannot reach the run store"):
        RedisStore(url, "starting", tmp_path, connect_timeout_s=0.5)
    store = open_store(url, tmp_path, "joining", joining=True)
    store.append("metrics", {"step": 7, "loss/dmd": 0.5})
    store.close(timeout_s=1.0)  # still down: saved in the run directory, counted again by readers with it
    assert [row["step"] for row in FileStore(tmp_path).read("store-unflushed")] == [7]
