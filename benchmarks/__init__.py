"""Benchmarks: kombu_sqlite against kombu's Redis and SQLAlchemy transports.

``python -m benchmarks`` runs every measurement for every broker in one go and
prints the figures, the ratios and the targets; ``--suite scale`` runs the
queue-depth and many-process measurements.  See docs/benchmarks.md.
"""
