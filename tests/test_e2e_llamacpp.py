"""End to end: real llama.cpp models offloaded to ``rpcserver serve`` give the CPU's logits.

Each case makes a tiny random-weight GGUF model (``models.py``: real architecture
metadata and tensor names, tiny dims), starts ``rpcserver serve`` in a subprocess and
runs THIS FILE as a script in another subprocess (llama.cpp aborts the whole process
when a server misbehaves, so the RPC client never runs inside pytest). The script:

1. loads the model on the local CPU only (no RPC device registered yet), evaluates a
   >= 32-token prompt as one batch, then >= 16 single tokens chosen greedily from the
   CPU's own logits, keeping the logits of every step;
2. for a non-F32 model, does the same on the CPU with the model's "F32 twin" (its
   weights dequantized, same values) and the same tokens: ggml's exact-f32 answer;
3. registers the RPC server(s) (``ggml_backend_rpc_add_server`` + ``ggml_backend_register``,
   as llama.cpp's ``--rpc`` does), loads the model again with every layer offloaded
   (``n_gpu_layers=99``) and feeds the SAME tokens;
4. writes, as JSON, per step: max |a-b| and the normalised MSE of the RPC logits
   against the CPU logits (and against the twin's), plus llama.cpp's log lines about
   where the layers went. The tolerances are explained above EXACT_NMSE.

A command-counting proxy between client and server (``llamacpp.CommandCounter``) proves
that the graphs really were computed by our server (GRAPH_COMPUTE count).

When a case fails, the failure message carries the server's warnings/errors (e.g. the
"op not implemented" line, with op, types and shapes) and the client's last lines.

Devices: every case runs against ``rpcserver serve`` on its default device (the CPU
plugin's ``CPU``), and representative subsets against ``rpcserver serve -d MLX-CPU`` (the
Metal plugin's MLX device on the CPU, ``MLX_CASES``) and ``-d CUDA-host`` (the CUDA plugin
with its kernels compiled for the host, ``CUDA_HOST_CASES``; tests/cuda_host_plugin.py):
one test definition, parametrized over (device, case). ``test_split_devices_of_one_server``
serves ``-d CPU,MLX-CPU`` and ``-d CUDA-host,CPU`` from ONE server: llama.cpp sees two RPC
devices on one endpoint and splits the layers.

Run:  pytest -q tests/test_e2e_llamacpp.py -x        (RPCSERVER_TEST_FROM_SOURCE=1 to serve
      from this checkout's core/ instead of the installed rpcserver; E2E_SERVER=reference
      to run the same matrix against llama.cpp's own RPC server, which matches exactly)
By hand:  python tests/test_e2e_llamacpp.py --model M.gguf --rpc 127.0.0.1:50052
          [--flash-attn] [--f32-twin M-dequant-f32.gguf] [--out result.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

N_PROMPT = 32   # tokens evaluated as one batch (>= 32: the CPU backend's "large batch" paths)
N_GEN = 16      # single-token decode steps after the prompt
N_CTX = 256
THREADS = 2


# ============================================================================ the client
# (runs in a subprocess: `python test_e2e_llamacpp.py --model ... --rpc ...`)

def _libggml_path() -> str:
    """The libggml that libllama is linked against (already loaded by ``import llama_cpp``).

    The wheel ships libggml.so and libggml.so.0 as two separate FILES: loading the wrong
    one gives a second, empty backend registry that libllama never sees.
    """
    import llama_cpp

    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith("libggml.so"):
                    return path
    except OSError:
        pass
    libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
    for name in ("libggml.so.0", "libggml.so", "libggml.dylib", "ggml.dll"):
        if (libdir / name).exists():
            return str(libdir / name)
    raise SystemExit(f"no libggml in {libdir}")


def _register_rpc_servers(endpoints: list[str]) -> list[str]:
    """Register RPC servers with ggml, as llama.cpp's --rpc does; returns the device names."""
    import ctypes

    ggml = ctypes.CDLL(_libggml_path(), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_register.restype = None
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    rpc = ggml.ggml_backend_reg_by_name(b"RPC")
    if not rpc:
        raise SystemExit("llama.cpp has no RPC backend (built without -DGGML_RPC=ON)")
    add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(
        ggml.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server"))
    names = []
    for ep in endpoints:
        reg = add(ep.encode())
        if not reg:
            raise SystemExit(f"ggml_backend_rpc_add_server({ep}) failed")
        ggml.ggml_backend_register(reg)
        names += [ggml.ggml_backend_dev_name(ggml.ggml_backend_reg_dev_get(reg, i)).decode()
                  for i in range(ggml.ggml_backend_reg_dev_count(reg))]
    return names


class _LogCapture:
    """llama.cpp's log lines (llama_log_set also routes ggml's), kept per phase."""

    def __init__(self):
        import ctypes

        import llama_cpp

        self.lines: list[str] = []
        self._partial = ""
        self._level = 2

        @llama_cpp.llama_log_callback
        def cb(level, text, user_data):
            s = self._partial + (text.decode("utf-8", "replace") if text else "")
            *done, self._partial = s.split("\n")
            self.lines.extend(done)
            if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line's level
                self._level = level
            if self._level >= 3 and text:  # WARN (3) and ERROR (4) also go to stderr, for failures
                sys.stderr.write(text.decode("utf-8", "replace"))

        self._cb = cb  # keep a reference: ggml calls it until the process exits
        llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


def _run(model: str, tokens: list[int] | None, n_prompt: int, n_gen: int, *, n_gpu_layers: int,
         flash_attn: bool, tensor_split, seed: int):
    """Evaluate the prompt then n_gen single tokens; returns (tokens, [logits per step]).

    With ``tokens`` None, the prompt is random and each next token is the argmax of this
    run's own logits; otherwise exactly ``tokens`` are fed.
    """
    import numpy as np

    import llama_cpp

    # No "extra" CPU buffer types (the weight repacking of Q4_0/Q4_K/IQ4_NL for the local
    # CPU): the local run then uses the same kernels as a ggml RPC server's plain CPU
    # buffers, and llama.cpp's own RPC server matches it exactly (NMSE 0).
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_extra_bufts():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = no_extra_bufts
    try:
        llm = llama_cpp.Llama(model, n_gpu_layers=n_gpu_layers, n_ctx=N_CTX, n_batch=512,
                              n_ubatch=512, n_threads=THREADS, n_threads_batch=THREADS,
                              logits_all=True, flash_attn=flash_attn, tensor_split=tensor_split,
                              seed=seed, verbose=True)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults
    try:
        n_vocab = llm.n_vocab()
        if tokens is None:
            rng = np.random.default_rng(seed)
            prompt = [1] + [int(t) for t in rng.integers(3, n_vocab, n_prompt - 1)]
        else:
            prompt = tokens[:n_prompt]
        steps = []
        llm.eval(prompt)
        steps.append(np.array(llm.scores[:n_prompt], dtype=np.float32))
        fed = list(prompt)
        for i in range(n_gen):
            nxt = int(np.argmax(steps[-1][-1])) if tokens is None else tokens[n_prompt + i]
            fed.append(nxt)
            llm.eval([nxt])
            steps.append(np.array(llm.scores[llm.n_tokens - 1: llm.n_tokens], dtype=np.float32))
        return fed, steps
    finally:
        llm.close()


def _compare(ref, got) -> dict:
    import numpy as np

    d = got.astype(np.float64) - ref.astype(np.float64)
    centred = ref.astype(np.float64) - ref.mean(axis=-1, keepdims=True)
    return {
        "rows": int(ref.shape[0]),
        "max_abs": float(np.abs(d).max()),
        # normalised MSE: squared error over the reference's variance (per vocab row, pooled)
        "nmse": float((d * d).sum() / max((centred * centred).sum(), 1e-30)),
        "argmax_agree": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "ref_absmax": float(np.abs(ref).max()),
    }


def client_main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="CPU-only vs RPC-offloaded logits of one model")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rpc", required=True, help="comma-separated host:port endpoints")
    ap.add_argument("--out", help="write the JSON result here (default: stdout)")
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--n-gpu-layers", type=int, default=99)
    ap.add_argument("--tensor-split", default=None, help="e.g. 1,1 (one weight per RPC device)")
    ap.add_argument("--prompt", type=int, default=N_PROMPT)
    ap.add_argument("--gen", type=int, default=N_GEN)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--f32-twin", help="the model's dequantized F32 twin: also compare with "
                                       "ggml's CPU computing it (exact f32 with the same weights)")
    args = ap.parse_args(argv)

    logs = _LogCapture()
    kw = dict(flash_attn=args.flash_attn, seed=args.seed)
    t0 = time.perf_counter()
    tokens, ref = _run(args.model, None, args.prompt, args.gen, n_gpu_layers=0, tensor_split=None,
                       **kw)
    t_cpu = time.perf_counter() - t0
    cpu_log = logs.take()
    ref32 = None
    if args.f32_twin:
        _, ref32 = _run(args.f32_twin, tokens, args.prompt, args.gen, n_gpu_layers=0,
                        tensor_split=None, **kw)
        logs.take()

    devices = _register_rpc_servers(args.rpc.split(","))
    split = [float(x) for x in args.tensor_split.split(",")] if args.tensor_split else None
    print(f"[client] RPC devices: {devices}; running offloaded", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    _, got = _run(args.model, tokens, args.prompt, args.gen, n_gpu_layers=args.n_gpu_layers,
                  tensor_split=split, **kw)
    t_rpc = time.perf_counter() - t0
    rpc_log = logs.take()

    def placement(lines):
        keys = ("offloaded", "model buffer size", "KV buffer size", "compute buffer size",
                "flash_attn", "graph splits", "layer ", "assigned to device")
        return [ln.strip() for ln in lines if any(k in ln for k in keys)]

    result = {
        "model": args.model, "flash_attn": args.flash_attn, "devices": devices,
        "tokens": tokens, "n_prompt": args.prompt, "n_gen": args.gen,
        "steps": [_compare(r, g) for r, g in zip(ref, got)],
        # vs ggml's CPU on the F32 twin: f32 math with the very same weight values
        "steps_vs_f32": [_compare(r, g) for r, g in zip(ref32, got)] if ref32 else None,
        # ggml's CPU, quantized model vs its F32 twin: the activation-quantization noise floor
        "floor": [_compare(r, g) for r, g in zip(ref32, ref)] if ref32 else None,
        "seconds": {"cpu": round(t_cpu, 3), "rpc": round(t_rpc, 3)},
        "cpu_log": placement(cpu_log), "rpc_log": placement(rpc_log),
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(client_main())


# ============================================================================ the tests

import pytest  # noqa: E402

import llamacpp as h  # noqa: E402
from models import Dims, ModelCache  # noqa: E402

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(900)]


# What "matches" means, and why the tolerances are what they are.
#
# Metrics, per step (step 0: the 32 prompt rows; then one row per generated token):
#   nmse    = sum((ours - ref)^2) / sum((ref - mean_row(ref))^2)   (normalised MSE)
#   max_rel = max|ours - ref| / max|ref|
#
# ggml's CPU backend does not compute in plain f32: before each matmul it converts the
# activations to the weight's "vec_dot_type": Q8_0 for Q8_0/Q4_0 weights, Q8_K for
# K-quants, F16 for F16 weights and for the F16 KV cache (KQ, and KQV without flash
# attention); its flash attention converts Q to F16 and accumulates V*softmax in F16.
# rpcserver dequantizes the weights and computes in f32. So each non-F32 model is also
# run on the local CPU through its "F32 twin" (models.write_dequantized: the very same
# weight values stored as F32, so ggml computes it in f32 too) and two checks are made:
#
# 1. EXACT (tight): ours vs ggml's CPU on the F32 twin (on the model itself when it is
#    F32): same weights, f32 math on both sides. What is left is ggml's own F16 rounding
#    in attention (without FA: Q converted to F16 for KQ against the F16 K cache, and the
#    softmax converted to F16 for KQV; with FA: Q in F16 and V*softmax accumulated in
#    F16) and the order of f32 sums. Measured worst over all cases, without FA: NMSE
#    4e-8 (llama/qwen) and 6.3e-7 (gemma: its tied, small output embeddings make its
#    logit variance small, so the same hidden-state noise is ~20x the NMSE), max_rel
#    9e-4; with FA: NMSE 3.4e-7 (llama/qwen) and 3.2e-6 (gemma), max_rel 2.2e-3.
#    Bounds: ~3x the gemma worst case (the noise is ggml's and deterministic), i.e.
#    10..60x the llama/qwen values. A wrong op or a wrong dequantization gives NMSE >=
#    1e-3 (mostly 0.1..1: the logits decorrelate); negative controls with a server
#    patched by 1% (rope freq_base x1.01: 3.8e-6 without FA; softmax scale x1.01: 2.1e-5)
#    are caught.
#
# 2. AS ASKED (adaptive): ours vs ggml's CPU on the model itself. The gap is ggml's own
#    activation quantization, which we can measure exactly at every step as the
#    "floor" = ggml(model) vs ggml(F32 twin): 1.4e-4..4e-4 NMSE for 4..8-bit models,
#    1.1e-3..1.5e-3 for gemma, and up to 3.7e-2 for the MoE model without FA (Q8
#    rounding of the activations flips the router's top-k choice for a few tokens, and
#    then a different expert's output goes into the logits). No fixed bound fits both
#    the 1e-4 and the 4e-2 cases, so the bound is per step: NMSE <= 2*floor + EXACT_NMSE,
#    max_abs <= 2*floor_max_abs + EXACT_MAXREL*max|ref|. (By the triangle inequality check 1
#    implies about that; this check states the result against the real CPU run.)
#    For F32 models the floor is 0 and this is check 1.
#
# A device that rounds the activations as ggml's CPU backend does (ArrayLib.activation_type:
# the CPU plugin quantizes them to Q8_0/Q8_1 for the 32-element types) computes the model's
# arithmetic, not the twin's: for those cases check 1 allows twice ggml's own distance from
# the twin (the floor), NMSE <= 2*floor + EXACT_NMSE, so ours may be no farther from exact
# f32 than ggml's CPU is; check 2 is unchanged.
EXACT_NMSE = {False: 2e-6, True: 1e-5}    # by flash_attn
EXACT_MAXREL = {False: 3e-3, True: 1e-2}


@dataclass(frozen=True)
class Case:
    arch: str
    ftype: str
    flash_attn: bool

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.ftype}-{'fa' if self.flash_attn else 'nofa'}"


