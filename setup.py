"""Maps the fixed top-level folders onto the ``prefixkv`` import package.

kernels/ -> prefixkv.kernels, paged/ -> prefixkv.paged, jax_frontend/ -> prefixkv.jax_frontend,
torch_frontend/ -> prefixkv.torch_frontend (metadata lives in pyproject.toml).
"""

from setuptools import find_packages, setup

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

setup(packages=packages, package_dir=package_dir)
