"""Submission and admission: who may queue what, and at which priority.

:func:`submit` checks the request, the user's concurrent limit, spike mode and
the queue's capacity, then records the request in the ledger and publishes
the inference task in one ledger transaction: a refused request leaves one
``rejected`` row and no message, an admitted one a ``queued`` row and its
message, never half of either.
"""
from __future__ import annotations

import logging

import kombu_sqlite
from celery import Task
from celery.result import AsyncResult
from kombu.exceptions import ChannelError
from kombu.utils.uuid import uuid
from sqlalchemy import select

from . import config, directory, ledger
from .app import app, broker_priority, current
from .ledger import QUEUED, REJECTED, Request, SpikeEpisode
from .worker_request import public_fields

logger = logging.getLogger('tasks.alerts')
QueueFull = getattr(kombu_sqlite, 'QueueFull', None) or type('QueueFull', (Exception,), {})
DEFAULT_RUN_SECONDS = 30.0


class Overloaded(Exception):
    """The model's queue is full or in spike mode; try again after ``retry_after`` s."""

    def __init__(self, message, retry_after: float):
        super().__init__(f'{message}; retry after {retry_after:.0f}s')
        self.retry_after = retry_after


class ResourceLimitExceeded(Exception):
    """The user already has as many requests queued or running as the role allows."""


def build_call(cfg, request_type, model, payload):
    """(task name, kwargs) for a request, with its prompt rendered.

    ``format``, ``keep_alive``, ``think`` and ``tools`` come from the request
    type, and a payload may set them too.
    """
    if not isinstance(payload, dict):
        raise ValueError(f'payload must be a dict, got {type(payload).__name__}')
    options = {**request_type.options, **(payload.get('options') or {})}

    def bad(field, message):
        raise ValueError(f"payload['{field}']: {message}")
    extra = {**request_type.ollama_fields(),
             **{k: v for k, v in config.ollama_fields(payload, bad).items() if v is not None}}
    if request_type.task == 'embed':
        text = payload.get('input', payload.get('text'))
        if not isinstance(text, (str, list)) or not text:
            raise ValueError("an embedding request needs payload['input'] "
                             "(a string or a list of strings)")
        return 'tasks.embed', {'model': model.name, 'input': text}
    try:
        prompt = request_type.prompt.format_map(payload)
    except KeyError as exc:
        raise ValueError(f'request type {request_type.name!r} needs payload key {exc}'
                         ) from None
    images = payload.get('images') or None
    if request_type.task == 'chat':
        messages = [{'role': 'system', 'content': request_type.system}] \
            if request_type.system else []
        user = {'role': 'user', 'content': prompt}
        if images:
            user['images'] = images
        return 'tasks.chat', {'model': model.name, 'messages': messages + [user],
                              'options': options, **extra}
    if 'tools' in extra:
        raise ValueError(f'request type {request_type.name!r} is not a chat: it cannot '
                         f'offer tools')
    return 'tasks.generate', {'model': model.name, 'prompt': prompt,
                              'system': request_type.system, 'images': images,
                              'options': options, **extra}


def resolve(cfg, role, request_type, model):
    """Validate names; raises ValueError naming what is unknown."""
    if role not in cfg.roles:
        raise ValueError(f'unknown role {role!r} (roles: {", ".join(cfg.roles)})')
    if request_type not in cfg.request_types:
        raise ValueError(f'unknown request type {request_type!r} '
                         f'(request types: {", ".join(cfg.request_types)})')
    rt = cfg.request_types[request_type]
    name = model or rt.model
    if name not in cfg.models:
        raise ValueError(f'unknown model {name!r} (models: {", ".join(cfg.models)})')
    m = cfg.models[name]
    if (rt.task == 'embed') != m.embedding and model is not None:
        kind = 'an embedding' if rt.task == 'embed' else 'a generation'
        raise ValueError(f'model {name!r} cannot serve {kind} request ({request_type!r})')
    return cfg.roles[role], rt, m


def queue_depth(queue: str) -> int:
    """Ready messages in a queue (passive declare: sqlite, Redis and AMQP alike)."""
    with app.pool.acquire(block=True) as conn:
        channel = conn.channel()
        try:
            return channel.queue_declare(queue, passive=True).message_count
        except ChannelError:  # never declared yet: nothing waiting
            return 0
        finally:
            try:
                channel.close()
            except Exception:
                pass


def retry_after(s, cfg, model, depth) -> float:
    """How long the backlog ahead takes to drain, from recent run times."""
    mean = ledger.mean_run_seconds(s, model.name, DEFAULT_RUN_SECONDS)
    return max(1.0, depth * mean / model.slots)


