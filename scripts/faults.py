#!/usr/bin/env python3
"""A seeded random fault campaign against the real stagecoach binaries.

Each trial starts its own coordinator, workers and (for most trials) a single-member etcd in a
temporary folder, trains a small micro-preset job on the synthetic demo corpus, injects one
fault at a seed-drawn moment, lets the job finish, and then reads the job's state store to
check the sample ledger against a fault-free reference run of the same job:

- worker kill -9: 1 of 2 workers, 1 of 3 workers, every worker (replacements start after a
  drawn delay; for 1 of 3 the two survivors go on, the replacement waits as a spare);
- coordinator kill -9 before and after the first checkpoint, restarted on the same state
  store and port (the workers, started with --reconnect-secs 60, re-attach);
- etcd kill -9 for 5 s and for 30 s, restarted on the same ports and data;
- a worker stopped (SIGSTOP) for longer than its lease, then continued (SIGCONT);
- poison on the 2nd or 3rd step of a job's second stage (the spike detector must roll back
  and skip the poisoned samples).

For every trial it reports whether the job survived (the coordinator exited 0 with the job
finished and the ledger complete), the time from the fault to the next committed step, the
steps set aside (`ledger/rolled_back/`), samples lost and duplicated against the plan, and the
relative difference of the final loss from the reference. The state store is read after the
job: etcd through its JSON gateway (`/v3/kv/range`), the embedded store (a few trials) from its
documented on-disk format (`coordinator/src/store/embedded/format.rs`).

Run it (Python 3.11, standard library only) from the repository root:

    make faults                                   # builds the binaries, then the campaign
    python3 scripts/faults.py --seed 7 --trials 27 --out /tmp/faults.md
    python3 scripts/faults.py --only etcd-30s --trials 2 --bin-dir /tmp/faults-bin --keep

It needs `/usr/bin/etcd` (Debian's etcd-server, installed by `make setup`). Failed trials
keep their folders (coordinator and worker logs, job file, state, status.jsonl) whatever
`--keep` says, and the exit status is 1 when any trial did not survive (or the campaign was
interrupted: SIGINT, SIGTERM and SIGHUP kill the trial's processes and report what ran).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ETCD = Path("/usr/bin/etcd")
DEFAULT_SEED = 20261201
DEFAULT_TRIALS = 27
POLL_S = 0.1
LEASE_MS = 4000
RENDEZVOUS_MS = 3000
JOB = "faults"
MIX_MAIN = {"prose": 0.5, "math": 0.3, "code": 0.2}
MIX_SECOND = {"prose": 0.3, "math": 0.3, "code": 0.4}


class TrialError(Exception):
    """A trial could not go on (a deadline passed, a process would not start)."""


# ---------------------------------------------------------------------------------------------
# Protobuf, as far as the ledger needs it (proto/proto/stagecoach.proto)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """Decodes the varint at `buf[i]`; returns it and the offset after it."""
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("a varint runs past the end of the message")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """The (field number, value) pairs of a protobuf message: varints as ints, the rest as
    bytes (length-delimited payloads, fixed64 and fixed32 in their little-endian bytes)."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            out.append((number, value))
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            out.append((number, buf[i : i + width]))
            i += width
        elif wire == 2:
            n, i = _varint(buf, i)
            out.append((number, buf[i : i + n]))
            i += n
        else:
            raise ValueError(f"protobuf wire type {wire} is not handled")
    return out


def _double(raw: int | bytes) -> float:
    """A `double` field from its fixed64 bytes."""
    if not isinstance(raw, bytes) or len(raw) != 8:
        raise ValueError(f"a double field is {raw!r}, not 8 bytes")
    return struct.unpack("<d", raw)[0]


def _sample(buf: bytes) -> tuple[int, int]:
    """A `v1::SampleRef` as (source, token offset)."""
    f = dict(_fields(buf))
    return int(f.get(1, 0)), int(f.get(2, 0))


def decode_ledger_step(buf: bytes) -> dict:
    """`v1::LedgerStep`: step (1), samples (2), loss (4), generation (5)."""
    step = {"step": 0, "samples": [], "loss": 0.0, "generation": 0}
    for number, value in _fields(buf):
        if number == 1:
            step["step"] = value
        elif number == 2:
            step["samples"].append(_sample(value))
        elif number == 4:
            step["loss"] = _double(value)
        elif number == 5:
            step["generation"] = value
    return step


def decode_skipped(buf: bytes) -> tuple[list[tuple[int, int]], int]:
    """`v1::SkippedRange`: its samples (3) and the global batches skipped (4)."""
    samples, batches = [], 0
    for number, value in _fields(buf):
        if number == 3:
            samples.append(_sample(value))
        elif number == 4:
            batches = value
    return samples, batches


def decode_event(buf: bytes) -> dict:
    """`v1::SpikeEvent`: detected_at (1), action (8), resumed_at_step (10)."""
    f = dict(_fields(buf))
    return {
        "detected_at": f.get(1, 0),
        "action": f.get(8, 0),
        "resumed_at": f.get(10, 0),
    }


SPIKE_ACTION_ROLLBACK = 2


# ---------------------------------------------------------------------------------------------
# State stores


def read_etcd(client_port: int, prefix: str) -> dict[str, bytes]:
    """Every key under `prefix` of the etcd on `client_port`, through its JSON gateway."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    body = json.dumps(
        {
            "key": base64.b64encode(prefix.encode()).decode(),
            "range_end": base64.b64encode(end.encode()).decode(),
        }
    ).encode()
    url = f"http://127.0.0.1:{client_port}/v3/kv/range"
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            answer = json.load(resp)
    except (urllib.error.URLError, OSError) as e:
        raise TrialError(f"cannot read etcd at {url}: {e}") from e
    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
        for kv in answer.get("kvs", [])
    }


def _unframe(data: bytes, at: int) -> tuple[bytes, int] | None:
    """The payload of the embedded store's frame at `at` (`len u32 | crc32 u32 | payload`)
    and the offset after it; None when it is cut short or fails its CRC."""
    if at + 8 > len(data):
        return None
    length = int.from_bytes(data[at : at + 4], "little")
    crc = int.from_bytes(data[at + 4 : at + 8], "little")
    payload = data[at + 8 : at + 8 + length]
    if len(payload) != length or zlib.crc32(payload) != crc:
        return None
    return payload, at + 8 + length


class _Reader:
    """Little-endian fields off the front of an embedded-store payload."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ValueError("an embedded-store record is shorter than its fields")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def int(self, width: int) -> int:
        return int.from_bytes(self.take(width), "little")

    def bytes(self) -> bytes:
        return self.take(self.int(4))


