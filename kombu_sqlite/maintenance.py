"""Keeping the file healthy while workers run: sweeps, vacuum, checkpoints, backups.

The promise: no step holds up producers or consumers for more than a moment
(about :data:`STEP_TIMEOUT`).  A step that would have to wait longer than that
for someone else stops, and the report says what is left and why; the next
run carries on from there.

- The WAL checkpoint runs PASSIVE first (copies what it can, takes no lock that
  writers need), then TRUNCATE with a short timeout of its own: TRUNCATE holds
  the write lock while it waits for readers, so with the connection's usual
  busy timeout one long read transaction elsewhere stalled every publish.
- Free pages go back to the disk in slices of :data:`VACUUM_SLICE_PAGES`, each
  its own short write transaction, with pauses in between so waiting writers
  get the lock; the file shrinks when the checkpoint copies the last slice.
- ``backup`` is ``VACUUM INTO``: one read transaction, so writers go on and the
  copy is one instant of the file (the online backup API restarted at every
  commit of another process and never finished under steady load).
"""
from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import time
from contextlib import closing

from . import schema
from .broker import Broker
from .db import is_busy
from .errors import DatabaseError

#: The longest any step waits for a lock it shares with producers and consumers.
STEP_TIMEOUT = 0.1
#: Pages freed per incremental-vacuum transaction (2 MiB at the default page size).
VACUUM_SLICE_PAGES = 512
#: How long one run may spend giving free pages back before it reports the rest.
VACUUM_BUDGET = 60.0
#: How long the TRUNCATE checkpoint keeps trying for a moment without readers.
CHECKPOINT_BUDGET = 1.0
#: ANALYZE rows sampled per index by ``PRAGMA optimize``: keeps it short on big files.
ANALYSIS_LIMIT = 400

_AUTO_VACUUM = {0: 'none', 1: 'full', 2: 'incremental'}
_HELD_BACK = ('a reader in another process holds an old snapshot (a long read '
              'transaction), or writers kept the write lock; the next run catches up')


def maintain(broker: Broker) -> dict:
    """One maintenance pass: sweep, vacuum, checkpoint, check, optimize."""
    path = broker.path
    done = {'sweep': broker.sweep()}
    with closing(_connect(path, STEP_TIMEOUT)) as conn:
        done['incremental_vacuum'] = _incremental_vacuum(conn)
        done['checkpoint'] = _checkpoint(conn)
        check = [r[0] for r in conn.execute('PRAGMA quick_check')]  # a read: blocks nobody
        done['quick_check'] = 'ok' if check == ['ok'] else check
        done['optimize'] = _optimize(conn)
    return done


def _connect(path: str, timeout: float) -> sqlite3.Connection:
    """Our own connection, so our busy timeout is ours alone to choose."""
    return sqlite3.connect(path, timeout=timeout, isolation_level=None)


def _incremental_vacuum(conn) -> dict:
    mode = conn.execute('PRAGMA auto_vacuum').fetchone()[0]
    free_before = _free_pages(conn)
    result = {'auto_vacuum': _AUTO_VACUUM.get(mode, str(mode)), 'pages_freed': 0,
              'pages_left': free_before, 'not_done': None}
    if mode != 2:
        if free_before:
            result['not_done'] = ('auto_vacuum is not incremental, so free pages stay '
                                  'in the file; VACUUM it while no worker runs')
        return result
    deadline = time.monotonic() + VACUUM_BUDGET
    free = free_before
    while free and time.monotonic() < deadline:
        started = time.monotonic()
        try:
            # executescript steps the pragma to its end; execute() frees one page.
            conn.executescript(f'PRAGMA incremental_vacuum({VACUUM_SLICE_PAGES})')
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
        held = time.monotonic() - started
        free = _free_pages(conn)
        # Let writers that queued behind this slice in before taking the next.
        time.sleep(max(2 * held, 0.01))
    result['pages_freed'] = free_before - free
    result['pages_left'] = free
    if free:
        result['not_done'] = (f'{free} free pages left after {VACUUM_BUDGET:.0f} s; '
                              f'the next run continues')
    return result


def _free_pages(conn) -> int:
    return conn.execute('PRAGMA freelist_count').fetchone()[0]


