#!/usr/bin/env python3
"""Prompt-processing and generation speed, and peak server memory, through llama.cpp's RPC
client: ``rpcserver serve`` against llama.cpp's own RPC server, same model, same thread count.

    python bench/bench_rpc.py [--arch llama] [--ftype Q4_0] [--size tiny|160m|0.5b|1.7b]
                              [--threads 2] [--prompt 64] [--gen 32] [--reps 5] [--rounds 2]
                              [--servers rpcserver,reference] [--json out.json]

The model is a tiny random-weight GGUF made by ``tests/models.py`` (the default, ``--size
tiny``), a real-size random llama model made by ``bench/sized_models.py`` (``--size 1.7b``:
1.75B parameters, cached in ``~/.cache/rpcserver/models``), or ``--model PATH``. Every
layer is offloaded (n_gpu_layers=99) to the one RPC device, so the server does all the
layer math; the token embedding lookup stays on the client's CPU, as in llama.cpp.

The servers never run at the same time (they would share the cores): ROUNDS rounds, each
starting a fresh (a) ``python -m rpcserver.cli serve -t THREADS`` and then a fresh
(b) llama.cpp ``ggml_backend_rpc_start_server`` on its CPU device with THREADS threads
(started from Python through ctypes in a subprocess), so the two alternate. The client
(llama-cpp-python) runs in a subprocess too: ggml aborts the process when a server
misbehaves.

Per repetition: clear the KV cache, evaluate PROMPT tokens as one batch (pp tok/s), then
GEN single tokens (tg tok/s). A warm-up pass (not counted) comes first. A round's figure
is the median of its repetitions; a server's figure is the median of its rounds (and the
best single repetition of all rounds: on a busy machine the steadier figure). Just before
each server is stopped its peak resident memory (VmHWM) and current VmRSS are read from
/proc/PID/status. The ratios are rpcserver / reference.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TESTS = REPO / "tests"
for _p in (TESTS, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from sized_models import PRESETS  # noqa: E402

SIZES = ("tiny",) + tuple(PRESETS)  # "tiny": tests/models.py; the others: sized_models.PRESETS
TINY_DIMS = {"layers": 4, "embd": 512, "ff": 1536}

#: Markers the client writes to stderr with --progress (bench_kill_clients.py reads them).
MARK_CONNECTING, MARK_LOADED, MARK_DONE = "[bench] connecting", "[bench] loaded", "[bench] done"


# ============================================================================ client side

def client(args) -> int:
    import numpy as np

    import llama_cpp
    from test_e2e_llamacpp import _register_rpc_servers

    def mark(text):
        if args.progress:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    if not args.verbose:
        # silence llama.cpp's log (the callback must outlive every call into llama.cpp)
        @llama_cpp.llama_log_callback
        def quiet(level, text, user_data):
            if level == 4 and text:  # GGML_LOG_LEVEL_ERROR
                sys.stderr.write(text.decode("utf-8", "replace"))

        client.quiet = quiet
        import ctypes
        llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))

    mark(MARK_CONNECTING)
    devices = _register_rpc_servers([args.endpoint])
    llm = llama_cpp.Llama(args.model, n_gpu_layers=99, n_ctx=max(256, args.prompt + args.gen + 8),
                          n_batch=512, n_ubatch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, flash_attn=args.flash_attn,
                          logits_all=False, verbose=args.verbose)
    mark(MARK_LOADED)
    rng = np.random.default_rng(0)
    n_vocab = llm.n_vocab()
    prompt = [1] + [int(t) for t in rng.integers(3, n_vocab, args.prompt - 1)]
    gen = [int(t) for t in rng.integers(3, n_vocab, args.gen)]

    # llama_decode may return before the backends are done (the logits are only copied
    # out asynchronously), so every timed step ends with llama_synchronize: otherwise the
    # prompt's compute time would be billed to the first generated token.
    def sync():
        llama_cpp.llama_synchronize(llm._ctx.ctx)

    def one_pass():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        sync()
        t1 = time.perf_counter()
        for tok in gen:
            llm.eval([tok])
            sync()
        t2 = time.perf_counter()
        return args.prompt / (t1 - t0), args.gen / (t2 - t1)

    one_pass()  # warm-up: weight conversion caches, graph allocation, first-touch
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
    finite = bool(np.isfinite(logits).all())
    logits_std = float(np.std(logits)) if finite else None  # last token of the warm-up pass
    pp, tg = [], []
    for _ in range(args.reps):
        a, b = one_pass()
        pp.append(a)
        tg.append(b)
    llm.close()
    mark(MARK_DONE)
    json.dump({"devices": devices, "pp": pp, "tg": tg, "finite_logits": finite,
               "logits_std": logits_std}, sys.stdout)
    return 0


def client_command(endpoint: str, model: Path, threads: int, prompt: int, gen: int, reps: int,
                   flash_attn: bool = False, progress: bool = False) -> list[str]:
    """The command line of one client process (this file in client mode)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client", "--endpoint", endpoint,
           "--model", str(model), "--threads", str(threads), "--prompt", str(prompt),
           "--gen", str(gen), "--reps", str(reps)]
    if flash_attn:
        cmd.append("--flash-attn")
    if progress:
        cmd.append("--progress")
    return cmd


