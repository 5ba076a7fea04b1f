"""The prompt ledger's replay: rewinds roll back consumptions, and the audit finds lost and duplicated batches."""

from dmdr_rl.ledger import Ledger, audit, effective_consumption
from dmdr_rl.store import FileStore


def _consume(ledger, iterations, rank=0):
    for i in iterations:
        ledger.append("issued", iteration=i, rank=rank)
        ledger.append("consumed", iteration=i, rank=rank)


def test_a_rewind_rolls_back_what_the_restored_weights_never_saw(tmp_path):
    ledger = Ledger(FileStore(tmp_path))
    _consume(ledger, range(0, 7))  # crashed after consuming iteration 6; checkpoint at 5
    ledger.append("rewind", iteration=5)
    _consume(ledger, range(5, 10))
    events = ledger.events()
    assert effective_consumption(events) == [(i, 0) for i in range(10)]
    assert audit(events, 10, 1) == {"lost": [], "duplicated": [], "unexpected": [], "rewinds": 1, "reissued": 0}


def test_the_audit_names_lost_and_duplicated_batches(tmp_path):
    ledger = Ledger(FileStore(tmp_path))
    _consume(ledger, [0, 1, 1, 3])
    _consume(ledger, [0, 1, 2, 3], rank=1)
    report = audit(ledger.events(), 4, 2)
    assert report["lost"] == [(2, 0)] and report["duplicated"] == [(1, 0)]
    assert audit(ledger.events(), 3, 2)["unexpected"] == [(3, 0), (3, 1)]


def test_a_resumed_launch_is_audited_from_where_it_started(tmp_path):
    # resumed into a new directory: iterations 0-3 were learned by the earlier run, elsewhere
    fresh = Ledger(FileStore(tmp_path / "new"))
    fresh.append("learner_failed", rank=0, where="while the learner was built", error="OSError: disk", tries=1)
    fresh.append("start", iteration=4)  # a first try that failed before its start does not hide it
    _consume(fresh, range(4, 8))
    assert audit(fresh.events(), 8, 1)["lost"] == []
    # resumed in its own directory from the checkpoint at 4, after the first launch had consumed 0-5
    same = Ledger(FileStore(tmp_path / "same"))
    same.append("start", iteration=0)
    _consume(same, range(0, 6))
    same.append("start", iteration=4)
    _consume(same, range(4, 8))
    report = audit(same.events(), 8, 1)
    assert report["lost"] == [] and report["duplicated"] == [] and report["rewinds"] == 0
    assert effective_consumption(same.events()) == [(i, 0) for i in range(8)]


def test_a_ledger_from_before_start_events_resumed_in_its_directory_is_clean(tmp_path):
    ledger = Ledger(FileStore(tmp_path))
    _consume(ledger, range(0, 6))  # an older launch: no start event
    ledger.append("start", iteration=4)  # resumed from its checkpoint at 4
    _consume(ledger, range(4, 8))
    report = audit(ledger.events(), 8, 1)
    assert report["lost"] == report["duplicated"] == report["unexpected"] == []


def test_a_launch_resumed_with_another_number_of_learners_is_audited_with_each_stretchs_ranks(tmp_path):
    ledger = Ledger(FileStore(tmp_path))
    ledger.append("start", iteration=0, world_size=1)
    _consume(ledger, range(0, 6))  # one learner, checkpoint at 4
    ledger.append("start", iteration=4, world_size=2)  # resumed in its directory with two
    _consume(ledger, range(4, 8))
    _consume(ledger, range(4, 8), rank=1)
    events = ledger.events()
    assert audit(events, 8, 2) == {"lost": [], "duplicated": [], "unexpected": [], "rewinds": 0, "reissued": 0}
    assert audit(events, 9, 2)["lost"] == [(8, 0), (8, 1)]
    # and back to one: rank 1's batches from 6 on would be unexpected, those before it are kept
    ledger.append("rewind", iteration=6, world_size=1)
    _consume(ledger, range(6, 8))
    assert audit(ledger.events(), 8, 1) == {"lost": [], "duplicated": [], "unexpected": [], "rewinds": 1, "reissued": 0}
    _consume(ledger, [7], rank=1)
    assert audit(ledger.events(), 8, 1)["unexpected"] == [(7, 1)]
