"""The `momos` command and its demo: digits data, reference models, a training loop, experiments, plots.

An application of the library, never imported by it.
"""
