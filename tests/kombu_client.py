"""A kombu client run as a separate process by the transport tests.

    python kombu_client.py URL consume QUEUE EXCHANGE TYPE KEY --count N [--hold S]
        [--never-ack] [--linger S] [--quiet-housekeeper]
    python kombu_client.py URL publish EXCHANGE KEY BODY
Prints one JSON line per message received, flushed at once.
"""
import argparse
import json
import sys
import time

import kombu_sqlite  # noqa: F401
from kombu import Connection, Consumer, Exchange, Queue


def main():
    p = argparse.ArgumentParser()
    p.add_argument('url')
    p.add_argument('mode', choices=['consume', 'publish'])
    p.add_argument('args', nargs='*')
    p.add_argument('--count', type=int, default=1)
    p.add_argument('--hold', type=float, default=0.0)
    p.add_argument('--visibility-timeout', type=float, default=60.0)
    p.add_argument('--never-ack', action='store_true')
    p.add_argument('--linger', type=float, default=0.0,
                   help='stay connected this long after the last message')
    p.add_argument('--quiet-housekeeper', action='store_true',
                   help='no lease renewal or ack settling in the background')
    a = p.parse_args()
    options = {'visibility_timeout': a.visibility_timeout}
    if a.quiet_housekeeper:
        options.update(housekeeping_interval=3600, lease_renew_interval=3600)
    with Connection(a.url, transport_options=options) as conn:
        if a.mode == 'publish':
            exchange, key, body = a.args
            conn.Producer().publish(json.loads(body), exchange=exchange, routing_key=key)
            return
        queue_name, exchange, type, key = a.args
        queue = Queue(queue_name, Exchange(exchange, type), key)
        got = []

        def on_message(body, message):
            got.append(body)
            print(json.dumps({'body': body, 'redelivered': message.delivery_info['redelivered'],
                              'delivery_count': message.delivery_info['delivery_count']}),
                  flush=True)
            if a.hold:
                time.sleep(a.hold)
            if not a.never_ack:
                message.ack()

        with Consumer(conn, [queue], callbacks=[on_message], prefetch_count=1):
            print(json.dumps({'ready': True}), flush=True)
            while len(got) < a.count:
                conn.drain_events(timeout=60)
        if a.never_ack:
            time.sleep(3600)  # hold the leases until killed
        time.sleep(a.linger)


if __name__ == '__main__':
    sys.exit(main())
