"""What the transport promises about a message's life, each checked with real processes.

Every test here was seen failing against a deliberate breakage of the promise
it guards (docs/testing.md lists them): no_ack takes for good, an ack acts
only on the caller's own lease, a claimed batch is delivered in priority
order, acked messages leave the file, a rejected one becomes a dead letter.
"""
import sys
import textwrap
import time

import pytest
from kombu import Connection, Consumer, Queue

from conftest import wait_for
from kombu_sqlite import Broker

#: Short leases that nobody renews: a copy left behind by mistake comes back fast.
SHORT_LEASE = {'visibility_timeout': 1.0, 'housekeeping_interval': 0.2}


def publish(url, bodies, queue='q', priorities=None):
    with Connection(url) as conn:
        producer = conn.Producer()
        for i, body in enumerate(bodies):
            producer.publish(body, routing_key=queue, declare=[Queue(queue)],
                             priority=None if priorities is None else priorities[i])


def run_client(procs, url, body, name='client'):
    """Run ``body`` in another process with ``conn`` open on ``url`` (short leases)."""
    code = (f'import os, sys, time\nimport kombu_sqlite\n'
            f'from kombu import Connection, Consumer, Queue\n'
            f'conn = Connection({url!r}, transport_options={SHORT_LEASE!r})\n'
            + textwrap.dedent(body))
    return procs.start([sys.executable, '-c', code], name=name)


def finished(procs, proc, timeout=60):
    assert proc.wait(timeout) == 0, procs.log(proc)
    return procs.log(proc)


def in_file(url, queue='q'):
    """Messages of ``queue`` still stored, whatever their state."""
    with Broker(url) as broker:
        stats = broker.stats().get(queue)
    return 0 if stats is None else stats['ready'] + stats['leased'] + stats['delayed']


def never_delivered_again(url, queue='q', watch=3.0):
    """No connection gets a message from ``queue`` for ``watch`` seconds,
    several lease lengths and sweeps after it was taken."""
    with Connection(url, transport_options=SHORT_LEASE) as conn:
        deadline = time.monotonic() + watch
        while time.monotonic() < deadline:
            message = conn.default_channel.basic_get(queue)
            assert message is None, f'{message.payload!r} came back'
            time.sleep(0.1)


# -- no_ack ----------------------------------------------------------------------------

def test_message_got_with_no_ack_is_gone_from_the_file(db_url, procs):
    publish(db_url, ['once'])
    # The taker dies at once, without closing: a leased copy would come back in 1 s.
    taker = run_client(procs, db_url, """
        print(conn.default_channel.basic_get('q', no_ack=True).payload, flush=True)
        os._exit(0)
        """)
    assert finished(procs, taker).strip() == 'once'
    assert in_file(db_url) == 0
    never_delivered_again(db_url)
    assert in_file(db_url) == 0


def test_no_ack_consumer_takes_its_batch_for_good(db_url, procs):
    publish(db_url, [f'm{i}' for i in range(12)])
    # Two prefetch windows: messages taken without ack hold no place in the window.
    taker = run_client(procs, db_url, """
        got = []
        with Consumer(conn, [Queue('q')], no_ack=True, prefetch_count=6,
                      callbacks=[lambda body, message: got.append(body)]):
            while len(got) < 12:
                conn.drain_events(timeout=30)
        print(' '.join(got), flush=True)
        os._exit(0)
        """)
    assert finished(procs, taker).split() == [f'm{i}' for i in range(12)]
    assert in_file(db_url) == 0
    never_delivered_again(db_url)


def test_delivered_message_says_its_priority_and_whether_it_was_delivered_before(db_url):
    with Connection(db_url, transport_options={'default_priority': 3}) as conn:
        for body, priority in (('urgent', 1), ('plain', None)):
            conn.Producer().publish(body, routing_key='q', declare=[Queue('q')],
                                    priority=priority)
        channel = conn.default_channel
        first, second = channel.basic_get('q'), channel.basic_get('q')
        assert [m.properties['priority'] for m in (first, second)] == [1, 3]
        assert first.delivery_info['redelivered'] is False
        first.requeue()
        again = channel.basic_get('q')
        assert again.payload == 'urgent' and again.delivery_info['redelivered'] is True
        again.ack()
        second.ack()


