"""One GPU budget across models: the cap, priority across models, crash safety."""
import os
import signal
import time

import pytest

pytest_plugins = ['tasks_fixtures']

LONG = {'options': {'num_predict': 800}}  # 2 s at 400 tokens/s


@pytest.mark.slow
def test_gpu_slots_cap_models_serve_by_role_across_models_and_free_on_kill(tasks_env):
    from tasks_fixtures import start_simulator
    sim = start_simulator(tasks_env.procs, '--token-rate', '400',
                          '--models', 'gpt-oss:20b=2,llama3.2-vision:11b=1')
    tasks_env.env['OLLAMA_HOST'] = sim.url
    tasks_env.sim = sim
    tasks_env.configure(
        gpu={'slots': 1},
        models={'gpt-oss:20b': {'slots': 2, 'queue': 'gpu.gpt-oss'},
                'llama3.2-vision:11b': {'slots': 1, 'queue': 'gpu.vision'}},
        request_types={'transcript': {'model': 'gpt-oss:20b', 'prompt': '{text}'},
                       'document': {'model': 'llama3.2-vision:11b', 'task': 'chat',
                                    'prompt': '{text}'},
                       'compliance': {'model': 'gpt-oss:20b', 'prompt': '{text}'},
                       'search': {'model': 'gpt-oss:20b', 'prompt': '{text}'}})
    import tasks
    text_worker = tasks_env.worker('gpt-oss:20b')
    tasks_env.worker('llama3.2-vision:11b')
    staff = [tasks.submit(f'staff-{i}', 'staff', 'transcript', {'text': str(i), **LONG})
             for i in range(3)]
    for r in staff[:2]:  # one on the GPU, one in its worker waiting for it
        tasks_env.wait_status(r.id, 'running')
    time.sleep(0.5)
    # An executive's document (another model) arrives after the waiting transcript,
    # and still goes first when the GPU slot frees.
    boss = tasks.submit('boss', 'executive', 'document', {'text': 'board pack', **LONG})
    for r in staff + [boss]:
        r.get(timeout=60)
    assert sim.stats()['max_running_total'] == 1  # 3 model slots, 1 GPU slot
    rows = {r.task_id: r for r in tasks_env.rows()}
    second = sorted(rows[r.id].started_at for r in staff)[1]
    assert rows[boss.id].started_at < second, 'the executive went after a staff request'
    assert rows[boss.id].wait_seconds > 0.5  # it waited for the GPU, and the ledger says so

    # A worker killed holding the GPU slot frees it at once.
    hogs = [tasks.submit(f'staff-{i}', 'staff', 'transcript', {'text': 'x', **LONG})
            for i in range(2)]
    tasks_env.wait_status(hogs[0].id, 'running')
    time.sleep(0.5)
    waiting = tasks.submit('boss', 'executive', 'document', {'text': 'next', **LONG})
    time.sleep(0.5)
    assert tasks_env.row(waiting.id).status == 'running'  # in its worker, waiting for the GPU
    killed_at = time.time()
    os.killpg(text_worker.pid, signal.SIGKILL)
    waiting.get(timeout=30)
    row = tasks_env.row(waiting.id)
    assert row.started_at - killed_at < 1.5, row.started_at - killed_at
