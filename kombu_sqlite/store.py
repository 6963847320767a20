"""Messages: publish, claim, ack, release, lease renewal and sweeping.

A row is ready while ``lease_expires_at`` is NULL.  Claiming stamps a lease;
ack deletes the row; a lease that runs out makes the row ready again; the
``delivery_count`` column says how often it was handed out.  A delayed
message is a row leased by nobody (``lease_owner`` NULL) until it is due.
``rank`` is the claim's sort key, fixed at publish by the queue's scheduling
strategy, so every strategy but weighted-random is one indexed walk.
"""
from __future__ import annotations

import random
import time
from collections import Counter

from kombu.utils.json import dumps, loads

from .catalog import Catalog, default_weight, priority_weights
from .db import retry_busy
from .errors import QueueFull

#: rank = priority << FAIR_BITS | tag for 'fair' queues.
FAIR_BITS = 40
FAIR_MASK = (1 << FAIR_BITS) - 1

_COLUMNS = ('queue, priority, rank, visible_at, lease_expires_at, expires_at, client, '
            'task_name, task_id, published_at, payload')

# The message's own expiry and the queue's x-message-ttl: the earlier wins.
# fifo and lifo queues ignore priority: their rank is 0.
_VALUES = """:priority,
    CASE WHEN q.scheduling IN ('fifo', 'lifo') THEN 0 ELSE :priority END,
    :visible_at, :held_until,
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

#: Bound queues that need more than one INSERT: a length limit or fair tags.
ROUTED_POLICIES = """
    SELECT b.queue FROM kombu_binding b JOIN kombu_queue q ON q.name = b.queue
     WHERE b.exchange = :exchange AND {match}
       AND (q.max_length IS NOT NULL OR q.scheduling = 'fair')
"""
ROUTED_QUEUES = 'SELECT b.queue FROM kombu_binding b WHERE b.exchange = :exchange AND {match}'

INSERT_ONE = f"""
    INSERT INTO kombu_message ({_COLUMNS})
    VALUES (:queue, :priority, :rank, :visible_at, :held_until, :expires_at, :client,
            :task_name, :task_id, :now, :payload)
"""

#: The next ready messages of a queue in delivery order.
NEXT_READY = {
    'forward': """SELECT id FROM kombu_message
                   WHERE queue = :queue AND lease_expires_at IS NULL
                   ORDER BY rank, id LIMIT :limit""",
    'lifo': """SELECT id FROM kombu_message
                WHERE queue = :queue AND lease_expires_at IS NULL
                ORDER BY rank DESC, id DESC LIMIT :limit""",
    'level': """SELECT id FROM kombu_message
                 WHERE queue = :queue AND lease_expires_at IS NULL AND rank = :rank
                 ORDER BY id LIMIT :limit""",
}

#: Claim: lease the next ready messages to this owner, in one statement.
CLAIM = """
    UPDATE kombu_message
       SET lease_expires_at = :lease_until, lease_owner = :owner,
           delivery_count = delivery_count + 1
     WHERE id IN ({next})
    RETURNING id, priority, delivery_count, expires_at, rank, payload
"""

#: Take without a lease, for consumers that do not ack (no_ack).
TAKE = """
    DELETE FROM kombu_message WHERE id IN ({next})
    RETURNING id, priority, delivery_count + 1, expires_at, rank, payload
"""

#: The ready priority levels of a queue, one index probe each.
NEXT_LEVEL = """SELECT min(rank) FROM kombu_message
                 WHERE queue = ? AND lease_expires_at IS NULL AND rank > ?"""

DEAD_LETTER = """
    INSERT INTO kombu_dead_letter (queue, priority, delivery_count, reason, dead_at,
                                   client, task_name, task_id, published_at, payload)
    SELECT queue, priority, delivery_count - :undelivered, :reason, :now, client,
           task_name, task_id,
           published_at, payload
      FROM kombu_message WHERE id = :id
"""

#: Ack: delete the rows (a JSON array of ids) still leased to this owner.
ACK_MANY = """DELETE FROM kombu_message
               WHERE id IN (SELECT value FROM json_each(:ids))
                 AND (lease_owner = :owner OR lease_owner IS NULL)
              RETURNING queue"""

RELEASE = """UPDATE kombu_message SET lease_expires_at = NULL, lease_owner = NULL
              WHERE id = ? AND lease_owner = ? RETURNING queue"""

RENEW = 'UPDATE kombu_message SET lease_expires_at = ? WHERE lease_owner = ?'

EXPIRE_LEASES = """UPDATE kombu_message SET lease_expires_at = NULL, lease_owner = NULL
                    WHERE lease_expires_at <= ?
                   RETURNING queue, delivery_count > 0"""

EXPIRE_MESSAGES = """DELETE FROM kombu_message
                      WHERE expires_at <= ? AND lease_owner IS NULL
                     RETURNING queue"""

BUMP_COUNTER = """
    INSERT INTO kombu_counter (queue, name, value) VALUES (?, ?, ?)
    ON CONFLICT (queue, name) DO UPDATE SET value = value + excluded.value
