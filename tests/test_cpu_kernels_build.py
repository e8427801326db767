"""The compiled CPU kernels build wherever a C++ compiler is present.

The CPU FFI handlers (kernels/cpu/xla_ffi.py: cache ops and decode attention, built against
jaxlib's headers) and the ctypes decode kernel (kernels/cpu/decode.py) are built on first use;
a failed build turns them off, and the tests of those kernels then skip. Without this test a
source that no longer compiles would leave the suite green with those tests skipped: here a
machine with a compiler (CI's included) must build both, unless they are turned off on
purpose (PREFIXKV_DISABLE_CPU_FFI).
"""

from __future__ import annotations

import os

import pytest
from prefixkv.kernels.cpu import decode, xla_ffi

pytestmark = [
    pytest.mark.skipif(os.environ.get(xla_ffi.DISABLE_ENV, "") not in ("", "0"),
                       reason=f"turned off by {xla_ffi.DISABLE_ENV}"),
    pytest.mark.skipif(xla_ffi._compiler() is None, reason="no C++ compiler on this machine"),
]


def test_ctypes_decode_kernel_builds():
    assert decode.available(), decode.status()


def test_xla_ffi_handlers_build_and_register():
    pytest.importorskip("jax")
    assert xla_ffi.available(), xla_ffi.cpu_cache_ops_path()
    for target in xla_ffi.TARGETS:  # every handler symbol the library exports
        assert hasattr(xla_ffi._state["lib"], xla_ffi.TARGETS[target]), target
