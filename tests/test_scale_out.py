"""Scale-out, proven: the tasks app on two GPU boxes over RabbitMQ or Redis,
with the ledger and the result backend in PostgreSQL.

Each box is a worker group (``celery -A tasks worker``) with its own Ollama
simulator and its own GPU slot, configured by its own TOML file that differs
only in ``[ollama] url``.  Real servers throughout: rabbitmq-server and
PostgreSQL are started here on free ports in temporary directories as
non-system instances and stopped after; redis-server likewise.

The scenario, on each broker:

1. admission with no worker running: per-user limits refuse the request over
   the role's limit; spike mode refuses roles below the cutoff once the queue is
   deeper than ``spike.depth`` and still admits the cutoff role;
2. both boxes start and drain the backlog: strictly by role priority across the
   two boxes, and both boxes serve;
3. retries: each simulator answers HTTP 500 twice; every request still succeeds
   and the ledger counts one retry per 500;
4. one box's worker is killed (SIGKILL, the whole group) in the middle of a
   request: that request completes on the other box, nothing is lost;
5. cancellation, when ``tasks.cancel`` exists (issue 13 builds it);
6. the ledger and ``python -m tasks report --json`` in PostgreSQL account for
   every request, and the result backend holds every success.

What each broker kept is compared with the table in docs/scaling-out.md, and
the commands run here with the commands listed there.  Run by ``tox -e scale-out``.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tasks_fixtures import ROOT, Procs, free_port, start_redis, start_simulator, wait_until

pytest_plugins = ['tasks_fixtures']

DOC = ROOT / 'docs' / 'scaling-out.md'
MODEL, QUEUE = 'gpt-oss:20b', 'gpu.gpt-oss'
RUN_TOKENS, TOKEN_RATE = 24, 24       # one second per request
LONG_TOKENS = 240                     # ten seconds: long enough to be killed in
VISIBILITY_TIMEOUT = 20               # above the longest request (Redis runs it again after)

USERS = ['analyst-0', 'analyst-1', 'manager-0', 'director-0', 'director-1', 'executive-0',
         'system-0', 'system-1', 'system-2', 'system-3', 'system-long-0', 'system-long-1',
         'system-block-0', 'system-block-1']

# Each box's configuration file: the same but for [ollama] url.
BOX_CONFIG = '''\
broker_url = "{broker_url}"
result_backend = "db+{db_url}"
ledger_url = "{db_url}"
visibility_timeout = {visibility_timeout}

[ollama]
url = "{ollama_url}"
stall_timeout = 5
timeout = 60
connect_timeout = 2

[retry]
max_retries = 4
backoff = 1
backoff_max = 1
jitter = false

[spike]
depth = 8
resume_depth = 4
cutoff_role = "executive"

[models]
"{model}" = {{slots = 1, queue = "{queue}"}}

# The user directory (issue 13): each test user may ask at the role of its name;
# everyone else (staff-*) gets the default role, staff.
[users]
{users}

[request_types]
transcript = {{model = "{model}", prompt = "Summarise: {{text}}"}}
'''

# Command lines as docs/scaling-out.md shows them; {placeholders} filled per run.
COMMANDS = {
    'rabbitmq': ('rabbitmq-server   # RABBITMQ_NODENAME=tasks@localhost '
                 'RABBITMQ_NODE_PORT={port} RABBITMQ_MNESIA_BASE={dir}/mnesia ...'),
    'postgresql': ('initdb -D {dir}/data -U postgres -A trust && '
                   'pg_ctl -D {dir}/data -o "-p {port} -h 127.0.0.1" -w start'),
    'redis': 'redis-server --port {port} --bind 127.0.0.1',
    'simulator': 'python -m tasks.simulator --port {port} --models gpt-oss:20b=1 '
                 f'--token-rate {TOKEN_RATE} --tokens {RUN_TOKENS}',
    'worker': 'TASKS_CONFIG={box}.toml celery -A tasks worker -Q gpu.gpt-oss -c 1 '
              '--prefetch-multiplier 1 -E -n {box}@%h',
    'report': 'TASKS_CONFIG=box-a.toml python -m tasks report --json --since 1h',
}


# -- servers -------------------------------------------------------------------------


def _server_dir(user: str | None) -> Path:
    """A temporary directory the server's user owns (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix=f'kombu-sqlite-{user or "server"}-'))
    if user:
        shutil.chown(path, user, user)
    return path


