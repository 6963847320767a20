"""``python -m tasks demo``: a demand spike on one box, watched in Flower.

Not part of the production app: it starts the simulator (:mod:`tasks.simulator`),
workers and Flower, replays a load through :func:`tasks.submit` and reports.
Modules: :mod:`.run` (the command), :mod:`.load` (sizing, timetable, replay),
:mod:`.stack` (the processes), :mod:`.watch` (samples and live view),
:mod:`.report` (figures and criteria), :mod:`.plot` (``report.png``).
"""
from .run import main

__all__ = ['main']
