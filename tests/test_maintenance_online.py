"""Backup and maintenance beside live producers and readers, through real processes.

What an operator checks: the backup finishes in bounded time while a producer
commits every 0.1 s, is consistent and 0600, and a killed backup does not
break the next one; ``maintain`` never stalls a publisher behind a reader's
snapshot; after a big purge one ``maintain`` gives the space back to the disk.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from kombu import Connection, Queue

import kombu_sqlite  # noqa: F401  registers the sqlite:// transport
from conftest import wait_for

#: Publishes one numbered message every INTERVAL s until STOP exists; prints
#: the worst publish latency and the count as JSON when it stops.
PUBLISHER = textwrap.dedent('''
    import json, os, sys, time
    import kombu_sqlite
    from kombu import Connection, Queue
    url, stop, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
    worst, n = 0.0, 0
    with Connection(url) as conn:
        producer = conn.Producer()
        while not os.path.exists(stop):
            started = time.monotonic()
            producer.publish({'n': n}, routing_key='tick', declare=[Queue('tick')])
            worst = max(worst, time.monotonic() - started)
            n += 1
            if n == 5:
                print('publishing', flush=True)
            time.sleep(interval)
    print(json.dumps({'worst': worst, 'published': n}), flush=True)
''')

#: Opens a read transaction, reads, and keeps that snapshot until killed.
SNAPSHOT_READER = textwrap.dedent('''
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute('BEGIN')
    conn.execute('SELECT count(*) FROM kombu_message').fetchone()
    print('holding a snapshot', flush=True)
    time.sleep(600)
''')


def cli(*args, timeout=120, check=True):
    started = time.monotonic()
    out = subprocess.run([sys.executable, '-m', 'kombu_sqlite.cli', *args],
                         capture_output=True, text=True, timeout=timeout)
    out.seconds = time.monotonic() - started
    if check:
        assert out.returncode == 0, out.stderr
    return out


def file_bytes(path):
    return sum(os.path.getsize(p) for p in (path, f'{path}-wal') if os.path.exists(p))


class Publisher:
    """A producer process that reports its worst publish latency."""

    def __init__(self, procs, url, tmp_path, interval):
        self.procs = procs
        self.stop_file = tmp_path / 'stop-publisher'
        self.proc = procs.start([sys.executable, '-c', PUBLISHER, url, str(self.stop_file),
                                 str(interval)], name='publisher')
        wait_for(lambda: 'publishing' in procs.log(self.proc) or self.proc.poll() is not None,
                 30, what='the publisher to start')
        assert self.proc.poll() is None, procs.log(self.proc)

    def finish(self):
        self.stop_file.touch()
        self.proc.wait(60)
        log = self.procs.log(self.proc)
        assert self.proc.returncode == 0, log
        return json.loads(log.strip().splitlines()[-1])


def fill(url, megabytes):
    """About ``megabytes`` MiB of queued messages, quickly: few large payloads."""
    body = os.urandom(512 * 1024).hex()  # 1 MiB of text, ~1.4 MiB stored
    with Connection(url) as conn:
        producer = conn.Producer()
        for _ in range(int(megabytes / 1.4)):
            producer.publish(body, routing_key='bulk', declare=[Queue('bulk')])


def ticks_in(path):
    """The numbers of the 'tick' messages in a broker file, in order."""
    with Connection(f'sqlite:///{path}') as conn:
        channel = conn.default_channel
        numbers = []
        while (message := channel.basic_get('tick', no_ack=True)) is not None:
            numbers.append(message.payload['n'])
    return numbers


def test_backup_of_200_mib_under_continuous_commits_is_bounded_and_consistent(
        tmp_path, procs):
    path = tmp_path / 'live.db'
    url = f'sqlite:///{path}'
    fill(url, 200)
    assert os.path.getsize(path) > 190 * 2 ** 20
    publisher = Publisher(procs, url, tmp_path, interval=0.1)
    dest = tmp_path / 'backups' / 'copy.db'
    dest.parent.mkdir()
    try:
        # The online backup API restarted at every commit and never finished.
        out = cli('backup', url, str(dest), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail('backup of 200 MiB did not finish in 60 s beside a producer')
    finally:
        published = publisher.finish()['published']
    print(f'backup of {os.path.getsize(path)} bytes beside a producer: {out.seconds:.2f} s')
    assert 'backup written' in out.stdout and 'integrity_check ok' in out.stdout, out.stdout
    assert oct(os.stat(dest).st_mode & 0o777) == '0o600'
    assert sorted(os.listdir(dest.parent)) == ['copy.db']
    copy = sqlite3.connect(dest)
    assert copy.execute('PRAGMA integrity_check').fetchall() == [('ok',)]
    assert copy.execute('PRAGMA journal_mode').fetchone() == ('delete',)
    copy.close()
    # One instant: every tick published before it, none after.
    ticks = ticks_in(dest)
    assert ticks == list(range(len(ticks))) and 0 < len(ticks) <= published


def test_killed_backup_leaves_nothing_the_next_one_trips_on(tmp_path, procs):
    path = tmp_path / 'live.db'
    url = f'sqlite:///{path}'
    fill(url, 150)
    dest = tmp_path / 'backups' / 'copy.db'
    dest.parent.mkdir()
    for _attempt in range(5):
        backup = procs.start([sys.executable, '-m', 'kombu_sqlite.cli', 'backup', url,
                              str(dest)], name='backup')
        wait_for(lambda: os.listdir(dest.parent) or backup.poll() is not None, 60,
                 interval=0.002, what='the backup to start writing')
        procs.kill(backup, signal.SIGKILL)
        if not dest.exists():
            break
        dest.unlink()  # it finished before the kill: try again
    else:
        pytest.skip('the backup always finished before it could be killed')
    assert os.listdir(dest.parent), 'the killed backup wrote nothing: test proves nothing'
    out = cli('backup', url, str(dest), timeout=60)
    assert 'backup written' in out.stdout
    assert sorted(os.listdir(dest.parent)) == ['copy.db']
    copy = sqlite3.connect(dest)
    assert copy.execute('PRAGMA integrity_check').fetchall() == [('ok',)]
    assert copy.execute('SELECT count(*) FROM kombu_message').fetchone()[0] == int(150 / 1.4)
    copy.close()


def test_maintain_beside_a_reader_snapshot_never_stalls_publishers(tmp_path, procs):
    path = tmp_path / 'live.db'
    url = f'sqlite:///{path}'
    with Connection(url) as conn:
        conn.SimpleQueue('tick').put({'n': -1})
    reader = procs.start([sys.executable, '-c', SNAPSHOT_READER, str(path)], name='reader')
    wait_for(lambda: 'holding' in procs.log(reader) or reader.poll() is not None, 30,
             what='the reader to hold its snapshot')
    assert reader.poll() is None, procs.log(reader)
    publisher = Publisher(procs, url, tmp_path, interval=0.02)  # writes past the snapshot
    try:
        out = cli('maintain', url, '--json', timeout=90)
        time.sleep(0.5)
    finally:
        worst = publisher.finish()['worst']
    print(f'maintain beside a reader: {out.seconds:.2f} s, worst publish {worst:.3f} s')
    # Before: the checkpoint held the write lock for the whole 30 s busy timeout.
    assert worst < 2.0, f'a publish waited {worst:.1f} s while maintain ran'
    assert out.seconds < 20, f'maintain took {out.seconds:.1f} s'
    done = json.loads(out.stdout)
    assert done['checkpoint']['complete'] is False
    assert 'reader' in done['checkpoint']['not_done']
    assert done['quick_check'] == 'ok'
    human = cli('maintain', url, timeout=90).stdout
    assert 'not done' in human and 'reader' in human, human
    procs.kill(reader)
    again = json.loads(cli('maintain', url, '--json', timeout=90).stdout)
    assert again['checkpoint']['complete'] is True
    assert not os.path.exists(f'{path}-wal') or os.path.getsize(f'{path}-wal') == 0


@pytest.mark.slow
def test_maintain_after_purging_60k_returns_the_space_without_stalling(tmp_path, procs):
    path = tmp_path / 'live.db'
    url = f'sqlite:///{path}'
    with Connection(url) as conn:
        producer = conn.Producer()
        for i in range(60_000):
            producer.publish({'n': i, 'prompt': 'p' * 600}, routing_key='work',
                             declare=[Queue('work')])
    assert 'purged 60000 messages' in cli('purge', url, 'work').stdout
    before = file_bytes(path)
    assert before > 40 * 2 ** 20
    publisher = Publisher(procs, url, tmp_path, interval=0.02)
    try:
        out = cli('maintain', url, '--json', timeout=90)
    finally:
        worst = publisher.finish()['worst']
    done = json.loads(out.stdout)
    vacuum = done['incremental_vacuum']
    after = file_bytes(path)
    print(f'maintain after purge: {out.seconds:.2f} s, {before} -> {after} bytes, '
          f'worst publish {worst:.3f} s')
    # Before: one page freed per run, and the file stayed as large.
    assert after < before / 10, f'{before} bytes before maintain, {after} after'
    assert vacuum['pages_freed'] > 10_000 and vacuum['pages_left'] == 0, vacuum
    assert worst < 2.0, f'a publish waited {worst:.1f} s while maintain ran'


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB filesystem (tmpfs; needs root), unmounted afterwards."""
    mount = tmp_path / 'small'
    mount.mkdir()
    made = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f'cannot mount a small tmpfs here: {made.stderr.strip()}')
    try:
        yield mount
    finally:
        subprocess.run(['umount', str(mount)], check=True)


def test_backup_to_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, small_disk):
    url = f'sqlite:///{tmp_path}/live.db'
    fill(url, 10)
    out = cli('backup', url, str(small_disk / 'copy.db'), check=False)
    assert out.returncode == 1
    assert out.stderr.count('\n') == 1 and 'no space left for the backup' in out.stderr, \
        out.stderr
    assert os.listdir(small_disk) == []
