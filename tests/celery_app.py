"""A small Celery app for the transport tests, configured by environment."""
import json
import os
import signal
import time

import kombu_sqlite  # noqa: F401  registers sqlite://
from celery import Celery
from kombu import Queue

app = Celery('celery_app',
             broker=os.environ['TEST_BROKER_URL'],
             backend=os.environ['TEST_RESULT_URL'])
app.conf.update(
    broker_transport_options={
        'visibility_timeout': float(os.environ.get('TEST_VISIBILITY_TIMEOUT', '60')),
        **json.loads(os.environ.get('TEST_TRANSPORT_OPTIONS', '{}'))},
    # Extra queues with arguments: {"name": {"x-max-length": 2, ...}}
    task_queues=[Queue('celery')] + [
        Queue(name, queue_arguments=arguments)
        for name, arguments in json.loads(os.environ.get('TEST_QUEUES', '{}')).items()],
    task_acks_late=os.environ.get('TEST_ACKS_LATE', '1') == '1',
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_lost_wait=2,  # report a killed child quickly
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


@app.task
def mark(name):
    _mark(name, 'run')


@app.task
def record(name, value):
    _mark(name, value)


@app.task
def poison():
    os.kill(os.getpid(), signal.SIGKILL)  # takes its worker process down, every time


@app.task(autoretry_for=(RuntimeError,), retry_backoff=2, retry_jitter=False,
          max_retries=5)
def flaky(name, failures):
    runs = len(open(os.path.join(os.environ['TEST_MARK_DIR'], name)).readlines()) \
        if os.path.exists(os.path.join(os.environ['TEST_MARK_DIR'], name)) else 0
    _mark(name, f'{time.time():.3f}')
    if runs < failures:
        raise RuntimeError(f'try {runs + 1} fails')
    return runs + 1
