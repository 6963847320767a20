"""Housekeeping: response retention and requests that waited too long."""
from __future__ import annotations

import logging

from sqlalchemy import update

from . import ledger
from .ledger import EXPIRED, QUEUED, Request

logger = logging.getLogger(__name__)


def run(cfg, now: float | None = None) -> dict:
    now = ledger.now() if now is None else now
    with ledger.session(cfg.ledger_url) as s:
        purged = s.execute(
            update(Request)
            .where(Request.response_expires_at <= now, Request.response.is_not(None))
            .values(response=None)).rowcount
        # A request still queued after request_expiry will not be served: its
        # message expired in the broker (the submit sets the same expiry).
        expired = s.execute(
            update(Request)
            .where(Request.status == QUEUED,
                   Request.created_at <= now - cfg.request_expiry)
            .values(status=EXPIRED, completed_at=now,
                    error='expired: not started within maintenance.request_expiry')
        ).rowcount
    cleaned = True
    try:
        from .app import app
        app.backend.cleanup()  # results past result_expires (the retention)
    except Exception as exc:  # the ledger is the record; results are a cache
        logger.warning('result backend cleanup failed: %s', exc)
        cleaned = False
    logger.info('maintenance: purged %d responses, expired %d requests', purged, expired)
    return {'responses_purged': purged, 'requests_expired': expired,
            'results_cleaned': cleaned}
