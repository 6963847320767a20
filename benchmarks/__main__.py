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


def _missed(rows: list[dict], quick: bool) -> bool:
    """A target missed; a quick run's counts are too small to judge speed, only correctness."""
    return any(row['pass'] is False and not (quick and row.get('speed', True)) for row in rows)


def run_main(brokers, opts) -> tuple[dict, list[str]]:
    """Every broker on the same counts: opts['messages'] messages, opts['tasks'] tasks."""
    runs = {b.name: {m: [] for m, _ in report.THROUGHPUT} for b in brokers}
    errors, failed = [], set()
    n, tasks = opts['messages'], opts['tasks']
    # Rounds go across brokers, so a burst of load from elsewhere hits all alike.
    for round_no in range(1, opts['rounds'] + 1):
        for broker in (b for b in brokers if b.name not in failed):
            r = runs[broker.name]
            try:
                _log(f'round {round_no}, {broker.name}: publish, then consume+ack, {n:,} messages')
                r['publish'].append(kombu_bench.publish(broker, 'bench.kombu', n))
                r['consume'].append(kombu_bench.consume(broker, 'bench.kombu', n, opts['prefetch']))
                if broker.name == 'sqlite' and opts['unbatched_acks']:
                    unbatched = broker.with_options(batch_acks=False)
                    _log(f'round {round_no}, sqlite: again with batch_acks=false')
                    kombu_bench.publish(unbatched, 'bench.kombu', n)
                    r['consume_unbatched'].append(
                        kombu_bench.consume(unbatched, 'bench.kombu', n, opts['prefetch']))
                for metric, (pool, concurrency) in celery_bench.POOLS.items():
                    _log(f'round {round_no}, {broker.name}: celery worker, {pool} -c '
                         f'{concurrency}, runs {tasks:,} tasks')
                    r[metric].append(celery_bench.measure(broker, tasks, pool, concurrency))
            except Exception as exc:  # noqa: BLE001  one failing broker must not hide the rest
                errors.append(f'{broker.name}: {type(exc).__name__}: {exc}')
                report.console.print(f'[red]{errors[-1]}[/]')
                failed.add(broker.name)
                continue
            _log(f'round {round_no}, {broker.name}: ' + ', '.join(
                f'{k} {v[-1]["rate"]:,.0f}/s' for k, v in r.items() if v))
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
@click.option('--suite', type=click.Choice(['main', 'scale', 'all']),
              help='main: throughput and latency; scale: queue depth and many processes '
              'on one queue  [default: main; all with --quick]')
@click.option('--messages', type=int, default=20_000, show_default=True,
              help='Messages for kombu publish and consume, the same for every broker.')
@click.option('--tasks', type=int, default=2_000, show_default=True,
              help='Tasks for each Celery end-to-end run, the same for every broker.')
@click.option('--samples', type=int, default=200, show_default=True,
              help='Latency samples, sent 20 ms apart.')
@click.option('--rounds', type=int, default=3, show_default=True,
              help='Throughput rounds per broker; the median is reported.')
@click.option('--prefetch', type=int, default=100, show_default=True)
@click.option('--quick', is_flag=True, help='Both suites with small counts and one round: '
              'a smoke run of every measurement (about a minute); '
              'results go to results-quick.json.')
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
    suite = suite or ('all' if quick else 'main')
    if quick:
        messages, tasks, samples, rounds = min(messages, 500), min(tasks, 60), min(samples, 20), 1
        depths, processes, fill_budget = '500', min(processes, 2), min(fill_budget, 10)
    opts = {'messages': messages, 'tasks': tasks, 'samples': samples, 'prefetch': prefetch,
            'rounds': max(1, rounds), 'idle': 1.0 if quick else 5.0, 'quick': quick,
            'depths': [int(d) for d in depths.split(',') if d], 'processes': processes,
            'per_process': 100 if quick else 5000, 'fill_budget': fill_budget,
            'claim_sample': 500 if quick else 20_000}
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
        sqlite = next((b for b in brokers if b.name == 'sqlite'), None)
        opts['unbatched_acks'] = bool(
            sqlite and sqlite.transport_options.get('batch_acks', True) is not False
            and brokers_mod.acks_unbatched(sqlite.fresh('probe').url))
        if sqlite and not opts['unbatched_acks']:
            notes.append('sqlite consume+ack with batch_acks=false not measured: this '
                         'kombu_sqlite does not write each ack at once with that option')
        for note in notes:
            report.console.print(f'[yellow]note:[/] {note}')
        config = {k: v for k, v in opts.items()}
        config['brokers'] = {b.name: {'url': b.url.replace(tmp, '<tmpdir>'),
                                      'transport_options': b.transport_options}
                             for b in brokers}
        if suite in ('main', 'all'):
            results, errors = run_main(brokers, opts)
            ratio = report.ratios(results)
            rows = report.targets(results, ratio)
            report.print_main(results, ratio, rows)
            info['loadavg_at_end'] = os.getloadavg()
            report.save(out, 'main', {'machine': info, 'config': config, 'notes': notes,
                                      'errors': errors, 'results': results, 'ratios': ratio,
                                      'targets': rows})
            failed = bool(errors) or _missed(rows, quick)
        if suite in ('scale', 'all'):
            from . import scale
            results = scale.run(brokers, opts, _log)
            rows = report.scale_targets(results)
            report.print_scale(results)
            report.print_targets(rows, 'Targets of the scale suite')
            info['loadavg_at_end'] = os.getloadavg()
            report.save(out, 'scale', {'machine': info, 'config': config, 'notes': notes,
                                       'results': results, 'targets': rows})
            failed = failed or _missed(rows, quick)
    report.console.print(f'results written to {out}')
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