@pytest.mark.parametrize('way', ['basic_get', 'consumer batch'])
def test_expired_message_is_never_delivered_even_before_a_sweep(db_url, way):
    # No housekeeping sweep in this test: the claim itself must drop what expired.
    with Connection(db_url, transport_options={'housekeeping_interval': 3600}) as conn:
        producer = conn.Producer()
        for body, expiration in (('stale', 0.2), ('fresh', 60), ('no expiry', None)):
            producer.publish(body, routing_key='q', declare=[Queue('q')],
                             expiration=expiration)
        time.sleep(0.5)
        if way == 'basic_get':
            got = [conn.default_channel.basic_get('q') for _ in range(3)]
            assert [m and m.payload for m in got] == ['fresh', 'no expiry', None]
            for m in got[:2]:
                m.ack()
        else:                                      # one claim of three rows, one expired
            got = []
            with Consumer(conn, [Queue('q')], prefetch_count=3,
                          callbacks=[lambda body, message: (got.append(body), message.ack())]):
                conn.drain_events(timeout=10)
            assert got == ['fresh', 'no expiry']
    assert in_file(db_url) == 0
    with Broker(db_url) as broker:
        assert broker.stats()['q']['counters']['expired'] == 1


# -- prefetch ------------------------------------------------------------------------------

def test_consumer_holds_no_more_than_its_prefetch(db_url, procs):
    publish(db_url, [f'm{i}' for i in range(5)])
    holder = run_client(procs, db_url, """
        got = []
        def hold(body, message):
            got.append(body)
            print('got', body, flush=True)
        with Consumer(conn, [Queue('q')], prefetch_count=2, callbacks=[hold]):
            while True:
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    pass
        """, name='holder')
    wait_for(lambda: procs.log(holder).count('got') >= 2, 30, what='two messages held')
    time.sleep(1)                                  # a third would have arrived by now
    assert procs.log(holder).count('got') == 2
    with Broker(db_url) as broker:
        assert broker.stats()['q']['leased'] == 2
    with Connection(db_url) as conn:               # the rest is free for others
        rest = [conn.default_channel.basic_get('q') for _ in range(3)]
        assert [m.payload for m in rest] == ['m2', 'm3', 'm4']
        for m in rest:
            m.ack()


# -- ack ----------------------------------------------------------------------------------

def test_late_ack_does_not_delete_the_copy_another_consumer_holds(db_url, procs):
    publish(db_url, ['job'])
    # The slow holder never renews its lease, and acks 6 s after it ran out.
    slow = run_client(procs, db_url, """
        conn = Connection(conn.as_uri(), transport_options={
            'visibility_timeout': 1.0, 'lease_renew_interval': 3600,
            'housekeeping_interval': 3600})
        message = conn.default_channel.basic_get('q')
        print('got', message.payload, flush=True)
        time.sleep(7)
        message.ack()
        print('acked', flush=True)
        os._exit(0)
        """, name='slow')
    wait_for(lambda: 'got job' in procs.log(slow), 30, what='the slow holder to get the job')
    with Connection(db_url) as conn:     # renews its own lease while open
        channel = conn.default_channel
        taken = wait_for(lambda: channel.basic_get('q'), 10, what='the lease to run out')
        assert slow.poll() is None, 'the slow holder acked before the job was taken over'
        assert taken.payload == 'job' and taken.delivery_info['redelivered']
        assert 'acked' in finished(procs, slow)
        # The late ack came from the old holder: the new holder's copy is untouched.
        assert in_file(db_url) == 1
        with Broker(db_url) as broker:
            assert broker.stats()['q']['leased'] == 1
        taken.ack()
    assert in_file(db_url) == 0


def test_multiple_ack_is_refused_by_name_and_the_message_kept(db_url):
    publish(db_url, ['a'])
    with Connection(db_url) as conn:
        message = conn.default_channel.basic_get('q')
        with pytest.raises(NotImplementedError, match='^multiple acks are not supported$'):
            message.ack(multiple=True)
        assert in_file(db_url) == 1
        message.ack()
    assert in_file(db_url) == 0


