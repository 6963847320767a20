"""Operating a queue file: the kombu-sqlite command, the exporter, backups,
schema migration and faults, through real processes."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from kombu import Connection, Queue

import kombu_sqlite
from conftest import start_exporter, wait_for
from kombu_sqlite import schema


def cli(*args, check=True):
    out = subprocess.run([sys.executable, '-m', 'kombu_sqlite.cli', *args],
                         capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def publish_work(url, n=5):
    with Connection(url) as conn:
        producer = conn.Producer()
        for i in range(n):
            producer.publish({'prompt': f'secret {i}'}, routing_key='work',
                             declare=[Queue('work')], priority=i % 3,
                             headers={'task': 'tasks.generate', 'id': f'task-{i}',
                                      'x-client': 'alice'})


def test_stats_peek_dlq_and_purge(db_url):
    publish_work(db_url)
    with Connection(db_url, transport_options={'max_deliveries': 1}) as conn:
        held = conn.default_channel.basic_get('work')        # leased by this process
        stats = json.loads(cli('stats', db_url, '--json').stdout)['work']
        assert stats['ready'] == 4 and stats['leased'] == 1
        assert stats['ready_by_priority'] == {'0': 1, '1': 2, '2': 1}
        assert list(stats['leased_by'].values()) == [1]
        assert stats['last_minute']['published'] == 5
        assert f':{os.getpid()}:' in list(stats['leased_by'])[0]
        held.reject()                                         # -> dead letter
    peek = json.loads(cli('peek', db_url, 'work', '-n', '2', '--json').stdout)
    assert [m['task_id'] for m in peek] == ['task-3', 'task-1']
    assert 'body' not in peek[0] and 'secret' not in cli('peek', db_url, 'work').stdout
    assert json.loads(cli('peek', db_url, 'work', '--body', '--json').stdout)[0]['body'] == \
        '{"prompt": "secret 3"}'
    dead = json.loads(cli('dlq', 'list', db_url, '--json').stdout)
    assert [(d['task_id'], d['reason']) for d in dead] == [('task-0', 'rejected')]
    assert 'requeued 1' in cli('dlq', 'requeue', db_url, 'work').stdout
    assert cli('dlq', 'list', db_url, '--json').stdout.strip() == '[]'
    assert 'purged 5 messages' in cli('purge', db_url, 'work').stdout
    assert json.loads(cli('stats', db_url, '--json').stdout)['work']['ready'] == 0


@pytest.mark.parametrize('make,args,message', [
    (None, ['stats', '{dir}/missing.db'], 'no queue database at'),
    ('junk', ['stats', '{dir}/file.db'], 'not a usable SQLite database'),
    ('queue', ['peek', '{dir}/file.db', 'nope'], "no queue named 'nope'"),
    ('queue', ['purge', 'sqlite://host/x.db', 'work'], 'malformed broker URL'),
])
def test_errors_are_one_clear_line_and_a_failing_exit(tmp_path, make, args, message):
    if make == 'junk':
        (tmp_path / 'file.db').write_text('not a database at all ' * 50)
    elif make == 'queue':
        publish_work(f'sqlite:///{tmp_path}/file.db', 1)
    out = cli(*[a.format(dir=tmp_path) for a in args], check=False)
    assert out.returncode == 1
    assert out.stderr.count('\n') == 1 and message in out.stderr, out.stderr


def test_maintain_while_a_consumer_runs(db_url, procs, tmp_path):
    publish_work(db_url, 50)
    consumer = procs.start([sys.executable, os.path.join(os.path.dirname(__file__),
                                                         'kombu_client.py'),
                            db_url, 'consume', 'work', '', 'direct', 'work',
                            '--count', '60', '--hold', '0.02'], name='consumer')
    wait_for(lambda: 'body' in procs.log(consumer), 30, what='consumption')
    out = cli('maintain', db_url).stdout
    for step in ('swept', 'wal checkpoint', 'incremental vacuum',
                 'quick_check: ok', 'optimize: ok'):
        assert step in out, out
    assert 'auto_vacuum=incremental' in out
    publish_work(db_url, 10)
    consumer.wait(60)
    assert consumer.returncode == 0, procs.log(consumer)


def test_backup_while_publishing_and_restore(tmp_path, procs):
    url = f'sqlite:///{tmp_path}/live.db'
    publish_work(url, 1)
    writer = procs.start([sys.executable, '-c', textwrap.dedent(f'''
        import kombu_sqlite
        from kombu import Connection
        with Connection({url!r}) as c:
            p = c.Producer()
            for i in range(3000):
                p.publish({{'n': i}}, routing_key='work')
        ''')], name='writer')
    with kombu_sqlite.Broker(url) as live:   # back up while the writer is writing
        wait_for(lambda: writer.poll() is not None or live.stats()['work']['ready'] > 1, 30,
                 what='the writer to start publishing')
    backup = tmp_path / 'copy.db'
    assert 'backup written' in cli('backup', url, str(backup)).stdout
    writer.wait(60)
    assert oct(os.stat(backup).st_mode & 0o777) == '0o600'
    copy = sqlite3.connect(backup)
    assert copy.execute('PRAGMA integrity_check').fetchone() == ('ok',)
    copied = copy.execute('SELECT count(*) FROM kombu_message').fetchone()[0]
    copy.close()
    # Restore: stop workers, put the copy in place, start again.
    restored = tmp_path / 'restored' / 'queue.db'
    restored.parent.mkdir()
    shutil.copy(backup, restored)
    # A consistent snapshot: the first message and an unbroken prefix of the writer's.
    with kombu_sqlite.Broker(str(backup)) as snapshot:
        bodies = [json.loads(m['body']) for m in snapshot.peek('work', 3001, body=True)]
    assert len(bodies) == copied > 1
    assert bodies == [{'prompt': 'secret 0'}] + [{'n': i} for i in range(copied - 1)]
    with Connection(f'sqlite:///{restored}') as conn:
        first = conn.default_channel.basic_get('work')
        assert first.payload == {'prompt': 'secret 0'}
        assert conn.default_channel.queue_declare('work', passive=True).message_count == copied - 1


def test_metrics_exporter_serves_queue_state_and_counters(db_url, procs):
    publish_work(db_url, 5)
    with Connection(db_url) as conn:
        conn.default_channel.basic_get('work').ack()
    exporter, scrape = start_exporter(procs, db_url)
    text = scrape()
    assert 'kombu_sqlite_ready{priority="1",queue="work"} 2.0' in text
    assert 'kombu_sqlite_ready{priority="2",queue="work"} 1.0' in text
    assert 'kombu_sqlite_published_total{queue="work"} 5.0' in text
    assert 'kombu_sqlite_acked_total{queue="work"} 1.0' in text
    assert 'kombu_sqlite_oldest_ready_age_seconds{queue="work"}' in text
    publish_work(db_url, 1)                     # counted by another process
    wait_for(lambda: 'kombu_sqlite_published_total{queue="work"} 6.0' in scrape(), 10,
             what='the new count')
    assert exporter.poll() is None


def test_exporter_keeps_no_connection_per_scrape(db_url, procs):
    publish_work(db_url, 2)
    exporter, scrape = start_exporter(procs, db_url)

    def open_files():
        return len(os.listdir(f'/proc/{exporter.pid}/fd'))
    scrape()
    before = open_files()
    for _ in range(40):          # each scrape is served on a new thread
        assert 'kombu_sqlite_ready{priority="0",queue="work"} 1.0' in scrape()
    assert open_files() <= before + 2, 'a file descriptor leaked per scrape'


def test_file_of_the_first_schema_is_migrated_in_place(tmp_path):
    path = tmp_path / 'v1.db'
    db = sqlite3.connect(path)
    for statement in schema.SCHEMA_V1:
        db.execute(statement)
    payload = {'body': '"from v1"', 'content-type': 'application/json',
               'content-encoding': 'utf-8', 'headers': {},
               'properties': {'delivery_info': {'exchange': '', 'routing_key': 'old'},
                              'priority': 0, 'body_encoding': None}}
    db.execute("INSERT INTO kombu_message (queue, priority, visible_at, published_at, payload) "
               "VALUES ('old', 0, 0, 0, ?)", (json.dumps(payload),))
    db.execute('PRAGMA user_version=1')
    db.commit()
    db.close()
    with Connection(f'sqlite:///{path}') as conn:
        message = conn.default_channel.basic_get('old')
        assert message.payload == 'from v1'
        message.ack()
        assert conn.transport.store.conn.execute(
            'PRAGMA user_version').fetchone()[0] == schema.SCHEMA_VERSION


def test_disk_full_fails_clearly_keeps_what_is_queued_and_recovers(db_url):
    capped = {'max_page_count': 40}
    sent = 0
    with Connection(db_url, transport_options=capped) as conn:
        producer = conn.Producer()
        with pytest.raises(kombu_sqlite.DatabaseError, match='is full'):
            for sent in range(100000):
                producer.publish({'n': sent, 'pad': 'x' * 2000}, routing_key='q',
                                 declare=[Queue('q')] if sent == 0 else [])
        got = []
        while (message := conn.default_channel.basic_get('q')) is not None:
            got.append(message.payload['n'])
            message.ack()
        assert got == list(range(sent))                 # nothing queued was lost
    with Connection(db_url) as conn:                    # space returns: no cap
        conn.Producer().publish({'n': 'after'}, routing_key='q')
        assert conn.default_channel.basic_get('q').payload == {'n': 'after'}


def test_corrupted_file_is_a_clear_error_at_start(tmp_path):
    path = tmp_path / 'queue.db'
    publish_work(f'sqlite:///{path}', 3)
    data = bytearray(path.read_bytes())
    data[0:16] = b'garbage garbage!'
    path.write_bytes(bytes(data))
    with pytest.raises(kombu_sqlite.DatabaseError, match='not a usable SQLite database'):
        Connection(f'sqlite:///{path}').connect()


def _immutable(path, on):
    # Root ignores file modes but not the immutable attribute.
    return subprocess.run(['chattr', '+i' if on else '-i', str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize('target', ['directory', 'file'])
def test_read_only_directory_or_file_is_a_clear_error(tmp_path, target):
    directory = tmp_path / 'data'
    directory.mkdir()
    path = directory / 'queue.db'
    if target == 'file':
        publish_work(f'sqlite:///{path}', 1)
    locked = path if target == 'file' else directory
    if shutil.which('chattr') is None or not _immutable(locked, True):
        pytest.skip('chattr +i is not available on this filesystem')
    try:
        with pytest.raises(kombu_sqlite.DatabaseError, match='is not writable') as info:
            Connection(f'sqlite:///{path}').connect()
        assert str(directory if target == 'directory' else path) in str(info.value)
    finally:
        _immutable(locked, False)
    if target == 'file':                           # nothing stored was lost
        with Connection(f'sqlite:///{path}') as conn:
            assert conn.default_channel.queue_declare('work', passive=True).message_count == 1


def test_locked_within_the_busy_timeout_is_waited_through_without_loss_or_doubles(db_url, procs):
    with Connection(db_url) as conn:
        Queue('q')(conn.default_channel).declare()
    path = schema.path_from_url(db_url)
    locker = procs.start([sys.executable, '-c', textwrap.dedent(f'''
        import sqlite3, time
        db = sqlite3.connect({path!r}, isolation_level=None)
        db.execute('BEGIN IMMEDIATE')
        print('locked', flush=True)
        time.sleep(2.5)
        db.execute('COMMIT')
        ''')], name='locker')
    wait_for(lambda: 'locked' in procs.log(locker), 10, what='the lock')
    # A lock shorter than busy_timeout is waited through (a longer one is a
    # clear error within about one busy_timeout: see test_faults.py).
    with Connection(db_url, transport_options={'busy_timeout': 10}) as conn:
        started = time.monotonic()
        conn.Producer().publish('through the lock', routing_key='q')
        assert time.monotonic() - started > 1               # it did wait, then succeeded
        assert conn.default_channel.queue_declare('q', passive=True).message_count == 1
        assert conn.default_channel.basic_get('q').payload == 'through the lock'


def _files(directory):
    """What any write would change: each file's bytes, mode and times, and the
    directory's own mtime (a -wal or -shm created and deleted again moves it)."""
    state = {'.': os.stat(directory).st_mtime_ns}
    for name in sorted(os.listdir(directory)):
        st = os.stat(directory / name)
        state[name] = ((directory / name).read_bytes(), st.st_mode, st.st_mtime_ns,
                       st.st_ctime_ns)
    return state


