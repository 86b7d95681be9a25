#!/usr/bin/env python3
"""Prompt-processing and generation speed through llama.cpp's RPC client:
``rpcserver serve`` against llama.cpp's own RPC server, same model, same thread count.

    python bench/bench_rpc.py [--arch llama] [--ftype Q4_0] [--threads 2] [--prompt 64]
                              [--gen 32] [--reps 3] [--servers rpcserver,reference]

The model is a tiny random-weight GGUF made by ``tests/models.py`` (or ``--model PATH``).
Every layer is offloaded (n_gpu_layers=99) to the one RPC device, so the server does all
the layer math; the token embedding lookup stays on the client's CPU, as in llama.cpp.

The servers run one after the other (never at the same time, so they do not share the
cores): (a) ``python -m rpcserver.cli serve -t THREADS`` and (b) llama.cpp's
``ggml_backend_rpc_start_server`` on its CPU device with THREADS threads, started from
Python through ctypes in a subprocess. The client (llama-cpp-python) runs in a
subprocess too: ggml aborts the process when a server misbehaves.

Per repetition: clear the KV cache, evaluate PROMPT tokens as one batch (pp tok/s),
then GEN single tokens (tg tok/s). A warm-up pass (not counted) comes first. The
median and the best of the repetitions are reported, with the ratios rpcserver /
reference (on a busy machine the best is the steadier figure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


# ============================================================================ client side

def client(args) -> int:
    import numpy as np

    import llama_cpp
    from test_e2e_llamacpp import _register_rpc_servers

    if not args.verbose:
        # silence llama.cpp's log (the callback must outlive every call into llama.cpp)
        @llama_cpp.llama_log_callback
        def quiet(level, text, user_data):
            if level == 4 and text:  # GGML_LOG_LEVEL_ERROR
                sys.stderr.write(text.decode("utf-8", "replace"))

        client.quiet = quiet
        import ctypes
        llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))

    devices = _register_rpc_servers([args.endpoint])
    llm = llama_cpp.Llama(args.model, n_gpu_layers=99, n_ctx=max(256, args.prompt + args.gen + 8),
                          n_batch=512, n_ubatch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, flash_attn=args.flash_attn,
                          logits_all=False, verbose=args.verbose)
    rng = np.random.default_rng(0)
    n_vocab = llm.n_vocab()
    prompt = [1] + [int(t) for t in rng.integers(3, n_vocab, args.prompt - 1)]
    gen = [int(t) for t in rng.integers(3, n_vocab, args.gen)]

    def one_pass():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for tok in gen:
            llm.eval([tok])
        t2 = time.perf_counter()
        return args.prompt / (t1 - t0), args.gen / (t2 - t1)

    one_pass()  # warm-up: weight conversion caches, graph allocation, first-touch
    pp, tg = [], []
    for _ in range(args.reps):
        a, b = one_pass()
        pp.append(a)
        tg.append(b)
    llm.close()
    json.dump({"devices": devices, "pp": pp, "tg": tg}, sys.stdout)
    return 0


# ============================================================================ driver

def start_server(kind: str, threads: int, log: Path, device: str | None = None):
    import llamacpp as h

    port = h.free_port()
    if kind == "reference":
        proc = h.start_reference_server(port, threads=threads, log_path=log,
                                        env={"GGML_NO_BACKTRACE": "1"})
    else:
        extra = ["-t", str(threads)] + (["-d", device] if device else [])
        proc = h.start_rpcserver(port, extra_args=extra, log_path=log)
    return proc, f"127.0.0.1:{port}"


def run_one(kind: str, args, model: Path, workdir: Path) -> dict:
    import llamacpp as h

    log = workdir / f"{kind}.log"
    proc, endpoint = start_server(kind, args.threads, log, args.device)
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--client", "--endpoint", endpoint,
               "--model", str(model), "--threads", str(args.threads), "--prompt", str(args.prompt),
               "--gen", str(args.gen), "--reps", str(args.reps)]
        if args.flash_attn:
            cmd.append("--flash-attn")
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                           env=h.subprocess_env({"GGML_NO_BACKTRACE": "1"}), cwd=str(REPO))
        wall = time.perf_counter() - t0
    finally:
        h.stop(proc)
    if p.returncode != 0:
        server_tail = "\n".join(ln.rstrip() for ln in log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
        raise RuntimeError(f"{kind}: client exited with {p.returncode}\n{p.stderr[-3000:]}\n"
                           f"--- server log tail:\n{server_tail}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


def main(argv=None) -> int:
    import models

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama", choices=models.ARCHS)
    ap.add_argument("--ftype", default="Q4_0", choices=models.FTYPES)
    ap.add_argument("--model", help="use this GGUF instead of generating one")
    ap.add_argument("--layers", type=int, default=4, help="layers of the generated model")
    ap.add_argument("--embd", type=int, default=512, help="n_embd of the generated model")
    ap.add_argument("--ff", type=int, default=1536, help="n_ff of the generated model")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--device", help="rpcserver's devices (`serve -d`, e.g. CUDA0); the "
                                     "reference always serves llama.cpp's CPU device")
    ap.add_argument("--servers", default="rpcserver,reference",
                    help="comma-separated: rpcserver, reference")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--verbose", action="store_true")
    # client mode (internal)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        return client(args)

    with tempfile.TemporaryDirectory(prefix="bench-rpc-") as tmp:
        workdir = Path(tmp)
        if args.model:
            model = Path(args.model)
            label = model.name
        else:
            model = models.ModelCache(workdir).get(args.arch, args.ftype, n_layer=args.layers,
                                                   n_embd=args.embd, n_ff=args.ff)
            label = (f"{args.arch} {args.ftype} (n_embd {args.embd}, n_ff {args.ff}, "
                     f"{args.layers} layers, {model.stat().st_size / 2**20:.1f} MiB)")
        print(f"model: {label}; threads {args.threads}; prompt {args.prompt}, gen {args.gen}, "
              f"{args.reps} reps; flash_attn {'on' if args.flash_attn else 'off'}; rpcserver "
              f"device {args.device or 'default'}", flush=True)
        results = {}
        for kind in [k.strip() for k in args.servers.split(",") if k.strip()]:
            try:
                r = run_one(kind, args, model, workdir)
            except Exception as exc:  # noqa: BLE001  (report and go on with the other server)
                print(f"{kind:10s} FAILED: {exc}", flush=True)
                results[kind] = {"error": str(exc)}
                continue
            r["pp_median"] = statistics.median(r["pp"])
            r["tg_median"] = statistics.median(r["tg"])
            r["pp_best"], r["tg_best"] = max(r["pp"]), max(r["tg"])
            results[kind] = r
            print(f"{kind:10s} pp {r['pp_median']:9.1f} tok/s (best {r['pp_best']:9.1f})   "
                  f"tg {r['tg_median']:8.2f} tok/s (best {r['tg_best']:8.2f})", flush=True)
            if args.verbose:
                print(f"{'':10s} pp runs {', '.join(f'{x:.1f}' for x in r['pp'])}; "
                      f"tg runs {', '.join(f'{x:.2f}' for x in r['tg'])}")
        a, b = results.get("rpcserver", {}), results.get("reference", {})
        if "pp_median" in a and "pp_median" in b:
            print(f"ratio rpcserver/reference (median): pp {a['pp_median'] / b['pp_median']:.3f}   "
                  f"tg {a['tg_median'] / b['tg_median']:.3f}   "
                  f"(best: pp {a['pp_best'] / b['pp_best']:.3f}   tg {a['tg_best'] / b['tg_best']:.3f})")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                            if k not in ("client", "endpoint")},
                                                   "model": label, "results": results}, indent=1))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
