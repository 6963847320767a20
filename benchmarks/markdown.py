"""Markdown tables from a results file, for docs/benchmarks.md."""
from __future__ import annotations

from .report import THROUGHPUT


def _row(cells) -> str:
    return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def _table(header, rows) -> list[str]:
    return [_row(header), _row(['---'] * len(header)), *(_row(r) for r in rows)]


def _n(value, digits=0) -> str:
    return '-' if value is None else f'{value:,.{digits}f}'


def machine(info: dict) -> list[str]:
    return _table(['', ''], [
        ['CPU', f'{info["cpu"]}, {info["nproc"]} CPUs (nproc)'],
        ['RAM', f'{info["ram_gib"]} GiB'], ['kernel', info['kernel']],
        ['Python', info['python']],
        ['kombu / celery', f'{info["kombu"]} / {info["celery"]}'],
        ['SQLite (library)', info['sqlite']],
        ['redis-server / redis-py / hiredis',
         f'{info["redis_server"]} / {info["redis_py"]} / {info["hiredis"] or "not installed"}'],
        ['SQLAlchemy', info['sqlalchemy']],
        ['project revision', info.get('revision') or '-'],
        ['load average (1 min) at start / end', ' / '.join(
            _n((info.get(k) or [None])[0], 2) for k in ('loadavg_at_start', 'loadavg_at_end'))],
    ])


def main_suite(data: dict) -> list[str]:
    res = data['results']
    rows = []
    for broker, r in res.items():
        lat = r.get('latency', {})
        rows.append([broker, *[_n(r.get(m, {}).get('rate')) for m, _ in THROUGHPUT],
                     _n(lat.get('p50_ms'), 2), _n(lat.get('p99_ms'), 2),
                     _n(lat.get('idle_cpu_pct'), 2)])
    out = _table(['broker', *[label for _, label in THROUGHPUT], 'wake-up p50 ms',
                  'wake-up p99 ms', 'idle CPU % of a core (consumer + server)'], rows)
    out += ['', 'Every round (the table shows the median):', '']
    out += _table(['broker', *[label for _, label in THROUGHPUT]], [
        [broker, *[' / '.join(_n(x) for x in r.get(m, {}).get('round_rates', []))
                   for m, _ in THROUGHPUT]]
        for broker, r in res.items()])
    parts = ('worker main', 'pool processes', 'publisher', 'broker server', 'total')
    cpu_rows = [[broker, r[m]['pool'].split(',')[0],
                 *[_n(r[m]['cpu_us_per_task'].get(k)) for k in parts]]
                for broker, r in res.items() for m in ('celery_prefork', 'celery_threads')
                if 'cpu_us_per_task' in r.get(m, {})]
    if cpu_rows:  # results files before the CPU accounting have none
        out += ['', 'CPU per task in the Celery runs (the median round), microseconds:', '']
        out += _table(['broker', 'pool', *parts], cpu_rows)
    out += ['']
    out += _table(['ratio', 'value'], [[k, f'{v:.2f}x'] for k, v in data['ratios'].items()])
    out += ['', *(f'- error: {e}' for e in data.get('errors', [])), '']
    return out + _targets(data['targets'])


def scale_suite(data: dict) -> list[str]:
    res = data['results']
    out = _table(['broker', 'queued', 'fill msg/s', 'fill s', 'claim+ack msg/s',
                  'messages claimed', 'note'], [
        [b, _n(d['queued']), _n(d['fill_rate']),
         '-' if 'note' in d else _n(d['fill_seconds'], 1), _n(d.get('rate')),
         _n(d.get('messages')), d.get('note', '')]
        for b, r in res.items() for d in r['depth']])
    out += ['']
    out += _table(['broker', 'processes', 'messages', 'aggregate msg/s', 'vs 1 process',
                   '"database is locked"', 'duplicates', 'missing', 'left in store',
                   'per process'], [
        [b, p['processes'], _n(p['messages']), _n(p['rate']), f'{p["vs_single"]:.2f}x',
         p['locked_errors'], p['duplicates'], p['missing'], p.get('left_in_store', '-'),
         ' '.join(str(x) for x in p['per_process'])]
        for b, r in res.items() for p in r['processes']])
    return out + ['', *_targets(data.get('targets', []))]


def _targets(rows) -> list[str]:
    verdict = {True: 'PASS', False: '**FAIL**', None: 'not measured'}
    return _table(['target', 'measured', 'result'],
                  [[t['target'], '-' if t['value'] is None else f'{t["value"]:,}',
                    verdict[t['pass']]] for t in rows])


def render(data: dict) -> str:
    lines = []
    for suite, fn in (('main', main_suite), ('scale', scale_suite)):
        if suite in data:
            lines += [f'<!-- {suite} suite -->', '', *machine(data[suite]['machine']), '',
                      *fn(data[suite]), '']
    return '\n'.join(lines)