def _read_segment(path: Path, kvs: dict[str, bytes]) -> int:
    """Applies one segment of the embedded store (coordinator/src/store/embedded/segment.rs)
    onto `kvs`; returns the revision it holds every write up to."""
    data = path.read_bytes()
    if len(data) < 16 or data[-8:] != b"SCSEG\0\0\x01":
        raise TrialError(f"{path}: a segment without its footer")
    index_at = int.from_bytes(data[-16:-8], "little")
    framed = _unframe(data[: len(data) - 16], index_at)
    if framed is None:
        raise TrialError(f"{path}: the segment index fails its CRC")
    r = _Reader(framed[0])
    revision = r.int(8)
    r.take(8)  # entries
    blocks = []
    for _ in range(r.int(4)):
        r.bytes()  # first key
        blocks.append((r.int(8), r.int(4)))
    for offset, length in blocks:
        block = _unframe(data[offset : offset + length], 0)
        if block is None:
            raise TrialError(f"{path}: a block at byte {offset} fails its CRC")
        b = _Reader(block[0])
        while b.at < len(b.data):
            key, tag = b.bytes().decode(), b.int(1)
            if tag == 1:
                kvs[key] = b.bytes()
                b.take(16)  # version and mod_revision
            elif tag == 2:
                kvs.pop(key, None)
            else:
                raise TrialError(f"{path}: an entry with tag {tag}")
    return revision


def _segments(state: Path) -> list[Path]:
    """The embedded store's segments in `state`, oldest first, without those another covers
    (a merge's inputs that a crash left beside its output)."""
    found = []
    for path in state.glob("*.seg"):
        lo, _, hi = path.stem.partition("-")
        found.append((int(lo), -int(hi), path))
    out, last_hi = [], -1
    for lo, neg_hi, path in sorted(found):
        if -neg_hi > last_hi:
            out.append(path)
            last_hi = -neg_hi
    return out


def read_embedded(state: Path, prefix: str) -> dict[str, bytes]:
    """Every key under `prefix` of the embedded store in `state`: its segments (or the
    snapshot of a store from before them), oldest first, then the records of the log a flush
    set aside and of the write-ahead log newer than them, up to the first torn one."""
    kvs: dict[str, bytes] = {}
    revision = 0
    snapshot = state / "snapshot"
    segments = _segments(state)
    if snapshot.exists() and not (segments and segments[0].stem.startswith("0" * 20 + "-")):
        framed = _unframe(snapshot.read_bytes(), 0)
        if framed is None:
            raise TrialError(f"{snapshot}: the snapshot fails its CRC")
        r = _Reader(framed[0])
        revision = r.int(8)
        for _ in range(r.int(8)):
            key, value = r.bytes().decode(), r.bytes()
            r.take(16)  # version and mod_revision
            kvs[key] = value
    for path in segments:
        revision = max(revision, _read_segment(path, kvs))
    for wal in (state / "wal.previous", state / "wal"):
        data = wal.read_bytes() if wal.exists() else b""
        at = 0
        while (framed := _unframe(data, at)) is not None:
            payload, at = framed
            r = _Reader(payload)
            record_revision = r.int(8)
            ops = r.int(4)
            for _ in range(ops):
                tag, key = r.int(1), r.bytes().decode()
                if tag == 1:
                    value = r.bytes()
                    if record_revision > revision:
                        kvs[key] = value
                elif tag == 2:
                    if record_revision > revision:
                        kvs.pop(key, None)
                else:
                    raise TrialError(f"{wal}: an operation with tag {tag}")
    return {k: v for k, v in kvs.items() if k.startswith(prefix)}


@dataclass
class Ledger:
    """What the state store holds of the job after it."""

    steps: dict[int, dict]
    last: dict | None
    rolled_back: int
    skipped: list[tuple[int, int]]
    skipped_batches: int
    rewinding: bool
    rollbacks: list[dict]


def ledger_of(kvs: dict[str, bytes], job: str) -> Ledger:
    """Decodes the ledger keys of `job` (coordinator/src/keys.rs)."""
    base = f"jobs/{job}/"
    steps, skipped, batches, rollbacks, rolled_back = {}, [], 0, [], 0
    for key, value in kvs.items():
        rel = key[len(base) :]
        if rel.startswith("ledger/steps/"):
            s = decode_ledger_step(value)
            steps[s["step"]] = s
        elif rel.startswith("ledger/rolled_back/"):
            rolled_back += 1
        elif rel.startswith("ledger/skipped/"):
            samples, n = decode_skipped(value)
            skipped += samples
            batches += n
        elif rel.startswith("events/"):
            e = decode_event(value)
            if e["action"] == SPIKE_ACTION_ROLLBACK:
                rollbacks.append(e)
    last = kvs.get(f"{base}ledger/last")
    return Ledger(
        steps=steps,
        last=decode_ledger_step(last) if last is not None else None,
        rolled_back=rolled_back,
        skipped=skipped,
        skipped_batches=batches,
        rewinding=f"{base}ledger/rewinding" in kvs,
        rollbacks=rollbacks,
    )


# ---------------------------------------------------------------------------------------------
# Jobs


@dataclass
class Shape:
    """A job the campaign trains: its workers, stages and checkpoints."""

    name: str
    workers: int
    min_workers: int
    stages: list[tuple[str, int, dict[str, float]]]
    every: int
    data_seed: int
    spikes: bool = False

    @property
    def total(self) -> int:
        """The job's steps."""
        return self.stages[-1][1]


