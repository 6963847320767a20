"""Chaos: producers and consumers on one file while consumers holding work are
killed with SIGKILL and planted poison kills others."""
import os
import random
import sys
import time

from kombu import Connection, Queue

from conftest import HERE, wait_for
from kombu_sqlite import Broker

CLIENT = os.path.join(HERE, 'chaos_client.py')
PRODUCERS, PER_PRODUCER, RATE = 2, 400, 40.0   # 10 s of arriving work
CONSUMERS, HOLD, POISON = 4, 0.03, 3
MESSAGES = PRODUCERS * PER_PRODUCER
BUSY_KILLS = 8                                 # SIGKILLs aimed at a consumer mid-message


def test_sigkill_chaos_loses_nothing_and_redelivers_what_was_held(tmp_path, procs):
    url = f'sqlite:///{tmp_path}/chaos.db'
    with Connection(url) as conn:   # plant the poison messages first
        producer = conn.Producer()
        for i in range(POISON):
            producer.publish({'poison': True, 'n': -1 - i}, routing_key='chaos',
                             declare=[Queue('chaos')])
    logs = []

    def start_consumer(i):
        logs.append(tmp_path / f'consumer-{i}-{len(logs)}.log')
        proc = procs.start([sys.executable, CLIENT, url, 'consume', str(logs[-1]), str(HOLD)],
                           name=f'consumer{i}')
        proc.chaos_log = logs[-1]
        return proc
    consumers = [start_consumer(i) for i in range(CONSUMERS)]
    producers = [procs.start([sys.executable, CLIENT, url, 'produce', str(i * PER_PRODUCER),
                              str(PER_PRODUCER), str(RATE)], name=f'producer{i}')
                 for i in range(PRODUCERS)]

    def lines():
        return [line.split() for log in logs if log.exists()
                for line in log.read_text().splitlines()]

    def done():
        return {int(w[1]) for w in lines() if w[0] == 'done'}

    def holding(proc):
        """The message a consumer is working on now, or None."""
        text = proc.chaos_log.read_text() if proc.chaos_log.exists() else ''
        last = text.splitlines()[-1].split() if text.endswith('\n') and text else []
        return int(last[1]) if last and last[0] == 'got' else None

    def dead_letters():
        with Broker(url) as broker:
            return len(broker.dead_letters('chaos'))

    rng = random.Random(1)
    held_at_kill, kills, restarts = [], 0, 0
    deadline = time.monotonic() + 120
    next_kill = time.monotonic() + 1
    # Poison needs its lease to run out three times with consumers alive to claim
    # it: keep restarting consumers until it is dead-lettered and all work is done.
    while ((len(done()) < MESSAGES or dead_letters() < POISON)
           and time.monotonic() < deadline):
        time.sleep(0.05)
        for i, proc in enumerate(consumers):
            if proc.poll() is not None:          # died of poison (or was killed)
                consumers[i] = start_consumer(i)
                restarts += 1
        if len(held_at_kill) < BUSY_KILLS and time.monotonic() >= next_kill:
            busy = [(i, n) for i, p in enumerate(consumers) if (n := holding(p)) is not None]
            if busy:
                victim, message = rng.choice(busy)
                procs.kill(consumers[victim])
                kills += 1
                held_at_kill.append(message)
                next_kill = time.monotonic() + rng.uniform(0.4, 1.0)
    for proc in producers:
        assert proc.wait(30) == 0, procs.log(proc)

    with Broker(url) as broker:
        # A message handled just before its consumer was killed is still
        # leased to the dead consumer until the lease runs out; then a live
        # consumer takes it again and acks it.
        wait_for(lambda: broker.stats()['chaos']['leased'] == 0, 20,
                 what='the last leases to be settled')
        stats = broker.stats()['chaos']
        dead = broker.dead_letters('chaos')
    gots = [(int(w[1]), w[2] == '1') for w in lines() if w[0] == 'got']
    dones = [int(w[1]) for w in lines() if w[0] == 'done']
    redelivered = [n for n, again in gots if again]
    print(f'\nchaos: {MESSAGES} messages, {len(dones)} handled, {kills} SIGKILLs of busy '
          f'consumers, {restarts} restarts, {len(redelivered)} redeliveries, '
          f'{len(dead)} dead letters')
    assert set(dones) == set(range(MESSAGES))                # every message handled
    assert stats['ready'] == stats['leased'] == stats['delayed'] == 0   # the file ends empty
    assert kills == BUSY_KILLS, 'the work ran out before every kill landed'
    # What a killed consumer was working on came back, marked redelivered (a kill
    # can land just after the work finished: then its held ack may already be in).
    came_back = [n for n in held_at_kill if n in redelivered]
    assert len(came_back) >= BUSY_KILLS // 2, (held_at_kill, redelivered)
    # Every redelivery is owed to a death, at most one each (prefetch 1), and only
    # a SIGKILL (not poison, whose claim settled the previous ack) repeats work.
    assert len(redelivered) <= restarts
    assert len(dones) - len(set(dones)) <= kills
    assert sorted(d['reason'] for d in dead) == ['max_deliveries'] * POISON
    assert all(d['delivery_count'] == 3 for d in dead)
