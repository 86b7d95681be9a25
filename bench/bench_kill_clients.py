#!/usr/bin/env python3
"""Does a server leak memory when its clients die? 24 llama.cpp clients SIGKILLed at random
moments, and the server's resident memory before and after.

    python bench/bench_kill_clients.py [--servers rpcserver[,reference]] [--clients 24]
        [--threads 2] [--prompt 32] [--gen 16] [--seed 0] [--limit-mib 64]
        [--model FILE.gguf | --size tiny|160m|0.5b|1.7b --ftype Q4_0 ...] [--json out.json]

Per server (one at a time, each a fresh process started as bench_rpc.py starts it):

1. warm-up: one complete client pass (bench_rpc.py's client in a subprocess: every layer
   offloaded to the server through llama.cpp's RPC client, a PROMPT-token batch, then GEN
   single tokens), timed from the moment the client starts connecting (after its Python
   imports) to its end: D in all, of which L loading (weight upload, KV and compute
   buffers) before the first token;
2. the server's connections are waited for to close (every non-listening socket of the
   server process gone, at most --settle-timeout), then --settle seconds more; its VmRSS
   (/proc/PID/status) is the baseline;
3. CLIENTS clients, one after another, each SIGKILLed a random delay after it starts
   connecting: alternately uniform in [0, L) (during the weight upload) and in [L, D)
   (during generation), so both phases are hit whatever their share of D; a client that
   ends before its delay counts as "finished";
4. the server is given time to notice the disconnects (as in step 2), and its VmRSS
   again: the growth over the baseline, in MiB, is compared with --limit-mib;
5. a last complete client pass checks that the server still serves (informational).

Every process started here is stopped on the way out, errors and Ctrl-C included, and the
run is bounded by --deadline (seconds, all servers together) plus per-client timeouts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_rpc as br  # noqa: E402  (bench/bench_rpc.py; puts tests/ on sys.path too)

_LIVE: list[subprocess.Popen] = []  # every process started here and not yet reaped


# ============================================================================ processes

class Client:
    """One bench_rpc.py client process; its stderr markers are timestamped as they arrive."""

    def __init__(self, args, endpoint: str, model: Path, stdout: Path):
        cmd = br.client_command(endpoint, model, args.threads, args.prompt, args.gen, 0,
                                args.flash_attn, progress=True)
        self.t_start = time.monotonic()
        with open(stdout, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True,
                                         errors="replace", env=br.client_env(), cwd=str(br.REPO))
        _LIVE.append(self.proc)
        self.stdout = stdout
        self.marks: dict[str, float] = {}
        self.tail: deque[str] = deque(maxlen=40)
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            now = time.monotonic()
            line = line.rstrip("\n")
            with self._cv:
                if line in (br.MARK_CONNECTING, br.MARK_LOADED, br.MARK_DONE):
                    self.marks.setdefault(line, now)
                else:
                    self.tail.append(line)
                self._cv.notify_all()
        with self._cv:
            self.marks.setdefault("eof", time.monotonic())
            self._cv.notify_all()

    def wait_mark(self, mark: str, timeout: float) -> bool:
        """True once ``mark`` was seen; False when the client ended or the time ran out first."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while mark not in self.marks and "eof" not in self.marks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return mark in self.marks

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float = 30) -> int | None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.wait(timeout)
        self._reader.join(5)
        if self.proc in _LIVE:
            _LIVE.remove(self.proc)
        return rc

    def phase(self) -> str:
        """Where the client was: connecting, upload (loading), generation, finished."""
        with self._cv:
            m = dict(self.marks)
        if br.MARK_DONE in m:
            return "finished"
        if br.MARK_LOADED in m:
            return "generation"
        if br.MARK_CONNECTING in m:
            return "upload"
        return "startup"


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def open_connections(pid: int) -> int:
    """TCP sockets of ``pid`` in any state but LISTEN (ESTABLISHED, CLOSE_WAIT, ...)."""
    inodes = _socket_inodes(pid)
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[9] in inodes and f[3] != "0A":  # 0A: TCP_LISTEN
                n += 1
    return n


