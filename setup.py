"""Build hook: generate the gRPC Python stubs before the package is built.

Both ``pip install .`` and ``pip install -e .`` run ``build_py``; this one first
runs grpc_tools.protoc on every .proto under protos/ and writes the modules
next to it in the source tree (protos/trex/v1/trex_pb2.py, trex_pb2.pyi,
trex_pb2_grpc.py), so an editable install, a wheel and the tests all import
the same files. They are not committed (.gitignore) because they must match
the installed grpcio and protobuf, which pin the versions they accept.

Everything else about the package lives in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


def generate_stubs() -> None:
    # imported here: grpcio-tools is a build requirement, not a runtime one
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    # NOTE: the include root is the repository, not protos/, so the generated
    # modules import each other as ``protos.trex.v1...`` and need no sys.path tricks.
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        args = [
            "grpc_tools.protoc",
            f"--proto_path={ROOT}",
            f"--proto_path={well_known}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            str(proto),  # absolute: protoc maps it onto --proto_path, whatever the cwd
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


class BuildPyWithProtos(build_py):
    def run(self):
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
