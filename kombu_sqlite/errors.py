"""Exceptions raised by kombu-sqlite, each naming the problem it reports.

Two families, so that kombu and Celery know what to do:

* :class:`DatabaseUnavailable` and its subclasses (full disk, a file held
  locked, an I/O error, a path that cannot be opened) are *recoverable*: they
  are among ``Transport.connection_errors``, so kombu's ``ensure_connection``
  retries them and falls over to the next URL, and a Celery worker reconnects
  instead of exiting.
* Every other :class:`DatabaseError` (a corrupt file, another application's
  database, a schema newer than this kombu-sqlite) is *fatal*: retrying cannot
  help, an operator must act, and the message says what to do.
"""
from kombu.exceptions import KombuError


class DatabaseError(KombuError):
    """The queue database cannot be used: corrupt, foreign, too new."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be used just now; retrying may succeed."""


class UnusableURL(DatabaseUnavailable, ValueError):
    """The broker URL cannot name a database file; kombu tries the next URL."""


class DatabaseFull(DatabaseUnavailable):
    """The disk (or ``max_page_count``) is full: nothing was written."""


class DatabaseLocked(DatabaseUnavailable):
    """Another process held the write lock for longer than the busy timeout."""


class DatabaseCorrupt(DatabaseError):
    """SQLite reports the file malformed: restore it from a backup."""


class ForeignDatabase(DatabaseError):
    """The file belongs to another application; it was not touched."""


class QueueFull(KombuError):
    """Publishing was refused because a queue reached its ``x-max-length``."""

    def __init__(self, queue, max_length, retry_after=None):
        self.queue = queue
        self.max_length = max_length
        self.retry_after = retry_after
        super().__init__(
            f'queue {queue!r} is full ({max_length} ready messages, '
            f'x-max-length={max_length}); message not published')