def settle(pid: int, args) -> dict:
    """Wait for the server to close its client connections, then --settle seconds more."""
    t0 = time.monotonic()
    n = open_connections(pid)
    while n and time.monotonic() - t0 < args.settle_timeout:
        time.sleep(0.1)
        n = open_connections(pid)
    time.sleep(args.settle)
    return {"waited_s": round(time.monotonic() - t0, 2), "open_connections": open_connections(pid)}


def rss_mib(pid: int) -> float | None:
    m = br.proc_memory(pid)
    return None if m is None else m["rss_kib"] / 1024


# ============================================================================ one server

def full_pass(args, endpoint: str, model: Path, workdir: Path, name: str) -> dict:
    c = Client(args, endpoint, model, workdir / f"{name}.out")
    rc = c.wait(args.timeout)
    res = {"rc": rc, "marks": {k: round(v - c.t_start, 3) for k, v in c.marks.items()}}
    if rc != 0 or br.MARK_DONE not in c.marks:
        res["error"] = f"client exited with {rc}:\n" + "\n".join(list(c.tail)[-15:])
        return res
    t_conn = c.marks[br.MARK_CONNECTING]
    res["load_s"] = c.marks[br.MARK_LOADED] - t_conn
    res["total_s"] = c.marks[br.MARK_DONE] - t_conn
    try:
        res.update(json.loads(c.stdout.read_text().strip().splitlines()[-1]))
    except (OSError, ValueError, IndexError):
        pass
    return res


