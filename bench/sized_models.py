#!/usr/bin/env python3
"""Random-weight llama models of a real size (about 0.5B and 1.7B parameters) for the benchmarks.

tests/models.py makes tiny models for the tests; this module makes big ones with the
same metadata writer (``models._write_direct``: llama architecture keys, a SentencePiece
vocabulary) and the same weight scheme (matrices N(0, 1/fan_in) scaled as models.py
does, norms 1 + 0.1 N(0, 1)), so llama.cpp computes finite, O(1) activations through
every layer and finite logits.

Memory: no weight is held in RAM longer than it takes to write it. Every tensor is
given to gguf's writer as a *lazy* tensor (shape, dtype and nbytes up front, the data
generated row block by row block when the writer reaches it), so the process stays
at a few hundred MiB even for a 7 GB F32 file. A quantized ``ftype`` is an F16 file
converted with llama.cpp's own quantizer (``llama_model_quantize``, in a subprocess,
as tests/models.py does for the tiny models), which also picks llama.cpp's per-tensor
types (e.g. ``output.weight`` becomes Q6_K in a Q4_0 model).

Files are cached in ``$RPCSERVER_MODEL_CACHE``, else ``~/.cache/rpcserver/models``,
under a name keyed by every parameter (dims, ftype, generator version): a second run
reuses the file. A ``.json`` sidecar records the parameters and the parameter count.

    python bench/sized_models.py 1.7b Q4_0          # make (or find) one, print its path
    python bench/sized_models.py --list             # the presets
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import models  # noqa: E402  (tests/models.py)

#: Bump when the weights or metadata written for the same parameters change.
GENERATOR_VERSION = 1

#: Llama-architecture presets (head_dim 64 everywhere; every dim a multiple of 256, so
#: K-quants apply to every matrix without fallbacks).
PRESETS: dict[str, dict] = {
    # ~1.76B parameters: the brief's "real size" model (TinyLlama-like attention, 36 layers)
    "1.7b": dict(n_vocab=32000, n_embd=2048, n_layer=36, n_head=32, n_head_kv=8, n_ff=5632,
                 n_ctx=4096),
    # ~0.51B parameters: a quicker middle step
    "0.5b": dict(n_vocab=32000, n_embd=1280, n_layer=24, n_head=20, n_head_kv=4, n_ff=3584,
                 n_ctx=4096),
    # ~0.16B parameters: the "160M-class" model of the F32/F16 speed floor (GPT-2-small-like
    # widths, llama architecture, grouped-query attention as in the larger presets)
    "160m": dict(n_vocab=32000, n_embd=768, n_layer=12, n_head=12, n_head_kv=4, n_ff=3072,
                 n_ctx=4096),
}

_CHUNK_ELEMENTS = 1 << 23  # generate at most 8M values (32 MiB of f32) at a time


def cache_dir() -> Path:
    env = os.environ.get("RPCSERVER_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rpcserver" / "models"


def dims_for(preset: str, **overrides) -> models.Dims:
    if preset not in PRESETS:
        raise ValueError(f"unknown size {preset!r}; known: {', '.join(PRESETS)}")
    return models.Dims(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})


# ----------------------------------------------------------------------------- tensors

def tensor_specs(d: models.Dims) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(name, ggml shape ne0.., kind "mat"|"norm", scale) of a llama model, in file order.

    The same tensors and scales as tests/models.py's ``_build_tensors`` for ``llama``.
    """
    E, hd = d.n_embd, d.head_dim
    q_out, kv_out = d.n_head * hd, d.n_head_kv * hd
    specs = [("token_embd.weight", (E, d.n_vocab), "mat", float(np.sqrt(E))),
             ("output_norm.weight", (E,), "norm", 1.0),
             ("output.weight", (E, d.n_vocab), "mat", 3.0)]
    for i in range(d.n_layer):
        p = f"blk.{i}."
        specs += [(p + "attn_norm.weight", (E,), "norm", 1.0),
                  (p + "attn_q.weight", (E, q_out), "mat", 1.0),
                  (p + "attn_k.weight", (E, kv_out), "mat", 1.0),
                  (p + "attn_v.weight", (E, kv_out), "mat", 1.0),
                  (p + "attn_output.weight", (q_out, E), "mat", 1.0),
                  (p + "ffn_norm.weight", (E,), "norm", 1.0),
                  (p + "ffn_gate.weight", (E, d.n_ff), "mat", 1.0),
                  (p + "ffn_up.weight", (E, d.n_ff), "mat", 1.0),
                  (p + "ffn_down.weight", (d.n_ff, E), "mat", 1.0)]
    return specs


def param_count(d: models.Dims) -> int:
    return sum(int(np.prod(ne)) for _, ne, _, _ in tensor_specs(d))


def gguf_param_count(path) -> int:
    """Number of weights in any GGUF file (sum of its tensors' element counts)."""
    import gguf

    return sum(int(t.n_elements) for t in gguf.GGUFReader(str(path)).tensors)