"""

#: The same counts in 10-second buckets, kept for an hour.
BUCKET_SECONDS = 10
BUMP_RECENT = """
    INSERT INTO kombu_counter_recent (bucket, queue, name, value) VALUES (?, ?, ?, ?)
    ON CONFLICT (bucket, queue, name) DO UPDATE SET value = value + excluded.value
"""

COUNT_READY = """SELECT count(*) FROM (SELECT 1 FROM kombu_message
                  WHERE queue = ? AND lease_expires_at IS NULL LIMIT ?)"""

#: drop-head: the oldest message of the lowest priority (highest number).
DROP_HEAD = """
    DELETE FROM kombu_message WHERE id = (
        SELECT id FROM kombu_message WHERE queue = ? AND lease_expires_at IS NULL
         ORDER BY priority DESC, id LIMIT 1)
"""


class Store(Catalog):
    """All SQL on messages lives here, one named statement per concern."""

    max_deliveries = 20
    max_length_block_timeout = 10.0

    def __init__(self, path, max_deliveries=20, max_length_block_timeout=10.0, **kwargs):
        self.max_deliveries = int(max_deliveries)
        self.max_length_block_timeout = float(max_length_block_timeout)
        self.counters = Counter()  # hot-path counts, flushed by the housekeeper
        super().__init__(path, **kwargs)

    # -- publishing ------------------------------------------------------------------

    def publish_params(self, message: dict, priority: int, now: float,
                       deliver_at: float | None = None) -> dict:
        props = message.get('properties') or {}
        headers = message.get('headers') or {}
        expiration = props.get('expiration')
        held = deliver_at if deliver_at is not None and deliver_at > now else None
        return {
            'priority': priority,
            'visible_at': held or now,
            'held_until': held,
            'expires_at': now + float(expiration) / 1000.0 if expiration else None,
            'client': _text(headers.get('x-client')),
            'task_name': _text(headers.get('task')),
            'task_id': _text(headers.get('id')),
            'now': now,
            'payload': dumps(message),
        }

    @retry_busy
    def publish(self, queue: str, params: dict) -> int:
        """Publish to one queue by name."""
        scheduling, max_length, _, _ = self.queue_policy(queue)
        if max_length is None and scheduling != 'fair':
            n = self.conn.execute(PUBLISH_TO_QUEUE, dict(params, queue=queue)).rowcount
        else:
            n = self._publish_with_policies([queue], params)
        self.counters[queue, 'published'] += n
        return n

    @retry_busy
    def publish_routed(self, exchange: str, type: str, routing_key: str,
                       params: dict) -> int:
        """Insert one copy per queue bound to ``exchange`` that matches."""
        match = ROUTING_RULES[type]
        args = dict(params, exchange=exchange, routing_key=routing_key or '')
        if not self.conn.execute(ROUTED_POLICIES.format(match=match), args).fetchone():
            queues = [r[0] for r in self.conn.execute(
                PUBLISH_ROUTED.format(match=match) + ' RETURNING queue', args)]
        else:
            queues = [r[0] for r in self.conn.execute(ROUTED_QUEUES.format(match=match), args)]
            self._publish_with_policies(queues, params)
        for queue in queues:
            self.counters[queue, 'published'] += 1
        return len(queues)

    def _publish_with_policies(self, queues, params) -> int:
        """Insert copies one by one, applying x-max-length and fair tags."""
        deadline = None
        while True:
            try:
                with self.transaction() as conn:
                    for queue in queues:
                        self._insert_one(conn, queue, params)
                return len(queues)
            except _Full as full:
                if full.overflow == 'block':
                    if deadline is None:
                        deadline = time.monotonic() + self.max_length_block_timeout
                    if time.monotonic() < deadline:
                        time.sleep(0.02)
                        continue
                self.bump({(full.queue, 'rejected_publish'): 1})
                raise QueueFull(full.queue, full.max_length) from None

    def _insert_one(self, conn, queue, params):
        scheduling, max_length, overflow, _ = self.queue_policy(queue)
        if max_length is not None:
            ready = conn.execute(COUNT_READY, (queue, max_length)).fetchone()[0]
            if ready >= max_length:
                if overflow != 'drop-head' or max_length == 0:
                    raise _Full(queue, max_length, overflow)
                conn.execute(DROP_HEAD, (queue,))
                conn.execute(BUMP_COUNTER, (queue, 'dropped', 1))
        ttl = conn.execute('SELECT message_ttl FROM kombu_queue WHERE name = ?',
                           (queue,)).fetchone()
        expires = [t for t in (params['expires_at'],
                               ttl and ttl[0] is not None and params['now'] + ttl[0]) if t]
        rank = params['priority']
        if scheduling in ('fifo', 'lifo'):
            rank = 0
        elif scheduling == 'fair':
            rank = params['priority'] << FAIR_BITS | self._fair_tag(
                conn, queue, params['priority'], params['client'] or '')
        conn.execute(INSERT_ONE, dict(params, queue=queue, rank=rank,
                                      expires_at=min(expires) if expires else None))

    def _fair_tag(self, conn, queue, priority, client):
        """Start-time fair queueing: a client's next tag is one past the later
        of its own last tag and the last tag delivered at this priority."""
        rows = dict(conn.execute(
            "SELECT client, tag FROM kombu_fair WHERE queue = ? AND priority = ? "
            "AND client IN ('', ?)", (queue, priority, client)))
        tag = max(rows.get('', 0), rows.get(client, 0)) + 1
        conn.execute(
            'INSERT INTO kombu_fair (queue, priority, client, tag) VALUES (?, ?, ?, ?) '
            'ON CONFLICT (queue, priority, client) DO UPDATE SET tag = excluded.tag',
            (queue, priority, client, tag))
        return tag

    # -- claiming -----------------------------------------------------------------------

    @retry_busy
    def claim(self, queue: str, owner: str, limit: int, lease_until: float,
              no_ack: bool = False, acks=()) -> list[tuple[int, int, int, dict]]:
        """Claim up to ``limit`` messages: [(id, priority, delivery_count, message)].

        ``acks``, ids this owner acked since its last claim, are deleted in
        the same transaction: one write lock for a whole prefetch window.
        """
        now = time.time()
        statement = (TAKE if no_ack else CLAIM)
        with self.transaction() as conn:
            acked = self._ack_many(conn, acks, owner)
            scheduling, _, _, arguments = self.queue_policy(queue)
            params = {'queue': queue, 'owner': owner, 'lease_until': lease_until}
            if scheduling == 'weighted-random':
                rows = []
                for _ in range(limit):
                    level = self._pick_level(conn, queue, arguments)
                    if level is None:
                        break
                    rows += self._claim_rows(conn, statement, 'level', queue, now,
                                             dict(params, rank=level, limit=1))
            else:
                order = 'lifo' if scheduling == 'lifo' else 'forward'
                rows = self._claim_rows(conn, statement, order, queue, now,
                                        dict(params, limit=limit))
            if scheduling == 'fair' and rows:
                self._advance_fair_clock(conn, queue, rows)
        self.counters.update(acked)
        if scheduling == 'lifo':
            rows.sort(key=lambda r: (-r[4], -r[0]))
        elif scheduling != 'weighted-random':
            rows.sort(key=lambda r: (r[4], r[0]))
        return [(r[0], r[1], r[2], loads(r[5])) for r in rows]

    def _claim_rows(self, conn, statement, order, queue, now, params):
        """Run the claim, dropping expired rows and dead-lettering poison ones."""
        sql = statement.format(next=NEXT_READY[order])
        while True:
            rows = conn.execute(sql, params).fetchall()
            expired = [r[0] for r in rows if r[3] is not None and r[3] <= now]
            dead = [r[0] for r in rows if r[2] > self.max_deliveries and r[0] not in expired]
            if not expired and not dead:
                return rows
            for message_id in expired:
                # Expired before delivery: dropped and counted, as AMQP does.
                conn.execute('DELETE FROM kombu_message WHERE id = ?', (message_id,))
            for message_id in dead:
                self._dead_letter(conn, message_id, 'max_deliveries', now)
            conn.execute(BUMP_COUNTER, (queue, 'expired', len(expired)))
            conn.execute(BUMP_COUNTER, (queue, 'dead_lettered', len(dead)))
            skipped = set(expired) | set(dead)
            if len(skipped) < len(rows):
                return [r for r in rows if r[0] not in skipped]

    def _dead_letter(self, conn, message_id, reason, now):
        # A claim that finds a message over its limit counted a delivery that
        # never happened: take it back off the record.
        undelivered = 1 if reason == 'max_deliveries' else 0
        conn.execute(DEAD_LETTER, {'id': message_id, 'reason': reason, 'now': now,
                                   'undelivered': undelivered})
        conn.execute('DELETE FROM kombu_message WHERE id = ?', (message_id,))

    def _pick_level(self, conn, queue, arguments):
        """Choose a ready priority level at random, weighted (weighted-random)."""
        levels, rank = [], -1
        while True:
            rank = conn.execute(NEXT_LEVEL, (queue, rank)).fetchone()[0]
            if rank is None:
                break
            levels.append(rank)
        if not levels:
            return None
        weights = priority_weights(arguments, queue)
        return random.choices(
            levels, [weights.get(p, default_weight(p)) for p in levels])[0]

    def _advance_fair_clock(self, conn, queue, rows):
        latest = {}
        for r in rows:
            priority, tag = r[4] >> FAIR_BITS, r[4] & FAIR_MASK
            latest[priority] = max(latest.get(priority, 0), tag)
        conn.executemany(
            "INSERT INTO kombu_fair (queue, priority, client, tag) VALUES (?, ?, '', ?) "
            "ON CONFLICT (queue, priority, client) DO UPDATE SET tag = max(tag, excluded.tag)",
            [(queue, p, t) for p, t in latest.items()])

    # -- settling --------------------------------------------------------------------------

    @retry_busy
    def ack_many(self, message_ids, owner: str) -> int:
        """Delete acked messages; one statement, so no transaction of its own."""
        acked = self._ack_many(self.conn, message_ids, owner)
        self.counters.update(acked)
        return sum(acked.values())

    def _ack_many(self, conn, message_ids, owner) -> Counter:
        if not message_ids:
            return Counter()
        rows = conn.execute(ACK_MANY, {'ids': dumps(list(message_ids)), 'owner': owner})
        return Counter((queue, 'acked') for (queue,) in rows)

    @retry_busy
    def release(self, message_ids, owner: str) -> int:
        """Make leased messages deliverable again at once (requeue)."""
        with self.transaction() as conn:
            queues = [row[0] for i in message_ids for row in conn.execute(RELEASE, (i, owner))]
        for queue in queues:
            self.counters[queue, 'requeued'] += 1
        return len(queues)

    @retry_busy
    def reject(self, message_id: int, queue: str | None = None) -> None:
        """Reject without requeue: kept as a dead letter, never dropped silently."""
        with self.transaction() as conn:
            self._dead_letter(conn, message_id, 'rejected', time.time())
            conn.execute(BUMP_COUNTER, (queue or '', 'dead_lettered', 1))

    @retry_busy
    def renew(self, owner: str, lease_until: float) -> int:
        """Extend every lease held by ``owner``: the holder is alive."""
        return self.conn.execute(RENEW, (lease_until, owner)).rowcount

    @retry_busy
    def sweep(self, now: float | None = None) -> dict:
        """Due messages and expired leases back to ready; expired messages and
        queues dropped; the counts added to the counters."""
        now = time.time() if now is None else now
        counts = Counter()
        for queue, was_leased in self.conn.execute(EXPIRE_LEASES, (now,)).fetchall():
            counts[queue, 'lease_expired' if was_leased else 'delayed_due'] += 1
        for (queue,) in self.conn.execute(EXPIRE_MESSAGES, (now,)).fetchall():
            counts[queue, 'expired'] += 1
        queues = self.sweep_expired_queues(now)
        self.bump(counts)
        self.conn.execute('DELETE FROM kombu_counter_recent WHERE bucket < ?',
                          (int((now - 3600) // BUCKET_SECONDS),))
        return {'leases_expired': sum(n for (_, k), n in counts.items() if k == 'lease_expired'),
                'messages_expired': sum(n for (_, k), n in counts.items() if k == 'expired'),
                'queues_expired': queues}

    @retry_busy
    def bump(self, counts) -> None:
        """Add to the persistent counters: {(queue, name): n}."""
        rows = [(q, name, n) for (q, name), n in counts.items() if n]
        if rows:
            bucket = int(time.time() // BUCKET_SECONDS)
            with self.transaction() as conn:
                conn.executemany(BUMP_COUNTER, rows)
                conn.executemany(BUMP_RECENT, [(bucket, *row) for row in rows])

    def flush_counters(self) -> None:
        """Write the in-memory hot-path counts (published, acked) to the file."""
        counts, self.counters = self.counters, Counter()
        try:
            self.bump(counts)
        except Exception:
            self.counters.update(counts)
            raise

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


class _Full(Exception):
    """A queue at x-max-length; rolls the publish back."""

    def __init__(self, queue, max_length, overflow):
        self.queue, self.max_length, self.overflow = queue, max_length, overflow


def _text(value):
    return None if value is None else str(value)
