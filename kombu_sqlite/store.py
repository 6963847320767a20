"""Messages: publish, claim, ack, release, lease renewal and sweeping.

A row is ready while ``lease_expires_at`` is NULL.  Claiming stamps a lease;
ack deletes the row; a lease that runs out makes the row ready again; the
``delivery_count`` column says how often it was handed out.
"""
from __future__ import annotations

import time
from collections import Counter

from kombu.utils.json import dumps, loads

from .catalog import Catalog
from .db import retry_busy

_COLUMNS = ('queue, priority, visible_at, lease_expires_at, expires_at, client, '
            'task_name, task_id, published_at, payload')

# The message's own expiry and the queue's x-message-ttl: the earlier wins.
_VALUES = """:priority, :visible_at, :held_until,
    nullif(min(coalesce(:expires_at, 1e300), coalesce(:now + q.message_ttl, 1e300)), 1e300),
    :client, :task_name, :task_id, :now, :payload"""

#: Publish to one named queue (the default exchange).
PUBLISH_TO_QUEUE = f"""
    INSERT INTO kombu_message ({_COLUMNS})
    SELECT :queue, {_VALUES}
      FROM (SELECT 1) LEFT JOIN kombu_queue q ON q.name = :queue
"""

#: Publish through an exchange: one statement routes and inserts a copy per
#: bound queue.  ``{match}`` is the exchange type's rule from ROUTING_RULES.
PUBLISH_ROUTED = f"""
    INSERT INTO kombu_message ({_COLUMNS})
    SELECT b.queue, {_VALUES}
      FROM kombu_binding b LEFT JOIN kombu_queue q ON q.name = b.queue
     WHERE b.exchange = :exchange AND {{match}}
"""

ROUTING_RULES = {
    'direct': 'b.routing_key = :routing_key',
    'fanout': '1',
    'topic': 'topic_match(b.routing_key, :routing_key)',
}

#: The next ready messages of a queue in delivery order.
_NEXT_READY = """
    SELECT id FROM kombu_message
     WHERE queue = :queue AND lease_expires_at IS NULL
     ORDER BY priority, id
     LIMIT :limit
"""

#: Claim: lease the next ready messages to this owner, in one statement.
CLAIM = f"""
    UPDATE kombu_message
       SET lease_expires_at = :lease_until, lease_owner = :owner,
           delivery_count = delivery_count + 1
     WHERE id IN ({_NEXT_READY})
    RETURNING id, priority, delivery_count, expires_at, payload
"""

#: Take without a lease, for consumers that do not ack (no_ack).
TAKE = f"""
    DELETE FROM kombu_message
     WHERE id IN ({_NEXT_READY})
    RETURNING id, priority, delivery_count + 1, expires_at, payload
"""

ACK = """DELETE FROM kombu_message
          WHERE id = ? AND (lease_owner = ? OR lease_owner IS NULL)"""

RELEASE = """UPDATE kombu_message SET lease_expires_at = NULL, lease_owner = NULL
              WHERE id = ? AND lease_owner = ?"""

RENEW = 'UPDATE kombu_message SET lease_expires_at = ? WHERE lease_owner = ?'

EXPIRE_LEASES = """UPDATE kombu_message SET lease_expires_at = NULL, lease_owner = NULL
                    WHERE lease_expires_at <= ?"""

EXPIRE_MESSAGES = """DELETE FROM kombu_message
                      WHERE expires_at <= ? AND lease_owner IS NULL
                     RETURNING queue"""

BUMP_COUNTER = """
    INSERT INTO kombu_counter (queue, name, value) VALUES (?, ?, ?)
    ON CONFLICT (queue, name) DO UPDATE SET value = value + excluded.value
"""


