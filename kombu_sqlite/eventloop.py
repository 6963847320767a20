"""Consuming inside kombu's event loop: the hub that Celery's worker runs.

The transport declares ``implements.asynchronous``, so Celery's worker runs
its non-blocking consumer loop (``celery.worker.loops.asynloop``): the hub
polls descriptors and calls back when one is readable, and between callbacks
it serves the prefork pool's pipes, timers, remote control and revokes.  The
blocking loop instead stops inside the pool's ``apply_async`` while every
process is busy, and answers nothing until one frees up.

What a connection registers with the hub:

* the waiter's inotify descriptor, readable after any process commits to the
  file; unless only this connection's delivery rounds wrote (their claims
  and acks: ``PRAGMA data_version`` does not move for them), a callback
  claims and delivers until the queues are empty or the prefetch budget is
  spent;
* a pipe of its own, written when a callback stopped after ``max_rounds``
  deliveries with work possibly left, so the hub comes back at once (after
  serving everything else) rather than after its poll timeout;
* a check on every turn of the loop: a channel with a prefetch limit
  claims once acks have freed half of its budget (acks are written with the
  next claim, so nothing becomes readable by itself).  Waiting for half
  rather than claiming whenever one message is acked makes a busy worker's
  claims carry several messages each instead of one;
* while every channel with a prefetch limit waits for acks, the descriptor
  is not watched: each commit of a producer would wake the loop for nothing.
  A timer every ``busy_check_interval`` looks instead, for the channels
  without a limit (Celery's remote control), and the watch resumes with
  the next claim;
* a timer every ``polling_interval`` that delivers anyway, the safety net for
  a missed wake-up; without inotify, a timer every ``poll_interval`` that
  reads ``PRAGMA data_version`` instead of the descriptor.

Lease renewal, expiry and the release of due ETA messages stay in the
housekeeper thread; its commits wake the loop like any other process's.
"""
from __future__ import annotations

import os
from queue import Empty


class HubConsumer:
    """Delivers a transport's messages from inside one kombu hub."""

    #: deliveries (one claimed batch each) per channel and callback before
    #: the hub runs its other callbacks; the pipe brings it back for the rest.
    max_rounds = 10
    #: seconds between looks while the descriptor is not watched (see above)
    busy_check_interval = 0.02

    def __init__(self, transport, waiter, polling_interval: float):
        self.transport = transport
        self.waiter = waiter
        self.polling_interval = polling_interval
        self.pid = os.getpid()
        self._loop = None
        self._safety_timer = self._poll_timer = self._busy_timer = None
        self._watched_fd = self._watches = None
        self._kick_r = self._kick_w = None
        self._starved = []  # consuming channels waiting for acks before they claim
        self._paused = False  # descriptor unwatched: every limited channel is starved

    def register(self, loop) -> None:
        """Hook into ``loop``; a second call (after a reconnect) starts afresh."""
        self.unregister()
        self._loop = loop
        self._kick_r, self._kick_w = os.pipe()
        os.set_blocking(self._kick_r, False)
        os.set_blocking(self._kick_w, False)
        loop.add_reader(self._kick_r, self.deliver)
        self._watch()
        loop.on_tick.add(self.on_tick)
        self._safety_timer = loop.call_repeatedly(self.polling_interval, self.deliver)
        self.kick()  # deliver what waited before we were registered

    def unregister(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        for tref in (self._safety_timer, self._poll_timer, self._busy_timer):
            if tref is not None:
                tref.cancel()
        self._safety_timer = self._poll_timer = self._busy_timer = None
        self._paused = False
        loop.on_tick.discard(self.on_tick)
        for fd in (self._watched_fd, self._kick_r):
            if fd is not None:
                loop.remove(fd)
        self._watched_fd = self._watches = None
        if os.getpid() == self.pid:
            os.close(self._kick_r)
            os.close(self._kick_w)
        self._kick_r = self._kick_w = None

    def _watch(self) -> None:
        """Keep the hub watching the waiter's descriptor, which changes when
        the WAL file is replaced; poll when there is none."""
        fd = None if self._paused else self.waiter.fileno()
        # A new watch may reuse the old descriptor's number: compare both.
        if (fd, self.waiter.watches) != (self._watched_fd, self._watches):
            if self._watched_fd is not None:
                self._loop.remove(self._watched_fd)
            if fd is not None:
                self._loop.add_reader(fd, self.on_readable)
            self._watched_fd, self._watches = fd, self.waiter.watches
        if self.waiter.fileno() is None and self._poll_timer is None:
            self._poll_timer = self._loop.call_repeatedly(self.waiter.poll_interval,
                                                          self.on_readable)

    def kick(self) -> None:
        """Make the hub call ``deliver`` on its next turn."""
        try:
            os.write(self._kick_w, b'\0')
        except BlockingIOError:
            pass  # the pipe is full: a call is pending already

    def on_readable(self) -> None:
        """The descriptor (or the poll timer): every consuming channel looks,
        unless nothing but this connection's delivery rounds wrote."""
        if self._loop is not None and self.waiter.take_change():
            self._deliver_all()

    def deliver(self) -> None:
        """The pipe and the safety timer: every consuming channel looks."""
        if self._loop is not None:
            self.waiter.take_change()  # commits until now are seen by this round
            self._deliver_all()

    def _deliver_all(self) -> None:
        try:
            while os.read(self._kick_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._watch()
        self._deliver(self.transport.consuming_channels())

    def on_tick(self) -> None:
        if self._loop is None or not self._starved:
            return
        # Only acks free a spent budget, and they are written with the next
        # claim: no commit announces them.  Claim once half the budget is
        # free, so a window costs a few claims rather than one per message.
        consuming = self.transport.consuming_channels()
        refill = [c for c in self._starved if c in consuming and self._claim_due(c)]
        if refill and self._paused:
            self._pause(False)
            self.deliver()  # commits went unwatched: every channel looks
        elif refill:
            self._deliver(refill)

    def _pause(self, paused: bool) -> None:
        """Stop or resume watching the descriptor; a timer looks meanwhile."""
        if paused == self._paused or self._loop is None or self.waiter.fileno() is None:
            return
        self._paused = paused
        self._watch()
        if paused:
            self._busy_timer = self._loop.call_repeatedly(self.busy_check_interval,
                                                          self.on_readable)
        else:
            self._busy_timer.cancel()
            self._busy_timer = None

    @staticmethod
    def _claim_due(channel) -> bool:
        qos = channel.qos
        free = qos.can_consume_max_estimate()
        return free is None or free >= max(1, qos.prefetch_count // 2)

    def _deliver(self, channels) -> None:
        own_writes_seen = self.waiter.own_writes_seen()
        more = False
        for channel in channels:
            for _ in range(self.max_rounds):
                if not self._claim_due(channel):
                    break
                try:
                    self.transport.deliver_batch(channel)
                except Empty:
                    break
            else:
                more = True
        if more:
            self.kick()
        if own_writes_seen:  # else the next readable event must still look
            self.waiter.mark_own_writes()
        consuming = self.transport.consuming_channels()
        self._starved = [c for c in consuming if not self._claim_due(c)]
        limited = sum(1 for c in consuming if c.qos.prefetch_count)
        # Channels without a limit are never starved.
        self._pause(bool(self._starved) and len(self._starved) == limited)
