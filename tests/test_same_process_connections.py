"""A process with several connections to one file keeps its commits visible.

Found in the benchmark: the harness publishes through a new Celery app per
run while the previous app's connection is still open, and stops each
worker before the next starts; the warm-up task of a later run was never
run.  Opening the second connection read the file's header with ``open()``;
its ``close()`` dropped the POSIX locks of the first connection, so the
stopped worker, seeing no other process on the file, deleted the ``-wal``
at its last close, and the first connection's later commits went to the
deleted file: no other process ever saw them.
"""
import os

from kombu import Connection

from conftest import wait_for


def test_publisher_with_two_connections_outlives_a_worker_stop(celery_env, procs):
    tasks = celery_env.configure()
    app = tasks.app
    url = celery_env.env['TEST_BROKER_URL']
    wal = url[len('sqlite:///'):] + '-wal'
    first = app.connection_for_write()
    second = Connection(url)
    try:
        tasks.mark.apply_async(('before',), connection=first)
        second.connect()  # a second connection in this process, as a new app opens

        worker = celery_env.worker('--pool', 'solo', name='first')
        wait_for(lambda: celery_env.marks_of('before'), 60, what='the first task')
        procs.stop(worker)
        assert os.path.exists(wal), 'the -wal was deleted while this process has it open'

        tasks.mark.apply_async(('after',), connection=first)
        celery_env.worker('--pool', 'solo', name='second')
        wait_for(lambda: celery_env.marks_of('after'), 30,
                 what='the task published after the first worker stopped')
    finally:
        second.release()
        first.release()
        app.close()
