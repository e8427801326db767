"""A method run under its object's reentrant lock (``self._lock``): the host objects that
background threads share (tiers, the router) hold it for each call."""

from __future__ import annotations

import functools


def locked(fn):
    """``fn`` (a method) run under ``self._lock``."""
    @functools.wraps(fn)
    def under_lock(self, *args, **kwargs):
        with self._lock:
            return fn(self, *args, **kwargs)

    under_lock.locked = True
    return under_lock
