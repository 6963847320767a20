"""``python -m tasks workers``: one Celery worker per model, sized to its GPU slots.

Each worker consumes only its model's queue with ``-c <slots>`` and prefetch 1
(acks late and reject-on-worker-lost come from the app), so a GPU never runs
more requests than its slots.  Embedding models prefetch one batch per slot so
that requests can be batched.  A small maintenance worker runs beat.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from .app import MAINTENANCE_QUEUE


def node_name(model: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.-]+', '-', model)


def commands(cfg, loglevel='info', beat=True, models=None) -> list[tuple[str, list[str]]]:
    celery = [sys.executable, '-m', 'celery', '-A', 'tasks', 'worker', '-l', loglevel, '-E']
    out = []
    for m in cfg.models.values():
        if models and m.name not in models:
            continue
        prefetch = cfg.embed_batch_size if m.embedding else 1
        out.append((m.name, celery + ['-Q', m.queue, '-c', str(m.slots),
                                      '--prefetch-multiplier', str(prefetch),
                                      '-n', f'{node_name(m.name)}@%h']))
    if beat:
        out.append(('maintenance', celery + [
            '-Q', MAINTENANCE_QUEUE, '-c', '1', '-n', 'maintenance@%h', '-B',
            '-s', str(cfg.data_dir / 'beat-schedule')]))
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
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
    return killed


def _interrupt(*_):
    raise KeyboardInterrupt


def run(cfg, loglevel='info', beat=True, models=None, echo=print) -> int:
    procs = []
    # The workers get their own process groups, so that Ctrl-C reaches only us
    # and we stop them in order (a background job may even ignore SIGINT).
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for name, cmd in commands(cfg, loglevel, beat, models):
            procs.append((name, subprocess.Popen(cmd, start_new_session=True)))
            echo(f'started worker for {name} (pid {procs[-1][1].pid}): {" ".join(cmd[2:])}')
        while True:
            for name, p in procs:
                if p.poll() is not None:
                    echo(f'worker for {name} exited with {p.returncode}; stopping the others')
                    return p.returncode or 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        echo('stopping workers (waiting for running requests)...')
        return 0
    finally:
        stop(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
