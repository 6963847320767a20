"""The demo's report: figures from the ledger and the samples, and the
criteria the demo checks itself against (priority, GPU use, nothing lost, no
starvation, and that spike mode and the per-user limits did their job).

Everything is computed after the run from the ledger (one row per request,
with its times) and the broker samples, so the report describes what
happened, not what the replay intended.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from ..report import percentile

MIN_UTILISATION = 0.90
MAX_EXEC_OVER_STAFF = 0.25


def _waits(rows) -> dict:
    out = {}
    by_role = defaultdict(list)
    for r in rows:
        if r['wait_seconds'] is not None and r['started_at'] is not None:
            by_role[r['role']].append(r['wait_seconds'])
    for role, w in by_role.items():
        out[role] = {'served': len(w), 'p50_s': percentile(w, 50),
                     'p95_s': percentile(w, 95), 'max_s': max(w)}
    return out


def _sweep(rows, slots: int, end: float, burst: tuple[float, float]) -> dict:
    """Busy slots while anything waits, and when the burst's backlog drained.

    A request waits from ``created_at`` to ``started_at`` and holds a slot from
    ``started_at`` to ``completed_at`` (the ledger's own times).
    """
    events = []
    for r in rows:
        start = r['started_at'] if r['started_at'] is not None else end
        events += [(r['created_at'], 1, 0), (start, -1, 0)]
        if r['started_at'] is not None:
            events += [(r['started_at'], 0, 1), (r['completed_at'] or end, 0, -1)]
    events.sort()
    queued = running = 0
    last = None
    waiting_s = busy_while_waiting = busy = 0.0
    peak = 0
    drained_at = emptied_at = backlog_from = None
    nonempty_since = None
    for t, dq, dr in events:
        if backlog_from is None and t >= burst[0]:
            # The burst's backlog includes what was already waiting when it began.
            backlog_from = nonempty_since if queued > 0 else burst[0]
        if last is not None and t > last:
            if queued > 0:
                waiting_s += t - last
                busy_while_waiting += min(running, slots) * (t - last)
            busy += min(running, slots) * (t - last)
        if queued == 0 and queued + dq > 0:
            nonempty_since = t
        queued += dq
        running += dr
        last = t
        if queued == 0:
            emptied_at = t
        if burst[0] <= t and drained_at is None:
            peak = max(peak, queued)
            if t >= burst[1] and queued == 0:
                drained_at = t
    if drained_at is None and queued == 0 and emptied_at is not None:
        drained_at = max(burst[1], emptied_at)  # empty before the burst ended
    span = (events[-1][0] - events[0][0]) if events else 0.0
    return {'slots': slots, 'busy_slot_s': busy, 'span_s': span,
            'overall': busy / (slots * span) if span else None,
            'waiting_s': waiting_s,
            'while_waiting': busy_while_waiting / (slots * waiting_s) if waiting_s else None,
            'backlog_peak': peak,
            'drained_at': drained_at,
            'backlog_from': backlog_from,
            'drain_s': None if drained_at is None else drained_at - (backlog_from or burst[0])}


def _reason(row) -> str:
    from .load import reason
    error = row['error'] or ''
    kind, _, text = error.partition(': ')
    return reason(kind, text)


def build(cfg, rows: list[dict], replay, sizing, samples: list[dict], broker_stats: dict,
          end: float, episodes: list[dict]) -> dict:
    t0 = replay.started_at
    b0, b1 = (t0 + x for x in sizing.phase('burst'))
    admitted = [r for r in rows if r['status'] != 'rejected']
    rejected = [r for r in rows if r['status'] == 'rejected']
    status = Counter(r['status'] for r in rows)
    in_burst = [r for r in admitted if b0 <= r['created_at'] < b1]

    models = {}
    for name, m in cfg.models.items():
        models[name] = _sweep([r for r in admitted if r['model'] == name], m.slots, end,
                              (b0, b1))
    gpu = _sweep(admitted, cfg.gpu_slots, end, (b0, b1))  # the box as a whole
    done = [r for r in admitted if r['status'] == 'succeeded']
    span = (max(r['completed_at'] for r in done) - t0) if done else 0.0
    report = {
        'run': {'scale': sizing.scale, 'duration_s': sizing.duration,
                'users': sizing.users, 'burst_requests': sizing.burst_requests,
                'gpu_seconds_per_transcript': sizing.unit,
                'capacity_per_s': sizing.capacity, 'spike_depth': sizing.spike_depth,
                'started_at': t0, 'ended_at': end,
                'phases': {p: list(sizing.phase(p)) for p in ('steady', 'burst', 'recovery')},
                'max_submit_lag_s': replay.max_lag},
        'requests': {'submitted': replay.submitted, 'admitted': replay.admitted,
                     'rejected': len(rejected), 'submit_errors': replay.errors,
                     'ledger_rows': len(rows), 'by_status': dict(status)},
        'rejections': dict(Counter(_reason(r) for r in rejected)),
        'wait_by_role': _waits(admitted),
        'wait_by_role_burst': _waits(in_burst),
        'models': models,
        'gpu': gpu,
        'throughput': {'succeeded': len(done), 'seconds': span,
                       'per_minute': 60 * len(done) / span if span else None,
                       'by_model_per_minute': {
                           name: 60 * sum(1 for r in done if r['model'] == name) / span
                           if span else None for name in cfg.models}},
        'broker': {m.name: {k: broker_stats.get(m.queue, {}).get(k, 0)
                            for k in ('ready', 'leased', 'delayed', 'dead')}
                   for m in cfg.models.values()},
        'timeline': timeline(cfg, samples, t0),
        'waits': [[round(r['created_at'] - t0, 3), round(r['wait_seconds'], 3), r['role'],
                   r['model']] for r in admitted if r['wait_seconds'] is not None],
        'spike_episodes': episodes,
    }
    report['criteria'] = criteria(cfg, report, admitted, rows, replay)
    report['criteria'] += admission_criteria(cfg, report, sizing, rows, episodes)
    return report


def timeline(cfg, samples, t0) -> dict:
    """Queue depth over time: ready requests by role, and busy slots."""
    roles = sorted(cfg.roles.values(), key=lambda r: r.priority)
    out = {'t': [], 'ready_by_role': {r.name: [] for r in roles}, 'running': []}
    for s in samples:
        out['t'].append(round(s['t'] - t0, 2))
        for r in roles:
            out['ready_by_role'][r.name].append(
                sum(ready.get(r.priority, 0) for ready in s['ready'].values()))
        out['running'].append(sum(s['running'].values()))
    return out


def _criterion(name, ok, value, detail):
    return {'name': name, 'pass': bool(ok), 'value': value, 'detail': detail}


def criteria(cfg, report, admitted, rows, replay) -> list[dict]:
    out = []
    burst = report['wait_by_role_burst']
    ex, st = burst.get('executive', {}).get('p95_s'), burst.get('staff', {}).get('p95_s')
    if ex is None or not st:
        out.append(_criterion('executive p95 wait <= 25% of staff p95 during the burst',
                              False, None, f'no waits to compare (executive {ex}, staff {st})'))
    else:
        out.append(_criterion(
            'executive p95 wait <= 25% of staff p95 during the burst',
            ex <= MAX_EXEC_OVER_STAFF * st, ex / st,
            f'executive p95 {ex:.1f}s, staff p95 {st:.1f}s: {ex / st:.1%}'))

    utils = {n: m['while_waiting'] for n, m in report['models'].items()
             if m['while_waiting'] is not None}
    worst = min(utils.values()) if utils else None
    out.append(_criterion(
        'GPU slots busy >= 90% of the time while anything is queued',
        worst is not None and worst >= MIN_UTILISATION, worst,
        ', '.join(f'{n} {u:.1%} of {report["models"][n]["waiting_s"]:.0f}s'
                  for n, u in utils.items()) or 'nothing was ever queued'))

    by_id = {r['task_id']: r for r in rows}
    ids = replay.admitted_ids()
    unanswered = [i for i in ids if by_id.get(i, {}).get('status') != 'succeeded']
    stuck = sum(sum(b.values()) for b in report['broker'].values())
    ok = (not unanswered and len(rows) == replay.submitted - replay.errors and stuck == 0)
    out.append(_criterion(
        'no request lost', ok, len(unanswered),
        f'{len(ids) - len(unanswered)}/{len(ids)} admitted requests answered, '
        f'{len(rows)} ledger rows for {replay.submitted - replay.errors} submissions, '
        f'{stuck} messages left in the broker'))

    late, unserved, worst = [], [], 0.0
    for r in admitted:
        if r['role'] != 'staff':
            continue
        drain = report['models'][r['model']]['drain_s']
        if r['status'] != 'succeeded' or r['wait_seconds'] is None:
            unserved.append(r['task_id'])
        elif drain is not None and r['wait_seconds'] > drain:
            late.append(r['task_id'])
        worst = max(worst, r['wait_seconds'] or 0.0)
    drains = ', '.join(f'{n} {m["drain_s"]:.0f}s' for n, m in report['models'].items()
                       if m['drain_s'] is not None)
    out.append(_criterion(
        "no staff request starved (each served within the backlog's drain time)",
        not late and not unserved, worst,
        f'longest staff wait {worst:.1f}s; backlog drain time {drains or "-"}; '
        f'{len(unserved)} unserved, {len(late)} late'))
    return out


# Admission reads the clock before it takes the ledger's write lock: allow for it.
CLOCK_SLACK = 0.5


def admission_criteria(cfg, report, sizing, rows, episodes) -> list[dict]:
    """Spike mode and the per-user limits did their job, judged against what the
    demo intends (its spike threshold, the built-in role limits), not against the
    configuration it ran with, so that a run without them fails."""
    from .load import builtin
    intended = builtin()
    cutoff = intended.roles[intended.spike_cutoff_role].priority
    return [_spike_criterion(cfg, report, sizing, rows, episodes, cutoff),
            _limit_criterion(rows, {r.name: r.limit for r in intended.roles.values()})]


def _spike_criterion(cfg, report, sizing, rows, episodes, cutoff):
    name = 'spike mode engaged when the backlog crossed its threshold'
    crossed = [n for n, m in report['models'].items()
               if m['backlog_peak'] > sizing.spike_depth + cfg.models[n].slots]
    missing = [n for n in crossed if not any(
        e['queue'] == cfg.models[n].queue for e in episodes)]
    refused = sum(1 for r in rows if r['status'] == 'rejected' and _reason(r) == 'spike mode')
    let_in = [r for r in rows if r['status'] != 'rejected' and r['priority'] > cutoff
              and any(e['queue'] == r['queue']
                      and e['started_at'] + CLOCK_SLACK <= r['created_at']
                      and (e['ended_at'] is None or r['created_at'] < e['ended_at'])
                      for e in episodes)]
    ok = bool(episodes) and not missing and refused > 0 and not let_in
    peaks = ', '.join(f'{n} {m["backlog_peak"]}' for n, m in report['models'].items())
    return _criterion(name, ok, len(episodes),
                      f'threshold {sizing.spike_depth}, backlog peak {peaks}; '
                      f'{len(episodes)} episode(s), {refused} refused, '
                      f'{len(let_in)} below the cutoff admitted during one'
                      + (f'; no episode on {", ".join(missing)}' if missing else ''))


def _limit_criterion(rows, limits):
    """No one was admitted past their role's limit, and someone at it was refused."""
    admitted = [r for r in rows if r['status'] != 'rejected']

    def active(user, t, slack):  # the user's admitted requests open at time t
        return sum(1 for r in admitted if r['user_id'] == user
                   and r['created_at'] < t - slack
                   and (r['completed_at'] is None or r['completed_at'] > t + slack))
    over = [r for r in admitted if limits.get(r['role'])
            and active(r['user_id'], r['created_at'], CLOCK_SLACK) >= limits[r['role']]]
    refused = [r for r in rows if r['status'] == 'rejected' and _reason(r) == 'user limit']
    unjust = [r for r in refused if active(r['user_id'], r['created_at'], -CLOCK_SLACK)
              < (limits.get(r['role']) or float('inf'))]
    return _criterion('per-user limits refused what they should, and only that',
                      refused and not over and not unjust, len(over),
                      f'{len(refused)} refused at the limit, {len(over)} admitted past it, '
                      f'{len(unjust)} refused below it')


def _fmt(v, unit='s'):
    return '-' if v is None else f'{v:.1f}{unit}'


def render(report: dict, console, flower_url: str, paths: dict):
    from rich.table import Table
    req = report['requests']
    console.rule('[bold]Demand spike report')
    console.print(f'{req["submitted"]} submitted, {req["admitted"]} admitted, '
                  f'{req["rejected"]} rejected; by status: '
                  + ', '.join(f'{k} {v}' for k, v in sorted(req['by_status'].items())))
    t = Table(title='Wait by role (whole run | during the burst)')
    for col in ('role', 'served', 'p50', 'p95', 'max', 'burst p50', 'burst p95', 'burst max'):
        t.add_column(col, justify='left' if col == 'role' else 'right')
    for role in sorted(report['wait_by_role'], key=lambda n: _priority(report, n)):
        w = report['wait_by_role'][role]
        b = report['wait_by_role_burst'].get(role, {})
        t.add_row(role, str(w['served']), _fmt(w['p50_s']), _fmt(w['p95_s']),
                  _fmt(w['max_s']), _fmt(b.get('p50_s')), _fmt(b.get('p95_s')),
                  _fmt(b.get('max_s')))
    console.print(t)
    t = Table(title='GPU slots')
    t.add_column('model', no_wrap=True, min_width=max(map(len, report['models'])))
    for col in ('slots', 'busy slot-s', 'busy overall', 'busy while queued',
                'queued for', 'peak backlog', 'drained after', 'per minute'):
        t.add_column(col, justify='right')
    for name, m in report['models'].items():
        t.add_row(name, str(m['slots']), f'{m["busy_slot_s"]:.0f}',
                  _fmt(m['overall'] and 100 * m['overall'], '%'),
                  _fmt(m['while_waiting'] and 100 * m['while_waiting'], '%'),
                  _fmt(m['waiting_s']), str(m['backlog_peak']), _fmt(m['drain_s']),
                  _fmt(report['throughput']['by_model_per_minute'][name], ''))
    g = report['gpu']
    t.add_row('GPU, all models', str(g['slots']), f'{g["busy_slot_s"]:.0f}',
              _fmt(g['overall'] and 100 * g['overall'], '%'),
              _fmt(g['while_waiting'] and 100 * g['while_waiting'], '%'),
              _fmt(g['waiting_s']), str(g['backlog_peak']), _fmt(g['drain_s']),
              _fmt(report['throughput']['per_minute'], ''))
    console.print(t)
    tp = report['throughput']
    console.print(f'Throughput: {tp["succeeded"]} answered in {tp["seconds"]:.0f}s, '
                  f'{_fmt(tp["per_minute"], "")} per minute')
    console.print('Rejections: ' + (', '.join(
        f'{k} {v}' for k, v in sorted(report['rejections'].items())) or 'none'))
    for c in report['criteria']:
        mark = '[bold green]PASS[/]' if c['pass'] else '[bold red]FAIL[/]'
        console.print(f'{mark} {c["name"]}: {c["detail"]}')
    console.print(f'Flower: {flower_url}')
    for what, path in paths.items():
        console.print(f'{what}: {path}')


def _priority(report, role):
    from .load import POPULATION
    return list(POPULATION).index(role) if role in POPULATION else 99
