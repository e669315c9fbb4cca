"""Benchmarks of the curveball library (step time, distributed communication, the race).

They depend on ``curveball`` and on :mod:`benchmarks.common` only; run them from
the repository root, e.g. ``python -m benchmarks.step_time``.
"""
