"""Wall-clock steps do not rerun in-flight work nor delay redelivery.

The real clock of the test machine cannot be stepped safely, so a second
process sees a stepped wall clock through libfaketime (Debian's ``faketime``
package), preloaded with ``DONT_FAKE_MONOTONIC=1``: its ``time.time()`` is an
hour ahead or behind, while CLOCK_MONOTONIC stays the machine's own, exactly
as after a step of the system clock.  The other processes keep the true time,
so both sides of a step meet on one file.
"""
import json
import os
import signal
import sys
import time

import pytest
from kombu import Connection, Queue

from kombu_sqlite import Broker
from conftest import HERE, wait_for

LIBFAKETIME = '/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1'

pytestmark = pytest.mark.skipif(not os.path.exists(LIBFAKETIME),
                                reason='needs libfaketime (Debian package faketime)')


def client(procs, url, queue, *args, step=None):
    env = {}
    if step:
        env = {'LD_PRELOAD': LIBFAKETIME, 'FAKETIME': step, 'DONT_FAKE_MONOTONIC': '1'}
    return procs.start([sys.executable, os.path.join(HERE, 'fault_client.py'), url, queue,
                        *map(str, args)], env=env, name=f'client{step or ""}')


def events(procs, proc):
    return [json.loads(line) for line in procs.log(proc).splitlines() if line.startswith('{')]


def test_the_stepped_process_really_sees_another_wall_clock(procs, tmp_path):
    proc = procs.start([sys.executable, '-c', 'import time; print(time.time(), time.monotonic())'],
                       env={'LD_PRELOAD': LIBFAKETIME, 'FAKETIME': '+1h',
                            'DONT_FAKE_MONOTONIC': '1'})
    proc.wait(30)
    wall, monotonic = map(float, procs.log(proc).split())
    assert abs(wall - time.time() - 3600) < 30
    assert abs(monotonic - time.monotonic()) < 30


def test_a_clock_stepped_forward_does_not_run_an_in_flight_task_twice(db_url, procs):
    with Connection(db_url) as conn:
        conn.Producer().publish('long task', routing_key='q', declare=[Queue('q')])
    # Leases of 2 s, renewed while the task runs for 6 s.
    worker = client(procs, db_url, 'q', '--visibility-timeout', 2, '--hold', 6)
    wait_for(lambda: {'got': 'long task'} in events(procs, worker), 30, what='the delivery')
    ahead = client(procs, db_url, 'q', '--visibility-timeout', 2, step='+1h')
    wait_for(lambda: {'ready': True} in events(procs, ahead), 30, what='the stepped consumer')
    wait_for(lambda: {'settled': 'long task'} in events(procs, worker), 30,
             what='the task to finish')
    assert all('got' not in e for e in events(procs, ahead)), events(procs, ahead)


def test_a_clock_stepped_back_does_not_delay_redelivery(db_url, procs):
    with Connection(db_url) as conn:
        conn.Producer().publish('orphan', routing_key='q', declare=[Queue('q')])
    doomed = client(procs, db_url, 'q', '--visibility-timeout', 2, '--settle', 'none',
                    '--hold', 3600)
    wait_for(lambda: {'got': 'orphan'} in events(procs, doomed), 30, what='the delivery')
    procs.kill(doomed)                              # its lease is never renewed again
    behind = client(procs, db_url, 'q', '--visibility-timeout', 2, step='-1h')
    # visibility_timeout + one sweep, with room for a loaded machine.
    wait_for(lambda: {'got': 'orphan'} in events(procs, behind), 15,
             what='the message to be delivered again')


def test_a_clock_stepped_forward_does_not_expire_a_queue_early(db_url, procs):
    with Connection(db_url) as conn:
        conn.Producer().publish('kept', routing_key='keep',
                                declare=[Queue('keep', expires=600)])
    ahead = client(procs, db_url, 'other', step='+1h')
    wait_for(lambda: {'ready': True} in events(procs, ahead), 30, what='the stepped consumer')
    time.sleep(3)                                    # several of its sweeps
    assert ahead.poll() is None
    os.killpg(ahead.pid, signal.SIGTERM)
    with Broker(db_url) as broker:
        assert 'keep' in broker.queues() and broker.stats()['keep']['ready'] == 1
