"""Messages: publish, claim, ack, release, lease renewal and sweeping.

A row is ready while ``lease_expires_at`` is NULL.  Claiming stamps a lease;
ack deletes the row; a lease that runs out makes the row ready again; the
``delivery_count`` column says how often it was handed out.  A delayed
message is a row leased by nobody (``lease_owner`` NULL) until it is due.
``rank`` is the claim's sort key, fixed at publish by the queue's scheduling
strategy, so every strategy but weighted-random is one indexed walk.
"""
from __future__ import annotations

import atexit
import logging
import os
import random
import time
import weakref
from collections import Counter

from kombu.utils.json import dumps, loads

from .catalog import Catalog, default_weight, priority_weights
from .db import Database, retry_busy
from .errors import QueueFull
from .options import Options

logger = logging.getLogger(__name__)

#: rank = priority << FAIR_BITS | tag for 'fair' queues.
FAIR_BITS = 40
FAIR_MASK = (1 << FAIR_BITS) - 1

_COLUMNS = ('queue, priority, rank, visible_at, lease_expires_at, expires_at, client, '
            'task_name, task_id, published_at, payload')

# The message's own expiry and the queue's x-message-ttl: the earlier wins.
# fifo and lifo queues ignore priority: their rank is 0.
# ``:rank`` is given only for 'fair' queues, whose tag needs a lookup first.
_VALUES = """:priority,
    coalesce(:rank, CASE WHEN q.scheduling IN ('fifo', 'lifo') THEN 0 ELSE :priority END),
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

#: exchange type -> (policies, insert, queues): the three routed statements,
#: formatted once rather than on every publish.
ROUTED = {type: (ROUTED_POLICIES.format(match=match),
                 PUBLISH_ROUTED.format(match=match) + ' RETURNING queue',
                 ROUTED_QUEUES.format(match=match))
          for type, match in ROUTING_RULES.items()}


#: The next ready messages of a queue, one statement per delivery order: the
#: claim takes their ids, ``peek`` shows them.  ``before`` is the same order
#: as a comparison, for ``position``.
NEXT_READY = {
    'forward': """SELECT {columns} FROM kombu_message
                   WHERE queue = :queue AND lease_expires_at IS NULL
                   ORDER BY rank, id LIMIT :limit""",
    'lifo': """SELECT {columns} FROM kombu_message
                WHERE queue = :queue AND lease_expires_at IS NULL
                ORDER BY rank DESC, id DESC LIMIT :limit""",
    'level': """SELECT {columns} FROM kombu_message
                 WHERE queue = :queue AND lease_expires_at IS NULL AND rank = :rank
                 ORDER BY id LIMIT :limit""",
}
BEFORE = {'forward': '(rank, id) < (:rank, :id)', 'lifo': '(rank, id) > (:rank, :id)',
          'level': 'rank = :rank AND id < :id'}

#: Is anything ready in a queue?  A read, so a claim that would find nothing
#: never takes the write lock (a consumer looks at every queue it consumes,
#: the remote-control one included, after each commit by any process).
ANY_READY = 'SELECT 1 FROM kombu_message WHERE queue = ? AND lease_expires_at IS NULL LIMIT 1'

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

#: (statement, order) -> SQL, formatted once.
CLAIMS = {(statement, order): statement.format(next=sql.format(columns='id'))
          for statement in (CLAIM, TAKE) for order, sql in NEXT_READY.items()}

#: The ready priority levels of a queue, one index probe each.
NEXT_LEVEL = """SELECT min(rank) FROM kombu_message
                 WHERE queue = ? AND lease_expires_at IS NULL AND rank > ?"""

#: Move a message still leased to ``:owner`` to the dead letters.
DEAD_LETTER = """
    INSERT INTO kombu_dead_letter (queue, priority, delivery_count, reason, dead_at,
                                   client, task_name, task_id, published_at, payload)
    SELECT queue, priority, delivery_count - :undelivered, :reason, :now, client,
           task_name, task_id, published_at, payload
      FROM kombu_message WHERE id = :id AND lease_owner IS :owner
