"""Structured diff pruning of the shared base for one task (Guo, Rush, Kim 2021)."""
