"""Faults the transport survives, each reproduced with real processes first.

Poison messages, a full disk, consumers stopped past their lease, callbacks
that raise mid-batch, a writer stopped while holding the lock, unusable URLs
and kombu's failover.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from kombu import Connection, Consumer, Queue

import kombu_sqlite
from kombu_sqlite import Broker, schema
from kombu_sqlite.errors import DatabaseFull, DatabaseLocked, DatabaseUnavailable
from conftest import HERE, wait_for

POISON_HEADERS = {'x-bad': {'__type__': 'nope', '__value__': 1}}


def client(procs, url, queue, *args):
    return procs.start([sys.executable, os.path.join(HERE, 'fault_client.py'), url, queue,
                        *map(str, args)], name='client')


def events(procs, proc):
    return [json.loads(line) for line in procs.log(proc).splitlines() if line.startswith('{')]


def consume(conn, count, timeout=20):
    """Bodies of up to ``count`` messages of queue q, acked, in delivery order."""
    got = []

    def on_message(body, message):
        got.append(body)
        message.ack()

    with Consumer(conn, [Queue('q')], callbacks=[on_message], prefetch_count=10):
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=1)
            except socket.timeout:
                pass
    return got


def stats(url, queue):
    with Broker(url) as broker:
        return broker.stats().get(queue)


# -- 1. poison message ------------------------------------------------------------------

def test_undecodable_message_is_dead_lettered_alone_and_its_batch_is_delivered(db_url):
    with Connection(db_url) as conn:
        producer = conn.Producer()
        for i in range(10):
            producer.publish({'i': i}, routing_key='q', declare=[Queue('q')],
                             headers=POISON_HEADERS if i == 3 else {})
        got = [body['i'] for body in consume(conn, 9)]
    assert got == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    with Broker(db_url) as broker:
        (dead,) = broker.dead_letters('q')
        assert 'undecodable' in dead['reason'] and 'Unsupported type' in dead['reason']
        q = broker.stats()['q']
        assert q['ready'] == q['leased'] == 0 and q['dead'] == 1


@pytest.mark.parametrize('stored', [
    '{"properties": "not a mapping", "body": ""}', '[1, 2, 3]', 'not json at all',
    '{"properties": {"delivery_info": 7}, "headers": {}, "body": ""}',
    '{"properties": {"delivery_info": {}, "body_encoding": "base64"}, "headers": {}, '
    '"body": "%%% not base64"}',
])
def test_stored_messages_of_the_wrong_shape_are_dead_lettered_alone(db_url, stored):
    with Connection(db_url) as conn:
        for i in range(3):
            conn.Producer().publish(i, routing_key='q', declare=[Queue('q')])
        # What a bad writer, a bug or a hand edit could leave in the file.
        conn.transport.store.conn.execute(
            'UPDATE kombu_message SET payload = ? WHERE id = (SELECT min(id) + 1 '
            'FROM kombu_message)', (stored,))
        assert consume(conn, 2, timeout=10) == [0, 2]
    with Broker(db_url) as broker:
        (dead,) = broker.dead_letters('q')
        assert dead['reason'].startswith('undecodable')


@pytest.mark.parametrize('pool', ['prefork', 'threads', 'solo'])
def test_poison_message_does_not_stop_a_celery_worker(celery_env, pool):
    app = celery_env.configure()
    before = [app.add.delay(i, 1) for i in range(3)]
    app.add.apply_async((100, 1), headers=POISON_HEADERS)
    after = [app.add.delay(i, 2) for i in range(3)]
    worker = celery_env.worker('-P', pool, '-c', '2')
    assert [r.get(timeout=60) for r in before + after] == [1, 2, 3, 2, 3, 4]
    time.sleep(1)
    assert worker.poll() is None, celery_env.procs.log(worker)
    assert 'Unrecoverable error' not in celery_env.procs.log(worker)
    with Broker(celery_env.env['TEST_BROKER_URL']) as broker:
        (dead,) = broker.dead_letters('celery')
        assert dead['task'] == 'celery_app.add' and 'undecodable' in dead['reason']
    # It still takes new work.
    assert app.add.delay(20, 22).get(timeout=60) == 42


# -- 3. lease ownership on every settle --------------------------------------------------

@pytest.mark.parametrize('settle', ['reject', 'ack', 'requeue'])
def test_settle_after_the_lease_was_lost_changes_nothing(db_url, procs, settle):
    with Connection(db_url) as conn:
        conn.Producer().publish('job', routing_key='q', declare=[Queue('q')])
    slow = client(procs, db_url, 'q', '--visibility-timeout', 2, '--hold', 3,
                  '--settle', settle, '--linger', 5)
    wait_for(lambda: {'got': 'job'} in events(procs, slow), 30, what='the first delivery')
    os.killpg(slow.pid, signal.SIGSTOP)          # stopped past its lease
    try:
        with Connection(db_url, transport_options={'housekeeping_interval': 0.2}) as conn:
            holder = conn.channel()
            message = wait_for(lambda: holder.basic_get('q'), 20, interval=0.2,
                               what='the message to be delivered again')
            assert message.delivery_info['redelivered']
            os.killpg(slow.pid, signal.SIGCONT)
            wait_for(lambda: {'settled': 'job'} in events(procs, slow), 30,
                     what='the late settle')
            time.sleep(0.5)                      # let held acks land, if any
            q = stats(db_url, 'q')
            # The second consumer still holds it: not deleted, not dead, not ready.
            assert (q['leased'], q['dead'], q['ready']) == (1, 0, 0), q
            message.ack()
    finally:
        os.killpg(slow.pid, signal.SIGCONT)
    wait_for(lambda: 'late ' + settle in procs.log(slow), 10, what='the warning')
    procs.stop(slow)
    q = stats(db_url, 'q')
    assert (q['leased'], q['ready'], q['dead']) == (0, 0, 0)
    assert q['counters']['late_settles'] == 1


# -- 4. batch release --------------------------------------------------------------------

def test_messages_claimed_but_not_handed_over_are_released_at_once(db_url, procs):
    with Connection(db_url) as conn:
        producer = conn.Producer()
        for i in range(10):
            producer.publish(i, routing_key='q', declare=[Queue('q')])
    proc = client(procs, db_url, 'q', '--prefetch', 10, '--count', 10, '--raise-at', 3,
                  '--linger', 60)
    wait_for(lambda: any('raised' in e for e in events(procs, proc)), 30,
             what='the callback to raise')
    # Still connected: 2 acked, message 3 unacked with the application, 7 ready again.
    wait_for(lambda: (stats(db_url, 'q')['ready'], stats(db_url, 'q')['leased']) == (7, 1), 5,
             what='the 7 undelivered messages to be released')
    procs.kill(proc)         # killed: message 2 waits out its lease, the rest do not
    with Connection(db_url) as conn:
        channel = conn.default_channel
        rest = []
        while (message := channel.basic_get('q')) is not None:
            rest.append(message.payload)
            message.ack()
    assert rest == list(range(3, 10))


# -- 7. a stopped writer ------------------------------------------------------------------

def test_a_writer_stopped_holding_the_lock_gives_a_clear_error_within_one_busy_timeout(
        db_url, procs):
    path = schema.path_from_url(db_url)
    with Connection(db_url) as conn:
        conn.Producer().publish('kept', routing_key='q', declare=[Queue('q')])
    writer = procs.start([sys.executable, '-c', textwrap.dedent(f'''
        import sqlite3, time
        db = sqlite3.connect({path!r}, isolation_level=None)
        db.execute('BEGIN IMMEDIATE')
        print('locked', flush=True)
        time.sleep(3600)
        ''')], name='writer')
    wait_for(lambda: 'locked' in procs.log(writer), 10, what='the lock')
    os.killpg(writer.pid, signal.SIGSTOP)
    try:
        with Connection(db_url, transport_options={'busy_timeout': 1}) as conn:
            started = time.monotonic()
            with pytest.raises(DatabaseLocked) as info:
                conn.Producer().publish('blocked', routing_key='q')
            took = time.monotonic() - started
            assert took < 4, took                 # about one busy_timeout, not 8
            assert path in str(info.value) and 'fuser' in str(info.value)
            assert isinstance(info.value, conn.connection_errors)
    finally:
        procs.kill(writer)
    with Connection(db_url) as conn:              # the lock holder gone: nothing lost
        assert conn.default_channel.basic_get('q').payload == 'kept'


# -- errors an operator can act on; failover ----------------------------------------------

def test_unusable_urls_are_connection_errors_and_failover_reaches_the_next(tmp_path):
    good = tmp_path / 'good.db'
    for bad in (f'sqlite:///{tmp_path}', f'sqlite:///{tmp_path}/'):
        conn = Connection(bad)
        with pytest.raises(conn.connection_errors) as info:
            conn.connect()
        assert str(tmp_path) in str(info.value)
    with Connection(f'sqlite:///{tmp_path};sqlite:///{good}') as conn:
        conn.ensure_connection(max_retries=3, interval_start=0, interval_step=0)
        conn.Producer().publish('through failover', routing_key='q', declare=[Queue('q')])
    with Connection(f'sqlite:///{good}') as conn:
        assert conn.default_channel.basic_get('q').payload == 'through failover'


def test_corrupt_file_is_fatal_with_what_to_do(tmp_path):
    path = tmp_path / 'queue.db'
    with Connection(f'sqlite:///{path}') as conn:
        for i in range(200):
            conn.Producer().publish('x' * 500, routing_key='q', declare=[Queue('q')])
        conn.transport.store.conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    data = bytearray(path.read_bytes())
    data[4096 * 2:4096 * 6] = os.urandom(4096 * 4)  # tables' pages, not the header
    path.write_bytes(bytes(data))
    with Connection(f'sqlite:///{path}') as conn:
        with pytest.raises(kombu_sqlite.DatabaseError) as info:
            conn.connect()
            for _ in range(200):
                conn.default_channel.basic_get('q')
        assert not isinstance(info.value, DatabaseUnavailable)
        assert str(path) in str(info.value) and ('backup' in str(info.value)
                                                 or 'not a usable' in str(info.value))


# -- batch_acks ---------------------------------------------------------------------------

@pytest.mark.parametrize('batch_acks', [True, False])
def test_batch_acks_off_writes_each_ack_at_once(db_url, batch_acks):
    with Connection(db_url) as other, Connection(
            db_url, transport_options={'batch_acks': batch_acks,
                                       'housekeeping_interval': 30}) as conn:
        conn.Producer().publish('m', routing_key='q', declare=[Queue('q')])
        rows = []

        def on_message(body, message):
            message.ack()
            rows.append(other.transport.store.conn.execute(
                'SELECT count(*) FROM kombu_message').fetchone()[0])

        with Consumer(conn, [Queue('q')], callbacks=[on_message]):
            conn.drain_events(timeout=10)
        # Off: the row is gone when ack() returns; on: it goes with the next claim.
        assert rows == [1 if batch_acks else 0]


# -- 2. disk full -------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs, unmounted after the test."""
    mount = tmp_path / 'fs'
    mount.mkdir()
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16m,mode=0700', 'tmpfs',
                             str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip()}')
    try:
        yield mount
    finally:
        subprocess.run(['umount', '-l', str(mount)], capture_output=True)