def draw_shapes(rng: random.Random) -> dict[str, Shape]:
    """The campaign's job shapes, their lengths and data seeds drawn from `rng`."""
    return {
        "pair": Shape(
            name="pair",
            workers=2,
            min_workers=2,
            stages=[("main", rng.choice([60, 70, 80]), MIX_MAIN)],
            every=20,
            data_seed=rng.randrange(1, 1000),
        ),
        "trio": Shape(
            name="trio",
            workers=3,
            min_workers=2,
            stages=[("main", rng.choice([40, 50, 60]), MIX_MAIN)],
            every=10,
            data_seed=rng.randrange(1, 1000),
        ),
        "stages": Shape(
            name="stages",
            workers=2,
            min_workers=2,
            stages=[("first", 30, MIX_MAIN), ("second", 50, MIX_SECOND)],
            every=10,
            data_seed=rng.randrange(1, 1000),
            spikes=True,
        ),
    }


def _toml(value) -> str:
    """A TOML value: strings (JSON escapes are TOML's), numbers, booleans, lists, inline
    tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def job_toml(shape: Shape, data: Path, checkpoints: Path, extend: int = 0) -> str:
    """The job file of `shape` on the demo corpus at `data`, checkpoints into `checkpoints`;
    `extend` lengthens the last stage (for a longer replay of the same sample plan)."""
    schedule: dict = {"peak_lr": 3e-3, "warmup_steps": 4}
    if len(shape.stages) == 1:
        # As the e2e tests' micro job: the LR decays over the last 4 steps.
        schedule["decay_start"] = {"step": max(shape.total - 4, 4)}
    sections: dict[str, dict] = {
        "job": {"name": JOB},
        "model": {"preset": "micro"},
        "schedule": schedule,
        "data": {
            "seed": shape.data_seed,
            "global_batch_tokens": 512,
            "micro_batch_tokens": 256,
        },
        "train": {"threads": 1, "log_every": 1},
        "workers": {
            "min": shape.min_workers,
            "max": shape.workers,
            "lease_ms": LEASE_MS,
            "heartbeat_ms": 200,
            "collective_timeout_ms": 5000,
            "rendezvous_ms": RENDEZVOUS_MS,
        },
        "checkpoints": {"dir": str(checkpoints), "every_steps": shape.every},
    }
    if shape.spikes:
        sections["spikes"] = {
            "window": 20,
            "min_steps": 10,
            "zscore": 5.0,
            "ratio": 1.5,
            "carry_ratio": 1.5,
            "ladder": ["rollback"],
            "skip_before": 0,
            "skip_after": 1,
        }
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in keys.items()]
        lines.append("")
    for source in MIX_MAIN:
        lines += ["[[sources]]", f"name = {_toml(source)}"]
        lines += [f"path = {_toml(str(data / source / 'train'))}", ""]
    for i, (name, until, mix) in enumerate(shape.stages):
        until += extend if i == len(shape.stages) - 1 else 0
        lines += ["[[stages]]", f"name = {_toml(name)}", f"until = {_toml({'steps': until})}"]
        lines += ["seq_len = 64", f"mix = {_toml(mix)}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Processes


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Poll:
    """One status query: when, and what it answered (None: the coordinator did not)."""

    t: float
    status: dict | None


class Cluster:
    """The processes of one trial (etcd, coordinator, workers) and the status history; every
    process it started is killed by `close`."""

    def __init__(self, bins: Path, folder: Path, job: Path, deadline: float, etcd: bool):
        self.bins, self.dir, self.job, self.deadline = bins, folder, job, deadline
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self.worker_names: list[str] = []
        self.killed: set[int] = set()
        self.coordinators: list[subprocess.Popen] = []
        self.history: list[Poll] = []
        self.notes: list[str] = []
        self.etcd: subprocess.Popen | None = None
        self.port, *self.etcd_ports = free_ports(3 if etcd else 1)
        self.url = f"http://127.0.0.1:{self.port}"
        if etcd:
            self.state = f"etcd://127.0.0.1:{self.etcd_ports[0]}"
        else:
            self.state = str(folder / "state")

    def _spawn(self, name: str, argv: list[str], stdout=subprocess.DEVNULL) -> subprocess.Popen:
        """Starts `argv` with its stderr in `NAME.log` of the trial folder."""
        with open(self.dir / f"{name}.log", "ab") as log:
            p = subprocess.Popen(
                argv, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=stdout, stderr=log
            )
        self.procs.append(p)
        return p

    def start_etcd(self) -> None:
        """Starts (or starts again) etcd on the trial's ports and data dir; waits until its
        gateway answers (at most 20 s)."""
        client, peer = (f"http://127.0.0.1:{p}" for p in self.etcd_ports)
        argv = [str(ETCD), "--name", "default", "--data-dir", str(self.dir / "etcd-data")]
        argv += ["--listen-client-urls", client, "--advertise-client-urls", client]
        argv += ["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer]
        argv += ["--initial-cluster", f"default={peer}"]
        self.etcd = self._spawn("etcd", argv)
        limit = time.monotonic() + 20
        while True:
            if self.etcd.poll() is not None:
                raise TrialError(f"etcd exited at start ({self.etcd.returncode}); see etcd.log")
            try:
                read_etcd(self.etcd_ports[0], "probe/")
                return
            except TrialError:
                if time.monotonic() > limit:
                    raise TrialError("etcd did not answer within 20 s; see etcd.log") from None
                time.sleep(0.1)

    def kill_etcd(self) -> None:
        """kill -9 of etcd."""
        assert self.etcd is not None
        self.etcd.kill()
        self.etcd.wait(timeout=10)

    def etcd_alive(self) -> bool:
        """Whether the trial's etcd is running."""
        return self.etcd is not None and self.etcd.poll() is None

    def start_coordinator(self) -> None:
        """Starts a coordinator on the trial's port and state store; waits until it answers
        (at most 30 s)."""
        n = len(self.coordinators) + 1
        argv = [str(self.bins / "stagecoach-coordinator"), "--job", str(self.job)]
        argv += ["--listen", f"127.0.0.1:{self.port}", "--metrics-listen", "127.0.0.1:0"]
        argv += ["--state", self.state]
        with open(self.dir / f"coordinator-{n}.out", "wb") as out:
            p = self._spawn(f"coordinator-{n}", argv, stdout=out)
        self.coordinators.append(p)
        limit = time.monotonic() + 30
        while self.poll() is None:
            if p.poll() is not None:
                raise TrialError(f"coordinator-{n} exited at start ({p.returncode})")
            if time.monotonic() > limit:
                raise TrialError(f"coordinator-{n} did not answer within 30 s")
            time.sleep(POLL_S)

    def coordinator(self) -> subprocess.Popen:
        """The coordinator running now (the last one started)."""
        return self.coordinators[-1]

    def start_worker(self, extra: list[str] = ()) -> int:
        """Starts a worker; returns its index."""
        i = len(self.workers)
        name = f"worker-{i}"
        argv = [str(self.bins / "stagecoach-worker"), "join", "--coordinator", self.url]
        argv += ["--reconnect-secs", "60", *extra]
        self.workers.append(self._spawn(name, argv))
        self.worker_names.append(name)
        return i

    def kill_worker(self, i: int) -> None:
        """kill -9 of worker `i`."""
        self.workers[i].kill()
        self.workers[i].wait(timeout=10)
        self.killed.add(i)

    def status(self) -> dict | None:
        """`stagecoach status --json`, or None while the coordinator does not answer."""
        argv = [str(self.bins / "stagecoach"), "--coordinator", self.url, "status", "--json"]
        try:
            out = subprocess.run(argv, capture_output=True, timeout=5, check=False)
        except subprocess.TimeoutExpired:
            return None
        if out.returncode != 0:
            return None
        try:
            return json.loads(out.stdout)
        except json.JSONDecodeError:
            return None

    def poll(self) -> dict | None:
        """Queries the status and records it in the history."""
        s = self.status()
        self.history.append(Poll(time.time(), s))
        return s

    def check_deadline(self, what: str) -> None:
        """Raises when the trial's time is up."""
        if time.monotonic() > self.deadline:
            last = next((p.status for p in reversed(self.history) if p.status), None)
            brief = {k: last.get(k) for k in ("state", "step", "generation", "detail")} if last else None
            raise TrialError(f"timed out waiting for {what} (last status {brief})")

    def wait_for(self, what: str, done: Callable[[dict], bool]) -> dict:
        """Polls until `done` holds of the status; raises at the trial's deadline."""
        while True:
            s = self.poll()
            if s is not None and done(s):
                return s
            self.check_deadline(what)
            time.sleep(POLL_S)

    def wait_step(self, step: int) -> dict:
        """Waits until at least `step` steps are committed."""
        return self.wait_for(f"step {step}", lambda s: s.get("step", 0) >= step)

    def sleep(self, seconds: float) -> None:
        """Sleeps, polling the status meanwhile."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll()
            time.sleep(POLL_S)

    def wait_coordinator_exit(self) -> int:
        """Polls until the running coordinator exits; its exit code."""
        p = self.coordinator()
        while p.poll() is None:
            self.check_deadline("the coordinator to exit")
            self.poll()
            time.sleep(POLL_S)
        return p.returncode

    def close(self) -> None:
        """Kills every process of the trial still running (a stopped one too)."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"warning: process {p.pid} did not exit after SIGKILL", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Faults