class _LazyTensor:
    """What gguf.GGUFWriter.add_tensor needs (shape, dtype, nbytes) plus a ``tofile`` that
    generates the values block by block: the writer calls it when it reaches the tensor."""

    def __init__(self, name: str, ne: tuple[int, ...], kind: str, scale: float, dtype, seed: int):
        self.name, self.kind, self.scale = name, kind, scale
        self.shape = tuple(reversed(ne))  # numpy order: rows of ne0 elements
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.seed = [seed, zlib.crc32(name.encode())]

    def tofile(self, f) -> None:
        rng = np.random.default_rng(self.seed)
        if self.kind == "norm":
            (1.0 + 0.1 * rng.standard_normal(self.shape, dtype=np.float32)).astype(self.dtype).tofile(f)
            return
        ne0 = self.shape[-1]
        std = np.float32(self.scale / np.sqrt(ne0))
        rows = int(np.prod(self.shape[:-1]))
        step = max(1, _CHUNK_ELEMENTS // ne0)
        for r in range(0, rows, step):
            n = min(step, rows - r)
            block = rng.standard_normal((n, ne0), dtype=np.float32)
            block *= std
            block.astype(self.dtype, copy=False).tofile(f)

    def byteswap(self, inplace=False):  # only on big-endian hosts
        raise NotImplementedError("big-endian hosts are not supported")


def _seed(d: models.Dims) -> int:
    h = hashlib.sha256(f"sized-llama-v{GENERATOR_VERSION}:{sorted(asdict(d).items())}".encode())
    return int.from_bytes(h.digest()[:4], "little")


def write_direct(path: Path, d: models.Dims, ftype: str) -> None:
    """Write an F32 or F16 llama model (1-D tensors F32) without holding the weights in RAM."""
    if ftype not in models.DIRECT_FTYPES:
        raise ValueError(f"write_direct writes F32 or F16, not {ftype}")
    seed = _seed(d)
    mat_dtype = np.float16 if ftype == "F16" else np.float32
    tensors = [(name, _LazyTensor(name, ne, kind, scale,
                                  np.float32 if kind == "norm" else mat_dtype, seed))
               for name, ne, kind, scale in tensor_specs(d)]
    models._write_direct(path, "llama", ftype, d, tensors=tensors)


# ----------------------------------------------------------------------------- the cache

def model_path(d: models.Dims, ftype: str, label: str = "", directory: Path | None = None) -> Path:
    key = json.dumps({"arch": "llama", "ftype": ftype, "dims": asdict(d),
                      "version": GENERATOR_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = f"llama-{label + '-' if label else ''}{ftype.lower()}-{digest}"
    return (directory or cache_dir()) / f"{stem}.gguf"


def _quantize(src: Path, dst: Path, ftype: str, threads: int, timeout: float) -> None:
    """tests/models.py's quantizer subprocess, with a timeout fit for a 1.7B model."""
    cmd = [sys.executable, "-c", models._QUANTIZE, str(src), str(dst),
           str(models.QUANT_FTYPES[ftype]), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not dst.exists():
        raise RuntimeError(f"quantizing {src.name} to {ftype} failed (rc={proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def get(d: models.Dims, ftype: str, label: str = "", directory: Path | None = None,
        threads: int = 2, timeout: float = 7200, log=print) -> Path:
    """The cached model for (dims, ftype), made first if needed; returns its path."""
    if ftype not in models.FTYPES:
        raise ValueError(f"unknown ftype {ftype!r}; known: {', '.join(models.FTYPES)}")
    path = model_path(d, ftype, label, directory)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    n_params = param_count(d)
    t0 = time.perf_counter()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        if ftype in models.DIRECT_FTYPES:
            log(f"generating {path.name}: {n_params / 1e9:.2f}B random {ftype} weights ...")
            write_direct(tmp, d, ftype)
        else:
            f16 = model_path(d, "F16", label, directory)  # a cached F16 twin is the source
            src = f16 if f16.exists() else path.with_name(path.name + f".f16.tmp{os.getpid()}")
            try:
                if src is not f16:
                    log(f"generating an F16 source: {n_params / 1e9:.2f}B random weights "
                        f"({n_params * 2 / 2**30:.1f} GiB on disk for a moment) ...")
                    write_direct(src, d, "F16")
                    log(f"  written in {time.perf_counter() - t0:.0f}s")
                t1 = time.perf_counter()
                log(f"quantizing to {ftype} with llama.cpp's quantizer ({threads} threads) ...")
                _quantize(src, tmp, ftype, threads, timeout)
                log(f"  quantized in {time.perf_counter() - t1:.0f}s")
            finally:
                if src is not f16:
                    src.unlink(missing_ok=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    info = {"arch": "llama", "ftype": ftype, "label": label, "dims": asdict(d),
            "params": n_params, "bytes": path.stat().st_size, "version": GENERATOR_VERSION,
            "seconds": round(time.perf_counter() - t0, 1)}
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    log(f"made {path} ({path.stat().st_size / 2**30:.2f} GiB) in {info['seconds']:.0f}s")
    return path


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="make (or find in the cache) a real-size random llama model")
    ap.add_argument("size", nargs="?", choices=sorted(PRESETS))
    ap.add_argument("ftype", nargs="?", default="Q4_0", choices=models.FTYPES)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--cache-dir", type=Path, help=f"default: {cache_dir()}")
    ap.add_argument("--list", action="store_true", help="print the presets")
    args = ap.parse_args(argv)
    if args.list or not args.size:
        for name, p in PRESETS.items():
            print(f"{name:5s} {param_count(dims_for(name)) / 1e9:.3f}B params: {p}")
        return 0
    d = dims_for(args.size)
    p = get(d, args.ftype, args.size, args.cache_dir, threads=args.threads)
    print(f"{p} ({p.stat().st_size / 2**30:.2f} GiB, {param_count(d) / 1e9:.3f}B params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