def fill(directory):
    """Write a file until the filesystem is full; returns its path."""
    filler = directory / 'filler'
    chunk = b'\0' * 4096
    with open(filler, 'wb', buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_full_disk_keeps_the_celery_worker_up_and_it_recovers_by_itself(
        celery_env, small_fs):
    url = f'sqlite:///{small_fs}/broker.db'
    app = celery_env.configure(TEST_BROKER_URL=url, TEST_VISIBILITY_TIMEOUT=4,
                               TEST_ACKS_LATE='1')
    worker = celery_env.worker('-P', 'threads', '-c', '2')
    first = [app.sleep_and_mark.delay('before', 2) for _ in range(2)]
    wait_for(lambda: len(celery_env.marks_of('before')) >= 2, 30, what='tasks to start')
    filler = fill(small_fs)
    try:
        # Producers get a clear error, classified as a connection error.
        with Connection(url) as conn:
            with pytest.raises(DatabaseFull, match='full') as info:
                for _ in range(50):
                    conn.Producer().publish('x' * 200_000, routing_key='celery')
            assert isinstance(info.value, conn.connection_errors)
        assert [r.get(timeout=30) for r in first] == [2, 2]   # their acks cannot be written
        time.sleep(6)                                          # longer than the lease
        assert worker.poll() is None, celery_env.procs.log(worker)
    finally:
        filler.unlink()
    after = [app.add.delay(i, i) for i in range(3)]             # space is back
    assert [r.get(timeout=60) for r in after] == [0, 2, 4]
    time.sleep(6)          # a lost ack would show as a second run by now
    log = celery_env.procs.log(worker)
    assert worker.poll() is None and 'Unrecoverable error' not in log, log
    assert [m.split()[0] for m in celery_env.marks_of('before')].count('start') == 2
    q = stats(url, 'celery')
    assert (q['ready'], q['leased']) == (0, 0), q


def test_acks_written_one_by_one_wait_out_a_full_disk(small_fs):
    url = f'sqlite:///{small_fs}/broker.db'
    with Connection(url, transport_options={'housekeeping_interval': 0.2,
                                            'batch_acks': False}) as conn:
        for i in range(5):
            conn.Producer().publish(i, routing_key='q', declare=[Queue('q')])
        channel = conn.channel()
        messages = [channel.basic_get('q') for _ in range(5)]
        filler = fill(small_fs)
        try:
            for message in messages:
                message.ack()                  # no error: kept until it can be written
            time.sleep(1)
            for read_only in (True, False):                  # opening and reading work
                with Broker(url, read_only=read_only) as broker:
                    assert broker.stats()['q']['leased'] == 5
        finally:
            filler.unlink()
        wait_for(lambda: stats(url, 'q')['leased'] == 0, 10, what='the held acks to land')
        assert stats(url, 'q')['ready'] == 0


def test_reject_and_requeue_wait_out_a_full_disk(small_fs):
    url = f'sqlite:///{small_fs}/broker.db'
    with Connection(url, transport_options={'housekeeping_interval': 0.2}) as conn:
        for body in ('to reject', 'to requeue'):
            conn.Producer().publish(body, routing_key='q', declare=[Queue('q')])
        channel = conn.channel()
        rejected, requeued = channel.basic_get('q'), channel.basic_get('q')
        filler = fill(small_fs)
        try:
            rejected.reject(requeue=False)     # no error: done when space returns
            requeued.requeue()
            time.sleep(1)
            with Broker(url, read_only=True) as broker:
                assert broker.stats()['q']['leased'] == 2
        finally:
            filler.unlink()
        wait_for(lambda: (stats(url, 'q')['dead'], stats(url, 'q')['ready']) == (1, 1), 10,
                 what='the held reject and requeue to land')
        assert conn.channel().basic_get('q').payload == 'to requeue'
