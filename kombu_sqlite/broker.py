"""``Broker(url)``: look into a queue database and repair it, from Python.

The same calls back the ``kombu-sqlite`` command.  Every method is safe while
workers run: reads see a consistent snapshot, writes are short transactions.
"""
from __future__ import annotations

import base64
import os
import time

from kombu.utils.json import loads

from . import schema
from .options import Options
from .store import BUCKET_SECONDS, Store

_COUNTERS = ('published', 'acked', 'requeued', 'lease_expired', 'delayed_due',
             'dead_lettered', 'expired', 'rejected_publish', 'dropped', 'late_settles',
             'removed')
_RECENT = ('published', 'acked')


class Broker:
    """Administrative view of one queue database.

    ``read_only=True`` opens the file so that nothing can be written (the
    commands that only look): a file that is not a kombu-sqlite broker is
    refused and left exactly as it was.

    :meth:`remove` takes one waiting Celery task out of its queue (cancel);
    leased messages are never touched.
    """

    def __init__(self, url: str, *, create: bool = True, read_only: bool = False,
                 **options):
        path = schema.path_from_url(url) if '://' in url else url
        if (read_only or not create) and not os.path.isfile(path):
            raise FileNotFoundError(f'no queue database at {path!r}')
        self.url = url
        self.store = Store.open(path, Options.from_transport_options(options),
                                read_only=read_only)

    @property
    def path(self) -> str:
        """The queue database file."""
        return self.store.path

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- looking -------------------------------------------------------------------

    def queues(self) -> list[str]:
        """Declared queues and queues that hold messages."""
        return self.store.queues()

    def require_queue(self, queue: str) -> None:
        if queue not in self.queues():
            raise KeyError(f'no queue named {queue!r} in {self.path}')

    def stats(self) -> dict[str, dict]:
        """Per queue: ready by priority, delayed, leased (by owner), dead,
        oldest ready age in seconds, and the lifetime counters.

        Every figure comes from one read transaction: queues that appear or
        vanish meanwhile are either wholly in it or not at all.
        """
        now = time.time()
        queues, ready, leased, dead, counters, recent = self.store.figures(
            int((now - 60) // BUCKET_SECONDS) + 1)

        def empty():
            return {'ready': 0, 'ready_by_priority': {}, 'delayed': 0, 'leased': 0,
                    'leased_by': {}, 'dead': 0, 'oldest_ready_age': None,
                    'counters': dict.fromkeys(_COUNTERS, 0),
                    'last_minute': dict.fromkeys(_RECENT, 0)}

        out = {q: empty() for q in queues}
        for queue, priority, n, oldest in ready:
            q = out.setdefault(queue, empty())
            q['ready'] += n
            q['ready_by_priority'][priority] = n
            q['oldest_ready_age'] = max(q['oldest_ready_age'] or 0.0, now - oldest)
        for queue, owner, n in leased:
            q = out.setdefault(queue, empty())
            if owner is None:
                q['delayed'] += n
            else:
                q['leased'] += n
                q['leased_by'][owner] = n
        for queue, n in dead:
            out.setdefault(queue, empty())['dead'] = n
        for queue, name, value in counters:
            if queue in out:
                out[queue]['counters'][name] = value
        for queue, name, value in recent:
            if queue in out and name in _RECENT:
                out[queue]['last_minute'][name] = value
        return out

    def peek(self, queue: str, n: int = 10, body: bool = False) -> list[dict]:
        """The next ``n`` ready messages in delivery order (weighted-random:
        in priority order, its most likely order)."""
        now = time.time()
        out = []
        for r in self.store.peek(queue, n):
            item = {'id': r[0], 'task': r[1], 'task_id': r[2], 'priority': r[3],
                    'client': r[4], 'age': now - r[5], 'delivery_count': r[6]}
            if body:
                item['body'] = _body(loads(r[7]))
            out.append(item)
        return out

    def position(self, queue: str, task_id: str):
        """How many messages would be delivered before this task's message.

        Exact for priority, fair, fifo and lifo queues; for weighted-random
        the expected number.  None if the task is not waiting in the queue.
        """
        return self.store.position(queue, task_id)

    def remove(self, queue: str, task_id: str) -> bool:
        """Take Celery task ``task_id``'s waiting message out of ``queue``.

        A ready message or one held until its ETA is deleted in one short
        write transaction and counted as ``removed``; True if one was.  False
        if none is waiting: a worker holds it (leased messages are never
        touched), or it is not there.
        """
        return self.store.remove(queue, task_id) > 0

    def sweep(self) -> dict:
        """What workers do every second: expired leases and due messages back
        to ready, expired messages and queues dropped.  Returns the counts
        (leases_expired, messages_expired, queues_expired)."""
        return self.store.sweep()

    # -- dead letters ------------------------------------------------------------------

    def dead_letters(self, queue: str | None = None, limit: int | None = None) -> list[dict]:
        keys = ('id', 'queue', 'priority', 'delivery_count', 'reason', 'dead_at',
                'client', 'task', 'task_id', 'published_at')
        return [dict(zip(keys, r)) for r in self.store.dead_letters(queue, limit)]

    def requeue_dead(self, queue: str | None = None, ids=None) -> int:
        """Put dead letters back on their queue with a fresh delivery count."""
        return self.store.requeue_dead(queue, ids)

    def purge_dead(self, queue: str | None = None, ids=None) -> int:
        return self.store.purge_dead(queue, ids)

    def purge(self, queue: str) -> int:
        """Delete the ready messages of a queue (leased ones finish normally)."""
        return self.store.purge(queue)


def _body(message: dict):
    body = message.get('body')
    if message.get('properties', {}).get('body_encoding') == 'base64' and body:
        body = base64.b64decode(body).decode('utf-8', 'replace')
    return body

