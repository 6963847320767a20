"""The ledger kept through Celery signals, so the tasks stay plain.

Each handler updates the request's row by task id.  A request that runs again
after its worker died is the same row (``attempts`` goes up), never a second
one.  A request published without :func:`tasks.submit` (``apply_async`` by
hand), once the worker has checked it against the user directory
(:mod:`tasks.worker_request`), gets its row when it starts, from its headers.
"""
from __future__ import annotations

import logging

from celery import signals
from sqlalchemy.exc import IntegrityError

from . import ledger, ollama
from .app import app, current
from .ledger import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, EXPIRED, Request

logger = logging.getLogger(__name__)
LEDGERED = ('tasks.generate', 'tasks.chat', 'tasks.embed')


def header(request, name, default=None):
    """A custom message header (``x-role``...), wherever this Celery version puts it."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, 'headers', None) or {}).get(name)
    if value is None and isinstance(getattr(request, 'request_dict', None), dict):
        value = request.request_dict.get(name)
    return default if value is None else value


def _row(s, task_id, request=None, kwargs=None) -> Request:
    row = s.get(Request, task_id)
    if row is not None:
        return row
    cfg = current()
    model = (kwargs or {}).get('model', '?')
    row = Request(
        task_id=task_id, user_id=header(request, 'x-client', 'anonymous'),
        role=header(request, 'x-role', '?'),
        priority=(request.delivery_info or {}).get('priority') or 0 if request else 0,
        request_type=header(request, 'x-request-type', 'direct'), model=model,
        queue=cfg.models[model].queue if model in cfg.models else '?',
        status=QUEUED, created_at=ledger.now(), attempts=0, retries=0)
    try:
        with s.begin_nested():
            s.add(row)
    except IntegrityError:
        # submit() added the row and published before committing, and a worker
        # took the message first: on PostgreSQL our INSERT waited for that commit
        # and failed, so the row is there to read now.
        row = s.get(Request, task_id)
        if row is None:
            raise
    return row


def _settled(row) -> bool:
    # A cancelled request stays cancelled, whatever its worker reports after.
    return row.status == CANCELLED


def _safely(fn):
    # The ledger must never take a task down with it; log and carry on.
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:
            logger.exception('ledger update failed in %s', fn.__name__)
    return wrapper


def mark_running(task_id, request=None, kwargs=None, worker=None):
    now = ledger.now()
    with ledger.session(current().ledger_url) as s:
        row = _row(s, task_id, request, kwargs)
        if _settled(row):
            return
        row.status = RUNNING
        row.started_at = now
        row.wait_seconds = now - row.created_at
        row.attempts = (row.attempts or 0) + 1
        row.worker = worker
        row.completed_at = row.run_seconds = None


def mark_on_gpu(task_id):
    """The request got its GPU slot (``[gpu] slots``): its wait ends now."""
    now = ledger.now()
    with ledger.session(current().ledger_url) as s:
        row = _row(s, task_id)
        if _settled(row):
            return
        row.started_at = now
        row.wait_seconds = now - row.created_at


def mark_succeeded(task_id, result: dict):
    cfg = current()
    now = ledger.now()
    with ledger.session(cfg.ledger_url) as s:
        row = _row(s, task_id)
        if _settled(row):
            return
        row.status = SUCCEEDED
        row.completed_at = now
        row.run_seconds = now - (row.started_at or now)
        row.error = None
        row.prompt_tokens = result.get('prompt_eval_count')
        row.completion_tokens = result.get('eval_count')
        for key in ('total_duration', 'load_duration', 'prompt_eval_duration',
                    'eval_duration'):
            setattr(row, key, result.get(key))
        row.done_reason = result.get('done_reason')
        row.response = result
        row.response_expires_at = now + cfg.retention_days * 86400


def mark_failed(task_id, error: str, status=FAILED):
    now = ledger.now()
    with ledger.session(current().ledger_url) as s:
        row = _row(s, task_id)
        if _settled(row):
            return
        row.status = status
        row.completed_at = now
        if row.started_at:
            row.run_seconds = now - row.started_at
        row.error = error


def mark_retrying(task_id, error: str):
    with ledger.session(current().ledger_url) as s:
        row = _row(s, task_id)
        if _settled(row):
            return
        row.status = QUEUED  # the broker holds the delayed retry
        row.retries = (row.retries or 0) + 1
        row.error = error


@signals.task_prerun.connect
@_safely
def _prerun(sender=None, task_id=None, task=None, args=None, kwargs=None, **_):
    if task is None or task.name not in LEDGERED:
        return
    hostname = getattr(task.request, 'hostname', None)
    if getattr(task, 'is_batch', False):  # one row per request in the batch
        for req in (args[0] if args else []):
            mark_running(req.id, req, req.kwargs, req.hostname)
        return
    mark_running(task_id, task.request, kwargs, hostname)


@signals.task_postrun.connect
@_safely
def _postrun(sender=None, task=None, retval=None, **_):
    if not getattr(task, 'is_batch', False) or not isinstance(retval, dict):
        return
    for task_id, (outcome, value) in retval.items():
        if outcome == 'succeeded':
            mark_succeeded(task_id, value)
        elif outcome == 'retried':
            mark_retrying(task_id, value)
        else:
            mark_failed(task_id, value)


@signals.task_success.connect
@_safely
def _success(sender=None, result=None, **_):
    if sender is None or sender.name not in LEDGERED or getattr(sender, 'is_batch', False):
        return
    mark_succeeded(sender.request.id, result if isinstance(result, dict) else {})


@signals.task_failure.connect
@_safely
def _failure(sender=None, task_id=None, exception=None, **_):
    if sender is None or sender.name not in LEDGERED:
        return
    mark_failed(task_id, f'{type(exception).__name__}: {exception}')


@signals.task_retry.connect
@_safely
def _retry(sender=None, request=None, reason=None, **_):
    if sender is None or sender.name not in LEDGERED:
        return
    mark_retrying(request.id, f'{type(reason).__name__}: {reason}')


@signals.task_revoked.connect
@_safely
def _revoked(sender=None, request=None, expired=False, **_):
    if sender is None or sender.name not in LEDGERED:
        return
    if expired:
        mark_failed(request.id, 'expired before it started', status=EXPIRED)
    else:
        mark_failed(request.id, 'revoked')


@signals.worker_process_shutdown.connect
def _close_clients(**_):
    ollama.close_all()


__all__ = ['app', 'header', 'mark_running', 'mark_on_gpu', 'mark_succeeded', 'mark_failed',
           'mark_retrying']
