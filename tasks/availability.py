"""A model's worker and Ollama: check the model at start, pause while Ollama is away.

* As the worker starts, its model must be in Ollama's ``/api/tags``: a missing
  model stops the worker (exit status :data:`EX_CONFIG`) with the
  ``ollama pull`` hint, instead of failing each request.  An Ollama that does
  not answer yet is only a warning.
* While the worker runs, a thread in its main process asks Ollama every
  :data:`CHECK_INTERVAL` s whether it answers.  When it stops answering, the
  worker stops taking requests of its model (``cancel_consumer``: they stay
  queued, in priority order); when it answers again, it takes them again
  (``add_consumer``).  Both are alerts on the ``tasks.alerts`` logger.  A request
  in flight when Ollama went away is retried (:mod:`tasks.inference`).
"""
from __future__ import annotations

import logging
import threading
import time

from celery import signals

from .app import app, current
from .ollama import Ollama, OllamaDown

logger = logging.getLogger(__name__)
alerts = logging.getLogger('tasks.alerts')
EX_CONFIG = 78  # sysexits.h: the supervisor does not restart a worker that exits so
CHECK_INTERVAL = 1.0


def served_models(cfg, amqp) -> list:
    """The models whose queues this worker consumes (all of them without ``-Q``)."""
    queues = amqp.queues.consume_from or amqp.queues
    return [m for m in (cfg.model_for_queue(q) for q in queues) if m is not None]


def has_model(available: set, name: str) -> bool:
    return name in available or ':' not in name and f'{name}:latest' in available


@signals.celeryd_after_setup.connect
def check_models(sender=None, instance=None, **_):
    """At worker start: stop with the ``ollama pull`` hint if a model is missing."""
    cfg = current()
    models = served_models(cfg, instance.app.amqp)
    if not models:
        return
    try:
        available = Ollama.from_config(cfg).models()
    except OllamaDown as exc:
        alerts.warning('ALERT %s; worker %s starts anyway and waits for it', exc, sender)
        return
    missing = [m.name for m in models if not has_model(available, m.name)]
    if missing:
        logger.critical('model %s is not in the Ollama at %s: pull it with `%s`; '
                        'worker %s stops', ', '.join(missing), cfg.ollama_url,
                        '; '.join(f'ollama pull {m}' for m in missing), sender)
        raise SystemExit(EX_CONFIG)


class Watch(threading.Thread):
    """Pauses the worker's model queues while Ollama does not answer."""

    def __init__(self, hostname: str, queues: list[str], cfg, interval=CHECK_INTERVAL):
        super().__init__(daemon=True, name='ollama-watch')
        self.hostname, self.queues, self.cfg = hostname, queues, cfg
        self.interval = interval
        self.stop_event = threading.Event()
        self.down_since: float | None = None

    def run(self):
        # One line a second in the worker log would bury what matters.
        logging.getLogger('httpx').addFilter(
            lambda record: '/api/version' not in record.getMessage())
        ollama = Ollama.from_config(self.cfg)
        while not self.stop_event.wait(self.interval):
            try:
                self.check(ollama.answers())
            except Exception:  # noqa: BLE001  the watch must outlive a broker hiccup
                logger.exception('checking Ollama failed; trying again')

    def check(self, up: bool):
        if not up and self.down_since is None:
            self.control('cancel_consumer')
            self.down_since = time.monotonic()
            alerts.warning('ALERT Ollama at %s does not answer: worker %s stops taking '
                           'requests for %s (they stay queued)', self.cfg.ollama_url,
                           self.hostname, ', '.join(self.queues))
        elif up and self.down_since is not None:
            self.control('add_consumer')
            alerts.warning('ALERT Ollama at %s answers again after %.0fs: worker %s takes '
                           'requests for %s again', self.cfg.ollama_url,
                           time.monotonic() - self.down_since, self.hostname,
                           ', '.join(self.queues))
            self.down_since = None

    def control(self, command: str):
        # Through the broker, so that the worker's own loop applies it (its
        # consumer is not safe to touch from this thread).
        for queue in self.queues:
            getattr(app.control, command)(queue, destination=[self.hostname], reply=True,
                                          timeout=5)


_watches: list[Watch] = []


@signals.worker_ready.connect
def start_watch(sender=None, **_):
    cfg = current()
    queues = [m.queue for m in served_models(cfg, app.amqp)]
    if queues:
        watch = Watch(sender.hostname, queues, cfg)
        _watches.append(watch)
        watch.start()


@signals.worker_shutdown.connect
def stop_watch(**_):
    for watch in _watches:
        watch.stop_event.set()
