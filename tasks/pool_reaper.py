"""A pool process that died is replaced, and its GPU slot served, within a second.

A cancelled running request's pool process is terminated (see
:mod:`tasks.cancellation`).  Celery's prefork pool notices a process exit
when the process's sentinel pipe closes, and then reaps it with
``waitpid(WNOHANG)``; but the kernel closes the pipe a moment before the
process can be reaped, so that check often finds it still alive and the
pool only looks again on its own 5 s timer.  Meanwhile the next request,
already received, waits for the slot.  This worker step checks the pool
every ``CHECK_EVERY`` seconds as well: a few ``waitpid`` calls, nothing more.
"""
from __future__ import annotations

from celery import bootsteps

from .app import app

CHECK_EVERY = 0.2  # seconds


class PoolReaper(bootsteps.StartStopStep):
    """Calls the prefork pool's ``maintain_pool`` from the worker's event loop."""

    requires = ('celery.worker.components:Hub', 'celery.worker.components:Pool')

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self._timer = None

    def include_if(self, worker):
        return worker.use_eventloop  # the prefork pool in kombu's hub

    def start(self, worker):
        maintain = getattr(worker.pool, 'maintain_pool', None)
        if maintain is not None:
            self._timer = worker.hub.call_repeatedly(CHECK_EVERY, maintain)

    def stop(self, worker):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


app.steps['worker'].add(PoolReaper)
