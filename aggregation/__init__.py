"""Aggregation: update codec, per-expert token-weighted averaging, robust rules, contribution scoring.

Pure functions over tensors; no I/O, no Flower, never imports server/ or client/.
"""
