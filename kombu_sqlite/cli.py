"""``kombu-sqlite``: see and fix a queue database without opening SQLite by hand.

Tables for people (rich), ``--json`` for programs.  Errors are one line on
stderr and exit status 1.  The broker URL is the first argument, or
``$KOMBU_SQLITE_URL`` when it is left out.  Every string that a producer chose
(queue names, task names and ids, clients, reasons) reaches the terminal as
rich ``Text`` through :func:`printable`: shown literally, never as markup, with
control characters escaped.
"""
from __future__ import annotations

import functools
import json
import os
import sqlite3
import sys
import time

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .broker import Broker
from .errors import DatabaseError
from .printable import printable

URL_VARIABLE = 'KOMBU_SQLITE_URL'

console = Console()


def fail(message: str):
    click.echo(f'kombu-sqlite: error: {printable(message)}', err=True)
    sys.exit(1)


def text(value) -> Text:
    """A table cell or title that rich shows as it is: no markup, no emoji codes."""
    return Text('-' if value is None or value == '' else printable(value))


def with_url(*names):
    """Positional arguments ``[URL] NAME...``; the URL defaults to $KOMBU_SQLITE_URL.

    ``names`` are the command's own arguments, optional ones in brackets.  With
    the variable set, a first argument is still taken as the URL when all the
    others are there too or when it starts with ``sqlite:``.
    """
    required = sum(not n.startswith('[') for n in names)
    params = [n.strip('[]').lower() for n in names]

    def decorate(command):
        @functools.wraps(command)
        def wrapper(args, **kwargs):
            url, values = _split_url(list(args), required, len(names))
            if len(values) < required:
                fail(f'missing argument {names[len(values)]}')
            kwargs.update(zip(params, values + [None] * (len(names) - len(values))))
            return command(url, **kwargs)
        metavar = ' '.join(['[URL]', *names])
        return click.argument('args', nargs=-1, metavar=metavar)(wrapper)
    return decorate


def _split_url(args, required, total):
    if len(args) > total + 1:
        fail(f'too many arguments: {" ".join(map(repr, args))}')
    from_env = os.environ.get(URL_VARIABLE) or None
    given = args and (len(args) == total + 1 or from_env is None
                      or args[0].startswith('sqlite:'))
    if given and len(args) > required:
        return args[0], args[1:]
    if from_env is None:
        fail(f'no broker URL: give it as the first argument or set ${URL_VARIABLE}')
    return from_env, args