def _as_user(user: str | None):
    """Popen kwargs that run a server as ``user`` when we are root."""
    return {'user': user, 'group': user, 'extra_groups': []} if user else {}


def _service_user(name: str) -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f'running as root but there is no {name!r} user to run the server as')
    return name


def _stop_group(proc, timeout=15):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # epmd and anything else left in the group
    except ProcessLookupError:
        pass
    proc.wait(10)


@pytest.fixture(scope='module')
def postgresql():
    """A PostgreSQL server on a free port; yields ``new_database(name) -> url``."""
    bins = sorted(Path('/usr/lib/postgresql').glob('*/bin/initdb'))
    bindir = Path(os.environ['PG_BINDIR']) if os.environ.get('PG_BINDIR') else (
        bins[-1].parent if bins else None)
    if bindir is None or not (bindir / 'pg_ctl').exists():
        pytest.skip('PostgreSQL is not installed (.ci/run installs Debian postgresql): '
                    'the scale-out scenario needs a shared ledger database')
    pytest.importorskip('psycopg', reason='psycopg is needed for PostgreSQL (tox -e scale-out)')
    import psycopg
    user = _service_user('postgres')
    base = _server_dir(user)
    port = free_port()
    data = base / 'data'
    run = dict(capture_output=True, text=True, timeout=120, **_as_user(user))
    init = subprocess.run([str(bindir / 'initdb'), '-D', str(data), '-U', 'postgres',
                           '-A', 'trust', '-E', 'UTF8', '--no-sync'], **run)
    assert init.returncode == 0, init.stdout + init.stderr
    server = subprocess.Popen(
        [str(bindir / 'postgres'), '-D', str(data), '-p', str(port), '-h', '127.0.0.1',
         '-k', str(base), '-c', 'fsync=off', '-c', 'max_connections=200'],
        stdout=open(base / 'postgres.log', 'wb'), stderr=subprocess.STDOUT,
        start_new_session=True, **_as_user(user))
    admin = f'postgresql://postgres@127.0.0.1:{port}/postgres'

    def up():
        assert server.poll() is None, (base / 'postgres.log').read_text()
        try:
            psycopg.connect(admin, connect_timeout=1).close()
            return True
        except psycopg.OperationalError:
            return False

    def new_database(name):
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS {name}')
            conn.execute(f'CREATE DATABASE {name}')
        return f'postgresql+psycopg://postgres@127.0.0.1:{port}/{name}'
    try:
        wait_until(up, 60, 'postgresql')
        new_database.port, new_database.dir = port, base
        yield new_database
    finally:
        _stop_group(server)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope='module')