def client_env() -> dict:
    import llamacpp as h

    return h.subprocess_env({"GGML_NO_BACKTRACE": "1"})


# ============================================================================ memory

def proc_memory(pid: int) -> dict | None:
    """VmHWM (peak resident) and VmRSS of a live process, in KiB; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out["peak_rss_kib" if key == "VmHWM" else "rss_kib"] = int(value.split()[0])
    return out or None


def gib(kib: float | None) -> str:
    return "    n/a" if kib is None else f"{kib / 2**20:7.3f}"


# ============================================================================ model

def add_model_args(ap: argparse.ArgumentParser, default_ftype: str = "Q4_0") -> None:
    import models

    ap.add_argument("--model", help="use this GGUF instead of generating one")
    ap.add_argument("--size", default="tiny", choices=SIZES,
                    help="tiny: tests/models.py's small model (--layers/--embd/--ff); 160m, 0.5b, 1.7b: "
                         "a real-size random llama model (bench/sized_models.py), cached")
    ap.add_argument("--arch", default="llama", choices=models.ARCHS,
                    help="architecture of a tiny model (the sized ones are llama)")
    ap.add_argument("--ftype", default=default_ftype, choices=models.FTYPES)
    ap.add_argument("--layers", type=int, help="layers of the generated model "
                                               f"(tiny: {TINY_DIMS['layers']}; else the preset's)")
    ap.add_argument("--embd", type=int, help=f"n_embd of the generated model (tiny: {TINY_DIMS['embd']})")
    ap.add_argument("--ff", type=int, help=f"n_ff of the generated model (tiny: {TINY_DIMS['ff']})")
    ap.add_argument("--cache-dir", type=Path,
                    help="where sized models are cached (default $RPCSERVER_MODEL_CACHE, "
                         "else ~/.cache/rpcserver/models)")


def resolve_model(args, workdir: Path) -> tuple[Path, dict]:
    """The model file the arguments ask for, made if needed, and a description of it."""
    import models
    import sized_models

    if args.model:
        path = Path(args.model)
        info = {"label": path.name}
    elif args.size == "tiny":
        dims = {k: getattr(args, k) if getattr(args, k) is not None else v
                for k, v in TINY_DIMS.items()}
        path = models.ModelCache(workdir).get(args.arch, args.ftype, n_layer=dims["layers"],
                                              n_embd=dims["embd"], n_ff=dims["ff"])
        info = {"label": f"{args.arch} {args.ftype} tiny (n_embd {dims['embd']}, n_ff {dims['ff']}, "
                         f"{dims['layers']} layers)", "size": "tiny", "dims": dims}
    else:
        if args.arch != "llama":
            raise SystemExit(f"--size {args.size} makes a llama model; --arch {args.arch} is "
                             f"only for --size tiny")
        d = sized_models.dims_for(args.size, n_layer=args.layers, n_embd=args.embd, n_ff=args.ff)
        path = sized_models.get(d, args.ftype, args.size, args.cache_dir,
                                threads=os.cpu_count() or 2,
                                log=lambda m: print(m, flush=True))
        from dataclasses import asdict
        info = {"label": f"llama {args.ftype} {args.size} (n_embd {d.n_embd}, n_ff {d.n_ff}, "
                         f"{d.n_layer} layers, {d.n_head}/{d.n_head_kv} heads, vocab {d.n_vocab})",
                "size": args.size, "dims": asdict(d)}
    info["path"] = str(path)
    info["bytes"] = path.stat().st_size
    info["params"] = sized_models.gguf_param_count(path)
    return path, info


def describe(info: dict) -> str:
    return (f"{info['label']}: {info['params'] / 1e9:.3f}B params, "
            f"{info['bytes'] / 2**20:.1f} MiB; {info['path']}")


# ============================================================================ driver

def start_server(kind: str, threads: int, log: Path, device: str | None = None):
    import llamacpp as h

    port = h.free_port()
    if kind == "reference":
        proc = h.start_reference_server(port, threads=threads, log_path=log,
                                        env={"GGML_NO_BACKTRACE": "1"})
    elif kind == "rpcserver":
        extra = ["-t", str(threads)] + (["-d", device] if device else [])
        proc = h.start_rpcserver(port, extra_args=extra, log_path=log)
    else:
        raise ValueError(f"unknown server {kind!r} (rpcserver, reference)")
    return proc, f"127.0.0.1:{port}"


def log_tail(log: Path, n: int = 15) -> str:
    if not log.exists():
        return ""
    return "\n".join(ln.rstrip() for ln in log.read_text(errors="replace").splitlines()[-n:])


def run_one(kind: str, args, model: Path, workdir: Path, tag: str = "") -> dict:
    """One fresh server, one client process; the result, with the server's memory.

    Never raises for a failing client or server: the result then has an "error".
    """
    import llamacpp as h

    log = workdir / f"{kind}{tag}.log"
    res: dict = {"server": kind}
    try:
        proc, endpoint = start_server(kind, args.threads, log, args.device)
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"{kind}: the server did not start: {exc}\n--- server log tail:\n{log_tail(log)}"
        return res
    res["pid"] = proc.pid
    try:
        cmd = client_command(endpoint, model, args.threads, args.prompt, args.gen, args.reps,
                             args.flash_attn)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                               env=client_env(), cwd=str(REPO))
        except subprocess.TimeoutExpired:
            p = None
        res["wall_s"] = time.perf_counter() - t0
        res["memory"] = proc_memory(proc.pid)  # just before the server is stopped
        res["server_alive"] = proc.poll() is None
    finally:
        h.stop(proc)
    if p is None:
        res["error"] = f"{kind}: the client took more than --timeout {args.timeout:.0f}s"
    elif p.returncode != 0:
        res["error"] = (f"{kind}: client exited with {p.returncode}\n{p.stderr[-3000:]}\n"
                        f"--- server log tail:\n{log_tail(log)}")
    else:
        res.update(json.loads(p.stdout.strip().splitlines()[-1]))
        if res["pp"]:
            res["pp_median"] = statistics.median(res["pp"])
            res["tg_median"] = statistics.median(res["tg"])
    return res


def summarize(runs: list[dict]) -> dict:
    """A server's figures over its rounds: medians of the round medians, best repetition,
    median and maximum of the peak RSS."""
    ok = [r for r in runs if "pp_median" in r]
    mems = [r["memory"] for r in runs if r.get("memory")]
    s: dict = {"rounds": len(runs), "rounds_ok": len(ok)}
    if ok:
        s["pp_median"] = statistics.median(r["pp_median"] for r in ok)
        s["tg_median"] = statistics.median(r["tg_median"] for r in ok)
        s["pp_best"] = max(x for r in ok for x in r["pp"])
        s["tg_best"] = max(x for r in ok for x in r["tg"])
        s["finite_logits"] = all(r.get("finite_logits", True) for r in ok)
    if mems:
        s["peak_rss_kib"] = statistics.median(m["peak_rss_kib"] for m in mems)
        s["peak_rss_kib_max"] = max(m["peak_rss_kib"] for m in mems)
        s["rss_kib"] = statistics.median(m["rss_kib"] for m in mems)
    return s


def ratios(a: dict, b: dict) -> dict:
    out = {}
    for key in ("pp_median", "tg_median", "pp_best", "tg_best", "peak_rss_kib", "rss_kib"):
        if a.get(key) and b.get(key):
            out[key] = a[key] / b[key]
    return out


def print_table(summary: dict, rat: dict) -> None:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "n/a".rjust(len(format(0.0, fmt)))

    print()
    print(f"{'':16s} {'pp tok/s':>10s} {'(best)':>10s} {'tg tok/s':>10s} {'(best)':>9s} "
          f"{'peak RSS GiB':>13s} {'RSS GiB':>8s}  rounds")
    for kind, s in summary.items():
        print(f"{kind:16s} {f(s.get('pp_median'), '10.1f')} {f(s.get('pp_best'), '10.1f')} "
              f"{f(s.get('tg_median'), '10.2f')} {f(s.get('tg_best'), '9.2f')} "
              f"{f(s['peak_rss_kib'] / 2**20 if 'peak_rss_kib' in s else None, '13.3f')} "
              f"{f(s['rss_kib'] / 2**20 if 'rss_kib' in s else None, '8.3f')}  "
              f"{s['rounds_ok']}/{s['rounds']}")
    if rat:
        print(f"{'rpcserver/ref':16s} {f(rat.get('pp_median'), '10.3f')} {f(rat.get('pp_best'), '10.3f')} "
              f"{f(rat.get('tg_median'), '10.3f')} {f(rat.get('tg_best'), '9.3f')} "
              f"{f(rat.get('peak_rss_kib'), '13.3f')} {f(rat.get('rss_kib'), '8.3f')}")
    print("(tok/s: median over rounds of each round's median repetition; best: the best single "
          "repetition; peak RSS: the server process's VmHWM, RSS: its VmRSS once the client had "
          "left; both medians over rounds)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per client (round)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds; each starts every server afresh, alternating them")
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--device", help="rpcserver's devices (`serve -d`, e.g. CUDA0); the "
                                     "reference always serves llama.cpp's CPU device")
    ap.add_argument("--servers", default="rpcserver,reference",
                    help="comma-separated: rpcserver, reference")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per client process")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--verbose", action="store_true")
    # client mode (internal)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        return client(args)
    if args.reps < 1 or args.rounds < 1:
        ap.error("--reps and --rounds must be at least 1")
    servers = [k.strip() for k in args.servers.split(",") if k.strip()]
    for k in servers:
        if k not in ("rpcserver", "reference"):
            ap.error(f"unknown server {k!r} in --servers (rpcserver, reference)")

    with tempfile.TemporaryDirectory(prefix="bench-rpc-") as tmp:
        workdir = Path(tmp)
        model, info = resolve_model(args, workdir)
        print(f"model: {describe(info)}", flush=True)
        print(f"threads {args.threads}; prompt {args.prompt}, gen {args.gen}, {args.reps} reps x "
              f"{args.rounds} rounds; flash_attn {'on' if args.flash_attn else 'off'}; rpcserver "
              f"device {args.device or 'default'}", flush=True)
        runs: list[dict] = []
        for rnd in range(1, args.rounds + 1):
            for kind in servers:
                r = run_one(kind, args, model, workdir, tag=f"-round{rnd}")
                r["round"] = rnd
                runs.append(r)
                m = r.get("memory") or {}
                mem = f"peak RSS {gib(m.get('peak_rss_kib'))} GiB (now {gib(m.get('rss_kib')).strip()} GiB)"
                head = f"round {rnd}/{args.rounds} {kind:10s}"
                if "error" in r:
                    print(f"{head} FAILED ({mem}): {r['error']}", flush=True)
                    continue
                print(f"{head} pp {r['pp_median']:9.1f} tok/s   tg {r['tg_median']:8.2f} tok/s   "
                      f"{mem}   [{r['wall_s']:.0f}s]"
                      + ("" if r.get("finite_logits", True) else "   NON-FINITE LOGITS"), flush=True)
                if args.verbose:
                    print(f"{'':20s} pp runs {', '.join(f'{x:.1f}' for x in r['pp'])}; "
                          f"tg runs {', '.join(f'{x:.2f}' for x in r['tg'])}")
        summary = {k: summarize([r for r in runs if r["server"] == k]) for k in servers}
        rat = ratios(summary.get("rpcserver", {}), summary.get("reference", {}))
        print_table(summary, rat)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                          if k not in ("client", "endpoint", "progress")},
                 "model": info, "runs": runs, "summary": summary,
                 "ratios_rpcserver_over_reference": rat}, indent=1))
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