"""
DELETE_LEASED = 'DELETE FROM kombu_message WHERE id = :id AND lease_owner IS :owner'

#: A dead letter of a message no longer in the table (taken by a no-ack claim).
DEAD_LETTER_TAKEN = """
    INSERT INTO kombu_dead_letter (queue, priority, delivery_count, reason, dead_at,
                                   published_at, payload)
    VALUES (:queue, :priority, :delivery_count, :reason, :now, :now, :payload)
"""

#: Ack: delete the rows (a JSON array of ids) still leased to this owner; a
#: lease that ran out (a stopped or too slow consumer) is not ours any more.
ACK_MANY = """DELETE FROM kombu_message
               WHERE id IN (SELECT value FROM json_each(:ids)) AND lease_owner = :owner
              RETURNING id, queue"""

RELEASE = """UPDATE kombu_message SET lease_expires_at = NULL, lease_owner = NULL
              WHERE id IN (SELECT value FROM json_each(:ids)) AND lease_owner = :owner
             RETURNING id, queue"""

RENEW = 'UPDATE kombu_message SET lease_expires_at = ? WHERE lease_owner = ?'

# Two clocks share lease_expires_at: a lease (lease_owner set) ends at a
# CLOCK_MONOTONIC time, immune to wall-clock steps; a delayed message
# (lease_owner NULL) is due at its wall-clock ETA, as Celery defines it.
EXPIRE_LEASES = """UPDATE kombu_message SET lease_expires_at = NULL, lease_owner = NULL
                    WHERE lease_expires_at <= :monotonic AND lease_owner IS NOT NULL
                   RETURNING queue"""

RELEASE_DUE = """UPDATE kombu_message SET lease_expires_at = NULL
                  WHERE lease_expires_at <= :wall AND lease_owner IS NULL
                 RETURNING queue"""

#: A new boot restarts CLOCK_MONOTONIC: no lease of an earlier boot holds.
BOOT_ID = "SELECT value FROM kombu_meta WHERE name = 'boot_id'"
RELEASE_ALL_LEASES = """UPDATE kombu_message SET lease_expires_at = NULL, lease_owner = NULL
                         WHERE lease_owner IS NOT NULL"""
SET_BOOT_ID = """INSERT INTO kombu_meta (name, value) VALUES ('boot_id', ?)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value"""

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

#: A Celery task's message: task_id is the ``id`` header, stored at publish.
TASK_MESSAGE = 'queue = :queue AND task_id = :task_id'

#: Waiting = ready or held until due (a delayed row has no lease owner).
REMOVE_WAITING = f'DELETE FROM kombu_message WHERE {TASK_MESSAGE} AND lease_owner IS NULL'


class Store:
    """All SQL on messages lives here, one named statement per concern.

    Composed of the :class:`~kombu_sqlite.db.Database` it writes through and
    the :class:`~kombu_sqlite.catalog.Catalog` whose queue policies it obeys.
    """

    def __init__(self, db, catalog, max_deliveries=20, max_length_block_timeout=10.0):
        self.db = db
        self.catalog = catalog
        self.max_deliveries = int(max_deliveries)
        self.max_length_block_timeout = float(max_length_block_timeout)
        self.counters = Counter()  # hot-path counts, flushed by the housekeeper
        self.pid = os.getpid()     # a forked child's copy of the counters is not its own
        _LIVE.add(self)

    @classmethod
    def open(cls, path: str, options: Options, read_only: bool = False) -> Store:
        """The database at ``path`` with its catalog and this store, composed."""
        db = Database(path, options.busy_timeout, options.synchronous,
                      options.max_page_count, read_only=read_only)
        store = cls(db, Catalog(db), options.max_deliveries, options.max_length_block_timeout)
        if not read_only:
            store.adopt_boot()
        return store

    @property
    def path(self) -> str:
        return self.db.path

    @property
    def conn(self):
        return self.db.conn

    def close(self) -> None:
        _LIVE.discard(self)
        self.db.close()

    # -- publishing ------------------------------------------------------------------

    def publish_params(self, message: dict, priority: int, now: float,
                       deliver_at: float | None = None) -> dict:
        props = message.get('properties') or {}
        headers = message.get('headers') or {}
        expiration = props.get('expiration')
        held = deliver_at if deliver_at is not None and deliver_at > now else None
        return {
            'priority': priority,
            'rank': None,
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
        scheduling, max_length, _, _ = self.catalog.queue_policy(queue)
        if max_length is None and scheduling != 'fair':
            with self.db.transaction() as conn:  # quick lock waits: see db.QUICK_LOCK_WAITS
                n = conn.execute(PUBLISH_TO_QUEUE, dict(params, queue=queue)).rowcount
        else:
            n = self._publish_with_policies([queue], params)
        self.counters[queue, 'published'] += n
        return n

    @retry_busy
    def publish_routed(self, exchange: str, type: str, routing_key: str,
                       params: dict) -> int:
        """Insert one copy per queue bound to ``exchange`` that matches."""
        policies, insert, routed_queues = ROUTED[type]
        args = dict(params, exchange=exchange, routing_key=routing_key or '')
        conn = self.db.conn
        if not conn.execute(policies, args).fetchone():
            with self.db.transaction() as conn:  # quick lock waits: see db.QUICK_LOCK_WAITS
                queues = [r[0] for r in conn.execute(insert, args)]
        else:
            queues = [r[0] for r in conn.execute(routed_queues, args)]
            self._publish_with_policies(queues, params)
        for queue in queues:
            self.counters[queue, 'published'] += 1
        return len(queues)

    def _publish_with_policies(self, queues, params) -> int:
        """Insert copies one by one, applying x-max-length and fair tags."""
        deadline = None
        while True:
            try:
                with self.db.transaction() as conn:
                    for queue in queues:
                        self.insert_one(conn, queue, params)
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

    def insert_one(self, conn, queue, params):
        """Insert one copy inside ``conn``'s transaction, obeying the queue's policy."""
        scheduling, max_length, overflow, _ = self.catalog.queue_policy(queue)
        if max_length is not None:
            ready = conn.execute(COUNT_READY, (queue, max_length)).fetchone()[0]
            if ready >= max_length:
                if overflow != 'drop-head' or max_length == 0:
                    raise _Full(queue, max_length, overflow)
                conn.execute(DROP_HEAD, (queue,))
                conn.execute(BUMP_COUNTER, (queue, 'dropped', 1))
        rank = None
        if scheduling == 'fair':
            rank = params['priority'] << FAIR_BITS | self._fair_tag(
                conn, queue, params['priority'], params['client'] or '')
        conn.execute(PUBLISH_TO_QUEUE, dict(params, queue=queue, rank=rank))

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
              no_ack: bool = False, acks=()):
        """Claim up to ``limit`` messages.

        Returns ``(messages, late)``: messages as [(id, priority,
        delivery_count, message)] in delivery order, and the ids among
        ``acks`` whose lease this owner had lost.  ``acks``, ids this owner
        acked since its last claim, are deleted in the same transaction: one
        write lock for a whole prefetch window.  A message that cannot be
        decoded is dead-lettered with the reason; its batch-mates are not
        held up by it.  With no acks to write and nothing ready, no write
        transaction is begun.
        """
        if not acks and self.db.conn.execute(ANY_READY, (queue,)).fetchone() is None:
            return [], []
        now = time.time()
        statement = (TAKE if no_ack else CLAIM)
        with self.db.transaction() as conn:
            acked, late = self._ack_many(conn, acks, owner)
            scheduling, _, _, arguments = self.catalog.queue_policy(queue)
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
                # RETURNING gives rows in no promised order.
                if order == 'lifo':
                    rows.sort(key=lambda r: (-r[4], -r[0]))
                else:
                    rows.sort(key=lambda r: (r[4], r[0]))
            if scheduling == 'fair' and rows:
                self._advance_fair_clock(conn, queue, rows)
            messages = self._decoded(conn, rows, queue, owner, no_ack, now)
        self.counters.update(acked)
        return messages, late

    def _decoded(self, conn, rows, queue, owner, no_ack, now):
        messages = []
        for r in rows:
            try:
                message = loads(r[5])
                _check_shape(message)
            except Exception as exc:  # poison: it alone goes to the dead letters
                reason = f'undecodable: {type(exc).__name__}: {exc}'
                logger.error('kombu-sqlite: message %s in queue %r cannot be decoded (%s); '
                             'moved to the dead letters', r[0], queue, reason)
                if no_ack:
                    self._dead_letter_taken(conn, queue, r[1], r[2], reason, r[5], now)
                else:
                    self._dead_letter(conn, r[0], owner, reason, now, undelivered=1)
                conn.execute(BUMP_COUNTER, (queue, 'dead_lettered', 1))
                continue
            messages.append((r[0], r[1], r[2], message))
        return messages

    def _claim_rows(self, conn, statement, order, queue, now, params):
        """Run the claim, dropping expired rows and dead-lettering poison ones."""
        sql = CLAIMS[statement, order]
        while True:
            rows = conn.execute(sql, params).fetchall()
            expired = [r[0] for r in rows if r[3] is not None and r[3] <= now]
            dead = [r[0] for r in rows if r[2] > self.max_deliveries and r[0] not in expired]
            if not expired and not dead:
                return rows
            for message_id in expired:
                # Expired before delivery: dropped and counted, as AMQP does.
                conn.execute('DELETE FROM kombu_message WHERE id = ?', (message_id,))
            for r in rows:
                if r[0] not in dead:
                    continue
                if statement is TAKE:   # the row is gone already: keep its copy
                    self._dead_letter_taken(conn, queue, r[1], r[2] - 1, 'max_deliveries',
                                            r[5], now)
                else:
                    self._dead_letter(conn, r[0], params['owner'], 'max_deliveries', now,
                                      undelivered=1)
            conn.execute(BUMP_COUNTER, (queue, 'expired', len(expired)))
            conn.execute(BUMP_COUNTER, (queue, 'dead_lettered', len(dead)))
            skipped = set(expired) | set(dead)
            if len(skipped) < len(rows):
                return [r for r in rows if r[0] not in skipped]

    def _dead_letter(self, conn, message_id, owner, reason, now, undelivered=0) -> bool:
        """Move a row leased to ``owner`` to the dead letters; False if not ours.

        A claim that dead-letters a message it never delivered counted a
        delivery that did not happen: ``undelivered`` takes it back off.
        """
        args = {'id': message_id, 'owner': owner, 'reason': reason, 'now': now,
                'undelivered': undelivered}
        if not conn.execute(DEAD_LETTER, args).rowcount:
            return False
        conn.execute(DELETE_LEASED, args)
        return True

    def _dead_letter_taken(self, conn, queue, priority, delivery_count, reason, payload, now):
        conn.execute(DEAD_LETTER_TAKEN, {
            'queue': queue, 'priority': priority, 'delivery_count': delivery_count,
            'reason': reason, 'now': now, 'payload': payload})

    @retry_busy
    def bury(self, message_id: int, owner: str, queue: str, reason: str,
             taken: dict | None = None) -> None:
        """Dead-letter a delivered message kombu cannot turn into a Message.

        ``taken`` is the message itself when a no-ack claim already removed
        its row.
        """
        now = time.time()
        with self.db.transaction() as conn:
            if taken is None:
                self._dead_letter(conn, message_id, owner, reason, now, undelivered=1)
            else:
                props = taken.get('properties') or {}
                info = props.get('delivery_info') or {}
                self._dead_letter_taken(conn, queue, props.get('priority', 0),
                                        info.get('delivery_count', 1), reason,
                                        dumps(taken), now)
            conn.execute(BUMP_COUNTER, (queue, 'dead_lettered', 1))

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

    # -- settling: only on a lease the caller still owns ---------------------------------

    @retry_busy
    def ack_many(self, message_ids, owner: str) -> list[int]:
        """Delete acked messages; one statement, so no transaction of its own.

        Returns the ids whose lease ``owner`` had lost (late acks: nothing done).
        """
        acked, late = self._ack_many(self.db.conn, message_ids, owner)
        self.counters.update(acked)
        return late

    def _ack_many(self, conn, message_ids, owner):
        if not message_ids:
            return Counter(), []
        rows = conn.execute(ACK_MANY, {'ids': dumps(list(message_ids)), 'owner': owner}
                            ).fetchall()
        done = {i for i, _ in rows}
        return (Counter((queue, 'acked') for _, queue in rows),
                [i for i in message_ids if i not in done])

    @retry_busy
    def release(self, message_ids, owner: str) -> list[int]:
        """Make leased messages deliverable again at once (requeue).

        Returns the ids whose lease ``owner`` had lost (nothing done to them).
        """
        if not message_ids:
            return []
        rows = self.db.conn.execute(
            RELEASE, {'ids': dumps(list(message_ids)), 'owner': owner}).fetchall()
        for _, queue in rows:
            self.counters[queue, 'requeued'] += 1
        done = {i for i, _ in rows}
        return [i for i in message_ids if i not in done]

    @retry_busy
    def reject(self, message_id: int, owner: str, queue: str) -> bool:
        """Reject without requeue: kept as a dead letter, never dropped silently.

        False if ``owner`` had lost the lease: then nothing is done.
        """
        with self.db.transaction() as conn:
            if not self._dead_letter(conn, message_id, owner, 'rejected', time.time()):
                return False
            conn.execute(BUMP_COUNTER, (queue or '', 'dead_lettered', 1))
        return True

    @retry_busy
    def renew(self, owner: str, lease_until: float) -> int:
        """Extend every lease held by ``owner``: the holder is alive."""
        return self.db.conn.execute(RENEW, (lease_until, owner)).rowcount

    @retry_busy
    def sweep(self) -> dict:
        """Due messages and expired leases back to ready; expired messages and
        queues dropped; the counts added to the counters."""
        wall, monotonic = time.time(), time.monotonic()
        conn = self.db.conn
        counts = Counter()
        for (queue,) in conn.execute(EXPIRE_LEASES, {'monotonic': monotonic}).fetchall():
            counts[queue, 'lease_expired'] += 1
        for (queue,) in conn.execute(RELEASE_DUE, {'wall': wall}).fetchall():
            counts[queue, 'delayed_due'] += 1
        for (queue,) in conn.execute(EXPIRE_MESSAGES, (wall,)).fetchall():
            counts[queue, 'expired'] += 1
        queues = self._sweep_expired_queues(monotonic)
        self.bump(counts)
        conn.execute('DELETE FROM kombu_counter_recent WHERE bucket < ?',
                     (int((wall - 3600) // BUCKET_SECONDS),))
        return {'leases_expired': sum(n for (_, k), n in counts.items() if k == 'lease_expired'),
                'messages_expired': sum(n for (_, k), n in counts.items() if k == 'expired'),
                'queues_expired': queues}

    def _sweep_expired_queues(self, monotonic: float) -> list[str]:
        """Delete queues unused for longer than their x-expires, with their messages."""
        if not self.catalog.expired_queues(self.db.conn, monotonic):
            return []
        with self.db.transaction() as conn:
            names = self.catalog.expired_queues(conn, monotonic)
            for name in names:
                self._delete_queue(conn, name)
        return names

    @retry_busy
    def delete_queue(self, name: str) -> int:
        """Drop a queue with its messages and bindings; returns messages dropped."""
        with self.db.transaction() as conn:
            return self._delete_queue(conn, name)

    def _delete_queue(self, conn, name: str) -> int:
        dropped = conn.execute('DELETE FROM kombu_message WHERE queue = ?', (name,)).rowcount
        self.catalog.forget_queue(conn, name)
        return dropped

    @retry_busy
    def adopt_boot(self) -> None:
        """Release the leases of an earlier boot, whose monotonic clock is gone.

        No lease outlives a reboot: its holder is gone too.  Queue expiry
        clocks restart from now.
        """
        current = boot_id()
        if self.db.conn.execute(BOOT_ID).fetchone() == (current,):
            return
        with self.db.transaction() as conn:
            if conn.execute(BOOT_ID).fetchone() == (current,):
                return
            released = conn.execute(RELEASE_ALL_LEASES).rowcount
            self.catalog.restart_expiry_clocks(conn, time.monotonic())
            conn.execute(SET_BOOT_ID, (current,))
        if released:
            logger.warning('kombu-sqlite: %d leases of an earlier boot (or an older '
                           'kombu-sqlite) released in %s', released, self.db.path)

    @retry_busy
    def bump(self, counts) -> None:
        """Add to the persistent counters: {(queue, name): n}."""
        rows = [(q, name, n) for (q, name), n in counts.items() if n]
        if rows:
            bucket = int(time.time() // BUCKET_SECONDS)
            with self.db.transaction() as conn:
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
        return self.db.conn.execute(
            'SELECT count(*) FROM kombu_message '
            'WHERE queue = ? AND lease_expires_at IS NULL', (queue,)).fetchone()[0]

    @retry_busy
    def purge(self, queue: str) -> int:
        return self.db.conn.execute(
            'DELETE FROM kombu_message WHERE queue = ? AND lease_expires_at IS NULL',
            (queue,)).rowcount

    # -- looking (Broker and the kombu-sqlite command) ------------------------------------

    def queues(self, conn=None) -> list[str]:
        """Declared queues and queues that hold messages or dead letters."""
        rows = (conn or self.db.conn).execute(
            'SELECT name FROM kombu_queue UNION SELECT DISTINCT queue FROM kombu_message '
            'UNION SELECT DISTINCT queue FROM kombu_dead_letter ORDER BY 1')
        return [r[0] for r in rows]

    def figures(self, recent_since_bucket: int):
        """Per-queue rows for stats, all read in one transaction (one snapshot):
        (queues, ready, leased, dead, counters, recent)."""
        with self.db.snapshot() as conn:
            return (
                self.queues(conn),
                conn.execute(
                    'SELECT queue, priority, count(*), min(published_at) FROM kombu_message '
                    'WHERE lease_expires_at IS NULL GROUP BY queue, priority').fetchall(),
                conn.execute(
                    'SELECT queue, lease_owner, count(*) FROM kombu_message '
                    'WHERE lease_expires_at IS NOT NULL GROUP BY queue, lease_owner').fetchall(),
                conn.execute(
                    'SELECT queue, count(*) FROM kombu_dead_letter GROUP BY queue').fetchall(),
                conn.execute('SELECT queue, name, value FROM kombu_counter').fetchall(),
                conn.execute(
                    'SELECT queue, name, sum(value) FROM kombu_counter_recent '
                    'WHERE bucket >= ? GROUP BY queue, name', (recent_since_bucket,)).fetchall())

    def peek(self, queue: str, n: int):
        """The next ``n`` ready messages in delivery order (weighted-random: in
        priority order, its most likely order)."""
        scheduling = self.catalog.queue_policy(queue)[0]
        sql = NEXT_READY['lifo' if scheduling == 'lifo' else 'forward'].format(
            columns='id, task_name, task_id, priority, client, published_at, '
                    'delivery_count, payload')
        return self.db.conn.execute(sql, {'queue': queue, 'limit': n}).fetchall()

    def position(self, queue: str, task_id: str):
        """Messages delivered before this task's (expected, for weighted-random);
        None if it is not waiting."""
        conn = self.db.conn
        row = conn.execute(
            f'SELECT id, rank FROM kombu_message WHERE {TASK_MESSAGE} '
            f'AND lease_expires_at IS NULL', {'queue': queue, 'task_id': task_id}).fetchone()
        if row is None:
            return None
        message_id, rank = row
        scheduling, _, _, arguments = self.catalog.queue_policy(queue)
        order = {'lifo': 'lifo', 'weighted-random': 'level'}.get(scheduling, 'forward')
        ahead = conn.execute(
            f'SELECT count(*) FROM kombu_message WHERE queue = :queue '
            f'AND lease_expires_at IS NULL AND {BEFORE[order]}',
            {'queue': queue, 'rank': rank, 'id': message_id}).fetchone()[0]
        if scheduling != 'weighted-random':
            return ahead
        counts = dict(conn.execute(
            'SELECT rank, count(*) FROM kombu_message WHERE queue = ? '
            'AND lease_expires_at IS NULL GROUP BY rank', (queue,)))
        weights = priority_weights(arguments, queue)
        weight = lambda p: weights.get(p, default_weight(p))  # noqa: E731
        # Our level needs ahead+1 draws; each comes with w_l/w_p draws of every
        # other non-empty level on average, at most as many as it holds.
        draws = ahead + 1
        return ahead + sum(min(n, draws * weight(p) / weight(rank))
                           for p, n in counts.items() if p != rank)

    @retry_busy
    def remove(self, queue: str, task_id: str) -> int:
        """Delete this task's waiting message (ready or held until due), never
        a leased one; returns how many were deleted."""
        with self.db.transaction() as conn:
            n = conn.execute(REMOVE_WAITING, {'queue': queue, 'task_id': task_id}).rowcount
            if n:
                conn.execute(BUMP_COUNTER, (queue, 'removed', n))
        return n

    # -- dead letters ------------------------------------------------------------------

    def dead_letters(self, queue=None, limit=None):
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
        return self.db.conn.execute(sql, args).fetchall()

    @staticmethod
    def _dead_filter(queue, ids):
        clauses, args = [], []
        if queue is not None:
            clauses.append('queue = ?')
            args.append(queue)
        if ids is not None:
            ids = list(ids)
            clauses.append('id IN (SELECT value FROM json_each(?))')
            args.append(dumps(ids))
        return (' WHERE ' + ' AND '.join(clauses)) if clauses else '', args

    @retry_busy
    def requeue_dead(self, queue=None, ids=None) -> int:
        """Put dead letters back on their queue with a fresh delivery count."""
        where, args = self._dead_filter(queue, ids)
        now = time.time()
        with self.db.transaction() as conn:
            rows = conn.execute(
                f'SELECT id, queue, priority, payload FROM kombu_dead_letter{where}',
                args).fetchall()
            for dead_id, q, priority, payload in rows:
                message = loads(payload)
                message['redelivered'] = False
                self.insert_one(conn, q, self.publish_params(message, priority, now))
                conn.execute('DELETE FROM kombu_dead_letter WHERE id = ?', (dead_id,))
        return len(rows)

    @retry_busy
    def purge_dead(self, queue=None, ids=None) -> int:
        where, args = self._dead_filter(queue, ids)
        return self.db.conn.execute(f'DELETE FROM kombu_dead_letter{where}', args).rowcount


#: Stores of this process, whose counters are written when it exits normally.
_LIVE = weakref.WeakSet()


@atexit.register
def _flush_at_exit():
    for store in list(_LIVE):
        if store.counters and store.pid == os.getpid():
            try:
                store.flush_counters()
            except Exception as exc:  # exiting anyway: say what was not counted
                logger.warning('kombu-sqlite could not save counters at exit: %s', exc)


class _Full(Exception):
    """A queue at x-max-length; rolls the publish back."""

    def __init__(self, queue, max_length, overflow):
        self.queue, self.max_length, self.overflow = queue, max_length, overflow


def _check_shape(message) -> None:
    """Raise ValueError unless ``message`` has the shape kombu delivers."""
    props = message.get('properties') if isinstance(message, dict) else None
    if not isinstance(props, dict):
        raise ValueError('the stored message is not a kombu message (no properties)')
    info = props.setdefault('delivery_info', {})
    if not isinstance(info, dict):
        raise ValueError(f'delivery_info is {type(info).__name__}, not a mapping')
    if not isinstance(message.get('headers') or {}, dict):
        raise ValueError(f'headers are {type(message["headers"]).__name__}, not a mapping')


def boot_id() -> str:
    """This boot's id (Linux); CLOCK_MONOTONIC restarts with each boot."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f.read().strip()
    except OSError:  # pragma: no cover - not Linux: boot time, to the minute
        return str(round((time.time() - time.monotonic()) / 60))


def _text(value):
    return None if value is None else str(value)
