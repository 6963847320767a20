"""Configuration: one TOML file (``TASKS_CONFIG``) over built-in defaults.

Every key is checked: an unknown key or a bad value raises :class:`ConfigError`
naming the key and the file, so a typo never silently falls back to a default.
The tables ``models``, ``request_types`` and ``roles`` replace the built-in ones
when given (so a deployment lists exactly the models it has); every other
section is merged key by key.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

DEFAULT_OLLAMA = 'http://127.0.0.1:11434'
TASK_KINDS = ('generate', 'chat', 'embed')


class ConfigError(ValueError):
    """A configuration file that cannot be used; names the key and the file."""


@dataclass(frozen=True)
class Model:
    name: str
    queue: str
    slots: int
    max_queue: int
    embedding: bool


@dataclass(frozen=True)
class RequestType:
    name: str
    model: str
    task: str
    prompt: str
    system: str
    options: dict
    # Passed to Ollama as they are when set (a payload may set them too).
    format: str | dict | None = None
    keep_alive: str | float | None = None
    think: bool | str | None = None
    tools: list | None = None

    def ollama_fields(self) -> dict:
        return {k: getattr(self, k) for k in OLLAMA_FIELDS if getattr(self, k) is not None}


@dataclass(frozen=True)
class Role:
    name: str
    priority: int
    limit: int | None  # None: unlimited


@dataclass(frozen=True)
class Supervision:
    """``[supervisor]``: how ``python -m tasks workers`` keeps workers serving."""
    restart_backoff: float      # first wait before a restart; doubles each time
    restart_backoff_max: float
    max_restarts: int           # restarts of one worker within restart_window...
    restart_window: float       # ...after which the command gives up
    check_interval: float       # how often each worker is pinged and inspected
    unresponsive_after: float   # no ping answer this long: restarted
    stuck_after: float          # a request held, not started, with a slot free: restarted
    shutdown_grace: float       # a warm shutdown waits this long for running requests


@dataclass(frozen=True)
class Config:
    path: str | None
    data_dir: Path
    broker_url: str
    result_backend: str
    ledger_url: str
    visibility_timeout: float
    retention_days: float
    ollama_url: str
    connect_timeout: float
    stall_timeout: float
    request_timeout: float
    max_retries: int
    retry_backoff: int
    retry_backoff_max: int
    retry_jitter: bool
    spike_depth: int
    spike_resume_depth: int
    spike_cutoff_role: str
    embed_batch_size: int
    embed_batch_wait: float
    maintain_interval: float
    request_expiry: float
    supervision: Supervision
    gpu_slots: int  # inferences at once on the box, across all models
    models: dict[str, Model] = field(default_factory=dict)
    request_types: dict[str, RequestType] = field(default_factory=dict)
    roles: dict[str, Role] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)  # [users]: user id -> role
    default_role: str = 'staff'
    unknown_users: str = 'default'  # or 'refuse'

    def model_for_queue(self, queue):
        return next((m for m in self.models.values() if m.queue == queue), None)

    @property
    def cutoff_priority(self) -> int:
        return self.roles[self.spike_cutoff_role].priority


def default_data_dir() -> Path:
    if os.environ.get('TASKS_DATA_DIR'):
        return Path(os.environ['TASKS_DATA_DIR']).expanduser()
    base = os.environ.get('XDG_DATA_HOME') or Path.home() / '.local' / 'share'
    return Path(base) / 'tasks'


_PROMPTS = {
    'transcript': ('Summarise this meeting transcript: decisions, owners and deadlines, '
                   'as short bullet points.\n\n{text}'),
    'document': ('Extract the key facts, figures and obligations from this document '
                 '(text and any attached page images).\n\n{text}'),
    'compliance': ('Review the text below against company policy. List each possible '
                   'compliance issue with the passage it concerns and a severity.\n\n{text}'),
}

# Built-in defaults: they run as they are, against a local Ollama.
DEFAULTS = {
    'broker_url': None,       # sqlite:///<data dir>/broker.db
    'result_backend': None,   # db+sqlite:///<data dir>/results.db
    'ledger_url': None,       # sqlite:///<data dir>/ledger.db
    'visibility_timeout': 60.0,
    'retention_days': 90.0,
    'ollama': {'url': DEFAULT_OLLAMA, 'connect_timeout': 5.0, 'stall_timeout': 60.0,
               'timeout': 900.0},
    'retry': {'max_retries': 5, 'backoff': 2, 'backoff_max': 120, 'jitter': True},
    'spike': {'depth': 50, 'resume_depth': 25, 'cutoff_role': 'executive'},
    'embedding': {'batch_size': 16, 'max_wait': 0.2},
    'maintenance': {'interval': 3600.0, 'request_expiry': 86400.0},
    'supervisor': {'restart_backoff': 1.0, 'restart_backoff_max': 60.0, 'max_restarts': 5,
                   'restart_window': 600.0, 'check_interval': 10.0,
                   'unresponsive_after': 60.0, 'stuck_after': 120.0,
                   'shutdown_grace': None},  # None: ollama.timeout
    'gpu': {'slots': None},  # None: the sum of the models' slots
    'users': {},              # user id = role; the ledger's tasks_user table wins
    'access': {'default_role': 'staff', 'unknown_users': 'default'},
    'models': {
        'gpt-oss:20b': {'slots': 1},
        'llama3.2-vision:11b': {'slots': 1},
    },
    'request_types': {
        'transcript': {'model': 'gpt-oss:20b', 'task': 'generate',
                       'prompt': _PROMPTS['transcript']},
        'document': {'model': 'llama3.2-vision:11b', 'task': 'chat',
                     'prompt': _PROMPTS['document']},
        'compliance': {'model': 'gpt-oss:20b', 'task': 'generate',
                       'prompt': _PROMPTS['compliance']},
    },
    'roles': {
        'system': {'priority': 0, 'limit': 0},
        'executive': {'priority': 1, 'limit': 3},
        'director': {'priority': 2, 'limit': 2},
        'manager': {'priority': 3, 'limit': 2},
        'analyst': {'priority': 4, 'limit': 1},
        'staff': {'priority': 5, 'limit': 1},
    },
}

REPLACED_TABLES = ('models', 'request_types', 'roles')
MODEL_KEYS = {'queue', 'slots', 'max_queue', 'embedding'}
OLLAMA_FIELDS = ('format', 'keep_alive', 'think', 'tools')
REQUEST_TYPE_KEYS = {'model', 'task', 'prompt', 'system', 'options', *OLLAMA_FIELDS}
ROLE_KEYS = {'priority', 'limit'}


class _Reader:
    """Typed access to the merged settings, with errors that name key and file."""

    def __init__(self, data, where):
        self.data = data
        self.where = where

    def fail(self, key, message):
        raise ConfigError(f'{self.where}: {key}: {message}')

    def get(self, key, kind, *, minimum=None, maximum=None, allow_none=False):
        node = self.data
        for part in key.split('.'):
            node = node.get(part) if isinstance(node, dict) else None
        return self.check(key, node, kind, minimum=minimum, maximum=maximum,
                          allow_none=allow_none)

    def check(self, key, value, kind, *, minimum=None, maximum=None, allow_none=False):
        if value is None and allow_none:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            self.fail(key, f'expected {kind.__name__}, got {value!r}')
        if minimum is not None and value < minimum:
            self.fail(key, f'must be at least {minimum}, got {value!r}')
        if maximum is not None and value > maximum:
            self.fail(key, f'must be at most {maximum}, got {value!r}')
        return value

    def check_keys(self, prefix, table, allowed):
        if not isinstance(table, dict):
            self.fail(prefix, f'expected a table, got {table!r}')
        for key in table:
            if key not in allowed:
                self.fail(f'{prefix}.{key}' if prefix else key,
                          f'unknown key (known: {", ".join(sorted(allowed))})')


def _merge(defaults: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(defaults)
    for key, value in overrides.items():
        if key in REPLACED_TABLES or not isinstance(value, dict):
            merged[key] = value
        else:
            merged[key] = {**merged.get(key, {}), **value}
    return merged


def load(path: str | os.PathLike | None = None, **overrides) -> Config:
    """Read ``path`` (default: ``$TASKS_CONFIG``, else built-in defaults only).

    ``overrides`` are applied over the file, as if they were in it (tests and
    command-line options use them).
    """
    path = path if path is not None else os.environ.get('TASKS_CONFIG') or None
    where = str(path) if path else '<built-in defaults>'
    raw = {}
    if path:
        try:
            with open(path, 'rb') as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f'{where}: no such file (set by TASKS_CONFIG)') from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f'{where}: not valid TOML: {exc}') from None
    raw = _merge(raw, overrides) if overrides else raw
    r = _Reader(raw, where)
    r.check_keys('', raw, set(DEFAULTS))
    for section in ('ollama', 'retry', 'spike', 'embedding', 'maintenance', 'supervisor',
                    'gpu', 'access'):
        if section in raw:
            r.check_keys(section, raw[section], set(DEFAULTS[section]))
    r = _Reader(_merge(DEFAULTS, raw), where)
    return _build(r)


def _build(r: _Reader) -> Config:
    data_dir = default_data_dir()
    models = _models(r)
    roles = _roles(r)
    request_types = _request_types(r, models)
    cutoff = r.get('spike.cutoff_role', str)
    if cutoff not in roles:
        r.fail('spike.cutoff_role', f'unknown role {cutoff!r} (roles: {", ".join(roles)})')
    depth = r.get('spike.depth', int, minimum=1)
    resume = r.get('spike.resume_depth', int, minimum=0)
    if resume >= depth:
        r.fail('spike.resume_depth', f'must be below spike.depth ({depth}), got {resume}')
    default_role, unknown_users, users = _access(r, roles)
    url = os.environ.get('OLLAMA_HOST') or r.get('ollama.url', str)
    if '://' not in url:  # OLLAMA_HOST is often given as host:port
        url = f'http://{url}'
    return Config(
        path=None if r.where.startswith('<') else r.where,
        data_dir=data_dir,
        broker_url=r.get('broker_url', str, allow_none=True)
        or f'sqlite:///{data_dir / "broker.db"}',
        result_backend=r.get('result_backend', str, allow_none=True)
        or f'db+sqlite:///{data_dir / "results.db"}',
        ledger_url=r.get('ledger_url', str, allow_none=True)
        or f'sqlite:///{data_dir / "ledger.db"}',
        visibility_timeout=r.get('visibility_timeout', float, minimum=1),
        retention_days=r.get('retention_days', float, minimum=0),
        ollama_url=url.rstrip('/'),
        connect_timeout=r.get('ollama.connect_timeout', float, minimum=0.1),
        stall_timeout=r.get('ollama.stall_timeout', float, minimum=0.1),
        request_timeout=r.get('ollama.timeout', float, minimum=0.1),
        max_retries=r.get('retry.max_retries', int, minimum=0),
        retry_backoff=r.get('retry.backoff', int, minimum=1),
        retry_backoff_max=r.get('retry.backoff_max', int, minimum=1),
        retry_jitter=r.get('retry.jitter', bool),
        spike_depth=depth,
        spike_resume_depth=resume,
        spike_cutoff_role=cutoff,
        embed_batch_size=r.get('embedding.batch_size', int, minimum=1, maximum=1000),
        embed_batch_wait=r.get('embedding.max_wait', float, minimum=0.001),
        maintain_interval=r.get('maintenance.interval', float, minimum=1),
        supervision=_supervision(r),
        gpu_slots=r.get('gpu.slots', int, minimum=1, allow_none=True)
        or sum(m.slots for m in models.values()),
        request_expiry=r.get('maintenance.request_expiry', float, minimum=1),
        models=models, request_types=request_types, roles=roles,
        users=users, default_role=default_role, unknown_users=unknown_users,
    )


def _supervision(r: _Reader) -> Supervision:
    def seconds(key, minimum=0.1):
        return r.get(f'supervisor.{key}', float, minimum=minimum)
    grace = r.get('supervisor.shutdown_grace', float, minimum=0, allow_none=True)
    return Supervision(
        restart_backoff=seconds('restart_backoff'),
        restart_backoff_max=seconds('restart_backoff_max'),
        max_restarts=r.get('supervisor.max_restarts', int, minimum=1),
        restart_window=seconds('restart_window', 1),
        check_interval=seconds('check_interval'),
        unresponsive_after=seconds('unresponsive_after'),
        stuck_after=seconds('stuck_after'),
        shutdown_grace=r.get('ollama.timeout', float) if grace is None else grace)


def _table(r: _Reader, name: str) -> dict:
    table = r.data.get(name)
    if not isinstance(table, dict) or not table:
        r.fail(name, 'must be a non-empty table')
    return table


def _models(r: _Reader) -> dict[str, Model]:
    models = {}
    for name, spec in _table(r, 'models').items():
        key = f'models.{name}'
        r.check_keys(key, spec, MODEL_KEYS)
        models[name] = Model(
            name=name,
            queue=r.check(f'{key}.queue', spec.get('queue', f'ollama.{name}'), str),
            slots=r.check(f'{key}.slots', spec.get('slots', 1), int, minimum=1),
            max_queue=r.check(f'{key}.max_queue', spec.get('max_queue', 1000), int,
                              minimum=1),
            embedding=r.check(f'{key}.embedding', spec.get('embedding', False), bool),
        )
    queues = [m.queue for m in models.values()]
    for m in models.values():
        if queues.count(m.queue) > 1:
            r.fail(f'models.{m.name}.queue', f'queue {m.queue!r} is used by two models')
    return models


def _roles(r: _Reader) -> dict[str, Role]:
    roles = {}
    for name, spec in _table(r, 'roles').items():
        key = f'roles.{name}'
        r.check_keys(key, spec, ROLE_KEYS)
        if 'priority' not in spec:
            r.fail(f'{key}.priority', 'missing (0 is served first)')
        limit = r.check(f'{key}.limit', spec.get('limit', 0), int, minimum=0)
        roles[name] = Role(
            name=name,
            priority=r.check(f'{key}.priority', spec['priority'], int, minimum=0,
                             maximum=9),
            limit=limit or None)
    return roles


def _request_types(r: _Reader, models: dict) -> dict[str, RequestType]:
    types = {}
    for name, spec in _table(r, 'request_types').items():
        key = f'request_types.{name}'
        r.check_keys(key, spec, REQUEST_TYPE_KEYS)
        model = r.check(f'{key}.model', spec.get('model'), str)
        if model not in models:
            r.fail(f'{key}.model', f'unknown model {model!r} (models: {", ".join(models)})')
        task = r.check(f'{key}.task', spec.get('task', 'generate'), str)
        if task not in TASK_KINDS:
            r.fail(f'{key}.task', f'must be one of {", ".join(TASK_KINDS)}, got {task!r}')
        prompt = r.check(f'{key}.prompt', spec.get('prompt', '{text}'), str)
        types[name] = RequestType(
            name=name, model=model, task=task, prompt=prompt,
            system=r.check(f'{key}.system', spec.get('system', ''), str),
            options=r.check(f'{key}.options', spec.get('options', {}), dict),
            **ollama_fields(spec, lambda field, message: r.fail(f'{key}.{field}', message)))
        if types[name].tools and task != 'chat':
            r.fail(f'{key}.tools', f'only a chat request type can offer tools (task {task!r})')
    return types


def ollama_fields(spec: dict, fail) -> dict:
    """``format``, ``keep_alive``, ``think`` and ``tools`` of a request type or a
    payload, checked against what Ollama accepts; ``fail(field, message)`` raises."""
    out = {}
    value = spec.get('format')
    if value is not None and value != 'json' and not isinstance(value, dict):
        fail('format', f'expected "json" or a JSON schema (a table), got {value!r}')
    out['format'] = value
    value = spec.get('keep_alive')
    if value is not None and (isinstance(value, bool)
                              or not isinstance(value, (str, int, float))):
        fail('keep_alive', f'expected a duration such as "10m" or seconds, got {value!r}')
    out['keep_alive'] = value
    value = spec.get('think')
    if value is not None and not isinstance(value, bool) \
            and value not in ('low', 'medium', 'high'):
        fail('think', f'expected true, false, "low", "medium" or "high", got {value!r}')
    out['think'] = value
    value = spec.get('tools')
    if value is not None and (not isinstance(value, list)
                              or not all(isinstance(t, dict) for t in value)):
        fail('tools', f'expected a list of tool tables, got {value!r}')
    out['tools'] = value
    return out


def to_toml(data: dict) -> str:
    """A configuration as TOML, for the shapes config files have (the demo and the
    tests write theirs with it): top-level values, tables, and tables of tables."""
    def value(v):
        if isinstance(v, bool):
            return 'true' if v else 'false'
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a TOML basic string
        if isinstance(v, list):
            return '[' + ', '.join(value(x) for x in v) + ']'
        return '{' + ', '.join(f'{json.dumps(k)} = {value(x)}' for k, x in v.items()) + '}'
    lines = [f'{k} = {value(v)}' for k, v in data.items() if not isinstance(v, dict)]
    for section, table in data.items():
        if not isinstance(table, dict):
            continue
        if table and all(isinstance(v, dict) for v in table.values()):
            for name, sub in table.items():
                lines.append(f'\n[{section}.{json.dumps(name)}]')
                lines += [f'{json.dumps(k)} = {value(v)}' for k, v in sub.items()]
        else:
            lines.append(f'\n[{section}]')
            lines += [f'{json.dumps(k)} = {value(v)}' for k, v in table.items()]
    return '\n'.join(lines) + '\n'


UNKNOWN_USERS = ('default', 'refuse')


def _access(r: _Reader, roles: dict) -> tuple[str, str, dict[str, str]]:
    """``[access]`` and ``[users]``: every role named must exist."""
    default_role = r.get('access.default_role', str)
    if default_role not in roles:
        r.fail('access.default_role', f'unknown role {default_role!r} '
                                      f'(roles: {", ".join(roles)})')
    unknown = r.get('access.unknown_users', str)
    if unknown not in UNKNOWN_USERS:
        r.fail('access.unknown_users', f'must be one of {", ".join(UNKNOWN_USERS)}, '
                                       f'got {unknown!r}')
    users = {}
    for user, role in (r.get('users', dict) or {}).items():
        r.check(f'users.{user}', role, str)
        if role not in roles:
            r.fail(f'users.{user}', f'unknown role {role!r} (roles: {", ".join(roles)})')
        users[user] = role
    return default_role, unknown, users
