"""Producer-controlled text in the kombu-sqlite command and the exporter, and
the broker URL taken from $KOMBU_SQLITE_URL, through real subprocesses."""
import json
import os
import subprocess
import sys

import pytest
from kombu import Connection, Queue

import kombu_sqlite  # noqa: F401  registers the sqlite:// transport
from conftest import start_exporter

MARKUP_QUEUE = '[/bold]x'            # rich raised MarkupError on it
RENDERED_QUEUE = '[b]bold[/b] :smile:'  # rich rendered it as bold and an emoji
ESCAPE_QUEUE = 'evil\x1b[2J'         # clears the operator's screen
TASK = '[/red]'
TASK_ID = '\x1b]0;owned\x07\x1b[31mred'  # OSC: sets the terminal title; then colour
CLIENT = 'bob\u202egnp.exe'          # right-to-left override: spoofs what follows


def cli(*args, env=None, check=True):
    out = subprocess.run(
        [sys.executable, '-m', 'kombu_sqlite.cli', *args], capture_output=True, text=True,
        timeout=60, env={**os.environ, 'COLUMNS': '400', **(env or {})})
    if check:
        assert out.returncode == 0, out.stderr
    return out


def assert_safe(text):
    raw = [c for c in text if (ord(c) < 32 and c != '\n') or 0x7f <= ord(c) < 0xa0
           or c == '\u202e']
    assert not raw, f'raw control characters reached the terminal: {raw!r}'


@pytest.fixture
def hostile(db_url):
    with Connection(db_url) as conn:
        producer = conn.Producer()
        for queue in (MARKUP_QUEUE, RENDERED_QUEUE, ESCAPE_QUEUE):
            producer.publish({'prompt': 'hi'}, routing_key=queue, declare=[Queue(queue)],
                             headers={'task': TASK, 'id': TASK_ID, 'x-client': CLIENT})
            producer.publish({'prompt': 'hi'}, routing_key=queue, declare=[Queue(queue)],
                             headers={'task': TASK, 'id': TASK_ID, 'x-client': CLIENT})
        channel = conn.default_channel
        for queue in (MARKUP_QUEUE, ESCAPE_QUEUE):
            channel.basic_get(queue).reject()  # a dead letter in a hostile queue
    return db_url


@pytest.mark.parametrize('command', [
    ['stats', '{url}'],
    ['peek', '{url}', MARKUP_QUEUE],
    ['peek', '{url}', RENDERED_QUEUE],
    ['peek', '{url}', ESCAPE_QUEUE],
    ['dlq', 'list', '{url}'],
], ids=['stats', 'peek-markup', 'peek-rendered', 'peek-escape', 'dlq-list'])
def test_producer_text_is_shown_literally_and_safely(hostile, command):
    out = cli(*[a.format(url=hostile) for a in command])
    assert_safe(out.stdout + out.stderr)
    # how each must appear: literally, control characters as visible escapes
    queue, task_id, client = MARKUP_QUEUE, '\\x1b]0;owned\\x07\\x1b[31mred', 'bob\\u202egnp.exe'
    shown = {
        'stats': [queue, '[b]bold[/b] :smile:', 'evil\\x1b[2J'],
        'peek': [TASK, task_id, client],
        'dlq': [queue, 'evil\\x1b[2J', TASK, task_id],
    }[command[0]]
    for text in shown:
        assert text in out.stdout, f'{text!r} not shown literally in\n{out.stdout}'
    assert '😄' not in out.stdout


def test_json_output_keeps_the_exact_strings(hostile):
    stats = json.loads(cli('stats', hostile, '--json').stdout)
    assert {MARKUP_QUEUE, RENDERED_QUEUE, ESCAPE_QUEUE} <= set(stats)
    peek = json.loads(cli('peek', hostile, ESCAPE_QUEUE, '--json').stdout)
    assert peek[0]['task_id'] == TASK_ID and peek[0]['client'] == CLIENT


def test_commands_that_echo_a_queue_name_escape_it(hostile):
    out = cli('purge', hostile, ESCAPE_QUEUE)
    assert_safe(out.stdout + out.stderr)
    assert 'evil\\x1b[2J' in out.stdout
    missing = cli('peek', hostile, 'no\x1b]0;x\x07pe', check=False)
    assert missing.returncode == 1
    assert_safe(missing.stdout + missing.stderr)


def test_exporter_labels_are_escaped(hostile, procs):
    exporter, scrape = start_exporter(procs, hostile)
    text = scrape()
    assert_safe(text)
    assert f'kombu_sqlite_ready{{priority="0",queue="{MARKUP_QUEUE}"}} 1.0' in text
    assert 'kombu_sqlite_dead{queue="evil\\\\x1b[2J"} 1.0' in text
    assert exporter.poll() is None
    assert_safe(procs.log(exporter))


def test_url_from_the_environment(hostile, tmp_path):
    env = {'KOMBU_SQLITE_URL': hostile}
    assert MARKUP_QUEUE in json.loads(cli('stats', '--json', env=env).stdout)
    assert json.loads(cli('peek', MARKUP_QUEUE, '--json', env=env).stdout)[0]['task'] == TASK
    assert len(json.loads(cli('dlq', 'list', '--json', env=env).stdout)) == 2
    assert len(json.loads(cli('dlq', 'list', ESCAPE_QUEUE, '--json', env=env).stdout)) == 1
    assert 'quick_check: ok' in cli('maintain', env=env).stdout
    assert 'backup written' in cli('backup', str(tmp_path / 'copy.db'), env=env).stdout
    # A URL given on the command line wins over the environment.
    other = f'sqlite:///{tmp_path}/other.db'
    with Connection(other) as conn:
        conn.SimpleQueue('elsewhere').put('x')
    assert set(json.loads(cli('stats', other, '--json', env=env).stdout)) == {'elsewhere'}
    assert json.loads(cli('peek', other, 'elsewhere', '--json', env=env).stdout)
    assert json.loads(cli('dlq', 'list', other, '--json', env=env).stdout) == []


@pytest.mark.parametrize('command', [['stats'], ['peek', 'work'], ['maintain'],
                                     ['dlq', 'list'], ['metrics']])
def test_no_url_anywhere_names_both_places(command):
    env = {k: v for k, v in os.environ.items() if k != 'KOMBU_SQLITE_URL'}
    out = subprocess.run([sys.executable, '-m', 'kombu_sqlite.cli', *command],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0
    assert out.stderr.count('\n') == 1, out.stderr
    assert 'URL' in out.stderr and 'KOMBU_SQLITE_URL' in out.stderr, out.stderr
