"""Queues, exchanges and bindings, stored so that every process routes alike."""
from __future__ import annotations

import json
import math
import time

from .db import retry_busy

#: Largest integer SQLite stores; larger x-max-length values are refused.
MAX_INTEGER = 2 ** 63 - 1
#: Weights are relative; beyond this range sums overflow or underflow.
MIN_WEIGHT, MAX_WEIGHT = 1e-100, 1e100

# Queue arguments acted on; the rest are kept but not used.
# x-message-ttl and x-expires are milliseconds, as in AMQP.
OVERFLOW_MODES = ('reject-publish', 'drop-head', 'block')
SCHEDULING_STRATEGIES = ('priority', 'fifo', 'lifo', 'weighted-random', 'fair')


def _choice(arguments: dict, name: str, choices, queue: str):
    value = arguments.get(name, choices[0])
    if value not in choices:
        raise ValueError(f'queue {queue!r}: argument {name}={value!r} must be one of '
                         f'{", ".join(choices)}')
    return value


def _max_length(arguments: dict, queue: str):
    value = arguments.get('x-max-length')
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int) or value < 0
            or value > MAX_INTEGER):
        raise ValueError(f'queue {queue!r}: argument x-max-length={value!r} must be '
                         f'a whole number of messages, 0 to {MAX_INTEGER}')
    return value


def priority_weights(arguments: dict, queue: str = '?') -> dict[int, float]:
    """x-priority-weights as {priority: weight}; the default halves per level."""
    raw = arguments.get('x-priority-weights')
    if raw is None:
        return {}
    try:
        weights = {int(k): float(v) for k, v in dict(raw).items()}
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f'queue {queue!r}: argument x-priority-weights={raw!r} must '
                         f'map priorities to positive weights') from None
    for priority, weight in weights.items():
        if not (math.isfinite(weight) and MIN_WEIGHT <= weight <= MAX_WEIGHT):
            raise ValueError(
                f'queue {queue!r}: x-priority-weights gives priority {priority} the weight '
                f'{weight!r}; weights must be finite, from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}')
    return weights


def default_weight(priority: int) -> float:
    # Each level is served half as often as the one above it, never zero.
    return 0.5 ** priority


def _seconds(arguments: dict, name: str, queue: str):
    value = arguments.get(name)
    if value is None:
        return None
    try:
        ms = float(value)
        if not math.isfinite(ms):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(
            f'queue {queue!r}: argument {name}={value!r} must be a number of '
            f'milliseconds') from None
    if ms < 0 or (name == 'x-expires' and ms == 0):
        raise ValueError(f'queue {queue!r}: argument {name}={value!r} must be positive')
    return ms / 1000.0


