"""A client of the coordinator written against proto/stagecoach.proto alone, with Python grpcio.

It generates its stubs from the .proto file into a temporary folder, then calls a running
coordinator over TLS the ways a user's own tooling would: with a client certificate (mutual
TLS), with a bearer token, with nothing, and fetches /metrics over HTTPS. It asserts nothing
itself: it prints one JSON object, each check's name mapped to the gRPC status code name (or
the HTTP status) it got, and the test that starts it decides what each should be.

Usage: secure_client.py --proto-dir DIR --target HOST:PORT --certs DIR --metrics URL
"""

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import stubs  # noqa: E402  (python/stubs.py)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def code_of(call):
    """The status code name of one unary call (OK when it returns)."""
    try:
        call()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def http_status(url, context, token=None):
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as r:
            body = r.read().decode()
            return r.status, body
    except urllib.error.HTTPError as e:
        return e.code, ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--certs", required=True)
    ap.add_argument("--metrics", required=True)
    args = ap.parse_args()

    pb, pb_grpc = stubs.generate(args.proto_dir)
    d = args.certs
    ca = read(f"{d}/ca.pem")
    token = {r: read(f"{d}/{r}.token").decode().strip() for r in ("viewer", "operator", "worker")}
    result = {}

    def with_certificate(role):
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=read(f"{d}/{role}.key"),
            certificate_chain=read(f"{d}/{role}.pem"),
        )
        return grpc.secure_channel(args.target, creds)

    def with_token(role):
        creds = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=ca),
            grpc.access_token_call_credentials(token[role]),
        )
        return grpc.secure_channel(args.target, creds)

    def bare():
        return grpc.secure_channel(args.target, grpc.ssl_channel_credentials(root_certificates=ca))

    status = pb.GetStatusRequest()
    pause = pb.PauseRequest(requested_by="grpcio says it is root")
    resume = pb.ResumeRequest(requested_by="grpcio")

    # Mutual TLS: a certificate per role.
    viewer = pb_grpc.ControlStub(with_certificate("viewer"))
    result["cert_viewer_status"] = code_of(lambda: viewer.GetStatus(status, timeout=10))
    reply = viewer.GetStatus(status, timeout=10)
    result["cert_viewer_job"] = reply.job
    result["cert_viewer_pause"] = code_of(lambda: viewer.Pause(pause, timeout=10))
    operator = pb_grpc.ControlStub(with_certificate("operator"))
    result["cert_operator_pause"] = code_of(lambda: operator.Pause(pause, timeout=10))
    result["cert_operator_resume"] = code_of(lambda: operator.Resume(resume, timeout=10))
    worker = pb_grpc.ControlStub(with_certificate("worker"))
    result["cert_worker_status"] = code_of(lambda: worker.GetStatus(status, timeout=10))

    # Bearer tokens over TLS, without a client certificate.
    viewer = pb_grpc.ControlStub(with_token("viewer"))
    result["token_viewer_status"] = code_of(lambda: viewer.GetStatus(status, timeout=10))
    result["token_viewer_pause"] = code_of(lambda: viewer.Pause(pause, timeout=10))
    operator = pb_grpc.ControlStub(with_token("operator"))
    result["token_operator_pause"] = code_of(lambda: operator.Pause(pause, timeout=10))
    result["token_operator_resume"] = code_of(lambda: operator.Resume(resume, timeout=10))
    as_worker = pb_grpc.WorkersStub(with_token("operator"))
    register = pb.RegisterRequest(
        name="grpcio", backend=pb.COLLECTIVE_BACKEND_TCP, collective_address="127.0.0.1:1"
    )
    result["token_operator_register"] = code_of(lambda: as_worker.Register(register, timeout=10))

    # Nothing but TLS: nothing is served.
    nobody = pb_grpc.ControlStub(bare())
    result["none_status"] = code_of(lambda: nobody.GetStatus(status, timeout=10))
    nobody_workers = pb_grpc.WorkersStub(bare())
    result["none_register"] = code_of(lambda: nobody_workers.Register(register, timeout=10))
    # A client that does not trust the coordinator's CA does not get through the handshake.
    stranger = pb_grpc.ControlStub(
        grpc.secure_channel(args.target, grpc.ssl_channel_credentials(root_certificates=None))
    )
    result["untrusted_ca_status"] = code_of(lambda: stranger.GetStatus(status, timeout=10))

    # The metrics endpoint over HTTPS, checked against the cluster CA.
    context = ssl.create_default_context(cafile=f"{d}/ca.pem")
    health = args.metrics.rsplit("/", 1)[0] + "/healthz"
    result["healthz_nothing"], _ = http_status(health, context)
    result["metrics_no_token"], _ = http_status(args.metrics, context)
    result["metrics_worker_token"], _ = http_status(args.metrics, context, token["worker"])
    code, body = http_status(args.metrics, context, token["viewer"])
    result["metrics_viewer_token"] = code
    result["metrics_has_control_requests"] = "stagecoach_control_requests_total" in body
    print(json.dumps(result))


if __name__ == "__main__":
    main()
