"""kombu-level behaviour of the sqlite transport, with real processes where it matters."""
import json
import os
import random
import socket
import sqlite3
import stat
import subprocess
import sys
import time

import pytest
from kombu import Connection, Consumer, Exchange, Queue

import kombu_sqlite
from conftest import HERE, wait_for


def publish(conn, body, queue='q', **kwargs):
    conn.Producer().publish(body, routing_key=queue, declare=[Queue(queue)], **kwargs)


def drain(conn, queue='q', limit=1000):
    """Get every ready message in delivery order, acking each."""
    out = []
    channel = conn.default_channel
    while len(out) < limit:
        message = channel.basic_get(queue)
        if message is None:
            return out
        out.append(message.payload)
        message.ack()
    return out


def client(procs, url, *args):
    return procs.start([sys.executable, os.path.join(HERE, 'kombu_client.py'), url, *args],
                       name='client')


def client_lines(procs, proc):
    return [json.loads(line) for line in procs.log(proc).splitlines()
            if line.startswith('{')]


# -- order ---------------------------------------------------------------------

def test_lowest_priority_number_first_then_fifo(db_url):
    rng = random.Random(7)
    sent = [(rng.choice([0, 1, 2, 9, 10, 200, 255]), i) for i in range(300)]
    with Connection(db_url) as conn:
        for priority, i in sent:
            publish(conn, {'i': i, 'p': priority}, priority=priority)
        got = [(m['p'], m['i']) for m in drain(conn)]
    assert got == sorted(sent)


def test_default_priority_applies_only_to_messages_without_one(db_url):
    with Connection(db_url, transport_options={'default_priority': 3}) as conn:
        # Celery sends priority=None when a task has none (kombu's Producer sends 0).
        publish(conn, 'no priority', priority=None)
        publish(conn, 'priority 0', priority=0)
        publish(conn, 'priority 5', priority=5)
        assert drain(conn) == ['priority 0', 'no priority', 'priority 5']


# -- ack, reject, requeue ---------------------------------------------------------

def test_ack_reject_and_requeue(db_url):
    with Connection(db_url) as conn:
        for body in ('a', 'b', 'c'):
            publish(conn, body)
        channel = conn.default_channel
        a = channel.basic_get('q')
        b = channel.basic_get('q')
        c = channel.basic_get('q')
        assert channel.basic_get('q') is None            # all three are leased
        a.ack()
        b.reject()                                       # dropped
        c.requeue()                                      # ready again at once
        again = channel.basic_get('q')
        assert again.payload == 'c'
        assert again.delivery_info['redelivered'] is True
        assert again.delivery_info['delivery_count'] == 2
        again.ack()
        assert channel.basic_get('q') is None
        assert channel.queue_declare('q', passive=True).message_count == 0


def test_closing_a_channel_releases_its_unacked_messages(db_url):
    with Connection(db_url) as conn:
        publish(conn, 'x')
        with Connection(db_url) as other:
            assert other.default_channel.basic_get('q').payload == 'x'
        # The other connection closed without acking: the message is ready at once.
        message = conn.default_channel.basic_get('q')
        assert message.payload == 'x' and message.delivery_info['redelivered']


def test_consumer_acks_reach_the_file_without_another_delivery(db_url):
    """A consumer's acks are settled in batches; an operator still sees them land."""
    options = {'housekeeping_interval': 0.2}
    with Connection(db_url) as conn:
        for i in range(30):
            publish(conn, i)
    with Connection(db_url, transport_options=options) as conn:
        got = []
        consumer = Consumer(conn, [Queue('q')], prefetch_count=10,
                            callbacks=[lambda body, m: (got.append(body), m.ack())])
        with consumer:
            while len(got) < 30:
                conn.drain_events(timeout=5)
            # The consumer stops draining but stays open: its last acks still land.
            def settled():
                queue = kombu_sqlite.Broker(db_url).stats()['q']
                return queue if queue['leased'] == 0 else None
            assert wait_for(settled, 5, what='the last acks to land')['ready'] == 0
    assert got == list(range(30))
    assert kombu_sqlite.Broker(db_url).stats()['q']['counters']['acked'] == 30


def test_idle_consumer_looks_without_waiting_for_the_write_lock(db_url, procs):
    """With nothing ready and no acks to write, looking for work is a read: a
    consumer of an empty queue is not held up by another process's writes."""
    path = kombu_sqlite.schema.path_from_url(db_url)
    with Connection(db_url, transport_options={'busy_timeout': 5}) as conn:
        queue = Queue('q')
        with Consumer(conn, [queue], callbacks=[lambda body, m: m.ack()]):
            writer = procs.start([sys.executable, '-c', (
                'import sqlite3, time\n'
                f'db = sqlite3.connect({path!r}, isolation_level=None)\n'
                "db.execute('BEGIN IMMEDIATE')\n"
                "print('locked', flush=True)\n"
                'time.sleep(3600)\n')], name='writer')
            try:
                wait_for(lambda: 'locked' in procs.log(writer), 10, what='the lock')
                started = time.monotonic()
                with pytest.raises(socket.timeout):
                    conn.drain_events(timeout=0.3)
                took = time.monotonic() - started
                assert took < 2.5, f'an idle consumer waited {took:.1f}s for the write lock'
            finally:
                procs.kill(writer)


