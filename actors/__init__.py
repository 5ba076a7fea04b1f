"""Rollout workers (Ray actors): hold a generator replica and the frozen prompt encoders, turn prompt
batches into RolloutBatches in the object store, and load new generator weights by version.

Not built yet: see issue 4 (the distributed actor/learner runtime). This package is the agreed place.
"""
