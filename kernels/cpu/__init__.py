"""Host (CPU) kernels written in C: ``_blake3`` (blake3_chain.c), the prefixkv-v1 block-hash
chain. Built by setup.py as an optional extension; :mod:`.hashing` loads it."""
