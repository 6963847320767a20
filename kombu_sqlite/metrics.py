"""Prometheus exporter: queue state and lifetime counters, read at each scrape.

The counters live in the database, so they survive restarts and add up every
process that published or consumed; the exporter itself keeps no state.
Queue names are chosen by producers: label values carry them with control
characters escaped (:func:`printable`), so no scrape passes terminal sequences on.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .broker import Broker
from .printable import printable

#: counter name in the database -> (metric name, help)
COUNTERS = {
    'published': ('kombu_sqlite_published', 'Messages published to the queue.'),
    'acked': ('kombu_sqlite_acked', 'Messages acknowledged (done).'),
    'requeued': ('kombu_sqlite_requeued', 'Messages given back by a consumer (reject with requeue, channel closed).'),
    'lease_expired': ('kombu_sqlite_lease_expired', 'Leases that ran out: the holder died; the message is redelivered.'),
    'dead_lettered': ('kombu_sqlite_dead_lettered', 'Messages moved to dead letters (max deliveries or rejected).'),
    'expired': ('kombu_sqlite_expired', 'Messages dropped because their TTL passed before delivery.'),
    'rejected_publish': ('kombu_sqlite_rejected_publish', 'Publishes refused because the queue was full.'),
    'dropped': ('kombu_sqlite_dropped', 'Messages dropped by x-overflow=drop-head.'),
    'delayed_due': ('kombu_sqlite_delayed_due', 'Delayed messages that became deliverable.'),
    'late_settles': ('kombu_sqlite_late_settles',
                     'Acks, rejects or requeues after the lease ran out (changed nothing).'),
    'removed': ('kombu_sqlite_removed', 'Waiting messages taken out by Broker.remove (cancelled).'),
}


class QueueCollector:
    """A prometheus_client collector over :meth:`Broker.stats`.

    ``open_broker()`` gives a Broker for one scrape, closed after it: the
    HTTP server answers each scrape on a new thread, and a Broker keeps a
    connection per thread, so one Broker for all scrapes would keep one open
    file per scrape forever.
    """

    def __init__(self, open_broker: Callable[[], Broker]):
        self.open_broker = open_broker

    def collect(self):
        with self.open_broker() as broker:
            stats = broker.stats()
        ready = GaugeMetricFamily('kombu_sqlite_ready', 'Ready messages.',
                                  labels=['queue', 'priority'])
        delayed = GaugeMetricFamily('kombu_sqlite_delayed', 'Messages held until due.',
                                    labels=['queue'])
        leased = GaugeMetricFamily('kombu_sqlite_leased', 'Messages held by consumers.',
                                   labels=['queue'])
        dead = GaugeMetricFamily('kombu_sqlite_dead', 'Dead letters kept.', labels=['queue'])
        oldest = GaugeMetricFamily('kombu_sqlite_oldest_ready_age_seconds',
                                   'Age of the oldest ready message.', labels=['queue'])
        counters = {name: CounterMetricFamily(metric, help_, labels=['queue'])
                    for name, (metric, help_) in COUNTERS.items()}
        redelivered = CounterMetricFamily(
            'kombu_sqlite_redelivered', 'Messages delivered again (lease expired or requeued).',
            labels=['queue'])
        for raw_name, q in stats.items():
            queue = printable(raw_name)
            for priority, n in sorted(q['ready_by_priority'].items()):
                ready.add_metric([queue, str(priority)], n)
            delayed.add_metric([queue], q['delayed'])
            leased.add_metric([queue], q['leased'])
            dead.add_metric([queue], q['dead'])
            oldest.add_metric([queue], q['oldest_ready_age'] or 0.0)
            for name, family in counters.items():
                family.add_metric([queue], q['counters'].get(name, 0))
            redelivered.add_metric(
                [queue], q['counters'].get('lease_expired', 0) + q['counters'].get('requeued', 0))
        yield from (ready, delayed, leased, dead, oldest, redelivered, *counters.values())
