"""Watching the demo while it runs: samples of the broker and the ledger, and
the live terminal view drawn from them.

The samples are also the demo's queue-depth timeline (``report.json`` and the
picture), so they are taken whether or not the terminal shows them.
"""
from __future__ import annotations

import threading
import time

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .. import ledger


class Sampler(threading.Thread):
    """Every ``interval`` s: ready messages by priority, leases, ledger counts."""

    def __init__(self, cfg, interval: float = 0.5):
        super().__init__(daemon=True, name='demo-sampler')
        self.cfg = cfg
        self.interval = interval
        self.samples: list[dict] = []
        self.stop_event = threading.Event()
        self.error = None

    def run(self):
        from kombu_sqlite import Broker

        broker = Broker(self.cfg.broker_url)
        try:
            while not self.stop_event.is_set():
                try:
                    self.samples.append(self.sample(broker))
                except Exception as exc:  # noqa: BLE001  a missed sample is not fatal
                    self.error = f'{type(exc).__name__}: {exc}'
                self.stop_event.wait(self.interval)
        finally:
            broker.close()

    def sample(self, broker) -> dict:
        stats = broker.stats()
        out = {'t': time.time(), 'ready': {}, 'leased': {}, 'running': {}, 'status': {}}
        for m in self.cfg.models.values():
            q = stats.get(m.queue, {})
            out['ready'][m.name] = {int(p): n for p, n in
                                    q.get('ready_by_priority', {}).items()}
            out['leased'][m.name] = q.get('leased', 0)
            out['running'][m.name] = 0
        for (model, status), n in ledger.counts(self.cfg.ledger_url).items():
            out['status'][status] = out['status'].get(status, 0) + n
            if status == 'running' and model in out['running']:
                out['running'][model] = n
        return out

    def last(self) -> dict | None:
        return self.samples[-1] if self.samples else None


def _phase(sizing, elapsed: float) -> str:
    from .load import PHASES
    if elapsed is None:
        return 'starting'
    for name, a, b in PHASES:
        if a * sizing.duration <= elapsed < b * sizing.duration:
            return name
    return 'draining'


def status_line(replay, sample, sizing, now=None) -> str:
    now = now or time.time()
    elapsed = None if replay.started_at is None else now - replay.started_at
    status = (sample or {}).get('status', {})
    rejected = ', '.join(f'{k} {v}' for k, v in sorted(replay.rejected.items())) or 'none'
    return (f'{_phase(sizing, elapsed)} {0 if elapsed is None else elapsed:.0f}/'
            f'{sizing.duration:.0f}s  submitted {replay.submitted}  '
            f'admitted {replay.admitted}  running {status.get("running", 0)}  '
            f'done {status.get("succeeded", 0)}  failed {status.get("failed", 0)}  '
            f'rejected {sum(replay.rejected.values())} ({rejected})')


def view(cfg, replay, sampler, sizing, flower_url):
    """The live view: one row per model, ready requests by role, running, counts."""
    sample = sampler.last() or {}
    roles = sorted(cfg.roles.values(), key=lambda r: r.priority)
    table = Table(title='Queue depth by priority (ready requests)', expand=False)
    table.add_column('model', no_wrap=True)
    for r in roles:
        table.add_column(f'{r.priority} {r.name}', justify='right')
    table.add_column('waiting', justify='right', style='bold')
    table.add_column('running / slots', justify='right')
    for m in cfg.models.values():
        ready = sample.get('ready', {}).get(m.name, {})
        running = sample.get('running', {}).get(m.name, 0)
        table.add_row(m.name, *[str(ready.get(r.priority, 0) or '') for r in roles],
                      str(sum(ready.values())), f'{running} / {m.slots}')
    line = status_line(replay, sample, sizing)
    return Group(Text(f'Flower: {flower_url}', style='cyan'), table, Text(line))
