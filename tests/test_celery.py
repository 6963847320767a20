"""Celery on the sqlite transport: real workers, `celery inspect`, kill -9, Flower."""
import base64
import json
import socket
import time
import urllib.request

import pytest

from conftest import free_port, wait_for


@pytest.mark.parametrize('pool,acks_late', [
    ('prefork', '1'), ('prefork', '0'), ('threads', '1'), ('solo', '0')])
def test_tasks_run_on_every_pool(celery_env, pool, acks_late):
    app = celery_env.configure(TEST_ACKS_LATE=acks_late)
    # Published before any worker exists: the queue and binding are stored.
    results = [app.add.delay(i, i) for i in range(20)]
    celery_env.worker('-P', pool, '-c', '2')
    assert [r.get(timeout=60) for r in results] == [2 * i for i in range(20)]


def test_celery_inspect_and_control_answer(celery_env):
    celery_env.configure()
    celery_env.worker('-c', '1', name='alpha')
    node = f'alpha@{socket.gethostname()}'
    # Naming the destination makes the command return as soon as it answers.
    ping = celery_env.run('inspect', 'ping', '-d', node, '-t', '10')
    assert ping.returncode == 0, ping.stderr
    assert 'alpha@' in ping.stdout and 'pong' in ping.stdout
    stats = celery_env.run('inspect', 'stats', '--json', '-d', node, '-t', '10')
    reply = json.loads(stats.stdout)
    (node, info), = reply.items()
    assert node.startswith('alpha@') and info['broker']['transport'] == 'sqlite'
    ctl = celery_env.run('control', 'add_consumer', 'extra', '-d', node, '-t', '10')
    assert 'add consumer extra' in ctl.stdout, ctl.stdout + ctl.stderr


def test_worker_killed_mid_task_loses_nothing(celery_env, procs):
    app = celery_env.configure(TEST_VISIBILITY_TIMEOUT=3)
    doomed = celery_env.worker('-P', 'solo', name='doomed')
    result = app.sleep_and_mark.delay('job', 8)
    wait_for(lambda: celery_env.marks_of('job'), 30, what='the task to start')
    procs.kill(doomed)                          # SIGKILL to the worker's process group
    app.sleep_and_mark.delay('after', 0)        # the queue keeps flowing
    celery_env.worker('-P', 'solo', name='rescuer')
    # The lease runs out and the rescuer runs the task to the end: the caller gets its result.
    assert result.get(timeout=60) == 8
    wait_for(lambda: celery_env.marks_of('after'), 30, what='the next task')
    runs = [line.split() for line in celery_env.marks_of('job')]
    assert [r[0] for r in runs] == ['start', 'start', 'done']
    assert runs[0][1] != runs[1][1] == runs[2][1]   # begun by the doomed, finished by the rescuer


@pytest.mark.slow
def test_task_three_times_longer_than_visibility_timeout_runs_once(celery_env):
    app = celery_env.configure(TEST_VISIBILITY_TIMEOUT=2)
    celery_env.worker('-c', '1', name='first')
    celery_env.worker('-c', '1', name='second')   # would take a redelivered copy
    result = app.sleep_and_mark.delay('long', 6)
    assert result.get(timeout=60) == 6
    time.sleep(3)                                  # a duplicate would have started by now
    assert [line.split()[0] for line in celery_env.marks_of('long')] == ['start', 'done']


def _get_json(url, auth=None):
    request = urllib.request.Request(url)
    if auth:
        request.add_header('Authorization',
                           'Basic ' + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_flower_shows_the_worker_online_and_tasks_succeeded(celery_env, procs):
    app = celery_env.configure()
    celery_env.worker('-c', '1', '-E', name='gpu')
    port = free_port()
    flower = procs.start(
        celery_env.celery('flower', f'--port={port}', '--address=127.0.0.1',
                          '--basic-auth=ops:secret'),
        env=celery_env.env, name='flower')
    base = f'http://127.0.0.1:{port}'

    def workers():
        try:
            return _get_json(f'{base}/api/workers?refresh=1', 'ops:secret')
        except OSError:
            return None
    online = wait_for(workers, 60, interval=0.5, what='Flower to list the worker')
    assert any(name.startswith('gpu@') for name in online), online
    results = [app.add.delay(i, 1) for i in range(5)]
    assert [r.get(timeout=60) for r in results] == [1, 2, 3, 4, 5]
    ids = {r.id for r in results}

    def succeeded():
        tasks = _get_json(f'{base}/api/tasks', 'ops:secret')
        return {i for i, t in tasks.items() if t['state'] == 'SUCCESS'} >= ids
    wait_for(succeeded, 30, interval=0.5, what='Flower to see the tasks succeed')
    info = _get_json(f'{base}/api/task/info/{results[0].id}', 'ops:secret')
    assert info['state'] == 'SUCCESS' and info['worker'].startswith('gpu@')
    assert flower.poll() is None
