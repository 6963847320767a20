"""Workers against a faulting simulator: retries, no-retry errors, stalls, kills."""
import os
import re
import signal
import sys
import time

import pytest

from celery.exceptions import CeleryError

pytest_plugins = ['tasks_fixtures']


def test_5xx_loading_and_refused_are_retried_then_succeed(tasks_env):
    tasks_env.configure()
    import tasks
    sim = tasks_env.sim
    tasks_env.worker()
    sim.fault('500', 'gpt-oss:20b', count=1)
    sim.fault('loading', 'gpt-oss:20b', count=1)
    result = tasks.submit('ann', 'manager', 'transcript', {'text': 'retry me'})
    assert result.get(timeout=30)['response']
    row = tasks_env.wait_status(result.id, 'succeeded')
    assert row.retries == 2 and row.attempts == 3 and row.error is None
    assert sim.stats()['calls']['/api/generate'] == 3

    sim.fault('refuse', seconds=1.5)  # the listening socket is closed meanwhile
    time.sleep(0.2)
    again = tasks.submit('ann', 'manager', 'transcript', {'text': 'refused first'})
    assert again.get(timeout=30)['response']
    row = tasks_env.wait_status(again.id, 'succeeded')
    assert row.retries >= 1


def test_missing_model_and_bad_request_fail_at_once(tasks_env):
    tasks_env.configure()
    import tasks
    tasks_env.worker()
    tasks_env.sim.fault('unknown', 'gpt-oss:20b', count=1)
    result = tasks.submit('ann', 'manager', 'transcript', {'text': 'x'})
    with pytest.raises(Exception, match='model not found') as info:
        result.get(timeout=30)
    assert not isinstance(info.value, CeleryError)
    row = tasks_env.wait_status(result.id, 'failed')
    assert row.retries == 0 and row.attempts == 1
    assert 'OllamaRequestError' in row.error and 'ollama pull gpt-oss:20b' in row.error


def test_stall_timeout_frees_the_slot(tasks_env):
    tasks_env.configure(ollama={'stall_timeout': 1.0})
    import tasks
    tasks_env.worker()
    tasks_env.sim.fault('stall', 'gpt-oss:20b', count=1, seconds=2)
    t0 = time.monotonic()
    hung = tasks.submit('ann', 'manager', 'transcript', {'text': 'hang'})
    nxt = tasks.submit('bob', 'manager', 'transcript', {'text': 'next'})
    with pytest.raises(Exception, match='stalled: nothing received for 1s'):
        hung.get(timeout=30)
    row = tasks_env.wait_status(hung.id, 'failed')
    assert row.retries == 0 and 0.9 < row.run_seconds < 5
    assert nxt.get(timeout=30)['response']
    assert time.monotonic() - t0 < 15


def test_worker_killed_mid_task_runs_again_once(tasks_env):
    # Slow tokens so the request is surely running when the worker is killed.
    tasks_env.configure(visibility_timeout=3)
    import tasks
    worker = tasks_env.worker()
    result = tasks.submit('ann', 'executive', 'transcript',
                          {'text': 'long', 'options': {'num_predict': 600}})
    tasks_env.wait_status(result.id, 'running', timeout=20)
    tasks_env.procs.kill(worker)  # SIGKILL to the whole group: main process and child
    row = tasks_env.row(result.id)
    assert row.status == 'running' and row.attempts == 1

    tasks_env.worker(name='second-worker')
    answer = result.get(timeout=60)
    assert answer['response'].count('tok') == 600
    row = tasks_env.wait_status(result.id, 'succeeded')
    assert row.attempts == 2 and row.completion_tokens == 600
    assert [r.task_id for r in tasks_env.rows()] == [result.id]  # one row, not two


def test_embedding_requests_are_batched(tasks_env):
    pytest.importorskip('celery_batches', reason='celery-batches is not installed: '
                        'embedding requests are sent one by one')
    tasks_env.configure()
    import tasks
    results = [tasks.submit(f'u{i}', 'staff', 'search', {'input': f'doc {i}'})
               for i in range(6)]
    results.append(tasks.submit('multi', 'staff', 'search', {'input': ['a', 'b']}))
    tasks_env.worker('nomic-embed-text')
    answers = [r.get(timeout=30) for r in results]
    assert all(len(a['embedding']) == 8 for a in answers[:6])
    assert len(answers[6]['embeddings']) == 2
    batches = tasks_env.sim.stats()['embed_batches']
    assert sum(batches) == 8 and max(batches) > 1 and len(batches) < 7, batches
    rows = tasks_env.rows()
    assert {r.status for r in rows} == {'succeeded'} and len(rows) == 7
    assert all(r.attempts == 1 and r.prompt_tokens for r in rows)


def test_embedding_batch_retried_after_5xx(tasks_env):
    tasks_env.configure()
    import tasks
    tasks_env.sim.fault('500', 'nomic-embed-text', count=1)
    tasks_env.worker('nomic-embed-text')
    result = tasks.submit('u', 'staff', 'search', {'input': 'again'})
    assert len(result.get(timeout=30)['embedding']) == 8
    row = tasks_env.wait_status(result.id, 'succeeded')
    assert row.retries == 1 and row.attempts == 2


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_workers_command_starts_one_worker_per_model_and_stops(tasks_env, sig):
    tasks_env.configure()
    import tasks
    from tasks_fixtures import wait_until
    proc = tasks_env.procs.start([sys.executable, '-m', 'tasks', 'workers', '--no-beat'],
                                 env=tasks_env.env, name='workers')
    wait_until(lambda: tasks_env.procs.log(proc).count('ready.') == 2, 60, 'two workers')
    log = tasks_env.procs.log(proc)
    assert '-Q gpu.gpt-oss -c 1 --prefetch-multiplier 1' in log
    assert '-Q gpu.embed -c 1 --prefetch-multiplier 4' in log
    assert tasks.submit('u', 'staff', 'transcript', {'text': 'x'}).get(timeout=30)
    pids = [int(p) for p in re.findall(r'\(pid (\d+)\)', log)]
    assert len(pids) == 2
    proc.send_signal(sig)
    assert proc.wait(30) == 0
    assert 'stopping workers' in tasks_env.procs.log(proc)
    for pid in pids:  # reaped: no worker is left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
