"""The small kit both training methods share: config base, schedule, batching, optimizers,
checkpoints, model preparation, evaluation and the run-control types."""