# Each architecture, each weight type and both attention paths at least once; every arch
# appears with a quantized type and with FA on and off somewhere, while keeping the run
# to a few minutes on 2 cores.
CASES = [
    Case("llama", "F32", False),
    Case("llama", "F32", True),
    Case("llama", "F16", True),
    Case("llama", "Q8_0", False),
    Case("llama", "Q4_0", True),
    Case("llama", "Q4_K_M", False),
    Case("llama", "Q5_K_M", True),
    Case("llama", "Q6_K", False),
    Case("qwen2", "F16", True),
    Case("qwen2", "Q8_0", False),
    Case("qwen2", "Q5_0", True),
    Case("qwen2", "Q4_K_M", True),
    Case("qwen3", "F32", False),
    Case("qwen3", "Q4_0", True),
    Case("qwen3", "Q6_K", False),
    Case("gemma", "F32", False),
    Case("gemma", "F16", True),
    Case("gemma", "Q6_K", False),
    Case("gemma", "Q4_K_M", True),
    Case("qwen3moe", "F16", False),
    Case("qwen3moe", "Q8_0", False),
    Case("qwen3moe", "Q4_0", True),
    Case("qwen3moe", "Q4_0", False),  # Q8 activations flip the router's top-k on ggml's side
    Case("qwen3moe", "Q5_K_M", True),
]


