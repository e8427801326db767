"""Maps the fixed top-level folders onto the ``prefixkv`` import package.

kernels/ -> prefixkv.kernels, paged/ -> prefixkv.paged, jax_frontend/ -> prefixkv.jax_frontend,
torch_frontend/ -> prefixkv.torch_frontend (metadata lives in pyproject.toml).
"""

from setuptools import Extension, find_packages, setup

ROOTS = {
    "prefixkv": "prefixkv",
    "prefixkv.paged": "paged",
    "prefixkv.kernels": "kernels",
    "prefixkv.jax_frontend": "jax_frontend",
    "prefixkv.torch_frontend": "torch_frontend",
}

packages, package_dir = [], {}
for name, folder in ROOTS.items():
    packages.append(name)
    package_dir[name] = folder
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

# Host fast path of the prefixkv-v1 block hash (kernels/cpu, docs/hashing.md). optional: without
# a C compiler the install still succeeds and prefixkv falls back to the `blake3` package (the
# `hash` extra), else to pure Python (~40x slower, with a RuntimeWarning).
ext_modules = [
    Extension("prefixkv.kernels.cpu._blake3", ["kernels/cpu/blake3_chain.c"],
              depends=["kernels/cpu/blake3_lanes.h"], extra_compile_args=["-O3"],
              optional=True),
]

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules)
