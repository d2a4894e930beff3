"""What securing the control plane costs: RPC latency and step time, plain text against TLS.

Three setups of the same coordinator and job, in this one invocation, each run `--rounds`
times, interleaved (plain, tls+token, mtls, plain, ...) so that drift on the machine falls on
all of them alike:

  plain       no TLS, no auth (what `make demo` runs)
  tls+token   TLS (server certificate), bearer tokens (auth.toml); workers join with a token
  mtls        mutual TLS, the role from each client certificate; workers join with theirs

Each round starts the real coordinator binary with the `micro` job (2 workers, one step logged
per step) and, before any worker joins, times `--calls` sequential GetStatus calls over one
channel from a Python grpcio client (stubs generated from proto/, python/stubs.py; the same
client for every setup, so its own cost is the same in each). Then two real workers join and
train the job; the step time is the median interval between consecutive "step committed" log
lines of the coordinator (steps 10 to the end). Prints a table with ratios to plain text and
writes it to bench/results/tls.md.

Usage: python bench/tls.py --bin-dir target/release [--machine NAME] [--rounds 3] [--steps 200]
"""

import argparse
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import stubs  # noqa: E402

SOURCES = ["prose", "math", "code"]


def job_toml(name, data, checkpoints, steps):
    sources = "\n".join(
        f'[[sources]]\nname = "{s}"\npath = "{data}/{s}/train"\n' for s in SOURCES
    )
    return f"""[job]
name = "{name}"

[model]
preset = "micro"

[schedule]
peak_lr = 3e-3
warmup_steps = 4
decay_start = {{ step = {steps - 4} }}

[data]
seed = 3
global_batch_tokens = 512
micro_batch_tokens = 256

[train]
threads = 1
log_every = 1

[workers]
min = 2
max = 2

[checkpoints]
dir = "{checkpoints}"
every_steps = 100000

{sources}
[[stages]]
name = "main"
until = {{ steps = {steps} }}
seq_len = 64
mix = {{ prose = 0.5, math = 0.3, code = 0.2 }}
"""


def setups(certs):
    c = lambda f: os.path.join(certs, f)  # noqa: E731
    return {
        "plain": {"coordinator": [], "worker": [], "client": None},
        "tls+token": {
            "coordinator": ["--tls-cert", c("coordinator.pem"), "--tls-key", c("coordinator.key"),
                            "--auth", c("auth.toml")],
            "worker": ["--ca", c("ca.pem"), "--token-file", c("worker.token")],
            "client": "token",
        },
        "mtls": {
            "coordinator": ["--tls-cert", c("coordinator.pem"), "--tls-key", c("coordinator.key"),
                            "--client-ca", c("ca.pem")],
            "worker": ["--ca", c("ca.pem"), "--cert", c("worker.pem"), "--key", c("worker.key")],
            "client": "certificate",
        },
    }


def channel(kind, target, certs):
    """A channel for `kind` and the metadata each call carries. The token goes as plain call
    metadata rather than grpcio's call-credentials plugin, whose Python callback per call
    would be measured instead of the coordinator."""
    read = lambda f: open(os.path.join(certs, f), "rb").read()  # noqa: E731
    if kind is None:
        return grpc.insecure_channel(target), ()
    if kind == "token":
        token = read("viewer.token").decode().strip()
        creds = grpc.ssl_channel_credentials(root_certificates=read("ca.pem"))
        return grpc.secure_channel(target, creds), (("authorization", f"Bearer {token}"),)
    creds = grpc.ssl_channel_credentials(
        root_certificates=read("ca.pem"),
        private_key=read("viewer.key"),
        certificate_chain=read("viewer.pem"),
    )
    return grpc.secure_channel(target, creds), ()


def rpc_latencies(pb, pb_grpc, kind, target, certs, calls):
    ch, metadata = channel(kind, target, certs)
    with ch:
        stub = pb_grpc.ControlStub(ch)
        for _ in range(50):  # connection, handshake, warm-up
            stub.GetStatus(pb.GetStatusRequest(), timeout=10, metadata=metadata)
        out = []
        for _ in range(calls):
            t = time.perf_counter()
            stub.GetStatus(pb.GetStatusRequest(), timeout=10, metadata=metadata)
            out.append(time.perf_counter() - t)
        return out


STEP = re.compile(r"^(\S+)\s.*step committed step=(\d+)")


def step_intervals(log, skip):
    times = {}
    for line in open(log):
        m = STEP.match(line)
        if m:
            stamp = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
            times[int(m.group(2))] = stamp.timestamp()
    steps = sorted(s for s in times if s >= skip)
    return [times[b] - times[a] for a, b in zip(steps, steps[1:]) if b == a + 1]


