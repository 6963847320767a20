"""Keeping the file healthy while workers run: sweeps, checkpoints, backups."""
from __future__ import annotations

import os
import sqlite3
import time

from .broker import Broker
from .errors import DatabaseError


def maintain(broker: Broker) -> dict:
    """One maintenance pass; each step is short and safe beside live workers."""
    store = broker.store
    done = {}
    done['sweep'] = store.sweep()
    conn = store.conn
    # TRUNCATE waits for readers of older snapshots; busy means "try later".
    busy, wal_pages, moved = conn.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()
    done['checkpoint'] = {'busy': bool(busy), 'wal_pages': wal_pages, 'checkpointed': moved}
    free_before = conn.execute('PRAGMA freelist_count').fetchone()[0]
    conn.execute('PRAGMA incremental_vacuum').fetchall()
    free_after = conn.execute('PRAGMA freelist_count').fetchone()[0]
    done['incremental_vacuum'] = {'pages_freed': free_before - free_after,
                                  'auto_vacuum': _auto_vacuum(conn)}
    check = [r[0] for r in conn.execute('PRAGMA quick_check')]
    done['quick_check'] = 'ok' if check == ['ok'] else check
    conn.execute('PRAGMA optimize')
    done['optimize'] = 'ok'
    return done


def _auto_vacuum(conn) -> str:
    mode = conn.execute('PRAGMA auto_vacuum').fetchone()[0]
    return {0: 'none', 1: 'full', 2: 'incremental'}.get(mode, str(mode))


def backup(broker: Broker, dest: str) -> dict:
    """A consistent copy through SQLite's online backup API.

    The copy is written beside ``dest`` and renamed into place, so a failed
    backup never leaves a half-written file under the final name.
    """
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(broker.store.path))
    if os.path.abspath(dest) == os.path.abspath(broker.store.path):
        raise DatabaseError('the backup destination is the queue database itself')
    partial = f'{dest}.partial'
    started = time.monotonic()
    old_umask = os.umask(0o077)  # the copy holds the same prompts
    try:
        target = sqlite3.connect(partial)
        try:
            broker.store.conn.backup(target, pages=1024, sleep=0.005)
            target.execute('PRAGMA journal_mode=DELETE')
        finally:
            target.close()
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    finally:
        os.umask(old_umask)
    os.replace(partial, dest)
    return {'destination': dest, 'bytes': os.path.getsize(dest),
            'seconds': round(time.monotonic() - started, 3)}
