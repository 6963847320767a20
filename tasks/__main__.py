"""Command line: ``python -m tasks workers | submit | maintain | report | demo``,
and the people's side from :mod:`tasks.people_commands`: ``users | cancel | status |
queue | flower | stats``."""
from __future__ import annotations

import importlib
import json
import sys

import click

import tasks
from tasks.config import ConfigError
from tasks.people_commands import COMMANDS


class _Commands(click.Group):
    def invoke(self, ctx):
        # The configuration is read on first use, inside a command: a bad file
        # is one line naming the key and the file, exit status 1.
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Commands, help='Ollama inference for an organisation, by role priority, with a ledger. '
                  'Configuration: the TOML file in $TASKS_CONFIG.')
def cli():
    pass


@cli.command(help='Start one Celery worker per model (-Q <model queue> -c <slots>) and a '
                  'maintenance worker with beat, restart any that dies or wedges; '
                  'Ctrl-C or SIGTERM stops them warm ([supervisor] in the config).')
@click.option('--loglevel', '-l', default='info', show_default=True)
@click.option('--no-beat', is_flag=True, help='Do not start the maintenance worker and beat.')
@click.option('--model', 'models', multiple=True, help='Only this model (repeatable).')
def workers(loglevel, no_beat, models):
    from .supervisor import run
    sys.exit(run(tasks.current(), loglevel=loglevel, beat=not no_beat,
                 models=set(models) or None, echo=click.echo))


@cli.command(help='Submit one request and print its task id.')
@click.argument('user_id')
@click.argument('role')
@click.argument('request_type')
@click.option('--text', default='', help="payload['text']")
@click.option('--payload', 'payload_json', help='the whole payload as JSON')
@click.option('--model', default=None)
@click.option('--wait', type=float, default=None, help='wait this long for the answer')
def submit(user_id, role, request_type, text, payload_json, model, wait):
    payload = json.loads(payload_json) if payload_json else {'text': text}
    try:
        result = tasks.submit(user_id, role, request_type, payload, model=model)
    except ConfigError:
        raise
    except (ValueError, PermissionError, tasks.Overloaded, tasks.ResourceLimitExceeded) as exc:
        raise click.ClickException(f'{type(exc).__name__}: {exc}') from None
    click.echo(result.id)
    if wait:
        click.echo(json.dumps(result.get(timeout=wait), indent=2))


@cli.command(help='Purge expired responses and expire stale requests (beat runs it too).')
def maintain():
    from .maintenance import run
    click.echo(json.dumps(run(tasks.current())))


@cli.command(help='Waits by role, processing rate, model utilisation, peaks, queue depth.')
@click.option('--since', default='24h', show_default=True,
              help='e.g. 24h, 7d or 2025-01-31T09:00 (UTC)')
@click.option('--json', 'as_json', is_flag=True, help='machine-readable output')
def report(since, as_json):
    from . import report as report_mod
    from .admission import queue_depth
    cfg = tasks.current()
    try:
        start = report_mod.parse_since(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint='--since') from None
    depths = {}
    for m in cfg.models.values():
        try:
            depths[m.queue] = queue_depth(m.queue)
        except Exception as exc:  # the ledger part is still worth printing
            click.echo(f'queue depth of {m.queue} unavailable: {exc}', err=True)
    data = report_mod.build(cfg, start, depths=depths)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        report_mod.render(data)


@cli.command(context_settings={'ignore_unknown_options': True, 'allow_extra_args': True,
                               'help_option_names': []},  # --help is the demo's own
             help='Replay a demand spike against the simulator and watch it (tasks.demo).')
@click.pass_context
def demo(ctx):
    module = importlib.import_module('tasks.demo')  # imported only for this command
    sys.exit(module.main(ctx.args))


for command in COMMANDS:
    cli.add_command(command)


if __name__ == '__main__':
    cli(prog_name='python -m tasks')
