"""A small Ollama client on httpx: streaming, stall and overall timeouts.

One :class:`httpx.Client` per worker process (connections are reused across
requests; a client is never shared across a fork).  Errors are sorted into
those worth retrying (:class:`OllamaUnavailable`: :class:`OllamaDown` when
Ollama does not answer at all, :class:`OllamaBusy` for its 429 and 503) and
those that are not (:class:`OllamaRequestError`, :class:`OllamaTimeout`).

Timeouts follow how Ollama answers: a request waits in Ollama's scheduler
(``OLLAMA_NUM_PARALLEL``) and while its model loads with no byte sent, bounded
only by the overall ``timeout``; once the answer has started, a gap longer than
``stall_timeout`` between two chunks is a stall.
"""
from __future__ import annotations

import json
import os
import threading
import time

import httpx

NANO = 1e9


class OllamaError(Exception):
    """Base of the errors below; the message says what Ollama answered."""


class OllamaUnavailable(OllamaError):
    """Ollama cannot serve the request now (down, 5xx, busy): retried."""


class OllamaDown(OllamaUnavailable):
    """No answer at all: connection refused, or the stream cut off (a restart)."""


class OllamaBusy(OllamaUnavailable):
    """HTTP 429, or the 503 "server busy" past ``OLLAMA_MAX_QUEUE``: retried with backoff."""


class OllamaRequestError(OllamaError):
    """A missing model (404) or a bad request (4xx): fails at once."""

    def __init__(self, message, status_code=None):
        super().__init__(message)
        self.status_code = status_code


class OllamaTimeout(OllamaError):
    """The model stopped sending (stall) or took longer than the overall limit.

    Not retried: a model that hangs once tends to hang again, and each try
    would hold a GPU slot for the whole stall.
    """


_clients: dict = {}
_lock = threading.Lock()


def client(base_url: str, connect_timeout: float, stall_timeout: float) -> httpx.Client:
    key = (base_url, os.getpid())
    with _lock:
        c = _clients.get(key)
        if c is None:
            # read= bounds the gap between two chunks of a stream: the stall timeout.
            c = httpx.Client(base_url=base_url, timeout=httpx.Timeout(
                stall_timeout, connect=connect_timeout))
            _clients[key] = c
        return c


def close_all():
    with _lock:
        for key, c in list(_clients.items()):
            if key[1] == os.getpid():
                c.close()
            _clients.pop(key)


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get('error') or response.text)
    except (ValueError, AttributeError):
        return response.text


def _check(response: httpx.Response, model: str, path: str):
    if response.status_code < 400:
        return
    response.read()
    text = _error_text(response)
    where = f'Ollama {path} for model {model!r}'
    if response.status_code in (429, 503):
        raise OllamaBusy(f'{where}: HTTP {response.status_code}: {text}')
    if response.status_code >= 500:
        raise OllamaUnavailable(f'{where}: HTTP {response.status_code}: {text}')
    if response.status_code == 404:
        raise OllamaRequestError(f'{where}: model not found (HTTP 404: {text}); '
                                 f'pull it with `ollama pull {model}`', 404)
    raise OllamaRequestError(f'{where}: HTTP {response.status_code}: {text}',
                             response.status_code)


def stats(final: dict) -> dict:
    """Ollama's counts and timings from a final chunk, durations in seconds."""
    out = {k: final.get(k) for k in ('prompt_eval_count', 'eval_count')}
    for k in ('total_duration', 'load_duration', 'prompt_eval_duration', 'eval_duration'):
        if final.get(k) is not None:
            out[k] = final[k] / NANO
    return out


UNREACHABLE = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError,
               httpx.ConnectTimeout, httpx.WriteError)
# Passed to Ollama as they are when set (docs/api.md); None leaves Ollama's default.
PASSED_THROUGH = ('format', 'keep_alive', 'think')


def _body(model, options, extra) -> dict:
    body = {'model': model, 'options': options or {}}
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