class Store(Catalog):
    """All SQL on messages lives here, one named statement per concern."""

    def publish_params(self, message: dict, priority: int, now: float) -> dict:
        props = message.get('properties') or {}
        headers = message.get('headers') or {}
        expiration = props.get('expiration')
        return {
            'priority': priority,
            'visible_at': now,
            'held_until': None,
            'expires_at': now + float(expiration) / 1000.0 if expiration else None,
            'client': _text(headers.get('x-client')),
            'task_name': _text(headers.get('task')),
            'task_id': _text(headers.get('id')),
            'now': now,
            'payload': dumps(message),
        }

    @retry_busy
    def publish(self, queue: str, params: dict) -> int:
        return self.conn.execute(PUBLISH_TO_QUEUE, dict(params, queue=queue)).rowcount

    @retry_busy
    def publish_routed(self, exchange: str, type: str, routing_key: str,
                       params: dict) -> int:
        """Insert one copy per queue bound to ``exchange`` that matches."""
        sql = PUBLISH_ROUTED.format(match=ROUTING_RULES[type])
        return self.conn.execute(
            sql, dict(params, exchange=exchange, routing_key=routing_key or '')).rowcount

    @retry_busy
    def claim(self, queue: str, owner: str, limit: int, lease_until: float,
              no_ack: bool = False) -> list[tuple[int, int, int, dict]]:
        """Claim up to ``limit`` messages: [(id, priority, delivery_count, message)]."""
        now = time.time()
        with self.transaction() as conn:
            while True:
                if no_ack:
                    rows = conn.execute(TAKE, {'queue': queue, 'limit': limit}).fetchall()
                else:
                    rows = conn.execute(CLAIM, {
                        'queue': queue, 'limit': limit, 'owner': owner,
                        'lease_until': lease_until}).fetchall()
                expired = [r[0] for r in rows if r[3] is not None and r[3] <= now]
                if not expired:
                    break
                # Expired before delivery: dropped and counted, as AMQP does;
                # then claim again in their place.
                conn.executemany('DELETE FROM kombu_message WHERE id = ?',
                                 [(i,) for i in expired])
                conn.execute(BUMP_COUNTER, (queue, 'expired', len(expired)))
                if len(expired) < len(rows):
                    rows = [r for r in rows if r[0] not in set(expired)]
                    break
        rows.sort(key=lambda r: (r[1], r[0]))
        return [(r[0], r[1], r[2], loads(r[4])) for r in rows]

    @retry_busy
    def ack(self, message_id: int, owner: str) -> bool:
        return self.conn.execute(ACK, (message_id, owner)).rowcount > 0

    @retry_busy
    def release(self, message_ids, owner: str) -> int:
        """Make leased messages deliverable again at once (requeue)."""
        with self.transaction() as conn:
            return sum(conn.execute(RELEASE, (i, owner)).rowcount for i in message_ids)

    @retry_busy
    def delete(self, message_id: int) -> bool:
        return self.conn.execute(
            'DELETE FROM kombu_message WHERE id = ?', (message_id,)).rowcount > 0

    @retry_busy
    def renew(self, owner: str, lease_until: float) -> int:
        """Extend every lease held by ``owner``: the holder is alive."""
        return self.conn.execute(RENEW, (lease_until, owner)).rowcount

    @retry_busy
    def sweep(self, now: float | None = None) -> dict:
        """Expired leases back to ready, expired messages and queues dropped."""
        now = time.time() if now is None else now
        leases = self.conn.execute(EXPIRE_LEASES, (now,)).rowcount
        expired = Counter(r[0] for r in self.conn.execute(EXPIRE_MESSAGES, (now,)))
        queues = self.sweep_expired_queues(now)
        counts = Counter({(q, 'expired'): n for q, n in expired.items()})
        if counts:
            self.bump(counts)
        return {'leases_expired': leases, 'messages_expired': sum(expired.values()),
                'queues_expired': queues}

    @retry_busy
    def bump(self, counts) -> None:
        """Add to the persistent counters: {(queue, name): n}."""
        if counts:
            self.conn.executemany(
                BUMP_COUNTER, [(q, name, n) for (q, name), n in counts.items() if n])

    def size(self, queue: str) -> int:
        """Ready messages, as AMQP's message_count reports."""
        return self.conn.execute(
            'SELECT count(*) FROM kombu_message '
            'WHERE queue = ? AND lease_expires_at IS NULL', (queue,)).fetchone()[0]

    @retry_busy
    def purge(self, queue: str) -> int:
        return self.conn.execute(
            'DELETE FROM kombu_message WHERE queue = ? AND lease_expires_at IS NULL',
            (queue,)).rowcount


def _text(value):
    return None if value is None else str(value)
