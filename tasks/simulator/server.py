"""The simulated Ollama's HTTP API, in Ollama's formats (``docs/api.md``)."""
from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .models import NANO, Simulator, now_iso

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
        self.sim.calls[self.path] += 1
        if self.path == '/api/version':
            return self._json(200, {'version': '0.12.0-simulator'})
        if self.path == '/api/tags':
            return self._json(200, {'models': [self._model_info(m) for m in self.sim.models]})
        if self.path == '/api/ps':
            return self._json(200, {'models': [
                {**self._model_info(m), 'size_vram': 1 << 30,
                 'expires_at': '2099-01-01T00:00:00Z'} for m in self.sim.loaded]})
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
            with self.sim.lock:
                self.sim.faults.clear()
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
                    '/api/embed': self._embed}
        if self.path not in handlers:
            return self._error(404, 'not found')
        model = body.get('model')
        if not model:
            return self._error(400, 'model is required')
        if model not in self.sim.models:
            return self._error(404, f"model '{model}' not found, try pulling it first")
        fault = self.sim.take_fault(model)
        if fault and fault['kind'] == 'unknown':
            return self._error(404, f"model '{model}' not found, try pulling it first")
        if fault and fault['kind'] == '500':
            return self._error(500, 'simulated internal server error')
        if fault and fault['kind'] == 'loading':
            return self._error(503, 'model is loading, try again later')
        handlers[self.path](model, body, fault)

    @staticmethod
    def _model_info(name):
        return {'name': name, 'model': name, 'modified_at': '2025-01-01T00:00:00Z',
                'size': 1 << 30, 'digest': hashlib.sha256(name.encode()).hexdigest(),
                'details': {'format': 'gguf', 'family': name.split(':')[0],
                            'parameter_size': name.split(':')[-1].upper(),
                            'quantization_level': 'Q4_K_M'}}

    def _generate(self, model, body, fault):
        chat = self.path == '/api/chat'
        if chat and not isinstance(body.get('messages'), list):
            return self._error(400, 'messages must be a list')
        if not chat and not isinstance(body.get('prompt', ''), str):
            return self._error(400, 'prompt must be a string')
        stream = body.get('stream', True)
        n = int((body.get('options') or {}).get('num_predict') or self.sim.tokens)
        text = body.get('prompt') or json.dumps(body.get('messages'))
        prompt_tokens = max(1, len(text.split()))
        with self.sim.slot(model):
            started = time.time()
            load = self.sim.ensure_loaded(model)
            t0 = time.time()
            pieces = [f'tok{i} ' for i in range(n)]
            if stream:
                self.send_response(200)
                self.send_header('Content-Type', 'application/x-ndjson')
                self.send_header('Transfer-Encoding', 'chunked')
                self.end_headers()
            for i, piece in enumerate(pieces):
                time.sleep(1.0 / self.sim.token_rate)
                if stream:
                    self._chunk(self._piece(model, chat, piece, done=False))
                if fault and fault['kind'] == 'stall' and i == 0:
                    time.sleep(fault['seconds'])  # a hung model: holds its slot, sends nothing
            eval_time = time.time() - t0
            final = {**self._piece(model, chat, '' if stream else ''.join(pieces), done=True),
                     'done_reason': 'stop', 'total_duration': int((time.time() - started) * NANO),
                     'load_duration': int(load * NANO), 'prompt_eval_count': prompt_tokens,
                     'prompt_eval_duration': int(0.001 * NANO), 'eval_count': n,
                     'eval_duration': int(eval_time * NANO)}
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
                                            'text': text[:200]})

    @staticmethod
    def _piece(model, chat, text, done):
        out = {'model': model, 'created_at': now_iso(), 'done': done}
        if chat:
            out['message'] = {'role': 'assistant', 'content': text}
        else:
            out['response'] = text
        return out

    def _embed(self, model, body, fault):
        inputs = body.get('input', '')
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            return self._error(400, 'input must be a string or a list of strings')
        with self.sim.slot(model):
            started = time.time()
            load = self.sim.ensure_loaded(model)
            if fault and fault['kind'] == 'stall':
                time.sleep(fault['seconds'])
            # One forward pass per call, a little more per input: batching pays.
            time.sleep(0.05 + 0.002 * len(inputs))
            with self.sim.lock:
                self.sim.embed_batches.append(len(inputs))
            self._json(200, {'model': model,
                             'embeddings': [self.sim.vector(t) for t in inputs],
                             'total_duration': int((time.time() - started) * NANO),
                             'load_duration': int(load * NANO),
                             'prompt_eval_count': sum(max(1, len(t.split())) for t in inputs)})


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
        """Stop listening, then listen again: a real 'connection refused'."""
        with self._refusing:
            self._restart = self.refusing = True
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
