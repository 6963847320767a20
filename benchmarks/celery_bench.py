"""Celery end-to-end: a real ``celery worker`` runs N tasks, in each pool of POOLS."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import procs
from .celery_app import QUEUE, make_app

ROOT = Path(__file__).resolve().parent.parent
#: metric name -> (pool, concurrency); each at prefetch multiplier 4.
POOLS = {'celery_prefork': ('prefork', 2), 'celery_threads': ('threads', 4)}
PREFETCH_MULTIPLIER = 4


def _count(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def start_worker(broker, counter: Path, log: Path, pool: str, concurrency: int):
    path = [str(ROOT), os.environ.get('PYTHONPATH')]
    env = dict(os.environ, BENCH_BROKER_URL=broker.url, BENCH_COUNTER=str(counter),
               BENCH_TRANSPORT_OPTIONS=json.dumps(broker.transport_options),
               PYTHONPATH=os.pathsep.join(filter(None, path)))
    cmd = [sys.executable, '-m', 'celery', '-A', 'benchmarks.celery_app', 'worker',
           '-P', pool, '-c', str(concurrency), '--prefetch-multiplier', str(PREFETCH_MULTIPLIER),
           '-Q', QUEUE, '-l', os.environ.get('BENCH_WORKER_LOGLEVEL', 'INFO'),
           '--without-gossip', '--without-mingle', '--without-heartbeat',
           '-n', f'bench-{broker.name}@%h']
    with open(log, 'wb') as out:  # the child keeps its own copy
        proc = procs.popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f'celery worker exited ({proc.returncode}):\n{_tail(log)}')
        return b' ready.' in log.read_bytes()
    procs.wait_for(ready, 60, what=f'{broker.name} celery worker')
    return proc


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f'/proc/{pid}/task/{pid}/children').read_text().split()]
    except OSError:
        return []


class CpuAccount:
    """CPU seconds spent by each side of a run: where a task's cost goes.

    The worker's main process (consumer, dispatch, acks), its pool processes,
    this harness (the publishing ``apply_async`` loop; it sleeps otherwise) and
    the broker's server process, if it has one.
    """

    def __init__(self, worker_pid: int, server_pid: int | None):
        self.worker_pid, self.server_pid = worker_pid, server_pid
        self.start = self._read()

    def _read(self) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = {'worker main': procs.cpu_seconds(self.worker_pid),
               'pool processes': sum(_cpu_or_zero(c) for c in _children(self.worker_pid)),
               'publisher': usage.ru_utime + usage.ru_stime}
        if self.server_pid:
            cpu['broker server'] = procs.cpu_seconds(self.server_pid)
        return cpu

    def per_task_us(self, n: int) -> dict:
        end = self._read()
        out = {k: round((end[k] - self.start[k]) / n * 1e6) for k in end}
        out['total'] = sum(out.values())
        return out


def _cpu_or_zero(pid: int) -> float:
    try:
        return procs.cpu_seconds(pid)
    except OSError:  # a pool process that ended meanwhile
        return 0.0


def _tail(log: Path, lines: int = 30) -> str:
    return '\n'.join(log.read_text(errors='replace').splitlines()[-lines:])


def measure(broker, n: int, pool: str, concurrency: int, timeout: float = 600) -> dict:
    counter = broker.tmpdir / f'celery-{broker.name}-{pool}.count'
    log = broker.tmpdir / f'celery-{broker.name}-{pool}.log'
    counter.unlink(missing_ok=True)
    app = make_app(broker.url, broker.transport_options)
    tick = app.tasks['bench.tick']
    worker = start_worker(broker, counter, log, pool, concurrency)
    try:
        with app.producer_or_acquire() as producer:
            tick.apply_async(producer=producer)  # warm-up: pool processes, connections
            procs.wait_for(lambda: _count(counter) >= 1, 60, 0.005, 'the warm-up task')
            base = _count(counter)
            cpu = CpuAccount(worker.pid, broker.server_pid)
            started = time.perf_counter()
            for _ in range(n):
                tick.apply_async(producer=producer)
            published = time.perf_counter() - started
        deadline = time.monotonic() + timeout
        while _count(counter) - base < n:
            if worker.poll() is not None:
                raise RuntimeError(f'celery worker died:\n{_tail(log)}')
            if time.monotonic() > deadline:
                raise RuntimeError(f'{broker.name}: {_count(counter) - base} of {n} '
                                   f'tasks done after {timeout:.0f} s')
            time.sleep(0.002)
        elapsed = time.perf_counter() - started
        cpu_us = cpu.per_task_us(n)
    finally:
        # Cold shutdown: the run is over, and a warm one takes seconds per worker.
        procs.stop(worker, sig=signal.SIGQUIT)
        app.close()
    return {'tasks': n, 'seconds': elapsed, 'rate': n / elapsed,
            'publish_seconds': published, 'cpu_us_per_task': cpu_us,
            'pool': f'{pool} -c {concurrency}, prefetch multiplier {PREFETCH_MULTIPLIER}'}
