"""How many data-parallel ranks one coordinator holds: simulated ranks against the real binary.

For each N in --ranks, this writes a job for N workers (workers.min = max = N, a heartbeat every
second and a 10 s lease, a global batch of N samples so that every rank gets one, a million
steps, checkpoints and evaluations off, spike detection off), starts the coordinator binary it
is given on loopback (no TLS, the embedded state store in a fresh temporary folder), runs
`stagecoach-bench` against it (N simulated ranks over the real Workers protocol, many sessions
per HTTP/2 connection), stops the coordinator and prints the bench's row. Nothing here needs a
model, data or a GPU; the ranks answer every step at once, so what is measured is the
coordinator alone: how long its world takes to form, how fast it steps, what a step costs it.

The coordinator binary is an argument, so the same command measures an older build:

  python3 bench/scale.py --coordinator /tmp/scale/before-coordinator --ranks 64 1024 4096 16384

prints a markdown table (stdout) and writes every run's figures as a JSON line to --json-out.
See bench/README.md for what each column means.
"""

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

SEQ_LEN = 64


def job_toml(ranks, folder):
    return f"""# Written by bench/scale.py: {ranks} simulated ranks, one sample each per step.
[job]
name = "scale-{ranks}"

[model]
preset = "micro"

[schedule]
peak_lr = 3e-3
warmup_steps = 10

[data]
seed = 1
global_batch_tokens = {ranks * SEQ_LEN}
micro_batch_tokens = {SEQ_LEN}

[train]
threads = 1
log_every = 1000

[workers]
min = {ranks}
max = {ranks}
lease_ms = 10000
heartbeat_ms = 1000

[checkpoints]
dir = "{folder}/checkpoints"
every_steps = 0

[spikes]
enabled = false

# The simulated ranks read nothing: they report the sizes the coordinator plans from.
[[sources]]
name = "web"
path = "{folder}/data/web"

[[stages]]
name = "main"
until = {{ steps = 1000000 }}
seq_len = {SEQ_LEN}
mix = {{ web = 1.0 }}
"""


def raise_fd_limit(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def stop(process, grace=10):
    """SIGTERM, then SIGKILL after `grace` seconds; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def one_run(args, ranks, first, tmp):
    folder = os.path.join(tmp, f"n{ranks}")
    os.makedirs(os.path.join(folder, "state"))
    job = os.path.join(folder, "job.toml")
    with open(job, "w") as f:
        f.write(job_toml(ranks, folder))
    log_path = os.path.join(folder, "coordinator.log")
    with open(log_path, "w") as log:
        coordinator = subprocess.Popen(
            [args.coordinator, "--job", job, "--listen", "127.0.0.1:0",
             "--metrics-listen", "127.0.0.1:0", "--state", os.path.join(folder, "state")],
            stdout=subprocess.PIPE, stderr=log, text=True,
        )
    try:
        address = coordinator.stdout.readline().strip().removeprefix("listening on ")
        metrics = coordinator.stdout.readline().strip().removeprefix("metrics on ")
        if not address or not metrics.startswith("http://"):
            sys.exit(f"the coordinator did not start (exit {coordinator.poll()}); see {log_path}:\n"
                     + open(log_path).read()[-2000:])
        command = [
            args.bench, "--coordinator", f"http://{address}", "--ranks", str(ranks),
            "--form-timeout-secs", str(args.form_timeout_secs), "--run-secs", str(args.run_secs),
            "--coordinator-pid", str(coordinator.pid), "--metrics-url", metrics,
            "--state-dir", os.path.join(folder, "state"), "--label", args.label,
            "--ranks-per-channel", str(args.ranks_per_channel),
            "--ranks-per-node", str(args.ranks_per_node),
            "--node-client", args.node_client,
            "--threads", str(args.bench_threads),
        ]
        if args.json_out:
            command += ["--json-out", args.json_out]
        if first:
            command.append("--header")
        # The bench ends itself (formation timeout + run window + its wind-down); this limit
        # only catches a bench that would not.
        limit = args.form_timeout_secs + args.run_secs + 120
        try:
            bench = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            sys.exit(f"stagecoach-bench did not end within {limit:.0f} s at N={ranks}")
        if coordinator.poll() is not None:
            print(f"N={ranks}: the coordinator exited {coordinator.returncode} during the run; "
                  f"see {log_path}", file=sys.stderr)
        if bench.returncode != 0:
            sys.exit(f"stagecoach-bench failed at N={ranks} (exit {bench.returncode}); "
                     f"the coordinator's log: {log_path}")
        return bench.stdout
    finally:
        stop(coordinator)
        if args.keep:
            print(f"N={ranks}: kept {folder}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coordinator", default="target/release/stagecoach-coordinator",
                    help="the coordinator binary to measure")
    ap.add_argument("--bench", default="target/release/stagecoach-bench")
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 1024, 4096, 16384])
    ap.add_argument("--form-timeout-secs", type=float, default=120.0)
    ap.add_argument("--run-secs", type=float, default=20.0)
    ap.add_argument("--ranks-per-channel", type=int, default=8,
                    help="ranks sharing one HTTP/2 connection (bench/README.md says why few)")
    ap.add_argument("--ranks-per-node", type=int, default=1,
                    help="above 1: the ranks of a node share one NodeSession through a relay, "
                         "as behind a node agent (1: a Session per rank)")
    ap.add_argument("--node-client", choices=["relay", "direct"], default="relay",
                    help="with nodes: a task per rank behind a relay, or one task per node "
                         "sending what such a relay sends (bench/README.md)")
    ap.add_argument("--bench-threads", type=int, default=0,
                    help="the load generator's runtime threads (0: one per core)")
    ap.add_argument("--label", default="", help="kept in the JSON lines (e.g. before, after)")
    ap.add_argument("--json-out", help="append every run's figures as a JSON line here")
    ap.add_argument("--keep", action="store_true",
                    help="keep each run's folder (job, state, coordinator log)")
    args = ap.parse_args()
    for binary in (args.coordinator, args.bench):
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            sys.exit(f"{binary}: not an executable file (make bench-scale builds "
                     "target/release/stagecoach-coordinator and stagecoach-bench)")
    if any(n < 1 for n in args.ranks):
        sys.exit("--ranks: every N must be at least 1")
    # Each channel of the bench is a socket on both sides; the coordinator's log, state and
    # metrics add a few. Both processes inherit the limit.
    per_connection = args.ranks_per_node if args.ranks_per_node > 1 else args.ranks_per_channel
    raise_fd_limit(4096 + max(args.ranks) // max(1, per_connection) * 4)
    tmp = tempfile.mkdtemp(prefix="stagecoach-scale-")
    started = time.monotonic()
    try:
        for i, ranks in enumerate(args.ranks):
            print(f"N={ranks}: running ({time.monotonic() - started:.0f} s so far)", file=sys.stderr)
            sys.stdout.write(one_run(args, ranks, i == 0, tmp))
            sys.stdout.flush()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"all runs: {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
