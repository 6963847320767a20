"""Exceptions raised by kombu-sqlite, each naming the problem it reports."""
from kombu.exceptions import KombuError


class DatabaseError(KombuError):
    """The queue database cannot be used: not SQLite, unwritable, too new."""


class QueueFull(KombuError):
    """Publishing was refused because a queue reached its ``x-max-length``."""

    def __init__(self, queue, max_length, retry_after=None):
        self.queue = queue
        self.max_length = max_length
        self.retry_after = retry_after
        super().__init__(
            f'queue {queue!r} is full ({max_length} ready messages, '
            f'x-max-length={max_length}); message not published')