class Catalog:
    """The routing state: what exists and what is bound to what."""

    def __init__(self, db):
        self.db = db

    DECLARE_QUEUE = """
        INSERT INTO kombu_queue
            (name, arguments, message_ttl, expires, auto_delete, max_length, overflow,
             scheduling, declared_at, last_used_at)
        VALUES (:name, :arguments, :message_ttl, :expires, :auto_delete, :max_length,
                :overflow, :scheduling, :now, :monotonic)
        ON CONFLICT (name) DO UPDATE SET
            arguments = excluded.arguments, message_ttl = excluded.message_ttl,
            expires = excluded.expires, auto_delete = excluded.auto_delete,
            max_length = excluded.max_length, overflow = excluded.overflow,
            scheduling = excluded.scheduling, last_used_at = excluded.last_used_at
    """

    @retry_busy
    def declare_queue(self, name: str, arguments: dict | None = None,
                      auto_delete: bool = False) -> None:
        arguments = dict(arguments or {})
        priority_weights(arguments, name)  # validate now, not at the first claim
        self.db.conn.execute(self.DECLARE_QUEUE, {
            'name': name,
            'arguments': json.dumps(arguments, default=str),
            'message_ttl': _seconds(arguments, 'x-message-ttl', name),
            'expires': _seconds(arguments, 'x-expires', name),
            'auto_delete': int(bool(auto_delete)),
            'max_length': _max_length(arguments, name),
            'overflow': _choice(arguments, 'x-overflow', OVERFLOW_MODES, name),
            'scheduling': _choice(arguments, 'x-scheduling', SCHEDULING_STRATEGIES, name),
            'now': time.time(),
            'monotonic': time.monotonic(),
        })

    def has_queue(self, name: str) -> bool:
        return self.db.conn.execute(
            'SELECT 1 FROM kombu_queue WHERE name = ?', (name,)).fetchone() is not None

    def queue_policy(self, name: str):
        """(scheduling, max_length, overflow, arguments) of a queue, or defaults."""
        row = self.db.conn.execute(
            'SELECT scheduling, max_length, overflow, arguments FROM kombu_queue '
            'WHERE name = ?', (name,)).fetchone()
        if row is None:
            return 'priority', None, 'reject-publish', {}
        return row[0], row[1], row[2], json.loads(row[3])

    @retry_busy
    def touch_queues(self, names) -> None:
        """Mark queues as in use, which postpones their x-expires."""
        names = list(names)
        if names:
            self.db.conn.executemany(
                'UPDATE kombu_queue SET last_used_at = ? WHERE name = ?',
                [(time.monotonic(), n) for n in names])

    def restart_expiry_clocks(self, conn, monotonic: float) -> None:
        conn.execute('UPDATE kombu_queue SET last_used_at = ?', (monotonic,))

    def forget_queue(self, conn, name: str) -> None:
        """Drop a queue's own rows (its messages go first: Store.delete_queue)."""
        conn.execute('DELETE FROM kombu_fair WHERE queue = ?', (name,))
        conn.execute('DELETE FROM kombu_binding WHERE queue = ?', (name,))
        conn.execute('DELETE FROM kombu_queue WHERE name = ?', (name,))

    #: Queues unused for longer than their x-expires; ``last_used_at`` and the
    #: parameter are CLOCK_MONOTONIC seconds, immune to clock steps.
    EXPIRED_QUEUES = """
        SELECT name FROM kombu_queue
         WHERE expires IS NOT NULL AND last_used_at + expires <= ?
    """

    def expired_queues(self, conn, monotonic: float) -> list[str]:
        return [r[0] for r in conn.execute(self.EXPIRED_QUEUES, (monotonic,))]

    # -- exchanges and bindings -------------------------------------------

    @retry_busy
    def declare_exchange(self, name: str, type: str, arguments=None) -> None:
        self.db.conn.execute(
            'INSERT INTO kombu_exchange (name, type, arguments) VALUES (?, ?, ?) '
            'ON CONFLICT (name) DO UPDATE SET type = excluded.type',
            (name, type, json.dumps(arguments or {}, default=str)))

    def exchange_names(self) -> list[str]:
        return [r[0] for r in self.db.conn.execute('SELECT name FROM kombu_exchange ORDER BY name')]

    def exchange_type(self, name: str) -> str | None:
        row = self.db.conn.execute(
            'SELECT type FROM kombu_exchange WHERE name = ?', (name,)).fetchone()
        return row and row[0]

    @retry_busy
    def delete_exchange(self, name: str) -> None:
        with self.db.transaction() as conn:
            conn.execute('DELETE FROM kombu_binding WHERE exchange = ?', (name,))
            conn.execute('DELETE FROM kombu_exchange WHERE name = ?', (name,))

    @retry_busy
    def bind(self, exchange: str, routing_key: str, queue: str) -> None:
        self.db.conn.execute(
            'INSERT OR IGNORE INTO kombu_binding (exchange, routing_key, queue) '
            'VALUES (?, ?, ?)', (exchange, routing_key or '', queue))

    @retry_busy
    def unbind(self, exchange: str, routing_key: str, queue: str) -> None:
        self.db.conn.execute(
            'DELETE FROM kombu_binding WHERE exchange = ? AND routing_key = ? '
            'AND queue = ?', (exchange, routing_key or '', queue))

    def bindings(self, exchange: str | None = None) -> list[tuple[str, str, str]]:
        """(queue, exchange, routing_key) triples, optionally of one exchange."""
        if exchange is None:
            rows = self.db.conn.execute(
                'SELECT queue, exchange, routing_key FROM kombu_binding')
        else:
            rows = self.db.conn.execute(
                'SELECT queue, exchange, routing_key FROM kombu_binding '
                'WHERE exchange = ?', (exchange,))
        return list(rows)