@dataclass
class Fault:
    """When a fault hit (wall clock) and how to tell that training resumed: "new-world" (the
    first step a generation other than the fault's commits) or "store-back" (the first step
    committed after etcd was started again, at `t_back`). A poisoned step strikes when it is
    dispatched, which the coordinator's log tells (`poisoned_step`)."""

    t: float
    rule: str
    t_back: float = 0.0
    poisoned_step: int = 0


def _replace_after(c: Cluster, delay: float, count: int) -> None:
    """Waits `delay` seconds (polling) and starts `count` replacement workers, unless the job
    ended meanwhile."""
    c.sleep(delay)
    if c.coordinator().poll() is not None:
        c.notes.append("the job ended before the replacement started")
        return
    for _ in range(count):
        c.start_worker()


def fault_kill_workers(c: Cluster, p: dict) -> Fault:
    """kill -9 of the workers `p["victims"]` at step `p["step"]`; replacements after
    `p["delay"]` s."""
    c.wait_step(p["step"])
    f = Fault(time.time(), "new-world")
    for i in p["victims"]:
        c.kill_worker(i)
    _replace_after(c, p["delay"], len(p["victims"]))
    return f


def fault_kill_coordinator(c: Cluster, p: dict) -> Fault:
    """kill -9 of the coordinator at step `p["step"]`; a new one after `p["delay"]` s on the
    same port and state store."""
    c.wait_step(p["step"])
    f = Fault(time.time(), "new-world")
    c.coordinator().kill()
    c.coordinator().wait(timeout=10)
    time.sleep(p["delay"])
    c.start_coordinator()
    return f


def fault_etcd(c: Cluster, p: dict) -> Fault:
    """kill -9 of etcd at step `p["step"]` for `p["outage"]` s, then etcd again on the same
    ports and data."""
    c.wait_step(p["step"])
    f = Fault(time.time(), "store-back")
    c.kill_etcd()
    c.sleep(p["outage"])
    f.t_back = time.time()
    c.start_etcd()
    return f


def fault_stop_worker(c: Cluster, p: dict) -> Fault:
    """SIGSTOP of worker `p["victims"][0]` at step `p["step"]` for `p["stopped"]` s, then
    SIGCONT."""
    c.wait_step(p["step"])
    f = Fault(time.time(), "new-world")
    w = c.workers[p["victims"][0]]
    w.send_signal(signal.SIGSTOP)
    c.sleep(p["stopped"])
    w.send_signal(signal.SIGCONT)
    return f


def fault_poison(c: Cluster, p: dict) -> Fault:
    """The samples of step `p["poisoned"]` were poisoned on every worker at start; the fault
    strikes when that step is dispatched (the time is taken from the log afterwards)."""
    c.wait_step(p["poisoned"])
    return Fault(0.0, "new-world", poisoned_step=p["poisoned"])


@dataclass
class Kind:
    """A fault kind: its job shape, what it draws, what it does, what it expects."""

    shape: str
    draw: Callable[[random.Random, Shape], dict]
    run: Callable[[Cluster, dict], Fault]
    etcd_only: bool = False
    expect: str = ""


def _draw_kill(victims: int) -> Callable[[random.Random, Shape], dict]:
    """Draws the step, the victims (`victims` of the shape's workers) and the replacement
    delay of a worker kill."""

    def draw(rng: random.Random, shape: Shape) -> dict:
        return {
            "step": rng.randrange(5, shape.total - 10),
            "victims": sorted(rng.sample(range(shape.workers), victims)),
            "delay": round(rng.uniform(0.5, 5.0), 1),
        }

    return draw


