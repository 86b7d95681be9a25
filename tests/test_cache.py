"""The local tensor cache: llama.cpp's directory rules and file names, atomic writes, corruption."""

import os

import numpy as np
import pytest

from rpcserver.cache import LocalCache, default_cache_dir
from rpcserver.client import RpcClient
from rpcserver.plugins import discover
from rpcserver.protocol import fnv1a_64, make_tensor
from rpcserver.server import Server


# Published FNV-1a 64-bit test vectors (Fowler/Noll/Vo reference test suite).
@pytest.mark.parametrize("data,digest", [
    (b"", 0xCBF29CE484222325),
    (b"a", 0xAF63DC4C8601EC8C),
    (b"foobar", 0x85944171F73967E8),
])
def test_fnv1a_64_matches_reference_vectors(data, digest):
    assert fnv1a_64(data) == digest
    assert fnv1a_64(memoryview(bytearray(data))) == digest


def test_cache_dir_follows_llama_cpp_rules(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "lc"))
    assert default_cache_dir() == tmp_path / "lc" / "rpc"
    monkeypatch.delenv("LLAMA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "llama.cpp" / "rpc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "llama.cpp" / "rpc"


def test_store_names_file_by_hash_and_leaves_no_temporaries(tmp_path):
    cache = LocalCache(tmp_path)
    data = np.random.default_rng(0).bytes(1 << 20)
    path = cache.store(data)
    assert path.name == "%016x" % fnv1a_64(data)
    assert len(path.name) == 16 and path.name == path.name.lower()
    assert path.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == [path.name]
    assert cache.load(fnv1a_64(data), max_size=len(data)) == data


def test_corrupt_file_is_a_miss_and_is_removed(tmp_path, caplog):
    cache = LocalCache(tmp_path)
    data = b"x" * 4096
    path = cache.store(data)
    corrupted = bytearray(data)
    corrupted[100] ^= 0xFF
    path.write_bytes(corrupted)
    assert cache.load(fnv1a_64(data), max_size=len(data)) is None
    assert not path.exists()
    assert "corrupt" in caplog.text and path.name in caplog.text


def test_file_larger_than_the_tensor_is_a_miss(tmp_path):
    cache = LocalCache(tmp_path)
    data = b"y" * 1000
    cache.store(data)
    assert cache.load(fnv1a_64(data), max_size=999) is None
    assert cache.load(fnv1a_64(data), max_size=1000) == data


@pytest.fixture
def cached_server(tmp_path):
    cpu = discover().find("CPU").device
    server = Server([cpu], port=0, cache=LocalCache(tmp_path / "rpc")).start()
    yield server
    server.stop()


def _tensor_in_new_buffer(client, nbytes):
    ptr, _ = client.alloc_buffer(0, nbytes)
    base = client.buffer_get_base(ptr)
    return make_tensor(id=1, type=0, buffer=ptr, ne=(nbytes // 4,), data=base)


def test_set_tensor_with_cache_flag_then_hash_hit_from_another_client(cached_server):
    data = np.random.default_rng(1).standard_normal(1 << 18).astype(np.float32).tobytes()
    digest = fnv1a_64(data)
    with RpcClient(port=cached_server.port) as first:
        t = _tensor_in_new_buffer(first, len(data))
        assert not first.set_tensor_hash(t, 0, digest)  # empty cache: miss
        first.set_tensor(t, 0, data, cache=True)
        assert first.get_tensor(t, 0, len(data)) == data
    stored = cached_server.cache.directory / ("%016x" % digest)
    assert stored.read_bytes() == data

    with RpcClient(port=cached_server.port) as second:
        t = _tensor_in_new_buffer(second, len(data))
        assert second.set_tensor_hash(t, 0, digest)  # hit: no data sent
        assert second.get_tensor(t, 0, len(data)) == data


def test_corrupted_cache_entry_is_not_served(cached_server):
    data = bytes(range(256)) * 64
    digest = fnv1a_64(data)
    path = cached_server.cache.store(data)
    path.write_bytes(b"\0" * len(data))
    with RpcClient(port=cached_server.port) as client:
        t = _tensor_in_new_buffer(client, len(data))
        client.buffer_clear(t.buffer, 0x55)
        assert not client.set_tensor_hash(t, 0, digest)
        assert client.get_tensor(t, 0, 16) == b"\x55" * 16  # nothing was written from the bad file
    assert not path.exists()
