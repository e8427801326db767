"""CUDA C kernels, compiled at first use through CuPy (NVRTC); nothing touches a GPU at import.

hashing.py + blake3_hash.cu: the prefixkv-v1 block-hash chain, one thread per sequence."""
