"""The housekeeper: one background thread per connection, per process.

It keeps a live holder's leases from running out, settles acks its
channels held back, postpones ``x-expires`` of the queues being consumed,
sweeps what expired, and writes the in-memory counters to the file.
"""
from __future__ import annotations

import logging
import os
import threading
import time

logger = logging.getLogger(__name__)


class Housekeeper:

    def __init__(self, transport):
        self.transport = transport
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='kombu-sqlite-housekeeper',
                                        daemon=True)

    def start(self) -> Housekeeper:
        self._thread.start()
        return self

    def stop(self, timeout: float) -> None:
        """Stop and wait: the connection it uses is closed next."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self):
        transport = self.transport
        options = transport.options
        store = transport.store
        next_renewal = 0.0
        last_warning = (None, 0.0)   # (text, when): a full disk is said every 10 s, not every tick
        tick = min(options.housekeeping_interval, options.lease_renew_interval)
        while not self._stop.wait(tick):
            try:
                now = time.monotonic()   # leases are on the monotonic clock
                if now >= next_renewal:
                    store.renew(transport.owner, now + options.visibility_timeout)
                    next_renewal = now + options.lease_renew_interval
                channels = list(transport.channels)
                for channel in channels:
                    channel.settle_held_acks()
                store.catalog.touch_queues(
                    {q for channel in channels for q in channel.consumed_queues})
                store.sweep()
                store.flush_counters()
            except Exception as exc:  # keep renewing through transient errors
                text = str(exc)
                if text != last_warning[0] or time.monotonic() - last_warning[1] >= 10:
                    logger.warning('kombu-sqlite housekeeping failed: %s', text)
                    last_warning = (text, time.monotonic())
