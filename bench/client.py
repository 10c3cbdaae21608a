"""A producer process: sends benchmark jobs for one system and prints what it measured as JSON.

    python -m bench.client SYSTEM enqueue-one|enqueue-bulk|enqueue-concurrent|paced --count N
        [--kind noop|cpu] [--rate R] [--senders S] [--probe 1]

The runner starts one per measurement, with the system's environment, so each starts cold and
nothing of one system's client library lingers in another's measurement. Connection setup is
done before the clock starts. With --probe 1 it also reports the operations its servers served
while it sent (bench.servers; the servers are named by BENCH_PROBE_SERVERS).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from bench.servers import Probes, ops_delta
from bench.systems import SYSTEMS, Producer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("action", choices=["enqueue-one", "enqueue-bulk", "enqueue-concurrent", "paced"])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--kind", default="noop", choices=["noop", "cpu"])
    parser.add_argument("--rate", type=float, default=200.0, help="jobs/s for `paced`")
    parser.add_argument("--senders", type=int, default=16, help="callers at once, enqueue-concurrent")
    parser.add_argument("--probe", type=int, default=0, help="1: count the servers' operations")
    args = parser.parse_args()

    producer = SYSTEMS[args.system].producer()
    producer.connect()
    if args.action == "enqueue-concurrent":
        producer.prepare_concurrent(args.senders)
    kinds = [k for k in os.environ.get("BENCH_PROBE_SERVERS", "").split(",") if k]
    probes = Probes(kinds) if args.probe and kinds else None
    if probes is not None and probes.counts_ops:
        time.sleep(probes.lag)  # let the server count what connecting did
        background = probes.background_rate()  # other clients of a shared server
        ops_before, ops_since = probes.ops(), time.monotonic()
    if probes is not None:
        requests_before = probes.requests([os.getpid()])
    out: dict[str, Any] = {"count": args.count}
    try:
        begin, cpu_begin = time.perf_counter(), time.process_time()
        if args.action == "enqueue-bulk":
            producer.send_bulk(args.kind, args.count)
        elif args.action == "enqueue-concurrent":
            producer.send_concurrent(args.kind, args.count, args.senders)
        elif args.action == "enqueue-one":
            for _ in range(args.count):
                producer.send_one(args.kind, 0.0)
        else:
            out["late_max_s"] = _paced(producer, args.kind, args.count, args.rate, begin)
        out["seconds"] = time.perf_counter() - begin
        out["cpu_s"] = time.process_time() - cpu_begin
        if probes is not None:  # before closing: a closed connection's count is gone
            out["requests"] = ops_delta(requests_before, probes.requests([os.getpid()]))
    finally:
        producer.close()
    if probes is not None and probes.counts_ops:
        time.sleep(probes.lag)
        out["ops"] = ops_delta(ops_before, probes.ops())
        out["ops_background"] = background * (time.monotonic() - ops_since)
    if probes is not None:
        probes.close()
    print(json.dumps(out))


def _paced(producer: Producer, kind: str, count: int, rate: float, begin: float) -> float:
    """Send at `rate` jobs/s, each stamped with its enqueue time; returns the worst lateness."""
    late = 0.0
    for i in range(count):
        due = begin + i / rate
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        else:
            late = max(late, now - due)
        producer.send_one(kind, time.time())
    return late


if __name__ == "__main__":
    main()
