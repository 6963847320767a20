"""``python -m tasks users | cancel | status | queue | flower | stats``.

Errors an operator can fix (unknown user, request or model, a refused
cancel, a missing password) are one line on stderr and exit status 1.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import click

import tasks

from . import directory, queue_status


def _one_line(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, PermissionError) as exc:
            raise click.ClickException(str(exc)) from None
        except KeyError as exc:
            raise click.ClickException(exc.args[0]) from None
    return wrapper


def _emit(data):
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(help='The user directory: the role each user may ask in (the ledger table '
                  'tasks_user wins over [users] in the TOML).')
def users():
    pass


@users.command('set', help='Give USER the role ROLE (they may ask at it or any lower one).')
@click.argument('user')
@click.argument('role')
@_one_line
def users_set(user, role):
    directory.set_role(tasks.current(), user, role)
    click.echo(f'{user}: {role}')


@users.command('remove', help="Remove USER from the ledger's table ([users] in the TOML "
                              'and [access] default_role then apply).')
@click.argument('user')
@_one_line
def users_remove(user):
    cfg = tasks.current()
    if not directory.remove(cfg, user):
        raise click.ClickException(f'user {user!r} is not in the ledger table tasks_user')
    entry = directory.allowed(cfg, user)
    now = f'now {entry.role} ({entry.source})' if entry.role else 'now refused'
    click.echo(f'{user}: removed; {now}')


@users.command('list', help='Users and their roles, with where each role comes from.')
@click.option('--json', 'as_json', is_flag=True)
@_one_line
def users_list(as_json):
    cfg = tasks.current()
    rows = [{'user': e.user_id, 'role': e.role, 'source': e.source}
            for e in directory.entries(cfg)]
    access = {'default_role': cfg.default_role, 'unknown_users': cfg.unknown_users}
    if as_json:
        return _emit({'users': rows, 'access': access})
    for r in rows:
        click.echo(f'{r["user"]}\t{r["role"]}\t({r["source"]})')
    other = ('refused' if cfg.unknown_users == 'refuse'
             else f'{cfg.default_role} ([access] default_role)')
    click.echo(f'anyone else: {other}')


@click.command(help='Cancel a queued or running request (as the operator, or --by USER).')
@click.argument('task_id')
@click.option('--by', 'by_user', default=None,
              help='act as this user (default: the operator, with system rights)')
@click.option('--json', 'as_json', is_flag=True)
@_one_line
def cancel(task_id, by_user, as_json):
    outcome = tasks.cancel(task_id, by_user=by_user)
    if as_json:
        _emit(outcome.as_dict())
    else:
        click.echo(outcome.message)
    if outcome.status is None:
        sys.exit(1)


@click.command(help='State of a request; queued: position and estimated start; running: '
                    'worker and run time.')
@click.argument('task_id')
@click.option('--json', 'as_json', is_flag=True)
@_one_line
def status(task_id, as_json):
    st = tasks.status(task_id)
    click.echo(json.dumps(st, indent=2, default=str) if as_json else queue_status.describe(st))


@click.command(help='Queued requests in serving order, with user, role, type, age, position.')
@click.option('--model', default=None, help='only this model')
@click.option('--json', 'as_json', is_flag=True)
@_one_line
def queue(model, as_json):
    rows = queue_status.waiting(model)
    if as_json:
        return _emit(rows)
    from rich.console import Console
    from rich.table import Table
    table = Table(title='Waiting requests')
    for col in ('model', 'pos', 'user', 'role', 'type', 'age', 'start in', 'task id'):
        table.add_column(col, justify='right' if col in ('pos', 'age', 'start in') else 'left')
    for r in rows:
        table.add_row(r['model'], str(r['position'] or '-'), r['user'], r['role'],
                      r['request_type'], f'{r["age_s"]:.0f}s',
                      '-' if r['estimated_start_s'] is None
                      else f'~{r["estimated_start_s"]:.0f}s', r['task_id'])
    Console().print(table)
    for basis in sorted({r['position_basis'] for r in rows}):
        click.echo(f'positions: {basis}')


@click.command(help='Start Flower with basic auth (user ops, password from $FLOWER_PASSWORD) '
                    'and columns that show who asked, not what.')
@click.option('--address', default='127.0.0.1', show_default=True)
@click.option('--port', default=5555, show_default=True)
@click.option('--user', default='ops', show_default=True)
@_one_line
def flower(address, port, user):
    from .flower_view import command
    tasks.current()  # a bad configuration stops here, in one line
    argv, env = command(address, port, user)
    os.execve(argv[0], argv, env)


@click.command(help='Broker stats of the configured broker (kombu_sqlite: per queue ready '
                    'by priority, leased, delayed, dead; others: ready per model queue).')
@click.option('--json', 'as_json', is_flag=True)
@_one_line
def stats(as_json):
    from .app import broker_kind
    cfg = tasks.current()
    if broker_kind(cfg.broker_url) == 'sqlite':
        import kombu_sqlite
        try:
            broker = kombu_sqlite.Broker(cfg.broker_url, create=False)
        except FileNotFoundError:
            raise ValueError(f'no broker database yet at {cfg.broker_url} '
                             f'(it is created when the first worker or submit runs)')
        with broker:
            data = broker.stats()
    else:
        from .admission import queue_depth
        data = {m.queue: {'ready': queue_depth(m.queue)} for m in cfg.models.values()}
    if as_json:
        return _emit(data)
    click.echo(f'broker {cfg.broker_url} at {time.strftime("%H:%M:%S")}')
    for queue_name, q in data.items():
        extra = ''.join(f', {k} {q[k]}' for k in ('leased', 'delayed', 'dead') if k in q)
        by_priority = q.get('ready_by_priority')
        click.echo(f'  {queue_name}: ready {q["ready"]}'
                   + (f' (by priority {by_priority})' if by_priority else '') + extra)


COMMANDS = (users, cancel, status, queue, flower, stats)
