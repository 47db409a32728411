"""Operator side: the Flower ServerApp, round orchestration, committed rounds, releases."""
