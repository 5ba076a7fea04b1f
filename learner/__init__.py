"""The Ray Train learner: `loop.train_loop_per_worker` runs the math core's DMDR step (`dmdr_rl.learning`) on
the RolloutBatches the rollout workers make, with gradients averaged over the ranks, and publishes the
generator weights by version."""