def test_message_got_and_rejected_is_a_dead_letter_counted_on_its_queue(db_url):
    publish(db_url, ['bad'])
    with Connection(db_url) as conn:
        conn.default_channel.basic_get('q').reject()
    with Broker(db_url) as broker:
        assert [d['reason'] for d in broker.dead_letters('q')] == ['rejected']
        assert broker.stats()['q']['counters']['dead_lettered'] == 1


def test_consuming_again_with_acks_after_no_ack_leases_again(db_url):
    publish(db_url, ['first', 'second'])
    with Connection(db_url) as conn:
        got = []
        taker = Consumer(conn, [Queue('q')], no_ack=True, prefetch_count=1,
                         callbacks=[lambda body, message: got.append(body)])
        taker.consume()
        conn.drain_events(timeout=10)
        taker.cancel()
        acker = Consumer(conn, [Queue('q')], prefetch_count=1,
                         callbacks=[lambda body, message: got.append(body)])
        acker.consume()
        conn.drain_events(timeout=10)
        assert got == ['first', 'second']
        with Broker(db_url) as broker:                 # 'second' is leased, not taken
            assert broker.stats()['q']['leased'] == 1
        acker.cancel()


def test_consumer_acks_leave_the_file_for_good(db_url, procs):
    publish(db_url, [f'm{i}' for i in range(20)])
    consumer = run_client(procs, db_url, """
        got = []
        def handle(body, message):
            got.append(body)
            message.ack()
        with Consumer(conn, [Queue('q')], prefetch_count=8, callbacks=[handle]):
            while len(got) < 20:
                conn.drain_events(timeout=30)
            print('acked', len(got), flush=True)
            time.sleep(3600)   # alive and renewing, until killed
        """)
    wait_for(lambda: 'acked 20' in procs.log(consumer), 30, what='20 acks')
    wait_for(lambda: in_file(db_url) == 0, 10, what='the acked messages to leave the file')
    procs.kill(consumer)
    never_delivered_again(db_url)
    with Broker(db_url) as broker:
        queue = broker.stats()['q']
    assert queue['counters']['acked'] == 20 and queue['counters']['lease_expired'] == 0
    assert in_file(db_url) == 0


def test_rejected_message_is_kept_as_a_dead_letter(db_url, procs):
    publish(db_url, ['bad', 'good', 'also good'])
    consumer = run_client(procs, db_url, """
        got = []
        def handle(body, message):
            got.append(body)
            message.reject() if body == 'bad' else message.ack()
        # Prefetch 1: the rejected message must give its place up for good.
        with Consumer(conn, [Queue('q')], prefetch_count=1, callbacks=[handle]):
            while len(got) < 3:
                conn.drain_events(timeout=30)
        conn.release()
        """)
    finished(procs, consumer)
    never_delivered_again(db_url)
    assert in_file(db_url) == 0
    with Broker(db_url) as broker:
        [dead] = broker.dead_letters('q')
        assert dead['reason'] == 'rejected' and dead['delivery_count'] == 1
        assert broker.stats()['q']['counters']['dead_lettered'] == 1   # counted on its queue
        assert broker.requeue_dead('q') == 1       # the operator puts it back
    with Connection(db_url) as conn:
        assert conn.default_channel.basic_get('q').payload == 'bad'


#: Takes one message with a lease it never renews, on a limit of two deliveries,
#: and dies holding it.
DYING_TAKER = """
    conn = Connection(conn.as_uri(), transport_options={
        'visibility_timeout': 0.5, 'housekeeping_interval': 0.1, 'max_deliveries': 2})
    message = conn.default_channel.basic_get('q')
    print(message and message.payload, flush=True)
    os._exit(0)                                # dies holding it, every time
    """


def deliver_poison_twice(db_url, procs, ready):
    """Two takers get 'poison' and die holding it; returns once its lease ran
    out again, with ``ready`` messages ready.  Call with a sweeping connection open."""
    for delivery in (1, 2):
        wait_for(lambda: in_ready(db_url) == ready, 10, what=f'delivery {delivery}')
        assert finished(procs, run_client(procs, db_url, DYING_TAKER)).strip() == 'poison'
    wait_for(lambda: in_ready(db_url) == ready, 10, what='the lease to run out again')


