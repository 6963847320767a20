"""Producer or consumer process for the chaos test.

    python chaos_client.py URL produce START COUNT RATE
    python chaos_client.py URL consume LOG_FILE HOLD
A producer publishes {"n": START..START+COUNT-1} at RATE messages a second, so
the consumers have work for the whole run.  A consumer appends "got N R" to
LOG_FILE when it receives message N (R: 1 if redelivered), works on it for
HOLD seconds, appends "done N", then acks.  A message {"poison": true} makes
the consumer process die on the spot.
"""
import os
import sys
import time

import kombu_sqlite  # noqa: F401
from kombu import Connection, Consumer, Queue

OPTIONS = {'visibility_timeout': 2.5, 'max_deliveries': 3, 'housekeeping_interval': 0.2}
QUEUE = Queue('chaos')


def produce(conn, start, count, rate):
    producer = conn.Producer()
    began = time.monotonic()
    for i, n in enumerate(range(start, start + count)):
        producer.publish({'n': n}, routing_key='chaos', declare=[QUEUE] if i == 0 else [])
        time.sleep(max(0.0, began + (i + 1) / rate - time.monotonic()))


def consume(conn, log_path, hold):
    log = open(log_path, 'a', buffering=1)

    def handle(body, message):
        if body.get('poison'):
            os._exit(3)  # dies holding its leases: they must run out
        log.write(f"got {body['n']} {int(message.delivery_info['redelivered'])}\n")
        time.sleep(hold)
        log.write(f"done {body['n']}\n")
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
            produce(connection, int(rest[0]), int(rest[1]), float(rest[2]))
        else:
            consume(connection, rest[0], float(rest[1]))
