"""Configuration file errors and defaults, maintenance and report (no workers)."""
import json
import os
import subprocess
import sys

import pytest

from tasks import config, ledger, maintenance, report

pytest_plugins = ['tasks_fixtures']


def load(tmp_path, text, **env):
    path = tmp_path / 'tasks.toml'
    path.write_text(text)
    return config.load(path)


def test_defaults_run_as_they_are(tmp_path, monkeypatch):
    monkeypatch.setenv('TASKS_DATA_DIR', str(tmp_path / 'd'))
    monkeypatch.delenv('OLLAMA_HOST', raising=False)
    cfg = config.load('')
    assert cfg.broker_url == f'sqlite:///{tmp_path}/d/broker.db'
    assert cfg.result_backend == f'db+sqlite:///{tmp_path}/d/results.db'
    assert cfg.ollama_url == 'http://127.0.0.1:11434'
    assert {n: (m.queue, m.slots) for n, m in cfg.models.items()} == {
        'gpt-oss:20b': ('ollama.gpt-oss:20b', 1),
        'llama3.2-vision:11b': ('ollama.llama3.2-vision:11b', 1)}
    assert {n: (r.priority, r.limit) for n, r in cfg.roles.items()} == {
        'system': (0, None), 'executive': (1, 3), 'director': (2, 2), 'manager': (3, 2),
        'analyst': (4, 1), 'staff': (5, 1)}
    assert set(cfg.request_types) == {'transcript', 'document', 'compliance'}
    assert cfg.retention_days == 90
    assert cfg.gpu_slots == 2 and cfg.supervision.shutdown_grace == 900  # ollama.timeout
    monkeypatch.setenv('OLLAMA_HOST', '10.1.2.3:11434')  # Ollama's own variable wins
    assert config.load('').ollama_url == 'http://10.1.2.3:11434'


@pytest.mark.parametrize('text, message', [
    ('brokr_url = "x"', "brokr_url: unknown key"),
    ('[ollama]\nstall = 3', "ollama.stall: unknown key"),
    ('[ollama]\nstall_timeout = "soon"', "ollama.stall_timeout: expected float"),
    ('[retry]\nmax_retries = -1', 'retry.max_retries: must be at least 0'),
    ('[models."m"]\nslots = 0', 'models.m.slots: must be at least 1'),
    ('[models."m"]\nslot = 2', 'models.m.slot: unknown key'),
    ('[roles.boss]\nlimit = 2', 'roles.boss.priority: missing'),
    ('[roles.boss]\npriority = 12', 'roles.boss.priority: must be at most 9'),
    ('[request_types.x]\nmodel = "nope"', "request_types.x.model: unknown model 'nope'"),
    ('[request_types.x]\nmodel = "gpt-oss:20b"\ntask = "paint"',
     'request_types.x.task: must be one of generate, chat, embed'),
    ('[spike]\ncutoff_role = "ceo"', "spike.cutoff_role: unknown role 'ceo'"),
    ('[spike]\ndepth = 5\nresume_depth = 5', 'spike.resume_depth: must be below'),
    ('retention_days = [', 'not valid TOML'),
    ('[gpu]\nslots = 0', 'gpu.slots: must be at least 1'),
    ('[supervisor]\nmax_restarts = 0', 'supervisor.max_restarts: must be at least 1'),
    ('[request_types.x]\nmodel = "gpt-oss:20b"\nformat = "yaml"',
     'request_types.x.format: expected "json" or a JSON schema'),
    ('[request_types.x]\nmodel = "gpt-oss:20b"\ntools = [{type = "function"}]',
     'request_types.x.tools: only a chat request type can offer tools'),
])
def test_bad_config_names_key_and_file(tmp_path, text, message):
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, text)
    assert message in str(info.value)
    assert str(tmp_path / 'tasks.toml') in str(info.value)


