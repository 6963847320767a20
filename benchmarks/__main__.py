"""python -m benchmarks: see docs/benchmarks.md."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import click

from . import brokers as brokers_mod
from . import celery_bench, kombu_bench, latency, machine, procs, report

DEFAULT_OUT = Path(__file__).resolve().parent / 'results.json'


def _log(message: str) -> None:
    report.console.print(f'[dim]{time.strftime("%H:%M:%S")}[/] {message}')


def _median(runs: list[dict]) -> dict:
    """The run with the median rate, plus every round's rate (others share the box)."""
    ranked = sorted(runs, key=lambda r: r['rate'])
    return dict(ranked[(len(ranked) - 1) // 2], round_rates=[r['rate'] for r in runs])


def run_main(brokers, opts) -> tuple[dict, list[str]]:
    runs = {b.name: {'publish': [], 'consume': [], 'celery': []} for b in brokers}
    errors, failed = [], set()
    # Rounds go across brokers, so a burst of load from elsewhere hits all alike.
    for round_no in range(1, opts['rounds'] + 1):
        for broker in (b for b in brokers if b.name not in failed):
            r = runs[broker.name]
            n, tasks = broker.counts(opts['messages']), broker.counts(opts['tasks'])
            try:
                _log(f'round {round_no}, {broker.name}: publish, then consume+ack, {n:,} messages')
                r['publish'].append(kombu_bench.publish(broker, 'bench.kombu', n))
                r['consume'].append(kombu_bench.consume(broker, 'bench.kombu', n, opts['prefetch']))
                _log(f'round {round_no}, {broker.name}: celery worker runs {tasks:,} tasks')
                r['celery'].append(celery_bench.measure(broker, tasks))
            except Exception as exc:  # noqa: BLE001  one failing broker must not hide the rest
                errors.append(f'{broker.name}: {type(exc).__name__}: {exc}')
                report.console.print(f'[red]{errors[-1]}[/]')
                failed.add(broker.name)
                continue
            _log(f'round {round_no}, {broker.name}: ' + ', '.join(
                f'{k} {v[-1]["rate"]:,.0f}/s' for k, v in r.items()))
    results = {name: {k: _median(v) for k, v in r.items() if v} for name, r in runs.items()}
    for broker in brokers:
        _log(f'{broker.name}: idle latency, {opts["samples"]} samples')
        try:
            lat = results[broker.name]['latency'] = latency.measure(
                broker, opts['samples'], idle_window=opts['idle'])
        except Exception as exc:  # noqa: BLE001
            errors.append(f'{broker.name} latency: {type(exc).__name__}: {exc}')
            report.console.print(f'[red]{errors[-1]}[/]')
            continue
        _log(f'{broker.name}: p50 {lat["p50_ms"]:.2f} ms, p99 {lat["p99_ms"]:.2f} ms, '
             f'idle CPU {lat["idle_cpu_pct"]:.2f}%')
    return results, errors


@click.command()
@click.option('--broker', 'names', multiple=True, type=click.Choice(brokers_mod.NAMES),
              help='Broker to measure (repeatable); all three by default.')
@click.option('--suite', type=click.Choice(['main', 'scale', 'all']), default='main',
              show_default=True, help='main: throughput and latency; scale: queue depth '
              'and many processes on one queue.')
@click.option('--messages', type=int, default=20_000, show_default=True,
              help='Messages for kombu publish and consume (sqla gets 5% of it).')
@click.option('--tasks', type=int, default=2_000, show_default=True,
              help='Tasks for the Celery end-to-end run (sqla gets 5% of it).')
@click.option('--samples', type=int, default=200, show_default=True,
              help='Latency samples, sent 20 ms apart.')
@click.option('--rounds', type=int, default=3, show_default=True,
              help='Throughput rounds per broker; the median is reported.')
@click.option('--prefetch', type=int, default=100, show_default=True)
@click.option('--quick', is_flag=True, help='Small counts and one round: a smoke run '
              '(main suite: under a minute); results go to results-quick.json.')
@click.option('--depths', default='1000,100000,1000000', show_default=True,
              help='scale suite: messages queued before measuring claim+ack.')
@click.option('--processes', type=int, default=8, show_default=True,
              help='scale suite: consumer processes sharing one queue.')
@click.option('--fill-budget', type=float, default=600, show_default=True,
              help='scale suite: seconds a fill may take; larger depths are skipped.')
@click.option('--transport-option', 'topts', multiple=True, metavar='KEY=JSON',
              help='Transport option for the sqlite broker, e.g. wakeup=\'"poll"\'.')
@click.option('--markdown', is_flag=True,
              help='Print the results file as Markdown tables and exit (measures nothing).')
@click.option('--out', type=click.Path(dir_okay=False, path_type=Path),
              help='Results JSON file  [default: benchmarks/results.json; '
              'benchmarks/results-quick.json with --quick]')
def main(names, suite, messages, tasks, samples, rounds, prefetch, quick, depths, processes,
         fill_budget, topts, markdown, out):
    """Measure kombu_sqlite against Redis and kombu's SQLAlchemy transport."""
    out = out or (DEFAULT_OUT.with_name('results-quick.json') if quick else DEFAULT_OUT)
    if markdown:
        from .markdown import render
        click.echo(render(json.loads(out.read_text())))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below
    if quick:
        messages, tasks, samples, rounds = min(messages, 2000), min(tasks, 200), min(samples, 50), 1
        depths = '1000,10000'
    opts = {'messages': messages, 'tasks': tasks, 'samples': samples, 'prefetch': prefetch,
            'rounds': max(1, rounds), 'idle': 1.0 if quick else 5.0, 'quick': quick,
            'depths': [int(d) for d in depths.split(',') if d], 'processes': processes,
            'per_process': 500 if quick else 5000, 'fill_budget': fill_budget,
            'claim_sample': 2000 if quick else 20_000}
    sqlite_options = {k: json.loads(v) for k, v in (t.split('=', 1) for t in topts)}
    info = machine.describe()
    info['loadavg_at_start'] = os.getloadavg()  # other work on the box skews every figure
    _log(f'{info["cpu"]}, {info["nproc"]} CPUs, Python {info["python"]}, '
         f'kombu {info["kombu"]}, SQLite {info["sqlite"]}')
    failed = False
    with tempfile.TemporaryDirectory(prefix='kombu-sqlite-bench-') as tmp, \
            contextlib.ExitStack() as stack:
        stack.callback(procs.stop_all)
        brokers, notes = brokers_mod.setup(names or brokers_mod.NAMES, Path(tmp), stack,
                                           sqlite_options)
        for note in notes:
            report.console.print(f'[yellow]note:[/] {note}')
        config = {k: v for k, v in opts.items()}
        config['brokers'] = {b.name: {'url': b.url.replace(tmp, '<tmpdir>'),
                                      'transport_options': b.transport_options,
                                      'share_of_counts': b.scale} for b in brokers}
        if suite in ('main', 'all'):
            results, errors = run_main(brokers, opts)
            ratio = report.ratios(results)
            rows = report.targets(results, ratio)
            report.print_main(results, ratio, rows)
            info['loadavg_at_end'] = os.getloadavg()
            report.save(out, 'main', {'machine': info, 'config': config, 'notes': notes,
                                      'errors': errors, 'results': results, 'ratios': ratio,
                                      'targets': rows})
            failed = bool(errors) or any(row['pass'] is False for row in rows)
        if suite in ('scale', 'all'):
            from . import scale
            results = scale.run(brokers, opts, _log)
            rows = report.scale_targets(results)
            report.print_scale(results)
            report.print_targets(rows, 'Targets of the scale suite')
            info['loadavg_at_end'] = os.getloadavg()
            report.save(out, 'scale', {'machine': info, 'config': config, 'notes': notes,
                                       'results': results, 'targets': rows})
            failed = failed or any(row['pass'] is False for row in rows)
    report.console.print(f'results written to {out}')
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