def test_commands_that_only_look_never_write(tmp_path, procs):
    data = tmp_path / 'data'
    data.mkdir()
    url = f'sqlite:///{data}/queue.db'
    publish_work(url, 4)            # claim order: task-0, task-3, task-1, task-2
    stalled = {'visibility_timeout': 0.5, 'lease_renew_interval': 3600,
               'housekeeping_interval': 3600}
    with Connection(url, transport_options=stalled) as conn:
        channel = conn.default_channel
        channel.basic_get('work').reject()                  # task-0: a dead letter
        late = channel.basic_get('work')                    # task-3
        time.sleep(1)
        with kombu_sqlite.Broker(url) as broker:
            broker.sweep()                                  # its lease ran out
            assert broker.remove('work', 'task-1')
        late.ack()                                          # too late: counted
    os.chmod(data / 'queue.db', 0o444)  # root writes anyway: the bytes and times tell
    before = _files(data)
    assert list(before) == ['.', 'queue.db']                # no -wal, no -shm

    assert len(json.loads(cli('dlq', 'list', url, '--json').stdout)) == 1
    assert json.loads(cli('stats', url, '--json').stdout)['work']['ready'] == 2
    assert len(json.loads(cli('peek', url, 'work', '--json').stdout)) == 2
    assert 'backup written' in cli('backup', url, str(tmp_path / 'copy.db')).stdout
    exporter, scrape = start_exporter(procs, url)
    text = scrape()
    assert 'kombu_sqlite_removed_total{queue="work"} 1.0' in text
    assert 'kombu_sqlite_late_settles_total{queue="work"} 1.0' in text
    assert 'kombu_sqlite_dead{queue="work"} 1.0' in text
    assert sorted(os.listdir(data)) == ['queue.db']         # while it serves
    procs.stop(exporter)
    assert _files(data) == before
