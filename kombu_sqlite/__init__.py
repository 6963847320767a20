"""kombu-sqlite: Celery's broker in one SQLite file.

``import kombu_sqlite`` registers the ``sqlite://`` URL scheme with kombu, so
``broker_url = "sqlite:///queue.db"`` works in any Celery project.  See
:mod:`kombu_sqlite.transport` for features and transport options.  Under
``celery flower`` it also gives Flower's Broker page the sqlite queues
(:mod:`kombu_sqlite.flower`).
"""
import sys

from kombu.transport import TRANSPORT_ALIASES

from . import schema
from .broker import Broker
from .errors import (DatabaseCorrupt, DatabaseError, DatabaseFull, DatabaseLocked,
                     DatabaseUnavailable, ForeignDatabase, QueueFull)

__all__ = ['Broker', 'DatabaseCorrupt', 'DatabaseError', 'DatabaseFull', 'DatabaseLocked',
           'DatabaseUnavailable', 'ForeignDatabase', 'QueueFull', 'TRANSPORT']
__version__ = '0.1.0'

TRANSPORT = 'kombu_sqlite.transport:Transport'
TRANSPORT_ALIASES.setdefault('sqlite', TRANSPORT)

if 'flower' in sys.modules:  # running inside Flower: show our queues on its Broker page
    from . import flower as _flower
    _flower.install()
