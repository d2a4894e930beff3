"""A node agent's side of NodeSession written against proto/stagecoach.proto alone, with Python
grpcio: two simulated workers (no model: Ready for every World, StepDone at once for every Work,
the numbers every rank agrees on) register apart, then hold their sessions inside one
NodeSession, answering what comes down for both in one NodeUp, until the coordinator asks for
the job's last checkpoint (every step committed; a worker without a model has none to write).

With --combined it says it splits NodeWork (NodeUp.combined): each step's Work for both comes
as one NodeWork, and both workers' reports go up as one NodeStepDone of the first, naming the
second in `also`, with the samples and loss sums of both.

Before they attach, it sends the node session a heartbeat of a worker that never said Hello and
a Hello of a worker that never registered: each should end that worker's session alone. It
asserts nothing itself: it prints one JSON object (the steps each worker was given work for,
how each one's session ended, the codes of the two refusals, how many NodeDown messages carried
how many worker messages and NodeWorks) and the test that starts it decides.

Usage: node_client.py --proto-dir DIR --target HOST:PORT [--combined]
"""

import argparse
import json
import os
import queue
import sys

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import stubs  # noqa: E402  (python/stubs.py)

CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
TIMEOUT_S = 120


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--combined", action="store_true")
    args = ap.parse_args()
    pb, pb_grpc = stubs.generate(args.proto_dir)
    channel = grpc.insecure_channel(args.target)
    workers = pb_grpc.WorkersStub(channel)

    registered = [
        workers.Register(
            pb.RegisterRequest(
                name=f"python-node-rank-{i}",
                backend=pb.COLLECTIVE_BACKEND_TCP,
                collective_address=f"127.0.0.1:{6101 + i}",
            ),
            timeout=30,
        )
        for i in range(2)
    ]
    ids = [r.worker_id for r in registered]
    sources = [
        pb.SourceSize(name=s.name, num_tokens=1 << 30) for s in registered[0].job.sources
    ]

    up = queue.Queue()

    def requests():
        while True:
            item = up.get()
            if item is None:
                return
            yield item

    def message(worker_id, **kind):
        return pb.WorkerMessage(worker_id=worker_id, **kind)

    def step_done(work, samples):
        """The report of `samples` samples of `work`, with the numbers every rank agrees on."""
        return pb.StepDone(
            generation=work.generation,
            step=work.step,
            loss_sum=2.5 * samples,
            samples=samples,
            grad_norm=1.0,
            global_loss=2.5,
            state_digest=7,
        )

    downs = workers.NodeSession(requests(), timeout=TIMEOUT_S)
    up.put(
        pb.NodeUp(
            messages=[
                message("never-said-hello", heartbeat=pb.Heartbeat()),
                message("never-registered", hello=pb.Hello()),
            ]
        )
    )
    up.put(pb.NodeUp(messages=[message(i, hello=pb.Hello()) for i in ids], combined=args.combined))

    out = {
        "steps": {i: [] for i in ids},
        "ended": {},
        "refused": {},
        "down_messages": 0,
        "worker_messages": 0,
        "node_works": 0,
    }
    over = set()
    for down in downs:
        out["down_messages"] += 1
        replies = []
        for m in down.messages:
            out["worker_messages"] += 1
            if m.WhichOneof("kind") == "ended":
                where = "ended" if m.worker_id in ids else "refused"
                out[where][m.worker_id] = CODE_NAMES.get(m.ended.code, str(m.ended.code))
                over.add(m.worker_id)
                continue
            if m.WhichOneof("kind") == "work":
                # One step's Work for several workers: each gets its share of the samples, and
                # one report speaks for all of them.
                out["node_works"] += 1
                w = m.work.work
                for worker_id in m.work.workers:
                    out["steps"][worker_id].append(w.step)
                n = sum(m.work.samples)
                first, *also = m.work.workers
                done = step_done(w, n)
                replies.append(
                    message(first, node_step_done=pb.NodeStepDone(done=done, also=also))
                )
                continue
            c = m.message
            kind = c.WhichOneof("kind")
            if kind == "world":
                w = c.world
                step = w.restore.step if w.HasField("restore") else w.start_step
                replies.append(
                    message(
                        m.worker_id,
                        ready=pb.Ready(
                            generation=w.generation, sources=sources, step=step, state_digest=7
                        ),
                    )
                )
            elif kind == "work":
                w = c.work
                out["steps"][m.worker_id].append(w.step)
                n = len(w.samples)
                replies.append(
                    message(
                        m.worker_id,
                        step_done=step_done(w, n),
                    )
                )
            elif kind == "save_checkpoint":
                # The job's last checkpoint: every step is committed. A worker without a model
                # has nothing to write; the node session ends here.
                out["checkpoint_asked_at"] = c.save_checkpoint.step
                over.update(ids)
            elif kind == "stop" and c.stop.reason != pb.STOP_REASON_GENERATION_ENDED:
                out["ended"][m.worker_id] = pb.StopReason.Name(c.stop.reason)
                over.add(m.worker_id)
        if replies:
            up.put(pb.NodeUp(messages=replies, combined=args.combined))
        if all(i in over for i in ids):
            break
    up.put(None)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
