"""``tasks``: Ollama inference on one GPU box, by the priority of each role.

Start workers with ``python -m tasks workers`` (or ``celery -A tasks worker
-Q <model queue> -c <slots>``) and submit with :func:`submit`.
"""
from .app import app, configure, current
from .config import ConfigError

configure()

from . import inference, signals  # noqa: E402  registers the tasks and the ledger
from .admission import Overloaded, ResourceLimitExceeded, submit  # noqa: E402

__all__ = ['app', 'submit', 'Overloaded', 'ResourceLimitExceeded', 'ConfigError',
           'configure', 'current', 'inference', 'signals']
