"""Tables, ratios, the targets' PASS/FAIL, and the results file."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(width=None if Console().is_terminal else 120)

THROUGHPUT = (('publish', 'publish msg/s'), ('consume', 'consume+ack msg/s'),
              ('consume_unbatched', 'consume+ack, one write per ack, msg/s'),
              ('celery_prefork', 'celery prefork -c 2 tasks/s'),
              ('celery_threads', 'celery threads -c 4 tasks/s'))
#: Figures only kombu-sqlite has, compared with the other brokers' plain figure.
COMPARED_WITH = {'consume_unbatched': 'consume'}
# (metric, versus, least ratio sqlite/versus): issue 10's targets against Redis; against
# kombu's SQLAlchemy transport, at equal counts (see docs/benchmarks.md).
RATIO_TARGETS = [('publish', 'redis', 4.0), ('consume', 'redis', 10.0),
                 ('celery_prefork', 'redis', 2.0), ('celery_threads', 'redis', 2.0),
                 ('publish', 'sqla', 10.0), ('consume', 'sqla', 10.0),
                 ('celery_prefork', 'sqla', 5.0), ('celery_threads', 'sqla', 5.0)]
LATENCY_TARGETS = [('p50_ms', 5.0, 'idle wake-up p50 (ms)'),
                   ('p99_ms', 25.0, 'idle wake-up p99 (ms)'),
                   ('idle_cpu_pct', 2.0, 'idle CPU, consumer + broker server (% of a core)')]


def _fmt(value, digits=0):
    if value is None:
        return '-'
    return f'{value:,.{digits}f}'


def _rate(results, broker, metric):
    return (results.get(broker, {}).get(metric) or {}).get('rate')


def ratios(results: dict) -> dict:
    out = {}
    for metric, _ in THROUGHPUT:
        mine = _rate(results, 'sqlite', metric)
        for other in ('redis', 'sqla'):
            theirs = _rate(results, other, COMPARED_WITH.get(metric, metric))
            if mine and theirs:
                out[f'{metric}: sqlite/{other}'] = mine / theirs
    return out


def targets(results: dict, ratio: dict) -> list[dict]:
    rows = []
    for metric, other, least in RATIO_TARGETS:
        value = ratio.get(f'{metric}: sqlite/{other}')
        rows.append({'target': f'{metric}: sqlite >= {least:g}x {other}',
                     'value': None if value is None else round(value, 2),
                     'pass': None if value is None else value >= least})
    latency = results.get('sqlite', {}).get('latency') or {}
    for key, most, label in LATENCY_TARGETS:
        value = latency.get(key)
        rows.append({'target': f'sqlite {label} <= {most:g}',
                     'value': None if value is None else round(value, 2),
                     'pass': None if value is None else value <= most})
    return rows


def print_main(results: dict, ratio: dict, rows: list[dict]) -> None:
    table = Table(title='Throughput and idle latency (same machine, same run)')
    table.add_column('broker')
    for _, label in THROUGHPUT:
        table.add_column(label, justify='right')
    for label in ('p50 ms', 'p99 ms', 'idle CPU % (consumer + server)'):
        table.add_column(label, justify='right')
    for broker, r in results.items():
        lat = r.get('latency') or {}
        table.add_row(broker, *[_fmt(_rate(results, broker, m)) for m, _ in THROUGHPUT],
                      _fmt(lat.get('p50_ms'), 2), _fmt(lat.get('p99_ms'), 2),
                      _fmt(lat.get('idle_cpu_pct'), 2))
    console.print(table)
    if ratio:
        ratio_table = Table(title='Ratios')
        ratio_table.add_column('metric')
        ratio_table.add_column('ratio', justify='right')
        for name, value in ratio.items():
            ratio_table.add_row(name, f'{value:.2f}x')
        console.print(ratio_table)
    print_targets(rows)


def print_targets(rows: list[dict], title: str = 'Targets') -> None:
    verdicts = Table(title=title)
    for column in ('target', 'measured', 'result'):
        verdicts.add_column(column)
    for row in rows:
        verdict = {True: '[green]PASS[/]', False: '[red]FAIL[/]', None: 'n/a'}[row['pass']]
        value = row['value']
        verdicts.add_row(row['target'], str(value) if isinstance(value, int)
                         else _fmt(value, 2), verdict)
    console.print(verdicts)


#: A claim is one walk from the head of the queue: depth must barely matter.
DEPTH_TOLERANCE = 0.25


def scale_targets(scale: dict) -> list[dict]:
    """The scale suite's targets, for kombu-sqlite."""
    mine = scale.get('sqlite') or {}
    rates = {d['queued']: d.get('rate') for d in mine.get('depth', [])}
    shallow, deep = rates.get(min(rates, default=None)), rates.get(max(rates, default=None))
    change = deep / shallow - 1 if shallow and deep and len(rates) > 1 else None
    rows = [{'target': f'claim+ack at {max(rates, default=0):,} queued within '
                       f'{DEPTH_TOLERANCE:.0%} of {min(rates, default=0):,} queued (change)',
             'value': None if change is None else round(change, 3),
             'pass': None if change is None else change >= -DEPTH_TOLERANCE}]
    many = [p for p in mine.get('processes', []) if p['processes'] > 1]
    for p in many:
        n = p['processes']
        rows += [
            {'target': f'{n} processes on one file: aggregate >= 1 process (ratio)',
             'value': round(p['vs_single'], 2), 'pass': p['vs_single'] >= 1.0},
            {'target': f'{n} processes: "database is locked" surfaced',
             'value': p['locked_errors'], 'pass': p['locked_errors'] == 0, 'speed': False},
            {'target': f'{n} processes: messages lost or delivered twice',
             'value': p['missing'] + p['duplicates'],
             'pass': p['missing'] + p['duplicates'] == 0, 'speed': False},
        ]
    for p in mine.get('processes', []):
        rows.append({'target': f'{p["processes"]} process(es): file empty after the last ack '
                               f'(messages left)',
                     'value': p['left_in_store'], 'pass': p['left_in_store'] == 0,
                     'speed': False})
    return rows


def print_scale(scale: dict) -> None:
    table = Table(title='Claim+ack with messages queued')
    for column in ('broker', 'queued', 'fill msg/s', 'fill s', 'claim+ack msg/s', 'note'):
        table.add_column(column, justify='left' if column in ('broker', 'note') else 'right')
    for broker, r in scale.items():
        for row in r.get('depth', []):
            table.add_row(broker, _fmt(row['queued']), _fmt(row.get('fill_rate')),
                          '-' if 'note' in row else _fmt(row.get('fill_seconds'), 1),
                          _fmt(row.get('rate')),
                          row.get('note', ''))
    console.print(table)
    table = Table(title='Several processes consuming one queue')
    for column in ('broker', 'procs', 'messages', 'aggregate msg/s', 'vs 1 proc',
                   'db locked', 'duplicates', 'missing', 'left in store'):
        table.add_column(column, justify='left' if column == 'broker' else 'right')
    for broker, r in scale.items():
        for row in r.get('processes', []):
            table.add_row(broker, str(row['processes']), _fmt(row['messages']),
                          _fmt(row['rate']), f"{row.get('vs_single', 1):.2f}x",
                          str(row['locked_errors']), str(row['duplicates']),
                          str(row['missing']), str(row['left_in_store']))
    console.print(table)


def save(path: Path, suite: str, payload: dict) -> None:
    """Write this suite's results, keeping the other suite's from earlier runs."""
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    data[suite] = payload
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + '\n')
