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
visibility_timeout``.  Ack deletes the row; a channel with consumers deletes
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
A message delivered ``max_deliveries`` times without an ack, or rejected
without requeue, moves to the ``kombu_dead_letter`` table with its reason,
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

Connection string
=================

.. code-block::

    sqlite:///relative/path/queue.db
    sqlite:////absolute/path/queue.db

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
* ``busy_timeout``: seconds a statement waits for another writer before
  retrying (default ``30``).
* ``max_page_count``: cap the file at this many pages (of 4 KiB), for a
  queue that must not fill the disk; publishing past it fails with a clear
  error and nothing already queued is lost (default: no cap).
* ``synchronous``: ``'NORMAL'`` (survives process crashes; the last commits
  may roll back on power loss) or ``'FULL'`` (survives power loss, slower)
  (default ``'NORMAL'``).
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
from .eventloop import HubConsumer
from .housekeeper import Housekeeper
from .store import ROUTING_RULES, Store
from .wakeup import Waiter

logger = logging.getLogger(__name__)

MIN_PRIORITY, MAX_PRIORITY = 0, 255


def _option(options, name, default, cast=float):
    value = options.get(name, default)
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ValueError(f'transport option {name}={value!r} is not a valid '
                         f'{cast.__name__}') from None


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
    supports_fanout = True
    min_priority = MIN_PRIORITY
    max_priority = MAX_PRIORITY
    default_priority = 0
    visibility_timeout = 60.0
    max_claim = 100

    from_transport_options = virtual.Channel.from_transport_options + (
        'default_priority', 'visibility_timeout', 'max_claim')

    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        self.visibility_timeout = float(self.visibility_timeout)
        self.max_claim = int(self.max_claim)
        self.default_priority = self._checked_priority(self.default_priority)
        self._pid = os.getpid()
        self._noack_queues = set()
        self._auto_delete_queues = set()
        self._held_acks = []  # acked ids not yet deleted; see basic_ack
        self._held_acks_lock = threading.Lock()

    @property
    def store(self) -> Store:
        return self.connection.store

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
        self.store.declare_queue(queue, arguments, auto_delete)
        if auto_delete:
            self._auto_delete_queues.add(queue)

    def _has_queue(self, queue, **kwargs):
        return self.store.has_queue(queue)

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
            self.store.declare_exchange(exchange, type, arguments)
            self.connection.exchange_types[exchange] = type

    def exchange_delete(self, exchange, if_unused=False, nowait=False):
        self.store.delete_exchange(exchange)
        self.connection.exchange_types.pop(exchange, None)

    def _exchange_type(self, exchange):
        known = self.connection.exchange_types
        type = known.get(exchange)
        if type is None:
            type = self.store.exchange_type(exchange)
            if type is not None:
                known[exchange] = type
        return type

    def typeof(self, exchange, default='direct'):
        return self.exchange_types[self._exchange_type(exchange) or default]

    def queue_bind(self, queue, exchange=None, routing_key='', arguments=None,
                   **kwargs):
        self.store.bind(exchange or 'amq.direct', routing_key, queue)

    def queue_unbind(self, queue, exchange=None, routing_key='', arguments=None,
                     **kwargs):
        self.store.unbind(exchange or 'amq.direct', routing_key, queue)

    def get_table(self, exchange):
        type = self.typeof(exchange)
        return [type.prepare_bind(queue, exchange, rkey, None)
                for queue, _, rkey in self.store.bindings(exchange)]

    def list_bindings(self):
        return iter(self.store.bindings())

    def get_exchanges(self):
        return self.store.exchange_names()

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
        except (TypeError, ValueError):
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
        if not self.connection.native_delayed_delivery:
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
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._noack_queues.discard(queue)
            if queue in self._auto_delete_queues:
                self.queue_delete(queue)
        return result

    def _reset_cycle(self):
        self._cycle = FairCycle(self._get_bulk, self._active_queues, Empty)

    def _claim(self, queue, limit, no_ack=False):
        now = time.time()
        with self._held_acks_taken() as acks:
            rows = self.store.claim(queue, self.connection.owner, limit,
                                    now + self.visibility_timeout, no_ack=no_ack, acks=acks)
        messages = []
        for message_id, priority, delivery_count, payload in rows:
            props = payload['properties']
            props['delivery_tag'] = message_id
            props['priority'] = priority
            redelivered = delivery_count > 1
            payload['redelivered'] = redelivered
            props['delivery_info'].update(
                redelivered=redelivered, delivery_count=delivery_count, queue=queue)
            messages.append(payload)
        return messages

    def _get_bulk(self, queue, callback, timeout=None):
        """Claim up to the prefetch budget from ``queue`` and deliver each."""
        budget = self.qos.can_consume_max_estimate()
        limit = self.max_claim if budget is None else min(budget, self.max_claim)
        if limit <= 0:
            raise Empty()
        messages = self._claim(queue, limit, no_ack=queue in self._noack_queues)
        if not messages:
            raise Empty()
        for payload in messages:
            callback(payload, queue)

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

    def basic_ack(self, delivery_tag, multiple=False):
        if multiple:
            raise NotImplementedError('multiple acks are not supported')
        if self._consumers:
            # A consumer's drain loop claims again at once: the row is deleted
            # in that claim's transaction, so a window of messages costs one
            # write lock instead of one per message.  Until then the row stays
            # leased to us; the housekeeper settles acks that wait longer.
            with self._held_acks_lock:
                self._held_acks.append(delivery_tag)
        else:
            self.store.ack_many([delivery_tag], self.connection.owner)
        super().basic_ack(delivery_tag)

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
        """Delete the rows of messages acked since the last claim."""
        if self._held_acks and os.getpid() == self._pid:
            with self._held_acks_taken() as tags:
                self.store.ack_many(tags, self.connection.owner)

    def close(self):
        if not self.closed:
            try:
                self.settle_held_acks()
            except Exception as exc:  # the leases run out: delivered again, not lost
                logger.warning('kombu-sqlite could not settle acks at close: %s', exc)
        super().close()

    def _queue_of(self, delivery_tag):
        message = self.qos._delivered.get(delivery_tag)
        return message and message.delivery_info.get('queue')

    def basic_reject(self, delivery_tag, requeue=False):
        if requeue:
            self._release([delivery_tag])
        else:
            self.store.reject(delivery_tag, self._queue_of(delivery_tag))
        self.qos.reject(delivery_tag, requeue=False)

    def _restore(self, message):
        self._release([message.delivery_tag])

    def _release(self, message_ids):
        # A forked child holds a copy of the parent's unacked state; only the
        # process that claimed the messages may give them back.
        if os.getpid() == self._pid and self.connection is not None:
            self.store.release(message_ids, self.connection.owner)

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

    connection_errors = virtual.Transport.connection_errors + (
        sqlite3.OperationalError,)
    channel_errors = virtual.Transport.channel_errors + (ValueError,)

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        options = client.transport_options
        self.visibility_timeout = _option(options, 'visibility_timeout', 60.0)
        self.lease_renew_interval = _option(
            options, 'lease_renew_interval', max(self.visibility_timeout / 4, 0.1))
        self.housekeeping_interval = _option(options, 'housekeeping_interval', 1.0)
        self.prefetch_wait = _option(options, 'prefetch_wait', 0.005)
        self.native_delayed_delivery = bool(options.get('native_delayed_delivery', True))
        self.exchange_types = {}
        self._store = None
        self._waiter = None
        self._hub_consumer = None
        self._owner = None
        self._housekeeper = None

    # -- the database ------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.client.hostname or ''

    @property
    def store(self) -> Store:
        if self._store is None:
            options = self.client.transport_options
            self._store = Store(
                schema.path_from_url(self.url),
                max_deliveries=_option(options, 'max_deliveries', 20, int),
                max_length_block_timeout=_option(options, 'max_length_block_timeout', 10.0),
                busy_timeout=_option(options, 'busy_timeout', 30.0),
                synchronous=options.get('synchronous', 'NORMAL'),
                max_page_count=options.get('max_page_count'))
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
            self._housekeeper.stop(timeout=self.store.busy_timeout + 5)
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
            options = self.client.transport_options
            self._waiter = Waiter(self.store, options.get('wakeup', 'auto'),
                                  _option(options, 'poll_interval', 0.002))
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