#: The cases also run on MLX-CPU: both attention paths, F16, an 8-bit and a 4-bit type, two
#: K-quants, and the MoE model (MUL_MAT_ID). MLX_ONLY_CASES are not in the CPU matrix.
MLX_ONLY_CASES = [Case("llama", "F16", False)]
MLX_CASES = ["llama-F16-fa", "llama-F16-nofa", "qwen2-Q8_0-nofa", "gemma-Q4_K_M-fa",
             "qwen3moe-Q4_0-fa", "llama-Q6_K-nofa"]
#: The cases also run on CUDA-host, the CUDA plugin with its kernels compiled for the host
#: (tests/cuda_host_plugin.py): the fused attention kernel (F16 K/V), rope in normal and NeoX
#: modes, the quantized mat-vec kernels of a legacy type and a K-quant, dequantization for
#: prompt batches, RMS_NORM and SOFT_MAX kernels, and MUL_MAT_ID.
CUDA_HOST_CASES = ["llama-F16-fa", "qwen2-Q8_0-nofa", "qwen3-Q4_0-fa", "gemma-Q4_K_M-fa",
                   "qwen3moe-Q4_0-fa", "llama-Q6_K-nofa"]
_BY_ID = {c.id: c for c in CASES + MLX_ONLY_CASES}
#: (device, case): device None is `rpcserver serve` without -d (it serves the CPU plugin's CPU)
DEVICE_CASES = ([pytest.param(None, c, id=f"CPU-{c.id}") for c in CASES]
                + [pytest.param("MLX-CPU", _BY_ID[i], id=f"MLX-CPU-{i}") for i in MLX_CASES]
                + [pytest.param("CUDA-host", _BY_ID[i], id=f"CUDA-host-{i}")
                   for i in CUDA_HOST_CASES])


