"""Maps the one import namespace `ditserve` onto the repository layout.

protoc writes `from ditserve.v1 import tensor_pb2`, so protos/ditserve is the
package root; client/ and services/ hang under it as ditserve.client and
ditserve.services. The package lists are computed so new subpackages need no edit.
"""

from setuptools import find_packages, setup

ROOTS = {"ditserve": "protos/ditserve", "ditserve.client": "client", "ditserve.services": "services"}


def packages_under(prefix: str, directory: str) -> list[str]:
    return [prefix] + [f"{prefix}.{name}" for name in find_packages(directory)]


setup(
    package_dir=ROOTS,
    packages=[pkg for prefix, directory in ROOTS.items() for pkg in packages_under(prefix, directory)],
)
