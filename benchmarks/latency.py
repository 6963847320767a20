"""Idle-queue publish-to-delivery latency, and the CPU an idle queue costs.

Idle CPU counts both sides: the consumer process and, for a broker with a
server (redis-server), the server process too.

The consumer is another process that blocks in drain_events between messages,
as a Celery worker does.  Each message carries its publish time (wall clock,
shared by both processes on one machine); the consumer records
``receive time - publish time`` and hands the list back when told to stop.
"""
from __future__ import annotations

import math
import multiprocessing
import statistics
import time

from kombu import Consumer, Producer

from . import procs
from .brokers import register_sqlite
from .kombu_bench import EXCHANGE, bench_queue

QUEUE = 'bench.latency'


def _consumer(broker, pipe) -> None:
    register_sqlite()  # a spawned process starts without the sqlite:// scheme
    delays, done = [], False

    def on_message(body, message):
        nonlocal done
        received = time.time()
        message.ack()
        if body.get('stop'):
            done = True
        elif body['i'] >= 0:  # negative: warm-up
            delays.append(received - body['t'])

    with broker.connection() as conn:
        consumer = Consumer(conn.channel(), [bench_queue(QUEUE)], callbacks=[on_message],
                            prefetch_count=100, accept=['json'])
        with consumer:
            pipe.send('ready')
            while not done:
                conn.drain_events()  # no timeout: idle means blocked in the transport
    pipe.send(delays)


def measure(broker, samples: int = 200, spacing: float = 0.02,
            idle_window: float = 5.0) -> dict:
    ctx = multiprocessing.get_context('spawn')
    parent, child = ctx.Pipe()
    proc = procs.track(ctx.Process(target=_consumer, args=(broker, child), daemon=True))
    proc.start()
    try:
        if not parent.poll(60) or parent.recv() != 'ready':
            raise RuntimeError(f'{broker.name}: latency consumer did not start')
        with broker.connection() as conn:
            channel = conn.channel()
            # Declared on the publishing connection too: virtual transports such
            # as SQLAlchemy keep bindings per connection, in memory.
            bench_queue(QUEUE)(channel).declare()
            producer = Producer(channel, EXCHANGE, serializer='json')

            def send(i, **extra):
                producer.publish({'i': i, 't': time.time(), **extra}, routing_key=QUEUE)

            for i in range(-5, 0):  # warm-up: connections, caches, first claim
                send(i)
                time.sleep(0.05)
            time.sleep(0.5)
            # Idle window: no messages at all, only the transport's own activity.
            pids = [proc.pid] + ([broker.server_pid] if broker.server_pid else [])
            cpu0, t0 = [procs.cpu_seconds(p) for p in pids], time.monotonic()
            time.sleep(idle_window)
            cpu1, t1 = [procs.cpu_seconds(p) for p in pids], time.monotonic()
            for i in range(samples):
                send(i)
                time.sleep(spacing)
            send(-1, stop=True)
        if not parent.poll(60 + samples * spacing):
            raise RuntimeError(f'{broker.name}: latency consumer did not report')
        delays = parent.recv()
        proc.join(10)
    finally:
        procs.stop(proc)
    if len(delays) != samples:
        raise RuntimeError(f'{broker.name}: {len(delays)} of {samples} samples arrived')
    ms = sorted(d * 1000 for d in delays)
    pct = [100 * (b - a) / (t1 - t0) for a, b in zip(cpu0, cpu1)]
    return {'samples': samples, 'spacing_ms': spacing * 1000,
            'p50_ms': statistics.median(ms), 'p99_ms': _quantile(ms, 0.99),
            'max_ms': ms[-1], 'idle_window_s': t1 - t0,
            'idle_cpu_pct': sum(pct), 'idle_cpu_consumer_pct': pct[0],
            'idle_cpu_server_pct': pct[1] if len(pct) > 1 else None}


def _quantile(sorted_values, q):
    """Nearest-rank quantile: the value q of the samples are at or below."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]
