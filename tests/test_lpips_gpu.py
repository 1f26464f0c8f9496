"""LPIPS on CUDA: numpy and IO binding (CUDA tensors, CUDA graphs) against the CPU model.
Skipped cleanly without a CUDA GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptual_engine import Engine
from perceptual_engine.runtime import ProviderOptions
from perceptual_engine.runtime.providers import cuda_gpu_count

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or cuda_gpu_count()[0] == 0,
                       reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_lpips_cuda_matches_cpu(lpips_models, rel_err, cuda_graph):
    path = lpips_models["fp32"][0]  # spatial and grad.x outputs
    rng = np.random.default_rng(3)
    x, y = (rng.uniform(-1, 1, (2, 3, 48, 64)).astype(np.float32) for _ in range(2))
    want = Engine(path, "cpu").distance(x, y)
    opts = ProviderOptions(tf32=False, fixed_shapes=True, cuda_graph=cuda_graph)
    engine = Engine(path, "cuda", options=opts)
    got_np = engine.distance(x, y)
    xt, yt = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    for _ in range(2):  # the second call replays a captured graph when cuda_graph
        got_t = engine.distance(xt, yt)
    for name, ref in want.items():
        assert rel_err(got_np[name], ref) <= 1e-4, name
        assert got_t[name].is_cuda and rel_err(got_t[name].cpu().numpy(), ref) <= 1e-4, name
