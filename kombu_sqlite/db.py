"""Connections to the queue database: one per thread, new after fork, retried when busy."""
from __future__ import annotations

import functools
import os
import random
import sqlite3
import threading
import time
from contextlib import contextmanager

from . import schema
from .errors import (DatabaseCorrupt, DatabaseError, DatabaseFull, DatabaseLocked,
                     DatabaseUnavailable)

#: Errors that mean "another process holds the write lock".
_BUSY_MESSAGES = ('database is locked', 'database is busy', 'database table is locked')


#: Seconds between quick attempts at the write lock before SQLite's own busy
#: handler takes over, whose first sleep is a whole millisecond (then 2, 5,
#: 10 ...).  A writer holds the lock for tens of microseconds per commit, so
#: a publisher and a consumer that collide go on far sooner this way.
QUICK_LOCK_WAITS = (0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032)


def is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        getattr(exc, 'sqlite_errorname', '').startswith(('SQLITE_BUSY', 'SQLITE_LOCKED'))
        or any(m in str(exc) for m in _BUSY_MESSAGES))


def classify(exc: sqlite3.Error, path: str, busy_timeout: float) -> Exception:
    """The kombu-sqlite error for an SQLite error: recoverable or fatal, named.

    See :mod:`kombu_sqlite.errors` for which is which and why.
    """
    name = getattr(exc, 'sqlite_errorname', '') or ''
    text = str(exc)
    if name.startswith('SQLITE_FULL') or 'full' in text:
        return DatabaseFull(
            f'the queue database {path!r} is full (no space left on the disk, or '
            f'max_page_count reached): {text}; nothing was written, messages already '
            f'queued are kept; free space and the broker goes on by itself')
    if is_busy(exc):
        return DatabaseLocked(
            f'the queue database {path!r} stayed locked by another process for '
            f'longer than busy_timeout={busy_timeout:g}s; a process holding the write '
            f'lock may be stopped (SIGSTOP, a debugger) or hung: find it with '
            f'`fuser {path}` and resume or end it (nothing was written)')
    if name.startswith(('SQLITE_CORRUPT', 'SQLITE_NOTADB')) or 'malformed' in text:
        return DatabaseCorrupt(
            f'the queue database {path!r} is corrupt ({text}); stop the workers and '
            f'restore it from a backup (`kombu-sqlite backup`), or move it aside to '
            f'start empty')
    if name.startswith(('SQLITE_IOERR', 'SQLITE_CANTOPEN', 'SQLITE_READONLY')):
        return DatabaseUnavailable(
            f'the queue database {path!r} cannot be read or written just now '
            f'({text}); check the disk and the file\'s permissions')
    return exc


def retry_busy(method):
    """Run a database method; errors come out classified (see :func:`classify`).

    A write that gets SQLITE_BUSY at once (without waiting on the busy
    timeout) is tried again, but never for longer than one busy timeout in
    all: a writer that is stopped gets a clear error, not an endless wait.
    Each attempt is its own transaction that either committed or rolled back,
    so retrying never doubles or loses a message.
    """
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        db = self.db
        deadline = time.monotonic() + db.busy_timeout
        attempt = 0
        while True:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.Error as exc:
                if is_busy(exc) and time.monotonic() < deadline:
                    attempt += 1
                    time.sleep(min(0.05 * 2 ** attempt, 1.0) * random.random())
                    continue
                error = classify(exc, db.path, db.busy_timeout)
                if error is exc:
                    raise
                raise error from exc
    return wrapper


