"""End to end: submit, real workers, the simulator, the ledger; sqlite and Redis."""
import json


pytest_plugins = ['tasks_fixtures']

ROLES = ['staff', 'analyst', 'manager', 'director', 'executive', 'system']


def test_backlog_is_served_by_role_priority(any_broker_env):
    env = any_broker_env
    env.configure()
    import tasks
    # A backlog from every role, lowest priority first, before any worker runs.
    results = []
    for i, role in enumerate(ROLES * 2):
        results.append(tasks.submit(f'user-{i}', role, 'transcript', {'text': f'meeting {i}'}))
    assert {r.status for r in env.rows()} == {'queued'}

    env.worker('gpt-oss:20b')
    answers = [r.get(timeout=60) for r in results]
    assert all(a['response'].startswith('tok0') for a in answers)

    rows = sorted(env.rows(), key=lambda r: r.started_at)
    served = [r.role for r in rows]
    priorities = [tasks.current().roles[role].priority for role in served]
    assert priorities == sorted(priorities), served
    assert {r.status for r in rows} == {'succeeded'}
    for r in rows:
        assert r.attempts == 1 and r.completion_tokens == 8 and r.prompt_tokens
        assert r.wait_seconds >= 0 and r.run_seconds > 0
        assert r.response['response'] == r.response['response'].strip() + ' '
        assert r.response_expires_at > r.completed_at + 89 * 86400

    report = json.loads(env.run('report', '--json').stdout)
    assert report['requests'] == 12 and report['by_status'] == {'succeeded': 12}
    waits = report['wait_by_role']
    assert waits['system']['avg_wait_s'] < waits['staff']['avg_wait_s']
    assert report['model_utilisation']['gpt-oss:20b']['busy_slot_seconds'] > 0
    assert report['queue_depth']['gpt-oss:20b']['ready'] == 0


def test_users_of_one_priority_take_turns(tasks_env):
    """x-client fair scheduling (kombu_sqlite): a heavy user does not starve others."""
    tasks_env.configure()
    import tasks
    results = [tasks.submit('heavy', 'system', 'transcript', {'text': f'h{i}'})
               for i in range(4)]
    results += [tasks.submit('light', 'system', 'transcript', {'text': f'l{i}'})
                for i in range(2)]
    tasks_env.worker()
    for r in results:
        r.get(timeout=30)
    served = [r.user_id for r in sorted(tasks_env.rows(), key=lambda r: r.started_at)]
    assert served == ['heavy', 'light', 'heavy', 'light', 'heavy', 'heavy']