def _spike(s, cfg, model, depth, now):
    """The open spike episode of the model's queue after this look at its depth."""
    episode = s.scalars(select(SpikeEpisode).where(
        SpikeEpisode.queue == model.queue, SpikeEpisode.ended_at.is_(None))).first()
    if episode is None and depth > cfg.spike_depth:
        episode = SpikeEpisode(queue=model.queue, started_at=now, depth_at_start=depth,
                               refused=0)
        s.add(episode)
        logger.warning('ALERT spike mode ON for queue %s: %d requests waiting (threshold '
                       '%d); admitting only roles at or above %r', model.queue, depth,
                       cfg.spike_depth, cfg.spike_cutoff_role)
    elif episode is not None and depth <= cfg.spike_resume_depth:
        episode.ended_at = now
        logger.warning('ALERT spike mode OFF for queue %s: %d requests waiting after '
                       '%.0fs; %d requests refused', model.queue, depth,
                       now - episode.started_at, episode.refused)
        episode = None
    return episode


def submit(user_id, role, request_type, payload, *, model=None, task_id=None):
    """Queue one request for ``user_id`` acting as ``role``; returns its AsyncResult.

    Raises ValueError (unknown role, request type or model; bad payload),
    :class:`tasks.RoleNotAllowed` (the directory gives the user a lower role),
    :class:`ResourceLimitExceeded` or :class:`Overloaded`.
    """
    cfg = current()
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f'user_id must be a non-empty string, got {user_id!r}')
    role_, rt, m = resolve(cfg, role, request_type, model)
    name, kwargs = build_call(cfg, rt, m, payload)
    task_id = task_id or uuid()
    depth = queue_depth(m.queue)
    now = ledger.now()
    row = Request(task_id=task_id, user_id=user_id, role=role, priority=role_.priority,
                  request_type=request_type, model=m.name, queue=m.queue, status=QUEUED,
                  created_at=now, attempts=0, retries=0)
    refusal = None
    with ledger.session(cfg.ledger_url) as s:  # one write lock: admissions are serial
        episode = _spike(s, cfg, m, depth, now)
        refusal = directory.refusal(cfg, s, user_id, role)
        if refusal is not None:
            pass  # an escalation is refused as such, not counted against the spike
        elif episode is not None and role_.priority > cfg.cutoff_priority:
            episode.refused += 1
            refusal = Overloaded(
                f'model {m.name!r} is in spike mode ({depth} requests waiting); only '
                f'roles at or above {cfg.spike_cutoff_role!r} are admitted',
                retry_after(s, cfg, m, depth))
        elif depth >= m.max_queue:
            refusal = Overloaded(f'queue {m.queue!r} is full ({depth} requests waiting)',
                                 retry_after(s, cfg, m, depth))
        elif role_.limit and ledger.active_count(s, user_id, role) >= role_.limit:
            refusal = ResourceLimitExceeded(
                f'user {user_id!r} already has {role_.limit} request(s) queued or running, '
                f'the limit for role {role!r}')
        if refusal is None:
            s.add(row)
            s.flush()
            try:
                result = app.tasks[name].apply_async(
                    kwargs=kwargs, task_id=task_id, queue=m.queue,
                    priority=broker_priority(cfg, role_.priority),
                    headers={'x-client': user_id, 'x-role': role,
                             'x-request-type': request_type},
                    # Flower and the worker log show who asked, never the prompt.
                    argsrepr='()',
                    kwargsrepr=repr(public_fields(user_id, role, request_type, m.name)),
                    expires=cfg.request_expiry)
            except QueueFull:  # the message was not published: the row says so
                refusal = Overloaded(f'queue {m.queue!r} is full',
                                     retry_after(s, cfg, m, m.max_queue))
        if refusal is not None:
            row.status, row.completed_at = REJECTED, now
            row.error = f'{type(refusal).__name__}: {refusal}'
            s.merge(row)
    if refusal is not None:
        raise refusal
    return result


class RequestTask(Task):
    """``tasks.request``: :func:`submit` for callers that only send task messages.

    Flower's ``/api/task/async-apply/tasks.request`` calls ``apply_async``,
    which admits and publishes the inference task and returns its id.  A
    refusal is stored as that id's FAILURE, so the HTTP caller reads the reason
    from ``/api/task/result/<id>`` instead of an empty HTTP 500.
    """

    def apply_async(self, args=None, kwargs=None, task_id=None, **options):
        args, kwargs = list(args or ()), dict(kwargs or {})
        task_id = task_id or uuid()
        try:
            return submit(*args, task_id=task_id, **kwargs)
        except (ValueError, TypeError, PermissionError, Overloaded,
                ResourceLimitExceeded) as exc:
            self.backend.mark_as_failure(task_id, exc)
            return AsyncResult(task_id, app=self.app)


@app.task(name='tasks.request', base=RequestTask, bind=True)
def request(self, user_id, role, request_type, payload, model=None):
    """Admit a request sent as a message (runs only if published directly)."""
    return submit(user_id, role, request_type, payload, model=model).id