@pytest.fixture(scope="module", autouse=True)
def llamacpp_rpc():
    h.skip_unless_available(libllama=True)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> ModelCache:
    return ModelCache(tmp_path_factory.mktemp("models"))


#: E2E_SERVER=reference runs the same matrix against llama.cpp's own RPC server
#: (ggml_backend_rpc_start_server): a check of the test itself, not of rpcserver.
SERVER_KIND = os.environ.get("E2E_SERVER", "rpcserver")


class RunningServer:
    """``rpcserver serve`` (or the reference server) in a subprocess, behind a command-counting
    proxy."""

    def __init__(self, log: Path, devices: str | None = None):
        self._base = log
        self._starts = 0
        self.devices = devices  # `serve -d` (None: its default choice)
        self._start()

    def _start(self):
        self.port = h.free_port()
        self._starts += 1  # a restarted server gets a new log file
        self.log = log = self._base.with_name(f"{self._base.stem}-{self._starts}.log")
        if SERVER_KIND == "reference":
            self.proc = h.start_reference_server(self.port, threads=THREADS, log_path=log,
                                                 env={"GGML_NO_BACKTRACE": "1"})
        else:
            env = None
            if self.devices and "CUDA-host" in self.devices.split(","):
                import cuda_host_plugin

                env = cuda_host_plugin.server_env(self._base.parent / "cuda-host-shim")
            self.proc = h.start_rpcserver(self.port, log_path=log, env=env, extra_args=(
                ("-d", self.devices) if self.devices else ()))
        self.proxy = h.CommandCounter(self.port)

    @property
    def endpoint(self) -> str:
        return self.proxy.endpoint

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except OSError:
            return 0

    def problems(self, since: int = 0) -> str:
        """The server's warning/error lines (and tracebacks) written after byte ``since``."""
        try:
            with open(self.log, "rb") as f:
                f.seek(since)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no server log)"
        keep = [ln.rstrip() for ln in text.splitlines()
                if any(k in ln for k in ("WARNING", "ERROR", "Error", "error", "Traceback",
                                         "not implemented", "  File ", "CRITICAL"))]
        alive = "" if self.proc.poll() is None else f"\n(server exited with {self.proc.returncode})"
        return "\n".join(keep[-40:]) + alive

    def ensure_alive(self) -> None:
        """Restart the server if an earlier case killed it (so one crash fails one case)."""
        if self.proc.poll() is not None:
            self.proxy.close()
            self._start()

    def stop(self):
        self.proxy.close()
        h.stop(self.proc)


