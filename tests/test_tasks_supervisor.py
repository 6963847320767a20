"""``python -m tasks workers`` keeps the box serving: restarts, wedges, shutdown."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest_plugins = ['tasks_fixtures']

SUPERVISOR = {'restart_backoff': 0.5, 'restart_backoff_max': 2, 'max_restarts': 3,
              'restart_window': 120, 'check_interval': 1, 'unresponsive_after': 3,
              'stuck_after': 3, 'shutdown_grace': 15}
LONG = {'options': {'num_predict': 1200}}  # 3 s at the fixture's 400 tokens/s


def start(env, config=None, **supervisor):
    from tasks_fixtures import wait_until
    # Redis redelivers a dead worker's request after the visibility timeout.
    env.configure(visibility_timeout=6, supervisor={**SUPERVISOR, **supervisor},
                  **(config or {}))
    proc = env.procs.start([sys.executable, '-m', 'tasks', 'workers', '--no-beat'],
                           env=env.env, name='workers')
    wait_until(lambda: env.procs.log(proc).count(' ready.') >= 2 or proc.poll() is not None,
               60, 'two workers')
    assert proc.poll() is None, env.procs.log(proc)
    return proc


def worker_pid(env, proc, model='gpt-oss:20b', nth=-1) -> int:
    return int(re.findall(rf'started worker for {re.escape(model)} \(pid (\d+)\)',
                          env.procs.log(proc))[nth])


def wait_log(env, proc, text, count=1, timeout=30):
    from tasks_fixtures import wait_until
    wait_until(lambda: env.procs.log(proc).count(text) >= count, timeout, repr(text))


@pytest.mark.slow
def test_dead_worker_restarted_others_serve_request_completes(any_broker_env):
    env = any_broker_env
    proc = start(env)
    import tasks
    held = tasks.submit('ann', 'executive', 'transcript', {'text': 'long', **LONG})
    env.wait_status(held.id, 'running', timeout=20)
    os.killpg(worker_pid(env, proc), signal.SIGKILL)
    # The other model's worker serves throughout.
    assert len(tasks.submit('bob', 'staff', 'search', {'input': 'x'}).get(timeout=20)
               ['embedding']) == 8
    wait_log(env, proc, 'starting it again in 0.5s')
    assert held.get(timeout=60)['done_reason'] == 'length'
    row = env.wait_status(held.id, 'succeeded')
    assert row.attempts == 2
    assert len(re.findall(r'started worker for gpt-oss:20b', env.procs.log(proc))) == 2
    assert proc.poll() is None


@pytest.mark.slow
def test_restart_limit_exits_naming_the_worker_and_its_log(tasks_env):
    proc = start(tasks_env, max_restarts=2)
    for n in range(3):
        wait_log(tasks_env, proc, 'started worker for gpt-oss:20b', n + 1)
        wait_log(tasks_env, proc, '[gpt-oss:20b]', 1)
        time.sleep(1)
        os.killpg(worker_pid(tasks_env, proc), signal.SIGKILL)
    assert proc.wait(30) == 1
    log = tasks_env.procs.log(proc)
    assert 'worker for gpt-oss:20b exited with -9, exit 3 within 120s: giving up' in log
    tail = log.split('Its last log lines:')[1]
    assert '    ' in tail and 'gpt-oss' in tail.lower()


@pytest.mark.slow
def test_wedged_worker_is_restarted(tasks_env):
    """A worker that stops answering (its main process stopped) is restarted, and
    the request it held runs on the new one."""
    proc = start(tasks_env)
    import tasks
    pid = worker_pid(tasks_env, proc)
    os.kill(pid, signal.SIGSTOP)
    try:
        queued = tasks.submit('ann', 'manager', 'transcript', {'text': 'x'})
        wait_log(tasks_env, proc, 'is wedged (no answer to ping for', timeout=30)
        assert queued.get(timeout=60)['response']
    finally:
        os.kill(pid, signal.SIGCONT) if _alive(pid) else None
    assert worker_pid(tasks_env, proc) != pid


@pytest.mark.slow
def test_request_making_no_progress_is_restarted(tasks_env):
    """A pool process stopped mid-request: past ollama.timeout, the worker is restarted
    and the request runs again."""
    proc = start(tasks_env, {'ollama': {'timeout': 3, 'stall_timeout': 1}}, stuck_after=1)
    import tasks
    stuck = tasks.submit('ann', 'executive', 'transcript',
                         {'text': 'x', 'options': {'num_predict': 600}})
    tasks_env.wait_status(stuck.id, 'running', timeout=20)
    [child] = subprocess.run(['pgrep', '-P', str(worker_pid(tasks_env, proc))],
                             capture_output=True, text=True).stdout.split()
    os.kill(int(child), signal.SIGSTOP)
    wait_log(tasks_env, proc, 'running over 5s, past ollama.timeout: no progress')
    assert stuck.get(timeout=60)['response']
    assert tasks_env.row(stuck.id).attempts == 2


@pytest.mark.slow
def test_pool_processes_killed_the_request_still_completes(tasks_env):
    """The issue's wedge: both pool processes of a prefork worker killed with -9."""
    proc = start(tasks_env, {'models': {'gpt-oss:20b': {'slots': 2, 'queue': 'gpu.gpt-oss'}}})
    import tasks
    held = tasks.submit('ann', 'executive', 'transcript', {'text': 'long', **LONG})
    tasks_env.wait_status(held.id, 'running', timeout=20)
    pid = worker_pid(tasks_env, proc)
    children = subprocess.run(['pgrep', '-P', str(pid)], capture_output=True,
                              text=True).stdout.split()
    assert len(children) == 2
    for child in children:
        os.kill(int(child), signal.SIGKILL)
    assert held.get(timeout=60)['response']
    later = tasks.submit('bob', 'manager', 'transcript', {'text': 'after'})
    assert later.get(timeout=60)['response']
    assert tasks_env.row(held.id).attempts == 2


@pytest.mark.parametrize('grace', [15, 0.5])
def test_warm_shutdown_waits_for_running_requests_up_to_the_grace(tasks_env, grace):
    proc = start(tasks_env, shutdown_grace=grace)
    import tasks
    running = tasks.submit('ann', 'executive', 'transcript', {'text': 'long', **LONG})
    tasks_env.wait_status(running.id, 'running', timeout=20)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(40) == 0
    log = tasks_env.procs.log(proc)
    assert f'waiting up to {grace:g}s for running requests' in log
    if grace > 5:
        assert 'finished their requests and exited' in log
        assert tasks_env.row(running.id).status == 'succeeded'
    else:
        assert re.search(r'stopped: killed after 0.5s, not yet exited: .*gpt-oss:20b', log)
        assert tasks_env.row(running.id).status == 'running'  # delivered again later


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
