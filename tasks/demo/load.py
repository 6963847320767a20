"""The demand spike the demo replays: its sizing, its timetable and the replay.

A run has three phases over ``duration`` seconds: a steady load below what
the GPU slots can serve, a burst of several hundred requests far above it,
and a light recovery load while the backlog drains.  The simulator's speed is
derived from the same figures, so that at any ``--scale``/``--duration`` the
GPU slots are the bottleneck and the backlog drains within the run.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

# Users per role at scale 1 (about 60): many staff, few executives.
POPULATION = {'system': 2, 'executive': 4, 'director': 6, 'manager': 10, 'analyst': 14,
              'staff': 24}
# Who asks during the burst: everyone, staff most.  Requests above the spike
# cutoff stay well under what the slots serve, as they would in a real office.
BURST_MIX = {'system': 0.03, 'executive': 0.06, 'director': 0.08, 'manager': 0.15,
             'analyst': 0.28, 'staff': 0.40}
# Request types, and their cost in GPU time relative to a transcript.
TYPE_MIX = {'transcript': 0.40, 'compliance': 0.27, 'document': 0.33}
TYPE_COST = {'transcript': 1.0, 'compliance': 1.4, 'document': 1.2}
TOKENS_PER_UNIT = 30   # tokens a transcript answer has
BURST_REQUESTS = 350   # at scale 1
PHASES = (('steady', 0.0, 0.30), ('burst', 0.30, 0.55), ('recovery', 0.55, 1.0))
STEADY_LOAD, RECOVERY_LOAD = 0.6, 0.25  # fractions of what the slots can serve
OVERLOAD = 6.0          # burst arrival rate over service rate

_TEXT = ('Quarterly planning review. Attendees discussed the hiring plan, the data '
         'retention policy, supplier contracts and the migration timeline. ')


@dataclass
class Sizing:
    scale: float
    duration: float
    users: dict          # role -> number of users
    burst_requests: int
    unit: float          # seconds of GPU time a transcript takes
    token_rate: float    # simulator tokens per second
    spike_depth: int
    slots: dict          # model -> GPU slots

    @property
    def tokens(self) -> dict:
        return {t: round(TOKENS_PER_UNIT * c) for t, c in TYPE_COST.items()}

    @property
    def capacity(self) -> float:
        """Requests per second all the slots serve with the demo's type mix."""
        per_request = sum(TYPE_MIX[t] * TYPE_COST[t] for t in TYPE_MIX) * self.unit
        return sum(self.slots.values()) / per_request

    def phase(self, name) -> tuple[float, float]:
        _, a, b = next(p for p in PHASES if p[0] == name)
        return a * self.duration, b * self.duration


def builtin():
    """The built-in configuration: the demo's models, request types and prompts."""
    from ..config import load
    return load('')


def demo_slots(cfg) -> dict:
    """GPU slots per model: two for the model most requests use, one for the others."""
    share = {name: 0.0 for name in cfg.models}
    for t, weight in TYPE_MIX.items():
        share[cfg.request_types[t].model] += weight
    busiest = max(share, key=share.get)
    return {name: 2 if name == busiest else 1 for name, s in share.items() if s}


def size(scale: float = 1.0, duration: float = 120.0) -> Sizing:
    # Not too few users even in a small run: per-user limits would cap the backlog.
    users = {role: max(1, round(n * max(scale, 0.35))) for role, n in POPULATION.items()}
    burst = max(20, round(BURST_REQUESTS * scale))
    slots = demo_slots(builtin())
    window = (PHASES[1][2] - PHASES[1][1]) * duration
    # Service time from the overload wanted during the burst; bounded so that a
    # request is long against dispatch overheads and short against the run.
    per_request = OVERLOAD * window / burst * sum(slots.values())
    mean_cost = sum(TYPE_MIX[t] * TYPE_COST[t] for t in TYPE_MIX)
    unit = min(4.0, max(0.5, per_request / mean_cost))
    return Sizing(scale=scale, duration=duration, users=users, burst_requests=burst,
                  unit=unit, token_rate=TOKENS_PER_UNIT / unit,
                  spike_depth=max(10, round(30 * scale)), slots=slots)


ADMISSION_CONTROLS = ('spike-mode', 'user-limits')


def config(sizing: Sizing, without=()) -> dict:
    """The demo's tasks configuration (written as TOML for every process): the
    built-in request types, answers sized for the run, its models' slots.

    ``without`` turns admission controls off (``spike-mode``, ``user-limits``)
    to show what they do; the criteria then fail, as they should.
    """
    base = builtin()
    types = base.request_types
    depth = 10 ** 9 if 'spike-mode' in without else sizing.spike_depth
    out = {
        'visibility_timeout': 30,
        'ollama': {'stall_timeout': 30, 'timeout': 120, 'connect_timeout': 2},
        'retry': {'max_retries': 3, 'backoff': 1, 'backoff_max': 4},
        'spike': {'depth': depth, 'resume_depth': depth // 2,
                  'cutoff_role': base.spike_cutoff_role},
        'models': {name: {'slots': n} for name, n in sizing.slots.items()},
        'users': {u: role for role, names in user_names(sizing).items() for u in names},
        'request_types': {
            t: {'model': types[t].model, 'task': types[t].task, 'prompt': types[t].prompt,
                'system': types[t].system, 'options': {**types[t].options, 'num_predict': n}}
            for t, n in sizing.tokens.items()},
    }
    if 'user-limits' in without:
        out['roles'] = {r.name: {'priority': r.priority, 'limit': 0}
                        for r in base.roles.values()}
    return out


@dataclass(order=True)
class Event:
    at: float            # seconds after the start of the replay
    user: str = field(compare=False)
    role: str = field(compare=False)
    request_type: str = field(compare=False)
    phase: str = field(compare=False)


def _pick(rng, weights: dict):
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def user_names(sizing: Sizing) -> dict[str, list[str]]:
    """role -> the demo's users in it (also its [users] directory)."""
    return {role: [f'{role}-{i + 1:02d}' for i in range(n)]
            for role, n in sizing.users.items()}


def timetable(sizing: Sizing, seed: int = 1) -> list[Event]:
    rng = random.Random(seed)
    users = user_names(sizing)
    everyone = [(role, u) for role, names in users.items() for u in names]
    events = []
    for name, load in (('steady', STEADY_LOAD), ('recovery', RECOVERY_LOAD)):
        start, end = sizing.phase(name)
        t = start + rng.expovariate(load * sizing.capacity)
        while t < end:  # Poisson arrivals from anyone
            role, user = rng.choice(everyone)
            events.append(Event(t, user, role, _pick(rng, TYPE_MIX), name))
            t += rng.expovariate(load * sizing.capacity)
    start, end = sizing.phase('burst')
    for role, n in burst_counts(sizing.burst_requests).items():
        for _ in range(n):
            events.append(Event(rng.uniform(start, end), rng.choice(users[role]), role,
                                _pick(rng, TYPE_MIX), 'burst'))
    return sorted(events)


def burst_counts(total: int, floor: int = 3) -> dict:
    """Requests per role in the burst: the mix, but every role asks a few times
    even in a small run (its waits are what the report compares)."""
    counts = {role: max(floor, int(total * w)) for role, w in BURST_MIX.items()}
    by_remainder = sorted(BURST_MIX, key=lambda r: total * BURST_MIX[r] % 1, reverse=True)
    for role in by_remainder[:max(0, total - sum(counts.values()))]:
        counts[role] += 1
    return counts


def reason(kind: str, text: str) -> str:
    """Why a request was refused, in a word or two (from the exception)."""
    if kind == 'ResourceLimitExceeded':
        return 'user limit'
    if 'spike mode' in text:
        return 'spike mode'
    if 'full' in text:
        return 'queue full'
    return kind


class Replay:
    """Submits the timetable through ``tasks.submit``, on time, and counts."""

    def __init__(self, events: list[Event]):
        self.events = events
        self.lock = threading.Lock()
        self.started_at: float | None = None
        self.attempts: list[dict] = []
        self.rejected: dict[str, int] = {}
        self.admitted = 0
        self.errors = 0
        self.max_lag = 0.0

    @property
    def submitted(self) -> int:
        return len(self.attempts)

    def run(self, stop: threading.Event, now=time.time):
        import tasks
        self.started_at = now()
        for n, ev in enumerate(self.events):
            delay = self.started_at + ev.at - now()
            if delay > 0 and stop.wait(delay):
                return
            if stop.is_set():
                return
            payload = {'text': f'[{ev.request_type} {n} from {ev.user}] ' + _TEXT * 3}
            t = now()
            record = {'at': t - self.started_at, 'user': ev.user, 'role': ev.role,
                      'request_type': ev.request_type, 'phase': ev.phase}
            try:
                record['task_id'] = tasks.submit(ev.user, ev.role, ev.request_type,
                                                 payload).id
                record['outcome'] = 'admitted'
            except (tasks.Overloaded, tasks.ResourceLimitExceeded) as exc:
                record['outcome'] = reason(type(exc).__name__, str(exc))
            except Exception as exc:  # noqa: BLE001  shown and counted, the replay goes on
                record['outcome'] = 'error'
                record['error'] = f'{type(exc).__name__}: {exc}'
            with self.lock:
                self.attempts.append(record)
                self.max_lag = max(self.max_lag, t - self.started_at - ev.at)
                if record['outcome'] == 'admitted':
                    self.admitted += 1
                elif record['outcome'] == 'error':
                    self.errors += 1
                else:
                    self.rejected[record['outcome']] = self.rejected.get(
                        record['outcome'], 0) + 1

    def admitted_ids(self) -> list[str]:
        with self.lock:
            return [a['task_id'] for a in self.attempts if a['outcome'] == 'admitted']
