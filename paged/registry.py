"""One registry of backends per op, shared by both frontends (no framework imports here).

A backend has a name, the platforms it runs on ("cpu", "cuda", "rocm", "tpu"), the Python
packages it needs, a priority, its implementation (a callable, or "module:attr" loaded on first
use) and an optional ``supports(**context) -> (ok, reason)`` for shape/dtype limits.

Selection order: an explicit ``backend=`` argument, then the op's environment variable
``PREFIXKV_<OP>_BACKEND``, then ``PREFIXKV_BACKEND``, then the highest priority backend that runs
here. A requested backend that cannot run, or no backend at all, raises :class:`BackendError`
listing every backend and why it was refused. Nothing here queries a device: the caller passes
the platform it is tracing/running for.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field


@functools.cache
def installed(package: str) -> bool:
    """Whether ``package`` can be imported, asked once per process: every selection asks for
    each backend, and find_spec of a package that is not yet imported searches sys.path (40-50
    us for cupy or triton on a 2-core machine, per call)."""
    return importlib.util.find_spec(package) is not None


class BackendError(ValueError):
    """No backend can run the request; the message lists each backend and why."""


@dataclass
class Backend:
    name: str
    platforms: tuple[str, ...]
    impl: Callable | str
    priority: int = 0
    requires: tuple[str, ...] = ()
    supports: Callable[..., tuple[bool, str]] | None = None
    doc: str = ""
    _loaded: Callable | None = field(default=None, repr=False)

    def load(self) -> Callable:
        if self._loaded is None:
            if callable(self.impl):
                self._loaded = self.impl
            else:
                module, _, attr = self.impl.partition(":")
                self._loaded = getattr(importlib.import_module(module), attr)
        return self._loaded

    def refusal(self, platform: str, context: dict) -> str | None:
        """Why this backend cannot run the request on ``platform``, or None if it can."""
        if platform not in self.platforms:
            return f"runs on {'/'.join(self.platforms)}, not {platform}"
        missing = [p for p in self.requires if not installed(p)]
        if missing:
            return f"needs the package(s) {', '.join(missing)}"
        if self.supports is not None:
            ok, reason = self.supports(**context)
            if not ok:
                return reason
        return None


class Registry:
    """The backends of one op."""

    def __init__(self, op: str):
        self.op = op
        self.env_var = f"PREFIXKV_{op.upper()}_BACKEND"
        self._backends: dict[str, Backend] = {}
        self._ordered: tuple[Backend, ...] = ()  # by priority, highest first
        #: Backends selected, by (platform, requested, context): a decode step asks the same
        #: question for every layer (asked anew: 3.5 us; kept: 2.2 us, mostly the two
        #: environment reads). Errors are not kept; a registration clears it.
        self._chosen: dict = {}

    def register(self, backend: Backend) -> Backend:
        if backend.name in self._backends:
            raise ValueError(f"{self.op}: backend {backend.name!r} registered twice")
        self._backends[backend.name] = backend
        self._ordered = tuple(sorted(self._backends.values(), key=lambda b: -b.priority))
        self._chosen.clear()
        return backend

    def __iter__(self):
        return iter(self._ordered)

    def names(self) -> list[str]:
        return [b.name for b in self]

    def requested(self, backend: str | None = None) -> str | None:
        """The backend asked for by argument or environment variable, if any: ``backend``,
        else ``PREFIXKV_<OP>_BACKEND``, else ``PREFIXKV_BACKEND`` when this op has a backend
        of that name (a global choice such as ``pallas_interpret`` leaves ops without one,
        merge_attention_states or hash_blocks, to their own selection). A ``backend`` given
        is a request, "" too (an unknown name); an empty environment variable is unset."""
        if backend is not None:
            return backend
        want = os.environ.get(self.env_var)
        if want:
            return want
        want = os.environ.get("PREFIXKV_BACKEND")
        return want if want in self._backends else None

    def check_known(self, platform: str, backend: str | None = None) -> None:
        """select's BackendError when ``backend`` (or the environment variable) names no
        backend of this op, without choosing one (a plan made before the call's shapes and
        platform are all known: the choice is made when it runs)."""
        want = self.requested(backend)
        if want is not None and want not in self._backends:
            raise self._error(platform, self.explain(platform), f"unknown backend {want!r}")

    def _error(self, platform: str, reasons: dict[str, str], head: str) -> BackendError:
        lines = [f"{self.op} on platform {platform!r}: {head}; backends:"]
        lines += [f"  - {name}: {why}" for name, why in reasons.items()]
        return BackendError("\n".join(lines))

    def select(self, platform: str, backend: str | None = None, **context) -> Backend:
        """The backend to run on ``platform`` for a request described by ``context`` (whose
        values a backend's ``supports`` answers from alone, as the installed packages)."""
        want = self.requested(backend)
        try:
            key = (platform, want, *sorted(context.items()))
            return self._chosen[key]
        except KeyError:
            chosen = self._choose(platform, want, context)
            if len(self._chosen) >= 1024:
                self._chosen.clear()
            self._chosen[key] = chosen
            return chosen
        except TypeError:  # an unhashable context value
            return self._choose(platform, want, context)

    def _choose(self, platform: str, want: str | None, context: dict) -> Backend:
        reasons = {b.name: b.refusal(platform, context) for b in self._ordered}
        if want is not None:
            if want not in self._backends:
                reasons = {k: (v or "could run") for k, v in reasons.items()}
                raise self._error(platform, reasons, f"unknown backend {want!r}")
            if reasons[want] is not None:
                why = reasons[want]
                reasons = {k: (v or "could run") for k, v in reasons.items()}
                raise self._error(platform, reasons, f"backend {want!r} cannot run: {why}")
            return self._backends[want]
        for b in self._ordered:
            if reasons[b.name] is None:
                return b
        raise self._error(platform, {k: v for k, v in reasons.items() if v},
                          "no backend can run this request")

    def explain(self, platform: str, **context) -> dict[str, str]:
        """name -> "ok" or the reason it is refused, highest priority first. A backend whose
        answer depends on the call's shapes and was given too few of them says which."""
        def why(b: Backend) -> str:
            try:
                return b.refusal(platform, context) or "ok"
            except TypeError as e:  # a supports() rule missing a keyword it needs
                return f"depends on the call: give its shapes as keywords ({e})"
        return {b.name: why(b) for b in self}