def _draw_coordinator(before: bool) -> Callable[[random.Random, Shape], dict]:
    """Draws the step (before or after the first checkpoint) and the restart delay."""

    def draw(rng: random.Random, shape: Shape) -> dict:
        lo, hi = (3, shape.every - 2) if before else (shape.every + 2, shape.total - 8)
        return {"step": rng.randrange(lo, hi), "delay": round(rng.uniform(0.2, 3.0), 1)}

    return draw


def _draw_etcd(outage: int) -> Callable[[random.Random, Shape], dict]:
    """Draws the step of an etcd outage of `outage` s."""

    def draw(rng: random.Random, shape: Shape) -> dict:
        return {"step": rng.randrange(5, shape.total - 15), "outage": outage}

    return draw


def _draw_stop(rng: random.Random, shape: Shape) -> dict:
    """Draws the step, the worker and how long past its lease it stays stopped."""
    return {
        "step": rng.randrange(5, shape.total - 10),
        "victims": [rng.randrange(shape.workers)],
        "stopped": round(LEASE_MS / 1000 * rng.uniform(1.5, 3.0), 1),
    }


def _draw_poison(rng: random.Random, shape: Shape) -> dict:
    """Draws the poisoned step: the 2nd or 3rd of the second stage."""
    start = shape.stages[0][1]
    return {"poisoned": start + rng.choice([1, 2])}


KINDS: dict[str, Kind] = {
    "kill-1of2": Kind(
        "pair", _draw_kill(1), fault_kill_workers,
        expect="the replacement takes the state from the survivor; Δ 0",
    ),
    "kill-1of3": Kind(
        "trio", _draw_kill(1), fault_kill_workers,
        expect=f"a replacement within the {RENDEZVOUS_MS / 1000:g} s rendezvous joins (Δ 0); a "
        "later one waits as a spare while the 2 survivors go on (Δ ~1e-8: 2 ranks sum in "
        "another order than 3)",
    ),
    "kill-all": Kind(
        "pair", _draw_kill(2), fault_kill_workers,
        expect="the last checkpoint (or the initial state) restored, the steps after it set "
        "aside and trained again; Δ 0",
    ),
    "coord-before-ckpt": Kind(
        "pair", _draw_coordinator(True), fault_kill_coordinator,
        expect="the workers' state kept, the step in flight committed; nothing set aside; Δ 0",
    ),
    "coord-after-ckpt": Kind(
        "pair", _draw_coordinator(False), fault_kill_coordinator,
        expect="the workers' state kept, the step in flight committed; nothing set aside; Δ 0",
    ),
    "etcd-5s": Kind(
        "pair", _draw_etcd(5), fault_etcd, etcd_only=True,
        expect="training held while etcd is down, nothing set aside; Δ 0",
    ),
    "etcd-30s": Kind(
        "pair", _draw_etcd(30), fault_etcd, etcd_only=True,
        expect="training held while etcd is down, nothing set aside; Δ 0",
    ),
    "stop-past-lease": Kind(
        "pair", _draw_stop, fault_stop_worker,
        expect="its lease lost, the world waits for 2 workers; it comes back and rejoins; Δ 0",
    ),
    "poison-stage": Kind(
        "stages", _draw_poison, fault_poison,
        expect="rolled back to the stage's start (the flagged step was committed, so it is "
        "set aside too), 2 batches skipped; Δ ≠ 0 by design",
    ),
}


def describe(kind: str, p: dict, store: str) -> str:
    """The drawn parameters of a trial, for its row."""
    parts = []
    if "step" in p:
        parts.append(f"at step {p['step']}")
    if "victims" in p:
        parts.append("worker " + "+".join(str(v) for v in p["victims"]))
    if "delay" in p:
        what = "restart" if kind.startswith("coord") else "replacement"
        parts.append(f"{what} after {p['delay']} s")
    if "outage" in p:
        parts.append(f"down {p['outage']} s")
    if "stopped" in p:
        parts.append(f"stopped {p['stopped']} s (lease {LEASE_MS / 1000:g} s)")
    if "poisoned" in p:
        parts.append(f"step {p['poisoned']} poisoned")
    parts.append(store)
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Reference:
    """A fault-free run of a shape: its ledger and the plan's samples in order."""

    ledger: Ledger
    plan: list[tuple[int, int]]
    seconds: float


@dataclass
class Row:
    """One trial's outcome."""

    n: int
    kind: str
    params: str
    survived: bool = False
    resume: float | None = None
    set_aside: int | None = None
    lost: int | None = None
    duplicated: int | None = None
    loss_delta: float | None = None
    notes: list[str] = field(default_factory=list)
    folder: Path | None = None


@dataclass
class Commit:
    """A "step committed" line of a coordinator's log: when, the steps committed after it
    (the ledger's `step` + 1) and the generation that trained it."""

    t: float
    steps: int
    generation: int


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT[\d:.]+Z)\s+\w+\s+(.*)$")
COMMITTED = re.compile(r"step committed step=(\d+) .*generation=(\d+)")
FORMING = re.compile(r"forming a world generation=(\d+) world_size=(\d+)")
MESSAGE = re.compile(r"stagecoach_\w+(?:::\w+)*: (.*)$")
# How the coordinator brought a new world to the committed state (coordinator/src/driver/):
# the start of its log message, and what the row says.
RECOVERIES = [
    ("the step the ledger lacked is committed", "the step in flight committed from the ranks"),
    ("ranks take the committed state from a rank", "state synced from a rank"),
    ("restoring a checkpoint on every rank", "a checkpoint restored"),
    ("rolling back", "spike rollback"),
]


@dataclass
class Logs:
    """What the trial's coordinators logged: commits (`train.log_every = 1` logs every one),
    worlds formed (time, generation, size) and recoveries (time, what, at step)."""

    commits: list[Commit] = field(default_factory=list)
    worlds: list[tuple[float, int, int]] = field(default_factory=list)
    recoveries: list[tuple[float, str, str]] = field(default_factory=list)


