"""The processes the demo runs: the simulator, a worker per model, Flower.

Each runs in its own session (process group), so a Ctrl-C in the terminal
reaches only the demo, which then stops them as :func:`tasks.workers.stop` does.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from .. import workers
from ..flower_view import TASK_COLUMNS


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it is free, else any free port."""
    for port in ((preferred, 0) if preferred else (0,)):
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError('no free port')


def answers(url: str, auth=None, timeout=1.0) -> bool:
    try:
        return httpx.get(url, auth=auth, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class Stack:
    """Started processes, with a log file each; :meth:`stop` ends them all."""

    def __init__(self, log_dir: Path, env: dict, echo=print):
        self.log_dir = log_dir
        self.env = env
        self.echo = echo
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        path = self.log_dir / f'{name.replace(":", "-")}.log'
        with open(path, 'ab') as log:
            proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.log_dir.parent,
                                    start_new_session=True)
        proc.log_path = path
        with self.lock:
            self.procs[name] = proc
        self.echo(f'started {name} (pid {proc.pid}, log {path})')
        return proc

    def log(self, name: str) -> str:
        return self.procs[name].log_path.read_text(errors='replace')

    def check(self):
        """Raise if a process died: the demo cannot go on without it."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = '\n'.join(self.log(name).splitlines()[-15:])
                raise RuntimeError(f'{name} exited with {proc.returncode}; its log '
                                   f'({proc.log_path}) ends with:\n{tail}')

    def wait_for(self, what: str, predicate, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f'{what} did not start within {timeout:.0f}s')
            time.sleep(0.1)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def stop(self, grace: float = 15.0):
        with self.lock:
            procs = list(self.procs.items())
        return workers.stop(procs, grace)


def start_simulator(stack: Stack, sizing, port: int) -> str:
    models = ','.join(f'{m}={n}' for m, n in sizing.slots.items())
    stack.start('simulator', [sys.executable, '-m', 'tasks.simulator', '--port', str(port),
                              '--models', models, '--token-rate', f'{sizing.token_rate:.3f}'])
    return f'http://127.0.0.1:{port}'


def start_workers(stack: Stack, cfg) -> list[str]:
    names = []
    for model, cmd, *_ in workers.commands(cfg, loglevel='info', beat=False):
        stack.start(f'worker-{model}', cmd)
        names.append(f'worker-{model}')
    return names


def worker_ready(stack: Stack, name: str) -> bool:
    return ' ready.' in stack.log(name)


def start_flower(stack: Stack, port: int, user: str, password: str) -> str:
    stack.start('flower', [sys.executable, '-m', 'celery', '-A', 'tasks', 'flower',
                           f'--port={port}', '--address=127.0.0.1',
                           f'--basic-auth={user}:{password}',
                           f'--tasks_columns={TASK_COLUMNS}'])
    return f'http://127.0.0.1:{port}'


class FlowerWatch(threading.Thread):
    """Polls Flower's ``/api/workers`` with basic auth, as a user's browser would."""

    def __init__(self, url: str, auth: tuple, interval: float = 3.0):
        super().__init__(daemon=True, name='flower-watch')
        self.url, self.auth, self.interval = url, auth, interval
        self.stop_event = threading.Event()
        self.ok = self.failed = 0
        self.unauthorised_refused = None
        self.workers: set[str] = set()
        self.last_error = None

    def poll(self):
        try:
            r = httpx.get(f'{self.url}/api/workers', params={'refresh': 1}, auth=self.auth,
                          timeout=10)
            r.raise_for_status()
            self.workers.update(r.json())
            self.ok += 1
        except (httpx.HTTPError, ValueError) as exc:
            self.failed += 1
            self.last_error = f'{type(exc).__name__}: {exc}'
        if self.unauthorised_refused is None:
            try:  # the API must not answer without the password
                self.unauthorised_refused = httpx.get(
                    f'{self.url}/api/workers', timeout=5).status_code == 401
            except httpx.HTTPError:
                pass

    def run(self):
        while not self.stop_event.is_set():
            self.poll()
            self.stop_event.wait(self.interval)

    def summary(self) -> dict:
        return {'polls_ok': self.ok, 'polls_failed': self.failed,
                'workers_seen': sorted(self.workers), 'last_error': self.last_error,
                'refuses_without_password': self.unauthorised_refused}
