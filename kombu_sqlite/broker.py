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
from .catalog import default_weight, priority_weights
from .db import retry_busy
from .options import Options
from .store import BUCKET_SECONDS, Store

_COUNTERS = ('published', 'acked', 'requeued', 'lease_expired', 'delayed_due',
             'dead_lettered', 'expired', 'rejected_publish', 'dropped', 'late_settles')
_RECENT = ('published', 'acked')


class Broker:
    """Administrative view of one queue database.

    ``read_only=True`` opens the file so that nothing can be written (the
    ``stats`` and ``peek`` commands): a file that is not a kombu-sqlite broker
    is refused and left exactly as it was.
    """

    def __init__(self, url: str, *, create: bool = True, read_only: bool = False,
                 **options):
        path = schema.path_from_url(url) if '://' in url else url
        if (read_only or not create) and not os.path.isfile(path):
            raise FileNotFoundError(f'no queue database at {path!r}')
        self.url = url
        self.store = Store.open(path, Options.from_transport_options(options),
                                read_only=read_only)
        self.db = self.store.db
        self.catalog = self.store.catalog

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- looking -------------------------------------------------------------------

    def queues(self) -> list[str]:
        """Declared queues and queues that hold messages."""
        return self._queues(self.db.conn)

    @staticmethod
    def _queues(conn) -> list[str]:
        rows = conn.execute(
            'SELECT name FROM kombu_queue UNION SELECT DISTINCT queue FROM kombu_message '
            'UNION SELECT DISTINCT queue FROM kombu_dead_letter ORDER BY 1')
        return [r[0] for r in rows]

    def require_queue(self, queue: str) -> None:
        if queue not in self.queues():
            raise KeyError(f'no queue named {queue!r} in {self.store.path}')

    def stats(self) -> dict[str, dict]:
        """Per queue: ready by priority, delayed, leased (by owner), dead,
        oldest ready age in seconds, and the lifetime counters.

        Every figure comes from one read transaction: queues that appear or
        vanish meanwhile are either wholly in it or not at all.
        """
        now = time.time()

        def empty():
            return {'ready': 0, 'ready_by_priority': {}, 'delayed': 0, 'leased': 0,
                    'leased_by': {}, 'dead': 0, 'oldest_ready_age': None,
                    'counters': dict.fromkeys(_COUNTERS, 0),
                    'last_minute': dict.fromkeys(_RECENT, 0)}

        with self.db.snapshot() as conn:
            out = {q: empty() for q in self._queues(conn)}
            for queue, priority, n, oldest in conn.execute(
                    'SELECT queue, priority, count(*), min(published_at) FROM kombu_message '
                    'WHERE lease_expires_at IS NULL GROUP BY queue, priority'):
                q = out.setdefault(queue, empty())
                q['ready'] += n
                q['ready_by_priority'][priority] = n
                age = now - oldest
                q['oldest_ready_age'] = max(q['oldest_ready_age'] or 0.0, age)
            for queue, owner, n in conn.execute(
                    'SELECT queue, lease_owner, count(*) FROM kombu_message '
                    'WHERE lease_expires_at IS NOT NULL GROUP BY queue, lease_owner'):
                q = out.setdefault(queue, empty())
                if owner is None:
                    q['delayed'] += n
                else:
                    q['leased'] += n
                    q['leased_by'][owner] = n
            for queue, n in conn.execute(
                    'SELECT queue, count(*) FROM kombu_dead_letter GROUP BY queue'):
                out.setdefault(queue, empty())['dead'] = n
            for queue, name, value in conn.execute(
                    'SELECT queue, name, value FROM kombu_counter'):
                if queue in out:
                    out[queue]['counters'][name] = value
            for queue, name, value in conn.execute(
                    'SELECT queue, name, sum(value) FROM kombu_counter_recent '
                    'WHERE bucket >= ? GROUP BY queue, name',
                    (int((now - 60) // BUCKET_SECONDS) + 1,)):
                if queue in out and name in _RECENT:
                    out[queue]['last_minute'][name] = value
        return out

    def peek(self, queue: str, n: int = 10, body: bool = False) -> list[dict]:
        """The next ``n`` ready messages in delivery order (weighted-random:
        in priority order, its most likely order)."""
        scheduling, _, _, _ = self.catalog.queue_policy(queue)
        order = 'rank DESC, id DESC' if scheduling == 'lifo' else 'rank, id'
        rows = self.store.conn.execute(
            f'SELECT id, task_name, task_id, priority, client, published_at, '
            f'delivery_count, payload FROM kombu_message '
            f'WHERE queue = ? AND lease_expires_at IS NULL ORDER BY {order} LIMIT ?',
            (queue, n)).fetchall()
        now = time.time()
        out = []
        for r in rows:
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
        conn = self.store.conn
        row = conn.execute(
            'SELECT id, rank FROM kombu_message WHERE queue = ? AND task_id = ? '
            'AND lease_expires_at IS NULL', (queue, task_id)).fetchone()
        if row is None:
            return None
        message_id, rank = row
        scheduling, _, _, arguments = self.catalog.queue_policy(queue)
        if scheduling == 'lifo':
            where = '(rank > :rank OR (rank = :rank AND id > :id))'
        elif scheduling == 'weighted-random':
            return self._expected_position(queue, message_id, rank, arguments)
        else:
            where = '(rank < :rank OR (rank = :rank AND id < :id))'
        return conn.execute(
            f'SELECT count(*) FROM kombu_message WHERE queue = :queue '
            f'AND lease_expires_at IS NULL AND {where}',
            {'queue': queue, 'rank': rank, 'id': message_id}).fetchone()[0]

    def _expected_position(self, queue, message_id, level, arguments):
        conn = self.store.conn
        ahead = conn.execute(
            'SELECT count(*) FROM kombu_message WHERE queue = ? AND rank = ? '
            'AND lease_expires_at IS NULL AND id < ?', (queue, level, message_id)).fetchone()[0]
        counts = dict(conn.execute(
            'SELECT rank, count(*) FROM kombu_message WHERE queue = ? '
            'AND lease_expires_at IS NULL GROUP BY rank', (queue,)))
        weights = priority_weights(arguments, queue)
        weight = lambda p: weights.get(p, default_weight(p))  # noqa: E731
        # Our level needs ahead+1 draws; each comes with w_l/w_p draws of every
        # other non-empty level on average, at most as many as it holds.
        draws = ahead + 1
        others = sum(min(n, draws * weight(p) / weight(level))
                     for p, n in counts.items() if p != level)
        return ahead + others

    # -- dead letters ------------------------------------------------------------------

    def dead_letters(self, queue: str | None = None, limit: int | None = None) -> list[dict]:
        sql = ('SELECT id, queue, priority, delivery_count, reason, dead_at, client, '
               'task_name, task_id, published_at FROM kombu_dead_letter')
        args = []
        if queue is not None:
            sql += ' WHERE queue = ?'
            args.append(queue)
        sql += ' ORDER BY id'
        if limit is not None:
            sql += ' LIMIT ?'
            args.append(int(limit))
        keys = ('id', 'queue', 'priority', 'delivery_count', 'reason', 'dead_at',
                'client', 'task', 'task_id', 'published_at')
        return [dict(zip(keys, r)) for r in self.store.conn.execute(sql, args)]

    def _dead_filter(self, queue, ids):
        clauses, args = [], []
        if queue is not None:
            clauses.append('queue = ?')
            args.append(queue)
        if ids is not None:
            ids = list(ids)
            clauses.append(f'id IN ({",".join("?" * len(ids))})')
            args += ids
        return (' WHERE ' + ' AND '.join(clauses)) if clauses else '', args

    @retry_busy
    def _requeue(self, queue, ids):
        where, args = self._dead_filter(queue, ids)
        now = time.time()
        with self.db.transaction() as conn:
            rows = conn.execute(
                f'SELECT id, queue, priority, payload FROM kombu_dead_letter{where}',
                args).fetchall()
            for dead_id, q, priority, payload in rows:
                message = loads(payload)
                message['redelivered'] = False
                params = self.store.publish_params(message, priority, now)
                self.store.insert_one(conn, q, params)  # delivery count starts at 0
                conn.execute('DELETE FROM kombu_dead_letter WHERE id = ?', (dead_id,))
        return len(rows)

    def requeue_dead(self, queue: str | None = None, ids=None) -> int:
        """Put dead letters back on their queue with a fresh delivery count."""
        return self._requeue(queue, ids)

    @retry_busy
    def purge_dead(self, queue: str | None = None, ids=None) -> int:
        where, args = self._dead_filter(queue, ids)
        return self.store.conn.execute(f'DELETE FROM kombu_dead_letter{where}', args).rowcount

    def purge(self, queue: str) -> int:
        """Delete the ready messages of a queue (leased ones finish normally)."""
        return self.store.purge(queue)


def _body(message: dict):
    body = message.get('body')
    if message.get('properties', {}).get('body_encoding') == 'base64' and body:
        body = base64.b64decode(body).decode('utf-8', 'replace')
    return body

