"""``python -m tasks workers``: run the workers and keep the box serving.

* A worker that exits is started again after an exponential backoff
  (``[supervisor] restart_backoff``, doubling up to ``restart_backoff_max``); the
  others keep serving.  A request the dead worker held is delivered again (acks
  late).  More than ``max_restarts`` restarts of one worker within
  ``restart_window`` seconds: the command stops everything and exits 1, naming
  the worker and its last log lines.  A worker that exits with status 78 (its
  model is not in Ollama, see :mod:`tasks.availability`) is not restarted.
* Every ``check_interval`` s each worker is pinged and its requests inspected.
  A wedged worker is restarted: one that has not answered a ping for
  ``unresponsive_after`` s, or that holds a request it has not started for
  ``stuck_after`` s while a pool slot is free.
* SIGTERM or Ctrl-C: a warm shutdown that waits up to ``shutdown_grace`` s
  (default: ``ollama.timeout``) for running requests, kills what is left (its
  requests are delivered again later), and says which.

Each worker's output is passed through, each line prefixed with its name.
"""
from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections import deque

from .app import app
from .availability import EX_CONFIG
from .workers import commands, kill, stop

LOG_LINES = 20


class Worker:
    """One supervised worker process: its spec, process, restarts and last lines."""

    def __init__(self, spec, echo):
        self.spec = spec
        self.echo = echo
        self.proc: subprocess.Popen | None = None
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self.restarts: deque[float] = deque()
        self.restart_at: float | None = None
        self.gave_up = False
        self.ready = False
        self.missed_since: float | None = None
        self.held_since: dict[str, float] = {}

    @property
    def name(self):
        return self.spec.name

    def start(self):
        self.proc = subprocess.Popen(self.spec.cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.missed_since, self.held_since, self.ready = None, {}, False
        threading.Thread(target=self._relay, args=(self.proc,), daemon=True,
                         name=f'log-{self.name}').start()
        self.echo(f'started worker for {self.name} (pid {self.proc.pid}): '
                  f'{" ".join(self.spec.cmd[2:])}')

    def _relay(self, proc):
        for raw in proc.stdout:
            line = raw.decode(errors='replace').rstrip()
            self.lines.append(line)
            self.ready = self.ready or ' ready.' in line
            self.echo(f'[{self.name}] {line}')

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        return '\n'.join(f'    {line}' for line in self.lines)


class Supervisor:
    def __init__(self, cfg, specs, echo=print):
        self.cfg = cfg
        self.settings = cfg.supervision
        self.echo = echo
        self.workers = [Worker(spec, echo) for spec in specs]
        self.next_check = 0.0

    def run(self) -> int:
        for w in self.workers:
            w.start()
        self.next_check = time.monotonic() + self.settings.check_interval
        while True:
            now = time.monotonic()
            for w in self.workers:
                failure = self.tend(w, now)
                if failure:
                    return failure
            if not any(w.running() or w.restart_at for w in self.workers):
                self.echo('no worker is left running')
                return 1
            if now >= self.next_check:
                self.check()
                self.next_check = time.monotonic() + self.settings.check_interval
            time.sleep(0.2)

    def tend(self, w: Worker, now: float) -> int:
        """Start again a worker that exited, after its backoff; 1 when giving up."""
        if w.gave_up:
            return 0
        if w.restart_at is not None:
            if now >= w.restart_at:
                w.restart_at = None
                w.start()
            return 0
        if w.running():
            return 0
        code = w.proc.returncode
        if code == EX_CONFIG:
            self.echo(f'worker for {w.name} exited with {code} (its configuration or model '
                      f'is missing, see its log above); not restarted, the others serve on')
            w.gave_up = True
            return 0
        while w.restarts and w.restarts[0] < now - self.settings.restart_window:
            w.restarts.popleft()
        if len(w.restarts) >= self.settings.max_restarts:
            self.echo(f'worker for {w.name} exited with {code}, exit {len(w.restarts) + 1} '
                      f'within {self.settings.restart_window:g}s: giving up. Its last log '
                      f'lines:\n{w.tail()}')
            return 1
        delay = min(self.settings.restart_backoff_max,
                    self.settings.restart_backoff * 2 ** len(w.restarts))
        w.restarts.append(now)
        w.restart_at = now + delay
        self.echo(f'worker for {w.name} exited with {code}; starting it again in '
                  f'{delay:g}s (restart {len(w.restarts)} of at most '
                  f'{self.settings.max_restarts} in {self.settings.restart_window:g}s)')
        return 0

    # -- wedged workers ---------------------------------------------------------
    def check(self):
        """Ping and inspect the running workers; restart the wedged ones."""
        live = [w for w in self.workers if w.running() and w.ready]
        if not live:
            return
        nodes = [w.spec.node for w in live]
        timeout = min(5.0, self.settings.check_interval)
        try:
            pongs = {node for reply in app.control.ping(destination=nodes, timeout=timeout)
                     for node in reply}
            inspect = app.control.inspect(destination=nodes, timeout=timeout)
            reserved, active = inspect.reserved() or {}, inspect.active() or {}
        except Exception as exc:  # noqa: BLE001  the broker may be restarting
            self.echo(f'could not check the workers: {exc}')
            return
        now = time.monotonic()
        for w in live:
            reason = self.wedged(w, w.spec.node in pongs, reserved.get(w.spec.node),
                                 active.get(w.spec.node), now)
            if reason:
                self.echo(f'worker for {w.name} is wedged ({reason}): restarting it')
                kill(w.proc)  # its held requests are delivered again
                self.tend(w, now)

    def wedged(self, w: Worker, answered, reserved, active, now) -> str | None:
        s = self.settings
        if not answered:
            w.missed_since = w.missed_since or now
            if now - w.missed_since >= s.unresponsive_after:
                return f'no answer to ping for {now - w.missed_since:.0f}s'
            return None
        w.missed_since = None
        if reserved is None or active is None:
            return None
        # Held but not started, with a pool slot free: the pool is not taking work.
        held = {r['id'] for r in reserved} if len(active) < w.spec.slots else set()
        w.held_since = {i: w.held_since.get(i, now) for i in held}
        stuck = [i for i, since in w.held_since.items() if now - since >= s.stuck_after]
        if stuck:
            return (f'{len(stuck)} request(s) held {s.stuck_after:g}s without starting, '
                    f'{w.spec.slots - len(active)} of {w.spec.slots} pool slot(s) free')
        return None

    # -- shutdown -------------------------------------------------------------------
    def shutdown(self):
        grace = self.settings.shutdown_grace
        procs = [(w.name, w.proc) for w in self.workers if w.running()]
        self.echo(f'stopping {len(procs)} worker(s): waiting up to {grace:g}s for running '
                  f'requests (supervisor.shutdown_grace)...')
        killed = stop(procs, grace)
        if killed:
            self.echo(f'stopped: killed after {grace:g}s, not yet exited: {", ".join(killed)} '
                      f'(requests they were running are delivered again when workers start)')
        else:
            self.echo(f'stopped: {len(procs)} worker(s) finished their requests and exited')


def _interrupt(*_):
    raise KeyboardInterrupt


def run(cfg, loglevel='info', beat=True, models=None, echo=print) -> int:
    supervisor = Supervisor(cfg, commands(cfg, loglevel, beat, models), echo)
    # The workers get their own sessions, so that Ctrl-C reaches only us and we
    # stop them in order (a background job may even ignore SIGINT).
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return supervisor.run()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in previous:  # a second signal must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        supervisor.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
