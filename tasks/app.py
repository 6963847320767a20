"""The Celery app object, configured from :mod:`tasks.config`.

The same settings serve kombu_sqlite (the default), Redis and RabbitMQ: only
what each broker needs for "lowest number first" priorities differs.

Importing this module reads nothing: the configuration is loaded on first
use (:func:`current`, or the first look at ``app.conf``, which a worker takes
as it starts), and :func:`configure` replaces it.
"""
from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlparse

import kombu_sqlite  # noqa: F401  registers the sqlite:// broker scheme
from celery import Celery
from kombu import Exchange, Queue

from . import config as config_mod

MAINTENANCE_QUEUE = 'tasks.maintenance'
INFERENCE_TASKS = ('tasks.generate', 'tasks.chat', 'tasks.embed')

app = Celery('tasks')
_current: list = []


def current() -> config_mod.Config:
    """The configuration the app runs with, loaded from ``$TASKS_CONFIG`` on first use."""
    if not _current:
        _current.append(_prepared(config_mod.load()))
    return _current[0]


def _prepared(cfg):
    cfg.data_dir.mkdir(parents=True, exist_ok=True)  # the default sqlite files live there
    return cfg


def broker_kind(url: str) -> str:
    scheme = urlparse(url).scheme.split('+')[0]
    return {'rediss': 'redis', 'pyamqp': 'amqp', 'amqps': 'amqp'}.get(scheme, scheme)


def broker_priority(cfg, priority: int) -> int:
    # RabbitMQ serves the highest number first; sqlite and Redis the lowest.
    return 9 - priority if broker_kind(cfg.broker_url) == 'amqp' else priority


def _queue(cfg, model) -> Queue:
    kind = broker_kind(cfg.broker_url)
    arguments = {}
    if kind == 'sqlite':
        # 'fair': within a priority, users (x-client) take turns.
        arguments = {'x-max-length': model.max_queue, 'x-scheduling': 'fair'}
    elif kind == 'amqp':
        arguments = {'x-max-length': model.max_queue, 'x-overflow': 'reject-publish'}
    return Queue(model.queue, Exchange(model.queue, type='direct'), routing_key=model.queue,
                 queue_arguments=arguments or None,
                 max_priority=10 if kind == 'amqp' else None)


def route(name, args, kwargs, options, task=None, **kw):
    """Inference tasks go to their model's queue, however they were sent."""
    if name in INFERENCE_TASKS:
        model = current().models.get((kwargs or {}).get('model'))
        if model is not None:
            return {'queue': model.queue}
    return None


def settings(cfg) -> dict:
    kind = broker_kind(cfg.broker_url)
    transport_options = {'visibility_timeout': cfg.visibility_timeout}
    if kind == 'redis':
        # One list per priority 0-9, served strictly lowest first, like sqlite.
        transport_options.update(priority_steps=list(range(10)), sep=':',
                                 queue_order_strategy='priority',
                                 # A dead worker's request is back within about a
                                 # quarter of the visibility timeout after it
                                 # expires, not kombu's 10 x 10 s sweep.
                                 unacked_restore_interval=max(1.0, min(
                                     10.0, cfg.visibility_timeout / 4)),
                                 unacked_restore_throttle=1)
    return dict(
        broker_url=cfg.broker_url,
        result_backend=cfg.result_backend,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_queues=[_queue(cfg, m) for m in cfg.models.values()]
        + [Queue(MAINTENANCE_QUEUE)],
        task_default_queue=MAINTENANCE_QUEUE,
        task_routes=(route, {'celery.backend_cleanup': {'queue': MAINTENANCE_QUEUE}}),
        # A GPU runs no more than its slots, and a dead worker loses nothing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        # Flower, inspect and the log show who asked, not the prompt or answer.
        task_annotations={name: {'Request': 'tasks.worker_request:InferenceRequest'}
                          for name in ('tasks.generate', 'tasks.chat')},
        task_send_sent_event=True,
        worker_send_task_events=True,
        result_extended=True,
        result_expires=timedelta(days=cfg.retention_days) if cfg.retention_days else None,
        task_serializer='json', result_serializer='json', accept_content=['json'],
        beat_schedule={'tasks.maintain': {'task': 'tasks.maintain',
                                          'schedule': cfg.maintain_interval,
                                          'options': {'queue': MAINTENANCE_QUEUE}}},
        timezone='UTC',
    )


def configure(cfg=None):
    """(Re)configure the app; drops cached connections so a new broker is used."""
    cfg = _prepared(cfg or config_mod.load())
    if _current:
        app.close()
        app._pool = None
        app.amqp._producer_pool = None
        app._local.__dict__.clear()  # cached result backend
        for name in ('queues', 'default_queue', 'router', 'send_task_message'):
            app.amqp.__dict__.pop(name, None)
        app.amqp._rtable = None
    _current[:] = [cfg]
    app.conf.update(settings(cfg))
    return cfg


# Evaluated when the settings are first needed, not at import.
app.add_defaults(lambda: settings(current()))
