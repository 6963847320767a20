"""The ledger: one row per request, its audit trail and its timings.

SQLAlchemy 2.0, SQLite by default, any SQLAlchemy URL.  A row is keyed by the
Celery task id, so a request that runs again after its worker died updates the
same row and is never counted twice.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

from sqlalchemy import (JSON, Float, Index, Integer, String, Text, create_engine, event,
                        func, inspect, select)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

QUEUED, RUNNING, SUCCEEDED, FAILED, REJECTED, EXPIRED, CANCELLED = (
    'queued', 'running', 'succeeded', 'failed', 'rejected', 'expired', 'cancelled')
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, REJECTED, EXPIRED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)


class Base(DeclarativeBase):
    pass


class Request(Base):
    __tablename__ = 'tasks_request'

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer)
    request_type: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    # Times are Unix seconds (UTC): simple to subtract and to compare across DBs.
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float)
    wait_seconds: Mapped[float | None] = mapped_column(Float)
    run_seconds: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    # Ollama's own counts and timings (durations in seconds).
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_duration: Mapped[float | None] = mapped_column(Float)
    load_duration: Mapped[float | None] = mapped_column(Float)
    prompt_eval_duration: Mapped[float | None] = mapped_column(Float)
    eval_duration: Mapped[float | None] = mapped_column(Float)
    done_reason: Mapped[str | None] = mapped_column(String(32))  # stop, length, load...
    error: Mapped[str | None] = mapped_column(Text)
    response: Mapped[dict | None] = mapped_column(JSON)
    response_expires_at: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index('ix_tasks_request_user_status', 'user_id', 'status'),
        Index('ix_tasks_request_created', 'created_at'),
        Index('ix_tasks_request_expiry', 'response_expires_at'),
    )

    def as_dict(self) -> dict:
        return {c.name: getattr(self, c.name) for c in self.__table__.columns}


class SpikeEpisode(Base):
    """One stretch of spike mode on one queue: the alert log and its count."""
    __tablename__ = 'tasks_spike'

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    queue: Mapped[str] = mapped_column(String(200), index=True)
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    depth_at_start: Mapped[int] = mapped_column(Integer)
    refused: Mapped[int] = mapped_column(Integer, default=0)


class User(Base):
    """The user directory (``python -m tasks users``): wins over ``[users]``."""
    __tablename__ = 'tasks_user'

    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    role: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[float] = mapped_column(Float)


class WorkerSpan(Base):
    """One run of a worker, for utilisation over the time workers were up."""
    __tablename__ = 'tasks_worker_span'

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hostname: Mapped[str] = mapped_column(String(200))
    queues: Mapped[str] = mapped_column(Text)  # comma-separated
    started_at: Mapped[float] = mapped_column(Float, index=True)
    seen_at: Mapped[float] = mapped_column(Float)  # last heartbeat written
    stopped_at: Mapped[float | None] = mapped_column(Float)


_engines: dict = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_conn, _record):
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see below)
    cur = dbapi_conn.cursor()
    cur.execute('PRAGMA journal_mode=WAL')  # readers never block the writer
    cur.execute('PRAGMA synchronous=NORMAL')
    cur.execute('PRAGMA busy_timeout=30000')
    cur.close()


def _sqlite_begin(conn):
    # IMMEDIATE takes the write lock up front: a read-then-write transaction
    # (the per-user limit check) cannot fail with SQLITE_BUSY half-way.  A
    # read-only look (read_session) takes no lock: WAL readers never wait.
    read_only = conn.get_execution_options().get('tasks_read_only')
    conn.exec_driver_sql('BEGIN' if read_only else 'BEGIN IMMEDIATE')


def engine(url: str):
    """One engine per URL and per process (engines do not survive fork)."""
    key = (url, os.getpid())
    with _lock:
        eng = _engines.get(key)
        if eng is None:
            if url.startswith('sqlite:///'):
                path = url[len('sqlite:///'):]
                if path and path != ':memory:':
                    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            eng = create_engine(url, pool_pre_ping=not url.startswith('sqlite'))
            if eng.dialect.name == 'sqlite':
                event.listen(eng, 'connect', _sqlite_pragmas)
                event.listen(eng, 'begin', _sqlite_begin)
            Base.metadata.create_all(eng)
            _add_new_columns(eng)
            _engines[key] = eng
        return eng


def _add_new_columns(eng):
    """A ledger written by an older version gets the (nullable) columns added since."""
    with eng.begin() as conn:
        for table in Base.metadata.sorted_tables:
            have = {c['name'] for c in inspect(conn).get_columns(table.name)}
            for column in table.columns:
                if column.name not in have and column.nullable:
                    kind = column.type.compile(dialect=eng.dialect)
                    conn.exec_driver_sql(
                        f'ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}')


@contextmanager
def session(url: str):
    """A transaction: committed on success, rolled back on error."""
    with Session(engine(url), expire_on_commit=False) as s, s.begin():
        yield s


@contextmanager
def read_session(url: str):
    """A transaction that only reads: it never waits for, nor holds, the write lock."""
    bind = engine(url).execution_options(tasks_read_only=True)
    with Session(bind, expire_on_commit=False) as s, s.begin():
        yield s


def counts(url: str) -> dict[tuple[str, str], int]:
    """Requests by (model, status), read without taking the write lock."""
    with read_session(url) as s:
        return {(model, status): n for model, status, n in s.execute(
            select(Request.model, Request.status, func.count()).group_by(
                Request.model, Request.status))}


def spike_episodes(url: str, since: float | None = None) -> list[dict]:
    """Spike mode episodes (queue, started_at, ended_at, depth_at_start, refused)."""
    with read_session(url) as s:
        q = select(SpikeEpisode).order_by(SpikeEpisode.started_at)
        if since is not None:
            q = q.where(SpikeEpisode.started_at >= since)
        return [{'queue': e.queue, 'started_at': e.started_at, 'ended_at': e.ended_at,
                 'depth_at_start': e.depth_at_start, 'refused': e.refused}
                for e in s.scalars(q)]


def active_count(s: Session, user_id: str, role: str) -> int:
    """The user's queued and running requests asked in ``role``."""
    rows = s.scalars(select(Request.task_id).where(
        Request.user_id == user_id, Request.role == role, Request.status.in_(ACTIVE)))
    return len(rows.all())


def mean_run_seconds(s: Session, model: str, default: float, recent: int = 50) -> float:
    """Mean run time of the model's last ``recent`` successful requests."""
    runs = s.scalars(select(Request.run_seconds).where(
        Request.model == model, Request.status == SUCCEEDED,
        Request.run_seconds.is_not(None)).order_by(Request.completed_at.desc()).limit(recent)
    ).all()
    return sum(runs) / len(runs) if runs else default


def get(url: str, task_id: str) -> Request | None:
    with session(url) as s:
        return s.get(Request, task_id)


def rows(url: str, since: float | None = None) -> list[Request]:
    with session(url) as s:
        q = select(Request).order_by(Request.created_at)
        if since is not None:
            q = q.where(Request.created_at >= since)
        return list(s.scalars(q))


def now() -> float:
    return time.time()
