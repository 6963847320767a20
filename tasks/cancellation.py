"""Taking a request back: :func:`cancel` (``python -m tasks cancel TASK_ID``).

The ledger row becomes ``cancelled`` first, in one transaction that checks it
is still queued or running: the user's limit is free from that moment, and
the worker's ledger updates leave a cancelled row alone.  Then the broker:

* queued on kombu_sqlite: the message is deleted with
  ``kombu_sqlite.Broker.remove`` when the installed kombu_sqlite has it;
* otherwise (Redis, RabbitMQ, or a message a worker already holds): a Celery
  revoke with ``terminate=True``.  A worker discards a revoked message when it
  reaches it (and one that missed the broadcast finds the ledger row
  ``cancelled``, see :mod:`tasks.worker_request`); a running request's pool
  process is terminated, which closes its Ollama stream, and the pool starts
  a fresh process for the next request.

Only the request's own user, a user whose directory role is the top role
(``system``), or the operator (``by_user=None``) may cancel.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import kombu_sqlite

from . import directory, ledger
from .app import app, broker_kind, current
from .ledger import ACTIVE, CANCELLED, QUEUED, Request

REMOVED, REVOKED, STOPPED = ('removed from the broker', 'revoked before it ran',
                             'stopped while running')


class CancelNotAllowed(PermissionError):
    """Only the request's own user or a system user may cancel it."""


@dataclass(frozen=True)
class Outcome:
    task_id: str
    cancelled: bool
    status: str | None  # the row's status now; None: no such request
    was: str | None     # its status before
    how: str | None     # REMOVED, REVOKED or STOPPED when cancelled
    message: str

    def as_dict(self) -> dict:
        return asdict(self)


def cancel(task_id: str, *, by_user: str | None) -> Outcome:
    """Cancel a queued or running request; says so if it was neither.

    Raises :class:`CancelNotAllowed` if ``by_user`` is neither the request's
    user nor a system user.
    """
    cfg = current()
    row = ledger.get(cfg.ledger_url, task_id)
    if row is None:
        return Outcome(task_id, False, None, None, None, f'no request {task_id} in the ledger')
    if by_user != row.user_id and not directory.is_system(cfg, by_user):
        raise CancelNotAllowed(f'user {by_user!r} may not cancel request {task_id} of user '
                               f'{row.user_id!r}: only its own user or a system user may')
    was = _mark_cancelled(cfg, task_id, by_user)
    if was is None:
        status = ledger.get(cfg.ledger_url, task_id).status
        return Outcome(task_id, False, status, status, None,
                       f'request {task_id} is already {status}: nothing changed')
    if was == QUEUED and _remove_from_broker(cfg, row.queue, task_id):
        how = REMOVED
    else:
        app.control.revoke(task_id, terminate=True)
        how = REVOKED if was == QUEUED else STOPPED
    return Outcome(task_id, True, CANCELLED, was, how,
                   f'request {task_id} cancelled ({how})')


def _mark_cancelled(cfg, task_id, by_user) -> str | None:
    """The status it had if it was queued or running, else None (unchanged)."""
    now = ledger.now()
    with ledger.session(cfg.ledger_url) as s:
        row = s.get(Request, task_id, with_for_update=True)
        if row.status not in ACTIVE:
            return None
        was = row.status
        row.status, row.completed_at = CANCELLED, now
        if row.started_at:
            row.run_seconds = now - row.started_at
        row.error = f'cancelled by {by_user or "the operator"}'
        return was


def _remove_from_broker(cfg, queue, task_id) -> bool:
    """Delete a waiting message from kombu_sqlite, where it offers a call for it."""
    if broker_kind(cfg.broker_url) != 'sqlite' or not hasattr(kombu_sqlite.Broker, 'remove'):
        return False
    with kombu_sqlite.Broker(cfg.broker_url, create=False) as broker:
        return bool(broker.remove(queue, task_id))
