"""Chaos: producers and consumers on one file while consumers are killed with SIGKILL."""
import os
import random
import sys
import time

from kombu import Connection, Queue

from conftest import HERE, wait_for
from kombu_sqlite import Broker

CLIENT = os.path.join(HERE, 'chaos_client.py')
PRODUCERS, CONSUMERS, MESSAGES, POISON = 4, 4, 20000, 3


def test_sigkill_chaos_loses_nothing(tmp_path, procs):
    url = f'sqlite:///{tmp_path}/chaos.db'
    with Connection(url) as conn:   # plant the poison messages first
        producer = conn.Producer()
        for i in range(POISON):
            producer.publish({'poison': True, 'n': -1 - i}, routing_key='chaos',
                             declare=[Queue('chaos')])
    logs = [tmp_path / f'consumer-{i}.log' for i in range(CONSUMERS)]

    def start_consumer(i):
        return procs.start([sys.executable, CLIENT, url, 'consume', str(logs[i])],
                           name=f'consumer{i}')
    consumers = [start_consumer(i) for i in range(CONSUMERS)]
    per = MESSAGES // PRODUCERS
    producers = [procs.start([sys.executable, CLIENT, url, 'produce', str(i * per), str(per)],
                             name=f'producer{i}') for i in range(PRODUCERS)]

    def handled():
        return [int(line) for log in logs if log.exists()
                for line in log.read_text().split()]

    rng = random.Random(1)
    kills = restarts = 0
    deadline = time.monotonic() + 90
    next_kill = time.monotonic() + 2
    def dead_letters():
        with Broker(url) as broker:
            return len(broker.dead_letters('chaos'))

    # Poison messages need their leases to run out three times, with
    # consumers alive to claim them: keep restarting until both are done.
    while ((len(set(handled())) < MESSAGES or dead_letters() < POISON)
           and time.monotonic() < deadline):
        time.sleep(0.1)
        if os.environ.get('CHAOS_DEBUG'):
            print(len(set(handled())), kills, restarts, flush=True)
        for i, proc in enumerate(consumers):
            if proc.poll() is not None:          # died of poison (or was killed)
                consumers[i] = start_consumer(i)
                restarts += 1
        if time.monotonic() >= next_kill:
            victim = rng.randrange(CONSUMERS)
            procs.kill(consumers[victim])
            kills += 1
            next_kill = time.monotonic() + rng.uniform(1.5, 3)
    for proc in producers:
        assert proc.wait(30) == 0, procs.log(proc)
    if len(set(handled())) < MESSAGES:
        with Broker(url) as broker:
            print('stuck:', broker.stats(), [p.pid for p in consumers])

    with Broker(url) as broker:
        # A message handled just before its consumer was killed is still
        # leased to the dead consumer until the lease runs out; then a live
        # consumer takes it again and acks it.
        wait_for(lambda: broker.stats()['chaos']['leased'] == 0, 20,
                 what='the last leases to be settled')
    done = handled()
    unique = set(done)
    duplicates = len(done) - len(unique)
    with Broker(url) as broker:
        dead = broker.dead_letters('chaos')
        stats = broker.stats()['chaos']
    print(f'\nchaos: {MESSAGES} messages, {len(done)} handled, {duplicates} duplicates, '
          f'{kills} SIGKILLs, {restarts} restarts, {len(dead)} dead letters')
    assert unique == set(range(MESSAGES))                    # every message handled
    assert stats['ready'] == 0 and stats['leased'] == 0      # and acked
    # Duplicates only for messages in flight at a kill: at most one (the prefetch) each.
    assert duplicates <= kills + restarts
    assert sorted(d['reason'] for d in dead) == ['max_deliveries'] * POISON
    assert all(d['delivery_count'] == 3 for d in dead)