class ServerPool:
    """Our servers, started on first use: ``get(devices, i)`` is the i-th one serving ``-d devices``."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.started: dict = {}

    def get(self, devices: str | None = None, i: int = 0) -> RunningServer:
        key = (devices, i)
        if key not in self.started:
            if devices and SERVER_KIND == "reference":
                pytest.skip(f"llama.cpp's own RPC server has no {devices} devices")
            name = (devices or "default").replace(",", "+")
            self.started[key] = RunningServer(self.directory / f"rpcserver-{name}-{i}.log", devices)
        srv = self.started[key]
        srv.ensure_alive()
        return srv

    def stop(self):
        for s in self.started.values():
            s.stop()


@pytest.fixture(scope="module")
def server_pool(tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def servers(server_pool):
    """Two of our servers on their default device (the second is only used by the split test)."""
    return [server_pool.get(None, 0), server_pool.get(None, 1)]


def run_client(model: Path, endpoints: list[str], out: Path, *, flash_attn: bool,
               twin: Path | None = None, extra=(), timeout: float = 800) -> tuple[dict | None, str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--model", str(model),
           "--rpc", ",".join(endpoints), "--out", str(out), *extra]
    if twin is not None:
        cmd += ["--f32-twin", str(twin)]
    if flash_attn:
        cmd.append("--flash-attn")
    try:
        # GGML_NO_BACKTRACE: when a server misbehaves ggml aborts the client; skip its gdb dump
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=h.subprocess_env({"GGML_NO_BACKTRACE": "1"}), cwd=str(HERE.parent))
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-4000:]
        return None, f"client timed out after {timeout}s; stderr tail:\n{tail!r}"
    noise = ("Model metadata:", "CPU : SSE3", "Using fallback chat format")
    tail = "\n".join([ln for ln in (p.stdout + p.stderr).splitlines()
                      if not ln.startswith(noise)][-30:])
    if p.returncode != 0 or not out.exists():
        return None, f"client exited with status {p.returncode}; its last lines:\n{tail}"
    return json.loads(out.read_text()), tail


def rounds_activations(device: str | None, ftype: str) -> bool:
    """Whether the server's device rounds the activations of this model's weight products
    the way ggml's CPU backend does (``ArrayLib.activation_type``; the CPU plugin, for the
    32-element types). Then ours, like ggml's CPU, computes with the model's rounding, not
    its F32 twin's, and check 1 is measured from ggml's own distance to the twin."""
    from ggml_harness import device_named

    from rpcserver.ggml import GGMLType

    if ftype not in GGMLType.__members__:
        return False  # a mix such as Q4_K_M: the K-quants are multiplied in float32
    lib = device_named(device or "CPU").array_lib
    return lib is not None and lib.activation_type(int(GGMLType[ftype]), 1) is not None


def check_result(res: dict, label: str, rounded: bool = False) -> list[str]:
    """The steps out of tolerance (see the comment above EXACT_NMSE), as lines. ``rounded``:
    the server rounds activations as ggml does (:func:`rounds_activations`), so check 1
    allows ggml's own distance from the F32 twin (the floor) twice, as check 2 does."""
    bad = []
    tol_nmse, tol_rel = EXACT_NMSE[res["flash_attn"]], EXACT_MAXREL[res["flash_attn"]]
    # llama.cpp's own server (E2E_SERVER=reference) computes like the local CPU, not in f32:
    # it is held to the CPU run on the model itself (where it is bit-exact) instead
    exact = res["steps_vs_f32"] if res["steps_vs_f32"] and SERVER_KIND != "reference" else res["steps"]
    floor = res["floor"] or [None] * len(res["steps"])
    for i, (s, e, f) in enumerate(zip(res["steps"], exact, floor)):
        where = f"{label} step {i} ({'prompt' if i == 0 else 'gen'}, {s['rows']} rows)"
        rel = e["max_abs"] / max(e["ref_absmax"], 1e-6)
        t_nmse, t_rel = tol_nmse, tol_rel
        if rounded and f is not None:
            t_nmse = 2 * f["nmse"] + tol_nmse
            t_rel = 2 * f["max_abs"] / max(e["ref_absmax"], 1e-6) + tol_rel
        if not (e["nmse"] <= t_nmse and rel <= t_rel):
            bad.append(f"{where} vs exact f32: nmse={e['nmse']:.3g} (tol {t_nmse:.3g}) "
                       f"max_rel={rel:.3g} (tol {t_rel:.3g}) "
                       f"argmax_agree={e['argmax_agree']:.2f}")
        if f is not None:
            tol = 2 * f["nmse"] + tol_nmse
            tol_abs = 2 * f["max_abs"] + tol_rel * s["ref_absmax"]
            if not (s["nmse"] <= tol and s["max_abs"] <= tol_abs):
                bad.append(f"{where} vs the CPU on the model: nmse={s['nmse']:.3g} (tol {tol:.3g} "
                           f"from floor {f['nmse']:.3g}) max_abs={s['max_abs']:.3g} "
                           f"(tol {tol_abs:.3g}) argmax_agree={s['argmax_agree']:.2f}")
    return bad


