"""The workers: one Celery worker per model, sized to its GPU slots, and how to stop them.

Each worker consumes only its model's queue with ``-c <slots>`` and prefetch 1
(acks late and reject-on-worker-lost come from the app), so a GPU never runs
more requests than its slots.  Embedding models prefetch one batch per slot so
that requests can be batched.  A small maintenance worker runs beat.
:mod:`tasks.supervisor` runs them (``python -m tasks workers``).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from typing import NamedTuple

from celery.utils.nodenames import host_format

from .app import MAINTENANCE_QUEUE


def node_name(model: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.-]+', '-', model)


class Spec(NamedTuple):
    """One worker to run: its name, command line, Celery node name and pool size."""
    name: str
    cmd: list[str]
    node: str
    slots: int


def commands(cfg, loglevel='info', beat=True, models=None) -> list[Spec]:
    celery = [sys.executable, '-m', 'celery', '-A', 'tasks', 'worker', '-l', loglevel, '-E']
    out = []
    for m in cfg.models.values():
        if models and m.name not in models:
            continue
        prefetch = cfg.embed_batch_size if m.embedding else 1
        node = f'{node_name(m.name)}@%h'
        out.append(Spec(m.name, celery + ['-Q', m.queue, '-c', str(m.slots),
                                          '--prefetch-multiplier', str(prefetch), '-n', node],
                        host_format(node), m.slots))
    if beat:
        node = 'maintenance@%h'
        out.append(Spec('maintenance', celery + [
            '-Q', MAINTENANCE_QUEUE, '-c', '1', '-n', node, '-B',
            '-s', str(cfg.data_dir / 'beat-schedule')], host_format(node), 1))
    return out


def stop(procs, grace: float = 30.0) -> list[str]:
    """Stop ``(name, Popen)`` processes, each started in its own session.

    Warm shutdown: SIGTERM to each main process (a Celery worker then finishes
    what it runs and stops its pool), up to ``grace`` seconds for all; then
    SIGKILL to each process group, pool children that outlived their parent
    included.  Returns the names of those that had to be killed.
    """
    for _, p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    killed = []
    for name, p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed.append(name)
    for _, p in procs:
        kill(p)
    return killed


def kill(p):
    """SIGKILL to the process group of ``p`` (its pool children too), then reap it."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass
