"""Submitting over HTTP through Flower's API, with basic auth on."""
import sys

import httpx

pytest_plugins = ['tasks_fixtures']


def test_submit_over_flower_http_api(tasks_env):
    from tasks_fixtures import free_port, wait_http_ok
    tasks_env.configure()
    tasks_env.worker()
    port = free_port()
    flower = tasks_env.procs.start(
        [sys.executable, '-m', 'celery', '-A', 'tasks', 'flower', f'--port={port}',
         '--address=127.0.0.1', '--basic-auth=ops:s3cret'], env=tasks_env.env, name='flower')
    base = f'http://127.0.0.1:{port}'

    wait_http_ok(tasks_env.procs, flower, f'{base}/healthcheck', 30, 'flower')
    url = f'{base}/api/task/async-apply/tasks.request'
    body = {'args': ['ann', 'director', 'transcript', {'text': 'over http'}]}

    assert httpx.post(url, json=body).status_code == 401  # no credentials
    assert httpx.post(url, json=body, auth=('ops', 'wrong')).status_code == 401

    r = httpx.post(url, json=body, auth=('ops', 's3cret'), timeout=10)
    assert r.status_code == 200, r.text
    task_id = r.json()['task-id']
    row = tasks_env.wait_status(task_id, 'succeeded')
    assert (row.user_id, row.role, row.priority) == ('ann', 'director', 2)
    result = httpx.get(f'{base}/api/task/result/{task_id}', auth=('ops', 's3cret')).json()
    assert result['state'] == 'SUCCESS' and result['result']['response'].startswith('tok0')

    # A refusal is the request's FAILURE, with the reason, not an empty HTTP 500.
    bad = {'args': ['ann', 'intern', 'transcript', {'text': 'x'}]}
    r = httpx.post(url, json=bad, auth=('ops', 's3cret'), timeout=10)
    assert r.status_code == 200 and r.json()['state'] == 'FAILURE'
    result = httpx.get(f'{base}/api/task/result/{r.json()["task-id"]}',
                       auth=('ops', 's3cret')).json()
    assert 'unknown role' in str(result['result'])