def _checkpoint(conn) -> dict:
    _, frames, copied = conn.execute('PRAGMA wal_checkpoint(PASSIVE)').fetchone()
    if frames < 0:
        return {'wal_frames': 0, 'checkpointed': 0, 'complete': False,
                'not_done': 'the file is not in WAL mode'}
    deadline = time.monotonic() + CHECKPOINT_BUDGET
    while True:
        # Holds the write lock for at most STEP_TIMEOUT while readers finish.
        busy, left, copied_now = conn.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()
        if not busy:  # all copied, the WAL emptied (its figures are now 0)
            return {'wal_frames': frames, 'checkpointed': frames, 'complete': True,
                    'not_done': None}
        if time.monotonic() >= deadline:
            return {'wal_frames': left, 'checkpointed': copied_now, 'complete': False,
                    'not_done': _HELD_BACK}
        time.sleep(STEP_TIMEOUT)


def _optimize(conn) -> str:
    conn.execute(f'PRAGMA analysis_limit={ANALYSIS_LIMIT}')
    try:
        conn.execute('PRAGMA optimize')
    except sqlite3.OperationalError as exc:
        if not is_busy(exc):
            raise
        return 'not done: the write lock stayed busy; the next run tries again'
    return 'ok'


def backup(broker: Broker, dest: str) -> dict:
    """A consistent, verified 0600 copy of the broker at ``dest``.

    The copy is written to a hidden partial file beside ``dest``, checked with
    ``integrity_check``, synced and renamed into place, so ``dest`` is either
    the old file or a complete new one.  The partial file is locked while it is
    written; the next backup removes partial files whose writer died.
    """
    source = broker.path
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(source))
    if os.path.realpath(dest) == os.path.realpath(source):
        raise DatabaseError('the backup destination is the queue database itself')
    directory = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(directory):
        raise DatabaseError(f'the backup directory {directory!r} does not exist')
    prefix = f'.{os.path.basename(dest)}.partial-'
    _remove_abandoned(directory, prefix)
    started = time.monotonic()
    partial = os.path.join(directory, prefix + secrets.token_hex(4))
    # Created 0600 without touching the process umask: the copy holds the prompts.
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for _ in range(_COPY_ATTEMPTS):
            before = _file_state(source)
            _copy(source, partial, directory, dest)
            # Without a -wal the source was read as immutable (no locks): if a
            # writer came and checkpointed meanwhile, the copy may mix pages.
            if before[-1] or _file_state(source) == before:
                break
            os.ftruncate(fd, 0)
        else:
            raise DatabaseError(f'{source!r} kept changing under the backup; try again')
        with closing(sqlite3.connect(partial)) as copy:
            check = [r[0] for r in copy.execute('PRAGMA integrity_check')]
        if check != ['ok']:
            raise DatabaseError(
                f'the backup copy of {source!r} failed integrity_check ({"; ".join(check[:3])}); '
                f'{dest!r} was left as it was; run kombu-sqlite maintain on the source')
        os.fsync(fd)
        os.replace(partial, dest)
        _fsync_directory(directory)
    except BaseException:
        _remove(partial)
        raise
    finally:
        os.close(fd)
    return {'destination': dest, 'bytes': os.path.getsize(dest),
            'seconds': round(time.monotonic() - started, 3), 'integrity_check': 'ok'}


_COPY_ATTEMPTS = 3


def _copy(source: str, partial: str, directory: str, dest: str) -> None:
    with closing(schema.connect_read_only(source, 5.0)) as conn:  # a read
        try:
            conn.execute('VACUUM INTO ?', (partial,))
        except sqlite3.OperationalError as exc:
            if 'full' not in str(exc):
                raise
            raise DatabaseError(f'no space left for the backup in {directory!r}; '
                                f'{dest!r} was left as it was') from exc


def _file_state(path: str) -> tuple:
    """What changes when anyone writes the file: identity, size, mtime, and a -wal."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, os.path.exists(path + '-wal')


def _remove_abandoned(directory: str, prefix: str) -> None:
    """Delete partial copies left by backups that were killed; their lock died with them."""
    for name in os.listdir(directory):
        if not name.startswith(prefix) or name.endswith('-journal'):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatabaseError(
                f'another backup is writing {path!r} right now; wait for it to finish') from None
        finally:
            os.close(fd)
        _remove(path)


def _remove(partial: str) -> None:
    for name in (partial, f'{partial}-journal'):
        try:
            os.remove(name)
        except FileNotFoundError:
            pass


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
