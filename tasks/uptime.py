"""When workers were up, so that utilisation is busy time over up time.

A worker writes a ``tasks_worker_span`` row when it is ready, refreshes its
``seen_at`` from its event heartbeat (at most every ``SEEN_EVERY`` seconds;
workers run with ``-E``) and closes it at shutdown.  A worker killed without
a shutdown is counted up to its last ``seen_at``.
"""
from __future__ import annotations

import logging
import os
import time

from celery import signals
from sqlalchemy import or_, select

from . import ledger
from .app import current
from .ledger import WorkerSpan

logger = logging.getLogger(__name__)
SEEN_EVERY = 30.0
ANY_MODEL = '*'
_span: dict = {}  # this worker process: its row id and when seen_at was last written


def _safely(fn):
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:  # uptime is a statistic: never stop a worker for it
            logger.exception('worker uptime not recorded (%s)', fn.__name__)
    return wrapper


@signals.worker_ready.connect
@_safely
def _ready(sender=None, **_):
    queues = ','.join(q.name for q in sender.task_consumer.queues) if sender else ''
    now = ledger.now()
    with ledger.session(current().ledger_url) as s:
        span = WorkerSpan(hostname=getattr(sender, 'hostname', '?'), queues=queues,
                          started_at=now, seen_at=now)
        s.add(span)
        s.flush()
        _span.update(id=span.id, pid=os.getpid(), written=time.monotonic())


def _touch(**values):
    if _span.get('pid') != os.getpid():
        return
    with ledger.session(current().ledger_url) as s:
        span = s.get(WorkerSpan, _span['id'])
        if span is not None:
            for k, v in values.items():
                setattr(span, k, v)
    _span['written'] = time.monotonic()


@signals.heartbeat_sent.connect
@_safely
def _heartbeat(**_):
    if _span and time.monotonic() - _span['written'] >= SEEN_EVERY:
        _touch(seen_at=ledger.now())


@signals.worker_shutdown.connect
@_safely
def _shutdown(**_):
    if _span:
        now = ledger.now()
        _touch(seen_at=now, stopped_at=now)


def up_seconds(cfg, since: float, now: float) -> dict[str, float] | None:
    """Per model, seconds within [since, now] that a worker of its queue was up;
    under :data:`ANY_MODEL`, that any inference worker was (the GPU as a whole).

    None when no worker ever recorded a span (then the caller uses the window).
    """
    with ledger.read_session(cfg.ledger_url) as s:
        spans = list(s.scalars(select(WorkerSpan).where(
            WorkerSpan.started_at <= now,
            or_(WorkerSpan.stopped_at.is_(None), WorkerSpan.stopped_at >= since))))
        if not spans and s.scalars(select(WorkerSpan.id).limit(1)).first() is None:
            return None
    queues = {m.name: {m.queue} for m in cfg.models.values()}
    queues[ANY_MODEL] = {m.queue for m in cfg.models.values()}
    return {name: _union([(max(sp.started_at, since), min(_end(sp, now), now))
                          for sp in spans if wanted & set(sp.queues.split(','))], since)
            for name, wanted in queues.items()}


def _union(intervals, since) -> float:
    """Seconds covered by the intervals: two workers of one model count once."""
    total, reach = 0.0, since
    for a, b in sorted(intervals):
        a = max(a, reach)
        if b > a:
            total += b - a
            reach = b
    return total


def _end(span, now) -> float:
    if span.stopped_at is not None:
        return span.stopped_at
    # Alive if seen within two heartbeat writes; a killed worker ends at seen_at.
    return now if now - span.seen_at <= 2 * SEEN_EVERY + 5 else span.seen_at
