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
"""
from __future__ import annotations

import logging

from celery import signals
from celery.worker.request import Request
from celery.worker.state import revoked as revoked_ids

from . import ledger
from .app import current
from .ledger import CANCELLED

logger = logging.getLogger(__name__)
ANSWER_HIDDEN = '(answer not shown: see the ledger or /api/task/result/<id>)'


def public_fields(user, role, request_type, model) -> dict:
    """What operators see of a request: who, at what priority, what."""
    roles = current().roles
    return {'user': user, 'role': role,
            'priority': roles[role].priority if role in roles else None,
            'request_type': request_type, 'model': model}


def is_cancelled(task_id: str) -> bool:
    try:
        row = ledger.get(current().ledger_url, task_id)
    except Exception:  # a ledger hiccup must not stop the worker: run it
        logger.exception('could not read the ledger row of %s', task_id)
        return False
    return row is not None and row.status == CANCELLED


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
        if not self._already_revoked and self.id not in revoked_ids \
                and is_cancelled(self.id):
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
