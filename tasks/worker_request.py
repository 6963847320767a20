"""How a worker holds an inference request: what it shows, and cancellation.

The app's ``task_annotations`` make :class:`InferenceRequest` the worker-side
request of ``tasks.generate`` and ``tasks.chat``:

* Flower, ``celery inspect active|reserved`` and the worker log see who asked
  (user, role, priority, request type, model), never the prompt, the images
  or the answer: those stay in the ledger, under ``retention_days``.  This
  holds for any publisher, not only :func:`tasks.submit`.
* A request whose ledger row is ``cancelled`` is discarded as revoked when
  the worker receives it or is about to start it, so a cancel also holds
  against workers that were not running when it was broadcast.
* A message that did not come through :func:`tasks.submit` (no ledger row:
  say Flower's ``async-apply`` of ``tasks.generate``) must name its user and
  role (headers ``x-client``, ``x-role``) and the directory must allow both
  that role and the message's priority; otherwise it is not run, its ledger
  row is ``rejected`` and its result a ``RoleNotAllowed`` failure.
"""
from __future__ import annotations

import logging

from celery import signals
from celery.worker.request import Request
from celery.worker.state import revoked as revoked_ids

from . import directory, ledger
from .app import broker_kind, current
from .directory import RoleNotAllowed
from .ledger import CANCELLED, REJECTED, Request as Row

logger = logging.getLogger(__name__)
ANSWER_HIDDEN = '(answer not shown: see the ledger or /api/task/result/<id>)'


def public_fields(user, role, request_type, model) -> dict:
    """What operators see of a request: who, at what priority, what."""
    roles = current().roles
    return {'user': user, 'role': role,
            'priority': roles[role].priority if role in roles else None,
            'request_type': request_type, 'model': model}


def _row(task_id: str):
    try:
        return ledger.get(current().ledger_url, task_id)
    except Exception:  # a ledger hiccup must not stop the worker: run it
        logger.exception('could not read the ledger row of %s', task_id)
        return False


def refusal(request) -> RoleNotAllowed | None:
    """Why a message that bypassed :func:`tasks.submit` (no ledger row) may not run."""
    cfg = current()
    headers = request._request_dict
    user, role = headers.get('x-client'), headers.get('x-role')
    with ledger.read_session(cfg.ledger_url) as s:
        if not user or role not in cfg.roles:
            return RoleNotAllowed(
                'a request sent without tasks.submit must name its user and a known role '
                f'(headers x-client, x-role); got {user!r}, {role!r}',
                user_id=user, role=role, allowed=None)
        refused = directory.refusal(cfg, s, user, role)
    if refused is not None:
        return refused
    priority = _priority(cfg, request)
    if priority is not None and priority < cfg.roles[role].priority:
        return RoleNotAllowed(
            f'user {user!r} sent a request at priority {priority}, above that of role '
            f'{role!r} ({cfg.roles[role].priority})', user_id=user, role=role, allowed=role)
    return None


def _priority(cfg, request) -> int | None:
    """The message's priority, 0 first (RabbitMQ's is inverted on publish)."""
    priority = (request.delivery_info or {}).get('priority')
    if priority is not None and broker_kind(cfg.broker_url) == 'amqp':
        priority = 9 - priority
    return priority


def _reject(request, exc: RoleNotAllowed):
    headers = request._request_dict
    now = ledger.now()
    model = (request.kwargs or {}).get('model', '?')
    cfg = current()
    with ledger.session(cfg.ledger_url) as s:
        s.merge(Row(task_id=request.id, user_id=headers.get('x-client') or 'anonymous',
                    role=headers.get('x-role') or '?', priority=_priority(cfg, request) or 0,
                    request_type=headers.get('x-request-type') or 'direct', model=model,
                    queue=(request.delivery_info or {}).get('routing_key') or '?',
                    status=REJECTED, created_at=now, completed_at=now, attempts=0,
                    retries=0, error=f'RoleNotAllowed: {exc}'))
    logger.warning('refused %s[%s]: %s', request.name, request.id, exc)
    request.task.backend.mark_as_failure(request.id, exc, request=request._context)
    request.acknowledge()


class InferenceRequest(Request):
    def _public(self) -> str:
        headers = self._request_dict
        return repr(public_fields(headers.get('x-client'), headers.get('x-role'),
                                  headers.get('x-request-type'),
                                  (self.kwargs or {}).get('model')))

    @property
    def argsrepr(self):
        return '()'

    @property
    def kwargsrepr(self):
        return self._public()

    def info(self, safe=False):
        # inspect active/reserved ask with safe=False: still no prompt.
        return {**super().info(safe=True), 'args': '()', 'kwargs': self._public()}

    def send_event(self, type, **fields):
        if type == 'task-succeeded':
            fields['result'] = ANSWER_HIDDEN
        super().send_event(type, **fields)

    def revoked(self):
        # Asked when the worker receives the message and again before it runs.
        if self._already_revoked or self.id in revoked_ids:
            return super().revoked()
        row = _row(self.id)
        if row is None:
            refused = refusal(self)
            if refused is not None:
                _reject(self, refused)
                self._already_revoked = True
                return True
        elif row and row.status == CANCELLED:
            revoked_ids.add(self.id)
        return super().revoked()


class HideAnswers(logging.Filter):
    """Celery logs a task's return value on success: not for inference tasks."""

    def __init__(self, names):
        super().__init__()
        self.names = set(names)

    def filter(self, record):
        args = record.args
        if isinstance(args, dict) and args.get('name') in self.names \
                and 'return_value' in args:
            record.args = {**args, 'return_value': ANSWER_HIDDEN}
        return True


@signals.worker_init.connect
def _hide_answers_in_log(**_):
    from .app import INFERENCE_TASKS
    trace_log = logging.getLogger('celery.app.trace')
    if not any(isinstance(f, HideAnswers) for f in trace_log.filters):
        trace_log.addFilter(HideAnswers(INFERENCE_TASKS))