def one_round(args, pb, pb_grpc, name, setup, tmp, data, certs, round_no):
    folder = os.path.join(tmp, f"{name}-{round_no}")
    os.makedirs(folder)
    job = os.path.join(folder, "job.toml")
    with open(job, "w") as f:
        f.write(job_toml("tls-bench", data, os.path.join(folder, "checkpoints"), args.steps))
    log = os.path.join(folder, "coordinator.log")
    coordinator = subprocess.Popen(
        [os.path.join(args.bin_dir, "stagecoach-coordinator"), "--listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0", "--job", job, "--state", os.path.join(folder, "state")]
        + setup["coordinator"],
        stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
    )
    workers = []
    try:
        address = coordinator.stdout.readline().strip().removeprefix("listening on ")
        coordinator.stdout.readline()
        scheme = "http" if setup["client"] is None else "https"
        latencies = rpc_latencies(pb, pb_grpc, setup["client"], address, certs, args.calls)
        for i in range(2):
            workers.append(subprocess.Popen(
                [os.path.join(args.bin_dir, "stagecoach-worker"), "join", "--coordinator",
                 f"{scheme}://{address}"] + setup["worker"],
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(folder, f"worker-{i}.log"), "w"),
            ))
        code = coordinator.wait(timeout=600)
        for w in workers:
            w.wait(timeout=60)
        if code != 0:
            sys.exit(f"{name}: the coordinator exited {code}; see {log}")
    finally:
        for p in [coordinator] + workers:
            if p.poll() is None:
                p.kill()
    intervals = step_intervals(log, 10)
    if len(intervals) < args.steps // 2:
        sys.exit(f"{name}: only {len(intervals)} step intervals in {log}")
    return latencies, intervals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--machine")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--output", default="bench/results/tls.md")
    args = ap.parse_args()
    machine = args.machine or f"{os.cpu_count()}-core machine ({platform.machine()})"
    pb, pb_grpc = stubs.generate()
    tmp = tempfile.mkdtemp(prefix="stagecoach-tls-bench-")
    try:
        certs = os.path.join(tmp, "certs")
        subprocess.run([os.path.join(args.bin_dir, "stagecoach"), "certs", "init", certs],
                       check=True, stdout=subprocess.DEVNULL)
        data = os.path.join(tmp, "data")
        subprocess.run([os.path.join(args.bin_dir, "stagecoach-worker"), "demo-corpus", "--docs",
                        "300", "--valid-docs", "5", "--output", data],
                       check=True, stdout=subprocess.DEVNULL)
        all_setups = setups(certs)
        results = {name: ([], []) for name in all_setups}
        for r in range(args.rounds):
            for name, setup in all_setups.items():
                lat, steps = one_round(args, pb, pb_grpc, name, setup, tmp, data, certs, r)
                results[name][0].extend(lat)
                results[name][1].extend(steps)
                print(f"round {r + 1} {name}: GetStatus median {statistics.median(lat) * 1e6:.0f} us, "
                      f"step median {statistics.median(steps) * 1e3:.2f} ms", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def p99(xs):
        return sorted(xs)[int(0.99 * (len(xs) - 1))]

    base_rpc = statistics.median(results["plain"][0])
    base_step = statistics.median(results["plain"][1])
    rows = [
        "| setup | GetStatus median | GetStatus p99 | RPC median / plain | step time median | step / plain |",
        "|---|---|---|---|---|---|",
    ]
    for name, (lat, steps) in results.items():
        rpc, step = statistics.median(lat), statistics.median(steps)
        rows.append(
            f"| {name} | {rpc * 1e6:.0f} µs | {p99(lat) * 1e6:.0f} µs | {rpc / base_rpc:.2f} | "
            f"{step * 1e3:.2f} ms | {step / base_step:.3f} |"
        )
    table = "\n".join(rows)
    print(table)
    today = datetime.date.today().isoformat()
    text = f"""# The cost of TLS on the control plane

`make bench-tls`; {today} on {machine}. One coordinator binary per round, the `micro` job with 2
workers on the demo corpus, {args.rounds} rounds per setup, interleaved. RPC latency: {args.calls}
sequential `GetStatus` calls per round over one channel (after 50 warm-up calls), from a Python
grpcio client, before any worker joins. Step time: the median interval between consecutive
committed steps (coordinator log, steps 10 to {args.steps}); each step is a `Work` message to
each worker and a `StepDone` back over the session stream (TLS in the secured setups), the
all-reduce between the workers (the TCP ring, not part of the control plane) and the compute.

- plain: no TLS, no auth (as `make demo`)
- tls+token: TLS with the coordinator's certificate, bearer tokens; workers join with a token
- mtls: mutual TLS, each client's role from its certificate

{table}
"""
    with open(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
