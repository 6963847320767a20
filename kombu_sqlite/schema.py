"""The database file: opening it safely, PRAGMAs, the schema and its versions.

Every table the broker uses is created here, so the whole on-disk layout can be
read in one place.  ``PRAGMA user_version`` carries the schema version; opening
an older file migrates it in place, a newer one is refused.
"""
from __future__ import annotations

import os
import sqlite3
import stat
from urllib.parse import unquote

from .errors import DatabaseError

SCHEMA_VERSION = 3

#: Statements that build schema version 1 from an empty file.
SCHEMA_V1 = (
    # One row per message copy in a queue.  A row is *ready* while
    # lease_expires_at is NULL; a consumer claims it by stamping a lease, and
    # a delayed message is a row leased by nobody (lease_owner NULL) until due.
    """
    CREATE TABLE kombu_message (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        queue            TEXT    NOT NULL,
        priority         INTEGER NOT NULL,
        visible_at       REAL    NOT NULL,
        lease_expires_at REAL,
        lease_owner      TEXT,
        delivery_count   INTEGER NOT NULL DEFAULT 0,
        expires_at       REAL,
        client           TEXT,
        task_name        TEXT,
        task_id          TEXT,
        published_at     REAL    NOT NULL,
        payload          TEXT    NOT NULL
    )
    """,
    # The claim walks this index in delivery order: O(log n) per claim.
    """CREATE INDEX kombu_message_ready ON kombu_message (queue, priority, id)
       WHERE lease_expires_at IS NULL""",
    """CREATE INDEX kombu_message_lease ON kombu_message (lease_expires_at)
       WHERE lease_expires_at IS NOT NULL""",
    """CREATE INDEX kombu_message_owner ON kombu_message (lease_owner)
       WHERE lease_owner IS NOT NULL""",
    """CREATE INDEX kombu_message_expiry ON kombu_message (expires_at)
       WHERE expires_at IS NOT NULL""",
    # Queues and their arguments (x-message-ttl, x-expires, ...).
    """
    CREATE TABLE kombu_queue (
        name         TEXT PRIMARY KEY,
        arguments    TEXT NOT NULL DEFAULT '{}',
        message_ttl  REAL,
        expires      REAL,
        auto_delete  INTEGER NOT NULL DEFAULT 0,
        declared_at  REAL NOT NULL,
        last_used_at REAL NOT NULL
    )
    """,
    """CREATE INDEX kombu_queue_expiry ON kombu_queue (expires)
       WHERE expires IS NOT NULL""",
    # Exchanges and bindings are shared state: every process routes with them.
    """
    CREATE TABLE kombu_exchange (
        name      TEXT PRIMARY KEY,
        type      TEXT NOT NULL,
        arguments TEXT NOT NULL DEFAULT '{}'
    )
    """,
    """
    CREATE TABLE kombu_binding (
        exchange    TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        queue       TEXT NOT NULL,
        PRIMARY KEY (exchange, routing_key, queue)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX kombu_binding_queue ON kombu_binding (queue)",
    # Counters that survive restarts and add up every process.
    """
    CREATE TABLE kombu_counter (
        queue TEXT NOT NULL,
        name  TEXT NOT NULL,
        value INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (queue, name)
    ) WITHOUT ROWID
    """,
)

#: Version 2: scheduling strategies (a precomputed ``rank`` orders the claim),
#: backpressure, dead letters and fair-share tags.
SCHEMA_V2 = (
    # rank is what the claim sorts on: the priority for 'priority' queues,
    # priority and fair-share tag for 'fair' queues, 0 for 'fifo' and 'lifo'.
    'ALTER TABLE kombu_message ADD COLUMN rank INTEGER NOT NULL DEFAULT 0',
    'UPDATE kombu_message SET rank = priority',
    'DROP INDEX kombu_message_ready',
    """CREATE INDEX kombu_message_ready ON kombu_message (queue, rank, id)
       WHERE lease_expires_at IS NULL""",
    'ALTER TABLE kombu_queue ADD COLUMN max_length INTEGER',
    "ALTER TABLE kombu_queue ADD COLUMN overflow TEXT NOT NULL DEFAULT 'reject-publish'",
    "ALTER TABLE kombu_queue ADD COLUMN scheduling TEXT NOT NULL DEFAULT 'priority'",
    """
    CREATE TABLE kombu_dead_letter (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        queue          TEXT    NOT NULL,
        priority       INTEGER NOT NULL,
        delivery_count INTEGER NOT NULL,
        reason         TEXT    NOT NULL,
        dead_at        REAL    NOT NULL,
        client         TEXT,
        task_name      TEXT,
        task_id        TEXT,
        published_at   REAL    NOT NULL,
        payload        TEXT    NOT NULL
    )
    """,
    'CREATE INDEX kombu_dead_letter_queue ON kombu_dead_letter (queue, id)',
    # Fair queueing: the last tag given to each client per (queue, priority);
    # client '' holds the tag of the last message delivered (the clock).
    """
    CREATE TABLE kombu_fair (
        queue    TEXT    NOT NULL,
        priority INTEGER NOT NULL,
        client   TEXT    NOT NULL,
        tag      INTEGER NOT NULL,
        PRIMARY KEY (queue, priority, client)
    ) WITHOUT ROWID
    """,
)

#: Version 3: counters in 10-second buckets, for "in the last minute" figures.
SCHEMA_V3 = (
    """
    CREATE TABLE kombu_counter_recent (
        bucket INTEGER NOT NULL,
        queue  TEXT    NOT NULL,
        name   TEXT    NOT NULL,
        value  INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (bucket, queue, name)
    ) WITHOUT ROWID
    """,
)

#: version -> statements that take a file from version-1 to version.
MIGRATIONS = {1: SCHEMA_V1, 2: SCHEMA_V2, 3: SCHEMA_V3}


def path_from_url(url: str) -> str:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs.db`` -> ``/abs.db``."""
    scheme, sep, rest = url.partition('://')
    if not sep or scheme.lower() != 'sqlite':
        raise ValueError(
            f'malformed broker URL {url!r}: expected sqlite:///relative/path.db '
            f'or sqlite:////absolute/path.db')
    if not rest.startswith('/'):
        raise ValueError(
            f'malformed broker URL {url!r}: the path must follow three slashes '
            f'(sqlite:///queue.db) and a host is not allowed')
    path = unquote(rest[1:].split('?', 1)[0])
    if not path or path.endswith('/'):
        raise ValueError(f'malformed broker URL {url!r}: no database file named')
    if path == ':memory:':
        raise ValueError(
            f'broker URL {url!r}: an in-memory database cannot be shared '
            f'between processes; name a file')
    return path


def prepare_directory(path: str) -> None:
    """Create a missing directory 0700 and check the file can be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(
                f'cannot create the directory {directory!r} for the queue '
                f'database: {exc.strerror}') from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DatabaseError(
            f'the directory {directory!r} is not writable; SQLite needs to '
            f'create {os.path.basename(path)}-wal and -shm files beside the '
            f'database')
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        raise DatabaseError(f'the queue database {path!r} is not writable')


def connect(path: str, busy_timeout: float, synchronous: str,
            max_page_count: int | None = None) -> sqlite3.Connection:
    """Open one connection (one per thread) in autocommit mode with our PRAGMAs."""
    # Files are created owner-only: the queue holds people's prompts.
    old_umask = os.umask(0o077)
    try:
        new_file = not os.path.exists(path) or os.path.getsize(path) == 0
        conn = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None,
            check_same_thread=False)
        try:
            if new_file:
                # Lets `kombu-sqlite maintain` give free pages back to the disk.
                conn.execute('PRAGMA auto_vacuum=INCREMENTAL')
            conn.execute('PRAGMA journal_mode=WAL').fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            if isinstance(exc, sqlite3.OperationalError) and 'locked' in str(exc):
                raise  # busy, not broken: the caller retries
            raise DatabaseError(
                f'{path!r} is not a usable SQLite database: {exc}') from exc
    finally:
        os.umask(old_umask)
    conn.execute(f'PRAGMA synchronous={synchronous}')
    conn.execute(f'PRAGMA busy_timeout={int(busy_timeout * 1000)}')
    conn.execute('PRAGMA foreign_keys=OFF')
    if max_page_count:
        conn.execute(f'PRAGMA max_page_count={int(max_page_count)}')
    return conn


def ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    """Create or migrate the schema, under a write lock so processes agree."""
    version = conn.execute('PRAGMA user_version').fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f'{path!r} has schema version {version}, newer than version '
            f'{SCHEMA_VERSION} that this kombu-sqlite understands; upgrade '
            f'kombu-sqlite')
    conn.execute('BEGIN IMMEDIATE')
    try:
        version = conn.execute('PRAGMA user_version').fetchone()[0]
        if version == 0 and _has_foreign_tables(conn):
            raise DatabaseError(
                f'{path!r} is an SQLite database of another application '
                f'(it has tables but no kombu-sqlite schema); refusing to '
                f'write to it')
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target]:
                conn.execute(statement)
        conn.execute(f'PRAGMA user_version={SCHEMA_VERSION}')
        conn.execute('COMMIT')
    except BaseException:
        conn.execute('ROLLBACK')
        raise
    _restrict_permissions(path)


def _has_foreign_tables(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' "
        "AND name NOT LIKE 'sqlite_%'").fetchone()
    return row[0] > 0


def _restrict_permissions(path: str) -> None:
    for name in (path, path + '-wal', path + '-shm'):
        try:
            os.chmod(name, stat.S_IRUSR | stat.S_IWUSR)
        except OSError:
            pass
