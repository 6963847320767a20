"""What ``pip install kombu-sqlite`` brings, in fresh virtual environments.

A project that only wants the transport must not get Celery, Flower or the
tasks app's dependencies; ``[tasks]`` must resolve the newest Celery release
(nothing we depend on may pin it back).  Needs the package index that pip is
configured with; run by ``tox -e packaging``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Dependencies that belong to the tasks app, never to the plain install.
APP_ONLY = {'celery', 'flower', 'celery-batches', 'sqlalchemy', 'httpx', 'tornado',
            'matplotlib'}


class Env:
    def __init__(self, path: Path):
        self.path = path
        self.bin = path / 'bin'
        venv.create(path, with_pip=True)

    def run(self, *args, timeout=600, cwd=None, env=None, check=True):
        proc = subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=timeout, cwd=cwd,
                              env={**os.environ, **(env or {})})
        if check:
            assert proc.returncode == 0, f'{args}: {proc.stdout}\n{proc.stderr}'
        return proc

    def pip_install(self, requirement: str):
        self.run('python', '-m', 'pip', 'install', '-q', requirement)
        self.run('python', '-m', 'pip', 'check')

    def installed(self) -> dict[str, str]:
        out = self.run('python', '-m', 'pip', 'list', '--format=json').stdout
        return {_norm(d['name']): d['version'] for d in json.loads(out)}

    def newest(self, name: str) -> str:
        out = self.run('python', '-m', 'pip', 'index', 'versions', name).stdout
        return re.search(rf'^{name} \(([^)]+)\)', out, re.M).group(1)


def _norm(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


@pytest.fixture(scope='module')
def plain(tmp_path_factory):
    env = Env(tmp_path_factory.mktemp('plain') / 'venv')
    env.pip_install(str(ROOT))
    return env


@pytest.fixture(scope='module')
def with_tasks(tmp_path_factory):
    env = Env(tmp_path_factory.mktemp('tasks') / 'venv')
    env.pip_install(f'{ROOT}[tasks]')
    return env


def test_plain_install_is_the_transport_and_its_command(plain, tmp_path):
    installed = plain.installed()
    assert 'kombu-sqlite' in installed and 'kombu' in installed
    assert not APP_ONLY & installed.keys(), sorted(APP_ONLY & installed.keys())
    # The operator command runs, and a message goes through with kombu alone,
    # from outside the source tree (the installed copy, not ROOT).
    assert 'stats' in plain.run('kombu-sqlite', '--help', cwd=tmp_path).stdout
    script = (
        'import kombu_sqlite, kombu\n'
        f'url = "sqlite:///{tmp_path}/q.db"\n'
        'with kombu.Connection(url) as c:\n'
        '    q = c.SimpleQueue("hello")\n'
        '    q.put({"n": 1})\n'
        '    m = q.get(timeout=5); m.ack(); print(m.payload, kombu_sqlite.__file__)\n'
        '    q.close()\n')
    out = plain.run('python', '-c', script, cwd=tmp_path).stdout
    assert out.startswith("{'n': 1}") and str(plain.path) in out, out
    stats = plain.run('kombu-sqlite', 'stats', f'sqlite:///{tmp_path}/q.db', '--json',
                      cwd=tmp_path, check=False)
    assert stats.returncode == 0 and 'hello' in stats.stdout, stats.stdout + stats.stderr


def test_tasks_extra_resolves_the_newest_celery(with_tasks):
    installed = with_tasks.installed()
    newest = with_tasks.newest('celery')
    assert installed['celery'] == newest, (installed['celery'], newest)
    assert {'flower', 'sqlalchemy', 'httpx'} <= installed.keys()
    assert 'celery-batches' not in installed  # optional: it caps Celery below the newest


def test_celery_a_tasks_worker_runs_from_the_install(with_tasks, tmp_path):
    env = {'TASKS_DATA_DIR': str(tmp_path / 'data'), 'TASKS_CONFIG': '',
           'PYTHONPATH': ''}
    worker = subprocess.Popen(
        [str(with_tasks.bin / 'celery'), '-A', 'tasks', 'worker', '-c', '1', '-n',
         'pkg@%h', '-l', 'info'], cwd=tmp_path, env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        lines = []
        for line in worker.stdout:
            lines.append(line)
            if 'ready.' in line or time.monotonic() > deadline:
                break
        assert any('ready.' in line for line in lines), ''.join(lines)
        assert any(f'v{with_tasks.installed()["celery"]}' in line for line in lines)
        ping = with_tasks.run('celery', '-A', 'tasks', 'inspect', 'ping', '-t', '10',
                              cwd=tmp_path, env=env, timeout=60)
        assert 'pkg@' in ping.stdout and 'pong' in ping.stdout, ping.stdout
    finally:
        try:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
        except ProcessLookupError:
            pass
        worker.stdout.close()

