"""The simulated Ollama's state: models, their slots, loading, faults, counters."""
from __future__ import annotations

import hashlib
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone

NANO = 1_000_000_000
DEFAULT_MODELS = {'gpt-oss:20b': 1, 'llama3.2-vision:11b': 1, 'nomic-embed-text': 1}
FAULT_KINDS = ('refuse', '500', 'loading', 'stall', 'unknown')


def now_iso():
    return datetime.now(timezone.utc).isoformat().replace('+00:00', 'Z')


class Simulator:
    """The state behind the HTTP handler: models, slots, faults, counters."""

    def __init__(self, models=None, token_rate=200.0, load_time=0.0, tokens=8,
                 embed_dim=8):
        self.models = dict(models or DEFAULT_MODELS)
        self.slots = {m: threading.BoundedSemaphore(n) for m, n in self.models.items()}
        self.token_rate = token_rate
        self.load_time = load_time
        self.tokens = tokens
        self.embed_dim = embed_dim
        self.loaded: dict[str, float] = {}
        self.load_lock = threading.Lock()
        self.faults: list[dict] = []
        self.lock = threading.Lock()
        self.calls = defaultdict(int)
        self.embed_batches: list[int] = []
        self.running = defaultdict(int)
        self.max_running = defaultdict(int)
        self.served: list[dict] = []
        self.server = None  # set by serve()

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

    def _refuse(self, seconds):
        if self.server is not None:
            self.server.refuse_for(seconds)
        with self.lock:
            self.faults = [f for f in self.faults if f['kind'] != 'refuse']

    # -- models -------------------------------------------------------------
    def ensure_loaded(self, model) -> float:
        """Seconds spent loading (0 when already in memory)."""
        with self.load_lock:
            if model in self.loaded:
                return 0.0
            time.sleep(self.load_time)
            self.loaded[model] = time.time()
            return self.load_time

    def slot(self, model):
        sim = self

        class _Slot:
            def __enter__(self):
                sim.slots[model].acquire()
                with sim.lock:
                    sim.running[model] += 1
                    sim.max_running[model] = max(sim.max_running[model], sim.running[model])

            def __exit__(self, *exc):
                with sim.lock:
                    sim.running[model] -= 1
                sim.slots[model].release()
        return _Slot()

    def stats(self):
        with self.lock:
            return {'calls': dict(self.calls), 'embed_batches': list(self.embed_batches),
                    'max_running': dict(self.max_running), 'running': dict(self.running),
                    'served': list(self.served), 'faults': list(self.faults)}

    def vector(self, text):
        digest = hashlib.sha256(text.encode()).digest()
        return [round(b / 255.0, 4) for b in digest[:self.embed_dim]]


