"""Building blocks of worker/training/datasets.py: file readers, generators, transforms.

Import the public API from worker.training.datasets; these modules are its parts.
"""