def summary(res: dict) -> str:
    def worst(steps):
        return (f"nmse {max(x['nmse'] for x in steps):.3g} "
                f"max_abs {max(x['max_abs'] for x in steps):.3g} "
                f"max_rel {max(x['max_abs'] / max(x['ref_absmax'], 1e-6) for x in steps):.3g}")

    text = f"vs CPU: {worst(res['steps'])}"
    if res["steps_vs_f32"]:
        text += f" | vs F32 twin: {worst(res['steps_vs_f32'])} | floor: {worst(res['floor'])}"
    return text + f" | cpu {res['seconds']['cpu']}s rpc {res['seconds']['rpc']}s"


def _graphs(delta: dict) -> int:
    return delta.get("GRAPH_COMPUTE", 0) + delta.get("GRAPH_RECOMPUTE", 0)


@pytest.mark.parametrize("device,case", DEVICE_CASES)
def test_offloaded_logits_match_cpu(device: str | None, case: Case, models, server_pool, tmp_path,
                                    record_property):
    srv = server_pool.get(device)
    model = models.get(case.arch, case.ftype)
    twin = models.get_dequantized(case.arch, case.ftype) if case.ftype != "F32" else None
    since = srv.log_size()
    before = srv.proxy.snapshot()
    res, tail = run_client(model, [srv.endpoint], tmp_path / "result.json",
                           flash_attn=case.flash_attn, twin=twin)
    srv.proxy.wait_idle()
    if res is None:
        pytest.fail(f"{case.id}: {tail}\n--- server problems:\n{srv.problems(since)}")
    delta = srv.proxy.delta(before)
    record_property("e2e", summary(res))
    print(f"{device or 'CPU'} {case.id}: {summary(res)}")

    # every layer and the output went to the RPC device, and the server computed the graphs
    n_layer = Dims().n_layer
    assert any(f"offloaded {n_layer + 1}/{n_layer + 1} layers" in ln for ln in res["rpc_log"]), \
        "not every layer was offloaded:\n" + "\n".join(res["rpc_log"])
    assert any("RPC" in ln and "model buffer size" in ln for ln in res["rpc_log"]), res["rpc_log"]
    assert _graphs(delta) >= 1 + res["n_gen"], f"the server computed too few graphs: {delta}"
    assert len(res["steps"]) == 1 + res["n_gen"] and res["n_prompt"] >= 32 and res["n_gen"] >= 16

    bad = check_result(res, case.id, rounds_activations(device, case.ftype))
    assert not bad, "\n".join(bad) + f"\n--- server problems:\n{srv.problems(since)}"


