"""``tasks``: Ollama inference on one GPU box, by the priority of each role.

Start workers with ``python -m tasks workers`` (or ``celery -A tasks worker
-Q <model queue> -c <slots>``) and submit with :func:`submit`.  Importing the
package reads no file and creates nothing: the configuration
(``$TASKS_CONFIG``) is loaded on first use; :func:`configure` replaces it.
"""
from .app import app, configure, current
from .config import ConfigError
from . import availability, inference, signals  # registers tasks and signal handlers
from . import flower_view, uptime  # noqa: F401  pool_grow guard; worker up time (report)
from . import pool_reaper  # noqa: F401  a dead pool process is replaced at once
from .admission import Overloaded, ResourceLimitExceeded, submit
from .directory import RoleNotAllowed
from .cancellation import CancelNotAllowed, cancel
from .queue_status import status

__all__ = ['app', 'submit', 'cancel', 'status', 'Overloaded', 'ResourceLimitExceeded',
           'RoleNotAllowed', 'CancelNotAllowed', 'ConfigError', 'configure', 'current',
           'inference', 'signals']
