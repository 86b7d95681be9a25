"""A test-only rpcserver plugin: the CUDA plugin on the host stand-in, as device ``CUDA-host``.

``rpcserver serve -d CUDA-host`` then runs the CUDA plugin's buffers, transfers, executor
path and kernels (compiled for the host, see cuda_standin.py) behind the real server, so a
stock llama.cpp client can drive them end to end without a GPU. It is declared through a
``*.dist-info`` shim on PYTHONPATH (:func:`server_env`), never installed.
"""

from __future__ import annotations

import os
from pathlib import Path

from rpcserver.device import Backend
from rpcserver.hookspecs import ENTRY_POINT_GROUP, hookimpl

HERE = Path(__file__).resolve().parent
#: host memory the stand-in lets clients allocate
CAPACITY = 8 << 30


class CudaHostBackend(Backend):
    name = "cuda-host"

    def devices(self, options):
        import cuda_standin

        return [cuda_standin.fake_device(capacity=CAPACITY)]


@hookimpl
def rpcserver_backends():
    return [CudaHostBackend()]


def server_env(directory: Path) -> dict:
    """PYTHONPATH for a server process that should offer CUDA-host (a shim under ``directory``)."""
    info = directory / "cuda_host_plugin-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rpcserver-cuda-host-test\n"
                                   "Version: 0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ncuda-host = cuda_host_plugin\n")
    paths = [str(directory), str(HERE), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
