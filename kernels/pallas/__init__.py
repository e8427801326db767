"""Pallas kernels (JAX): Mosaic TPU kernels driven by scalar-prefetched indices and DMAs, and
kernels lowered for GPU. One file per op family: ``_<op>_kernel`` + a ``<op>_<backend>``
launcher. Imported lazily by prefixkv.jax_frontend; needs jax."""
