"""SQLite transport for kombu: Celery's broker in one file.

Messages live in one SQLite database in WAL mode, shared by every producer and
consumer process on the machine.  Nothing is kept only in process memory: a
consumer that is killed loses nothing.

Features
========

Priority
--------
The lowest number is served first (as on Celery's Redis transport), exact
integers 0-255 with no buckets, FIFO within a priority.  A message without a
priority gets ``default_priority``.  A priority outside 0-255 is refused at
publish time.

Leases (visibility timeout)
---------------------------
A delivery claims its rows in one write transaction
(``BEGIN IMMEDIATE; UPDATE ... WHERE id IN (SELECT ... ORDER BY priority, id
LIMIT n) RETURNING ...``) and stamps ``lease_expires_at = now +
visibility_timeout`` on CLOCK_MONOTONIC, so wall-clock steps neither rerun nor
delay anything.  A claim with no acks to write first reads whether anything is
ready, so looking at an empty queue takes no write lock.  Ack, reject and requeue act only on a lease the caller still
owns; a late one is counted (``late_settles``) and logged.  Messages claimed
but not yet handed to the application are released as soon as delivery stops.  Ack deletes the row; a channel with consumers deletes
its acked rows in the transaction of its next claim (at once in its drain
loop, within ``housekeeping_interval`` otherwise), so a prefetch window costs
one write lock, and a consumer killed before that gets those messages
delivered again, never lost.  Reject with requeue, recover, and
a channel closed with unacked messages clear the lease at once; reject without
requeue deletes the row.  While its holder lives a background thread renews
its leases, so a long task is never delivered twice; when the holder dies
(``kill -9``), the lease runs out and the message is delivered again with
``redelivered`` set and ``delivery_count`` incremented.  Up to the channel's
prefetch budget is claimed per transaction.

Routing across processes
------------------------
Exchanges and bindings (direct, topic and fanout) are stored in the database,
so a producer in one process reaches queues declared in another.  One SQL
statement routes and inserts a copy per bound queue.  Fanout is declared, so
Celery's remote control (``celery inspect``/``control``), worker events and
Flower work.  ``driver_type`` is ``'sqlite'`` (not ``'sql'``, for which Celery
turns events off).

Expiry
------
Queue arguments ``x-message-ttl`` and ``x-expires`` and a message's
``expiration`` are honoured (kombu's ``Queue(message_ttl=..., expires=...)``
map to them).  Expired messages are dropped and counted; queues unused for
longer than ``x-expires`` are deleted with their messages and bindings, so the
event and reply queues that Flower and ``celery inspect`` leave behind do not
accumulate.  Auto-delete queues are deleted when their last consumer cancels.

Dead letters
------------
A message delivered ``max_deliveries`` times without an ack, rejected without
requeue, or stored in a form that cannot be decoded (its batch-mates are
delivered normally), moves to the ``kombu_dead_letter`` table with its reason,
time and delivery count.  :class:`kombu_sqlite.Broker` lists, requeues and
purges them; nothing is dropped silently.

Delayed delivery
----------------
With ``native_delayed_delivery`` on, a Celery message whose ``eta`` header is
in the future (``countdown``, ``eta``, retries with backoff) is stored as
held until due: no worker keeps it in memory or renews a lease for it, and it
survives restarts of every worker.  Due messages are released by the
housekeeping sweep, so delivery is within ``housekeeping_interval`` of the ETA.

Backpressure
------------
Queue argument ``x-max-length`` bounds the ready messages of a queue;
``x-overflow`` says what happens to a publish when it is full:
``'reject-publish'`` (default) raises :class:`kombu_sqlite.QueueFull` at
once, ``'drop-head'`` drops the oldest message of the lowest priority and
counts it, ``'block'`` waits up to ``max_length_block_timeout`` seconds for
room, then raises QueueFull.

Scheduling strategies
---------------------
Queue argument ``x-scheduling``: ``'priority'`` (default: lowest number first,
FIFO within a priority), ``'fifo'`` (oldest first, priority ignored),
``'lifo'`` (newest first), ``'weighted-random'`` (a ready priority level is
chosen at random with weights from ``x-priority-weights``, a mapping of
priority to weight, by default ``0.5 ** priority``; FIFO within the level, so
no level starves) and ``'fair'`` (priority first, then round-robin across
clients named by the ``x-client`` message header, by start-time fair
queueing).  The strategy fixes each message's ``rank`` at publish time, so
the claim stays one indexed walk.

Wake-up
-------
A Celery worker consumes from kombu's event loop, the hub (the transport sets
``implements.asynchronous``, as Redis does), with the wake-up descriptor
registered as readable: a worker whose pool is busy still answers ``celery
inspect``, ``control`` and revokes with Celery's default settings (see
:mod:`kombu_sqlite.eventloop`).

An idle consumer blocks on an inotify watch of the ``-wal`` file (Linux) and
wakes within a millisecond of another process's commit, using no CPU while
idle; elsewhere it polls ``PRAGMA data_version`` every ``poll_interval``.

Errors
------
A full disk, a file locked past ``busy_timeout``, an I/O error or an unusable
URL raise :class:`kombu_sqlite.errors.DatabaseUnavailable` (a connection
error: kombu retries and fails over, Celery reconnects; a consumer logs it and
waits).  A corrupt file, another application's database (recognised by
``PRAGMA application_id`` before anything is written) or a newer schema raise
a fatal :class:`kombu_sqlite.DatabaseError` that says what to do.

Connection string
=================

.. code-block::

    sqlite:///relative/path/queue.db
    sqlite:////absolute/path/queue.db
    sqlite:////first.db;sqlite:////second.db   (kombu failover)

Queue arguments
===============

* ``x-message-ttl``: milliseconds a message may wait before it is dropped.
* ``x-expires``: milliseconds a queue may go unused before it is deleted.
* ``x-max-length``: most ready messages; ``x-overflow``: ``'reject-publish'``,
  ``'drop-head'`` or ``'block'``.
* ``x-scheduling``: ``'priority'``, ``'fifo'``, ``'lifo'``,
  ``'weighted-random'`` or ``'fair'``; ``x-priority-weights``: weights for
  weighted-random.

``import kombu_sqlite`` registers the ``sqlite`` scheme.  Without the import,
set ``broker_transport = 'kombu_sqlite.transport:Transport'`` (Celery) or pass
``transport='kombu_sqlite.transport:Transport'`` to ``kombu.Connection``.

Transport options
=================

* ``visibility_timeout``: seconds a claimed message stays leased before it is
  delivered again unless renewed (default ``60``).
* ``lease_renew_interval``: seconds between lease renewals by a live holder
  (default ``visibility_timeout / 4``).
* ``default_priority``: priority of messages published without one
  (default ``0``).
* ``max_claim``: most messages claimed in one transaction when the prefetch
  count is unlimited (default ``100``).
* ``polling_interval``: longest sleep of an idle consumer between checks when
  no wake-up arrives; in an event loop, the period of its safety timer
  (default ``0.5``).
* ``wakeup``: ``'auto'`` (inotify where available, else polling),
  ``'inotify'`` or ``'poll'`` (default ``'auto'``).
* ``poll_interval``: how often ``'poll'`` wake-up reads ``PRAGMA
  data_version``, in ``drain_events`` and in an event loop (default ``0.002``).
* ``prefetch_wait``: seconds ``drain_events`` waits for an ack while the
  prefetch budget is used up before it returns (``socket.timeout``) to its
  caller, which may hold the acks (Celery before 5.7 applies them between
  calls) (default ``0.005``).
* ``housekeeping_interval``: seconds between sweeps of expired leases,
  messages and queues; also the longest an idle consumer's acks wait to be
  written (default ``1.0``).
* ``max_deliveries``: deliveries without an ack before a message is
  dead-lettered (default ``20``).
* ``native_delayed_delivery``: hold Celery messages with a future ``eta`` in
  the broker until due (default ``True``).
* ``max_length_block_timeout``: seconds a publish to a full ``'block'`` queue
  waits for room (default ``10``).
* ``busy_timeout``: seconds a write waits for another writer; past it,
  ``DatabaseLocked`` names the file (default ``30``).
* ``max_page_count``: cap the file at this many pages (of 4 KiB), for a
  queue that must not fill the disk; publishing past it fails with a clear
  error and nothing already queued is lost (default: no cap).
* ``synchronous``: ``'NORMAL'`` (survives process crashes; the last commits
  may roll back on power loss) or ``'FULL'`` (survives power loss, slower)
  (default ``'NORMAL'``).
* ``batch_acks``: a consuming channel deletes its acked rows in the
  transaction of its next claim; off, every ack is written at once on its own
  (default ``True``).

Options are parsed once into :class:`kombu_sqlite.options.Options`.
"""
from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime
from queue import Empty