def test_message_never_acked_is_dead_lettered_after_max_deliveries(db_url, procs):
    publish(db_url, ['poison'])
    # A connection left open here sweeps expired leases, as a live worker's would.
    with Connection(db_url, transport_options={'housekeeping_interval': 0.1}) as sweeper:
        sweeper.connect()
        deliver_poison_twice(db_url, procs, ready=1)
        # The third claim finds it over the limit: dead-lettered, not delivered.
        assert finished(procs, run_client(procs, db_url, DYING_TAKER)).strip() == 'None'
    assert in_file(db_url) == 0
    with Broker(db_url) as broker:
        [dead] = broker.dead_letters('q')
    assert dead['reason'] == 'max_deliveries' and dead['delivery_count'] == 2
    with Broker(db_url) as broker:
        assert broker.stats()['q']['counters']['dead_lettered'] == 1


def test_no_ack_consumer_dead_letters_a_message_over_max_deliveries_and_takes_the_rest(
        db_url, procs):
    # 'fine' is stored first but served after the poison (priority 9 after 0):
    # the takers get only the poison, and the batch the no_ack consumer takes
    # holds both, the good message first in the file.
    publish(db_url, ['fine', 'poison'], priorities=[9, 0])
    no_ack_taker = """
        import socket
        conn = Connection(conn.as_uri(), transport_options={'max_deliveries': 2})
        got = []
        with Consumer(conn, [Queue('q')], no_ack=True, prefetch_count=10,
                      callbacks=[lambda body, message: got.append(body)]):
            try:
                while True:
                    conn.drain_events(timeout=1)
            except socket.timeout:
                pass
        print(got, flush=True)
        """
    with Connection(db_url, transport_options={'housekeeping_interval': 0.1}) as sweeper:
        sweeper.connect()
        deliver_poison_twice(db_url, procs, ready=2)
    taken_at = time.time()
    assert finished(procs, run_client(procs, db_url, no_ack_taker)).strip() == "['fine']"
    assert in_file(db_url) == 0
    with Broker(db_url) as broker:
        [dead] = broker.dead_letters('q')
        assert broker.stats()['q']['counters']['dead_lettered'] == 1
    assert (dead['reason'], dead['delivery_count'], dead['priority']) == ('max_deliveries', 2, 0)
    assert taken_at - 1 <= dead['dead_at'] <= time.time()
    with Broker(db_url) as broker:
        assert broker.requeue_dead('q') == 1
    with Connection(db_url) as conn:
        assert conn.default_channel.basic_get('q').payload == 'poison'


def in_ready(url, queue='q'):
    with Broker(url) as broker:
        return broker.stats()[queue]['ready']


# -- priority inside one claimed batch ---------------------------------------------------------

#: Higher numbers published first, so a batch in storage order is out of priority order.
PRIORITIES = [9, 9, 5, 5, 3, 0, 3, 0, 7, 1, 2, 1]


def expected_order():
    return [i for _, i in sorted((p, i) for i, p in enumerate(PRIORITIES))]


def test_consumer_gets_a_prefetched_batch_in_priority_order(db_url, procs):
    publish(db_url, list(range(len(PRIORITIES))), priorities=PRIORITIES)
    consumer = run_client(procs, db_url, f"""
        got = []
        def handle(body, message):
            got.append(body)
            message.ack()
        with Consumer(conn, [Queue('q')], prefetch_count=6, callbacks=[handle]):
            while len(got) < {len(PRIORITIES)}:
                conn.drain_events(timeout=30)
        print(*got, flush=True)
        conn.release()
        """)
    assert [int(n) for n in finished(procs, consumer).split()] == expected_order()


def test_celery_worker_at_prefetch_4_runs_tasks_in_priority_order(celery_env):
    app = celery_env.configure()
    results = [app.record.apply_async(('order', i), priority=p)
               for i, p in enumerate(PRIORITIES)]
    # One process, prefetch 4: each claim hands the worker a batch of four.
    celery_env.worker('-P', 'solo', '--prefetch-multiplier', '4', name='worker')
    for result in results:
        result.get(timeout=60)
    ran = [int(line.split()[0]) for line in celery_env.marks_of('order')]
    assert ran == expected_order()
