"""The run's Ray actors besides the learner: the rollout coordinator (`coordinator`: issues prompt batches,
holds the published generator weights, keeps the ledger), the rollout workers (`rollout`: a generator
replica and the frozen prompt encoders, turning prompt batches into RolloutBatches in the object store) and
the claims on reward app names (`app_claim`)."""
