"""Flower for ``tasks``: how it is started, and what its buttons may do.

``python -m tasks flower`` runs ``celery -A tasks flower`` on 127.0.0.1:5555
with basic auth (user ``ops``, the password from ``$FLOWER_PASSWORD``, passed
through the environment so that it is not on a command line) and the task
list's columns cut to what operators need: the ``kwargs`` column carries who
asked (user, role, priority, request type, model; see
:mod:`tasks.worker_request`), and neither args nor result is shown.

A worker refuses Flower's pool *Grow* (the ``pool_grow`` remote control
command) past its model's ``slots``, and says so in its log: a GPU runs no
more requests at once than its slots.
"""
from __future__ import annotations

import logging
import os
import sys

from celery.worker.control import Panel, control_command, nok

from .app import current

logger = logging.getLogger('tasks.alerts')
TASK_COLUMNS = 'name,uuid,state,kwargs,received,started,runtime,worker'
PASSWORD_ENV = 'FLOWER_PASSWORD'

_celery_pool_grow = Panel.data['pool_grow']


def command(address: str, port: int, user: str) -> tuple[list[str], dict]:
    """(argv, environment) of the Flower process; ValueError without a password."""
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        raise ValueError(f'set ${PASSWORD_ENV}: Flower runs with basic auth '
                         f'(user {user!r}, that password)')
    argv = [sys.executable, '-m', 'celery', '-A', 'tasks', 'flower',
            f'--address={address}', f'--port={port}', f'--tasks_columns={TASK_COLUMNS}']
    return argv, {**os.environ, 'FLOWER_BASIC_AUTH': f'{user}:{password}'}


def _model_of(consumer):
    cfg = current()
    queues = [q.name for q in consumer.task_consumer.queues] if consumer.task_consumer else []
    return next((cfg.model_for_queue(q) for q in queues if cfg.model_for_queue(q)), None)


@control_command(args=[('n', int)], signature='[N=1]')
def pool_grow(state, n=1, **kwargs):
    """Grow pool by n processes, but never past the model's slots."""
    model = _model_of(state.consumer)
    size = state.consumer.pool.num_processes
    if model is not None and size + n > model.slots:
        message = (f'refused to grow the pool of the worker for {model.name} from {size} to '
                   f'{size + n} processes: the model has {model.slots} slot(s) '
                   f'(models."{model.name}".slots)')
        logger.warning(message)
        return nok(message)
    return _celery_pool_grow(state, n=n, **kwargs)
