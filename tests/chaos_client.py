"""Producer or consumer process for the chaos test.

    python chaos_client.py URL produce START COUNT
    python chaos_client.py URL consume LOG_FILE
A consumer appends "<n>" to LOG_FILE for each message it handled, then acks.
A message {"poison": true} makes the consumer process die on the spot.
"""
import os
import sys

import kombu_sqlite  # noqa: F401
from kombu import Connection, Consumer, Queue

OPTIONS = {'visibility_timeout': 1.5, 'max_deliveries': 3, 'housekeeping_interval': 0.2}
QUEUE = Queue('chaos')


def produce(conn, start, count):
    producer = conn.Producer()
    for n in range(start, start + count):
        producer.publish({'n': n}, routing_key='chaos', declare=[QUEUE] if n == start else [])


def consume(conn, log_path):
    log = open(log_path, 'a', buffering=1)

    def handle(body, message):
        if body.get('poison'):
            os._exit(3)  # dies holding its leases: they must run out
        log.write(f"{body['n']}\n")
        message.ack()

    # Prefetch 1: a consumer killed by poison holds no innocent messages, so only
    # the planted poison can reach max_deliveries however often consumers die.
    with Consumer(conn, [QUEUE], callbacks=[handle], prefetch_count=1):
        while True:
            conn.drain_events()


if __name__ == '__main__':
    url, mode, *rest = sys.argv[1:]
    with Connection(url, transport_options=OPTIONS) as connection:
        if mode == 'produce':
            produce(connection, int(rest[0]), int(rest[1]))
        else:
            consume(connection, rest[0])
