"""Maps the one import namespace `ditserve` onto the repository layout.

protoc writes `from ditserve.v1 import tensor_pb2`, so protos/ditserve is the
package root; client/ and services/ hang under it as ditserve.client and
ditserve.services. The package lists are computed so new subpackages need no edit.

A wheel also carries the .proto files (ditserve/v1/*.proto: the contract other
languages compile) and the shipped default model (ditserve/models/shapes-flux),
so a non-editable `pip install` serves out of the box.
"""

from setuptools import find_packages, setup

ROOTS = {"ditserve": "protos/ditserve", "ditserve.client": "client", "ditserve.services": "services"}
DATA_ROOTS = {"ditserve.models": "models"}  # no Python inside: data only


def packages_under(prefix: str, directory: str) -> list[str]:
    return [prefix] + [f"{prefix}.{name}" for name in find_packages(directory)]


setup(
    package_dir={**ROOTS, **DATA_ROOTS},
    packages=[pkg for prefix, directory in ROOTS.items() for pkg in packages_under(prefix, directory)]
    + list(DATA_ROOTS),
    package_data={"ditserve.v1": ["*.proto"], "ditserve.models": ["*/*.json", "*/*/*"]},
)
