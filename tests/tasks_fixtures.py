"""Fixtures for the ``tasks`` app: the Ollama simulator, brokers and workers.

Every process is started in its own process group and stopped by the fixture
that started it, on failure too.  Loaded with ``pytest_plugins``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout, what='condition', interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout}s waiting for {what}')
        time.sleep(interval)


class Procs:
    """Subprocesses in their own groups, with logs; all stopped at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, args, env=None, name='proc'):
        path = self.log_dir / f'{name}-{len(self.procs)}.log'
        with open(path, 'wb') as log:
            proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        proc.log_path = path
        proc.name = name
        self.procs.append(proc)
        return proc

    @staticmethod
    def log(proc) -> str:
        return proc.log_path.read_text(errors='replace')

    @staticmethod
    def signal(proc, sig):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self, proc):
        self.signal(proc, signal.SIGKILL)
        proc.wait(10)

    def stop_all(self, timeout=0.5):
        # A test checks warm shutdowns itself: at teardown, a short grace is enough.
        for proc in self.procs:
            if proc.poll() is None:
                self.signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.signal(proc, signal.SIGKILL)  # the group: pool children too
            proc.wait(10)


@pytest.fixture
def tasks_procs(tmp_path):
    procs = Procs(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


class Sim:
    def __init__(self, url, proc):
        self.url = url
        self.proc = proc

    def fault(self, kind, model='*', count=1, seconds=30.0):
        httpx.post(f'{self.url}/_sim/faults', json={
            'kind': kind, 'model': model, 'count': count, 'seconds': seconds}
        ).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(f'{self.url}/_sim/stats').json()


def wait_http_ok(procs: Procs, proc, url: str, timeout: float, what: str):
    """Until ``url`` answers 200; fails at once with the log if ``proc`` exits."""
    def up():
        assert proc.poll() is None, procs.log(proc)
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.TransportError:
            return False
    wait_until(up, timeout, what)


def start_simulator(procs: Procs, *args) -> Sim:
    port = free_port()
    proc = procs.start([sys.executable, '-m', 'tasks.simulator', '--port', str(port), *args],
                       name='simulator')
    url = f'http://127.0.0.1:{port}'
    wait_http_ok(procs, proc, f'{url}/api/version', 15, 'the simulator')
    return Sim(url, proc)


@pytest.fixture
def simulator(tasks_procs):
    return start_simulator(tasks_procs, '--token-rate', '400',
                           '--models', 'gpt-oss:20b=1,nomic-embed-text=1')


def redis_server_path():
    return os.environ.get('REDIS_SERVER') or shutil.which('redis-server')


def start_redis(procs: Procs) -> str:
    path = redis_server_path()
    if not path:
        pytest.skip('redis-server is not installed (.ci/run installs it from Debian '
                    'packages): the Redis variant of this test cannot run here')
    port = free_port()
    proc = procs.start([path, '--port', str(port), '--bind', '127.0.0.1', '--save', '',
                        '--appendonly', 'no'], name='redis')

    def up():
        assert proc.poll() is None, procs.log(proc)
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=0.5) as s:
                s.sendall(b'PING\r\n')
                return s.recv(16).startswith(b'+PONG')
        except OSError:
            return False
    wait_until(up, 10, 'redis-server')
    return f'redis://127.0.0.1:{port}/0'


BASE_CONFIG = {
    'visibility_timeout': 30,
    # Tests of other features name any role; the directory's tests set their own.
    'access': {'default_role': 'system'},
    'ollama': {'stall_timeout': 1.5, 'timeout': 30, 'connect_timeout': 1},
    'retry': {'max_retries': 4, 'backoff': 1, 'backoff_max': 2, 'jitter': False},
    'embedding': {'batch_size': 4, 'max_wait': 0.5},
    'models': {
        'gpt-oss:20b': {'slots': 1, 'queue': 'gpu.gpt-oss'},
        'nomic-embed-text': {'slots': 1, 'queue': 'gpu.embed', 'embedding': True},
    },
    'request_types': {
        'transcript': {'model': 'gpt-oss:20b', 'prompt': 'Summarise: {text}'},
        'compliance': {'model': 'gpt-oss:20b', 'task': 'chat',
                       'prompt': 'Review: {text}', 'system': 'You are a reviewer.'},
        'search': {'model': 'nomic-embed-text', 'task': 'embed'},
    },
}


