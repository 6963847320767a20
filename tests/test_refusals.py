"""What the transport refuses, and what it leaves alone.

Other applications' databases, bad queue arguments and priorities, topic
bindings built to be slow, file modes, and the figures read while queues
change under them.
"""
import hashlib
import math
import os
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from kombu import Connection, Exchange, Queue

import kombu_sqlite
from kombu_sqlite import Broker
from kombu_sqlite.errors import ForeignDatabase

CLI = [sys.executable, '-m', 'kombu_sqlite.cli']


def fingerprint(path):
    """Bytes and mode of a file and whatever SQLite keeps beside it."""
    out = {}
    for name in (path, f'{path}-wal', f'{path}-shm', f'{path}-journal'):
        if os.path.exists(name):
            with open(name, 'rb') as f:
                out[name] = (hashlib.sha256(f.read()).hexdigest(),
                             stat.S_IMODE(os.stat(name).st_mode))
    return out


# -- 6. another application's database ------------------------------------------------------

@pytest.mark.parametrize('user_version', [0, 1, 2, 3, 7])
@pytest.mark.parametrize('journal', ['delete', 'wal'])
def test_foreign_database_is_refused_and_left_byte_and_mode_identical(
        tmp_path, user_version, journal):
    path = tmp_path / 'app.db'
    db = sqlite3.connect(path)
    db.execute(f'PRAGMA journal_mode={journal}')
    db.execute('CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)')
    db.execute("INSERT INTO customers (name) VALUES ('Ada')")
    db.execute(f'PRAGMA user_version={user_version}')
    db.commit()
    db.close()
    os.chmod(path, 0o644)
    before = fingerprint(path)
    with pytest.raises(ForeignDatabase, match='another application') as info:
        Connection(f'sqlite:///{path}').connect()
    assert str(path) in str(info.value)
    assert not isinstance(info.value, Connection('sqlite:///x.db').connection_errors)
    out = subprocess.run([*CLI, 'stats', f'sqlite:///{path}'], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and 'another application' in out.stderr, out
    assert fingerprint(path) == before


def test_stats_opens_read_only_and_writes_nothing(tmp_path):
    path = tmp_path / 'queue.db'
    with Connection(f'sqlite:///{path}') as conn:
        conn.Producer().publish('m', routing_key='q', declare=[Queue('q')])
    os.chmod(path, 0o644)   # a read-only command does not even fix this
    before = fingerprint(path)
    out = subprocess.run([*CLI, 'stats', '--json', f'sqlite:///{path}'], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"ready": 1' in out.stdout
    assert fingerprint(path) == before


def test_files_of_older_kombu_sqlite_without_application_id_still_open(tmp_path):
    path = tmp_path / 'queue.db'
    with Connection(f'sqlite:///{path}') as conn:
        conn.Producer().publish('old', routing_key='q', declare=[Queue('q')])
    db = sqlite3.connect(path)
    db.execute('PRAGMA application_id=0')     # as written before identification
    db.commit()
    db.close()
    with Connection(f'sqlite:///{path}') as conn:
        assert conn.default_channel.basic_get('q').payload == 'old'
    assert sqlite3.connect(path).execute('PRAGMA application_id').fetchone()[0] == \
        kombu_sqlite.schema.APPLICATION_ID


# -- 11. bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize('weights,shown', [
    ({0: math.inf}, 'inf'), ({0: math.nan}, 'nan'), ({0: 1e308, 1: 1e308}, '1e+308')])
def test_unusable_priority_weights_are_refused_at_declare(db_url, weights, shown):
    with Connection(db_url) as conn:
        queue = Queue('w', queue_arguments={'x-scheduling': 'weighted-random',
                                            'x-priority-weights': weights})
        with pytest.raises(ValueError, match=f'x-priority-weights.*{re.escape(shown)}'):
            queue(conn.default_channel).declare()
        assert not conn.transport.store.catalog.has_queue('w')


@pytest.mark.parametrize('arguments,shown', [
    ({'x-max-length': 10 ** 30}, str(10 ** 30)),
    ({'x-message-ttl': math.inf}, 'inf'),
    ({'x-expires': math.nan}, 'nan'),
])
def test_out_of_range_queue_arguments_are_refused_naming_the_value(db_url, arguments, shown):
    with Connection(db_url) as conn:
        with pytest.raises(ValueError, match=shown):
            Queue('bad', queue_arguments=arguments)(conn.default_channel).declare()


@pytest.mark.parametrize('priority', [math.inf, -math.inf, math.nan, 10 ** 30])
def test_absurd_priorities_are_refused_naming_the_value(db_url, priority):
    with Connection(db_url) as conn:
        with pytest.raises(ValueError, match='priority .* integers 0-255'):
            conn.Producer().publish('m', routing_key='q', declare=[Queue('q')],
                                    priority=priority)


def test_a_directory_as_the_database_is_named(tmp_path):
    with pytest.raises(kombu_sqlite.DatabaseError, match='is a directory') as info:
        Connection(f'sqlite:///{tmp_path}').connect()
    assert str(tmp_path) in str(info.value)


