"""The simulated Ollama's HTTP API, in Ollama's formats (``docs/api.md``)."""
from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .models import MAX_QUEUE_ERROR, NANO, Busy, Simulator, keep_alive_seconds, now_iso

logger = logging.getLogger('tasks.simulator')


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'OllamaSimulator/0.1'

    @property
    def sim(self) -> Simulator:
        return self.server.sim

    def log_message(self, fmt, *args):
        logger.debug('%s %s', self.address_string(), fmt % args)

    # -- plumbing -----------------------------------------------------------
    def _json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status, message):
        self._json(status, {'error': message})

    def _body(self):
        length = int(self.headers.get('Content-Length') or 0)
        raw = self.rfile.read(length) if length else b''
        return json.loads(raw or b'{}')

    def _chunk(self, obj):
        data = json.dumps(obj).encode() + b'\n'
        self.wfile.write(b'%x\r\n%s\r\n' % (len(data), data))
        self.wfile.flush()

    # -- routes ---------------------------------------------------------------
    def do_GET(self):
        if self.server.refusing and not self.path.startswith('/_sim/'):
            self.close_connection = True  # kept-alive connections are dropped too
            return
        self.sim.calls[self.path] += 1
        if self.path == '/api/version':
            return self._json(200, {'version': '0.12.0-simulator'})
        if self.path == '/api/tags':
            return self._json(200, {'models': [self._model_info(m) for m in self.sim.models]})
        if self.path == '/api/ps':
            return self._json(200, {'models': [
                {**self._model_info(m.name), 'size_vram': 1 << 30,
                 'expires_at': now_iso(m.expires_at if m.expires_at > 0 else 4102444800)}
                for m in self.sim.in_memory()]})
        if self.path == '/_sim/stats':
            return self._json(200, self.sim.stats())
        if self.path in ('/', ''):
            body = b'Ollama is running'
            self.send_response(200)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            return self.wfile.write(body)
        self._error(404, 'not found')

    def do_DELETE(self):
        if self.path == '/_sim/faults':
            self.sim.clear_faults()
            return self._json(200, {'faults': []})
        self._error(404, 'not found')

    def do_POST(self):
        if self.server.refusing:  # kept-alive connections are dropped too
            self.close_connection = True
            return
        try:
            body = self._body()
        except ValueError:
            return self._error(400, 'invalid JSON body')
        self.sim.calls[self.path] += 1
        if self.path == '/_sim/faults':
            try:
                self.sim.add_fault(body.get('kind'), body.get('model', '*'),
                                   body.get('count', 1), body.get('seconds', 30.0))
            except (ValueError, TypeError) as exc:
                return self._error(400, str(exc))
            return self._json(200, {'faults': self.sim.stats()['faults']})
        handlers = {'/api/generate': self._generate, '/api/chat': self._generate,
                    '/api/embed': self._embed, '/api/show': self._show}
        if self.path not in handlers:
            return self._error(404, 'not found')
        model = body.get('model') or body.get('name')
        if not model:
            return self._error(400, 'model is required')
        if model not in self.sim.models:
            return self._error(404, f'model "{model}" not found, try pulling it first')
        fault = self.sim.take_fault(model) if self.path != '/api/show' else None
        if fault and fault['kind'] == 'unknown':
            return self._error(404, f'model "{model}" not found, try pulling it first')
        if fault and fault['kind'] in ('500', '503', '429'):
            return self._error(int(fault['kind']), {
                '500': 'simulated internal server error', '503': MAX_QUEUE_ERROR,
                '429': 'too many requests'}[fault['kind']])
        try:
            handlers[self.path](model, body, fault)
        except Busy as exc:
            self._error(503, str(exc))
        except ValueError as exc:  # a bad keep_alive, like Ollama's parse error
            self._error(400, str(exc))

    @staticmethod
    def _model_info(name):
        return {'name': name, 'model': name, 'modified_at': '2025-01-01T00:00:00Z',
                'size': 1 << 30, 'digest': hashlib.sha256(name.encode()).hexdigest(),
                'details': {'format': 'gguf', 'family': name.split(':')[0],
                            'parameter_size': name.split(':')[-1].upper(),
                            'quantization_level': 'Q4_K_M'}}

    def _show(self, model, body, fault):
        info = self._model_info(model)
        self._json(200, {'modelfile': f'FROM {model}\n', 'parameters': 'temperature 1',
                         'template': '{{ .Prompt }}', 'details': info['details'],
                         'model_info': {'general.architecture': info['details']['family'],
                                        'general.parameter_count': 1 << 30},
                         'capabilities': self.sim.models[model].capabilities,
                         'modified_at': info['modified_at']})

    def _generate(self, model, body, fault):
        chat = self.path == '/api/chat'
        caps = self.sim.models[model].capabilities
        if 'completion' not in caps:
            return self._error(400, f'"{model}" does not support {self.path[5:]}')
        if chat and not isinstance(body.get('messages', []), list):
            return self._error(400, 'messages must be a list')
        if not chat and not isinstance(body.get('prompt', ''), str):
            return self._error(400, 'prompt must be a string')
        think = body.get('think')
        if think and 'thinking' not in caps:
            return self._error(400, f'"{model}" does not support thinking')
        if chat and body.get('tools') and 'tools' not in caps:
            return self._error(400, f'registry.ollama.ai/library/{model} does not support tools')
        keep_alive = body.get('keep_alive')
        keep_alive_seconds(keep_alive)  # a bad value is a 400 before any scheduling
        empty = not (body.get('messages') if chat else body.get('prompt'))
        if empty and keep_alive is not None and keep_alive_seconds(keep_alive) == 0:
            self.sim.unload(model)  # Ollama: an empty prompt with keep_alive 0 unloads
            return self._json(200, {**self._piece(model, chat, '', done=True),
                                    'done_reason': 'unload'})
        with self.sim.scheduled(model, keep_alive) as load:
            if empty:  # an empty prompt only loads the model (Ollama answers in one object)
                return self._json(200, {**self._piece(model, chat, '', done=True),
                                        'done_reason': 'load'})
            self._answer(model, chat, body, fault, load, think is not False and
                         'thinking' in caps)

    def _answer(self, model, chat, body, fault, load, thinking):
        started = time.time()
        stream = body.get('stream', True)
        num_predict = (body.get('options') or {}).get('num_predict')
        n = int(num_predict) if num_predict and int(num_predict) > 0 else self.sim.tokens
        text = body.get('prompt') or json.dumps(body.get('messages'))
        pieces = _pieces(n, body.get('format'))
        thoughts = ['Thinking ', 'it ', 'over. '] if thinking else []
        tool_calls = _tool_calls(body.get('tools')) if chat else None
        if stream:
            self.send_response(200)
            self.send_header('Content-Type', 'application/x-ndjson')
            self.send_header('Transfer-Encoding', 'chunked')
            self.end_headers()
        epoch = self.sim.epoch
        for i, (kind, piece) in enumerate([('thinking', t) for t in thoughts]
                                          + [('content', p) for p in pieces]):
            time.sleep(1.0 / self.sim.token_rate)
            if self.sim.epoch != epoch:  # Ollama went away: the stream is cut
                self.close_connection = True
                return
            if stream:
                self._chunk(self._piece(model, chat, piece, done=False, kind=kind))
            if fault and fault['kind'] == 'stall' and i == 0:
                time.sleep(fault['seconds'])  # a hung model: holds its slot, sends nothing
        t_end = time.time()
        whole = '' if stream else ''.join(pieces)
        final = {**self._piece(model, chat, whole, done=True),
                 'done_reason': 'length' if num_predict and int(num_predict) > 0 else 'stop',
                 'total_duration': int((t_end - started + load) * NANO),
                 'load_duration': int(load * NANO),
                 'prompt_eval_count': max(1, len(text.split())),
                 'prompt_eval_duration': int(0.001 * NANO), 'eval_count': n,
                 'eval_duration': int((t_end - started) * NANO)}
        if not stream and thoughts:
            target = final['message'] if chat else final
            target['thinking'] = ''.join(thoughts)
        if tool_calls:
            final['message']['tool_calls'] = tool_calls
        try:
            if stream:
                self._chunk(final)
                self.wfile.write(b'0\r\n\r\n')
            else:
                self._json(200, final)
        finally:
            with self.sim.lock:
                self.sim.served.append({'model': model, 'endpoint': self.path,
                                        'started': started, 'finished': time.time(),
                                        'text': text[:200], 'format': body.get('format'),
                                        'keep_alive': body.get('keep_alive'),
                                        'think': body.get('think'),
                                        'tools': len(body.get('tools') or [])})

    @staticmethod
    def _piece(model, chat, text, done, kind='content'):
        out = {'model': model, 'created_at': now_iso(), 'done': done}
        if chat:
            out['message'] = {'role': 'assistant', 'content': ''}
            out['message'][kind] = text
        else:
            out['response'] = ''
            out['thinking' if kind == 'thinking' else 'response'] = text
        return out

    def _embed(self, model, body, fault):
        if 'embedding' not in self.sim.models[model].capabilities:
            return self._error(400, f'"{model}" does not support embeddings')
        inputs = body.get('input', '')
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            return self._error(400, 'input must be a string or a list of strings')
        with self.sim.scheduled(model, body.get('keep_alive')) as load:
            started = time.time()
            if fault and fault['kind'] == 'stall':
                time.sleep(fault['seconds'])
            # One forward pass per call, a little more per input: batching pays.
            time.sleep(0.05 + 0.002 * len(inputs))
            with self.sim.lock:
                self.sim.embed_batches.append(len(inputs))
            self._json(200, {'model': model,
                             'embeddings': [self.sim.vector(t) for t in inputs],
                             'total_duration': int((time.time() - started + load) * NANO),
                             'load_duration': int(load * NANO),
                             'prompt_eval_count': sum(max(1, len(t.split())) for t in inputs)})


