"""A small Celery app for the transport tests, configured by environment."""
import os
import time

import kombu_sqlite  # noqa: F401  registers sqlite://
from celery import Celery

app = Celery('celery_app',
             broker=os.environ['TEST_BROKER_URL'],
             backend=os.environ['TEST_RESULT_URL'])
app.conf.update(
    broker_transport_options={
        'visibility_timeout': float(os.environ.get('TEST_VISIBILITY_TIMEOUT', '60'))},
    task_acks_late=os.environ.get('TEST_ACKS_LATE', '1') == '1',
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


def _mark(name, value):
    # One line per execution, so a test can count runs across processes.
    with open(os.path.join(os.environ['TEST_MARK_DIR'], name), 'a') as f:
        f.write(f'{value} {os.getpid()}\n')


@app.task
def add(x, y):
    return x + y


@app.task
def sleep_and_mark(name, seconds):
    _mark(name, 'start')
    time.sleep(seconds)
    _mark(name, 'done')
    return seconds
