"""The database file: opening it safely, PRAGMAs, the schema and its versions.

Every table the broker uses is created here, so the whole on-disk layout can be
read in one place.  ``PRAGMA user_version`` carries the schema version; opening
an older file migrates it in place, a newer one is refused.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import stat
import struct
from urllib.parse import quote, unquote

from .errors import DatabaseError, DatabaseUnavailable, ForeignDatabase, UnusableURL

SCHEMA_VERSION = 4

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

#: Version 4: leases and queue expiry on CLOCK_MONOTONIC, valid for one boot.
#: ``boot_id`` names the boot whose monotonic clock the deadlines use; a file
#: first opened in a new boot has its leases released (see Store.adopt_boot).
SCHEMA_V4 = (
    """
    CREATE TABLE kombu_meta (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID
    """,
)

#: version -> statements that take a file from version-1 to version.
MIGRATIONS = {1: SCHEMA_V1, 2: SCHEMA_V2, 3: SCHEMA_V3, 4: SCHEMA_V4}


def path_from_url(url: str) -> str:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs.db`` -> ``/abs.db``."""
    scheme, sep, rest = url.partition('://')
    if not sep or scheme.lower() != 'sqlite':
        raise UnusableURL(
            f'malformed broker URL {url!r}: expected sqlite:///relative/path.db '
            f'or sqlite:////absolute/path.db')
    if not rest.startswith('/'):
        raise UnusableURL(
            f'malformed broker URL {url!r}: the path must follow three slashes '
            f'(sqlite:///queue.db) and a host is not allowed')
    path = unquote(rest[1:].split('?', 1)[0])
    if not path or path.endswith('/'):
        raise UnusableURL(
            f'malformed broker URL {url!r}: no database file named (a directory?); '
            f'add a file name, e.g. sqlite:///{path or "./"}queue.db')
    if path == ':memory:':
        raise UnusableURL(
            f'broker URL {url!r}: an in-memory database cannot be shared '
            f'between processes; name a file')
    return path


#: ``PRAGMA application_id`` of a kombu-sqlite broker file ("KSQL"): how a
#: file is recognised as ours before anything writes to it.
APPLICATION_ID = 0x4B53514C

#: Tables of schema version 1-3 files, made before application_id was set.
_OUR_TABLES = {'kombu_message', 'kombu_queue', 'kombu_exchange', 'kombu_binding',
               'kombu_counter', 'kombu_dead_letter', 'kombu_fair', 'kombu_counter_recent',
               'kombu_meta', 'sqlite_sequence', 'sqlite_stat1', 'sqlite_stat4'}

logger = logging.getLogger(__name__)


def prepare_directory(path: str) -> None:
    """Create missing directories 0700 (each one) and check the file can be written."""
    if os.path.isdir(path):
        raise DatabaseUnavailable(
            f'the broker URL names {path!r}, which is a directory; name a file in '
            f'it, e.g. sqlite:///{os.path.join(path, "queue.db")}')
    directory = os.path.dirname(os.path.abspath(path))
    missing = []
    while not os.path.isdir(directory) and directory != os.path.dirname(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for name in reversed(missing):
        try:
            os.mkdir(name, 0o700)
            os.chmod(name, 0o700)   # whatever the umask
        except FileExistsError:
            pass
        except OSError as exc:
            raise DatabaseUnavailable(
                f'cannot create the directory {name!r} for the queue '
                f'database: {exc.strerror}') from exc
    directory = os.path.dirname(os.path.abspath(path))
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DatabaseUnavailable(
            f'the directory {directory!r} is not writable; SQLite needs to '
            f'create {os.path.basename(path)}-wal and -shm files beside the '
            f'database')
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        raise DatabaseUnavailable(f'the queue database {path!r} is not writable')


def identify(path: str) -> bool:
    """Whether ``path`` is a new (missing or empty) file; raises unless it is ours.

    Reads the SQLite header and the table list through a connection that can
    neither write nor create ``-wal``/``-shm`` files, so a file that is not
    ours is refused leaving it and its directory exactly as they were.

    Never through ``open()``: closing any descriptor of the file drops every
    POSIX lock this process holds on it, those of its live connections too;
    another process closing its last connection then deletes the ``-wal``
    under them, and their later commits go to the deleted file and are lost.
    SQLite's own close keeps the descriptor while the process holds locks.
    """
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return True
    if os.path.getsize(path) < 100:
        raise _no_header(path)
    # The header may lag behind the -wal; application_id is written before the
    # file turns to WAL, so it is always here; the version is read later.
    app_id, version, tables = _header(path)
    if app_id == APPLICATION_ID:
        return False
    if app_id != 0:
        raise _foreign(path, app_id, version, None)
    if not tables and version == 0:
        return True   # an empty SQLite file: ours to set up
    if 'kombu_message' in tables and tables <= _OUR_TABLES:
        return False   # ours, from before application_id was set
    raise _foreign(path, app_id, version, tables)


def _header(path: str) -> tuple[int, int, set]:
    """application_id, user_version and table names, from the file alone."""
    try:
        conn = sqlite3.connect(f'{_uri(path)}?mode=ro&immutable=1', uri=True)
    except sqlite3.OperationalError as exc:
        raise DatabaseUnavailable(f'cannot read the queue database {path!r}: {exc}') from exc
    try:
        app_id = conn.execute('PRAGMA application_id').fetchone()[0]
        version = conn.execute('PRAGMA user_version').fetchone()[0]
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        if 'file is not a database' in str(exc):
            raise _no_header(path) from exc
        raise DatabaseError(
            f'{path!r} is not a usable SQLite database: {exc}; it was left as it was') from exc
    finally:
        conn.close()
    return app_id, version, tables


def _no_header(path: str) -> DatabaseError:
    return DatabaseError(f'{path!r} is not a usable SQLite database (no SQLite header); '
                         f'it was left as it was')


def _uri(path: str) -> str:
    return 'file:' + quote(os.path.abspath(path))


def _foreign(path, app_id, version, tables):
    shown = '' if tables is None else f', tables: {", ".join(sorted(tables)) or "none"}'
    return ForeignDatabase(
        f'{path!r} is an SQLite database of another application (application_id '
        f'{app_id:#x}, user_version {version}{shown}), not a kombu-sqlite broker; '
        f'refusing to touch it: point the broker URL at a new file')


def _supported(path, version):
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f'{path!r} has schema version {version}, newer than version '
            f'{SCHEMA_VERSION} that this kombu-sqlite understands; upgrade '
            f'kombu-sqlite')
    return version


def create_file(path: str) -> None:
    """Create a missing database file owner-only, without touching the umask."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise DatabaseUnavailable(
            f'cannot create the queue database {path!r}: {exc.strerror}') from exc


def secure_modes(path: str) -> None:
    """The database, -wal and -shm are 0600: the queue holds people's prompts.

    SQLite creates -wal and -shm with the database's mode; a file restored
    with plain ``cp`` may be 0644.  Fix it and say so.
    """
    for name in (path, path + '-wal', path + '-shm'):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
            if mode & 0o077:
                os.chmod(name, 0o600)
                logger.warning('kombu-sqlite: %s had mode %o, readable by other users; '
                               'set to 0600', name, mode)
        except OSError:
            pass


def connect(path: str, busy_timeout: float, synchronous: str,
            max_page_count: int | None = None, new_file: bool = False) -> sqlite3.Connection:
    """Open one connection (one per thread) in autocommit mode with our PRAGMAs.

    Call only on a file :func:`identify` accepted: this one writes.
    """
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False)
    try:
        if new_file:
            # Set before WAL so it lands in the file itself; auto_vacuum lets
            # `kombu-sqlite maintain` give free pages back to the disk.
            conn.execute('PRAGMA auto_vacuum=INCREMENTAL')   # only before the first write
            conn.execute(f'PRAGMA application_id={APPLICATION_ID}')
        conn.execute('PRAGMA journal_mode=WAL').fetchone()
    except sqlite3.DatabaseError as exc:
        conn.close()
        if isinstance(exc, sqlite3.OperationalError):
            raise  # busy, full, I/O: not broken; classified and retried by the caller
        raise DatabaseError(f'{path!r} is not a usable SQLite database: {exc}') from exc
    conn.execute(f'PRAGMA synchronous={synchronous}')
    conn.execute(f'PRAGMA busy_timeout={int(busy_timeout * 1000)}')
    conn.execute('PRAGMA foreign_keys=OFF')
    if max_page_count:
        conn.execute(f'PRAGMA max_page_count={int(max_page_count)}')
    return conn


def connect_read_only(path: str, busy_timeout: float) -> sqlite3.Connection:
    """A connection that cannot write: for commands that only look."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no queue database at {path!r}')
    if identify(path):
        raise DatabaseError(f'{path!r} is empty: no kombu-sqlite broker has used it yet')
    # With no -wal beside it the file is complete and nobody writes it: read
    # it as immutable, which creates no -wal or -shm either.
    immutable = '' if os.path.exists(path + '-wal') else '&immutable=1'
    conn = sqlite3.connect(f'{_uri(path)}?mode=ro{immutable}', uri=True,
                           timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f'PRAGMA busy_timeout={int(busy_timeout * 1000)}')
    version = conn.execute('PRAGMA user_version').fetchone()[0]
    if version != SCHEMA_VERSION:
        conn.close()
        raise DatabaseError(
            f'{path!r} has schema version {version}; a read-only command does not '
            f'migrate it: start a worker (or open it once with the transport) first')
    return conn


def ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    """Create or migrate the schema, under a write lock so processes agree."""
    version = _supported(path, conn.execute('PRAGMA user_version').fetchone()[0])
    if version == SCHEMA_VERSION and conn.execute(
            'PRAGMA application_id').fetchone()[0] == APPLICATION_ID:
        return
    conn.execute('BEGIN IMMEDIATE')
    try:
        version = _supported(path, conn.execute('PRAGMA user_version').fetchone()[0])
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target]:
                conn.execute(statement)
        conn.execute(f'PRAGMA application_id={APPLICATION_ID}')
        conn.execute(f'PRAGMA user_version={SCHEMA_VERSION}')
        conn.execute('COMMIT')
    except BaseException:
        if conn.in_transaction:
            conn.execute('ROLLBACK')
        raise
