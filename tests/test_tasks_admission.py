"""Admission: per-user limits, spike mode, full queues, refusals."""
import logging

import pytest

pytest_plugins = ['tasks_fixtures']


def test_unknown_names_are_refused_with_nothing_recorded(tasks_env):
    tasks_env.configure()
    import tasks
    for args, word in [(('u', 'intern', 'transcript'), 'unknown role'),
                       (('u', 'staff', 'poem'), 'unknown request type')]:
        with pytest.raises(ValueError, match=word):
            tasks.submit(*args, {'text': 'x'})
    with pytest.raises(ValueError, match="unknown model 'llama9'"):
        tasks.submit('u', 'staff', 'transcript', {'text': 'x'}, model='llama9')
    with pytest.raises(ValueError, match="needs payload key 'text'"):
        tasks.submit('u', 'staff', 'transcript', {'body': 'x'})
    assert tasks_env.rows() == []


def test_per_user_limit_until_a_request_finishes(tasks_env):
    tasks_env.configure()
    import tasks
    first = tasks.submit('ann', 'analyst', 'transcript', {'text': 'a'})  # analyst: 1
    with pytest.raises(tasks.ResourceLimitExceeded, match="'ann' already has 1"):
        tasks.submit('ann', 'analyst', 'transcript', {'text': 'b'})
    # Limits are per user and per role: others are not affected.
    tasks.submit('bob', 'analyst', 'transcript', {'text': 'c'})
    exec_results = [tasks.submit('eve', 'executive', 'transcript', {'text': str(i)})
                    for i in range(3)]
    with pytest.raises(tasks.ResourceLimitExceeded):
        tasks.submit('eve', 'executive', 'transcript', {'text': 'fourth'})
    statuses = sorted(r.status for r in tasks_env.rows())
    assert statuses == ['queued'] * 5 + ['rejected'] * 2

    tasks_env.worker()
    first.get(timeout=30)
    tasks_env.wait_status(first.id, 'succeeded')
    again = tasks.submit('ann', 'analyst', 'transcript', {'text': 'd'})
    assert again.get(timeout=30)['response']
    for r in exec_results:
        r.get(timeout=30)


def test_spike_mode_admits_only_executives_and_ends(tasks_env, caplog):
    tasks_env.configure(spike={'depth': 3, 'resume_depth': 1, 'cutoff_role': 'executive'})
    import tasks
    from tasks import admission, ledger
    caplog.set_level(logging.WARNING, logger='tasks.alerts')
    backlog = [tasks.submit('batch', 'system', 'transcript', {'text': str(i)})
               for i in range(4)]  # 4 waiting > 3: the next look enters spike mode
    with pytest.raises(tasks.Overloaded, match='spike mode') as info:
        tasks.submit('sam', 'staff', 'transcript', {'text': 'x'})
    # No run history yet: the hint is how long the 4 waiting take on the model's 1 slot.
    assert info.value.retry_after == 4 * admission.DEFAULT_RUN_SECONDS
    with pytest.raises(tasks.Overloaded):
        tasks.submit('dan', 'director', 'transcript', {'text': 'x'})
    vip = tasks.submit('vic', 'executive', 'transcript', {'text': 'x'})
    assert any('spike mode ON' in m for m in caplog.messages)

    tasks_env.worker()
    for r in backlog + [vip]:
        r.get(timeout=30)
    staff = tasks.submit('sam', 'staff', 'transcript', {'text': 'y'})  # depth 0: mode ends
    assert staff.get(timeout=30)
    assert any('spike mode OFF' in m for m in caplog.messages)
    with ledger.session(tasks_env.cfg.ledger_url) as s:
        [episode] = s.query(ledger.SpikeEpisode).all()
        assert episode.refused == 2 and episode.ended_at is not None
    rejected = [r for r in tasks_env.rows() if r.status == 'rejected']
    assert sorted(r.role for r in rejected) == ['director', 'staff']
    assert all('spike mode' in r.error for r in rejected)


def test_full_queue_is_overloaded_with_retry_hint(tasks_env):
    tasks_env.configure(models={'gpt-oss:20b': {'slots': 1, 'max_queue': 2}})
    import tasks
    from tasks import admission
    for i in range(2):
        tasks.submit(f'u{i}', 'system', 'transcript', {'text': 'x'})
    with pytest.raises(tasks.Overloaded, match='is full') as info:
        tasks.submit('u9', 'system', 'transcript', {'text': 'x'})
    assert info.value.retry_after == 2 * admission.DEFAULT_RUN_SECONDS   # 2 ahead, 1 slot
    assert sorted(r.status for r in tasks_env.rows()) == ['queued', 'queued', 'rejected']


def test_broker_queue_full_maps_to_overloaded(tasks_env):
    """kombu_sqlite's x-max-length refusal is caught even if depth looked fine."""
    tasks_env.configure(models={'gpt-oss:20b': {'slots': 1, 'max_queue': 1}})
    import tasks
    from tasks import admission
    tasks.submit('a', 'system', 'transcript', {'text': 'x'})
    real = admission.queue_depth
    admission.queue_depth = lambda queue: 0  # a stale look: the broker still says no
    try:
        with pytest.raises(tasks.Overloaded, match='is full'):
            tasks.submit('b', 'system', 'transcript', {'text': 'x'})
    finally:
        admission.queue_depth = real
    assert sorted(r.status for r in tasks_env.rows()) == ['queued', 'rejected']
