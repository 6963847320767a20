"""Broker.remove: a waiting Celery task taken out of its queue while a real
worker runs, and the leased one left alone."""
import kombu_sqlite
from conftest import wait_for


def test_remove_deletes_waiting_tasks_never_a_leased_one(celery_env):
    app = celery_env.configure()
    url = celery_env.env['TEST_BROKER_URL']
    celery_env.worker('-P', 'solo', '-c', '1')
    running = app.sleep_and_mark.delay('running', 6)
    wait_for(lambda: celery_env.marks_of('running'), 60, what='the first task to start')
    cancelled = app.mark.delay('cancelled')
    kept = app.mark.delay('kept')
    held = app.mark.apply_async(('held',), countdown=600)   # stored until due

    with kombu_sqlite.Broker(url, create=False) as broker:
        before = broker.stats()['celery']
        assert (before['ready'], before['delayed'], before['leased']) == (2, 1, 1)
        assert broker.remove('celery', cancelled.id) is True
        assert broker.remove('celery', held.id) is True          # a delayed one too
        assert broker.remove('celery', running.id) is False      # leased by the worker
        assert broker.remove('celery', cancelled.id) is False    # already gone
        assert broker.remove('celery', 'no-such-task') is False
        assert broker.remove('other-queue', kept.id) is False
        assert broker.position('celery', cancelled.id) is None
        assert broker.position('celery', kept.id) == 0
        after = broker.stats()['celery']
        assert (after['ready'], after['delayed'], after['leased']) == (1, 0, 1)
        assert after['counters']['removed'] == 2

    assert kept.get(timeout=60) is None                      # the queue flows on
    assert running.get(timeout=60) == 6
    assert [line.split()[0] for line in celery_env.marks_of('running')] == ['start', 'done']
    assert celery_env.marks_of('cancelled') == [] and celery_env.marks_of('held') == []
