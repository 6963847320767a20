"""The user directory: which role each user may ask in.

A user's role comes from the ledger table ``tasks_user`` (managed with
``python -m tasks users set|remove|list``), else from the ``[users]`` table of
the configuration, else ``[access] default_role`` — unless ``[access]
unknown_users = "refuse"``, which refuses users found in neither.  A user may
ask at their own role or any lower one (a higher priority number), never a
higher one (:func:`refusal`; ``submit`` raises it as :class:`RoleNotAllowed`).
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from . import ledger
from .ledger import User

TABLE, CONFIG, DEFAULT = 'ledger', 'config', 'default'


class RoleNotAllowed(PermissionError):
    """The claimed role is above what the directory allows the user."""

    def __init__(self, message, *, user_id, role, allowed):
        super().__init__(message)
        self.user_id, self.role, self.allowed = user_id, role, allowed


@dataclass(frozen=True)
class Entry:
    user_id: str
    role: str | None  # None: unknown and refused
    source: str       # ledger, config or default


def lookup(cfg, s, user_id: str) -> Entry:
    """The user's directory role, read in the ledger session ``s``."""
    row = s.get(User, user_id)
    if row is not None and row.role in cfg.roles:
        return Entry(user_id, row.role, TABLE)
    if user_id in cfg.users:
        return Entry(user_id, cfg.users[user_id], CONFIG)
    if cfg.unknown_users == 'refuse':
        return Entry(user_id, None, DEFAULT)
    return Entry(user_id, cfg.default_role, DEFAULT)


def refusal(cfg, s, user_id: str, role: str) -> RoleNotAllowed | None:
    """Why ``user_id`` may not ask as ``role`` (None: they may)."""
    entry = lookup(cfg, s, user_id)
    if entry.role is None:
        return RoleNotAllowed(
            f'user {user_id!r} is not in the user directory and [access] unknown_users '
            f'is "refuse"', user_id=user_id, role=role, allowed=None)
    if cfg.roles[role].priority < cfg.roles[entry.role].priority:
        return RoleNotAllowed(
            f'user {user_id!r} may not ask as {role!r}: their role is {entry.role!r} '
            f'({entry.source}), and a user may ask at that role or a lower one',
            user_id=user_id, role=role, allowed=entry.role)
    return None


def allowed(cfg, user_id: str) -> Entry:
    with ledger.read_session(cfg.ledger_url) as s:
        return lookup(cfg, s, user_id)


def set_role(cfg, user_id: str, role: str) -> None:
    if not user_id:
        raise ValueError('a user id must not be empty')
    if role not in cfg.roles:
        raise ValueError(f'unknown role {role!r} (roles: {", ".join(cfg.roles)})')
    with ledger.session(cfg.ledger_url) as s:
        s.merge(User(user_id=user_id, role=role, updated_at=ledger.now()))


def remove(cfg, user_id: str) -> bool:
    """Drop the user from the ledger's table; False if they were not in it."""
    with ledger.session(cfg.ledger_url) as s:
        row = s.get(User, user_id)
        if row is None:
            return False
        s.delete(row)
        return True


def entries(cfg) -> list[Entry]:
    """Every user named in the table or in ``[users]``, the table winning."""
    with ledger.read_session(cfg.ledger_url) as s:
        table = {u.user_id: u.role for u in s.scalars(select(User))}
    out = {u: Entry(u, r, CONFIG) for u, r in cfg.users.items()}
    out.update({u: Entry(u, r, TABLE) for u, r in table.items()})
    return [out[u] for u in sorted(out)]


def is_system(cfg, user_id: str | None) -> bool:
    """The operator (``None``) or a user whose directory role is the highest."""
    if user_id is None:
        return True
    top = min(cfg.roles.values(), key=lambda r: r.priority).name
    return allowed(cfg, user_id).role == top