def test_split_two_servers_and_cpu(models, servers, tmp_path, record_property):
    """Layers split over two rpcserver instances (tensor_split 1,1) and the local CPU."""
    n_layer = 4
    model = models.get("llama", "F16", n_layer=n_layer)
    twin = models.get_dequantized("llama", "F16", n_layer=n_layer)
    for s in servers:
        s.ensure_alive()
    since = [s.log_size() for s in servers]
    before = [s.proxy.snapshot() for s in servers]
    # n_gpu_layers=n_layer: layer 0 stays on the CPU, layers 1..3 and the output layer are
    # split 1:1 over the two RPC devices (llama.cpp puts RPC devices first in its list).
    res, tail = run_client(model, [s.endpoint for s in servers], tmp_path / "result.json",
                           flash_attn=False, twin=twin,
                           extra=["--n-gpu-layers", str(n_layer), "--tensor-split", "1,1"])
    for s in servers:
        s.proxy.wait_idle()
    problems = "\n".join(f"--- server {i} problems:\n{s.problems(since[i])}"
                         for i, s in enumerate(servers))
    if res is None:
        pytest.fail(f"split: {tail}\n{problems}")
    record_property("e2e", summary(res))
    print(f"split: {summary(res)}")
    assert len(res["devices"]) == 2, res["devices"]
    assert any(f"offloaded {n_layer}/{n_layer + 1} layers" in ln for ln in res["rpc_log"]), \
        "\n".join(res["rpc_log"])
    buffers = [ln for ln in res["rpc_log"] if "model buffer size" in ln]
    for s in servers:  # each RPC device is named RPC<i>[host:port] in llama.cpp's log
        assert any(f"[{s.endpoint}]" in ln for ln in buffers), f"no weights on {s.endpoint}: {buffers}"
    assert any("CPU" in ln for ln in buffers), f"no weights on the CPU: {buffers}"
    for i, s in enumerate(servers):
        assert _graphs(s.proxy.delta(before[i])) >= 1 + res["n_gen"], f"server {i} computed too few graphs"
    bad = check_result(res, "split")
    assert not bad, "\n".join(bad) + "\n" + problems


