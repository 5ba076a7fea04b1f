"""The Ray Train learner: `train_loop_per_worker` with DDP over generator and critic, running the
DMDR step from `dmdr_rl` on RolloutBatches and publishing generator weights by version.

Not built yet: see issue 4 (the distributed actor/learner runtime). This package is the agreed place.
"""