from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.scheduling import FairCycle

from . import schema
from .errors import DatabaseUnavailable
from .eventloop import HubConsumer
from .housekeeper import Housekeeper
from .options import Options
from .store import ROUTING_RULES, Store
from .wakeup import Waiter

logger = logging.getLogger(__name__)

MIN_PRIORITY, MAX_PRIORITY = 0, 255


class Undecodable(Exception):
    """kombu could not build a Message from a delivered payload."""

    def __init__(self, payload, exc):
        super().__init__(f'{type(exc).__name__}: {exc}')
        self.payload = payload


class Message(virtual.Message):
    """kombu's Message; a payload it cannot decode is reported as Undecodable."""

    def __init__(self, payload, channel=None, **kwargs):
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except Exception as exc:
            raise Undecodable(payload, exc) from exc


class QoS(virtual.QoS):
    """Unacked messages stay in the table under a lease, not only in memory."""

    def restore_unacked(self):
        self._flush()
        tags = list(self._delivered)
        self._delivered.clear()
        if tags:
            self.channel._release(tags)
        return []


class Channel(virtual.Channel):
    """A kombu channel whose queues, bindings and messages live in SQLite."""

    QoS = QoS
    Message = Message
    supports_fanout = True
    min_priority = MIN_PRIORITY
    max_priority = MAX_PRIORITY

    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        self.options = connection.options
        self.default_priority = self._checked_priority(self.options.default_priority)
        self._pid = os.getpid()
        self._noack_queues = set()
        self._auto_delete_queues = set()
        self.consumed_queues = set()  # read by the housekeeper (x-expires)
        self._claimed = {}            # delivery tag -> queue, until settled
        self._held_acks = []          # acked ids not yet deleted; see basic_ack
        self._held_rejects = []       # (id, requeue) kept waiting by a full disk
        self._held_acks_lock = threading.Lock()
        self._unavailable_logged = 0.0

    @property
    def store(self) -> Store:
        return self.connection.store

    @property
    def catalog(self):
        return self.connection.store.catalog

    # -- queues, exchanges, bindings -----------------------------------------

    def prepare_queue_arguments(self, arguments, **kwargs):
        # Keep x-message-ttl, x-expires, ... (the base class drops them).
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def queue_declare(self, queue=None, passive=False, **kwargs):
        if passive and queue and self._has_queue(queue):
            # Passive declare must not overwrite the stored arguments.
            return virtual.base.queue_declare_ok_t(queue, self._size(queue), 0)
        return super().queue_declare(queue, passive=passive, **kwargs)

    def _new_queue(self, queue, arguments=None, auto_delete=False, **kwargs):
        self.catalog.declare_queue(queue, arguments, auto_delete)
        if auto_delete:
            self._auto_delete_queues.add(queue)

    def _has_queue(self, queue, **kwargs):
        return self.catalog.has_queue(queue)

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        if if_empty and self._size(queue):
            return
        self._auto_delete_queues.discard(queue)
        self.state.queue_bindings_delete(queue)
        return self.store.delete_queue(queue)

    def exchange_declare(self, exchange=None, type='direct', durable=False,
                         auto_delete=False, arguments=None, nowait=False,
                         passive=False):
        type = type or 'direct'
        exchange = exchange or f'amq.{type}'
        if passive:
            if self._exchange_type(exchange) is None:
                raise ChannelError(f'NOT_FOUND - no exchange {exchange!r}',
                                   (50, 10), 'Channel.exchange_declare', '404')
            return
        if type not in ROUTING_RULES:
            raise NotImplementedError(
                f'exchange {exchange!r}: type {type!r} is not supported by the '
                f'sqlite transport (direct, topic and fanout are)')
        if self.connection.exchange_types.get(exchange) != type:
            self.catalog.declare_exchange(exchange, type, arguments)
            self.connection.exchange_types[exchange] = type

    def exchange_delete(self, exchange, if_unused=False, nowait=False):
        self.catalog.delete_exchange(exchange)
        self.connection.exchange_types.pop(exchange, None)

    def _exchange_type(self, exchange):
        known = self.connection.exchange_types
        type = known.get(exchange)
        if type is None:
            type = self.catalog.exchange_type(exchange)
            if type is not None:
                known[exchange] = type
        return type

    def typeof(self, exchange, default='direct'):
        return self.exchange_types[self._exchange_type(exchange) or default]

    def queue_bind(self, queue, exchange=None, routing_key='', arguments=None,
                   **kwargs):
        self.catalog.bind(exchange or 'amq.direct', routing_key, queue)

    def queue_unbind(self, queue, exchange=None, routing_key='', arguments=None,
                     **kwargs):
        self.catalog.unbind(exchange or 'amq.direct', routing_key, queue)

    def get_table(self, exchange):
        type = self.typeof(exchange)
        return [type.prepare_bind(queue, exchange, rkey, None)
                for queue, _, rkey in self.catalog.bindings(exchange)]

    def list_bindings(self):
        return iter(self.catalog.bindings())

    def get_exchanges(self):
        return self.catalog.exchange_names()

    # -- publishing ------------------------------------------------------------

    def _next_delivery_tag(self):
        return None  # the row id becomes the delivery tag when claimed

    def prepare_message(self, body, priority=None, *args, **kwargs):
        message = super().prepare_message(body, priority, *args, **kwargs)
        if priority is not None:
            message['properties']['priority'] = priority  # keep 0, not the default
        return message

    def _checked_priority(self, value):
        try:
            priority = int(value)
            valid = priority == value and MIN_PRIORITY <= priority <= MAX_PRIORITY
        except (TypeError, ValueError, OverflowError):
            valid = False
        if not valid or isinstance(value, bool):
            raise ValueError(f'message priority {value!r} is invalid: the sqlite '
                             f'transport takes integers 0-255 (0 is served first)')
        return priority

    def basic_publish(self, message, exchange, routing_key, **kwargs):
        props = message['properties']
        priority = props.get('priority')
        priority = (self.default_priority if priority is None
                    else self._checked_priority(priority))
        self._inplace_augment_message(message, exchange, routing_key)
        params = self.store.publish_params(message, priority, time.time(),
                                           self._deliver_at(message))
        if not exchange:
            return self.store.publish(routing_key, params)
        type = self._exchange_type(exchange) or 'direct'
        return self.store.publish_routed(exchange, type, routing_key, params)

    def _deliver_at(self, message):
        """When a Celery message with an ETA (countdown, retry backoff) is due."""
        if not self.options.native_delayed_delivery:
            return None
        eta = (message.get('headers') or {}).get('eta')
        if not eta:
            return None
        try:
            when = datetime.fromisoformat(str(eta))
        except ValueError:
            return None  # not ours to judge: the worker will report it
        return when.timestamp()  # naive ETAs are local time, as Celery reads them

    def _put(self, queue, message, **kwargs):
        priority = self._checked_priority(
            message['properties'].get('priority', self.default_priority))
        self.store.publish(queue, self.store.publish_params(message, priority, time.time()))

    # -- consuming ---------------------------------------------------------------

    def basic_consume(self, queue, no_ack, *args, **kwargs):
        if no_ack:
            self._noack_queues.add(queue)
        self.consumed_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._noack_queues.discard(queue)
            self.consumed_queues.discard(queue)
            if queue in self._auto_delete_queues:
                self.queue_delete(queue)
        return result

    def _reset_cycle(self):
        self._cycle = FairCycle(self._get_bulk, self._active_queues, Empty)

    def _claim(self, queue, limit, no_ack=False):
        lease_until = time.monotonic() + self.options.visibility_timeout
        with self._held_acks_taken() as acks:
            rows, late = self.store.claim(
                queue, self.connection.owner, limit, lease_until,
                no_ack=no_ack, acks=acks)
        self._settled(acks, late, 'ack')
        messages = []
        for message_id, priority, delivery_count, payload in rows:
            props = payload['properties']
            props['delivery_tag'] = message_id
            props['priority'] = priority
            redelivered = delivery_count > 1
            payload['redelivered'] = redelivered
            props['delivery_info'].update(
                redelivered=redelivered, delivery_count=delivery_count, queue=queue)
            if not no_ack:
                self._claimed[message_id] = queue
            messages.append(payload)
        return messages

    def _get_bulk(self, queue, callback, timeout=None):
        """Claim up to the prefetch budget from ``queue`` and deliver each.

        Messages claimed but not handed to the application (a callback
        raised, or the consumer was cancelled meanwhile) are released at
        once, not left leased until the visibility timeout.  A full disk or
        a locked file is logged and counts as an empty round: the consumer
        stays up and goes on when the file is usable again.
        """
        budget = self.qos.can_consume_max_estimate()
        limit = self.options.max_claim if budget is None else min(budget, self.options.max_claim)
        if limit <= 0:
            raise Empty()
        no_ack = queue in self._noack_queues
        try:
            messages = self._claim(queue, limit, no_ack=no_ack)
        except DatabaseUnavailable as exc:
            self._log_unavailable(exc)
            raise Empty() from None
        if not messages:
            raise Empty()
        handed = 0
        try:
            for payload in messages:
                handed += 1
                try:
                    callback(payload, queue)
                except Undecodable as exc:
                    self._bury(payload, queue, exc, no_ack)
        finally:
            rest = [p['properties']['delivery_tag'] for p in messages[handed:]]
            if rest and not no_ack:
                self._release_quietly(rest)

    def _bury(self, payload, queue, exc, no_ack):
        tag = payload['properties']['delivery_tag']
        reason = f'undecodable: {exc}'
        logger.error('kombu-sqlite: message %s in queue %r cannot be decoded by kombu (%s); '
                     'moved to the dead letters', tag, queue, exc)
        self._claimed.pop(tag, None)
        self.store.bury(tag, self.connection.owner, queue, reason,
                        taken=payload if no_ack else None)

    def _log_unavailable(self, exc):
        now = time.monotonic()
        if now - self._unavailable_logged >= 10:
            self._unavailable_logged = now
            logger.warning('kombu-sqlite: the queue database cannot be written just now; '
                           'will retry: %s', exc)

    def _get(self, queue, timeout=None):
        messages = self._claim(queue, 1)
        if not messages:
            raise Empty()
        return messages[0]

    def basic_get(self, queue, no_ack=False, **kwargs):
        messages = self._claim(queue, 1, no_ack=no_ack)
        if not messages:
            return None
        message = self.Message(messages[0], channel=self)
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    # -- settling: ack, reject and requeue act only on a lease we still own -------------

    def basic_ack(self, delivery_tag, multiple=False):
        if multiple:
            raise NotImplementedError('multiple acks are not supported')
        if self._consumers and self.options.batch_acks:
            # A consumer's drain loop claims again at once: the row is deleted
            # in that claim's transaction, so a window of messages costs one
            # write lock instead of one per message.  Until then the row stays
            # leased to us; the housekeeper settles acks that wait longer.
            self._hold_ack(delivery_tag)
        else:
            try:
                late = self.store.ack_many([delivery_tag], self.connection.owner)
            except DatabaseUnavailable as exc:
                # Full disk, lock held: keep the ack (the lease is renewed
                # meanwhile) and write it when the file is usable again.
                self._log_unavailable(exc)
                self._hold_ack(delivery_tag)
            else:
                self._settled([delivery_tag], late, 'ack')
        super().basic_ack(delivery_tag)

    def _hold_ack(self, delivery_tag):
        with self._held_acks_lock:
            self._held_acks.append(delivery_tag)

    @contextmanager
    def _held_acks_taken(self):
        """The held acks, given back if the statement settling them fails."""
        with self._held_acks_lock:
            tags, self._held_acks = self._held_acks, []
        try:
            yield tags
        except BaseException:
            with self._held_acks_lock:
                self._held_acks[:0] = tags
            raise

    def settle_held_acks(self):
        """Delete the rows of messages acked since the last claim, and do the
        rejects a full disk or a held lock kept waiting."""
        if os.getpid() != self._pid:
            return
        if self._held_acks:
            with self._held_acks_taken() as tags:
                late = self.store.ack_many(tags, self.connection.owner)
            self._settled(tags, late, 'ack')
        while self._held_rejects:
            self._reject(*self._held_rejects[0])
            with self._held_acks_lock:
                self._held_rejects.pop(0)

    def _settled(self, tags, late, what):
        """Forget settled tags; count and report settles of a lost lease."""
        for tag in late:
            queue = self._claimed.get(tag) or ''
            self.store.counters[queue, 'late_settles'] += 1
            logger.warning(
                'kombu-sqlite: late %s of message %s in queue %r ignored: its lease ran out '
                '(the consumer was stopped or slower than visibility_timeout=%gs) and the '
                'message is, or will be, delivered again', what, tag, queue,
                self.options.visibility_timeout)
        for tag in tags:
            self._claimed.pop(tag, None)

    def close(self):
        if not self.closed:
            try:
                self.settle_held_acks()
            except Exception as exc:  # the leases run out: delivered again, not lost
                logger.warning('kombu-sqlite could not settle acks at close: %s', exc)
        super().close()

    def basic_reject(self, delivery_tag, requeue=False):
        if os.getpid() == self._pid:
            try:
                self._reject(delivery_tag, requeue)
            except DatabaseUnavailable as exc:
                # Full disk, lock held: the lease is renewed meanwhile; the
                # housekeeper retries through settle_held_acks.
                self._log_unavailable(exc)
                with self._held_acks_lock:
                    self._held_rejects.append((delivery_tag, requeue))
        self.qos.reject(delivery_tag, requeue=False)

    def _reject(self, delivery_tag, requeue):
        if requeue:
            self._release([delivery_tag])
        else:
            queue = self._claimed.get(delivery_tag) or ''
            done = self.store.reject(delivery_tag, self.connection.owner, queue)
            self._settled([delivery_tag], [] if done else [delivery_tag], 'reject')

    def _restore(self, message):
        self._release([message.delivery_tag])

    def _release(self, message_ids):
        # A forked child holds a copy of the parent's unacked state; only the
        # process that claimed the messages may give them back.
        if os.getpid() == self._pid and self.connection is not None:
            late = self.store.release(message_ids, self.connection.owner)
            self._settled(message_ids, late, 'requeue')

    def _release_quietly(self, message_ids):
        try:
            self._release(message_ids)
        except Exception as exc:  # their leases run out: delivered again, not lost
            logger.warning('kombu-sqlite could not release undelivered messages: %s', exc)

    def _size(self, queue):
        return self.store.size(queue)

    def _purge(self, queue):
        return self.store.purge(queue)

    def _delete(self, queue, *args, **kwargs):
        self.store.delete_queue(queue)


