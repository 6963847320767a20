"""Flower's Broker page and /api/queues/length on a sqlite:// broker.

A real worker holds one message (leased), others wait (ready), two were rejected
(dead-lettered); a real Flower serves the counts; headless Chromium renders the
Broker page as a person would see it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from html.parser import HTMLParser

import httpx
import pytest

from conftest import free_port, wait_for

# The app under test: only the registering import, or only broker_transport.
APP = textwrap.dedent('''
    import os, time
    from celery import Celery
    from celery.exceptions import Reject
    from kombu import Queue

    if os.environ['ACTIVATION'] == 'import':
        import kombu_sqlite  # noqa: F401  registers sqlite://
    app = Celery('flowerapp', broker=os.environ['BROKER_URL'])
    if os.environ['ACTIVATION'] == 'broker_transport':
        app.conf.broker_transport = 'kombu_sqlite.transport:Transport'
    app.conf.update(task_queues=[Queue('celery'), Queue('work')], task_acks_late=True,
                    worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True)

    @app.task
    def hold(release):
        deadline = time.monotonic() + 120
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.1)

    @app.task
    def refuse():
        raise Reject('refused', requeue=False)
''')

CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu',
                  '--disable-background-networking', '--disable-component-update',
                  '--disable-sync', '--no-first-run']


def chromium_path():
    return os.environ.get('CHROMIUM') or shutil.which('chromium')


class QueueTable(HTMLParser):
    """Rows of Flower's ``#queue-table``: lists of cell texts."""

    def __init__(self):
        super().__init__()
        self.rows, self._in_table, self._cell = [], False, None

    def handle_starttag(self, tag, attrs):
        if tag == 'table' and ('id', 'queue-table') in attrs:
            self._in_table = True
        elif self._in_table and tag == 'tr':
            self.rows.append([])
        elif self._in_table and tag == 'td':
            self._cell = ''

    def handle_endtag(self, tag):
        if tag == 'table':
            self._in_table = False
        elif tag == 'td' and self._cell is not None:
            self.rows[-1].append(' '.join(self._cell.split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


class FlowerStack:
    def __init__(self, tmp_path, procs, activation):
        self.tmp, self.procs = tmp_path, procs
        (tmp_path / 'flowerapp.py').write_text(APP)
        self.broker_url = f'sqlite:///{tmp_path}/broker.db'
        self.env = {'ACTIVATION': activation, 'BROKER_URL': self.broker_url,
                    'FLOWER_UNAUTHENTICATED_API': 'true',
                    'PYTHONPATH': os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')])}
        self.release = tmp_path / 'release'

    def celery(self, *args, name, python_args=('-m', 'celery')):
        return self.procs.start([sys.executable, *python_args, '-A', 'flowerapp', *args],
                                env=self.env, name=name, cwd=str(self.tmp))

    def send(self, task, *args, queue):
        code = (f'from flowerapp import {task}; '
                f'{task}.apply_async(args={list(args)!r}, queue={queue!r})')
        subprocess.run([sys.executable, '-c', code], env={**os.environ, **self.env},
                       cwd=self.tmp, check=True, timeout=60)

    def stats(self):
        import kombu_sqlite
        with kombu_sqlite.Broker(self.broker_url) as broker:
            return broker.stats()

    def flower(self, *python_args):
        self.port = free_port()
        self.base = f'http://127.0.0.1:{self.port}'
        proc = self.celery('flower', f'--port={self.port}', '--address=127.0.0.1',
                           name='flower', python_args=python_args or ('-m', 'celery'))

        def up():
            assert proc.poll() is None, self.procs.log(proc)
            try:
                return httpx.get(f'{self.base}/healthcheck', timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(up, 60, what='flower')
        return proc


@pytest.fixture
def stack(tmp_path, procs):
    def make(activation):
        return FlowerStack(tmp_path, procs, activation)
    return make


def fill_queues(stack):
    """celery: 2 dead-lettered; work: 1 leased by the worker, 3 ready."""
    worker = stack.celery('worker', '-Q', 'celery,work', '-c', '1', '-l', 'info',
                          '-n', 'flowerbox@%h', name='worker')
    wait_for(lambda: 'ready.' in stack.procs.log(worker) or worker.poll() is not None,
             60, what='worker')
    assert worker.poll() is None, stack.procs.log(worker)
    for _ in range(2):
        stack.send('refuse', queue='celery')
    wait_for(lambda: stack.stats().get('celery', {}).get('dead') == 2, 60,
             what='two dead letters')
    stack.send('hold', str(stack.release), queue='work')
    wait_for(lambda: stack.stats().get('work', {}).get('leased') == 1, 60,
             what='the worker to hold a message')
    for _ in range(3):
        stack.send('hold', str(stack.release), queue='work')
    wait_for(lambda: stack.stats()['work']['ready'] == 3, 30, what='3 ready')
    return worker


@pytest.mark.parametrize('activation', ['import', 'broker_transport'])
def test_flower_broker_page_and_api_show_sqlite_queues(stack, activation, tmp_path):
    stack = stack(activation)
    try:
        fill_queues(stack)
        flower = stack.flower()

        r = httpx.get(f'{stack.base}/api/queues/length', timeout=10)
        assert r.status_code == 200, r.text
        queues = {q['name']: q for q in r.json()['active_queues']}
        assert queues['work'] == {
            'name': 'work', 'messages': 4, 'messages_ready': 3,
            'messages_unacknowledged': 1, 'messages_delayed': 0,
            'messages_dead_lettered': 0}, queues
        assert queues['celery']['messages'] == 0
        assert queues['celery']['messages_dead_lettered'] == 2

        browser = chromium_path()
        if not browser:
            pytest.skip('chromium is not installed (.ci/run installs it): '
                        'the Broker page was checked through the API only')
        profile = tmp_path / 'chromium-profile'
        cmd = [browser, *CHROMIUM_FLAGS, f'--user-data-dir={profile}',
               '--window-size=1400,700']
        dom = subprocess.run([*cmd, '--dump-dom', f'{stack.base}/broker'],
                             capture_output=True, text=True, timeout=90)
        table = QueueTable()
        table.feed(dom.stdout)
        rows = {row[0]: row[1:4] for row in table.rows if row}
        # Columns: Messages, Unacked, Ready.
        assert rows.get('work') == ['4', '1', '3'], (rows, dom.stderr[-2000:])
        assert rows.get('celery') == ['0', '0', '0'], rows
        assert rows.get('celery (dead-lettered)', [None])[0] == '2', rows
        shot = tmp_path / f'flower-broker-{activation}.png'
        subprocess.run([*cmd, f'--screenshot={shot}', f'{stack.base}/broker'],
                       capture_output=True, timeout=90)
        assert shot.exists() and shot.stat().st_size > 10_000, 'no screenshot'
        artifacts = os.environ.get('KOMBU_SQLITE_ARTIFACTS')
        if artifacts:
            shutil.copy(shot, artifacts)
        assert flower.poll() is None
    finally:
        stack.release.touch()


def test_flower_with_other_internals_warns_and_still_works(stack):
    """A Flower whose views no longer call flower.utils.broker.Broker directly:
    the integration steps aside with a warning; Flower's own answers stand."""
    stack = stack('import')
    try:
        fill_queues(stack)
        changed = ('import flower.views, flower.utils.broker as b; '
                   'flower.views.Broker = lambda *a, **k: b.Broker(*a, **k); '
                   'import runpy; runpy.run_module("celery", run_name="__main__")')
        flower = stack.flower('-c', changed)
        log = stack.procs.log(flower)
        assert 'differs from the one the sqlite Broker page was written for' in log, log
        assert httpx.get(f'{stack.base}/api/queues/length').status_code == 404
        workers = httpx.get(f'{stack.base}/api/workers?refresh=1', timeout=20)
        assert workers.status_code == 200 and any(
            name.startswith('flowerbox@') for name in workers.json()), workers.text
    finally:
        stack.release.touch()
