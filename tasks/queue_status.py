"""Where a request stands: :func:`status` and :func:`waiting` (``tasks status|queue``).

A queued request's position (1 = next) counts the requests that will be
served before it on its model's queue.  On kombu_sqlite it is exact: the
ready messages are read in the order the claim takes them
(``kombu_sqlite.Broker.peek``).  Redis and RabbitMQ cannot list a queue in
serving order, so there the position is an estimate from the ledger (role
priority, then arrival) and says so.  The estimated start plays the requests
ahead through the model's slots at the mean of its recent run times.
"""
from __future__ import annotations

import heapq

import kombu_sqlite
from sqlalchemy import select

from . import ledger
from .admission import DEFAULT_RUN_SECONDS
from .app import broker_kind, current
from .ledger import CANCELLED, QUEUED, RUNNING, Request

EXACT = 'exact: the order kombu_sqlite claims in'
ESTIMATE = ('estimate: by role priority, then arrival, from the ledger '
            '({broker} cannot list a queue in serving order)')
HELD = 'taken by a worker, about to start (or a retry waiting for its delay)'


def _order_on_broker(cfg, model) -> list[str] | None:
    """Task ids waiting on the model's queue in serving order; None: unknown."""
    if broker_kind(cfg.broker_url) != 'sqlite':
        return None
    try:
        broker = kombu_sqlite.Broker(cfg.broker_url, create=False)
    except FileNotFoundError:
        return []
    with broker:
        if model.queue not in broker.queues():
            return []
        return [m['task_id'] for m in broker.peek(model.queue, n=model.max_queue + 1)]


def _start_in(mean, slots, running_elapsed, ahead) -> float:
    """Seconds until a slot is free for a request with ``ahead`` before it."""
    free = sorted(max(0.0, mean - e) for e in running_elapsed)[:slots]
    free += [0.0] * (slots - len(free))
    heapq.heapify(free)
    for _ in range(ahead):
        heapq.heappush(free, heapq.heappop(free) + mean)
    return free[0]


def waiting(model: str | None = None, *, now: float | None = None) -> list[dict]:
    """Queued requests in serving order, per model, with position and estimated start."""
    cfg = current()
    now = ledger.now() if now is None else now
    if model is not None and model not in cfg.models:
        raise ValueError(f'unknown model {model!r} (models: {", ".join(cfg.models)})')
    out = []
    for m in cfg.models.values():
        if model is not None and m.name != model:
            continue
        order = _order_on_broker(cfg, m)
        with ledger.read_session(cfg.ledger_url) as s:
            rows = list(s.scalars(select(Request).where(
                Request.model == m.name, Request.status.in_((QUEUED, RUNNING)))))
            mean = ledger.mean_run_seconds(s, m.name, DEFAULT_RUN_SECONDS)
        running = [now - r.started_at for r in rows if r.status == RUNNING and r.started_at]
        queued = {r.task_id: r for r in rows if r.status == QUEUED}
        if order is None:
            basis = ESTIMATE.format(broker=broker_kind(cfg.broker_url))
            ranked = sorted(queued.values(), key=lambda r: (r.priority, r.created_at))
        else:
            basis = EXACT
            ranked = [queued[t] for t in order if t in queued]  # cancelled ones skipped
        held = [r for r in queued.values() if r not in ranked]
        for position, r in enumerate(ranked, 1):
            out.append(_entry(r, now, position=position, basis=basis,
                              start=_start_in(mean, m.slots, running, position - 1),
                              mean=mean, slots=m.slots))
        out += [_entry(r, now, position=None, basis=HELD, start=None, mean=mean,
                       slots=m.slots) for r in held]
    return out


def _entry(r, now, *, position, basis, start, mean, slots) -> dict:
    return {'task_id': r.task_id, 'user': r.user_id, 'role': r.role,
            'priority': r.priority, 'request_type': r.request_type, 'model': r.model,
            'age_s': now - r.created_at, 'position': position, 'position_basis': basis,
            'estimated_start_s': start,
            'estimate_basis': f'mean run {mean:.1f}s of recent requests, {slots} slot(s)'}


def status(task_id: str) -> dict:
    """The request's state; queued: position and estimated start; running: worker, run time."""
    cfg = current()
    row = ledger.get(cfg.ledger_url, task_id)
    if row is None:
        raise KeyError(f'no request {task_id} in the ledger')
    now = ledger.now()
    out = {'task_id': task_id, 'state': row.status, 'user': row.user_id, 'role': row.role,
           'priority': row.priority, 'request_type': row.request_type, 'model': row.model,
           'created_at': row.created_at, 'attempts': row.attempts}
    if row.status == QUEUED:
        mine = next((w for w in waiting(row.model, now=now) if w['task_id'] == task_id), None)
        if mine is not None:
            out.update({k: mine[k] for k in ('age_s', 'position', 'position_basis',
                                             'estimated_start_s', 'estimate_basis')})
    elif row.status == RUNNING:
        out.update(worker=row.worker, running_s=now - (row.started_at or now))
    else:
        out.update(completed_at=row.completed_at, wait_s=row.wait_seconds,
                   run_s=row.run_seconds, error=row.error)
    return out


def describe(st: dict) -> str:
    """One or two lines for people."""
    head = (f'{st["task_id"]}: {st["state"]} ({st["user"]} as {st["role"]}, '
            f'{st["request_type"]} on {st["model"]})')
    if st['state'] == QUEUED and st.get('position'):
        return (f'{head}\n  position {st["position"]} ({st["position_basis"]}); '
                f'estimated start in {st["estimated_start_s"]:.0f}s '
                f'({st["estimate_basis"]})')
    if st['state'] == QUEUED:
        return f'{head}\n  {st.get("position_basis", HELD)}'
    if st['state'] == RUNNING:
        return f'{head}\n  on {st["worker"]} for {st["running_s"]:.1f}s'
    if st['state'] == CANCELLED or st.get('error'):
        return f'{head}\n  {st.get("error") or ""}'.rstrip()
    return head
