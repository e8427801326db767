"""Interpreter fix-up (TRITON_INTERPRET=1 only): triton 3.6's interpreter turns a scalar tensor
into a Python int with ``int(ndarray)``, which numpy >= 2.4 refuses for the shape-(1,) arrays
that program ids and loads produce there, so ``range(lo, hi)`` with tensor bounds fails.
Patched to read the single element. No effect on compiled kernels."""

from __future__ import annotations

import os

_DONE = False


def patch_interpreter() -> None:
    global _DONE
    if _DONE or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    _DONE = True
