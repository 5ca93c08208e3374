"""The engine: tracing -> coupling -> surgery -> task-aware rewriting (banks, layers, masks) -> GrowableNet.

Knows nothing of recipes, training loops, runs or reports (tests/test_layering.py checks it).
"""
