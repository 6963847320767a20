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
from .errors import DatabaseError

#: Errors that mean "another process holds the write lock": retried.
_BUSY_MESSAGES = ('database is locked', 'database is busy', 'database table is locked')


def is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and any(
        m in str(exc) for m in _BUSY_MESSAGES)


def retry_busy(method):
    """Retry a whole write when SQLite stays busy past its busy timeout.

    Each attempt is its own transaction that either committed or rolled back,
    so retrying never doubles or loses a message.
    """
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        for attempt in range(self.busy_retries):
            try:
                return method(self, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                if 'full' in str(exc):
                    raise DatabaseError(
                        f'the queue database {_path_of(self)!r} is full (no space left on the '
                        f'disk, or max_page_count reached): {exc}; nothing was written, '
                        f'messages already queued are kept') from exc
                if not is_busy(exc) or attempt == self.busy_retries - 1:
                    raise
                time.sleep(min(0.05 * 2 ** attempt, 1.0) * random.random())
    return wrapper


def _path_of(obj) -> str:
    return getattr(obj, 'path', None) or obj.store.path


def topic_match(binding_key: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more words."""
    return _topic_match(binding_key, routing_key)


@functools.lru_cache(maxsize=65536)
def _topic_match(binding_key, routing_key):
    return _match_words(tuple(binding_key.split('.')), tuple(routing_key.split('.')))


def _match_words(pattern, words):
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == '#':
        return any(_match_words(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == '*' or head == words[0]) and _match_words(rest, words[1:])


class Database:
    """Hands each thread of each process its own connection to one file."""

    busy_retries = 8

    def __init__(self, path: str, busy_timeout: float = 30.0,
                 synchronous: str = 'NORMAL', max_page_count: int | None = None):
        if str(synchronous).upper() not in ('OFF', 'NORMAL', 'FULL', 'EXTRA'):
            raise ValueError(
                f'transport option synchronous={synchronous!r}: expected '
                f'NORMAL, FULL, EXTRA or OFF')
        self.path = path
        self.busy_timeout = float(busy_timeout)
        self.synchronous = str(synchronous).upper()
        self.max_page_count = max_page_count
        self._local = threading.local()
        self._lock = threading.Lock()
        self._schema_pid = None
        self._owned = []       # (pid, connection) opened by this object
        self._inherited = []   # connections copied by fork: never used, never closed
        schema.prepare_directory(path)
        self.conn  # fail fast: validate the file and create the schema

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

    def _open(self) -> sqlite3.Connection:
        conn = schema.connect(self.path, self.busy_timeout, self.synchronous,
                              self.max_page_count)
        conn.create_function('topic_match', 2, topic_match, deterministic=True)
        if self._schema_pid != os.getpid():
            try:
                schema.ensure_schema(conn, self.path)
            except sqlite3.DatabaseError as exc:
                conn.close()
                raise DatabaseError(
                    f'{self.path!r} is not a usable SQLite database: {exc}') from exc
            except BaseException:
                conn.close()
                raise
            self._schema_pid = os.getpid()
        with self._lock:
            self._owned.append((os.getpid(), conn))
        return conn

    @contextmanager
    def transaction(self):
        """A write transaction that takes the write lock up front."""
        conn = self.conn
        conn.execute('BEGIN IMMEDIATE')
        try:
            yield conn
        except BaseException:
            conn.execute('ROLLBACK')
            raise
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
