"""The public Broker API other code builds on, against real processes:
remove (cancel a waiting task), path and sweep (maintenance)."""
import os
import signal
import sys
import time

from kombu import Connection, Queue

import kombu_sqlite
from conftest import wait_for

HERE = os.path.dirname(__file__)


def test_remove_deletes_waiting_tasks_never_a_leased_one(celery_env):
    app = celery_env.configure()
    url = celery_env.env['TEST_BROKER_URL']
    celery_env.worker('-P', 'solo', '-c', '1')
    running = app.sleep_and_mark.delay('running', 6)
    wait_for(lambda: celery_env.marks_of('running'), 60, what='the first task to start')
    cancelled = app.mark.delay('cancelled')
    kept = app.mark.delay('kept')
    held = app.mark.apply_async(('held',), countdown=600)   # stored until due

    with kombu_sqlite.Broker(url, create=False) as broker:
        before = broker.stats()['celery']
        assert (before['ready'], before['delayed'], before['leased']) == (2, 1, 1)
        assert broker.remove('celery', cancelled.id) is True
        assert broker.remove('celery', held.id) is True          # a delayed one too
        assert broker.remove('celery', running.id) is False      # leased by the worker
        assert broker.remove('celery', cancelled.id) is False    # already gone
        assert broker.remove('celery', 'no-such-task') is False
        assert broker.remove('other-queue', kept.id) is False
        assert broker.position('celery', cancelled.id) is None
        assert broker.position('celery', kept.id) == 0
        after = broker.stats()['celery']
        assert (after['ready'], after['delayed'], after['leased']) == (1, 0, 1)
        assert after['counters']['removed'] == 2

    assert kept.get(timeout=60) is None                      # the queue flows on
    assert running.get(timeout=60) == 6
    assert [line.split()[0] for line in celery_env.marks_of('running')] == ['start', 'done']
    assert celery_env.marks_of('cancelled') == [] and celery_env.marks_of('held') == []


def test_path_and_sweep_give_back_the_lease_of_a_killed_consumer(db_url, procs, tmp_path):
    with Connection(db_url) as conn:
        conn.Producer().publish({'n': 1}, routing_key='work', declare=[Queue('work')])
    consumer = procs.start([sys.executable, os.path.join(HERE, 'kombu_client.py'), db_url,
                            'consume', 'work', 'work', 'direct', 'work', '--hold', '60',
                            '--never-ack', '--visibility-timeout', '1',
                            '--quiet-housekeeper'], name='consumer')
    wait_for(lambda: '"n": 1' in procs.log(consumer), 60, what='the message to be taken')
    procs.kill(consumer, signal.SIGKILL)
    with kombu_sqlite.Broker(db_url, create=False) as broker:
        assert broker.path == str(tmp_path / 'queue.db')
        assert broker.stats()['work']['leased'] == 1
        time.sleep(1.5)                                  # past the 1 s lease
        assert broker.sweep()['leases_expired'] == 1
        assert broker.stats()['work']['ready'] == 1
