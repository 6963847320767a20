"""One GPU budget across models: at most ``[gpu] slots`` inferences at once on the box.

Each model's worker runs at most its own ``slots``; this caps their sum.  It is
enforced across the worker processes of one box with file locks in
``<data_dir>/gpu/``:

* a running inference holds an exclusive ``flock`` on one of ``slots`` slot
  files; the kernel drops it when the process dies, so a killed worker's share
  is free at once (crash-safe, no lease to wait out);
* a request waiting for the GPU holds a lock on its own file in ``waiting/``,
  named by its role priority and arrival; a waiter whose file is no longer
  locked is dead and is removed;
* one decision at a time (under the ``gate`` lock): a waiter takes a free slot
  only when it is among the first waiters in (priority, arrival) order, so the
  highest-priority request of any model goes next.

With the default (the sum of the models' slots) nothing ever waits, and
:func:`slot` takes no lock at all.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

POLL = 0.05


def _lock(path: Path, blocking=True):
    """An open descriptor holding an exclusive flock on ``path``, or None if taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Budget:
    """The GPU slots of the box, shared by every worker process through ``root``."""

    def __init__(self, root: Path, slots: int):
        self.root, self.slots = Path(root), slots
        self.waiting = self.root / 'waiting'
        self.waiting.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def slot(self, priority: int):
        """Wait for a GPU slot in (priority, arrival) order; hold it inside the block."""
        name = f'{priority}-{time.time_ns():020d}-{os.getpid()}-{threading.get_ident()}'
        me = self.waiting / name
        waiter = _lock(me)
        held = None
        try:
            while held is None:
                held = self._try_take(name)
                if held is None:
                    time.sleep(POLL)
        finally:
            me.unlink(missing_ok=True)
            os.close(waiter)
        try:
            yield
        finally:
            os.close(held)  # releases the slot

    def _try_take(self, name: str):
        gate = _lock(self.root / 'gate')
        try:
            ahead = [w for w in sorted(os.listdir(self.waiting), key=_order)
                     if _order(w) < _order(name) and self._alive(w)]
            free = []
            for i in range(self.slots):
                fd = _lock(self.root / f'slot-{i}', blocking=False)
                if fd is not None:
                    free.append(fd)
            # The first len(free) live waiters go; the rest wait their turn.
            mine = free.pop() if len(ahead) < len(free) else None
            for fd in free:
                os.close(fd)
            return mine
        finally:
            os.close(gate)

    def _alive(self, waiter: str) -> bool:
        fd = _lock(self.waiting / waiter, blocking=False)
        if fd is None:
            return True  # its owner holds the lock: it waits
        (self.waiting / waiter).unlink(missing_ok=True)  # its owner died
        os.close(fd)
        return False


def _order(name: str):
    priority, arrival, *_ = name.split('-')
    return int(priority), int(arrival), name


_budgets: dict = {}


@contextmanager
def slot(cfg, priority: int):
    """A GPU slot for one inference, when ``[gpu] slots`` is below the models' sum;
    yields whether it had to take one."""
    if cfg.gpu_slots >= sum(m.slots for m in cfg.models.values()):
        yield False
        return
    key = (str(cfg.data_dir), cfg.gpu_slots)
    budget = _budgets.get(key)
    if budget is None:
        budget = _budgets[key] = Budget(cfg.data_dir / 'gpu', cfg.gpu_slots)
    with budget.slot(priority):
        yield True
