"""What the figures were measured on."""
from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
from pathlib import Path


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or '?'


def _ram_gib() -> float:
    try:
        with open('/proc/meminfo') as f:
            kib = int(f.readline().split()[1])  # MemTotal
        return round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return 0.0


def _redis_version() -> str | None:
    try:
        out = subprocess.run(['redis-server', '--version'], capture_output=True, text=True,
                             check=False)
    except FileNotFoundError:
        return None
    return next((w[2:] for w in out.stdout.split() if w.startswith('v=')), None)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _revision() -> str | None:
    """The commit measured, marked when kombu_sqlite/ differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--', 'kombu_sqlite'], cwd=root,
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (' (kombu_sqlite/ modified)' if dirty else '')


def describe() -> dict:
    import celery
    import kombu
    import sqlalchemy
    return {
        'nproc': os.cpu_count(), 'cpu': _cpu_model(), 'ram_gib': _ram_gib(),
        'kernel': platform.release(), 'python': platform.python_version(),
        'kombu': kombu.__version__, 'celery': celery.__version__,
        'sqlalchemy': sqlalchemy.__version__, 'sqlite': sqlite3.sqlite_version,
        'redis_py': _version('redis'), 'hiredis': _version('hiredis'),
        'redis_server': _redis_version(), 'revision': _revision(),
    }
