"""The brokers under test: kombu_sqlite, stock Redis, kombu's SQLAlchemy on SQLite.

Every broker gets the same counts: the ratios compare equal work.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import procs

NAMES = ('sqlite', 'redis', 'sqla')


@dataclass
class Broker:
    name: str
    url: str
    transport_options: dict = field(default_factory=dict)
    tmpdir: Path | None = None
    server_pid: int | None = None  # a broker server's process (redis-server), for its CPU

    def with_options(self, **options) -> Broker:
        """The same broker with more transport options."""
        return Broker(self.name, self.url, {**self.transport_options, **options},
                      self.tmpdir, self.server_pid)

    def fresh(self, tag: str) -> Broker:
        """The same broker on an empty store (new file, or FLUSHDB on Redis)."""
        if self.name == 'sqlite':
            url = f'sqlite:///{self.tmpdir}/{tag}.db'
        elif self.name == 'sqla':
            url = f'sqla+sqlite:///{self.tmpdir}/{tag}-sqla.db'
        else:
            import redis
            redis.Redis.from_url(self.url).flushdb()
            url = self.url
        return Broker(self.name, url, dict(self.transport_options), self.tmpdir,
                      self.server_pid)

    def connection(self):
        import kombu
        return kombu.Connection(self.url, transport_options=self.transport_options)


def register_sqlite() -> None:
    try:
        import kombu_sqlite  # noqa: F401  registers sqlite://
    except ImportError:
        pass


def sqlite_available() -> str | None:
    """None when kombu_sqlite works here, else why not."""
    try:
        import kombu

        import kombu_sqlite  # noqa: F401  registers sqlite://
        conn = kombu.Connection('sqlite:////tmp/kombu-sqlite-bench-probe.db')
        conn.connect()
        conn.release()
        return None
    except Exception as exc:  # noqa: BLE001  the transport may be missing or broken
        return f'{type(exc).__name__}: {exc}'


def acks_unbatched(url: str) -> bool:
    """Whether ``batch_acks=False`` makes a consumer's ack reach the file at once.

    Probed by behaviour, not by name: a transport that ignores the option
    would otherwise have its batched figure reported as the unbatched one.
    """
    import kombu
    from kombu import Consumer, Queue

    from kombu_sqlite import Broker as Admin
    options = {'batch_acks': False, 'housekeeping_interval': 3600}
    with kombu.Connection(url, transport_options=options) as conn:
        conn.Producer().publish('probe', routing_key='bench.probe',
                                declare=[Queue('bench.probe')])
        got = []
        with Consumer(conn, [Queue('bench.probe')], prefetch_count=10,
                      callbacks=[lambda body, message: (message.ack(), got.append(body))]):
            conn.drain_events(timeout=10)
            with Admin(url) as admin:  # still consuming: no claim or sweep since the ack
                stats = admin.stats()['bench.probe']
        return got == ['probe'] and stats['leased'] == 0 and stats['ready'] == 0


def redis_parser_is_hiredis() -> bool:
    from redis.utils import HIREDIS_AVAILABLE
    return bool(HIREDIS_AVAILABLE)


class RedisServer:
    """A throwaway redis-server on loopback, no persistence."""

    def __init__(self, tmpdir: Path):
        self.tmpdir = tmpdir
        self.port = procs.free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f'redis://127.0.0.1:{self.port}/0'

    def __enter__(self):
        binary = shutil.which('redis-server')
        if binary is None:
            raise FileNotFoundError('redis-server is not installed')
        with open(self.tmpdir / 'redis.log', 'wb') as log:  # the child keeps its own copy
            self.proc = procs.popen(
                [binary, '--port', str(self.port), '--bind', '127.0.0.1', '--save', '',
                 '--appendonly', 'no', '--dir', str(self.tmpdir)],
                stdout=log, stderr=subprocess.STDOUT)
        import redis
        client = redis.Redis(port=self.port)

        def up():
            try:
                return client.ping()
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError('redis-server exited at start, see redis.log')
                return False
        procs.wait_for(up, 15, what='redis-server')
        return self

    def __exit__(self, *exc):
        procs.stop(self.proc)


def setup(names, tmpdir: Path, stack, sqlite_options: dict) -> tuple[list[Broker], list[str]]:
    """Start what is needed; returns the usable brokers and notes on skipped ones."""
    brokers, notes = [], []
    for name in names:
        if name == 'sqlite':
            why = sqlite_available()
            if why:
                notes.append(f'sqlite skipped: kombu_sqlite unusable ({why})')
                continue
            brokers.append(Broker('sqlite', f'sqlite:///{tmpdir}/bench.db',
                                  dict(sqlite_options), tmpdir=tmpdir))
        elif name == 'redis':
            if shutil.which('redis-server') is None:
                notes.append('redis skipped: redis-server not installed '
                             '(apt-get install redis-server)')
                continue
            server = stack.enter_context(RedisServer(tmpdir))
            if not redis_parser_is_hiredis():
                notes.append('redis measured without hiredis (pip install hiredis): '
                             'the pure-Python parser is slower than a tuned client')
            brokers.append(Broker('redis', server.url, tmpdir=tmpdir,
                                  server_pid=server.proc.pid))
        elif name == 'sqla':
            brokers.append(Broker('sqla', f'sqla+sqlite:///{tmpdir}/sqla.db', tmpdir=tmpdir))
    return brokers, notes
