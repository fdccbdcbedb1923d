"""The serving engine: one base per device, resident diffs, mixed-task batches, kernels.

The entry point is `serving.engine.Predictor`; nothing here imports torch at package import.
"""
