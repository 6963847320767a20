"""Flower's Broker page and ``/api/queues/length`` for ``sqlite://`` brokers.

Flower (2.x) picks its broker client by URL scheme in
``flower.utils.broker.Broker`` and knows only amqp and redis; for anything else
its Broker page answers "'sqlite' broker is not supported" and
``/api/queues/length`` answers 404.  Flower has no plugin interface for brokers,
so this module replaces the name ``Broker`` that ``flower.views`` calls with a
factory that serves ``sqlite://`` URLs from :class:`kombu_sqlite.Broker` and
hands every other URL to Flower's own.

Per queue it reports, in the shape Flower uses for Redis (``name`` and
``messages``) plus RabbitMQ's column names that the Broker page shows:

- ``messages``: every message in the queue (ready, delayed and leased; not dead letters)
- ``messages_ready``: deliverable now
- ``messages_unacknowledged``: leased by a consumer, not yet acked
- ``messages_delayed``: waiting for an ETA or a retry countdown in the broker
- ``messages_dead_lettered``: in the queue's dead-letter store

The Broker page has no dead-letter column, so each queue's dead letters get a row
of their own below it (``<queue> (dead-lettered)``); the JSON API keeps one entry
per queue.

Activation: ``import kombu_sqlite`` calls :func:`install` when Flower is
already imported, which is always the case under ``celery -A proj flower``
(Celery loads its command plugins before the app).  A program that embeds Flower
after importing kombu_sqlite calls :func:`install` itself.  If Flower's internals
differ from what this module expects, :func:`install` logs a warning, changes
nothing, and the rest of Flower works as before.
"""
from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlparse

from .broker import Broker

logger = logging.getLogger(__name__)

DEAD_LETTER_ROW = '{} (dead-lettered)'

_installed = False


class SQLiteQueues:
    """Flower's broker client interface (``async queues(names)``) for one file."""

    def __init__(self, broker_url: str):
        self.broker_url = broker_url

    async def queues(self, names) -> list[dict]:
        names = list(names)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, self._counts, names)
        except Exception as exc:  # Flower's clients log and show no rows
            logger.error('kombu_sqlite: cannot read queue counts from %s: %s',
                         self.broker_url, exc)
            return []

    def _counts(self, names: list[str]) -> list[dict]:
        with Broker(self.broker_url, create=False) as broker:
            stats = broker.stats()
        out = []
        for name in names:
            q = stats.get(name, {})
            ready, leased, delayed = q.get('ready', 0), q.get('leased', 0), q.get('delayed', 0)
            out.append({'name': name,
                        'messages': ready + leased + delayed,
                        'messages_ready': ready,
                        'messages_unacknowledged': leased,
                        'messages_delayed': delayed,
                        'messages_dead_lettered': q.get('dead', 0)})
        return out


def with_dead_letter_rows(queues: list[dict]) -> list[dict]:
    """The Broker page's rows: each sqlite queue, then a row for its dead letters."""
    rows = []
    for q in queues:
        rows.append(q)
        if 'messages_dead_lettered' in q:
            rows.append({'name': DEAD_LETTER_ROW.format(q['name']),
                         'messages': q['messages_dead_lettered']})
    return rows


def install() -> bool:
    """Teach the imported Flower to show sqlite queues; True when it is in place.

    Safe to call more than once; never raises.
    """
    global _installed
    if _installed:
        return True
    try:
        import flower.utils.broker as flower_broker
        import flower.views as flower_views
        import flower.views.broker as flower_broker_view
        original = flower_views.Broker
        view = flower_broker_view.BrokerView
        if original is not flower_broker.Broker or not callable(view.render):
            raise AttributeError('flower.views.Broker is not flower.utils.broker.Broker')
    except Exception as exc:
        logger.warning('kombu_sqlite: this Flower (%s) differs from the one the sqlite '
                       'Broker page was written for (%s); its Broker page and '
                       '/api/queues/length stay unsupported for sqlite://',
                       _flower_version(), exc)
        return False

    def broker_for_url(broker_url, *args, **kwargs):
        if urlparse(broker_url).scheme == 'sqlite':
            return SQLiteQueues(broker_url)
        return original(broker_url, *args, **kwargs)

    original_render = view.render

    def render(self, template_name, **kwargs):
        if template_name == 'broker.html' and 'queues' in kwargs:
            kwargs['queues'] = with_dead_letter_rows(kwargs['queues'])
        return original_render(self, template_name, **kwargs)

    flower_views.Broker = broker_for_url
    view.render = render
    _installed = True
    logger.debug('kombu_sqlite: Flower %s Broker page serves sqlite://', _flower_version())
    return True


def _flower_version() -> str:
    try:
        from importlib.metadata import version
        return version('flower')
    except Exception:
        return 'unknown version'
