"""Consuming from kombu's event loop (the hub Celery's worker runs).

First kombu alone: a consumer registered with a real ``Hub`` gets messages
that another process publishes through the readable descriptor (the safety
timer is set to 30 s, so nothing else could bring them), the next message as
soon as an ack frees the prefetch budget, and a long backlog without stalls;
its hub sleeps while idle.

Then real workers on ``tests/eventloop_app.py`` with Celery's default settings
(prefetch multiplier 4, early acks, ``worker_pool_putlocks`` on), on
sqlite:// (inotify and polling wake-ups) and, for comparison, a real
redis-server.  Three 4 s tasks keep a one-process worker busy for 12 s while
the test pings it, inspects it and revokes tasks, each with a 1 s timeout.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from kombu import Connection, Consumer, Exchange, Queue
from kombu.asynchronous import Hub

import kombu_sqlite  # noqa: F401  registers sqlite://
from conftest import HERE, wait_for
from tasks_fixtures import start_redis

# Nothing but the hub's descriptors may deliver in the kombu-level tests.
SLOW_TIMERS = {'polling_interval': 30, 'housekeeping_interval': 30}


WORK = Queue('work', Exchange('work', 'direct'), 'work')


class HubConsumer:
    """A kombu consumer in this process, driven by a real Hub."""

    def __init__(self, url, prefetch_count=None, ack=True, **options):
        self.conn = Connection(url, transport_options={**SLOW_TIMERS, **options})
        self.queue = WORK
        self.got = []
        self.ack = ack
        self.conn.connect()
        self.consumer = Consumer(self.conn, [self.queue], callbacks=[self.on_message],
                                 prefetch_count=prefetch_count)
        self.consumer.consume()
        self.hub = Hub()
        self.conn.register_with_event_loop(self.hub)

    def on_message(self, body, message):
        self.got.append((body, message))
        if self.ack:
            message.ack()

    def run_until(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f'timed out after {timeout}s waiting for {what}'
            self.hub.run_once()

    def run_for(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.hub.run_once()

    def close(self):
        self.hub.close()
        self.conn.release()


@pytest.fixture
def hub_consumer(db_url):
    made = []

    def make(**kwargs):
        made.append(HubConsumer(db_url, **kwargs))
        return made[-1]
    yield make
    for consumer in made:
        consumer.close()


def publish_from_another_process(url, *bodies):
    code = ('import sys, kombu_sqlite\n'
            'from kombu import Connection\n'
            'with Connection(sys.argv[1]) as conn:\n'
            '    producer = conn.Producer()\n'
            '    for body in sys.argv[2:]:\n'
            '        producer.publish(body, exchange="work", routing_key="work")\n')
    subprocess.run([sys.executable, '-c', code, url, *bodies], check=True, timeout=60)


def bodies(consumer):
    return [body for body, _ in consumer.got]


def test_hub_delivers_on_another_process_commit_and_sleeps_while_idle(db_url, hub_consumer):
    consumer = hub_consumer()
    cpu = time.process_time()
    consumer.run_for(2)
    idle_cpu = time.process_time() - cpu
    assert idle_cpu < 0.3, f'an idle hub used {idle_cpu:.2f} s of CPU in 2 s'
    publish_from_another_process(db_url, 'one', 'two')
    consumer.run_until(lambda: len(consumer.got) == 2, 10, 'the two messages')
    assert bodies(consumer) == ['one', 'two']


def test_hub_claims_again_when_an_ack_frees_the_prefetch_budget(db_url, hub_consumer):
    consumer = hub_consumer(prefetch_count=1, ack=False)
    publish_from_another_process(db_url, 'a', 'b', 'c')
    consumer.run_until(lambda: consumer.got, 10, 'the first message')
    consumer.run_for(0.5)
    assert bodies(consumer) == ['a'], 'delivered past the prefetch budget'
    consumer.got[0][1].ack()  # writes nothing yet: no descriptor becomes readable
    consumer.run_until(lambda: len(consumer.got) == 2, 10, 'the next message after the ack')
    assert bodies(consumer) == ['a', 'b']


def test_hub_drains_a_backlog_longer_than_one_callback(db_url, hub_consumer):
    # One message per claim and no polling timer: only the hub's own wake-up
    # brings the batches after the first callback's rounds.
    with Connection(db_url) as conn:
        WORK(conn.default_channel).declare()
    publish_from_another_process(db_url, *[str(i) for i in range(40)])
    consumer = hub_consumer(max_claim=1, wakeup='poll', poll_interval=30)
    consumer.run_until(lambda: len(consumer.got) == 40, 10, 'the backlog')
    assert bodies(consumer) == [str(i) for i in range(40)]

TASK_SECONDS = 4


class Worker:
    """One `celery worker` on eventloop_app and a client app talking to it."""

    def __init__(self, procs, tmp_path, monkeypatch, broker, pool):
        self.procs = procs
        self.marks = tmp_path / 'marks'
        self.marks.mkdir()
        broker_url, transport_options = broker
        self.env = {'TEST_BROKER_URL': broker_url, 'TEST_MARK_DIR': str(self.marks),
                    'TEST_TRANSPORT_OPTIONS': json.dumps(transport_options),
                    'PYTHONPATH': HERE + os.pathsep + os.environ.get('PYTHONPATH', '')}
        self.pool = pool
        self.node = f'busy-{pool}@{socket.gethostname()}'
        for key in ('TEST_BROKER_URL', 'TEST_MARK_DIR', 'TEST_TRANSPORT_OPTIONS'):
            monkeypatch.setenv(key, self.env[key])  # read by the app imported here
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


@pytest.fixture(params=['sqlite', 'sqlite-poll', 'redis'])
def broker(request, procs, tmp_path):
    """A broker URL and transport options: inotify wake-ups, polling, Redis."""
    if request.param == 'redis':
        return start_redis(procs), {}
    options = {'wakeup': 'poll'} if request.param == 'sqlite-poll' else {}
    return f'sqlite:///{tmp_path}/broker.db', options


@pytest.fixture
def worker_on(procs, tmp_path, monkeypatch):
    workers = []

    def make(broker, pool):
        worker = Worker(procs, tmp_path, monkeypatch, broker, pool)
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
    # The child marks 'start' a moment before the worker hears it accepted the task.
    wait_for(lambda: worker.active() == [running.id], 5, what='the worker to report job0 active')
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


def test_hub_waits_for_half_the_budget_and_still_serves_an_unlimited_channel(
        db_url, hub_consumer):
    # A Celery worker's task channel has a prefetch limit, its remote control
    # channel none.  While the task channel waits for acks the hub stops
    # watching commits; the control channel must still get its messages.
    control = Queue('control', Exchange('control', 'direct'), 'control')
    with Connection(db_url) as conn:
        WORK(conn.default_channel).declare()
        control(conn.default_channel).declare()
    publish_from_another_process(db_url, *[str(i) for i in range(6)])
    consumer = hub_consumer(prefetch_count=4, ack=False)
    commands = []
    Consumer(consumer.conn.channel(), [control], no_ack=True,
             callbacks=[lambda body, message: commands.append(body)]).consume()
    consumer.run_until(lambda: len(consumer.got) == 4, 10, 'the first four messages')
    consumer.run_for(0.3)
    assert bodies(consumer) == ['0', '1', '2', '3'], 'delivered past the prefetch budget'

    code = ('import sys, kombu_sqlite\n'
            'from kombu import Connection\n'
            'with Connection(sys.argv[1]) as conn:\n'
            '    conn.Producer().publish("ping", exchange="control", routing_key="control")\n')
    subprocess.run([sys.executable, '-c', code, db_url], check=True, timeout=60)
    sent = time.monotonic()
    consumer.run_until(lambda: commands, 10, 'the control message')
    assert time.monotonic() - sent < 0.5, 'the unlimited channel waited for the busy one'

    consumer.got[0][1].ack()  # one of four free: not yet worth a claim
    consumer.run_for(0.3)
    assert len(consumer.got) == 4
    consumer.got[1][1].ack()  # half the budget free: one claim brings both
    consumer.run_until(lambda: len(consumer.got) == 6, 10, 'the last two messages')
    assert bodies(consumer) == [str(i) for i in range(6)]
