"""The CUDA path (runs only where a GPU is present; CI machines have none and skip it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import geoseg
from tests.conftest import conv_net

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]


def test_cuda_equals_cpu_and_uses_the_gpu(make_raster, tmp_path) -> None:
    src = make_raster(600, 700, seed=41)
    net = conv_net(depth=3)
    with geoseg.scheduler("threads"):
        cpu = geoseg.predict(src, net, tile=128, halo=8, device="cpu").values
        report = geoseg.write(geoseg.predict(src, net, tile=128, halo=8, device="cuda", batch_size=8), tmp_path / "gpu")
    import rasterio

    with rasterio.open(tmp_path / "gpu" / "mask.tif") as m:
        gpu = m.read(1)
    assert report["device"]["used"].startswith("cuda")
    # cuDNN and CPU kernels differ in the last bits: allow a handful of near-tie pixels
    assert (gpu != cpu).mean() < 1e-3


def test_autocast_bf16_runs(make_raster) -> None:
    src = make_raster(300, 300, seed=42)
    with geoseg.scheduler("threads"):
        mask = geoseg.predict(src, conv_net(depth=3), tile=128, halo=8, device="cuda", precision="bf16").values
    assert mask.shape == (300, 300) and (mask != 255).all()
    assert len(np.unique(mask)) >= 1


def test_fast_is_fp16_autocast_on_a_gpu_and_agrees_with_fp32(make_raster, tmp_path) -> None:
    import rasterio

    src = make_raster(400, 400, seed=43)
    net = conv_net(depth=3)
    with geoseg.scheduler("threads"):
        ref = geoseg.predict(src, net, tile=128, halo=8, device="cuda").values
        report = geoseg.write(geoseg.predict(src, net, tile=128, halo=8, device="cuda", precision="fast"), tmp_path / "f")
    assert report["model"]["precision"] == "fp16" and report["parameters"]["precision"] == "fast"
    with rasterio.open(tmp_path / "f" / "mask.tif") as m:
        fast = m.read(1)
    assert (fast == ref).mean() >= 0.95  # a random net: near-ties everywhere; real models agree >= 99.5 % (test_precision)


def test_one_worker_per_gpu_on_the_default_cluster(make_raster, tmp_path) -> None:
    """``auto`` with GPUs starts worker processes, one per GPU, however small the job."""
    src = make_raster(300, 300, seed=44)
    with geoseg.scheduler("auto", chunks=1) as sched:
        report = geoseg.write(geoseg.predict(src, conv_net(depth=3), tile=128, halo=8), tmp_path / "g")
    assert sched.kind == "local" and sched.processes and sched.workers == torch.cuda.device_count()
    assert report["device"]["used"].startswith("cuda")