def rabbitmq():
    """A RabbitMQ node of its own (own name, ports, epmd, data) on free ports."""
    server_bin = Path('/usr/lib/rabbitmq/bin/rabbitmq-server')
    ctl_bin = Path('/usr/lib/rabbitmq/bin/rabbitmqctl')
    if not server_bin.exists():
        pytest.skip('rabbitmq-server is not installed (.ci/run installs it from Debian '
                    'packages): the RabbitMQ variant of the scenario cannot run here')
    user = _service_user('rabbitmq')
    base = _server_dir(user)
    port, node = free_port(), f'tasks{os.getpid()}@localhost'
    (base / 'enabled_plugins').write_text('[].\n')
    if user:
        shutil.chown(base / 'enabled_plugins', user, user)
    env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), 'HOME': str(base),
           'LANG': 'C.UTF-8', 'RABBITMQ_NODENAME': node, 'RABBITMQ_NODE_PORT': str(port),
           'RABBITMQ_NODE_IP_ADDRESS': '127.0.0.1', 'RABBITMQ_DIST_PORT': str(free_port()),
           'ERL_EPMD_PORT': str(free_port()), 'RABBITMQ_MNESIA_BASE': str(base / 'mnesia'),
           'RABBITMQ_LOG_BASE': str(base / 'log'), 'RABBITMQ_PID_FILE': str(base / 'pid'),
           'RABBITMQ_ENABLED_PLUGINS_FILE': str(base / 'enabled_plugins')}
    # Our own epmd in the foreground: the one the server or rabbitmqctl would start
    # daemonises into a session of its own and outlives the test.
    epmd = subprocess.Popen([shutil.which('epmd') or '/usr/lib/erlang/bin/epmd',
                             '-port', env['ERL_EPMD_PORT'], '-address', '127.0.0.1'],
                            env=env, stdout=open(base / 'epmd.log', 'wb'),
                            stderr=subprocess.STDOUT, start_new_session=True, **_as_user(user))
    server = subprocess.Popen([str(server_bin)], env=env, cwd=base,
                              stdout=open(base / 'server.log', 'wb'), stderr=subprocess.STDOUT,
                              start_new_session=True, **_as_user(user))

    def ctl(*args, timeout=90):
        return subprocess.run([str(ctl_bin), '-n', node, *args], env=env, cwd=base,
                              capture_output=True, text=True, timeout=timeout,
                              **_as_user(user))
    def started():
        assert server.poll() is None, (base / 'server.log').read_text()
        # Fails at once until the node has registered with its epmd.
        return ctl('await_startup', '--timeout', '60').returncode == 0
    try:
        wait_until(started, 120, 'rabbitmq-server', interval=1)
        rabbitmq_url = f'amqp://guest:guest@127.0.0.1:{port}//'
        yield rabbitmq_url
    finally:
        try:
            ctl('stop', timeout=60)
        except subprocess.TimeoutExpired:
            pass
        _stop_group(server)
        _stop_group(epmd)
        shutil.rmtree(base, ignore_errors=True)


# -- the two boxes -------------------------------------------------------------------


