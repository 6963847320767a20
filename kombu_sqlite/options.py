"""Transport options, read once into one typed, checked object.

Every option the transport acts on is a field here with its default; the
module docstring of :mod:`kombu_sqlite.transport` says what each one does.
Options meant for other transports (Celery passes them all) are ignored.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

_SYNCHRONOUS = ('NORMAL', 'FULL', 'EXTRA', 'OFF')
_WAKEUP = ('auto', 'inotify', 'poll')


@dataclass(frozen=True)
class Options:
    visibility_timeout: float = 60.0
    lease_renew_interval: float | None = None   # visibility_timeout / 4
    default_priority: int = 0
    max_claim: int = 100
    polling_interval: float = 0.5
    wakeup: str = 'auto'
    poll_interval: float = 0.002
    prefetch_wait: float = 0.005
    housekeeping_interval: float = 1.0
    max_deliveries: int = 20
    native_delayed_delivery: bool = True
    max_length_block_timeout: float = 10.0
    busy_timeout: float = 30.0
    max_page_count: int | None = None
    synchronous: str = 'NORMAL'
    batch_acks: bool = True

    @classmethod
    def from_transport_options(cls, options: dict | None) -> Options:
        options = options or {}
        values = {}
        for field in fields(cls):
            if field.name in options and options[field.name] is not None:
                values[field.name] = _cast(field, options[field.name])
        self = cls(**values)
        if self.lease_renew_interval is None:
            object.__setattr__(self, 'lease_renew_interval',
                               max(self.visibility_timeout / 4, 0.1))
        return self

    def replace(self, **changes) -> Options:
        return dataclasses.replace(self, **changes)


def _cast(field, value):
    name, kind = field.name, field.type
    try:
        if 'bool' in kind:
            if isinstance(value, str):
                if value.lower() not in ('1', '0', 'true', 'false', 'yes', 'no', 'on', 'off'):
                    raise ValueError
                return value.lower() in ('1', 'true', 'yes', 'on')
            return bool(value)
        if 'float' in kind:
            number = float(value)
            if not math.isfinite(number) or number <= 0:
                raise ValueError
            return number
        if 'int' in kind:
            number = int(value)
            if number != value and str(number) != str(value):
                raise ValueError
            if number < (0 if name == 'default_priority' else 1):
                raise ValueError
            return number
        if name == 'synchronous':
            value = str(value).upper()
            if value not in _SYNCHRONOUS:
                raise ValueError
        if name == 'wakeup' and value not in _WAKEUP:
            raise ValueError
        return value
    except (TypeError, ValueError, OverflowError):
        expected = {'synchronous': ' (one of ' + ', '.join(_SYNCHRONOUS) + ')',
                    'wakeup': " ('auto', 'inotify' or 'poll')"}.get(name, '')
        raise ValueError(
            f'transport option {name}={value!r} is not valid: expected '
            f'{_describe(kind)}{expected}') from None


def _describe(kind: str) -> str:
    if 'bool' in kind:
        return 'true or false'
    if 'float' in kind:
        return 'a positive number of seconds'
    if 'int' in kind:
        return 'a whole number'
    return 'a name'
