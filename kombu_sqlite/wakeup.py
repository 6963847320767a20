"""Waking an idle consumer when another process commits.

SQLite has no NOTIFY.  Every commit in WAL mode writes to ``<db>-wal``, so on
Linux an inotify watch on that file wakes the consumer within a millisecond
and costs nothing while idle.  Elsewhere (or if inotify is unavailable) the
waiter polls ``PRAGMA data_version``, which changes when another connection
commits, every ``poll_interval`` seconds.

The same waiter serves kombu's event loop (see :mod:`kombu_sqlite.eventloop`):
``fileno()`` is the descriptor to register as readable, ``take_change()``
says whether another connection committed (a timer calls it when there is no
descriptor).
"""
from __future__ import annotations

import os
import select
import time

try:  # Linux only
    from inotify_simple import INotify, flags
except ImportError:  # pragma: no cover - other platforms
    INotify = None


class Waiter:
    """``wait(timeout)`` returns early when the database may have changed."""

    def __init__(self, store, mode: str = 'auto', poll_interval: float = 0.002):
        if mode not in ('auto', 'inotify', 'poll'):
            raise ValueError(f"transport option wakeup={mode!r}: expected 'auto', "
                             f"'inotify' or 'poll'")
        self.store = store
        self.poll_interval = poll_interval
        self.pid = os.getpid()
        self._inotify = None
        self._version = None
        self._own_writes = None
        self.watches = 0  # counts inotify watches made: a new one has a new descriptor
        if mode != 'poll' and INotify is not None:
            try:
                self._watch()
            except OSError:
                if mode == 'inotify':
                    raise
        elif mode == 'inotify':
            raise ValueError('transport option wakeup="inotify": inotify is not '
                             'available on this platform')

    @property
    def mode(self) -> str:
        return 'inotify' if self._inotify is not None else 'poll'

    def _watch(self):
        self.store.conn  # the -wal file exists while a connection is open
        inotify = INotify()
        try:
            inotify.add_watch(self.store.path + '-wal',
                              flags.MODIFY | flags.DELETE_SELF | flags.MOVE_SELF)
        except OSError:
            inotify.close()
            raise
        self._inotify = inotify
        self.watches += 1

    def fileno(self) -> int | None:
        """A descriptor that is readable after a commit, or None when polling."""
        return self._inotify.fileno() if self._inotify is not None else None

    def take_change(self) -> bool:
        """For an event loop, without waiting: has the file changed since the
        last call?  Clears the descriptor; call before looking for work.

        This connection's writes until ``mark_own_writes`` (the claims and
        acks of a delivery round) stir the descriptor too, but do not count:
        ``PRAGMA data_version`` moves only for other connections' commits.
        """
        if self._inotify is not None:
            self._drain()
        conn = self.store.conn
        version = conn.execute('PRAGMA data_version').fetchone()[0]
        changed = version != self._version or conn.total_changes != self._own_writes
        self._version = version
        return changed

    def own_writes_seen(self) -> bool:
        """Has this connection written nothing since ``mark_own_writes``?"""
        return self.store.conn.total_changes == self._own_writes

    def mark_own_writes(self) -> None:
        """After looking for work: this connection's writes so far were seen."""
        self._own_writes = self.store.conn.total_changes

    def arm(self) -> None:
        """Call before looking for work: later commits will end ``wait``."""
        if self._inotify is not None:
            self._drain()
        else:
            self._version = self._data_version()

    def wait(self, timeout: float) -> bool:
        """Sleep until a commit is seen or ``timeout`` passes; True if woken."""
        if timeout <= 0:
            return False
        if self._inotify is not None:
            readable, _, _ = select.select([self._inotify.fileno()], [], [], timeout)
            return bool(readable)
        deadline = time.monotonic() + timeout
        while True:
            if self._data_version() != self._version:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(self.poll_interval, remaining))

    def _drain(self) -> None:
        events = self._inotify.read(timeout=0)
        if any(e.mask & (flags.DELETE_SELF | flags.MOVE_SELF | flags.IGNORED)
               for e in events):
            # The WAL file was replaced: watch the new one.
            self._inotify.close()
            self._inotify = None
            try:
                self._watch()
            except OSError:
                pass

    def _data_version(self) -> int:
        return self.store.conn.execute('PRAGMA data_version').fetchone()[0]

    def close(self) -> None:
        if self._inotify is not None and os.getpid() == self.pid:
            self._inotify.close()
        self._inotify = None
