"""``python -m tasks report``: waits by role, throughput, utilisation, peaks, depth."""
from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone

from . import ledger, uptime
from .ledger import ACTIVE, SUCCEEDED

_UNITS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400, 'w': 604800}


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """'24h', '7d', '90m' (ago) or an ISO date/time (UTC if no zone)."""
    if not text:
        return None
    now = time.time() if now is None else now
    m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*', text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f'--since {text!r}: use a duration such as 24h or 7d, '
                         f'or an ISO date such as 2025-01-31T09:00') from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    k = max(0, math.ceil(q / 100 * len(values)) - 1)  # nearest-rank
    return values[k]


def _hour(ts):
    return datetime.fromtimestamp(ts, timezone.utc).strftime('%Y-%m-%dT%H:00Z')


def build(cfg, since: float | None = None, now: float | None = None,
          depths: dict | None = None) -> dict:
    """The report as plain data (what ``--json`` prints)."""
    now = time.time() if now is None else now
    rows = ledger.rows(cfg.ledger_url, since)
    start = since if since is not None else min((r.created_at for r in rows), default=now)
    window = max(now - start, 1e-9)

    waits = defaultdict(list)
    for r in rows:
        if r.wait_seconds is not None and r.started_at is not None:
            waits[r.role].append(r.wait_seconds)
    by_role = {}
    for role in sorted(set(r.role for r in rows),
                       key=lambda n: cfg.roles[n].priority if n in cfg.roles else 99):
        w = waits.get(role, [])
        by_role[role] = {
            'requests': sum(1 for r in rows if r.role == role),
            'started': len(w),
            'avg_wait_s': sum(w) / len(w) if w else None,
            'p95_wait_s': percentile(w, 95),
        }

    done = [r for r in rows if r.status == SUCCEEDED and r.completed_at]
    per_hour = Counter(_hour(r.completed_at) for r in done)
    busy = defaultdict(float)
    for r in rows:
        if r.started_at and r.run_seconds:
            busy[r.model] += r.run_seconds
    # Over the time the model's workers were up in the window (a fresh install
    # is not spread over a day it did not run), else over the whole window.
    up = uptime.up_seconds(cfg, start, now)
    utilisation = {}
    for name, m in cfg.models.items():
        seconds = window if up is None else up.get(name, 0.0)
        utilisation[name] = {
            'slots': m.slots, 'busy_slot_seconds': busy.get(name, 0.0),
            'basis': 'window' if up is None else 'worker uptime', 'up_seconds': seconds,
            'available_slot_seconds': m.slots * seconds,
            'utilisation': busy.get(name, 0.0) / (m.slots * seconds) if seconds else None}

    gpu_busy = sum(busy.values())
    gpu_up = window if up is None else up[uptime.ANY_MODEL]
    gpu = {'slots': cfg.gpu_slots, 'busy_slot_seconds': gpu_busy,
           'basis': 'window' if up is None else 'worker uptime', 'up_seconds': gpu_up,
           'available_slot_seconds': cfg.gpu_slots * gpu_up,
           'utilisation': gpu_busy / (cfg.gpu_slots * gpu_up) if gpu_up else None}

    submitted = Counter(_hour(r.created_at) for r in rows)
    peaks = [{'hour': h, 'submitted': n} for h, n in submitted.most_common(3)]

    status = Counter(r.status for r in rows)
    episodes = ledger.spike_episodes(cfg.ledger_url, since)
    queues = {}
    for name, m in cfg.models.items():
        queues[name] = {
            'queue': m.queue,
            'ready': (depths or {}).get(m.queue),
            'queued': sum(1 for r in rows if r.model == name and r.status == 'queued'),
            'running': sum(1 for r in rows if r.model == name and r.status == 'running'),
        }
    return {
        'since': start, 'until': now, 'window_hours': window / 3600,
        'requests': len(rows), 'by_status': dict(status),
        'wait_by_role': by_role,
        'processed_per_hour': len(done) / (window / 3600),
        'processed_by_hour': dict(sorted(per_hour.items())),
        'model_utilisation': utilisation,
        'gpu_utilisation': gpu,
        'peak_periods': peaks,
        'queue_depth': queues,
        'active_requests': sum(1 for r in rows if r.status in ACTIVE),
        'spike_episodes': episodes,
    }


def _fmt(v, unit='s'):
    return '-' if v is None else f'{v:.2f}{unit}'


def render(data: dict, console=None):
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    since = datetime.fromtimestamp(data['since'], timezone.utc).strftime('%Y-%m-%d %H:%M')
    console.print(f'[bold]Requests since {since} UTC[/]: {data["requests"]} '
                  f'({", ".join(f"{k} {v}" for k, v in sorted(data["by_status"].items()))}); '
                  f'{data["processed_per_hour"]:.1f} processed per hour')
    t = Table(title='Wait by role')
    for col in ('role', 'requests', 'started', 'avg wait', 'p95 wait'):
        t.add_column(col, justify='left' if col == 'role' else 'right')
    for role, w in data['wait_by_role'].items():
        t.add_row(role, str(w['requests']), str(w['started']), _fmt(w['avg_wait_s']),
                  _fmt(w['p95_wait_s']))
    console.print(t)
    bases = {u['basis'] for u in data['model_utilisation'].values()}
    t = Table(title='Models', caption='utilisation: busy slot-seconds over slots x '
              + ('the time its workers were up in the window' if bases == {'worker uptime'}
                 else 'the whole window (no worker uptime recorded)'))
    for col in ('model', 'slots', 'up', 'busy slot-s', 'utilisation', 'ready', 'queued',
                'running'):
        t.add_column(col, justify='left' if col == 'model' else 'right')
    for name, u in data['model_utilisation'].items():
        q = data['queue_depth'][name]
        t.add_row(name, str(u['slots']), _fmt(u['up_seconds']),
                  f'{u["busy_slot_seconds"]:.1f}',
                  '-' if u['utilisation'] is None else f'{u["utilisation"]:.1%}',
                  '-' if q['ready'] is None else str(q['ready']),
                  str(q['queued']), str(q['running']))
    console.print(t)
    g = data['gpu_utilisation']
    console.print(f'GPU, all models: {g["slots"]} slot(s) ([gpu] slots), '
                  f'{g["busy_slot_seconds"]:.1f} busy slot-s over {_fmt(g["up_seconds"])} '
                  f'({g["basis"]}), '
                  + ('-' if g['utilisation'] is None else f'{g["utilisation"]:.1%}')
                  + ' utilisation')
    if data['peak_periods']:
        console.print('Peak hours (submitted): ' + ', '.join(
            f'{p["hour"]} ({p["submitted"]})' for p in data['peak_periods']))
    console.print(f'Spike episodes: {len(data["spike_episodes"])}' + ''.join(
        f'\n  {e["queue"]}: {_fmt((e["ended_at"] or data["until"]) - e["started_at"])}'
        f'{"" if e["ended_at"] else " (ongoing)"}, {e["refused"]} refused'
        for e in data['spike_episodes']))
