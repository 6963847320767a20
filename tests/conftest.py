"""Fixtures that start real processes on temporary files and always stop them."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, interval=0.1, what='condition'):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f'timed out after {timeout}s waiting for {what}')



def start_exporter(procs, url):
    """``kombu-sqlite metrics URL`` on a free port, answering; returns it and a scrape()."""
    port = free_port()
    exporter = procs.start([sys.executable, '-m', 'kombu_sqlite.cli', 'metrics', url,
                            '--port', str(port)], name='exporter')

    def scrape():
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=5) as r:
                return r.read().decode()
        except OSError:
            return None
    wait_for(scrape, 30, what='the exporter to answer')
    return exporter, scrape

class Processes:
    """Starts subprocesses in their own process groups; stops them all."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.procs = []

    def start(self, args, env=None, name='proc', cwd=None):
        log = open(os.path.join(self.log_dir, f'{name}-{len(self.procs)}.log'), 'wb')
        proc = subprocess.Popen(
            args, env={**os.environ, **(env or {})}, cwd=cwd or HERE,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log_path = log.name
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, proc):
        with open(proc.log_path, errors='replace') as f:
            return f.read()

    @staticmethod
    def kill(proc, sig=signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop(self, proc, timeout=15):
        """Stop gracefully (SIGTERM to the group), then kill."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                pass
        self.kill(proc)

    def stop_all(self, timeout=8):
        """SIGTERM every group at once, wait for all, then kill what is left."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            self.kill(proc)


@pytest.fixture
def procs(tmp_path):
    p = Processes(str(tmp_path))
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture
def db_url(tmp_path):
    return f'sqlite:///{tmp_path}/queue.db'


class CeleryEnv:
    """Environment for tests/celery_app.py on temporary files."""

    def __init__(self, tmp_path, procs):
        self.tmp = tmp_path
        self.procs = procs
        self.marks = tmp_path / 'marks'
        self.marks.mkdir()
        self.env = {
            'TEST_BROKER_URL': f'sqlite:///{tmp_path}/broker.db',
            'TEST_RESULT_URL': f'db+sqlite:///{tmp_path}/results.db',
            'TEST_MARK_DIR': str(self.marks),
            'PYTHONPATH': HERE + os.pathsep + os.environ.get('PYTHONPATH', ''),
        }

    def configure(self, **env):
        self.env.update({k: str(v) for k, v in env.items()})
        os.environ.update(self.env)
        if HERE not in sys.path:
            sys.path.insert(0, HERE)
        # A fresh app each time: Celery caches the backend and broker pools.
        sys.modules.pop('celery_app', None)
        import celery_app
        return celery_app

    def celery(self, *args):
        return [sys.executable, '-m', 'celery', '-A', 'celery_app', *args]

    def worker(self, *args, name='worker', hostname=None):
        hostname = hostname or f'{name}@%h'
        proc = self.procs.start(
            self.celery('worker', '-l', 'info', '-n', hostname, *args),
            env=self.env, name=name)
        wait_for(lambda: 'ready.' in self.procs.log(proc) or proc.poll() is not None,
                 60, what=f'{name} to be ready')
        assert proc.poll() is None, self.procs.log(proc)
        return proc

    def run(self, *args, timeout=60):
        return subprocess.run(self.celery(*args), env={**os.environ, **self.env},
                              cwd=HERE, capture_output=True, text=True, timeout=timeout)

    def marks_of(self, name):
        path = self.marks / name
        return path.read_text().split('\n')[:-1] if path.exists() else []


@pytest.fixture
def celery_env(tmp_path, procs, monkeypatch):
    env = CeleryEnv(tmp_path, procs)
    for key in ('TEST_BROKER_URL', 'TEST_RESULT_URL', 'TEST_MARK_DIR',
                'TEST_VISIBILITY_TIMEOUT', 'TEST_ACKS_LATE'):
        monkeypatch.delenv(key, raising=False)
    yield env
    for key in env.env:
        if key.startswith('TEST_'):
            os.environ.pop(key, None)