class Ollama:
    def __init__(self, base_url, *, connect_timeout=5.0, stall_timeout=60.0,
                 request_timeout=900.0):
        self.base_url = base_url
        self.stall_timeout = stall_timeout
        self.request_timeout = request_timeout
        self.http = client(base_url, connect_timeout, stall_timeout)

    @classmethod
    def from_config(cls, cfg) -> Ollama:
        return cls(cfg.ollama_url, connect_timeout=cfg.connect_timeout,
                   stall_timeout=cfg.stall_timeout, request_timeout=cfg.request_timeout)

    def _stream(self, path: str, body: dict, on_chunk) -> dict:
        """POST a streaming request; returns the final (done) chunk."""
        model = body.get('model', '?')
        deadline = time.monotonic() + self.request_timeout
        # Until the answer starts, Ollama sends nothing (queued, loading): only
        # the overall timeout applies.
        waiting = httpx.Timeout(self.request_timeout, connect=self.http.timeout.connect)
        started = False
        try:
            with self.http.stream('POST', path, json={**body, 'stream': True},
                                  timeout=waiting) as response:
                _check(response, model, path)
                # The answer has started: from now on, each read waits at most
                # stall_timeout (httpcore reads this when the body is first read).
                response.request.extensions['timeout'] = {
                    **waiting.as_dict(), 'read': self.stall_timeout}
                started = True
                for line in response.iter_lines():
                    if not line:
                        continue
                    chunk = json.loads(line)
                    if chunk.get('error'):
                        raise OllamaUnavailable(f'Ollama {path} for model {model!r}: '
                                                f'{chunk["error"]}')
                    on_chunk(chunk)
                    if chunk.get('done'):
                        return chunk
                    if time.monotonic() > deadline:
                        raise OllamaTimeout(
                            f'Ollama {path} for model {model!r} ran past the overall '
                            f'timeout of {self.request_timeout:g}s')
        except httpx.ReadTimeout:
            if started:
                raise OllamaTimeout(f'Ollama {path} for model {model!r} stalled: nothing '
                                    f'received for {self.stall_timeout:g}s') from None
            raise OllamaTimeout(f'Ollama {path} for model {model!r} did not start its '
                                f'answer within the overall timeout of '
                                f'{self.request_timeout:g}s') from None
        except UNREACHABLE as exc:
            raise OllamaDown(f'Ollama at {self.base_url} unreachable: {exc}') from None
        raise OllamaDown(f'Ollama {path} for model {model!r}: stream ended early')

    def generate(self, model: str, prompt: str, *, system: str = '', images=None,
                 options=None, format=None, keep_alive=None, think=None) -> dict:
        parts, thinking = [], []

        def take(c):
            parts.append(c.get('response') or '')
            thinking.append(c.get('thinking') or '')
        body = _body(model, options, {'system': system or None, 'images': images or None,
                                      'format': format, 'keep_alive': keep_alive,
                                      'think': think, 'prompt': prompt})
        final = self._stream('/api/generate', body, take)
        out = {'model': model, 'response': ''.join(parts)}
        if any(thinking):
            out['thinking'] = ''.join(thinking)
        return {**out, 'done_reason': final.get('done_reason'), **stats(final)}

    def chat(self, model: str, messages: list, *, options=None, format=None,
             keep_alive=None, think=None, tools=None) -> dict:
        parts, thinking, calls = [], [], []

        def take(c):
            message = c.get('message') or {}
            parts.append(message.get('content') or '')
            thinking.append(message.get('thinking') or '')
            calls.extend(message.get('tool_calls') or [])
        body = _body(model, options, {'messages': messages, 'format': format,
                                      'keep_alive': keep_alive, 'think': think,
                                      'tools': tools or None})
        final = self._stream('/api/chat', body, take)
        message = {'role': 'assistant', 'content': ''.join(parts)}
        if any(thinking):
            message['thinking'] = ''.join(thinking)
        if calls:
            message['tool_calls'] = calls
        # 'response' (and 'thinking') as for generate: one shape for every answer;
        # Ollama's own 'message' too.
        out = {'model': model, 'response': message['content']}
        if 'thinking' in message:
            out['thinking'] = message['thinking']
        return {**out, 'message': message, 'done_reason': final.get('done_reason'),
                **stats(final)}

    def embed(self, model: str, inputs: list[str], *, keep_alive=None) -> dict:
        path = '/api/embed'
        try:
            response = self.http.post(path, json=_body(model, None, {
                'input': inputs, 'keep_alive': keep_alive}),
                timeout=httpx.Timeout(self.request_timeout, connect=self.http.timeout.connect))
        except httpx.TimeoutException:
            raise OllamaTimeout(f'Ollama {path} for model {model!r} timed out') from None
        except UNREACHABLE as exc:
            raise OllamaDown(f'Ollama at {self.base_url} unreachable: {exc}') from None
        _check(response, model, path)
        data = response.json()
        return {'embeddings': data['embeddings'], **stats(data)}

    def models(self) -> set[str]:
        """The models Ollama has (``/api/tags``); raises :class:`OllamaDown`."""
        try:
            response = self.http.get('/api/tags', timeout=self.http.timeout.connect + 5)
            response.raise_for_status()
            tags = response.json().get('models') or []
        except (httpx.HTTPError, ValueError) as exc:
            raise OllamaDown(f'Ollama at {self.base_url} unreachable: {exc}') from None
        return {m.get('name') for m in tags} | {m.get('model') for m in tags}

    def answers(self) -> bool:
        """Whether Ollama answers at all (``/api/version``)."""
        try:
            return self.http.get('/api/version', timeout=self.http.timeout.connect + 2
                                 ).status_code == 200
        except httpx.HTTPError:
            return False
