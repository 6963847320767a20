"""The simulator behaves like Ollama where the app depends on it (over HTTP)."""
import json
import threading
import time

import httpx
import pytest

pytest_plugins = ['tasks_fixtures']


@pytest.fixture
def sim(tasks_procs):
    from tasks_fixtures import start_simulator
    return start_simulator(tasks_procs, '--token-rate', '100', '--load-time', '0.6',
                           '--max-queue', '2',
                           '--models', 'gpt-oss:20b=1,llama3.2-vision:11b,nomic-embed-text')


def _generate(url, **body):
    return httpx.post(f'{url}/api/generate', json={'model': 'gpt-oss:20b', 'stream': False,
                                                   **body}, timeout=30)


def test_parallel_queue_and_loading(sim):
    """One at a time per model; the rest wait without a byte; a full queue is a 503."""
    first_byte = {}
    results = {}

    def stream(i):
        t0 = time.monotonic()
        with httpx.stream('POST', f'{sim.url}/api/generate', timeout=30, json={
                'model': 'gpt-oss:20b', 'prompt': f'p{i}',
                'options': {'num_predict': 40}}) as r:
            results[i] = r.status_code
            if r.status_code == 200:
                for line in r.iter_lines():
                    first_byte.setdefault(i, time.monotonic() - t0)
                    if json.loads(line)['done']:
                        results[i] = json.loads(line)
                        break
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    # Three in the scheduler: 1 running (loading), 2 waiting = OLLAMA_MAX_QUEUE.
    busy = _generate(sim.url, prompt='one too many')
    for t in threads:
        t.join(30)
    assert busy.status_code == 503 and 'maximum pending requests exceeded' in busy.text
    finals = [results[i] for i in range(3)]
    assert all(f['done_reason'] == 'length' and f['eval_count'] == 40 for f in finals)
    # The first loaded the model (0.6 s); the others waited, silent, then ran.
    assert finals[0]['load_duration'] / 1e9 == pytest.approx(0.6, abs=0.3)
    assert finals[1]['load_duration'] == finals[2]['load_duration'] == 0
    assert first_byte[0] > 0.5 and first_byte[2] > first_byte[1] + 0.3
    assert sim.stats()['max_running']['gpt-oss:20b'] == 1
    assert sim.stats()['loads']['gpt-oss:20b'] == 1


def test_keep_alive_load_unload_show_and_answers(sim):
    url = sim.url
    loaded = _generate(url, model='llama3.2-vision:11b', keep_alive=-1)  # empty prompt
    assert loaded.json()['done_reason'] == 'load'
    ps = httpx.get(f'{url}/api/ps').json()['models']
    assert [m['name'] for m in ps] == ['llama3.2-vision:11b']
    unloaded = _generate(url, model='llama3.2-vision:11b', keep_alive=0)
    assert unloaded.json()['done_reason'] == 'unload'
    assert httpx.get(f'{url}/api/ps').json()['models'] == []
    answer = _generate(url, prompt='hi', keep_alive='0s').json()
    assert answer['done_reason'] == 'stop' and answer['load_duration'] > 0
    assert httpx.get(f'{url}/api/ps').json()['models'] == []  # keep_alive 0: gone again

    show = httpx.post(f'{url}/api/show', json={'model': 'gpt-oss:20b'}).json()
    assert {'completion', 'tools', 'thinking'} <= set(show['capabilities'])
    assert httpx.post(f'{url}/api/show', json={'model': 'nope'}).status_code == 404

    schema = {'type': 'object', 'properties': {'summary': {'type': 'string'},
                                               'risk': {'type': 'integer'}}}
    doc = _generate(url, prompt='x', format=schema, think=False).json()
    assert set(json.loads(doc['response'])) == {'summary', 'risk'} and 'thinking' not in doc
    assert json.loads(_generate(url, prompt='x', format='json').json()['response'])
    thought = _generate(url, prompt='x').json()  # gpt-oss thinks unless told not to
    assert thought['thinking']
    bad = _generate(url, model='llama3.2-vision:11b', prompt='x', think=True)
    assert bad.status_code == 400 and 'does not support thinking' in bad.text
