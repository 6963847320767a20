"""The app against Ollama as it behaves (the simulator over HTTP, real workers)."""
import json
import time

pytest_plugins = ['tasks_fixtures']

LONG = {'options': {'num_predict': 600}}  # 1.5 s at the fixture's 400 tokens/s


def test_waiting_inside_ollama_is_not_a_stall(tasks_env):
    """slots 2 over OLLAMA_NUM_PARALLEL 1: the second request waits in Ollama's
    scheduler with no byte sent, longer than the stall timeout, and still succeeds."""
    tasks_env.configure(ollama={'stall_timeout': 1.0},
                        models={'gpt-oss:20b': {'slots': 2, 'queue': 'gpu.gpt-oss'}})
    import tasks
    tasks_env.worker()
    results = [tasks.submit(f'u{i}', 'manager', 'transcript', {'text': str(i), **LONG})
               for i in range(2)]
    for r in results:
        assert r.get(timeout=30)['done_reason'] == 'length'
    rows = [tasks_env.wait_status(r.id, 'succeeded') for r in results]
    assert all(r.retries == 0 and r.done_reason == 'length' for r in rows)
    assert tasks_env.sim.stats()['max_running']['gpt-oss:20b'] == 1
    # The stall timeout still applies once an answer has started.
    tasks_env.sim.fault('stall', 'gpt-oss:20b', count=1, seconds=3)
    stalled = tasks.submit('u9', 'manager', 'transcript', {'text': 'hang'})
    row = tasks_env.wait_status(stalled.id, 'failed')
    assert 'stalled: nothing received for 1s' in row.error


def test_missing_model_stops_its_worker_with_the_pull_hint(tasks_env):
    tasks_env.configure(models={'llama9:7b': {'slots': 1, 'queue': 'gpu.llama9'}},
                        request_types={'transcript': {'model': 'llama9:7b'},
                                       'compliance': {'model': 'llama9:7b'},
                                       'search': {'model': 'llama9:7b'}})
    proc = tasks_env.worker('llama9:7b', wait=False)
    assert proc.wait(60) == 78
    log = tasks_env.procs.log(proc)
    assert 'model llama9:7b is not in the Ollama' in log and 'ollama pull llama9:7b' in log
    assert ' ready.' not in log


def test_unreachable_ollama_at_start_is_a_warning(tasks_env):
    from tasks_fixtures import free_port
    tasks_env.configure()
    tasks_env.env['OLLAMA_HOST'] = f'http://127.0.0.1:{free_port()}'  # nobody listens
    proc = tasks_env.worker()  # it starts, and says why it will wait
    log = tasks_env.procs.log(proc)
    assert 'unreachable' in log and 'starts anyway and waits for it' in log


def test_busy_retried_bad_request_not_and_fields_passed_through(tasks_env):
    schema = {'type': 'object', 'properties': {'decision': {'type': 'string'}}}
    tasks_env.configure(request_types={
        'transcript': {'model': 'gpt-oss:20b', 'prompt': '{text}', 'format': schema,
                       'think': 'low', 'keep_alive': '10m'},
        'compliance': {'model': 'gpt-oss:20b', 'task': 'chat', 'prompt': '{text}',
                       'tools': [{'type': 'function', 'function': {
                           'name': 'lookup_policy', 'parameters': {
                               'type': 'object',
                               'properties': {'id': {'type': 'string'}}}}}]},
        'search': {'model': 'nomic-embed-text', 'task': 'embed'}})
    import tasks
    tasks_env.worker()
    sim = tasks_env.sim
    sim.fault('429', 'gpt-oss:20b', count=1)
    sim.fault('503', 'gpt-oss:20b', count=1)
    doc = tasks.submit('ann', 'manager', 'transcript', {'text': 'minutes'})
    answer = doc.get(timeout=30)
    assert set(json.loads(answer['response'])) == {'decision'} and answer['thinking']
    row = tasks_env.wait_status(doc.id, 'succeeded')
    assert row.retries == 2 and row.done_reason == 'stop'
    served = sim.stats()['served'][-1]
    assert (served['format'], served['think'], served['keep_alive']) == (schema, 'low', '10m')

    # The payload overrides the request type; a chat offers its tools.
    chat = tasks.submit('bob', 'manager', 'compliance', {'text': 'check', 'think': False})
    message = chat.get(timeout=30)['message']
    assert message['tool_calls'][0]['function'] == {'name': 'lookup_policy',
                                                    'arguments': {'id': 'x'}}
    assert 'thinking' not in message and sim.stats()['served'][-1]['tools'] == 1

    # A request Ollama refuses as bad (400) fails at once, with Ollama's reason.
    bad = tasks.submit('cat', 'manager', 'transcript', {'text': 'x', 'keep_alive': 'soon'})
    row = tasks_env.wait_status(bad.id, 'failed')
    assert row.retries == 0 and 'HTTP 400' in row.error and 'invalid duration' in row.error


def test_worker_pauses_while_ollama_is_down_and_resumes(any_broker_env):
    """Ollama restarts: the request in flight is retried, the others wait queued,
    nothing fails although the retries would have run out; alerts both ways."""
    env = any_broker_env
    env.configure(retry={'max_retries': 1, 'backoff': 1, 'backoff_max': 1, 'jitter': False})
    import tasks
    worker = env.worker()
    # 6 s of tokens: still streaming when Ollama goes away, even on a loaded box.
    flight = tasks.submit('ann', 'executive', 'transcript',
                          {'text': 'long', 'options': {'num_predict': 2400}})
    env.wait_status(flight.id, 'running', timeout=20)
    env.sim.fault('refuse', seconds=4)
    time.sleep(2)  # the worker has noticed and paused
    later = [tasks.submit(f'u{i}', 'manager', 'transcript', {'text': str(i)})
             for i in range(3)]
    time.sleep(1)
    log = env.procs.log(worker)
    assert 'does not answer: worker' in log and 'stops taking requests' in log
    assert {env.row(r.id).status for r in later} == {'queued'}
    for r in [flight] + later:
        r.get(timeout=60)
    assert 'answers again after' in env.procs.log(worker)
    row = env.wait_status(flight.id, 'succeeded')
    assert row.attempts >= 2 and row.retries >= 1
    assert {r.status for r in env.rows()} == {'succeeded'}
