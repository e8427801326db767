"""Triton kernels (CUDA GPUs; run on CPU tensors under TRITON_INTERPRET=1 for tests).

attention.py: ragged paged attention (+ split-KV), merge, shared-prefix attention.
cache.py: write_kv, gather/scatter/copy of blocks."""
