"""engine.device_region on a CUDA device: a region's views are ordinary tensors for torch's kernels, `unmap` gives
its memory back to the driver, and `map` brings memory back at the same addresses (contents undefined), so a CUDA
graph captured on the region's views replays after an unmap and map."""

import pytest
import torch

from engine.device_region import BumpAllocator, DeviceRegion

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NUM_BYTES = 256 << 20


def test_views_compute_and_the_memory_comes_back_at_the_same_addresses():
    device = torch.device("cuda", torch.cuda.current_device())
    free_before = torch.cuda.mem_get_info()[0]
    region = DeviceRegion(NUM_BYTES, device)
    try:
        assert free_before - torch.cuda.mem_get_info()[0] >= NUM_BYTES
        bump = BumpAllocator(region)
        a, b = bump.take((1024, 1024), torch.bfloat16), bump.take((1024,), torch.float32)
        assert b.data_ptr() - a.data_ptr() == 1024 * 1024 * 2 and a.device == device
        a.copy_(torch.randn(1024, 1024, device=device))
        x = torch.randn(4, 1024, device=device, dtype=torch.bfloat16)
        torch.testing.assert_close(x @ a, x @ a.clone())
        address = a.data_ptr()
        torch.cuda.synchronize()
        free_mapped = torch.cuda.mem_get_info()[0]  # after cuBLAS loaded its kernels and torch cached blocks
        region.unmap()
        assert not region.mapped and torch.cuda.mem_get_info()[0] - free_mapped >= NUM_BYTES
        region.map()
        again = BumpAllocator(region).take((1024, 1024), torch.bfloat16)
        assert again.data_ptr() == address
        again.fill_(1.0)
        assert a.sum().item() == 1024 * 1024  # the old view reads the new memory: the same addresses
    finally:
        region.close()


def test_a_graph_captured_on_a_region_replays_after_unmap_and_map():
    device = torch.device("cuda", torch.cuda.current_device())
    region = DeviceRegion(4 << 20, device)
    try:
        weight = BumpAllocator(region).take((64, 64), torch.float32)
        weight.copy_(torch.eye(64, device=device))
        x = torch.randn(8, 64, device=device)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            x @ weight  # warm-up, as torch asks before a capture
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            out = x @ weight
        region.unmap()
        region.map()
        weight.copy_(2 * torch.eye(64, device=device))  # the "weights" copied back after a wake
        graph.replay()
        torch.testing.assert_close(out, 2 * x)
    finally:
        region.close()