@pytest.mark.parametrize("devices, fa", [("CPU,MLX-CPU", False), ("CUDA-host,CPU", True)])
def test_split_devices_of_one_server(devices, fa, models, server_pool, tmp_path, record_property):
    """ONE server serving two devices (``-d CPU,MLX-CPU``; ``-d CUDA-host,CPU`` is what
    ``-d CUDA0,CPU`` does on a GPU machine): llama.cpp sees two RPC devices on one endpoint,
    splits the layers between them (tensor_split 1,1) and gets the CPU's logits."""
    n_layer = 4
    label = f"split {devices.replace(',', '+')}"
    model = models.get("llama", "F16", n_layer=n_layer)
    twin = models.get_dequantized("llama", "F16", n_layer=n_layer)
    srv = server_pool.get(devices)
    since = srv.log_size()
    before = srv.proxy.snapshot()
    res, tail = run_client(model, [srv.endpoint], tmp_path / "result.json", flash_attn=fa,
                           twin=twin, extra=["--tensor-split", "1,1"])
    srv.proxy.wait_idle()
    problems = f"--- server problems:\n{srv.problems(since)}"
    if res is None:
        pytest.fail(f"{label}: {tail}\n{problems}")
    record_property("e2e", summary(res))
    print(f"{label}: {summary(res)}")
    assert len(res["devices"]) == 2, res["devices"]  # RPC0, RPC1 in the -d order
    assert any(f"offloaded {n_layer + 1}/{n_layer + 1} layers" in ln for ln in res["rpc_log"]), \
        "\n".join(res["rpc_log"])
    buffers = [ln for ln in res["rpc_log"] if "model buffer size" in ln]
    for d in res["devices"]:  # named RPC<i>[host:port] in llama.cpp's log: both on this endpoint
        assert any(f"{d}[{srv.endpoint}]" in ln for ln in buffers), f"no weights on {d}: {buffers}"
    # both devices compute every step: a graph each per evaluation
    assert _graphs(srv.proxy.delta(before)) >= 2 * (1 + res["n_gen"]), srv.proxy.delta(before)
    bad = check_result(res, label)
    assert not bad, "\n".join(bad) + "\n" + problems
