"""A small Ollama client on httpx: streaming, stall and overall timeouts.

One :class:`httpx.Client` per worker process (connections are reused across
requests; a client is never shared across a fork).  Errors are sorted into
those worth retrying (:class:`OllamaUnavailable`) and those that are not
(:class:`OllamaRequestError`, :class:`OllamaTimeout`).
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
    """Connection refused, a 5xx, or the model still loading: retried."""


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
    if response.status_code >= 500 or 'loading' in text.lower():
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


class Ollama:
    def __init__(self, base_url, *, connect_timeout=5.0, stall_timeout=60.0,
                 request_timeout=900.0):
        self.base_url = base_url
        self.stall_timeout = stall_timeout
        self.request_timeout = request_timeout
        self.http = client(base_url, connect_timeout, stall_timeout)

    def _stream(self, path: str, body: dict, on_chunk) -> dict:
        """POST a streaming request; returns the final (done) chunk."""
        model = body.get('model', '?')
        deadline = time.monotonic() + self.request_timeout
        try:
            with self.http.stream('POST', path, json={**body, 'stream': True}) as response:
                _check(response, model, path)
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
            raise OllamaTimeout(f'Ollama {path} for model {model!r} stalled: nothing '
                                f'received for {self.stall_timeout:g}s') from None
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError,
                httpx.ConnectTimeout, httpx.WriteError) as exc:
            raise OllamaUnavailable(f'Ollama at {self.base_url} unreachable: {exc}') from None
        raise OllamaUnavailable(f'Ollama {path} for model {model!r}: stream ended early')

    def generate(self, model: str, prompt: str, *, system: str = '', images=None,
                 options=None) -> dict:
        parts = []
        body = {'model': model, 'prompt': prompt, 'options': options or {}}
        if system:
            body['system'] = system
        if images:
            body['images'] = images
        final = self._stream('/api/generate', body,
                             lambda c: parts.append(c.get('response', '')))
        return {'model': model, 'response': ''.join(parts),
                'done_reason': final.get('done_reason'), **stats(final)}

    def chat(self, model: str, messages: list, *, options=None) -> dict:
        parts = []
        body = {'model': model, 'messages': messages, 'options': options or {}}
        final = self._stream('/api/chat', body, lambda c: parts.append(
            (c.get('message') or {}).get('content', '')))
        text = ''.join(parts)  # 'response' as for generate: one shape for every answer
        return {'model': model, 'response': text,
                'message': {'role': 'assistant', 'content': text},
                'done_reason': final.get('done_reason'), **stats(final)}

    def embed(self, model: str, inputs: list[str]) -> dict:
        path = '/api/embed'
        try:
            response = self.http.post(path, json={'model': model, 'input': inputs},
                                      timeout=httpx.Timeout(self.request_timeout,
                                                            connect=self.http.timeout.connect))
        except httpx.TimeoutException:
            raise OllamaTimeout(f'Ollama {path} for model {model!r} timed out') from None
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise OllamaUnavailable(f'Ollama at {self.base_url} unreachable: {exc}') from None
        _check(response, model, path)
        data = response.json()
        return {'embeddings': data['embeddings'], **stats(data)}