def friendly(command):
    """Turn the errors an operator can fix into one clear line."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FileNotFoundError as exc:
            fail(str(exc))
        except KeyError as exc:
            fail(exc.args[0])
        except (DatabaseError, ValueError) as exc:
            fail(str(exc))
        except sqlite3.Error as exc:
            fail(f'SQLite: {exc}')
        except OSError as exc:  # the backup's directory: permissions, space
            fail(f'{exc.filename}: {exc.strerror}' if exc.filename else str(exc))
    return wrapper


def open_broker(url: str, read_only: bool = False) -> Broker:
    return Broker(url, create=False, read_only=read_only)


def emit_json(data):
    click.echo(json.dumps(data, indent=2, default=str))


def _age(seconds):
    if seconds is None:
        return '-'
    return f'{seconds:.1f}s' if seconds < 120 else f'{seconds / 60:.1f}m'


@click.group(context_settings={'help_option_names': ['-h', '--help']})
def main():
    """Inspect and operate a kombu-sqlite queue database.

    URL is sqlite:///path.db or a path; leave it out to use $KOMBU_SQLITE_URL.
    """


@main.command()
@with_url()
@click.option('--json', 'as_json', is_flag=True, help='Machine-readable output.')
@friendly
def stats(url, as_json):
    """Per queue: ready by priority, delayed, leased (by whom), dead, oldest age, last minute."""
    with open_broker(url, read_only=True) as broker:
        data = broker.stats()
    if as_json:
        return emit_json(data)
    table = Table(title=text(f'queues in {url}'))
    for column in ('queue', 'ready', 'by priority', 'delayed', 'leased', 'leased by',
                   'dead', 'oldest ready', 'published/min', 'acked/min'):
        table.add_column(column, justify='left' if column in ('queue', 'by priority',
                                                              'leased by') else 'right')
    for queue, q in data.items():
        table.add_row(
            text(queue), str(q['ready']),
            ' '.join(f'{p}:{n}' for p, n in sorted(q['ready_by_priority'].items())) or '-',
            str(q['delayed']), str(q['leased']),
            Text('\n').join(text(f'{owner} ({n})') for owner, n in q['leased_by'].items())
            or '-',
            str(q['dead']), _age(q['oldest_ready_age']),
            str(q['last_minute']['published']), str(q['last_minute']['acked']))
    console.print(table)


@main.command()
@with_url('QUEUE')
@click.option('-n', 'count', default=10, show_default=True, help='How many messages.')
@click.option('--body', is_flag=True, help='Show message bodies (they may hold prompts).')
@click.option('--json', 'as_json', is_flag=True, help='Machine-readable output.')
@friendly
def peek(url, queue, count, body, as_json):
    """The next messages of QUEUE in delivery order, without taking them."""
    with open_broker(url, read_only=True) as broker:
        broker.require_queue(queue)
        items = broker.peek(queue, count, body=body)
    if as_json:
        return emit_json(items)
    table = Table(title=text(f'next in {queue}'))
    columns = ['#', 'task', 'task id', 'priority', 'client', 'age', 'deliveries']
    for column in columns + (['body'] if body else []):
        table.add_column(column, overflow='fold' if column == 'task id' else 'ellipsis')
    for i, m in enumerate(items, 1):
        row = [str(i), text(m['task']), text(m['task_id']), str(m['priority']),
               text(m['client']), _age(m['age']), str(m['delivery_count'])]
        table.add_row(*row + ([text(str(m['body'])[:200])] if body else []))
    console.print(table)


@main.group()
def dlq():
    """Dead letters: list, requeue, purge."""


@dlq.command('list')
@with_url('[QUEUE]')
@click.option('--json', 'as_json', is_flag=True, help='Machine-readable output.')
@friendly
def dlq_list(url, queue, as_json):
    """Dead letters, oldest first, of QUEUE or of every queue."""
    with open_broker(url, read_only=True) as broker:
        if queue:
            broker.require_queue(queue)
        items = broker.dead_letters(queue)
    if as_json:
        return emit_json(items)
    table = Table(title='dead letters')
    for column in ('id', 'queue', 'task', 'task id', 'priority', 'deliveries', 'reason', 'dead since'):
        table.add_column(column, overflow='fold' if column == 'task id' else 'ellipsis')
    now = time.time()
    for d in items:
        table.add_row(str(d['id']), text(d['queue']), text(d['task']), text(d['task_id']),
                      str(d['priority']), str(d['delivery_count']), text(d['reason']),
                      _age(now - d['dead_at']))
    console.print(table)


@dlq.command('requeue')
@with_url('[QUEUE]')
@friendly
def dlq_requeue(url, queue):
    """Put dead letters back on their queue with a fresh delivery count."""
    with open_broker(url) as broker:
        if queue:
            broker.require_queue(queue)
        click.echo(f'requeued {broker.requeue_dead(queue)} dead letters')


@dlq.command('purge')
@with_url('[QUEUE]')
@friendly
def dlq_purge(url, queue):
    """Delete dead letters for good."""
    with open_broker(url) as broker:
        if queue:
            broker.require_queue(queue)
        click.echo(f'purged {broker.purge_dead(queue)} dead letters')


@main.command()
@with_url('QUEUE')
@friendly
def purge(url, queue):
    """Delete the ready messages of QUEUE (messages being worked on finish)."""
    with open_broker(url) as broker:
        broker.require_queue(queue)
        click.echo(f'purged {broker.purge(queue)} messages from {printable(queue)}')


@main.command()
@with_url()
@click.option('--json', 'as_json', is_flag=True, help='Machine-readable output.')
@friendly
def maintain(url, as_json):
    """Sweep, give free pages back, checkpoint, check and optimize.

    Safe while workers run: no step holds them up for more than a moment; what
    could not be done now is reported and left to the next run.
    """
    from .maintenance import maintain as run
    with open_broker(url) as broker:
        done = run(broker)
    if as_json:
        emit_json(done)
    else:
        _report_maintenance(done)
    if done['quick_check'] != 'ok':
        sys.exit(2)


def _report_maintenance(done):
    sweep, vac, ckpt = done['sweep'], done['incremental_vacuum'], done['checkpoint']
    click.echo(f"swept: {sweep['leases_expired']} expired leases, "
               f"{sweep['messages_expired']} expired messages, "
               f"{len(sweep['queues_expired'])} expired queues")
    click.echo(f"incremental vacuum: {vac['pages_freed']} pages freed, "
               f"{vac['pages_left']} left (auto_vacuum={vac['auto_vacuum']})"
               + (f"; not done: {vac['not_done']}" if vac['not_done'] else ''))
    click.echo(f"wal checkpoint: {ckpt['checkpointed']} of {ckpt['wal_frames']} frames"
               + (', truncated' if ckpt['complete'] else f"; not done: {ckpt['not_done']}"))
    click.echo(f"quick_check: {printable(done['quick_check'])}")
    click.echo(f"optimize: {done['optimize']}")


@main.command()
@with_url('DEST')
@friendly
def backup(url, dest):
    """Consistent, verified copy of the database to DEST while workers run."""
    from .maintenance import backup as run
    with open_broker(url, read_only=True) as broker:
        done = run(broker, dest)
    click.echo(f"backup written to {printable(done['destination'])} "
               f"({done['bytes']} bytes in {done['seconds']} s, "
               f"integrity_check {done['integrity_check']})")


@main.command()
@with_url()
@click.option('--port', default=9808, show_default=True)
@click.option('--address', default='127.0.0.1', show_default=True)
@friendly
def metrics(url, port, address):
    """Serve Prometheus metrics at http://ADDRESS:PORT/metrics."""
    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    from .metrics import QueueCollector
    with open_broker(url, read_only=True) as broker:
        broker.stats()  # fail now, not at the first scrape
    REGISTRY.register(QueueCollector(lambda: open_broker(url, read_only=True)))
    start_http_server(port, addr=address)
    click.echo(f'serving metrics for {printable(url)} on http://{address}:{port}/metrics',
               err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


if __name__ == '__main__':
    main()
