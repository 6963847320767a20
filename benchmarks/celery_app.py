"""The Celery app of the end-to-end benchmark: one task that does next to nothing.

Completion is counted without a result backend: each run of ``bench.tick``
appends one byte to the file named by BENCH_COUNTER (O_APPEND, one write
system call), so the file's size is the number of tasks done.
"""
import json
import os

from celery import Celery

from .brokers import register_sqlite

register_sqlite()

QUEUE = 'bench.celery'


def make_app(broker_url: str, transport_options: dict | None = None) -> Celery:
    app = Celery('benchmarks', broker=broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=QUEUE,
        broker_transport_options=transport_options or {},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    _fd = {}

    @app.task(name='bench.tick', shared=False)
    def tick():
        pid = os.getpid()
        if pid not in _fd:  # one descriptor per pool process
            _fd[pid] = os.open(os.environ['BENCH_COUNTER'],
                               os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(_fd[pid], b'.')

    return app


app = make_app(os.environ.get('BENCH_BROKER_URL', 'memory://'),
               json.loads(os.environ.get('BENCH_TRANSPORT_OPTIONS', '{}')))