def test_consumer_killed_before_its_acks_land_gets_them_again(db_url, procs):
    """An ack not yet written is like one in flight: delivered again, never lost."""
    with Connection(db_url) as conn:
        publish(conn, 'job')
    holder = client(procs, db_url, 'consume', 'q', '', 'direct', 'q', '--visibility-timeout',
                    '2', '--quiet-housekeeper', '--linger', '3600')
    wait_for(lambda: any('body' in m for m in client_lines(procs, holder)), 30,
             what='the holder to receive and ack the message')
    time.sleep(0.3)
    procs.kill(holder)
    with Connection(db_url) as conn:
        message = wait_for(lambda: conn.default_channel.basic_get('q'), 10, what='redelivery')
        assert message.payload == 'job' and message.delivery_info['redelivered'] is True
        message.ack()
        assert conn.default_channel.basic_get('q') is None


# -- leases ------------------------------------------------------------------------

def test_killed_consumer_lease_expires_and_message_is_redelivered(db_url, procs):
    with Connection(db_url) as conn:
        publish(conn, 'job')
    holder = client(procs, db_url, 'consume', 'q', '', 'direct', 'q',
                    '--never-ack', '--visibility-timeout', '2')
    wait_for(lambda: any('body' in m for m in client_lines(procs, holder)), 30,
             what='the holder to receive the message')
    procs.kill(holder)                                   # kill -9, no cleanup at all
    with Connection(db_url) as conn:
        channel = conn.default_channel
        assert channel.basic_get('q') is None            # still leased
        message = wait_for(lambda: channel.basic_get('q'), 10, what='redelivery')
        assert message.payload == 'job'
        assert message.delivery_info['redelivered'] is True
        assert message.delivery_info['delivery_count'] == 2
        message.ack()


def test_live_holder_keeps_renewing_its_lease(db_url, procs):
    with Connection(db_url) as conn:
        publish(conn, 'long job')
    # Holds the message 4x longer than the visibility timeout, then acks.
    holder = client(procs, db_url, 'consume', 'q', '', 'direct', 'q',
                    '--hold', '6', '--visibility-timeout', '1.5')
    wait_for(lambda: any('body' in m for m in client_lines(procs, holder)), 30,
             what='the holder to receive the message')
    with Connection(db_url) as conn:
        channel = conn.default_channel
        while holder.poll() is None:
            stolen = channel.basic_get('q')
            assert stolen is None, 'a live lease was taken over'
            time.sleep(0.2)
        assert holder.returncode == 0, procs.log(holder)
        assert channel.basic_get('q') is None            # acked: gone
        assert conn.default_channel.queue_declare('q', passive=True).message_count == 0


# -- routing across processes ----------------------------------------------------------

@pytest.mark.parametrize('type,binding,key,matches', [
    ('direct', 'jobs', 'jobs', True),
    ('direct', 'jobs', 'other', False),
    ('topic', 'eu.*', 'eu.fr', True),
    ('topic', 'eu.#', 'eu.fr.paris', True),
    ('topic', '#', 'anything.at.all', True),
    ('topic', 'eu.*', 'eu.fr.paris', False),
    ('fanout', '', 'ignored', True),
])
def test_bindings_declared_in_one_process_route_in_another(db_url, procs, type, binding,
                                                           key, matches):
    consumer = client(procs, db_url, 'consume', 'inbox', 'ex', type, binding)
    wait_for(lambda: client_lines(procs, consumer), 30, what='consumer ready')
    # This process never declares the exchange, the queue or the binding.
    with Connection(db_url) as conn:
        conn.Producer().publish({'key': key}, exchange='ex', routing_key=key)
        if matches:
            wait_for(lambda: len(client_lines(procs, consumer)) > 1, 10,
                     what='the consumer to get the message')
            assert client_lines(procs, consumer)[1]['body'] == {'key': key}
        else:
            time.sleep(0.5)
            assert len(client_lines(procs, consumer)) == 1
            assert conn.default_channel.queue_declare('inbox', passive=True).message_count == 0


def test_fanout_copies_to_every_bound_queue(db_url):
    broadcast = Exchange('broadcast', 'fanout')
    queues = [Queue(f'listener{i}', broadcast) for i in range(3)]
    with Connection(db_url) as conn:
        for q in queues:
            q(conn.default_channel).declare()
        conn.Producer().publish('hello', exchange=broadcast)
        for q in queues:
            assert drain(conn, q.name) == ['hello']
    assert 'fanout' in Connection(db_url).transport.implements.exchange_type


# -- expiry --------------------------------------------------------------------------------

def test_message_ttl_and_expiration_drop_messages_and_count_them(db_url):
    with Connection(db_url) as conn:
        Queue('short', message_ttl=0.3)(conn.default_channel).declare()
        conn.Producer().publish('stale', routing_key='short')
        publish(conn, 'expiring', queue='q', expiration=0.3)
        publish(conn, 'kept', queue='q')
        time.sleep(0.6)
        assert drain(conn, 'short') == []
        assert drain(conn, 'q') == ['kept']
        counted = dict(conn.transport.store.conn.execute(
            "SELECT queue, value FROM kombu_counter WHERE name = 'expired'").fetchall())
    assert counted == {'short': 1, 'q': 1}


