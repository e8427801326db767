"""The compiled CPU kernels build wherever a C++ compiler is present.

The CPU FFI handlers (kernels/cpu/xla_ffi.py: cache ops and decode attention, built against
jaxlib's headers), the ctypes decode kernel (kernels/cpu/decode.py) and the ctypes block copy
(kernels/cpu/block_copy.py) are built on first use;
a failed build turns them off, and the tests of those kernels then skip. Without this test a
source that no longer compiles would leave the suite green with those tests skipped: here a
machine with a compiler (CI's included) must build both, unless they are turned off on
purpose (PREFIXKV_DISABLE_CPU_FFI). A build keyed on a source's text is also keyed on the
headers it includes: an edited header builds afresh.
"""

from __future__ import annotations

import os

import pytest
from prefixkv.kernels.cpu import block_copy, decode, xla_ffi

pytestmark = [
    pytest.mark.skipif(os.environ.get(xla_ffi.DISABLE_ENV, "") not in ("", "0"),
                       reason=f"turned off by {xla_ffi.DISABLE_ENV}"),
    pytest.mark.skipif(xla_ffi._compiler() is None, reason="no C++ compiler on this machine"),
]


def test_ctypes_decode_kernel_builds():
    assert decode.available(), decode.status()


def test_ctypes_block_copy_builds():
    assert block_copy.available(), block_copy.status()


def test_build_key_covers_included_headers(tmp_path, monkeypatch):
    """Two headers of different text give two libraries (the sources the same)."""
    monkeypatch.setenv(xla_ffi.CACHE_ENV, str(tmp_path))
    header = tmp_path / "h.h"
    builds = []
    for text in ("#define X 1\n", "#define X 2\n"):
        header.write_text(text)
        builds.append(xla_ffi.build_library("block_copy", block_copy._command,
                                            (block_copy.SOURCE,), depends=(header,)))
    assert builds[0] != builds[1] and all(b.exists() for b in builds)


def test_xla_ffi_handlers_build_and_register():
    pytest.importorskip("jax")
    assert xla_ffi.available(), xla_ffi.cpu_cache_ops_path()
    for target in xla_ffi.TARGETS:  # every handler symbol the library exports
        assert hasattr(xla_ffi._state["lib"], xla_ffi.TARGETS[target]), target
