"""``kombu-sqlite``: see and fix a queue database without opening SQLite by hand.

Tables for people (rich), ``--json`` for programs.  Errors are one line on
stderr and exit status 1.
"""
from __future__ import annotations

import functools
import json
import sqlite3
import sys
import time

import click
from rich.console import Console
from rich.table import Table

from .broker import Broker
from .errors import DatabaseError

console = Console()


def fail(message: str):
    click.echo(f'kombu-sqlite: error: {message}', err=True)
    sys.exit(1)


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
    """Inspect and operate a kombu-sqlite queue database (URL: sqlite:///path.db or a path)."""


@main.command()
@click.argument('url')
@click.option('--json', 'as_json', is_flag=True, help='Machine-readable output.')
@friendly
def stats(url, as_json):
    """Per queue: ready by priority, delayed, leased (by whom), dead, oldest age, last minute."""
    with open_broker(url, read_only=True) as broker:
        data = broker.stats()
    if as_json:
        return emit_json(data)
    table = Table(title=f'queues in {url}')
    for column in ('queue', 'ready', 'by priority', 'delayed', 'leased', 'leased by',
                   'dead', 'oldest ready', 'published/min', 'acked/min'):
        table.add_column(column, justify='left' if column in ('queue', 'by priority',
                                                              'leased by') else 'right')
    for queue, q in data.items():
        table.add_row(
            queue, str(q['ready']),
            ' '.join(f'{p}:{n}' for p, n in sorted(q['ready_by_priority'].items())) or '-',
            str(q['delayed']), str(q['leased']),
            '\n'.join(f'{owner} ({n})' for owner, n in q['leased_by'].items()) or '-',
            str(q['dead']), _age(q['oldest_ready_age']),
            str(q['last_minute']['published']), str(q['last_minute']['acked']))
    console.print(table)


@main.command()
@click.argument('url')
@click.argument('queue')
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
    table = Table(title=f'next in {queue}')
    columns = ['#', 'task', 'task id', 'priority', 'client', 'age', 'deliveries']
    for column in columns + (['body'] if body else []):
        table.add_column(column)
    for i, m in enumerate(items, 1):
        row = [str(i), m['task'] or '-', m['task_id'] or '-', str(m['priority']),
               m['client'] or '-', _age(m['age']), str(m['delivery_count'])]
        table.add_row(*row + ([str(m['body'])[:200]] if body else []))
    console.print(table)


@main.group()
def dlq():
    """Dead letters: list, requeue, purge."""


@dlq.command('list')
@click.argument('url')
@click.argument('queue', required=False)
@click.option('--json', 'as_json', is_flag=True, help='Machine-readable output.')
@friendly
def dlq_list(url, queue, as_json):
    """Dead letters, oldest first, of QUEUE or of every queue."""
    with open_broker(url) as broker:
        if queue:
            broker.require_queue(queue)
        items = broker.dead_letters(queue)
    if as_json:
        return emit_json(items)
    table = Table(title='dead letters')
    for column in ('id', 'queue', 'task', 'task id', 'priority', 'deliveries', 'reason', 'dead since'):
        table.add_column(column)
    now = time.time()
    for d in items:
        table.add_row(str(d['id']), d['queue'], d['task'] or '-', d['task_id'] or '-',
                      str(d['priority']), str(d['delivery_count']), d['reason'],
                      _age(now - d['dead_at']))
    console.print(table)


@dlq.command('requeue')
@click.argument('url')
@click.argument('queue', required=False)
@friendly
def dlq_requeue(url, queue):
    """Put dead letters back on their queue with a fresh delivery count."""
    with open_broker(url) as broker:
        if queue:
            broker.require_queue(queue)
        click.echo(f'requeued {broker.requeue_dead(queue)} dead letters')


@dlq.command('purge')
@click.argument('url')
@click.argument('queue', required=False)
@friendly
def dlq_purge(url, queue):
    """Delete dead letters for good."""
    with open_broker(url) as broker:
        if queue:
            broker.require_queue(queue)
        click.echo(f'purged {broker.purge_dead(queue)} dead letters')


@main.command()
@click.argument('url')
@click.argument('queue')
@friendly
def purge(url, queue):
    """Delete the ready messages of QUEUE (messages being worked on finish)."""
    with open_broker(url) as broker:
        broker.require_queue(queue)
        click.echo(f'purged {broker.purge(queue)} messages from {queue}')


@main.command()
@click.argument('url')
@click.option('--json', 'as_json', is_flag=True, help='Machine-readable output.')
@friendly
def maintain(url, as_json):
    """Sweep, checkpoint, vacuum, check and optimize; safe while workers run."""
    from .maintenance import maintain as run
    with open_broker(url) as broker:
        done = run(broker)
    if as_json:
        return emit_json(done)
    sweep, ckpt, vac = done['sweep'], done['checkpoint'], done['incremental_vacuum']
    click.echo(f"swept: {sweep['leases_expired']} expired leases, "
               f"{sweep['messages_expired']} expired messages, "
               f"{len(sweep['queues_expired'])} expired queues")
    click.echo(f"wal checkpoint (truncate): {ckpt['checkpointed']} pages"
               + (' (busy: readers active, try again later)' if ckpt['busy'] else ''))
    click.echo(f"incremental vacuum: {vac['pages_freed']} pages freed "
               f"(auto_vacuum={vac['auto_vacuum']})")
    click.echo(f"quick_check: {done['quick_check']}")
    click.echo('optimize: ok')
    if done['quick_check'] != 'ok':
        sys.exit(2)


@main.command()
@click.argument('url')
@click.argument('dest')
@friendly
def backup(url, dest):
    """Consistent copy of the database to DEST while workers run."""
    from .maintenance import backup as run
    with open_broker(url) as broker:
        done = run(broker, dest)
    click.echo(f"backup written to {done['destination']} "
               f"({done['bytes']} bytes in {done['seconds']} s)")


@main.command()
@click.argument('url')
@click.option('--port', default=9808, show_default=True)
@click.option('--address', default='127.0.0.1', show_default=True)
@friendly
def metrics(url, port, address):
    """Serve Prometheus metrics at http://ADDRESS:PORT/metrics."""
    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    from .metrics import QueueCollector
    broker = open_broker(url)
    broker.stats()  # fail now, not at the first scrape
    REGISTRY.register(QueueCollector(broker))
    start_http_server(port, addr=address)
    click.echo(f'serving metrics for {url} on http://{address}:{port}/metrics', err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


if __name__ == '__main__':
    main()
