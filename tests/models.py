"""Tiny GGUF models with random weights, for end-to-end tests and benchmarks.

No model can be downloaded, so the tests make their own: real architecture metadata
and tensor names (as llama.cpp's src/models/<arch>.cpp and src/llama-arch.cpp expect),
random weights, tiny dimensions and a tiny SentencePiece ("llama") vocabulary.

    write_model(path, arch, ftype)          # one file
    ModelCache(directory).get(arch, ftype)  # made once per directory, then reused

``arch``: one of :data:`ARCHS`:

* ``llama``    - RMS norm, SwiGLU, normal ("NORM") rope, GQA, untied output.
* ``qwen2``    - like llama plus q/k/v biases, NeoX rope.
* ``qwen3``    - per-head q_norm/k_norm (RMS norm over the head dim), NeoX rope.
* ``gemma``    - embeddings scaled by sqrt(n_embd), GEGLU feed-forward, NeoX rope,
                 output tied to token_embd.
* ``qwen3moe`` - qwen3 attention plus a mixture of experts (softmax gate, top-k via
                 ARGSORT/TOP_K + GET_ROWS, MUL_MAT_ID, normalised expert weights).

``ftype``: ``F32`` and ``F16`` are written directly (1-D tensors stay F32, as
llama.cpp's converter does); anything else (``Q8_0``, ``Q4_0``, ``Q5_0``, ``Q4_K_M``,
``Q5_K_M``, ``Q6_K``, ``Q4_K_S`` ...) is an F32 model converted with libllama's
``llama_model_quantize`` (run in a subprocess: libllama is only loaded there).
llama.cpp's quantizer picks per-tensor types as it does for real models (e.g. the
output matrix becomes Q6_K, attn_v/ffn_down get a higher K-quant in *_K_M) and falls
back to a legacy type for rows whose length is not a multiple of 256 in K-quants.

The default dims are a multiple of 256 everywhere (n_embd 256, n_ff 512, expert
n_ff 256) so that K-quants apply to every 2-D tensor without fallbacks.

:func:`write_dequantized` (``ModelCache.get_dequantized``) writes the F32 twin of a
quantized model: same weight values, dequantized, for an exact f32 reference.

Run as a script to make a model by hand:

    python tests/models.py OUT.gguf llama Q4_K_M [--layers 4]
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ARCHS = ("llama", "qwen2", "qwen3", "gemma", "qwen3moe")
DIRECT_FTYPES = ("F32", "F16")

# llama_ftype values (llama.h) for the types written through llama_model_quantize.
QUANT_FTYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
    "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32,
}
FTYPES = DIRECT_FTYPES + tuple(QUANT_FTYPES)

# SentencePiece token types (llama.h llama_token_type)
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_BYTE = 1, 2, 3, 6


@dataclass(frozen=True)
class Dims:
    n_vocab: int = 512
    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2      # GQA: 2 query heads per KV head
    n_ff: int = 512
    n_ctx: int = 256        # context_length (training context)
    n_expert: int = 4       # MoE only
    n_expert_used: int = 2  # MoE only
    n_ff_exp: int = 256     # MoE only
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# ----------------------------------------------------------------------------- vocabulary

def _vocab(n_vocab: int):
    """A SentencePiece vocabulary: <unk> <s> </s>, the 256 byte tokens, then words."""
    assert n_vocab >= 3 + 256 + 1, "the vocabulary needs room for the byte tokens"
    tokens = ["<unk>", "<s>", "</s>"]
    types = [_TT_UNKNOWN, _TT_CONTROL, _TT_CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_TT_BYTE] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = []
    for a in letters:  # single letters, with and without the word-start marker
        words += ["\u2581" + a, a]
    i = 0
    while len(tokens) + len(words) < n_vocab:  # then two-letter pieces
        a, b = letters[(i // 26) % 26], letters[i % 26]
        words.append(("\u2581" if (i // 676) % 2 == 0 else "") + a + b + ("" if i < 1352 else str(i)))
        i += 1
    words = words[: n_vocab - len(tokens)]
    tokens += words
    types += [_TT_NORMAL] * len(words)
    scores = [0.0] * (3 + 256) + [-float(k) for k in range(len(words))]
    return tokens, scores, types


# ----------------------------------------------------------------------------- weights

class _Weights:
    """Random weights; 2-D+ matrices scaled 1/sqrt(fan_in) so activations stay O(1)."""

    def __init__(self, seed: int, ftype: str):
        self.rng = np.random.default_rng(seed)
        self.mat_dtype = np.float16 if ftype == "F16" else np.float32
        self.tensors: list[tuple[str, np.ndarray]] = []

    def mat(self, name: str, ne0: int, *ne, scale: float = 1.0):
        """A matrix with ggml shape (ne0, *ne): numpy shape reversed; rows of ne0 elements."""
        shape = tuple(reversed((ne0, *ne)))
        w = self.rng.standard_normal(shape, dtype=np.float32) * (scale / np.sqrt(ne0))
        self.tensors.append((name, w.astype(self.mat_dtype)))

    def norm(self, name: str, n: int):
        w = 1.0 + 0.1 * self.rng.standard_normal(n, dtype=np.float32)
        self.tensors.append((name, w.astype(np.float32)))

    def bias(self, name: str, n: int, scale: float = 0.1):
        self.tensors.append((name, (scale * self.rng.standard_normal(n, dtype=np.float32))))


def _seed(arch: str, dims: Dims) -> int:
    h = hashlib.sha256(f"{arch}:{sorted(asdict(dims).items())}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _build_tensors(arch: str, d: Dims, ftype: str) -> list[tuple[str, np.ndarray]]:
    W = _Weights(_seed(arch, d), ftype)
    E, H, Hkv, hd = d.n_embd, d.n_head, d.n_head_kv, d.head_dim
    q_out, kv_out = H * hd, Hkv * hd

    # token_embd is read by GET_ROWS: unit-ish rows (gemma scales them by sqrt(n_embd) itself)
    W.mat("token_embd.weight", E, d.n_vocab, scale=np.sqrt(E) * (0.02 if arch == "gemma" else 1.0))
    W.norm("output_norm.weight", E)
    if arch != "gemma":  # gemma ties the output to token_embd
        W.mat("output.weight", E, d.n_vocab, scale=3.0)

    for i in range(d.n_layer):
        p = f"blk.{i}."
        W.norm(p + "attn_norm.weight", E)
        W.mat(p + "attn_q.weight", E, q_out)
        W.mat(p + "attn_k.weight", E, kv_out)
        W.mat(p + "attn_v.weight", E, kv_out)
        # gemma: the residual stream starts as the (scaled) embedding of the token itself and the
        # output is tied to token_embd, so weak layers would make every token predict itself;
        # stronger output projections make the greedy continuation non-trivial.
        out_scale = 4.0 if arch == "gemma" else 1.0
        W.mat(p + "attn_output.weight", q_out, E, scale=out_scale)
        if arch == "qwen2":
            W.bias(p + "attn_q.bias", q_out)
            W.bias(p + "attn_k.bias", kv_out)
            W.bias(p + "attn_v.bias", kv_out)
        if arch in ("qwen3", "qwen3moe"):
            W.norm(p + "attn_q_norm.weight", hd)
            W.norm(p + "attn_k_norm.weight", hd)
        W.norm(p + "ffn_norm.weight", E)
        if arch == "qwen3moe":
            W.mat(p + "ffn_gate_inp.weight", E, d.n_expert, scale=2.0)
            W.mat(p + "ffn_gate_exps.weight", E, d.n_ff_exp, d.n_expert)
            W.mat(p + "ffn_up_exps.weight", E, d.n_ff_exp, d.n_expert)
            W.mat(p + "ffn_down_exps.weight", d.n_ff_exp, E, d.n_expert)
        else:
            W.mat(p + "ffn_gate.weight", E, d.n_ff)
            W.mat(p + "ffn_up.weight", E, d.n_ff)
            W.mat(p + "ffn_down.weight", d.n_ff, E, scale=out_scale)
    return W.tensors


# ----------------------------------------------------------------------------- writing

def _write_direct(path: Path, arch: str, ftype: str, d: Dims,
                  tensors: list[tuple[str, np.ndarray]] | None = None) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-{ftype.lower()}")
    w.add_file_type(0 if ftype == "F32" else 1)  # LLAMA_FTYPE_ALL_F32 / MOSTLY_F16
    w.add_context_length(d.n_ctx)
    w.add_embedding_length(d.n_embd)
    w.add_block_count(d.n_layer)
    w.add_head_count(d.n_head)
    w.add_head_count_kv(d.n_head_kv)
    w.add_layer_norm_rms_eps(d.rms_eps)
    w.add_rope_freq_base(d.rope_freq_base)
    if arch == "qwen3moe":
        w.add_feed_forward_length(d.n_ff)
        w.add_expert_count(d.n_expert)
        w.add_expert_used_count(d.n_expert_used)
        w.add_expert_feed_forward_length(d.n_ff_exp)
    else:
        w.add_feed_forward_length(d.n_ff)
    if arch in ("llama", "qwen3", "qwen3moe", "gemma"):
        w.add_key_length(d.head_dim)
        w.add_value_length(d.head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(d.head_dim)
        w.add_vocab_size(d.n_vocab)

    tokens, scores, types = _vocab(d.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    for name, arr in (tensors if tensors is not None else _build_tensors(arch, d, ftype)):
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_QUANTIZE = """\
import sys
import llama_cpp
src, dst, ftype, nthread = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
params.nthread = nthread
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
sys.exit(f"llama_model_quantize returned {rc}" if rc else 0)
"""


def quantize(src: Path, dst: Path, ftype: str, nthread: int = 2) -> None:
    """Convert the F32 GGUF ``src`` to ``ftype`` with libllama (in a subprocess)."""
    if ftype not in QUANT_FTYPES:
        raise ValueError(f"unknown quantized ftype {ftype!r}; known: {', '.join(QUANT_FTYPES)}")
    cmd = [sys.executable, "-c", _QUANTIZE, str(src), str(dst), str(QUANT_FTYPES[ftype]), str(nthread)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not dst.exists():
        raise RuntimeError(f"quantizing {src.name} to {ftype} failed (rc={proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def write_model(path, arch: str, ftype: str, dims: Dims | None = None, **overrides) -> Path:
    """Write a tiny ``arch`` model with ``ftype`` weights to ``path``; returns the path.

    ``overrides`` replace fields of :class:`Dims` (e.g. ``n_layer=4``).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    d = dims or Dims()
    if overrides:
        d = Dims(**{**asdict(d), **overrides})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        if ftype in DIRECT_FTYPES:
            _write_direct(tmp, arch, ftype, d)
        else:
            f32 = path.with_name(path.name + f".f32.tmp{os.getpid()}")
            try:
                _write_direct(f32, arch, "F32", d)
                quantize(f32, tmp, ftype)
            finally:
                f32.unlink(missing_ok=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_dequantized(src, dst, arch: str, dims: Dims | None = None, **overrides) -> Path:
    """An F32 twin of the quantized model ``src``: every tensor dequantized (gguf.quants),
    same metadata. ``arch``/``dims``/``overrides`` must be those ``src`` was made with.

    ggml's CPU computes this twin in plain f32 with exactly the weight values of ``src``,
    without the Q8 quantization of activations it applies to quantized weights: the
    reference for a server that dequantizes and computes in f32.
    """
    import gguf
    from gguf.quants import dequantize

    d = dims or Dims()
    if overrides:
        d = Dims(**{**asdict(d), **overrides})
    reader = gguf.GGUFReader(str(src))
    tensors = [(t.name, np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
               for t in reader.tensors]
    dst = Path(dst)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    try:
        _write_direct(tmp, arch, "F32", d, tensors=tensors)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


class ModelCache:
    """Models made once per (arch, ftype, dims) in ``directory``, then reused."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def get(self, arch: str, ftype: str, **overrides) -> Path:
        suffix = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
        path = self.directory / f"{arch}-{ftype.lower()}{suffix}.gguf"
        if not path.exists():
            write_model(path, arch, ftype, **overrides)
        return path

    def get_dequantized(self, arch: str, ftype: str, **overrides) -> Path:
        """The F32 twin (:func:`write_dequantized`) of ``get(arch, ftype, **overrides)``."""
        src = self.get(arch, ftype, **overrides)
        path = src.with_name(src.stem + "-dequant-f32.gguf")
        if not path.exists():
            write_dequantized(src, path, arch, **overrides)
        return path


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="write a tiny random-weight GGUF model")
    ap.add_argument("out")
    ap.add_argument("arch", choices=ARCHS)
    ap.add_argument("ftype", choices=FTYPES)
    ap.add_argument("--layers", type=int, default=Dims.n_layer)
    ap.add_argument("--embd", type=int, default=Dims.n_embd)
    ap.add_argument("--ff", type=int, default=Dims.n_ff)
    args = ap.parse_args(argv)
    p = write_model(args.out, args.arch, args.ftype, n_layer=args.layers, n_embd=args.embd,
                    n_ff=args.ff)
    print(f"{p} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
