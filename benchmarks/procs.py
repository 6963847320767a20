"""Processes the harness starts: every one is stopped, also on failure."""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time

_CLK_TCK = os.sysconf('SC_CLK_TCK')
_live: list = []  # Popen or multiprocessing.Process objects still to stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def popen(cmd, **kwargs) -> subprocess.Popen:
    # Own process group, so a prefork worker's children go with it.
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    _live.append(proc)
    return proc


def track(process):
    """Register a started multiprocessing.Process for cleanup."""
    _live.append(process)
    return process


def stop(proc, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
    """``sig``, then SIGKILL (the whole group of a Popen) after ``timeout``."""
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # leftovers of the group (pool children), whatever the main did
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    else:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if proc in _live:
        _live.remove(proc)


def stop_all() -> None:
    while _live:
        stop(_live[-1], timeout=5.0)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = 'condition'):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f'timed out after {timeout:.0f} s waiting for {what}')


atexit.register(stop_all)