def run_server(kind: str, args, model: Path, workdir: Path, deadline: float) -> dict:
    import llamacpp as h

    rng = random.Random(f"{args.seed}:{kind}")
    log = workdir / f"{kind}.log"
    res: dict = {"server": kind, "clients": []}
    proc, endpoint = br.start_server(kind, args.threads, log, args.device)
    _LIVE.append(proc)
    res["pid"] = proc.pid
    try:
        warm = full_pass(args, endpoint, model, workdir, f"{kind}-warmup")
        res["warmup"] = warm
        if "error" in warm:
            raise RuntimeError(f"the warm-up pass failed: {warm['error']}")
        L, D = warm["load_s"], warm["total_s"]
        print(f"{kind}: warm-up pass {D:.2f}s from connecting (loading {L:.2f}s, generation "
              f"{D - L:.2f}s)", flush=True)
        res["settle_before"] = settle(proc.pid, args)
        res["rss_before_mib"] = rss_mib(proc.pid)
        print(f"{kind}: VmRSS after the warm-up {res['rss_before_mib']:.1f} MiB", flush=True)

        for i in range(args.clients):
            if time.monotonic() > deadline:
                res["stopped_early"] = f"--deadline reached after {i} clients"
                print(f"{kind}: {res['stopped_early']}", flush=True)
                break
            target = "upload" if i % 2 == 0 else "generation"
            delay = rng.uniform(0, L) if target == "upload" else rng.uniform(L, D)
            c = Client(args, endpoint, model, workdir / f"{kind}-client{i}.out")
            entry = {"i": i + 1, "target": target, "delay_s": round(delay, 3)}
            try:
                if not c.wait_mark(br.MARK_CONNECTING, 120):
                    entry["error"] = "the client never started connecting:\n" + "\n".join(c.tail)
                else:
                    try:
                        c.proc.wait(max(0.0, c.marks[br.MARK_CONNECTING] + delay - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                    entry["phase"] = c.phase()  # read before the kill
                    c.kill()
            finally:
                c.kill()
                entry["rc"] = c.wait()
            if entry.get("phase") == "finished" or entry["rc"] == 0:
                entry["phase"] = "finished"
            res["clients"].append(entry)
            alive = proc.poll() is None
            print(f"{kind}: client {i + 1:2d}/{args.clients} killed {delay:6.3f}s after connecting "
                  f"(aimed at {target:10s}): {entry.get('phase', 'error'):10s} rc {entry['rc']}"
                  + ("" if alive else "   THE SERVER EXITED"), flush=True)
            if not alive:
                raise RuntimeError(f"the server exited with status {proc.returncode}\n"
                                   f"--- server log tail:\n{br.log_tail(log)}")

        res["settle_after"] = settle(proc.pid, args)
        res["rss_after_mib"] = rss_mib(proc.pid)
        res["growth_mib"] = res["rss_after_mib"] - res["rss_before_mib"]
        res["below_limit"] = res["growth_mib"] < args.limit_mib
        if args.check:
            final = full_pass(args, endpoint, model, workdir, f"{kind}-final")
            res["final_pass_ok"] = "error" not in final
            res["final_pass"] = final
            res["rss_after_final_mib"] = rss_mib(proc.pid)
        mem = br.proc_memory(proc.pid) or {}
        res["peak_rss_mib"] = mem.get("peak_rss_kib", 0) / 1024 or None
    except Exception as exc:  # noqa: BLE001  (reported; the other servers still run)
        res["error"] = f"{exc}\n--- server log tail:\n{br.log_tail(log)}"
    finally:
        h.stop(proc)
        if proc in _LIVE:
            _LIVE.remove(proc)
    return res


def report(r: dict, args) -> str:
    kind = r["server"]
    if "growth_mib" not in r:
        return f"{kind:10s} FAILED: {r.get('error', 'no result')}"
    phases = [c.get("phase", "error") for c in r["clients"]]
    counts = ", ".join(f"{phases.count(p)} {p}" for p in ("upload", "generation", "finished",
                                                           "startup", "error") if p in phases)
    delays = [c["delay_s"] for c in r["clients"]]
    out = (f"{kind:10s} VmRSS {r['rss_before_mib']:8.1f} MiB after the warm-up -> "
           f"{r['rss_after_mib']:8.1f} MiB after {len(r['clients'])} killed clients: "
           f"{r['growth_mib']:+.1f} MiB, {'below' if r['below_limit'] else 'NOT below'} "
           f"{args.limit_mib:g} MiB ({'PASS' if r['below_limit'] else 'FAIL'})\n"
           f"{'':10s} kills: {counts}; delays {min(delays):.3f}..{max(delays):.3f}s "
           f"(median {statistics.median(delays):.3f}s); peak RSS {r['peak_rss_mib']:.1f} MiB")
    if r["settle_after"]["open_connections"]:
        out += f"\n{'':10s} {r['settle_after']['open_connections']} client connections still open"
    if "final_pass_ok" in r:
        out += (f"\n{'':10s} a last full client pass "
                + ("succeeded" if r["final_pass_ok"] else "FAILED: " + r["final_pass"]["error"])
                + (f" (VmRSS then {r['rss_after_final_mib']:.1f} MiB)" if r["rss_after_final_mib"] else ""))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    br.add_model_args(ap)
    ap.add_argument("--servers", default="rpcserver", help="comma-separated: rpcserver, reference")
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--device", help="rpcserver's devices (`serve -d`)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-mib", type=float, default=64.0)
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds to wait after the server has closed its connections")
    ap.add_argument("--settle-timeout", type=float, default=30.0,
                    help="longest wait for the server to close its connections")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the last full client pass")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for a full client pass")
    ap.add_argument("--deadline", type=float, default=1800,
                    help="no new client after this many seconds (all servers together)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    servers = [k.strip() for k in args.servers.split(",") if k.strip()]
    for k in servers:
        if k not in ("rpcserver", "reference"):
            ap.error(f"unknown server {k!r} in --servers (rpcserver, reference)")
    deadline = time.monotonic() + args.deadline

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-kill-") as tmp:
            workdir = Path(tmp)
            model, info = br.resolve_model(args, workdir)
            print(f"model: {br.describe(info)}", flush=True)
            print(f"threads {args.threads}; prompt {args.prompt}, gen {args.gen}; {args.clients} "
                  f"clients; seed {args.seed}", flush=True)
            for kind in servers:
                results.append(run_server(kind, args, model, workdir, deadline))
            print()
            for r in results:
                print(report(r, args))
            if args.json:
                Path(args.json).write_text(json.dumps(
                    {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "model": info, "results": results}, indent=1))
    except KeyboardInterrupt:
        print("interrupted: stopping the processes started here", file=sys.stderr)
        return 130
    finally:
        for p in list(_LIVE):  # only what this script started
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
    return 0 if results and all(r.get("below_limit") and r.get("final_pass_ok", True)
                                for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
