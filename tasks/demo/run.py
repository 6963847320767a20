"""``python -m tasks demo``: a demand spike on one box, watched in Flower.

Starts the Ollama simulator (or uses a real Ollama with ``--real``), one
worker per model with its GPU slots, and Flower with basic auth; replays a
steady load, a burst of several hundred requests and a recovery through
:func:`tasks.submit`; shows progress live; then writes ``report.json`` and
``report.png`` in the demo directory and checks the report against its
criteria (PASS/FAIL each; ``--strict`` exits 1 if any fails).  Every process
it starts is stopped before it returns, on Ctrl-C too.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

from ..availability import has_model
from ..ollama import Ollama, OllamaDown
from . import load as demo_load, report as demo_report, stack as demo_stack, watch as demo_watch

MARKER = '.tasks-demo'
FLOWER_USER = 'demo'
# What a previous run left in the demo directory (removed before a new run).
RUN_FILES = ('broker.db', 'results.db', 'ledger.db', 'tasks.toml', 'report.json',
             'report.png')


def parse(argv):
    p = argparse.ArgumentParser(
        prog='python -m tasks demo',
        description='Replay a demand spike on one box and watch it in Flower; writes '
                    'report.json and report.png and checks them against its criteria.')
    p.add_argument('--scale', type=float, default=1.0,
                   help='size of the spike: 1 is ~350 requests from ~60 users (default 1)')
    p.add_argument('--duration', type=float, default=120.0,
                   help='seconds of replay: steady, burst, recovery (default 120)')
    p.add_argument('--data-dir', default='demo-run',
                   help='directory for the broker, ledger, logs and report '
                        '(default ./demo-run, emptied of a previous run first)')
    p.add_argument('--real', action='store_true',
                   help='use the Ollama at $OLLAMA_HOST instead of the simulator')
    p.add_argument('--keep-running', action='store_true',
                   help='after the report, keep the workers and Flower up until Ctrl-C')
    p.add_argument('--strict', action='store_true', help='exit 1 if a criterion fails')
    p.add_argument('--without', action='append', default=[],
                   choices=demo_load.ADMISSION_CONTROLS,
                   help='run without this admission control, to see what it does '
                        '(repeatable; its criterion then fails)')
    p.add_argument('--flower-port', type=int, default=5555,
                   help='Flower port (default 5555; another free port if taken)')
    p.add_argument('--seed', type=int, default=1, help='seed of the timetable (default 1)')
    p.add_argument('--no-live', action='store_true',
                   help='print a progress line every few seconds instead of a live view')
    args = p.parse_args(argv)
    if args.scale <= 0 or args.duration < 5:
        p.error('--scale must be positive and --duration at least 5 seconds')
    return args


def prepare(data_dir: Path) -> Path:
    """A fresh demo directory: new, or one a previous demo run left."""
    data_dir = data_dir.expanduser().resolve()
    if data_dir.exists() and any(data_dir.iterdir()) and not (data_dir / MARKER).exists():
        raise SystemExit(f'{data_dir} is not empty and is not a demo directory; '
                         f'choose another --data-dir')
    (data_dir / 'logs').mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        for suffix in ('', '-wal', '-shm'):
            (data_dir / (name + suffix)).unlink(missing_ok=True)
    for log in (data_dir / 'logs').glob('*.log'):
        log.unlink()
    (data_dir / MARKER).write_text('a directory of python -m tasks demo\n')
    return data_dir


def _interrupt(*_):
    raise KeyboardInterrupt


class Demo:
    def __init__(self, args, console):
        self.args = args
        self.console = console
        self.data_dir = prepare(Path(args.data_dir))
        self.sizing = demo_load.size(args.scale, args.duration)
        self.password = os.environ.get('FLOWER_PASSWORD') or secrets.token_urlsafe(12)
        self.stack = None
        self.sampler = self.watch = None
        self.replay = None
        self.stop = threading.Event()

    def say(self, text):
        self.console.print(text, highlight=False)

    def configure(self):
        """Write the demo's configuration and point this process and its children at it."""
        import tasks

        from .. import config
        ollama_url = os.environ.get('OLLAMA_HOST', '') if self.args.real else None
        if self.args.real:
            if '://' not in ollama_url:
                ollama_url = f'http://{ollama_url or "127.0.0.1:11434"}'
            if not demo_stack.answers(f'{ollama_url}/api/version', timeout=3):
                raise SystemExit(f'--real: no Ollama answers at {ollama_url} (OLLAMA_HOST)')
        else:
            ollama_url = f'http://127.0.0.1:{demo_stack.free_port()}'
        path = self.data_dir / 'tasks.toml'
        path.write_text(config.to_toml(demo_load.config(self.sizing, self.args.without)))
        package_root = str(Path(__file__).resolve().parents[2])
        env = {'TASKS_CONFIG': str(path), 'TASKS_DATA_DIR': str(self.data_dir),
               'OLLAMA_HOST': ollama_url,
               'PYTHONPATH': os.pathsep.join(filter(None, [package_root,
                                                           os.environ.get('PYTHONPATH')]))}
        os.environ.update(env)
        self.cfg = tasks.configure(config.load(path))
        self.ollama_url = ollama_url
        return {**os.environ, **env}

    def start(self, env):
        self.stack = demo_stack.Stack(self.data_dir / 'logs', env, echo=self.say)
        if not self.args.real:
            port = int(self.ollama_url.rsplit(':', 1)[1])
            demo_stack.start_simulator(self.stack, self.sizing, port)
            self.say(f'Ollama simulator on {self.ollama_url}: a transcript takes '
                     f'{self.sizing.unit:.1f}s of GPU time ({self.sizing.token_rate:.0f} '
                     f'tokens/s)')
            self.stack.wait_for('the simulator',
                                lambda: demo_stack.answers(f'{self.ollama_url}/api/version'))
        else:
            self.say(f'Using the Ollama at {self.ollama_url}')
            try:
                available = Ollama(self.ollama_url).models()
            except OllamaDown:
                available = set()
            missing = {m for m in self.cfg.models if not has_model(available, m)}
            if missing:
                self.say(f'[yellow]that Ollama lacks {", ".join(sorted(missing))}: '
                         f'`ollama pull` them, or their requests fail[/]')
        workers = demo_stack.start_workers(self.stack, self.cfg)
        port = demo_stack.free_port(self.args.flower_port)
        self.flower_url = demo_stack.start_flower(self.stack, port, FLOWER_USER,
                                                  self.password)
        for name in workers:
            self.stack.wait_for(name, lambda n=name: demo_stack.worker_ready(self.stack, n))
        self.stack.wait_for('Flower', lambda: demo_stack.answers(
            f'{self.flower_url}/healthcheck'))
        for m in self.cfg.models.values():
            self.say(f'worker for {m.name}: queue {m.queue}, {m.slots} GPU slot(s)')
        self.say(f'[bold]Flower: {self.flower_url}[/]  user [bold]{FLOWER_USER}[/]  password '
                 f'[bold]{self.password}[/]'
                 + ('' if os.environ.get('FLOWER_PASSWORD') == self.password
                    else '  (set FLOWER_PASSWORD to choose it)'))
        self.sampler = demo_watch.Sampler(self.cfg, interval=0.5 if self.sizing.duration
                                          >= 60 else 0.25)
        self.sampler.start()
        self.watch = demo_stack.FlowerWatch(self.flower_url, (FLOWER_USER, self.password))
        self.watch.start()

    def run_replay(self):
        events = demo_load.timetable(self.sizing, self.args.seed)
        burst = sum(1 for e in events if e.phase == 'burst')
        s = self.sizing
        self.say(f'Replaying {len(events)} requests over {s.duration:.0f}s from '
                 f'{sum(s.users.values())} users: steady load, then a burst of {burst} '
                 f'at {s.phase("burst")[0]:.0f}-{s.phase("burst")[1]:.0f}s, then recovery')
        self.replay = demo_load.Replay(events)
        thread = threading.Thread(target=self.replay.run, args=(self.stop,), daemon=True,
                                  name='demo-replay')
        thread.start()
        self.follow(thread)

    def drained(self, thread) -> bool:
        sample = self.sampler.last()
        if thread.is_alive() or sample is None or sample['t'] < self.replay_done_at:
            return False
        status = sample['status']
        return status.get('queued', 0) + status.get('running', 0) == 0

    def follow(self, thread):
        """Live view until the replay is over and every admitted request is done."""
        from rich.live import Live
        self.replay_done_at = float('inf')
        deadline = None

        def tick():
            nonlocal deadline
            self.stack.check()
            if not thread.is_alive() and deadline is None:
                self.replay_done_at = time.time()
                deadline = time.monotonic() + max(60.0, self.sizing.duration)
            return self.drained(thread) or (deadline and time.monotonic() > deadline)

        def view():
            return demo_watch.view(self.cfg, self.replay, self.sampler, self.sizing,
                                   self.flower_url)
        if self.console.is_terminal and not self.args.no_live:
            with Live(get_renderable=view, console=self.console, refresh_per_second=4):
                while not tick():
                    time.sleep(0.25)
        else:
            last = 0.0
            while not tick():
                if time.monotonic() - last >= 5:
                    last = time.monotonic()
                    self.say(demo_watch.status_line(self.replay, self.sampler.last(),
                                                    self.sizing))
                time.sleep(0.25)
        if deadline and time.monotonic() > deadline:
            self.say('[red]gave up waiting for the backlog to drain[/]')

    def report(self) -> dict:
        from kombu_sqlite import Broker

        from .. import ledger
        from . import plot as demo_plot
        end = time.time()
        time.sleep(2 * self.sampler.interval)  # one more sample of the empty queues
        self.sampler.stop_event.set()
        self.sampler.join(5)
        self.watch.stop_event.set()
        if self.watch.ok == 0:
            self.watch.poll()
        rows = [r.as_dict() for r in ledger.rows(self.cfg.ledger_url)]
        with Broker(self.cfg.broker_url) as broker:
            # A worker acks after the ledger records success (acks late), and
            # Celery before 5.7 applies acks on its next loop turn: allow for it.
            settle_by = time.monotonic() + 10
            while True:
                broker_stats = broker.stats()
                held = sum(broker_stats.get(m.queue, {}).get('leased', 0)
                           for m in self.cfg.models.values())
                if not held or time.monotonic() > settle_by:
                    break
                time.sleep(0.2)
        data = demo_report.build(self.cfg, rows, self.replay, self.sizing,
                                 self.sampler.samples, broker_stats, end,
                                 ledger.spike_episodes(self.cfg.ledger_url))
        data['run']['without'] = list(self.args.without)
        data['flower'] = {'url': self.flower_url, 'user': FLOWER_USER,
                          **self.watch.summary()}
        data['ollama'] = {'url': self.ollama_url, 'simulated': not self.args.real}
        data['processes'] = self.stack.pids()
        paths = {'report.json': self.data_dir / 'report.json',
                 'report.png': self.data_dir / 'report.png'}
        data['files'] = {k: str(v) for k, v in paths.items()}
        roles = [r.name for r in sorted(self.cfg.roles.values(), key=lambda r: r.priority)]
        try:
            demo_plot.plot(data, roles, paths['report.png'])
        except ImportError as exc:  # matplotlib is the 'demo' extra
            self.say(f'[yellow]no picture: {exc} (pip install kombu-sqlite[demo])[/]')
            del paths['report.png']
        paths['report.json'].write_text(json.dumps(data, indent=1))
        demo_report.render(data, self.console, self.flower_url, paths)
        return data

    def keep_running(self):
        self.say(f'\nThe workers and Flower keep running: {self.flower_url} (user '
                 f'{FLOWER_USER}, password {self.password}). Ctrl-C stops them.')
        while True:
            self.stack.check()
            time.sleep(1)

    def shutdown(self):
        self.stop.set()
        for t in (self.sampler, self.watch):
            if t is not None:
                t.stop_event.set()
        if self.stack is not None:
            self.say('Stopping Flower, the workers and the simulator...')
            self.stack.stop()
        import tasks
        tasks.app.close()


def main(argv=None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    from rich.console import Console
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough for the tables
        console = Console(width=max(console.width, 120))
    previous = {sig: signal.signal(sig, _interrupt)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    demo = None
    try:
        demo = Demo(args, console)
        demo.say(f'Demo directory: {demo.data_dir}')
        env = demo.configure()
        demo.start(env)
        demo.run_replay()
        data = demo.report()
        if args.keep_running:
            try:
                demo.keep_running()
            except KeyboardInterrupt:  # the usual way to end it
                pass
        failed = [c for c in data['criteria'] if not c['pass']]
        return 1 if failed and args.strict else 0
    except KeyboardInterrupt:
        console.print('\ninterrupted')
        return 130
    except RuntimeError as exc:  # a process of the stack died or did not start
        console.print(f'[red]{exc}[/]', highlight=False)
        return 2
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        if demo is not None:
            demo.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