def _pieces(n: int, fmt) -> list[str]:
    """``n`` tokens of answer; with ``format``, a JSON document cut into ``n`` pieces."""
    words = [f'tok{i} ' for i in range(n)]
    if not fmt:
        return words
    doc = json.dumps(_example(fmt if isinstance(fmt, dict) else None, ''.join(words).strip()))
    size = max(1, -(-len(doc) // n))
    return [doc[i:i + size] for i in range(0, len(doc), size)]


def _example(schema, text):
    """A value that satisfies a (simple) JSON schema; ``{"response": text}`` for "json"."""
    if schema is None:
        return {'response': text}
    kind = schema.get('type')
    if 'enum' in schema:
        return schema['enum'][0]
    if kind == 'object' or 'properties' in schema:
        return {k: _example(v, text) for k, v in (schema.get('properties') or {}).items()}
    if kind == 'array':
        return [_example(schema.get('items') or {'type': 'string'}, text)]
    return {'integer': 1, 'number': 1.5, 'boolean': True, 'null': None}.get(kind, text)


def _tool_calls(tools):
    """The model asks to call the first tool offered, with arguments fitting its schema."""
    for tool in tools or []:
        fn = (tool or {}).get('function') or {}
        if fn.get('name'):
            return [{'function': {'name': fn['name'],
                                  'arguments': _example(fn.get('parameters') or {}, 'x')}}]
    return None


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, sim: Simulator):
        super().__init__(address, Handler)
        self.sim = sim
        sim.server = self
        self._refusing = threading.Lock()
        self._restart = self.refusing = False

    def refuse_for(self, seconds):
        """Go away as a restarting Ollama does: answers being streamed are cut, the
        socket stops listening ('connection refused'), then listens again."""
        with self._refusing:
            self._restart = self.refusing = True
            self.sim.restarted()
            self.shutdown()  # returns once serve_forever has stopped
            self.socket.close()
            time.sleep(seconds)
            self.socket = socket.socket(self.address_family, self.socket_type)
            self.server_bind()
            self.server_activate()
            self.refusing = False


def serve(host, port, sim: Simulator):
    server = Server((host, port), sim)
    while True:
        server.serve_forever(poll_interval=0.05)
        with server._refusing:  # held until the socket listens again
            if not server._restart:
                return
            server._restart = False
