"""A Celery app left on Celery's default worker settings, for the event-loop tests.

Prefetch multiplier 4, early acks and ``worker_pool_putlocks`` on: what an app
that never copied our recommended settings runs with.
"""
import json
import os
import time

import kombu_sqlite  # noqa: F401  registers sqlite://
from celery import Celery

app = Celery('eventloop_app', broker=os.environ['TEST_BROKER_URL'])
app.conf.broker_connection_retry_on_startup = True
app.conf.broker_transport_options = json.loads(os.environ.get('TEST_TRANSPORT_OPTIONS', '{}'))


def _mark(name, value):
    # One line per event, so a test can see what ran and whether it finished.
    with open(os.path.join(os.environ['TEST_MARK_DIR'], name), 'a') as f:
        f.write(f'{value} {time.monotonic():.3f}\n')


@app.task
def sleep_and_mark(name, seconds):
    _mark(name, 'start')
    time.sleep(seconds)
    _mark(name, 'done')