def test_import_reads_nothing_config_is_loaded_on_first_use(tmp_path):
    data = tmp_path / 'data'
    code = ('import os, tasks; print("imported", os.path.exists(os.environ["TASKS_DATA_DIR"])); '
            'tasks.current()')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env={**os.environ, 'TASKS_CONFIG': str(tmp_path / 'none.toml'),
                              'TASKS_DATA_DIR': str(data)}, timeout=60)
    assert out.stdout.strip() == 'imported False'  # no file read, no directory made
    assert out.returncode == 1 and 'none.toml: no such file' in out.stderr
    assert not data.exists()


def test_bad_config_stops_the_cli_with_a_clear_message(tmp_path):
    path = tmp_path / 'tasks.toml'
    path.write_text('[models."m"]\nslots = "two"\n')
    out = subprocess.run([sys.executable, '-m', 'tasks', 'report'], capture_output=True,
                         text=True, env={**os.environ, 'TASKS_CONFIG': str(path),
                                         'TASKS_DATA_DIR': str(tmp_path)},
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=60)
    assert out.returncode != 0
    assert f'{path}: models.m.slots: expected int' in out.stderr


def _row(task_id, **kw):
    now = ledger.now()
    base = dict(task_id=task_id, user_id='u', role='staff', priority=5,
                request_type='transcript', model='gpt-oss:20b', queue='q',
                status='succeeded', created_at=now - 100, attempts=1, retries=0)
    return ledger.Request(**{**base, **kw})


def test_maintain_purges_expired_responses_and_expires_stale_requests(tmp_path, monkeypatch):
    monkeypatch.setenv('TASKS_DATA_DIR', str(tmp_path))
    cfg = config.load('')
    now = ledger.now()
    with ledger.session(cfg.ledger_url) as s:
        s.add(_row('old', response={'response': 'x'}, response_expires_at=now - 1))
        s.add(_row('new', response={'response': 'y'}, response_expires_at=now + 99))
        s.add(_row('stale', status='queued', created_at=now - 2 * 86400))
    out = maintenance.run(cfg)
    assert out['responses_purged'] == 1 and out['requests_expired'] == 1
    assert ledger.get(cfg.ledger_url, 'old').response is None
    assert ledger.get(cfg.ledger_url, 'new').response == {'response': 'y'}
    assert ledger.get(cfg.ledger_url, 'stale').status == 'expired'


def test_report_figures(tmp_path, monkeypatch):
    monkeypatch.setenv('TASKS_DATA_DIR', str(tmp_path))
    cfg = config.load('')
    now = 1_700_000_000.0
    with ledger.session(cfg.ledger_url) as s:
        for i in range(20):  # executives wait i/10 s, staff 10 + i s
            for role, wait in (('executive', i / 10), ('staff', 10 + i)):
                s.add(_row(f'{role}{i}', role=role, created_at=now - 3600 + i,
                           started_at=now - 3600 + i + wait, wait_seconds=wait,
                           run_seconds=9.0, completed_at=now - 3600 + i + wait + 9))
    data = report.build(cfg, since=now - 3600, now=now, depths={'ollama.gpt-oss:20b': 3})
    assert data['requests'] == 40 and data['processed_per_hour'] == pytest.approx(40)
    ex, st = data['wait_by_role']['executive'], data['wait_by_role']['staff']
    assert ex['avg_wait_s'] == pytest.approx(0.95) and ex['p95_wait_s'] == pytest.approx(1.8)
    assert st['p95_wait_s'] == 28
    util = data['model_utilisation']['gpt-oss:20b']
    assert util['busy_slot_seconds'] == 360 and util['utilisation'] == pytest.approx(0.1)
    gpu = data['gpu_utilisation']  # the box: 2 GPU slots (the sum of the models')
    assert gpu['slots'] == 2 and gpu['utilisation'] == pytest.approx(0.05)
    assert data['queue_depth']['gpt-oss:20b']['ready'] == 3
    assert data['peak_periods'][0]['submitted'] == 40
    json.dumps(data)  # --json output
    assert report.parse_since('2h', now=now) == now - 7200
    with pytest.raises(ValueError, match='--since'):
        report.parse_since('yesterday')