# -- 12. topic matching is linear -------------------------------------------------------------

def test_many_hashes_against_a_long_routing_key_match_at_once(db_url):
    with Connection(db_url) as conn:
        exchange = Exchange('t', 'topic')
        Queue('slow', exchange, '.'.join(['#'] * 11 + ['never']))(conn.default_channel).declare()
        Queue('hit', exchange, '.'.join(['#'] * 11 + ['w39']))(conn.default_channel).declare()
        started = time.monotonic()
        conn.Producer().publish('m', exchange='t',
                                routing_key='.'.join(f'w{i}' for i in range(40)))
        assert time.monotonic() - started < 2
        assert conn.default_channel.basic_get('hit').payload == 'm'
        assert conn.default_channel.basic_get('slow') is None


# -- 14. stats is one snapshot ----------------------------------------------------------------

def test_stats_while_queues_come_and_go(db_url, procs):
    with Connection(db_url):
        pass
    churn = procs.start([sys.executable, '-c', textwrap.dedent(f'''
        import kombu_sqlite
        from kombu import Connection, Queue
        with Connection({db_url!r}) as conn:
            producer = conn.Producer()
            i = 0
            while True:
                name = 'q%d' % (i % 50)
                producer.publish('m', routing_key=name, declare=[Queue(name)])
                if i % 3 == 0:
                    conn.default_channel.queue_delete('q%d' % ((i + 25) % 50))
                i += 1
        ''')], name='churn')
    deadline = time.monotonic() + 6
    rounds = 0
    with Broker(db_url) as broker:
        while time.monotonic() < deadline:
            figures = broker.stats()
            assert all(q['ready'] >= 0 for q in figures.values())
            rounds += 1
    assert churn.poll() is None, procs.log(churn)
    assert rounds > 10


# -- 15. file modes ---------------------------------------------------------------------------

def test_a_copied_world_readable_broker_is_made_owner_only_without_touching_the_umask(
        tmp_path, caplog):
    source = tmp_path / 'source.db'
    with Connection(f'sqlite:///{source}') as conn:
        conn.Producer().publish('secret prompt', routing_key='q', declare=[Queue('q')])
    copy = tmp_path / 'restored.db'
    subprocess.run(['cp', str(source), str(copy)], check=True)
    os.chmod(copy, 0o644)
    umasks, stop = set(), threading.Event()

    def watch_umask():
        while not stop.is_set():
            with open('/proc/self/status') as f:
                umasks.update(line.split()[1] for line in f if line.startswith('Umask'))

    watcher = threading.Thread(target=watch_umask)
    watcher.start()
    try:
        with Connection(f'sqlite:///{copy}') as conn:
            assert conn.default_channel.basic_get('q').payload == 'secret prompt'
            for name in (copy, f'{copy}-wal', f'{copy}-shm'):
                assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name
    finally:
        stop.set()
        watcher.join()
    assert len(umasks) == 1, umasks
    assert any('0600' in r.getMessage() and str(copy) in r.getMessage()
               for r in caplog.records if r.levelname == 'WARNING')


def test_every_missing_directory_is_created_owner_only(tmp_path):
    path = tmp_path / 'a' / 'b' / 'c' / 'queue.db'
    with Connection(f'sqlite:///{path}') as conn:
        conn.connect()
    for directory in (tmp_path / 'a', tmp_path / 'a' / 'b', tmp_path / 'a' / 'b' / 'c'):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory


# -- 16. published counters of short-lived processes ----------------------------------------

def test_a_script_that_exits_normally_has_its_publishes_counted(db_url):
    code = textwrap.dedent(f'''
        import kombu_sqlite
        from kombu import Connection, Queue
        conn = Connection({db_url!r})
        for i in range(3):
            conn.Producer().publish(i, routing_key='q', declare=[Queue('q')])
        # exits without closing the connection, as a script calling .delay() does
        ''')
    subprocess.run([sys.executable, '-c', code], check=True, timeout=60)
    with Broker(db_url) as broker:
        assert broker.stats()['q']['counters']['published'] == 3


@pytest.mark.parametrize('option,value', [
    ('visibility_timeout', 'soon'), ('visibility_timeout', math.inf), ('max_claim', 0),
    ('synchronous', 'sometimes'), ('wakeup', 'telepathy'), ('batch_acks', 'maybe')])
def test_bad_transport_options_are_refused_naming_the_option(db_url, option, value):
    with pytest.raises(ValueError, match=f'transport option {option}='):
        Connection(db_url, transport_options={option: value}).connect()


def test_options_of_other_transports_are_ignored(db_url):
    options = {'priority_steps': list(range(10)), 'sep': ':', 'visibility_timeout': 5}
    with Connection(db_url, transport_options=options) as conn:
        conn.Producer().publish('m', routing_key='q', declare=[Queue('q')])
        assert conn.transport.options.visibility_timeout == 5.0
