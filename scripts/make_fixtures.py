#!/usr/bin/env python3
"""Writes the PyTorch reference fixtures in tests/fixtures/ (run from the repo root).

    python3 scripts/make_fixtures.py

Needs torch and safetensors. The tests read the committed files and need neither.
Every fixture holds its inputs and PyTorch's outputs, computed in float64 from the float32
inputs (so that the reference carries no float32 rounding of its own).
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")


def layer_forward():
    g = torch.Generator().manual_seed(1234)
    n, d, v = 7, 24, 301
    h = torch.randn(n, d, generator=g, dtype=torch.float32)
    w = torch.randn(v, d, generator=g, dtype=torch.float32) / d ** 0.5
    b = torch.randn(v, generator=g, dtype=torch.float32) * 0.5
    y = torch.randint(0, v, (n,), generator=g, dtype=torch.int64)
    t = 0.7
    logits = F.linear(h.double(), w.double(), b.double())
    lp = torch.log_softmax(logits / t, dim=-1)
    top = torch.topk(lp, 5, dim=-1)
    save_file(
        {
            "hidden": h, "weight": w, "bias": b, "targets": y,
            "temperature": torch.tensor([t], dtype=torch.float32),
            "logits": logits, "log_probs": lp, "logsumexp": torch.logsumexp(logits / t, dim=-1),
            "target_log_probs": lp.gather(1, y[:, None])[:, 0],
            "argmax": logits.argmax(dim=-1), "topk_values": top.values, "topk_indices": top.indices,
        },
        os.path.join(OUT, "layer_forward.safetensors"),
    )


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    layer_forward()
    print("wrote", OUT)
