#!/usr/bin/env python3
"""Where a graph's time goes, op by op: rpcserver in this process with a timer on every node,
driven by bench_rpc.py's llama.cpp client (same model options).

    python bench/profile_ops.py [--size tiny|160m|0.5b|1.7b] [--ftype F32] [--layers 12 --embd 768
                                --ff 2048] [--threads 2] [--prompt 64] [--gen 32] [--reps 2]

Prints, separately for decode graphs (every MUL_MAT has one activation column) and batch
graphs: per op, the node count per graph, the median microseconds per node and the share of
the graph's time; then the median graph time and the time between nodes (Python bookkeeping
outside the ops). Medians, so one-off costs (a kernel's first load in the warm-up pass) do
not count. The timer itself costs well under 1 us a node.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import bench_rpc  # noqa: E402
from rpcserver.ggml import Op  # noqa: E402


def _detail(node) -> str:
    """The op with its sources' types and shapes (ne), e.g. ``MUL_MAT F32[768,2048] F32[768,1]``."""
    parts = [Op(node.op).name]
    for s in node.src:
        if s is not None:
            ne = list(s.ref.tensor.ne)
            while len(ne) > 2 and ne[-1] == 1:
                ne.pop()
            parts.append(f"{s.ref.type.name}[{','.join(map(str, ne))}]")
    return " ".join(parts)


def instrument(detail: bool = False):
    """Wrap GraphPlan.run with per-step timers (keyed by op, or by op, types and shapes when
    ``detail``); returns the records dict."""
    from rpcserver import executor

    records = {"decode": defaultdict(list), "batch": defaultdict(list),
               "graphs": defaultdict(list)}

    def kind_of(plan) -> str:
        for _impl, ctx in plan.steps:
            if ctx.node.op == Op.MUL_MAT and ctx.node.src[1] is not None:
                if ctx.node.src[1].ref.tensor.ne[1] > 1:
                    return "batch"
        return "decode"

    def run(plan):
        entries = getattr(plan, "_profile_entries", None)
        if entries is None:  # each step's counter, looked up once per plan
            kind = plan._profile_kind = kind_of(plan)
            entries = plan._profile_entries = [
                records[kind][_detail(ctx.node) if detail else Op(ctx.node.op).name]
                for _impl, ctx in plan.steps]
        kind = plan._profile_kind
        clock = time.perf_counter
        g0 = clock()
        for (impl, ctx), entry in zip(plan.steps, entries):
            t0 = clock()
            impl(ctx)
            entry.append(clock() - t0)
        records["graphs"][kind].append(clock() - g0)

    executor.GraphPlan.run = run
    return records


def report(records) -> None:
    for kind in ("decode", "batch"):
        graphs = records["graphs"].get(kind)
        if not graphs:
            continue
        n_graphs, graph = len(graphs), statistics.median(graphs)
        rows = [(name, len(times) / n_graphs, statistics.median(times))
                for name, times in records[kind].items()]
        in_ops = sum(per_graph * t for _name, per_graph, t in rows)
        print(f"\n{kind} graphs: {n_graphs}, {1e3 * graph:.2f} ms each "
              f"({1e3 * max(0.0, graph - in_ops):.2f} ms between nodes)")
        width = max(16, *(len(name) for name, _n, _t in rows))
        print(f"  {'op':<{width}} {'nodes/graph':>11} {'us/node':>9} {'ms/graph':>9} {'share':>6}")
        for name, per_graph, t in sorted(rows, key=lambda r: -r[1] * r[2]):
            print(f"  {name:<{width}} {per_graph:>11.1f} {1e6 * t:>9.1f} "
                  f"{1e3 * per_graph * t:>9.2f} {100 * per_graph * t / graph:>5.1f}%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_rpc.add_model_args(ap, default_ftype="F32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--detail", action="store_true",
                    help="one line per op, source types and shapes (the ne of each source)")
    args = ap.parse_args(argv)

    from rpcserver.device import DeviceOptions
    from rpcserver.plugins import discover
    from rpcserver.server import Server

    records = instrument(args.detail)
    registry = discover(DeviceOptions(threads=args.threads))
    devices = [e.device for e in registry.devices if e.device.name.startswith("CPU")][:1]
    server = Server(devices, "127.0.0.1", 0)
    server.bind()
    server.start()
    with tempfile.TemporaryDirectory() as tmp:
        model, info = bench_rpc.resolve_model(args, Path(tmp))
        print(bench_rpc.describe(info))
        cmd = bench_rpc.client_command(server.endpoint, model, args.threads, args.prompt,
                                       args.gen, args.reps)
        p = subprocess.run(cmd, capture_output=True, text=True, env=bench_rpc.client_env())
    server.stop()
    if p.returncode != 0:
        print(p.stderr[-3000:])
        return 1
    print("client:", p.stdout.strip().splitlines()[-1][:300])
    report(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
