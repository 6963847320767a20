"""A busy worker keeps answering remote control, with Celery's default settings.

Real workers on ``tests/eventloop_app.py`` (prefetch multiplier 4, early acks,
``worker_pool_putlocks`` on), on sqlite:// and, for comparison, on a real
redis-server.  Three 4 s tasks keep a one-process worker busy for 12 s while
the test pings it, inspects it and revokes tasks, each with a 1 s timeout.
"""
import json
import os
import socket
import sys
import time

import pytest

from conftest import HERE, wait_for
from tasks_fixtures import start_redis

TASK_SECONDS = 4


class Worker:
    """One `celery worker` on eventloop_app and a client app talking to it."""

    def __init__(self, procs, tmp_path, broker, pool):
        self.procs = procs
        self.marks = tmp_path / 'marks'
        self.marks.mkdir()
        broker_url, transport_options = broker
        self.env = {'TEST_BROKER_URL': broker_url, 'TEST_MARK_DIR': str(self.marks),
                    'TEST_TRANSPORT_OPTIONS': json.dumps(transport_options),
                    'PYTHONPATH': HERE + os.pathsep + os.environ.get('PYTHONPATH', '')}
        self.pool = pool
        self.node = f'busy-{pool}@{socket.gethostname()}'
        os.environ.update(self.env)
        sys.modules.pop('eventloop_app', None)  # a fresh app on this broker
        import eventloop_app
        self.app = eventloop_app.app
        self.tasks = eventloop_app

    def start(self):
        self.proc = self.procs.start(
            [sys.executable, '-m', 'celery', '-A', 'eventloop_app', 'worker', '-l', 'info',
             '-P', self.pool, '-c', '1', '-n', self.node], env=self.env, name='worker')
        wait_for(lambda: 'ready.' in self.procs.log(self.proc) or self.proc.poll() is not None,
                 60, what='the worker to be ready')
        assert self.proc.poll() is None, self.procs.log(self.proc)
        # Answers while idle: what follows measures the busy worker only.
        wait_for(self.ping, 30, what='the idle worker to answer a ping')

    def ping(self):
        return bool(self.app.control.ping(destination=[self.node], timeout=1))

    def active(self):
        """Ids of the tasks the worker says it runs (1 s timeout), or None."""
        reply = self.app.control.inspect([self.node], timeout=1).active()
        return reply and [task['id'] for task in reply[self.node]]

    def revoke(self, task_id, **kwargs):
        """True if the worker acknowledged the revoke within 1 s."""
        return bool(self.app.control.revoke(task_id, destination=[self.node], reply=True,
                                            timeout=1, **kwargs))

    def marks_of(self, name):
        path = self.marks / name
        return [line.split()[0] for line in path.read_text().splitlines()] \
            if path.exists() else []

    def close(self):
        self.app.close()
        for key in self.env:
            os.environ.pop(key, None)


@pytest.fixture(params=['sqlite', 'sqlite-poll', 'redis'])
def broker(request, procs, tmp_path):
    """A broker URL and transport options: inotify wake-ups, polling, Redis."""
    if request.param == 'redis':
        return start_redis(procs), {}
    options = {'wakeup': 'poll'} if request.param == 'sqlite-poll' else {}
    return f'sqlite:///{tmp_path}/broker.db', options


@pytest.fixture
def worker_on(procs, tmp_path):
    workers = []

    def make(broker, pool):
        worker = Worker(procs, tmp_path, broker, pool)
        workers.append(worker)
        worker.start()
        return worker
    yield make
    for worker in workers:
        worker.close()


def keep_busy(worker):
    """Queue three long tasks and wait until the first one runs."""
    results = [worker.tasks.sleep_and_mark.delay(f'job{i}', TASK_SECONDS) for i in range(3)]
    wait_for(lambda: worker.marks_of('job0'), 30, what='the first task to start')
    return results


@pytest.mark.parametrize('pool', ['prefork', 'threads'])
def test_busy_worker_answers_pings(broker, worker_on, pool):
    worker = worker_on(broker, pool)
    keep_busy(worker)
    answered = sum(worker.ping() for _ in range(6))
    # Six 1 s pings take about 6 s: the worker is busy for 12 s.
    assert 'done' not in worker.marks_of('job2'), 'the tasks ended before the pings did'
    assert answered == 6, f'{answered} of 6 pings answered while the pool was busy'


def test_busy_prefork_worker_applies_revokes(broker, worker_on):
    worker = worker_on(broker, 'prefork')
    running, next_up, queued = keep_busy(worker)
    assert worker.active() == [running.id]
    assert worker.revoke(queued.id), 'the revoke of a queued task went unanswered'
    assert worker.revoke(running.id, terminate=True), \
        'the revoke of the running task went unanswered'
    wait_for(lambda: 'done' in worker.marks_of('job1'), 30, what='the next task to finish')
    assert worker.marks_of('job0') == ['start'], 'the running task was not terminated'
    time.sleep(2)  # the queued task would start at once if the revoke were lost
    assert worker.marks_of('job2') == []


def test_solo_worker_runs_tasks_and_answers_between_them(broker, worker_on):
    # A solo worker runs tasks in its consumer loop, on every broker: it answers
    # when a task ends.
    worker = worker_on(broker, 'solo')
    keep_busy(worker)
    wait_for(lambda: 'done' in worker.marks_of('job2'), 30, what='the three tasks')
    assert worker.ping()