class Boxes:
    """Two GPU boxes sharing a broker and PostgreSQL; the test process submits."""

    def __init__(self, tmp_path: Path, procs: Procs, broker_url: str, db_url: str,
                 monkeypatch):
        self.tmp, self.procs, self.monkeypatch = tmp_path, procs, monkeypatch
        self.broker_url, self.db_url = broker_url, db_url
        self.sims, self.configs, self.workers = {}, {}, {}
        for box in ('box-a', 'box-b'):
            self.sims[box] = self._simulator(box)
            self.configs[box] = self._config(box)

    def _simulator(self, box):
        return start_simulator(self.procs, '--models', f'{MODEL}=1', '--token-rate',
                               str(TOKEN_RATE), '--tokens', str(RUN_TOKENS))

    def _config(self, box) -> Path:
        path = self.tmp / f'{box}.toml'
        path.write_text(BOX_CONFIG.format(
            broker_url=self.broker_url, db_url=self.db_url, ollama_url=self.sims[box].url,
            visibility_timeout=VISIBILITY_TIMEOUT, model=MODEL, queue=QUEUE,
            users='\n'.join(f'"{user}" = "{user.split("-")[0]}"' for user in USERS)))
        return path

    def env(self, box='box-a'):
        return {'TASKS_CONFIG': str(self.configs[box]),
                'TASKS_DATA_DIR': str(self.tmp / f'data-{box}'),
                'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}

    def use_as_producer(self):
        import tasks
        from tasks import config
        for key, value in self.env().items():
            self.monkeypatch.setenv(key, value)
        return tasks.configure(config.load(self.configs['box-a']))

    def start_worker(self, box):
        proc = self.procs.start(
            [sys.executable, '-m', 'celery', '-A', 'tasks', 'worker', '-Q', QUEUE, '-c', '1',
             '--prefetch-multiplier', '1', '-E', '-n', f'{box}@%h', '-l', 'info'],
            env=self.env(box), name=f'worker-{box}')
        wait_until(lambda: 'ready.' in self.procs.log(proc) or proc.poll() is not None,
                   90, f'the worker of {box}')
        assert proc.poll() is None, self.procs.log(proc)
        self.workers[box] = proc
        return proc

    def kill_worker(self, box):
        self.procs.kill(self.workers.pop(box))

    # -- looking at the broker and the ledger -------------------------------------

    def ready(self) -> int:
        """Ready messages in the model's queue, as the broker counts them."""
        import tasks
        from kombu.exceptions import ChannelError
        with tasks.app.connection_for_write() as conn:
            try:
                return conn.default_channel.queue_declare(QUEUE, passive=True).message_count
            except ChannelError:  # Redis: an empty queue has no key, so "no such queue"
                return 0

    def rows(self):
        from tasks import ledger
        return {r.task_id: r for r in ledger.rows(self.db_url)}

    def wait_running(self, task_ids, timeout=60):
        def running():
            rows = self.rows()
            return all(rows[t].status == 'running' for t in task_ids) and rows
        try:
            return wait_until(running, timeout, f'{len(task_ids)} requests to run at once')
        except AssertionError:
            raise AssertionError([(r.user_id, r.status, r.worker, r.attempts, r.error)
                                  for r in self.rows().values() if r.status != 'rejected'])

    def wait_done(self, task_ids, timeout):
        def done():
            rows = self.rows()
            return all(rows.get(t) is not None and rows[t].status not in ('queued', 'running')
                       for t in task_ids)
        wait_until(done, timeout, f'{len(task_ids)} requests to finish', 0.25)
        return self.rows()


@pytest.fixture
def boxes(request, tmp_path, tasks_procs, postgresql, monkeypatch):
    broker = request.param
    url = start_redis(tasks_procs) if broker == 'redis' else request.getfixturevalue('rabbitmq')
    b = Boxes(tmp_path, tasks_procs, url, postgresql(f'scale_{broker}'), monkeypatch)
    b.broker = broker
    try:
        yield b
    finally:
        import tasks
        tasks.app.close()


def _submit(user, role, text, **payload):
    import tasks
    return tasks.submit(user, role, 'transcript', {'text': text, **payload})


# -- the scenario --------------------------------------------------------------------


@pytest.mark.parametrize('boxes', ['rabbitmq', 'redis'], indirect=True)
def test_two_boxes_on_a_shared_broker_and_postgresql(boxes):
    import tasks
    boxes.use_as_producer()
    kept = {}
    admitted, refused = [], 0

    # 1. Admission, no worker running: submitted lowest priority first, so
    #    first-in-first-out would serve them in the wrong order.
    for i in range(4):
        admitted.append(_submit(f'staff-{i}', 'staff', f'staff {i}'))
    for i in range(2):
        admitted.append(_submit(f'analyst-{i}', 'analyst', f'analyst {i}'))
    with pytest.raises(tasks.ResourceLimitExceeded):   # analyst limit is 1
        _submit('analyst-0', 'analyst', 'one too many')
    refused += 1
    admitted += [_submit('manager-0', 'manager', f'manager {i}') for i in range(2)]
    with pytest.raises(tasks.ResourceLimitExceeded):   # manager limit is 2
        _submit('manager-0', 'manager', 'one too many')
    refused += 1
    admitted.append(_submit('director-0', 'director', 'director'))  # depth 9 > 8: spike
    with pytest.raises(tasks.Overloaded):
        _submit('staff-9', 'staff', 'during the spike')
    refused += 1
    admitted.append(_submit('executive-0', 'executive', 'the cutoff role still gets in'))
    admitted.append(_submit('system-0', 'system', 'system'))
    kept['per-user limits'] = kept['spike admission'] = 'kept'

    # 2. Both boxes drain the backlog, by role priority across both.
    boxes.start_worker('box-a')
    boxes.start_worker('box-b')
    rows = boxes.wait_done([t.id for t in admitted], 120)
    assert_marked_running(rows[t.id] for t in admitted)
    served = sorted((rows[t.id] for t in admitted), key=lambda r: r.started_at)
    assert all(r.status == 'succeeded' for r in served), [(r.role, r.status, r.error)
                                                           for r in served]
    order = [r.priority for r in served]
    # Two boxes take the two best waiting requests at about the same moment, so
    # a request may start up to one claim earlier than a better one; never more.
    late = [(a.role, b.role, round(a.started_at - b.started_at, 2))
            for a in served for b in served
            if a.priority < b.priority and a.started_at - b.started_at > 0.6]
    assert not late, (order, late)
    print(f'{boxes.broker}: priorities in start order {order}')
    workers = {r.worker.split('@')[0] for r in served}
    assert workers == {'box-a', 'box-b'}, workers
    assert all(boxes.sims[b].stats()['served'] for b in boxes.sims)
    kept['role priority across boxes'] = 'kept'

    # 3. Retries: each box's Ollama answers HTTP 500 (twice, if asked twice).
    for sim in boxes.sims.values():
        sim.fault('500', count=2)
    retried = [_submit(f'system-{i}', 'system', f'retry {i}') for i in range(4)]
    rows = boxes.wait_done([t.id for t in retried], 90)
    assert all(rows[t.id].status == 'succeeded' for t in retried), [
        (rows[t.id].status, rows[t.id].error) for t in retried]
    errors = 4 - sum(f['count'] for sim in boxes.sims.values() for f in sim.stats()['faults'])
    assert errors >= 2 and sum(rows[t.id].retries for t in retried) == errors
    for sim in boxes.sims.values():
        httpx.delete(f'{sim.url}/_sim/faults').raise_for_status()
    kept['retries'] = 'kept'

    # 4. Box A's worker killed in the middle of a request; box B is busy with
    #    its own, so the request waits in the queue until it is given back.
    long_ = [_submit(f'system-long-{i}', 'system', f'long {i}',
                     options={'num_predict': LONG_TOKENS}) for i in range(2)]

    rows = boxes.wait_running([t.id for t in long_])
    victim = next(t for t in long_ if rows[t.id].worker.startswith('box-a@'))
    killed_at = time.monotonic()
    boxes.kill_worker('box-a')

    def given_back():
        # Waiting in the queue, or already taken again by box B once it is free.
        return boxes.ready() >= 1 or boxes.rows()[victim.id].attempts >= 2
    # Redis scans for expired deliveries every unacked_restore_interval (10 s) x
    # unacked_restore_throttle (10) by default: up to visibility_timeout + 100 s.
    wait_until(given_back, VISIBILITY_TIMEOUT + 150, 'the killed request given back', 0.2)
    given_back_after = time.monotonic() - killed_at
    boxes.start_worker('box-a')   # the box comes back and takes it
    rows = boxes.wait_done([t.id for t in long_], 120)
    assert all(rows[t.id].status == 'succeeded' for t in long_), [
        (rows[t.id].status, rows[t.id].error) for t in long_]
    assert rows[victim.id].attempts >= 2
    kept['worker killed mid-request'] = (
        'given back at once' if given_back_after < VISIBILITY_TIMEOUT / 2
        else 'given back after visibility_timeout')
    print(f'{boxes.broker}: the killed request was given back after {given_back_after:.1f}s')

    # 5. Cancellation (issue 13): one request waiting behind two running ones, and
    #    one of those two, are cancelled.
    if hasattr(tasks, 'cancel'):
        blockers = [_submit(f'system-block-{i}', 'system', f'block {i}',
                            options={'num_predict': LONG_TOKENS // 2}) for i in range(2)]
        boxes.wait_running([t.id for t in blockers])
        queued = _submit('director-1', 'director', 'to be cancelled while queued')
        tasks.cancel(queued.id, by_user='director-1')
        tasks.cancel(blockers[0].id, by_user='system-block-0')
        rows = boxes.wait_done([t.id for t in blockers + [queued]], 90)
        assert rows[queued.id].status == 'cancelled' and rows[queued.id].started_at is None
        assert [rows[t.id].status for t in blockers] == ['cancelled', 'succeeded']
        admitted += blockers + [queued]
        kept['cancellation'] = 'kept'
    else:
        kept['cancellation'] = 'not built yet'
    admitted += retried + long_

    # 6. The ledger and the report in PostgreSQL account for every request.
    rows = boxes.rows()
    assert_marked_running(rows.values())
    by_status = {}
    for r in rows.values():
        by_status[r.status] = by_status.get(r.status, 0) + 1
    cancelled = by_status.get('cancelled', 0)
    assert len(rows) == len(admitted) + refused
    assert by_status == {k: v for k, v in {
        'succeeded': len(admitted) - cancelled, 'rejected': refused,
        'cancelled': cancelled}.items() if v}, by_status
    report = subprocess.run([sys.executable, '-m', 'tasks', 'report', '--json', '--since', '1h'],
                            env={**os.environ, **boxes.env()}, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data['requests'] == len(rows) and data['by_status'] == by_status
    assert data['active_requests'] == 0 and data['queue_depth'][MODEL]['ready'] == 0
    results = _successes_in_result_backend(boxes.db_url)
    assert {t for t, r in rows.items() if r.status == 'succeeded'} <= results
    kept['ledger and report in PostgreSQL'] = 'every request'

    assert kept == documented_table()[boxes.broker], (
        f'docs/scaling-out.md says otherwise for {boxes.broker}: measured {kept}')
    assert _documented_commands() >= set(COMMANDS.values())


def test_a_worker_ahead_of_the_submitting_commit_marks_the_request_running(
        postgresql, tmp_path, monkeypatch):
    """submit() publishes before its ledger transaction commits; a worker that
    starts the request in between must still mark it running (on PostgreSQL its
    INSERT of the row waits for that commit and then meets the producer's row)."""
    import threading
    import tasks
    from tasks import config, ledger, signals
    db_url = postgresql('ledger_race')
    path = tmp_path / 'box.toml'
    path.write_text(f'ledger_url = "{db_url}"\n\n[models]\n"{MODEL}" = {{slots = 1, queue = "{QUEUE}"}}\n'
                    f'\n[request_types]\ntranscript = {{model = "{MODEL}", prompt = "{{text}}"}}\n')
    monkeypatch.setenv('TASKS_DATA_DIR', str(tmp_path / 'data'))
    tasks.configure(config.load(path))
    outcome = {}

    def worker_starts():
        try:
            signals.mark_running('t-race', kwargs={'model': MODEL}, worker='box-a@host')
            outcome['ok'] = True
        except Exception as exc:  # reported below, with the row
            outcome['error'] = exc
    with ledger.session(db_url) as s:   # the producer, as admission.submit does
        s.add(ledger.Request(
            task_id='t-race', user_id='alice', role='staff', priority=5,
            request_type='transcript', model=MODEL, queue=QUEUE, status=ledger.QUEUED,
            created_at=ledger.now() - 1, attempts=0, retries=0))
        s.flush()
        worker = threading.Thread(target=worker_starts)
        worker.start()
        worker.join(1)
        assert worker.is_alive(), f'the worker did not wait for the producer: {outcome}'
    worker.join(30)
    row = {r.task_id: r for r in ledger.rows(db_url)}['t-race']
    assert outcome == {'ok': True} and (row.status, row.attempts, row.worker, row.user_id) == (
        'running', 1, 'box-a@host', 'alice'), (outcome, row.as_dict())
    assert row.wait_seconds >= 1


def assert_marked_running(rows):
    """Every request that ran says where and when it started (a worker that takes a
    message before the submitting transaction commits must still record it)."""
    unmarked = [(r.user_id, r.status, r.attempts, r.worker, r.started_at) for r in rows
                if r.status == 'succeeded' and not (r.attempts and r.worker and r.started_at)]
    assert not unmarked, f'ran without being marked running in the ledger: {unmarked}'


def _successes_in_result_backend(db_url: str) -> set[str]:
    import sqlalchemy as sa
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {r[0] for r in conn.execute(sa.text(
                "SELECT task_id FROM celery_taskmeta WHERE status = 'SUCCESS'"))}
    finally:
        engine.dispose()


def documented_table() -> dict[str, dict[str, str]]:
    """The table between the ``checked-table`` markers of docs/scaling-out.md."""
    text = DOC.read_text()
    block = text.split('<!-- checked-table -->')[1]
    lines = [line for line in block.strip().splitlines() if line.startswith('|')]
    header = [c.strip().lower() for c in lines[0].strip('|').split('|')]
    out = {name: {} for name in header[1:]}
    for line in lines[2:]:
        cells = [re.sub(r'[`*]', '', c).strip() for c in line.strip('|').split('|')]
        for name, cell in zip(header[1:], cells[1:]):
            out[name][cells[0]] = cell
    return out


def _documented_commands() -> set[str]:
    block = DOC.read_text().split('<!-- checked-commands -->')[1]
    return {line.strip() for line in block.split('```')[1].splitlines() if line.strip()}
