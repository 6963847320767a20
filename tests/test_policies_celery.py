"""Delivery policies through Celery with real workers: dead letters, delayed
retries across restarts, backpressure and fair scheduling."""
import json
import re
import time

import pytest

from conftest import wait_for
from kombu_sqlite import Broker, QueueFull


def broker(celery_env):
    return Broker(celery_env.env['TEST_BROKER_URL'])


@pytest.mark.slow
def test_poison_task_is_dead_lettered_and_the_queue_keeps_flowing(celery_env):
    app = celery_env.configure(TEST_TRANSPORT_OPTIONS=json.dumps({'max_deliveries': 3}))
    bad = app.poison.delay()
    good = [app.add.delay(i, 1) for i in range(5)]
    celery_env.worker('-c', '1')
    assert [r.get(timeout=60) for r in good] == [1, 2, 3, 4, 5]
    with broker(celery_env) as b:
        dead = wait_for(lambda: b.dead_letters('celery'), 30, what='a dead letter')
        assert [(d['task_id'], d['reason'], d['delivery_count']) for d in dead] == [
            (bad.id, 'max_deliveries', 3)]
        assert dead[0]['task'] == 'celery_app.poison'
        assert b.stats()['celery']['ready'] == 0
        # An operator fixes the cause, then requeues: it is back with a fresh count.
        assert b.requeue_dead('celery') == 1
        assert b.peek('celery')[0]['task_id'] == bad.id
        assert b.peek('celery')[0]['delivery_count'] == 0
        assert b.purge('celery') == 1


def test_retry_backoff_is_held_by_the_broker_across_worker_restarts(celery_env, procs):
    app = celery_env.configure()
    result = app.flaky.delay('flaky', 2)        # fails twice, backoff 2 s then 4 s
    runs = lambda: [float(line.split()[0]) for line in celery_env.marks_of('flaky')]  # noqa
    pids = lambda: [line.split()[1] for line in celery_env.marks_of('flaky')]  # noqa
    with broker(celery_env) as b:
        for tries in (1, 2):
            worker = celery_env.worker('-c', '1', name=f'w{tries}')
            wait_for(lambda: len(runs()) == tries, 30, what=f'try {tries}')
            wait_for(lambda: b.stats()['celery']['delayed'] == 1, 10,
                     what='the retry to be held by the broker')
            procs.kill(worker)                  # every worker dies between tries
            assert b.stats()['celery']['delayed'] == 1
        celery_env.worker('-c', '1', name='w3')
        assert result.get(timeout=60) == 3
    times = runs()
    assert len(set(pids())) == 3                # each try ran in a different worker
    assert times[1] - times[0] >= 2 - 0.05
    assert times[2] - times[1] >= 4 - 0.05


def _limited(celery_env, overflow, **options):
    return celery_env.configure(
        TEST_QUEUES=json.dumps({'limited': {'x-max-length': 2, 'x-overflow': overflow}}),
        TEST_TRANSPORT_OPTIONS=json.dumps(options))


def test_queue_full_surfaces_from_apply_async_at_once(celery_env):
    app = _limited(celery_env, 'reject-publish')
    app.add.apply_async((1, 1), queue='limited')
    app.add.apply_async((2, 2), queue='limited')
    started = time.monotonic()
    with pytest.raises(QueueFull, match="queue 'limited' is full"):
        app.add.apply_async((3, 3), queue='limited')
    assert time.monotonic() - started < 5       # not retried for ever
    with broker(celery_env) as b:
        stats = b.stats()['limited']
        assert stats['ready'] == 2 and stats['counters']['rejected_publish'] == 1


def test_drop_head_drops_the_oldest_of_the_lowest_priority(celery_env):
    app = _limited(celery_env, 'drop-head')
    keep = app.add.apply_async((1, 1), queue='limited', priority=1)
    dropped = app.add.apply_async((2, 2), queue='limited', priority=5)
    new = app.add.apply_async((3, 3), queue='limited', priority=3)
    with broker(celery_env) as b:
        assert [m['task_id'] for m in b.peek('limited')] == [keep.id, new.id]
        assert dropped.id not in [m['task_id'] for m in b.peek('limited')]
        assert b.stats()['limited']['counters']['dropped'] == 1


def test_block_waits_for_room_then_gives_up(celery_env):
    app = _limited(celery_env, 'block', max_length_block_timeout=1)
    app.add.apply_async((1, 1), queue='limited')
    app.add.apply_async((2, 2), queue='limited')
    started = time.monotonic()
    with pytest.raises(QueueFull):
        app.add.apply_async((3, 3), queue='limited')
    assert 1 <= time.monotonic() - started < 5
    celery_env.worker('-c', '1', '-Q', 'limited')   # a consumer makes room
    blocked = [app.add.apply_async((i, i), queue='limited') for i in range(6)]
    assert [r.get(timeout=60) for r in blocked] == [2 * i for i in range(6)]


def test_fair_scheduling_serves_a_light_user_between_a_heavy_backlog(celery_env):
    app = celery_env.configure(TEST_QUEUES=json.dumps({'shared': {'x-scheduling': 'fair'}}))
    for i in range(10):
        app.mark.apply_async(('order',), queue='shared', priority=4,
                             headers={'x-client': 'heavy-user'}, task_id=f'heavy-{i}')
    app.mark.apply_async(('order',), queue='shared', priority=4,
                         headers={'x-client': 'light-user'}, task_id='light')
    with broker(celery_env) as b:
        assert b.position('shared', 'light') == 1
        assert b.position('shared', 'heavy-9') == 10
    app.mark.apply_async(('done',), queue='shared', priority=9)
    celery_env.worker('-c', '1', '-Q', 'shared', '-E')
    wait_for(lambda: celery_env.marks_of('done'), 60, what='the backlog to drain')
    log = celery_env.procs.log(celery_env.procs.procs[-1])
    order = re.findall(r'celery_app\.mark\[([^\]]+)\] received', log)
    assert order.index('light') <= 1, order
