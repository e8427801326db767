"""Races seen by Pallas' TPU interpret mode, made visible to the tests.

``InterpretParams(detect_races=True)`` (what the ``pallas_interpret`` backend and the Pallas
tests pass) only prints "RACE DETECTED" and sets ``races_found`` on a state object that the
interpreter replaces at every kernel; it raises nothing, so a race whose values come out right
would pass. :func:`record` swaps in a state class that also appends to a list the test checks
(the ``pallas_races`` fixture of conftest.py). The module is private jax: where it is missing,
nothing is recorded.
"""

from __future__ import annotations


def record(monkeypatch) -> list:
    """A list that gets an entry for every race the interpreter detects from now on (until
    ``monkeypatch`` undoes the swap)."""
    found: list = []
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    except ImportError:
        return found
    base = ipc.RaceDetectionState

    class Recording(base):
        @property
        def races_found(self):
            return bool(self.__dict__.get("_prefixkv_race", False))

        @races_found.setter
        def races_found(self, value):
            self.__dict__["_prefixkv_race"] = bool(value)
            if value:
                found.append(True)

    monkeypatch.setattr(ipc, "RaceDetectionState", Recording)
    return found
