"""The inference tasks: plain functions over the Ollama client.

The ledger is kept by :mod:`tasks.signals`; these tasks only call Ollama.
``tasks.embed`` is a celery-batches task: embedding requests waiting for the
same model are sent as one ``/api/embed`` call.
"""
from __future__ import annotations

import logging
from collections import defaultdict

from celery import signals as celery_signals
from celery.utils.time import get_exponential_backoff_interval

try:
    from celery_batches import Batches
except ImportError:  # without it, each embedding request is its own /api/embed call
    Batches = None

from . import gpu
from .app import app, broker_priority, current
from .ollama import Ollama, OllamaDown, OllamaError, OllamaUnavailable
from .signals import header, mark_on_gpu

logger = logging.getLogger(__name__)


def ollama() -> Ollama:
    return Ollama.from_config(current())


def backoff(cfg, retries: int) -> float:
    """Seconds before retry number ``retries + 1``, from ``[retry]``."""
    return get_exponential_backoff_interval(
        factor=cfg.retry_backoff, retries=retries, maximum=cfg.retry_backoff_max,
        full_jitter=cfg.retry_jitter)


def priority(request) -> int:
    """The role priority a request was sent with (0 is served first)."""
    cfg = current()
    role = cfg.roles.get(header(request, 'x-role'))
    if role is not None:
        return role.priority
    sent = (getattr(request, 'delivery_info', None) or {}).get('priority') or 0
    return broker_priority(cfg, sent)  # its own inverse on RabbitMQ


def on_gpu(task, call):
    """``call()`` holding one of the box's GPU slots (``[gpu] slots``)."""
    with gpu.slot(current(), priority(task.request)) as waited:
        if waited:
            mark_on_gpu(task.request.id)
        return call()


def retrying(task, call):
    """``call()``, retried later by ``[retry]`` (read at run time) when Ollama
    cannot serve it.  While Ollama is down the retries do not run out: the
    worker stops taking requests meanwhile (:mod:`tasks.availability`), and the
    message's expiry (``maintenance.request_expiry``) still bounds the wait."""
    try:
        return on_gpu(task, call)
    except OllamaUnavailable as exc:
        cfg = current()
        # Down: one more retry always allowed (Celery reads None as its default).
        limit = task.request.retries + 1 if isinstance(exc, OllamaDown) else cfg.max_retries
        raise task.retry(exc=exc, countdown=backoff(cfg, task.request.retries),
                         max_retries=limit) from None


@app.task(name='tasks.generate', bind=True)
def generate(self, model: str, prompt: str, system: str = '', images=None, options=None,
             format=None, keep_alive=None, think=None) -> dict:
    return retrying(self, lambda: ollama().generate(
        model, prompt, system=system, images=images, options=options, format=format,
        keep_alive=keep_alive, think=think))


@app.task(name='tasks.chat', bind=True)
def chat(self, model: str, messages: list, options=None, format=None, keep_alive=None,
         think=None, tools=None) -> dict:
    return retrying(self, lambda: ollama().chat(
        model, messages, options=options, format=format, keep_alive=keep_alive,
        think=think, tools=tools))


def _embed_one(self, model: str, input) -> dict:
    """One embedding request, unbatched (used when celery-batches is missing)."""
    out = retrying(self, lambda: ollama().embed(
        model, [input] if isinstance(input, str) else list(input)))
    result = {'model': model, 'embeddings': out['embeddings'], 'batch_size': 1,
              'prompt_eval_count': out.get('prompt_eval_count'),
              'total_duration': out.get('total_duration'),
              'load_duration': out.get('load_duration')}
    if isinstance(input, str):
        result['embedding'] = out['embeddings'][0]
    return result


def _embed_batch(self, requests) -> dict:
    """Embed a batch of requests, one ``/api/embed`` call per model.

    Each request is ``embed(model=..., input=str | [str, ...])``.  Returns
    ``{task_id: (outcome, value)}`` with outcome ``succeeded``, ``retried`` or
    ``failed``, which :mod:`tasks.signals` writes to the ledger.
    """
    outcomes = {}
    by_model = defaultdict(list)
    for req in requests:
        by_model[req.kwargs.get('model')].append(req)
    for model, reqs in by_model.items():
        inputs, spans = [], []
        for req in reqs:
            text = req.kwargs.get('input', '')
            items = [text] if isinstance(text, str) else list(text)
            spans.append((len(inputs), len(inputs) + len(items), isinstance(text, str)))
            inputs.extend(items)
        try:
            with gpu.slot(current(), min(priority(r) for r in reqs)):
                out = ollama().embed(model, inputs)
        except OllamaUnavailable as exc:
            for req in reqs:
                outcomes[req.id] = _retry_or_fail(self, req, exc)
            continue
        except OllamaError as exc:
            for req in reqs:
                self.backend.mark_as_failure(req.id, exc, request=req)
                outcomes[req.id] = ('failed', str(exc))
            continue
        logger.info('embedded %d inputs of %d requests with %s in one call',
                    len(inputs), len(reqs), model)
        for req, (start, end, single) in zip(reqs, spans):
            vectors = out['embeddings'][start:end]
            result = {'model': model, 'embeddings': vectors, 'batch_size': len(reqs),
                      # Ollama counts the batch's tokens; each request gets its share.
                      'prompt_eval_count': _share(out.get('prompt_eval_count'),
                                                  end - start, len(inputs)),
                      'total_duration': out.get('total_duration'),
                      'load_duration': out.get('load_duration')}
            if single:
                result['embedding'] = vectors[0]
            self.backend.mark_as_done(req.id, result, request=req)
            outcomes[req.id] = ('succeeded', result)
    return outcomes


if Batches is None:
    @celery_signals.worker_init.connect
    def _say_embeddings_are_not_batched(**_):
        # Said by a worker, which is where it matters; not on every import.
        logger.warning('celery-batches is not installed: embedding requests are not batched')
    embed = app.task(name='tasks.embed', bind=True, is_batch=False)(_embed_one)
else:
    class EmbedBatches(Batches):
        """Batch size and wait from ``[embedding]``, read when the worker runs."""

        @property
        def flush_every(self):
            return current().embed_batch_size

        @property
        def flush_interval(self):
            return current().embed_batch_wait

    embed = app.task(name='tasks.embed', base=EmbedBatches, bind=True, is_batch=True
                     )(_embed_batch)


def _share(total, part, whole):
    return None if total is None else round(total * part / max(whole, 1))


def _retry_or_fail(task, req, exc):
    """Autoretry for one request of a batch: send it again with a countdown."""
    cfg = current()
    retries = int(req.request_dict.get('retries') or 0)
    if retries >= cfg.max_retries and not isinstance(exc, OllamaDown):
        task.backend.mark_as_failure(req.id, exc, request=req)
        return ('failed', f'{exc} (gave up after {retries} retries)')
    countdown = backoff(cfg, retries)
    info = req.delivery_info or {}
    headers = {k: req.request_dict[k] for k in ('x-client',) if req.request_dict.get(k)}
    task.apply_async(args=req.args, kwargs=req.kwargs, task_id=req.id, countdown=countdown,
                     retries=retries + 1, queue=info.get('routing_key'),
                     priority=info.get('priority'), headers=headers)
    return ('retried', str(exc))


@app.task(name='tasks.maintain')
def maintain() -> dict:
    """Purge expired responses and expire stale requests (run by beat too)."""
    from .maintenance import run
    return run(current())