def test_unused_queue_is_swept_after_x_expires(db_url):
    with Connection(db_url, transport_options={'housekeeping_interval': 0.2}) as conn:
        Queue('ephemeral', Exchange('ev', 'topic'), '#', expires=1)(conn.default_channel).declare()
        conn.Producer().publish('m', exchange='ev', routing_key='a.b')
        store = conn.transport.store
        assert store.catalog.has_queue('ephemeral') and store.size('ephemeral') == 1
        wait_for(lambda: not store.catalog.has_queue('ephemeral'), 5, what='the queue to expire')
        assert store.catalog.bindings('ev') == []
        assert store.conn.execute('SELECT count(*) FROM kombu_message').fetchone()[0] == 0


def test_queue_being_consumed_does_not_expire(db_url):
    with Connection(db_url, transport_options={'housekeeping_interval': 0.2}) as conn:
        queue = Queue('busy', expires=1)
        with Consumer(conn, [queue], callbacks=[lambda b, m: m.ack()]):
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=0.3)
                except TimeoutError:
                    pass
            assert conn.transport.store.catalog.has_queue('busy')


def test_auto_delete_queue_goes_when_its_consumer_cancels(db_url):
    with Connection(db_url) as conn:
        queue = Queue('temp', auto_delete=True)
        consumer = Consumer(conn, [queue], callbacks=[])
        consumer.consume()
        assert conn.transport.store.catalog.has_queue('temp')
        consumer.cancel()
        assert not conn.transport.store.catalog.has_queue('temp')


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize('url,problem', [
    ('sqlite://', 'must follow three slashes'),
    ('sqlite://host/queue.db', 'host is not allowed'),
    ('sqlite:///:memory:', 'cannot be shared'),
    ('sqlite:///somewhere/', 'no database file'),
])
def test_malformed_url_is_refused_with_the_reason(url, problem):
    with pytest.raises(ValueError, match=problem):
        Connection(url).connect()


def test_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path):
    path = tmp_path / 'notes.db'
    path.write_bytes(b'these are my notes, not a database ' * 100)
    with pytest.raises(kombu_sqlite.DatabaseError, match='not a usable SQLite database'):
        Connection(f'sqlite:///{path}').connect()
    assert path.read_bytes().startswith(b'these are my notes')


def test_sqlite_file_of_another_application_is_refused(tmp_path):
    path = tmp_path / 'app.db'
    sqlite3.connect(path).execute('CREATE TABLE customers (id)').connection.commit()
    with pytest.raises(kombu_sqlite.DatabaseError, match='another application'):
        Connection(f'sqlite:///{path}').connect()


def test_directory_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / 'a-file'
    blocker.write_text('x')
    with pytest.raises(kombu_sqlite.DatabaseError, match='cannot create the directory'):
        Connection(f'sqlite:///{blocker}/sub/queue.db').connect()


def test_missing_directory_is_created_private_and_files_are_owner_only(tmp_path):
    path = tmp_path / 'new' / 'deeper' / 'queue.db'
    with Connection(f'sqlite:///{path}') as conn:
        publish(conn, 'secret prompt')
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        for name in (path, f'{path}-wal', f'{path}-shm'):
            assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name


def test_newer_schema_is_refused_naming_both_versions(tmp_path):
    path = tmp_path / 'queue.db'
    with Connection(f'sqlite:///{path}') as conn:
        conn.connect()
    db = sqlite3.connect(path)
    db.execute('PRAGMA user_version=99')
    db.close()
    current = kombu_sqlite.schema.SCHEMA_VERSION
    with pytest.raises(kombu_sqlite.DatabaseError, match=f'version 99.*version {current}'):
        Connection(f'sqlite:///{path}').connect()


@pytest.mark.parametrize('priority', [-1, 256, 1.5, 'high'])
def test_priority_outside_0_255_is_refused_and_nothing_is_lost(db_url, priority):
    with Connection(db_url) as conn:
        publish(conn, 'already queued')
        with pytest.raises(ValueError, match='priority .* integers 0-255'):
            publish(conn, 'bad', priority=priority)
        assert drain(conn) == ['already queued']


def test_relative_url_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Connection('sqlite:///data/queue.db') as conn:
        publish(conn, 'here')
    assert (tmp_path / 'data' / 'queue.db').exists()
    with Connection(f'sqlite:///{tmp_path}/data/queue.db') as conn:   # same file, absolute
        assert drain(conn) == ['here']


def test_transport_class_by_configuration_without_the_scheme(tmp_path):
    code = (
        'from kombu import Connection\n'
        f'c = Connection("sqlite:///{tmp_path}/q.db", transport="kombu_sqlite.transport:Transport")\n'
        'c.Producer().publish("ok", routing_key="q")\n'
        'print(c.default_channel.basic_get("q").payload)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == 'ok', out.stderr
