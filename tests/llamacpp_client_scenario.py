#!/usr/bin/env python3
"""Drive llama.cpp's own RPC client against a server, in this (fresh) process.

usage:
    llamacpp_client_scenario.py ENDPOINT                       # basic scenario
    llamacpp_client_scenario.py ENDPOINT cache SEED SIZE       # one weights upload (hash cache)

Prints one line ``SCENARIO_RESULT {json}``: every check's result under
"checks" plus the figures the client saw under "info". Exits 0 only if every
check passed. If the server misbehaves ggml aborts this process (SIGABRT);
the caller sees that as a non-zero exit status and the client's stderr.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import llamacpp as h  # noqa: E402

MIB = 1 << 20
GGML_TYPE_I8 = 24


def payload(seed: int, size: int) -> bytes:
    """The deterministic data the cache scenario uploads (the test recomputes it)."""
    return np.random.default_rng(seed).bytes(size)


class Checks:
    def __init__(self):
        self.checks: dict[str, bool] = {}
        self.info: dict = {}
        self.errors: list[str] = []

    def check(self, name: str, ok, detail: str = "") -> bool:
        ok = bool(ok)
        self.checks[name] = ok
        if not ok:
            self.errors.append(f"{name} failed{': ' + detail if detail else ''}")
        return ok

    def same(self, name: str, got: bytes, want: bytes) -> bool:
        if got == want:
            return self.check(name, True)
        if len(got) != len(want):
            return self.check(name, False, f"{len(got)} bytes read, {len(want)} expected")
        first = next(i for i in range(len(got)) if got[i] != want[i])
        nbad = int(np.count_nonzero(np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8)))
        return self.check(name, False, f"{nbad} of {len(want)} bytes differ, first at {first} "
                                       f"(got 0x{got[first]:02x}, want 0x{want[first]:02x})")

    def emit(self) -> int:
        ok = bool(self.checks) and all(self.checks.values()) and not self.errors
        print("SCENARIO_RESULT " + json.dumps(
            {"ok": ok, "checks": self.checks, "info": self.info, "errors": self.errors}),
            flush=True)
        return 0 if ok else 1


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def connect(c: Checks, endpoint: str):
    """add_server + device + buffer type, with their checks. Returns (dev, buft)."""
    reg = h.add_server(endpoint)
    c.check("add_server", reg)
    n = h.reg_dev_count(reg)
    c.info["device_count"] = n
    c.check("device_count>=1", n >= 1, f"{n} devices")
    dev = h.reg_dev(reg, 0)
    c.info["device_name"] = h.dev_name(dev)
    c.info["device_description"] = h.dev_description(dev)
    free, total = h.dev_memory(dev)
    c.info["memory_free"], c.info["memory_total"] = free, total
    c.check("memory>0", free > 0 and total > 0, f"free={free} total={total}")
    buft = h.dev_buffer_type(dev)  # GET_ALIGNMENT + GET_MAX_SIZE
    c.check("buffer_type", buft)
    c.info["buft_name"] = h.buft_name(buft)
    alignment, max_size = h.buft_alignment(buft), h.buft_max_size(buft)
    c.info["alignment"], c.info["max_size"] = alignment, max_size
    c.check("alignment_pow2", alignment > 0 and alignment & (alignment - 1) == 0, str(alignment))
    c.check("max_size>=1MiB", max_size >= MIB, str(max_size))
    return dev, buft


def basic(c: Checks, endpoint: str) -> None:
    rng = np.random.default_rng(1234)
    dev, buft = connect(c, endpoint)
    alignment = c.info["alignment"]

    buf_size = MIB
    buf = h.alloc_buffer(buft, buf_size)  # ALLOC_BUFFER
    c.info["buffer_size"] = h.buffer_size(buf)
    c.check("buffer_size", h.buffer_size(buf) >= buf_size, str(h.buffer_size(buf)))
    base = h.buffer_base(buf)  # BUFFER_GET_BASE
    c.info["buffer_base"] = base
    c.check("buffer_base_aligned", base != 0 and base % alignment == 0, hex(base))
    # Sanity: the device answers while a buffer holds the connection open.
    free2, total2 = h.dev_memory(dev)
    c.check("memory_again>0", free2 > 0 and total2 > 0, f"free={free2} total={total2}")

    ctx = h.new_context(16)
    slot = 64 * 1024  # every tensor lives in its own 64 KiB slot
    # A view of the whole buffer as bytes, to check that each operation touched only its region.
    whole = h.new_tensor(ctx, GGML_TYPE_I8, buf_size, name="whole")
    h.tensor_alloc(buf, whole, 0)
    specs = [  # name, type, ne0, ne1
        ("f32_a", h.GGML_TYPE_F32, 256, 16),
        ("f32_b", h.GGML_TYPE_F32, 256, 16),
        ("f16", h.GGML_TYPE_F16, 512, 8),
        ("q8_a", h.GGML_TYPE_Q8_0, 64, 16),     # ne0 % 512 != 0: GET_ALLOC_SIZE + INIT_TENSOR
        ("q8_b", h.GGML_TYPE_Q8_0, 64, 16),
        ("q8_big", h.GGML_TYPE_Q8_0, 1024, 4),  # ne0 % 512 == 0: neither
        ("f32_1d", h.GGML_TYPE_F32, 1000, None),
    ]
    T, off = {}, {}
    for i, (name, type_, ne0, ne1) in enumerate(specs, start=1):
        t = h.new_tensor(ctx, type_, ne0, ne1, name=name)
        h.tensor_alloc(buf, t, i * slot)
        T[name], off[name] = t, i * slot
    sizes = {k: h.nbytes(t) for k, t in T.items()}
    c.info["tensor_bytes"] = sizes
    c.check("q8_0_nbytes", sizes["q8_a"] == 16 * (64 // 32) * 34, str(sizes["q8_a"]))

    # The model of the buffer's content. The reference server's buffers start uninitialised,
    # so the model starts from a clear to 0.
    model = bytearray(buf_size)
    h.buffer_clear(buf, 0)  # BUFFER_CLEAR
    c.same("clear0_whole", h.tensor_get(whole), bytes(model))

    def put(name, data, offset=0):
        h.tensor_set(T[name], data, offset)  # SET_TENSOR
        model[off[name] + offset: off[name] + offset + len(data)] = data

    def expect(name):
        c.same(f"{name}_whole_buffer", h.tensor_get(whole), bytes(model))

    # Full writes, read back whole.
    for name in ("f32_a", "f16", "q8_a", "q8_big", "f32_1d"):
        data = rng.bytes(sizes[name])
        put(name, data)
        c.same(f"set_get_{name}", h.tensor_get(T[name]), data)
    expect("after_full_writes")
    # F32/F16 with real numbers too, checked as numbers.
    f16 = rng.standard_normal(512 * 8).astype(np.float16)
    put("f16", f16.tobytes())
    back = np.frombuffer(h.tensor_get(T["f16"]), np.float16)
    c.check("f16_values", np.array_equal(back.view(np.uint16), f16.view(np.uint16)))

    # Partial writes at nonzero (and odd) offsets.
    part = rng.bytes(1000)
    put("f32_a", part, 4100)
    c.same("partial_set_offset", h.tensor_get(T["f32_a"], 4100, 1000), part)
    put("q8_a", rng.bytes(7), sizes["q8_a"] - 7)  # the last bytes of the tensor
    put("f32_1d", rng.bytes(1), 0)
    # Partial reads.
    want = bytes(model[off["f32_a"] + 100: off["f32_a"] + 433])
    c.same("partial_get", h.tensor_get(T["f32_a"], 100, 333), want)
    want = bytes(model[off["q8_a"] + sizes["q8_a"] - 34: off["q8_a"] + sizes["q8_a"]])
    c.same("partial_get_tail", h.tensor_get(T["q8_a"], sizes["q8_a"] - 34, 34), want)
    expect("after_partial_writes")

    # COPY_TENSOR between two tensors of the same buffer.
    h.tensor_copy(T["f32_a"], T["f32_b"])
    model[off["f32_b"]: off["f32_b"] + sizes["f32_b"]] = \
        model[off["f32_a"]: off["f32_a"] + sizes["f32_a"]]
    c.same("copy_f32", h.tensor_get(T["f32_b"]), h.tensor_get(T["f32_a"]))
    h.tensor_copy(T["q8_a"], T["q8_b"])
    model[off["q8_b"]: off["q8_b"] + sizes["q8_b"]] = \
        model[off["q8_a"]: off["q8_a"] + sizes["q8_a"]]
    c.same("copy_q8_0", h.tensor_get(T["q8_b"]), bytes(model[off["q8_a"]: off["q8_a"] + sizes["q8_a"]]))
    expect("after_copy")

    # MEMSET_TENSOR on a region, and on a whole tensor.
    h.tensor_memset(T["f32_b"], 0xAB, 128, 1000)
    model[off["f32_b"] + 128: off["f32_b"] + 1128] = b"\xab" * 1000
    c.same("memset_region", h.tensor_get(T["f32_b"]),
           bytes(model[off["f32_b"]: off["f32_b"] + sizes["f32_b"]]))
    h.tensor_memset(T["f16"], 0x00, 0, sizes["f16"])
    model[off["f16"]: off["f16"] + sizes["f16"]] = bytes(sizes["f16"])
    c.same("memset_whole_tensor", h.tensor_get(T["f16"]), bytes(sizes["f16"]))
    expect("after_memset")

    # BUFFER_CLEAR with a nonzero value reaches every byte.
    h.buffer_clear(buf, 0x5A)
    model[:] = b"\x5a" * buf_size
    c.same("clear_tensor", h.tensor_get(T["q8_big"]), b"\x5a" * sizes["q8_big"])
    expect("after_clear")

    h.buffer_free(buf)  # FREE_BUFFER
    h.free_context(ctx)
    # The server still answers (a fresh connection: freeing the last buffer closed the old one).
    free3, total3 = h.dev_memory(dev)
    c.check("memory_after_free>0", free3 > 0 and total3 > 0, f"free={free3} total={total3}")
    c.check("done", True)


def cache(c: Checks, endpoint: str, seed: int, size: int) -> None:
    dev, buft = connect(c, endpoint)
    data = payload(seed, size)
    c.info["payload_size"] = size
    try:
        from rpcserver.protocol import fnv1a_64
        c.info["hash"] = "%016x" % fnv1a_64(data)
    except ImportError:
        pass
    buf = h.alloc_buffer(buft, align_up(size, c.info["alignment"]) + 4096)
    h.buffer_set_usage(buf, h.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
    ctx = h.new_context(2)
    t = h.new_tensor(ctx, GGML_TYPE_I8, size, name="weights")
    h.tensor_alloc(buf, t, 0)
    # size > HASH_THRESHOLD in a WEIGHTS buffer: SET_TENSOR_HASH, then SET_TENSOR if it missed.
    h.tensor_set(t, data)
    c.same("weights_read_back", h.tensor_get(t), data)
    h.buffer_free(buf)
    h.free_context(ctx)
    c.check("done", True)


def main(argv) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    c = Checks()
    try:
        if len(argv) >= 5 and argv[2] == "cache":
            cache(c, argv[1], int(argv[3]), int(argv[4]))
        elif len(argv) == 2:
            basic(c, argv[1])
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Exception as exc:  # noqa: BLE001  (reported in the JSON)
        traceback.print_exc()
        c.errors.append(f"{type(exc).__name__}: {exc}")
    return c.emit()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
