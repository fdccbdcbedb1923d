"""Datasets: reading and validating the labelled text tables users upload."""