def merged(base: dict, over: dict) -> dict:
    """Tables merge entry by entry (a test names only the model it changes)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


class TasksEnv:
    """A data dir, a config file, the app configured on it, workers on demand."""

    def __init__(self, tmp_path: Path, procs: Procs, sim: Sim, broker_url: str | None,
                 monkeypatch):
        self.tmp = tmp_path
        self.procs = procs
        self.sim = sim
        self.broker_url = broker_url
        self.monkeypatch = monkeypatch
        self.data_dir = tmp_path / 'data'
        self.config_path = tmp_path / 'tasks.toml'
        self.env = {'TASKS_CONFIG': str(self.config_path), 'TASKS_DATA_DIR': str(self.data_dir),
                    'OLLAMA_HOST': sim.url,
                    'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')}

    def configure(self, **over):
        import tasks
        from tasks import config
        data = merged(BASE_CONFIG, over)
        if self.broker_url:
            data.setdefault('broker_url', self.broker_url)
        self.config_path.write_text(config.to_toml(data))
        for k, v in self.env.items():
            self.monkeypatch.setenv(k, v)
        self.cfg = tasks.configure(config.load(self.config_path))
        return self.cfg

    def worker(self, model='gpt-oss:20b', *extra, name=None, wait=True):
        m = self.cfg.models[model]
        from tasks.workers import commands
        [spec] = commands(self.cfg, beat=False, models={model})
        cmd = spec.cmd
        proc = self.procs.start(cmd + ['-n', f'{name or model.replace(":", "-")}-'
                                       f'{len(self.procs.procs)}@%h', *extra],
                                env=self.env, name=name or f'worker-{m.queue}')
        if wait:
            wait_until(lambda: 'ready.' in self.procs.log(proc) or proc.poll() is not None,
                       60, f'worker for {model}')
            assert proc.poll() is None, self.procs.log(proc)
        return proc

    def run(self, *args, timeout=60, env=None):
        return subprocess.run([sys.executable, '-m', 'tasks', *args], cwd=ROOT,
                              env={**os.environ, **self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def rows(self):
        from tasks import ledger
        return ledger.rows(self.cfg.ledger_url)

    def row(self, task_id):
        from tasks import ledger
        return ledger.get(self.cfg.ledger_url, task_id)

    def wait_status(self, task_id, statuses, timeout=30):
        statuses = (statuses,) if isinstance(statuses, str) else tuple(statuses)

        def check():
            r = self.row(task_id)
            return r if r is not None and r.status in statuses else None
        return wait_until(check, timeout, f'request {task_id} to be {statuses}', 0.1)


def _close_app():
    import tasks
    tasks.app.close()


@pytest.fixture
def tasks_env(tmp_path, tasks_procs, simulator, monkeypatch):
    """The app on sqlite in a temporary data dir (configure() it in the test)."""
    env = TasksEnv(tmp_path, tasks_procs, simulator, None, monkeypatch)
    try:
        yield env
    finally:
        _close_app()


@pytest.fixture(params=['sqlite', 'redis'])
def any_broker_env(request, tmp_path, tasks_procs, simulator, monkeypatch):
    """The same, once on kombu_sqlite and once on Redis."""
    url = start_redis(tasks_procs) if request.param == 'redis' else None
    env = TasksEnv(tmp_path, tasks_procs, simulator, url, monkeypatch)
    try:
        yield env
    finally:
        _close_app()
