"""kombu-level throughput: Producer.publish, and Consumer + ack."""
from __future__ import annotations

import time

from kombu import Consumer, Exchange, Producer, Queue

EXCHANGE = Exchange('bench', 'direct', durable=True)
PAYLOAD = 'x' * 100  # a small JSON message, the size of a typical task signature


def bench_queue(name: str) -> Queue:
    return Queue(name, EXCHANGE, routing_key=name, durable=True)


def publish(broker, queue_name: str, n: int, progress=None) -> dict:
    """Publish ``n`` small JSON messages; returns the rate."""
    queue = bench_queue(queue_name)
    with broker.connection() as conn:
        channel = conn.channel()
        queue(channel).declare()
        producer = Producer(channel, EXCHANGE, serializer='json')
        started = time.perf_counter()
        for i in range(n):
            producer.publish({'i': i, 'payload': PAYLOAD}, routing_key=queue_name)
            if progress and i and i % progress[0] == 0:
                progress[1](i, time.perf_counter() - started)
        elapsed = time.perf_counter() - started
    return {'messages': n, 'seconds': elapsed, 'rate': n / elapsed}


def consume(broker, queue_name: str, n: int, prefetch: int = 100,
            idle_timeout: float = 10.0) -> dict:
    """Consume and ack ``n`` messages already in the queue; returns the rate."""
    queue = bench_queue(queue_name)
    seen = 0

    def on_message(body, message):
        nonlocal seen
        message.ack()
        seen += 1

    with broker.connection() as conn:
        channel = conn.channel()
        consumer = Consumer(channel, [queue], callbacks=[on_message],
                            prefetch_count=prefetch, accept=['json'])
        with consumer:
            started = time.perf_counter()
            while seen < n:
                try:
                    conn.drain_events(timeout=idle_timeout)
                except TimeoutError:
                    raise RuntimeError(f'{broker.name}: only {seen} of {n} messages '
                                       f'arrived ({idle_timeout:.0f} s idle)') from None
            elapsed = time.perf_counter() - started
    return {'messages': n, 'seconds': elapsed, 'rate': n / elapsed,
            'prefetch_count': prefetch}


def purge(broker, queue_name: str) -> None:
    with broker.connection() as conn:
        bench_queue(queue_name)(conn.channel()).purge()
