"""Delivery order under every scheduling strategy matches a small in-memory model.

Random sequences of publish / claim / ack / requeue / reject run against the real
transport (one SQLite file) and against the model; each claim must return the
message the model says is next.
"""
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection, Queue

from kombu_sqlite import Broker

FAIR_SHIFT = 40


class Model:
    """The specification of each strategy, written plainly."""

    def __init__(self, scheduling):
        self.scheduling = scheduling
        self.ready = {}           # seq -> (key, body)
        self.leased = {}          # seq -> (key, body)
        self.fair_last = {}       # (priority, client) -> last tag given
        self.fair_clock = {}      # priority -> tag of the last delivery

    def publish(self, seq, priority, client):
        if self.scheduling in ('fifo', 'lifo'):
            key = (0, seq)
        elif self.scheduling == 'fair':
            tag = max(self.fair_clock.get(priority, 0),
                      self.fair_last.get((priority, client), 0)) + 1
            self.fair_last[priority, client] = tag
            key = (priority, tag, seq)
        else:
            key = (priority, seq)
        self.ready[seq] = (key, seq)

    def claim(self):
        if not self.ready:
            return None
        pick = max if self.scheduling == 'lifo' else min
        seq = pick(self.ready, key=lambda s: self.ready[s][0])
        key, body = self.ready.pop(seq)
        self.leased[seq] = (key, body)
        if self.scheduling == 'fair':
            self.fair_clock[key[0]] = max(self.fair_clock.get(key[0], 0), key[1])
        return body

    def settle(self, seq, requeue):
        item = self.leased.pop(seq)
        if requeue:
            self.ready[seq] = item


operations = st.lists(
    st.one_of(
        st.tuples(st.just('publish'), st.integers(0, 2), st.sampled_from('abc')),
        st.tuples(st.just('claim')),
        st.tuples(st.just('ack')),
        st.tuples(st.just('requeue')),
        st.tuples(st.just('reject')),
    ),
    min_size=1, max_size=60)

_queue_numbers = itertools.count()


@pytest.fixture(scope='module')
def connection(tmp_path_factory):
    url = f'sqlite:///{tmp_path_factory.mktemp("props")}/queue.db'
    with Connection(url, transport_options={'max_deliveries': 10**6}) as conn:
        yield conn


def run(connection, scheduling, ops):
    channel = connection.default_channel
    queue = f'{scheduling}-{next(_queue_numbers)}'
    Queue(queue, queue_arguments={'x-scheduling': scheduling})(channel).declare()
    producer = connection.Producer()
    model = Model(scheduling)
    held = []                      # (seq, message) claimed and not settled, oldest first
    seq = 0
    for op in ops:
        if op[0] == 'publish':
            _, priority, client = op
            producer.publish(seq, routing_key=queue, priority=priority,
                             headers={'x-client': client})
            model.publish(seq, priority, client)
            seq += 1
        elif op[0] == 'claim':
            message = channel.basic_get(queue)
            expected = model.claim()
            assert (message and message.payload) == expected
            if message is not None:
                held.append((expected, message))
        elif held:
            body, message = held.pop(0)
            if op[0] == 'ack':
                message.ack()
            elif op[0] == 'requeue':
                message.requeue()
            else:
                message.reject()
            model.settle(body, requeue=op[0] == 'requeue')
    # Whatever is left comes out in the model's order too.
    while True:
        message = channel.basic_get(queue)
        expected = model.claim()
        assert (message and message.payload) == expected
        if message is None:
            return
        message.ack()


@pytest.mark.parametrize('scheduling', ['priority', 'fifo', 'lifo', 'fair'])
@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_delivery_order_matches_the_model(connection, scheduling, ops):
    run(connection, scheduling, ops)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(priorities=st.lists(st.integers(0, 4), min_size=1, max_size=40))
def test_weighted_random_is_fifo_within_a_level_and_loses_nothing(connection, priorities):
    channel = connection.default_channel
    queue = f'wr-{next(_queue_numbers)}'
    Queue(queue, queue_arguments={'x-scheduling': 'weighted-random'})(channel).declare()
    for i, priority in enumerate(priorities):
        connection.Producer().publish(i, routing_key=queue, priority=priority)
    got = []
    while (message := channel.basic_get(queue)) is not None:
        got.append(message.payload)
        message.ack()
    assert sorted(got) == list(range(len(priorities)))
    for level in set(priorities):
        in_level = [i for i in got if priorities[i] == level]
        assert in_level == sorted(in_level)


def test_weighted_random_serves_low_priorities_in_proportion(connection):
    channel = connection.default_channel
    queue = 'wr-proportion'
    Queue(queue, queue_arguments={'x-scheduling': 'weighted-random',
                                  'x-priority-weights': {0: 3, 9: 1}})(channel).declare()
    producer = connection.Producer()
    for i in range(400):
        producer.publish(i, routing_key=queue, priority=0 if i % 2 else 9)
    first = []
    for _ in range(200):
        message = channel.basic_get(queue)
        first.append(message.properties['priority'])
        message.ack()
    low = first.count(9)
    assert 25 <= low <= 80, low     # expected 50 of 200 at weights 3:1; never starved


def test_fair_light_client_waits_at_most_one_delivery_per_other_client(tmp_path):
    url = f'sqlite:///{tmp_path}/fair.db'
    with Connection(url) as conn:
        channel = conn.default_channel
        Queue('fair', queue_arguments={'x-scheduling': 'fair'})(channel).declare()
        producer = conn.Producer()
        for i in range(1000):
            producer.publish(f'heavy-{i}', routing_key='fair', priority=3,
                             headers={'x-client': 'heavy', 'id': f'heavy-{i}'})
        for _ in range(5):                            # the heavy client is being served
            channel.basic_get('fair').ack()
        producer.publish('light', routing_key='fair', priority=3,
                         headers={'x-client': 'light', 'id': 'light-1'})
        with Broker(url) as broker:
            assert broker.position('fair', 'light-1') <= 1
        order = [channel.basic_get('fair') for _ in range(2)]
        assert 'light' in [m.payload for m in order]