class Transport(virtual.Transport):
    """kombu transport storing messages in one SQLite file."""

    Channel = Channel

    can_parse_url = True
    default_port = None
    driver_type = 'sqlite'
    driver_name = 'sqlite3'
    polling_interval = 0.5

    implements = virtual.Transport.implements.extend(
        asynchronous=True,  # Celery's worker consumes from its hub: see eventloop.py
        exchange_type=frozenset(['direct', 'topic', 'fanout']),
    )

    # A full disk, a file held locked, an I/O error or an unusable URL are
    # connection errors: kombu retries them and tries the next failover URL,
    # Celery reconnects.  A corrupt or foreign file is fatal (DatabaseError).
    connection_errors = virtual.Transport.connection_errors + (
        DatabaseUnavailable, sqlite3.OperationalError)
    channel_errors = virtual.Transport.channel_errors + (ValueError,)

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        self.options = Options.from_transport_options(client.transport_options)
        self.prefetch_wait = self.options.prefetch_wait
        self.exchange_types = {}
        self._store = None
        self._waiter = None
        self._hub_consumer = None
        self._owner = None
        self._housekeeper = None

    # -- the database ------------------------------------------------------------

    @property
    def url(self) -> str:
        hostname = self.client.hostname or ''
        if '://' in hostname:
            return hostname
        # kombu's failover (Connection.switch) hands the next URL over parsed.
        return f'sqlite:///{self.client.virtual_host or ""}'

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(schema.path_from_url(self.url), self.options)
        return self._store

    @property
    def owner(self) -> str:
        """Who holds a lease: host, pid and a token unique to this connection."""
        if self._owner is None or self._owner[0] != os.getpid():
            token = f'{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}'
            self._owner = (os.getpid(), token)
        return self._owner[1]

    def establish_connection(self):
        self.store  # validate the URL and the file before anything else
        if self._housekeeper is None or self._housekeeper.pid != os.getpid():
            self._housekeeper = Housekeeper(self).start()
        return super().establish_connection()

    def close_connection(self, connection):
        if self._hub_consumer is not None:
            self._hub_consumer.unregister()
            self._hub_consumer = None
        if self._housekeeper is not None and self._housekeeper.pid == os.getpid():
            self._housekeeper.stop(timeout=self.options.busy_timeout + 5)
            self._housekeeper = None
        try:
            super().close_connection(connection)
        finally:
            if self._waiter is not None:
                self._waiter.close()
                self._waiter = None
            if self._store is not None:
                try:
                    self._store.flush_counters()
                except Exception as exc:
                    logger.warning('kombu-sqlite could not save counters: %s', exc)
                self._store.close()

    # -- waiting for messages ------------------------------------------------------

    def _get_waiter(self) -> Waiter:
        if self._waiter is None or self._waiter.pid != os.getpid():
            self._waiter = Waiter(self.store, self.options.wakeup, self.options.poll_interval)
        return self._waiter

    def register_with_event_loop(self, connection, loop):
        """Consume from kombu's hub (Celery's worker loop) instead of ``drain_events``."""
        if self._hub_consumer is None or self._hub_consumer.pid != os.getpid():
            self._hub_consumer = HubConsumer(self, self._get_waiter(), self.polling_interval)
        self._hub_consumer.register(loop)

    def deliver_batch(self, channel=None):
        """Claim and deliver one batch from the next queue with work and
        budget, of ``channel`` or of any channel; raise ``queue.Empty`` when
        there is none."""
        if channel is None:
            self.cycle.get(self._deliver)
        else:
            channel.drain_events(callback=self._deliver)

    def consuming_channels(self) -> list:
        return [c for c in self.channels if c._consumers]

    def prefetch_spent(self) -> bool:
        """Does a consuming channel wait for acks before it may claim more?"""
        return any(not c.qos.can_consume() for c in self.consuming_channels())

    def drain_events(self, connection, timeout=None):
        """Deliver one batch, sleeping on the wake-up signal while idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = self._get_waiter()
        budget_spent_since = None
        while True:
            waiter.arm()
            try:
                self.deliver_batch()
                return
            except Empty:
                pass
            wait = self.polling_interval
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise socket.timeout()
            if self.prefetch_spent():
                # Prefetch budget used up.  Acks from other threads free it
                # within a millisecond; but Celery before 5.7 applies acks
                # between drain_events calls, so give control back soon.
                now = time.monotonic()
                budget_spent_since = budget_spent_since or now
                if now - budget_spent_since >= self.prefetch_wait:
                    raise socket.timeout()
                time.sleep(min(wait, 0.001))
            else:
                budget_spent_since = None
                waiter.wait(wait)
