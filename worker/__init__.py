"""What runs on GPU workers: the Celery app, thin tasks, the diff-pruning trainer, consolidation."""
