"""Python gRPC stubs of the coordinator's protocol, generated from proto/stagecoach.proto with
grpcio-tools into a temporary folder: what a user's own tooling would do, with nothing of ours
in between.

    import stubs
    pb, pb_grpc = stubs.generate()      # stagecoach_pb2, stagecoach_pb2_grpc
"""

import importlib
import os
import sys
import tempfile

from grpc_tools import protoc

PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto", "proto")


def generate(proto_dir=PROTO_DIR):
    out = tempfile.mkdtemp(prefix="stagecoach-stubs-")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "stagecoach.proto",
        ]
    )
    if code != 0:
        sys.exit(f"protoc failed on {proto_dir}/stagecoach.proto ({code})")
    sys.path.insert(0, out)
    return importlib.import_module("stagecoach_pb2"), importlib.import_module("stagecoach_pb2_grpc")
