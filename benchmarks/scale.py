"""Scale suite: claim+ack with many messages queued, and many processes on one queue.

Queues are filled through the transport's own Producer (as an application
would), one message per publish, in batches of 1,000 between budget
checks.  A fill projected to take longer than the budget stops after its
first batches; its rate is reported and that depth is skipped.
"""
from __future__ import annotations

import logging
import multiprocessing
import queue as queue_mod
import time
from pathlib import Path

from kombu import Consumer, Producer

from . import procs
from .brokers import register_sqlite
from .kombu_bench import EXCHANGE, PAYLOAD, bench_queue, consume

QUEUE = 'bench.scale'
BATCH = 1_000  # how often the fill checks its budget


def fill(broker, n: int, budget: float, log) -> dict:
    """Publish ``n`` messages; stop early if the projected time exceeds ``budget``."""
    queue = bench_queue(QUEUE)
    with broker.connection() as conn:
        channel = conn.channel()
        queue(channel).declare()
        producer = Producer(channel, EXCHANGE, serializer='json')
        started, done = time.perf_counter(), 0
        while done < n:
            for i in range(done, min(done + BATCH, n)):
                producer.publish({'i': i, 'payload': PAYLOAD}, routing_key=QUEUE)
            done = min(done + BATCH, n)
            elapsed = time.perf_counter() - started
            projected = elapsed * n / done
            if done < n and done % 100_000 == 0:
                log(f'{broker.name}: filled {done:,} of {n:,} ({done / elapsed:,.0f}/s)')
            if done < n and projected > budget:
                return {'filled': done, 'fill_seconds': elapsed, 'fill_rate': done / elapsed,
                        'note': f'skipped: fill projected {projected:,.0f} s > '
                                f'{budget:,.0f} s budget'}
    return {'filled': n, 'fill_seconds': elapsed, 'fill_rate': n / elapsed}


def _drop(broker) -> None:
    """Remove a finished sqlite file: a million messages take hundreds of MB."""
    if broker.name in ('sqlite', 'sqla'):
        path = broker.url.split(':///', 1)[1]
        for suffix in ('', '-wal', '-shm', '-journal'):
            Path(path + suffix).unlink(missing_ok=True)


def depth_suite(broker, opts, log) -> list[dict]:
    rows = []
    budget = opts['fill_budget']
    for depth in opts['depths']:
        b = broker.fresh(f'depth-{depth}')
        log(f'{broker.name}: fill {depth:,} messages')
        row = {'queued': depth, **fill(b, depth, budget, log)}
        if row['filled'] == depth:
            sample = min(depth, opts['claim_sample'])
            log(f'{broker.name}: claim+ack {sample:,} of {depth:,} queued')
            row.update(consume(b, QUEUE, sample, opts['prefetch']))
        rows.append(row)
        _drop(b)
    return rows


def _consumer(broker, prefetch, ready, go, results, acked, total) -> None:
    register_sqlite()
    locked = 0

    class CountLocked(logging.Handler):  # the transport logs errors it retried through
        def emit(self, record):
            nonlocal locked
            locked += 'database is locked' in record.getMessage()
    logging.getLogger().addHandler(CountLocked(logging.WARNING))
    ids, first, last = [], None, None

    def on_message(body, message):
        nonlocal first, last
        message.ack()
        last = time.time()
        first = first or last
        ids.append(body['i'])
        with acked.get_lock():
            acked.value += 1

    with broker.connection() as conn:
        consumer = Consumer(conn.channel(), [bench_queue(QUEUE)], callbacks=[on_message],
                            prefetch_count=prefetch, accept=['json'])
        with consumer:
            ready.put(1)
            go.wait()
            idle_since = None
            while acked.value < total:  # all acked, by this process or the others
                try:
                    conn.drain_events(timeout=0.2)
                    idle_since = None
                except TimeoutError:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 2.0:  # nothing for 2 s: give up
                        break
                except Exception as exc:
                    if 'database is locked' not in str(exc) or locked > 1000:
                        raise
                    locked += 1
    results.put({'ids': ids, 'first': first, 'last': last, 'locked': locked})


def consumers(broker, nprocs: int, total: int, prefetch: int) -> dict:
    """``nprocs`` processes drain a queue of ``total`` messages at once."""
    ctx = multiprocessing.get_context('spawn')
    ready, results, go, acked = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value('l', 0)
    workers = [procs.track(ctx.Process(target=_consumer, daemon=True,
                                       args=(broker, prefetch, ready, go, results, acked,
                                             total)))
               for _ in range(nprocs)]
    try:
        for w in workers:
            w.start()
        for _ in workers:
            ready.get(timeout=60)
        started = time.time()
        go.set()
        reports = []
        for _ in workers:
            try:
                reports.append(results.get(timeout=600))
            except queue_mod.Empty:
                raise RuntimeError(f'{broker.name}: a consumer process did not report') from None
    finally:
        for w in workers:
            procs.stop(w)
    ids = [i for r in reports for i in r['ids']]
    last = max((r['last'] for r in reports if r['last']), default=started)
    return {'processes': nprocs, 'messages': len(ids), 'seconds': last - started,
            'rate': len(ids) / max(last - started, 1e-9),
            'per_process': [len(r['ids']) for r in reports],
            'locked_errors': sum(r['locked'] for r in reports),
            'duplicates': len(ids) - len(set(ids)), 'missing': total - len(set(ids))}


def left_in_store(broker, queue: str) -> int:
    """Messages of ``queue`` the broker still stores after every one was acked."""
    if broker.name == 'sqlite':
        from kombu_sqlite import Broker as Admin
        with Admin(broker.url) as admin:
            q = admin.stats().get(queue)
        return 0 if q is None else q['ready'] + q['leased'] + q['delayed'] + q['dead']
    if broker.name == 'sqla':  # kombu's SQLAlchemy transport keeps acked rows, marked
        import sqlite3
        path = broker.url.split(':///', 1)[1]
        with sqlite3.connect(path) as db:
            return db.execute('SELECT count(*) FROM kombu_message').fetchone()[0]
    import redis
    client = redis.Redis.from_url(broker.url)
    return client.llen(queue) + client.hlen('unacked')


def processes_suite(broker, opts, log) -> list[dict]:
    rows = []
    total = opts['per_process'] * opts['processes']
    for nprocs in sorted({1, opts['processes']}):
        b = broker.fresh(f'procs-{nprocs}')
        log(f'{broker.name}: fill {total:,}, then {nprocs} consumer process(es) drain it')
        filled = fill(b, total, float('inf'), log)
        row = consumers(b, nprocs, total, opts['prefetch'])
        row['fill_rate'] = filled['fill_rate']
        row['left_in_store'] = left_in_store(b, QUEUE)
        row['vs_single'] = row['rate'] / rows[0]['rate'] if rows else 1.0
        log(f'{broker.name}: {nprocs} process(es): {row["rate"]:,.0f} msg/s, '
            f'{row["locked_errors"]} locked, {row["duplicates"]} duplicates, '
            f'{row["missing"]} missing, {row["left_in_store"]} left in the store')
        rows.append(row)
        _drop(b)
    return rows


def run(brokers, opts, log) -> dict:
    return {b.name: {'depth': depth_suite(b, opts, log),
                     'processes': processes_suite(b, opts, log)} for b in brokers}