def topic_match(binding_key: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more words."""
    return _topic_match(binding_key, routing_key)


@functools.lru_cache(maxsize=65536)
def _topic_match(binding_key, routing_key):
    return match_words(binding_key.split('.'), routing_key.split('.'))


def match_words(pattern, words) -> bool:
    """Glob matching over words, linear in len(words) for each pattern word.

    The set of pattern positions reachable after each word is kept, as a
    non-deterministic automaton would; no backtracking, so any number of
    ``#`` costs O(len(pattern) * len(words)).
    """
    def closure(states):
        # A '#' may match zero words: the state after it is reachable too.
        out = set()
        for i in states:
            while True:
                out.add(i)
                if i < len(pattern) and pattern[i] == '#':
                    i += 1
                    continue
                break
        return out

    states = closure({0})
    for word in words:
        step = set()
        for i in states:
            if i < len(pattern):
                head = pattern[i]
                if head == '#':
                    step.add(i)          # '#' swallows this word and may go on
                elif head == '*' or head == word:
                    step.add(i + 1)
        if not step:
            return False
        states = closure(step)
    return len(pattern) in states


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open (SQLite ends some on error)."""
    if conn.in_transaction:
        try:
            conn.execute('ROLLBACK')
        except sqlite3.Error:
            pass


class Database:
    """Hands each thread of each process its own connection to one file.

    ``read_only`` connections cannot write (``mode=ro``): the file is neither
    migrated, switched to WAL nor chmodded.  Otherwise the file is identified
    as a kombu-sqlite broker (``PRAGMA application_id``) before the first
    write, created 0600 when missing, and its schema created or migrated.
    """

    def __init__(self, path: str, busy_timeout: float = 30.0, synchronous: str = 'NORMAL',
                 max_page_count: int | None = None, read_only: bool = False):
        self.path = path
        self.busy_timeout = float(busy_timeout)
        self.synchronous = synchronous
        self.max_page_count = max_page_count
        self.read_only = read_only
        self._local = threading.local()
        self._lock = threading.Lock()
        self._schema_pid = None
        self._owned = []       # (pid, connection) opened by this object
        self._inherited = []   # connections copied by fork: never used, never closed
        if not read_only:
            schema.prepare_directory(path)
        self.conn  # fail fast: validate the file and create the schema

    @property
    def db(self) -> Database:
        return self  # what retry_busy needs, for the few methods defined here

    @property
    def conn(self) -> sqlite3.Connection:
        local = self._local
        pid = os.getpid()
        if getattr(local, 'pid', None) != pid:
            if getattr(local, 'conn', None) is not None:
                # Closing a connection inherited through fork could checkpoint
                # and delete the parent's WAL; keep it referenced instead.
                self._inherited.append(local.conn)
            local.conn = self._open()
            local.pid = pid
        return local.conn

    @retry_busy
    def _open(self) -> sqlite3.Connection:
        if self.read_only:
            conn = schema.connect_read_only(self.path, self.busy_timeout)
        elif self._schema_pid == os.getpid():
            conn = schema.connect(self.path, self.busy_timeout, self.synchronous,
                                  self.max_page_count)
        else:
            conn = self._open_first()
        conn.create_function('topic_match', 2, topic_match, deterministic=True)
        with self._lock:
            self._owned.append((os.getpid(), conn))
        return conn

    def _open_first(self) -> sqlite3.Connection:
        """This process's first connection: identify, create, migrate, secure."""
        new_file = schema.identify(self.path)   # refuses a foreign file, writes nothing
        if new_file:
            schema.create_file(self.path)
        conn = schema.connect(self.path, self.busy_timeout, self.synchronous,
                              self.max_page_count, new_file=new_file)
        try:
            schema.ensure_schema(conn, self.path)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if is_busy(exc):
                raise
            raise DatabaseError(
                f'{self.path!r} is not a usable SQLite database: {exc}') from exc
        except BaseException:
            conn.close()
            raise
        schema.secure_modes(self.path)
        self._schema_pid = os.getpid()
        return conn

    @contextmanager
    def transaction(self):
        """A write transaction that takes the write lock up front."""
        conn = self.conn
        self._begin_immediate(conn)
        try:
            yield conn
            conn.execute('COMMIT')
        except BaseException:
            rollback(conn)
            raise

    def _begin_immediate(self, conn: sqlite3.Connection) -> None:
        conn.execute('PRAGMA busy_timeout=0')
        try:
            for wait in QUICK_LOCK_WAITS:
                try:
                    conn.execute('BEGIN IMMEDIATE')
                    return
                except sqlite3.OperationalError as exc:
                    if not is_busy(exc):
                        raise
                time.sleep(wait)
        finally:
            conn.execute(f'PRAGMA busy_timeout={int(self.busy_timeout * 1000)}')
        conn.execute('BEGIN IMMEDIATE')

    @contextmanager
    def snapshot(self):
        """A read transaction: every query inside sees the same committed state."""
        conn = self.conn
        conn.execute('BEGIN')
        try:
            conn.execute('SELECT 1 FROM sqlite_master LIMIT 1').fetchall()  # starts the read
            yield conn
        finally:
            conn.execute('COMMIT')

    def close(self) -> None:
        """Close the connections this process opened (not those of its parent)."""
        pid = os.getpid()
        with self._lock:
            mine = [c for p, c in self._owned if p == pid]
            self._owned = [(p, c) for p, c in self._owned if p != pid]
        for conn in mine:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()
