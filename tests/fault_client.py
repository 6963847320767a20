"""A kombu consumer run as a separate process by tests/test_faults.py.

    python fault_client.py URL QUEUE [--prefetch N] [--visibility-timeout S]
        [--settle ack|reject|requeue] [--hold S] [--raise-at K] [--linger S]

Prints one JSON line per event, flushed at once: {"ready": true},
{"got": body}, {"settled": body}, {"raised": k}.
"""
import argparse
import json
import sys
import time

import kombu_sqlite  # noqa: F401  registers sqlite://
from kombu import Connection, Consumer, Queue


def say(**event):
    print(json.dumps(event), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('url')
    p.add_argument('queue')
    p.add_argument('--prefetch', type=int, default=1)
    p.add_argument('--count', type=int, default=1)
    p.add_argument('--visibility-timeout', type=float, default=60.0)
    p.add_argument('--settle', choices=['ack', 'reject', 'requeue', 'none'], default='ack')
    p.add_argument('--hold', type=float, default=0.0, help='seconds between getting and settling')
    p.add_argument('--raise-at', type=int, default=0, help='the callback raises on message K')
    p.add_argument('--linger', type=float, default=0.0,
                   help='stay connected this long after the last event')
    a = p.parse_args()
    options = {'visibility_timeout': a.visibility_timeout, 'housekeeping_interval': 0.2}
    with Connection(a.url, transport_options=options) as conn:
        got = []

        def on_message(body, message):
            got.append(body)
            say(got=body)
            if a.raise_at and len(got) == a.raise_at:
                raise RuntimeError(f'callback fails on message {len(got)}')
            time.sleep(a.hold)
            if a.settle == 'ack':
                message.ack()
            elif a.settle == 'reject':
                message.reject(requeue=False)
            elif a.settle == 'requeue':
                message.requeue()
            say(settled=body)

        with Consumer(conn, [Queue(a.queue)], callbacks=[on_message],
                      prefetch_count=a.prefetch):
            say(ready=True)
            try:
                while len(got) < a.count:
                    conn.drain_events(timeout=60)
            except RuntimeError as exc:
                say(raised=str(exc))
                time.sleep(a.linger)   # connected, consuming nothing more
                return
            time.sleep(a.linger)


if __name__ == '__main__':
    sys.exit(main())
