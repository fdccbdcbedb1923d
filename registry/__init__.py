"""What diffbank stores and where: settings, SQL catalog, object stores, the sparse-diff format."""