def read_logs(folder: Path) -> Logs:
    """Reads the logs of every coordinator of the trial in `folder`."""
    logs = Logs()
    for log in sorted(folder.glob("coordinator-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = LOG_LINE.match(line)
            if not m:
                continue
            t = datetime.datetime.fromisoformat(m[1]).timestamp()
            if c := COMMITTED.search(m[2]):
                logs.commits.append(Commit(t, int(c[1]), int(c[2])))
            elif w := FORMING.search(m[2]):
                logs.worlds.append((t, int(w[1]), int(w[2])))
            message = MESSAGE.search(m[2])
            found = message and next((w for text, w in RECOVERIES if message[1].startswith(text)), None)
            if found:
                if "to=the initial state" in message[1]:
                    found = "the initial state restored"
                step = re.search(r" step=(\d+)", message[1])
                logs.recoveries.append((t, found, step[1] if step else "?"))
    logs.commits.sort(key=lambda c: c.t)
    logs.worlds.sort()
    logs.recoveries.sort()
    return logs


def measure(f: Fault, logs: Logs, row: Row) -> None:
    """Fills the resume time of `row` from the commits around the fault, and notes the step
    and generation it hit, the worlds formed and recoveries after it and, for an outage, the
    steps committed while the store was down."""
    commits = logs.commits
    if f.poisoned_step:
        dispatched = next((c for c in commits if c.steps == f.poisoned_step), None)
        if dispatched is None:
            row.notes.append(f"step {f.poisoned_step} never dispatched")
            return
        f.t = dispatched.t
    before = [c for c in commits if c.t <= f.t]
    hit_steps, hit_gen = (before[-1].steps, before[-1].generation) if before else (0, 0)
    row.notes.append(f"hit at step {hit_steps} of generation {hit_gen}")
    after = [c for c in commits if c.t > f.t]
    if f.rule == "new-world":
        first = next((c for c in after if c.generation != hit_gen), None)
    else:
        first = next((c for c in after if c.t > f.t_back), None)
        down = [c for c in after if c.t <= f.t_back]
        if len(down) > 1:
            row.notes.append(f"{len(down)} steps committed while etcd was down")
    row.resume = None if first is None else first.t - f.t
    if f.rule == "store-back" and first is not None:
        row.notes.append(f"{first.t - f.t_back:.2f} s after etcd was started again")
    formed = [f"g{g}×{n}" for t, g, n in logs.worlds if t > f.t]
    if formed:
        row.notes.append("worlds after: " + " ".join(formed))
    done = [f"{what} (step {step})" for t, what, step in logs.recoveries if t > f.t]
    if done:
        row.notes.append("; ".join(done))


def judge(row: Row, shape: Shape, ledger: Ledger, ref: Reference,
          poison: list[tuple[int, int]]) -> bool:
    """Fills the ledger figures of `row` against the reference; whether the ledger is
    complete (every step of the job committed once, no rewind left)."""
    total, plan = shape.total, ref.plan
    complete = (
        sorted(ledger.steps) == list(range(total))
        and ledger.last is not None
        and ledger.last["step"] == total - 1
        and not ledger.rewinding
    )
    if not complete:
        have = sorted(ledger.steps)
        missing = sorted(set(range(total)) - set(have))
        row.notes.append(
            f"ledger incomplete: {len(have)} steps, missing {missing[:10]}"
            + (f", last {ledger.last['step']}" if ledger.last else ", no last")
            + (", a rewind left" if ledger.rewinding else "")
        )
    trained = [s for step in sorted(ledger.steps) for s in ledger.steps[step]["samples"]]
    counts: dict[tuple[int, int], int] = {}
    for s in trained:
        counts[s] = counts.get(s, 0) + 1
    row.duplicated = sum(n - 1 for n in counts.values() if n > 1)
    skipped = set(ledger.skipped)
    prefix_len = len(trained) + len(ledger.skipped)
    if prefix_len > len(plan):
        row.notes.append(f"{prefix_len - len(plan)} samples past the replayed plan unchecked")
    prefix = set(plan[:prefix_len])
    row.lost = len(prefix - set(counts) - skipped)
    both = skipped & set(counts)
    if both:
        row.notes.append(f"{len(both)} samples both trained and skipped")
    off_plan = set(counts) - set(plan)
    if off_plan and prefix_len <= len(plan):
        row.notes.append(f"{len(off_plan)} trained samples not in the plan")
    if poison:
        trained_poison = [s for s in poison if s in counts]
        if trained_poison:
            row.notes.append(f"{len(trained_poison)} poisoned samples trained")
        row.notes.append(f"{len(ledger.rollbacks)} spike rollback(s)" + "".join(
            f", detected at {e['detected_at']} → step {e['resumed_at']}" for e in ledger.rollbacks))
    row.set_aside = ledger.rolled_back
    if ledger.skipped_batches:
        row.notes.append(f"{ledger.skipped_batches} batches skipped")
    if complete:
        a, b = ledger.last["loss"], ref.ledger.last["loss"]
        row.loss_delta = (a - b) / b if b else float("nan")
    same = [s for s in range(total) if s in ledger.steps and s in ref.ledger.steps]
    diff_loss = [s for s in same if ledger.steps[s]["loss"] != ref.ledger.steps[s]["loss"]]
    diff_samples = [s for s in same if ledger.steps[s]["samples"] != ref.ledger.steps[s]["samples"]]
    if diff_loss:
        row.notes.append(f"loss ≠ reference from step {diff_loss[0]} ({len(diff_loss)} steps)")
    if diff_samples:
        row.notes.append(f"samples ≠ reference from step {diff_samples[0]}")
    return complete


# ---------------------------------------------------------------------------------------------
# Running


class Campaign:
    """The shared inputs of a campaign: binaries, corpus, shapes and their references."""

    def __init__(self, bins: Path, root: Path, shapes: dict[str, Shape], timeout: float):
        self.bins, self.root, self.shapes, self.timeout = bins, root, shapes, timeout
        self.data = root / "data"
        self.refs: dict[str, Reference] = {}

    def corpus(self) -> None:
        """Writes the demo corpus the jobs train on (300 documents per domain)."""
        argv = [str(self.bins / "stagecoach-worker"), "demo-corpus", "--docs", "300"]
        argv += ["--valid-docs", "5", "--output", str(self.data)]
        out = subprocess.run(argv, capture_output=True, timeout=120, check=False)
        if out.returncode != 0:
            sys.exit(f"demo-corpus failed ({out.returncode}): {out.stderr.decode(errors='replace')}")

    def fault_free(self, shape: Shape, folder: Path, extend: int = 0) -> tuple[Ledger, float]:
        """Runs `shape` without a fault (embedded store) in `folder`; its ledger and seconds."""
        folder.mkdir(parents=True)
        job = folder / "job.toml"
        job.write_text(job_toml(shape, self.data, folder / "checkpoints", extend))
        c = Cluster(self.bins, folder, job, time.monotonic() + self.timeout, etcd=False)
        start = time.monotonic()
        try:
            c.start_coordinator()
            for _ in range(shape.workers):
                c.start_worker()
            code = c.wait_coordinator_exit()
        except TrialError as e:
            sys.exit(f"the fault-free run of {shape.name} failed: {e}; see {folder}")
        finally:
            c.close()
        if code != 0:
            sys.exit(f"the fault-free run of {shape.name} exited {code}; see {folder}")
        return ledger_of(read_embedded(folder / "state", f"jobs/{JOB}/"), JOB), time.monotonic() - start

    def reference(self, name: str) -> Reference:
        """The fault-free run of shape `name` (run on first use). For a shape with spikes the
        plan is replayed 4 steps further (the same job, its last stage longer), since skipped
        batches move the end of the plan's prefix past the job's steps."""
        if name in self.refs:
            return self.refs[name]
        shape = self.shapes[name]
        ledger, seconds = self.fault_free(shape, self.root / f"ref-{name}")
        steps = ledger.steps
        if sorted(steps) != list(range(shape.total)):
            sys.exit(f"the fault-free run of {name} has an incomplete ledger; see {self.root}")
        plan = [s for i in range(shape.total) for s in steps[i]["samples"]]
        if shape.spikes:
            longer, _ = self.fault_free(shape, self.root / f"ref-{name}-longer", extend=4)
            plan = [s for i in sorted(longer.steps) for s in longer.steps[i]["samples"]]
            if any(longer.steps[i]["samples"] != steps[i]["samples"] for i in range(shape.total)):
                sys.exit(f"the longer replay of {name} does not start with the reference's plan")
        print(f"reference {name}: {shape.total} steps in {seconds:.1f} s, final loss "
              f"{ledger.last['loss']:.6f}", flush=True)
        self.refs[name] = Reference(ledger, plan, seconds)
        return self.refs[name]

    def trial(self, n: int, kind_name: str, rep: int, rng: random.Random) -> Row:
        """Runs trial `n`: one fault of `kind_name`, drawn from `rng`, in its own folder; the
        etcd kinds and two trials in three of the others use etcd, the rest the embedded
        store."""
        kind = KINDS[kind_name]
        shape = self.shapes[kind.shape]
        ref = self.reference(kind.shape)
        params = kind.draw(rng, shape)
        store = "etcd" if kind.etcd_only or rep % 3 != 1 else "embedded"
        row = Row(n, kind_name, describe(kind_name, params, store))
        row.folder = Path(tempfile.mkdtemp(prefix=f"trial-{n:02d}-{kind_name}-", dir=self.root))
        job = row.folder / "job.toml"
        job.write_text(job_toml(shape, self.data, row.folder / "checkpoints"))
        c = Cluster(self.bins, row.folder, job, time.monotonic() + self.timeout, store == "etcd")
        poison: list[tuple[int, int]] = []
        if "poisoned" in params:
            poison = ref.ledger.steps[params["poisoned"]]["samples"]
        code, fault, kvs, trouble = self._run(c, kind, shape, params, poison)
        (row.folder / "status.jsonl").write_text(
            "".join(json.dumps({"t": p.t, "status": p.status}) + "\n" for p in c.history)
        )
        if fault is not None:
            measure(fault, read_logs(row.folder), row)
        row.notes += c.notes
        pending = max((p.status.get("pending_writes", 0) for p in c.history if p.status), default=0)
        if pending:
            row.notes.append(f"up to {pending} writes pending")
        failures = sorted({
            p.status["last_failure"].get("reason", "")[:120]
            for p in c.history if p.status and p.status.get("last_failure")
        })
        if failures:
            row.notes.append("failures: " + " / ".join(failures))
        complete = kvs is not None and judge(row, shape, ledger_of(kvs, JOB), ref, poison)
        finished = any(p.status and p.status.get("state") == "finished" for p in c.history)
        row.survived = code == 0 and finished and complete
        row.notes += trouble
        if code is not None and code != 0:
            row.notes.append(f"coordinator exited {code}")
        if code == 0 and not finished:
            row.notes.append("the job was never seen finished")
        return row

    def _run(self, c: Cluster, kind: Kind, shape: Shape, params: dict,
             poison: list[tuple[int, int]]) -> tuple[int | None, Fault | None, dict | None, list[str]]:
        """Starts the trial's processes, strikes the fault, waits for the job's end and reads
        the store; kills every process whatever happens. Returns the coordinator's exit code
        (None when it did not exit), the fault, the store's keys of the job (None when they
        cannot be read) and what went wrong."""
        trouble: list[str] = []
        extra = [a for source, offset in poison for a in ("--poison", f"{source}:{offset}..{offset + 1}")]
        code = fault = kvs = None
        try:
            if c.etcd_ports:
                c.start_etcd()
            c.start_coordinator()
            for _ in range(shape.workers):
                c.start_worker(extra)
            fault = kind.run(c, params)
            code = c.wait_coordinator_exit()
            trouble += self._finish_workers(c)
        except (TrialError, OSError, subprocess.SubprocessError) as e:
            trouble.append(str(e))
        finally:
            try:
                if c.etcd_ports and not c.etcd_alive():
                    c.start_etcd()
                kvs = (read_etcd(c.etcd_ports[0], f"jobs/{JOB}/") if c.etcd_ports
                       else read_embedded(c.dir / "state", f"jobs/{JOB}/"))
            except (TrialError, ValueError, OSError) as e:
                trouble.append(f"cannot read the store: {e}")
            c.close()
        return code, fault, kvs, trouble

    @staticmethod
    def _finish_workers(c: Cluster) -> list[str]:
        """Gives the workers 30 s to exit after the coordinator; the ones that did not exit
        0 (the killed ones aside)."""
        limit = time.monotonic() + 30
        out = []
        for i, w in enumerate(c.workers):
            if i in c.killed:
                continue
            try:
                w.wait(timeout=max(0.1, limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                out.append(f"{c.worker_names[i]} still running after the coordinator")
                continue
            if w.returncode != 0:
                out.append(f"{c.worker_names[i]} exited {w.returncode}")
        return out


# ---------------------------------------------------------------------------------------------
# Reporting


def fmt_row(r: Row) -> str:
    """A markdown table row."""
    def num(v, f):
        return "—" if v is None else f(v)

    delta = num(r.loss_delta, lambda d: "0" if d == 0 else f"{d:+.2e}")
    notes = "; ".join(r.notes).replace("|", "\\|")
    return (
        f"| {r.n} | {r.kind} | {r.params} | {'yes' if r.survived else '**no**'} | "
        f"{num(r.resume, lambda v: f'{v:.2f} s')} | {num(r.set_aside, str)} | "
        f"{num(r.lost, str)} | {num(r.duplicated, str)} | {delta} | {notes} |"
    )


HEADER = (
    "| # | kind | drawn | survived | resume | set aside | lost | dup | final loss Δ | notes |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def summary(rows: list[Row]) -> str:
    """Per-kind and overall figures, as markdown."""
    lines = [
        "| kind | trials | survived | resume (min / median / max) | set aside | lost | dup "
        "| final loss Δ (max \\|·\\|) | expected |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        rs = [r for r in rows if r.kind == kind]
        if not rs:
            continue
        times = [r.resume for r in rs if r.resume is not None]
        t = (f"{min(times):.2f} / {statistics.median(times):.2f} / {max(times):.2f} s"
             if times else "—")
        deltas = [abs(r.loss_delta) for r in rs if r.loss_delta is not None]
        lines.append(
            f"| {kind} | {len(rs)} | {sum(r.survived for r in rs)} | {t} | "
            f"{sum(r.set_aside or 0 for r in rs)} | {sum(r.lost or 0 for r in rs)} | "
            f"{sum(r.duplicated or 0 for r in rs)} | "
            f"{('0' if max(deltas) == 0 else f'{max(deltas):.2e}') if deltas else '—'} | "
            f"{KINDS[kind].expect} |"
        )
    restarts = sum(r.set_aside or 0 for r in rows if r.kind.startswith("coord"))
    lines.append("")
    lines.append(
        f"**{sum(r.survived for r in rows)}/{len(rows)} survived**, "
        f"{sum(r.lost or 0 for r in rows)} samples lost, "
        f"{sum(r.duplicated or 0 for r in rows)} duplicated, "
        f"{restarts} steps set aside by coordinator restarts."
    )
    return "\n".join(lines)


def plan_trials(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The (kind, repetition) of every trial: the kinds in turn, or only `--only`."""
    if args.only:
        return [(args.only, i) for i in range(args.trials)]
    names = list(KINDS)
    return [(names[i % len(names)], i // len(names)) for i in range(args.trials)]


def _interrupted(signum: int, _frame) -> None:
    """SIGTERM and SIGHUP end the campaign as Ctrl-C does: the trial under way kills its
    processes, and the trials run so far are reported."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    """Parses the options, runs the trials and prints (and writes) the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"campaign seed (default {DEFAULT_SEED})")
    ap.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help=f"number of trials (default {DEFAULT_TRIALS}: every kind 3 times)")
    ap.add_argument("--only", choices=list(KINDS), help="run only trials of this kind")
    ap.add_argument("--bin-dir", type=Path, default=Path("target/debug"), help="folder of the binaries (default target/debug)")
    ap.add_argument("--out", type=Path, help="write the markdown table and summary to this file")
    ap.add_argument("--keep", action="store_true", help="keep every trial folder (failed ones are always kept)")
    ap.add_argument("--trial-timeout", type=float, default=240, help="seconds a trial may take before it counts as not survived (default 240)")
    args = ap.parse_args()
    if args.trials < 1:
        ap.error("--trials must be at least 1")
    bins = args.bin_dir.resolve()
    for b in ("stagecoach", "stagecoach-coordinator", "stagecoach-worker"):
        if not (bins / b).is_file():
            sys.exit(f"{bins / b} is missing: build the binaries (`cargo build --workspace --bins`) or pass --bin-dir")
    if not ETCD.is_file():
        sys.exit(f"{ETCD} is missing: install Debian's etcd-server (`make setup` does)")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    rng = random.Random(args.seed)
    shapes = draw_shapes(rng)
    root = Path(tempfile.mkdtemp(prefix="stagecoach-faults-"))
    campaign = Campaign(bins, root, shapes, args.trial_timeout)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"fault campaign: seed {args.seed}, {args.trials} trials, binaries {bins}, folder {root}", flush=True)
    for s in shapes.values():
        print(f"shape {s.name}: {s.workers} workers (min {s.min_workers}), {s.total} steps, "
              f"checkpoints every {s.every}, data seed {s.data_seed}", flush=True)
    campaign.corpus()
    rows: list[Row] = []
    interrupted = False
    try:
        for n, (kind, rep) in enumerate(plan_trials(args), start=1):
            t0 = time.monotonic()
            row = campaign.trial(n, kind, rep, rng)
            rows.append(row)
            print(fmt_row(row) + f"  ({time.monotonic() - t0:.0f} s)", flush=True)
            if row.survived and not args.keep:
                shutil.rmtree(row.folder, ignore_errors=True)
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'SIGINT'}); reporting the trials run so far", file=sys.stderr)
        interrupted = True
    failed = [r for r in rows if not r.survived]
    text = "\n".join([
        f"Seed {args.seed}, {len(rows)} trials, {started:%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs ({platform.machine()}, {platform.system()}).",
        "",
        HEADER,
        *(fmt_row(r) for r in rows),
        "",
        summary(rows),
        "",
    ])
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
        print(f"written to {args.out}")
    if failed or args.keep:
        for r in failed:
            print(f"trial {r.n} ({r.kind}) did not survive; its folder: {r.folder}")
        print(f"campaign folder kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if failed or interrupted else 0)


if __name__ == "__main__":
    main()
