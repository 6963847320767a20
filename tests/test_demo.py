"""``python -m tasks demo`` at a small scale: its report, its picture, its clean exit."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROLES = ['system', 'executive', 'director', 'manager', 'analyst', 'staff']


def _gone(pid) -> bool:
    """No process is left in the group the demo started (each child leads one)."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _demo(tmp_path, *args, timeout=90):
    env = {**os.environ, 'FLOWER_PASSWORD': 'test-pass', 'PYTHONUNBUFFERED': '1',
           'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')}
    for key in ('TASKS_CONFIG', 'TASKS_DATA_DIR', 'OLLAMA_HOST'):
        env.pop(key, None)
    return subprocess.Popen(
        [sys.executable, '-m', 'tasks', 'demo', '--data-dir', str(tmp_path / 'run'),
         '--flower-port', '0', *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _small_demo(tmp_path, *args):
    """A small --strict run to its end: (the process, its output)."""
    proc = _demo(tmp_path, '--scale', '0.15', '--duration', '10', '--strict', *args)
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, out


@pytest.mark.slow
def test_small_demo_meets_its_criteria(tmp_path):
    proc, out = _small_demo(tmp_path)
    assert proc.returncode == 0, out
    run = tmp_path / 'run'
    report = json.loads((run / 'report.json').read_text())

    # Nothing left running: every process group the demo started is gone.
    assert set(report['processes']) == {'simulator', 'flower', 'worker-gpt-oss:20b',
                                        'worker-llama3.2-vision:11b'}
    assert all(_gone(pid) for pid in report['processes'].values()), report['processes']

    # The six criteria, each passed, and the figures behind them.
    names = [c['name'] for c in report['criteria']]
    assert len(names) == 6 and all(c['pass'] for c in report['criteria']), report['criteria']
    assert 'PASS' in out and 'FAIL' not in out
    burst = report['wait_by_role_burst']
    assert burst['executive']['p95_s'] <= 0.25 * burst['staff']['p95_s']
    for m in report['models'].values():
        assert m['while_waiting'] >= 0.9 and m['busy_slot_s'] > 0
    req = report['requests']
    assert req['submitted'] == req['ledger_rows'] == req['admitted'] + req['rejected']
    assert req['by_status'].get('succeeded') == req['admitted'] > 0
    assert sum(report['rejections'].values()) == req['rejected'] > 0
    # Admission control did its job: spike mode engaged and refused, limits refused.
    assert report['spike_episodes'] and report['rejections']['spike mode'] > 0
    assert report['rejections']['user limit'] > 0
    assert set(report['wait_by_role']) == set(ROLES)
    for w in report['wait_by_role'].values():
        assert 0 <= w['p50_s'] <= w['p95_s'] <= w['max_s']
    assert report['throughput']['per_minute'] > 0
    assert report['timeline']['t'] and set(report['timeline']['ready_by_role']) == set(ROLES)
    assert max(report['timeline']['running']) == 3  # every slot was busy at some point
    gpu = report['gpu']  # GPU-wide, across models
    assert gpu['slots'] == 3 and gpu['busy_slot_s'] == pytest.approx(
        sum(m['busy_slot_s'] for m in report['models'].values()))
    assert 'GPU, all models' in out

    # Flower answered with the password, and refused without it.
    flower = report['flower']
    assert flower['polls_ok'] >= 1 and flower['refuses_without_password'] is True
    assert len(flower['workers_seen']) == 2
    assert flower['url'] in out and 'test-pass' in out

    png = (run / 'report.png').read_bytes()
    assert png.startswith(b'\x89PNG\r\n\x1a\n') and len(png) > 10_000
    assert str(run / 'report.json') in out


@pytest.mark.slow
def test_strict_fails_without_admission_control(tmp_path):
    """Run without spike mode and per-user limits: each has a criterion that fails."""
    proc, out = _small_demo(tmp_path, '--without', 'spike-mode', '--without', 'user-limits')
    assert proc.returncode == 1, out
    report = json.loads((tmp_path / 'run' / 'report.json').read_text())
    failed = [c['name'] for c in report['criteria'] if not c['pass']]
    for criterion in ('spike mode engaged', 'per-user limits'):
        assert [n for n in failed if n.startswith(criterion)], report['criteria']
        assert re.search(rf'FAIL {criterion}', out), out
    assert report['run']['without'] == ['spike-mode', 'user-limits']
    assert not report['spike_episodes'] and not report['rejections']  # nothing refused


def test_ctrl_c_stops_everything(tmp_path):
    proc = _demo(tmp_path, '--scale', '0.1', '--duration', '30')
    try:
        seen = ''
        # Interrupt once the replay runs (the workers and Flower are up).
        while 'Replaying' not in seen:
            line = proc.stdout.readline()
            assert line, seen
            seen += line
        pids = _pids(seen)
        assert len(pids) == 4, seen
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=40)
        out = seen + out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert 'interrupted' in out
    assert all(_gone(pid) for pid in pids), pids


def _pids(out: str) -> list[int]:
    return [int(m) for m in re.findall(r'^started \S+ \(pid (\d+)', out, re.MULTILINE)]
