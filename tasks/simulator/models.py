"""The simulated Ollama's state: its scheduler, models, faults and counters.

It schedules as Ollama's ``server/sched.go`` does where ``tasks`` depends on it:

* each model runs at most ``num_parallel`` requests at once (``OLLAMA_NUM_PARALLEL``);
  the others wait in the scheduler, with no byte sent, until a slot frees;
* at most ``max_queue`` requests wait in all (``OLLAMA_MAX_QUEUE``); one more is
  refused with 503 "server busy";
* a model not in memory is loaded first: the requests wait (no "loading" error)
  and the one that loaded it reports the time in ``load_duration``;
* a model stays loaded ``keep_alive`` after its last request (default 5 minutes;
  0 unloads at once, a negative value keeps it forever).
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

NANO = 1_000_000_000
DEFAULT_MODELS = {'gpt-oss:20b': 1, 'llama3.2-vision:11b': 1, 'nomic-embed-text': 1}
FAULT_KINDS = ('refuse', '500', '503', '429', 'stall', 'unknown')
DEFAULT_KEEP_ALIVE = 300.0
MAX_QUEUE_ERROR = 'server busy, please try again.  maximum pending requests exceeded'
# What a model can do, by family (Ollama reads it from the model's metadata).
THINKING = ('gpt-oss', 'deepseek-r1', 'qwen3')
TOOLS = ('gpt-oss', 'llama3.1', 'llama3.2', 'qwen3', 'mistral')


def now_iso(ts: float | None = None):
    when = datetime.fromtimestamp(time.time() if ts is None else ts, timezone.utc)
    return when.isoformat().replace('+00:00', 'Z')


def capabilities(name: str) -> list[str]:
    family = name.split(':')[0]
    if 'embed' in family:
        return ['embedding']
    caps = ['completion']
    if 'vision' in family or 'llava' in family:
        caps.append('vision')
    elif family.startswith(TOOLS):
        caps.append('tools')
    if family.startswith(THINKING):
        caps.append('thinking')
    return caps


def keep_alive_seconds(value) -> float:
    """Ollama's ``keep_alive``: seconds as a number, or a duration such as "5m"."""
    if value is None:
        return DEFAULT_KEEP_ALIVE
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = re.fullmatch(r'(-?\d+(?:\.\d+)?)(ms|s|m|h)?', str(value).strip())
    if not m:
        raise ValueError(f'time: invalid duration "{value}"')
    unit = {'ms': 0.001, 's': 1, 'm': 60, 'h': 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * unit


class Busy(Exception):
    """More requests wait than ``max_queue`` allows (Ollama's ErrMaxQueue)."""


@dataclass
class Model:
    name: str
    num_parallel: int
    slots: threading.Semaphore = field(init=False)
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: bool = False
    expires_at: float = 0.0
    running: int = 0
    loads: int = 0

    def __post_init__(self):
        self.slots = threading.Semaphore(self.num_parallel)

    @property
    def capabilities(self):
        return capabilities(self.name)

    def in_memory(self, now: float) -> bool:
        return self.loaded and (self.expires_at < 0 or now < self.expires_at)


class Simulator:
    """The state behind the HTTP handler: models, the scheduler, faults, counters."""

    def __init__(self, models=None, token_rate=200.0, load_time=0.0, tokens=8,
                 embed_dim=8, max_queue=512):
        self.models = {name: Model(name, n) for name, n in (models or DEFAULT_MODELS).items()}
        self.token_rate = token_rate
        self.load_time = load_time
        self.tokens = tokens
        self.embed_dim = embed_dim
        self.max_queue = max_queue
        self.faults: list[dict] = []
        self.lock = threading.Lock()
        self.pending = 0
        self.calls = defaultdict(int)
        self.embed_batches: list[int] = []
        self.max_running = defaultdict(int)
        self.max_pending = 0
        self.max_running_total = 0  # across models: what the GPU ran at once
        self.served: list[dict] = []
        self.epoch = 0  # goes up when the simulated Ollama restarts
        self.server = None  # set by the Server

    # -- faults -------------------------------------------------------------
    def add_fault(self, kind, model='*', count=1, seconds=30.0):
        if kind not in FAULT_KINDS:
            raise ValueError(f'unknown fault {kind!r} (one of {", ".join(FAULT_KINDS)})')
        with self.lock:
            self.faults.append({'kind': kind, 'model': model or '*', 'count': int(count),
                                'seconds': float(seconds)})
        if kind == 'refuse':
            threading.Thread(target=self._refuse, args=(float(seconds),), daemon=True).start()

    def take_fault(self, model):
        with self.lock:
            for fault in self.faults:
                if fault['kind'] != 'refuse' and fault['model'] in ('*', model) \
                        and fault['count'] != 0:
                    fault['count'] -= 1
                    return fault
        return None

    def clear_faults(self):
        with self.lock:
            self.faults.clear()

    def restarted(self):
        """Answers in progress are cut and every model leaves memory."""
        with self.lock:
            self.epoch += 1
            for m in self.models.values():
                m.loaded = False

    def _refuse(self, seconds):
        if self.server is not None:
            self.server.refuse_for(seconds)
        with self.lock:
            self.faults = [f for f in self.faults if f['kind'] != 'refuse']

    # -- the scheduler --------------------------------------------------------
    @contextmanager
    def scheduled(self, name: str, keep_alive=None):
        """Wait for a slot of the model and for it to be loaded; yields the seconds
        spent loading.  Raises :class:`Busy` when too many requests wait."""
        model = self.models[name]
        with self.lock:
            if self.pending >= self.max_queue:
                raise Busy(MAX_QUEUE_ERROR)
            self.pending += 1
            self.max_pending = max(self.max_pending, self.pending)
        try:
            model.slots.acquire()
        finally:
            with self.lock:
                self.pending -= 1
        try:
            load = self.load(model)
            with self.lock:
                model.running += 1
                self.max_running[name] = max(self.max_running[name], model.running)
                total = sum(m.running for m in self.models.values())
                self.max_running_total = max(self.max_running_total, total)
            try:
                yield load
            finally:
                with self.lock:
                    model.running -= 1
                    self._keep(model, keep_alive)
        finally:
            model.slots.release()

    def load(self, model: Model) -> float:
        """Seconds this request spent loading the model (0 when it was in memory)."""
        with model.load_lock:
            if model.in_memory(time.time()):
                return 0.0
            t0 = time.monotonic()
            time.sleep(self.load_time)
            with self.lock:
                model.loaded, model.expires_at = True, time.time() + DEFAULT_KEEP_ALIVE
                model.loads += 1
            return time.monotonic() - t0

    def _keep(self, model: Model, keep_alive):
        seconds = keep_alive_seconds(keep_alive)
        if seconds == 0:
            model.loaded = model.running > 0
        model.expires_at = -1.0 if seconds < 0 else time.time() + seconds

    def unload(self, name: str):
        model = self.models[name]
        with self.lock:
            model.loaded = model.running > 0
            model.expires_at = time.time()

    def in_memory(self) -> list[Model]:
        now = time.time()
        return [m for m in self.models.values() if m.in_memory(now)]

    # -- answers --------------------------------------------------------------
    def vector(self, text):
        digest = hashlib.sha256(text.encode()).digest()
        return [round(b / 255.0, 4) for b in digest[:self.embed_dim]]

    def stats(self):
        with self.lock:
            return {'calls': dict(self.calls), 'embed_batches': list(self.embed_batches),
                    'max_running': dict(self.max_running),
                    'max_running_total': self.max_running_total,
                    'running': {m.name: m.running for m in self.models.values()},
                    'loads': {m.name: m.loads for m in self.models.values()},
                    'pending': self.pending, 'max_pending': self.max_pending,
                    'served': list(self.served), 'faults': list(self.faults)}
