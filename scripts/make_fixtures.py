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


# --- cross-entropy -------------------------------------------------------------------

REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}


def splitmix(seed, count):
    """SplitMix64 stream as uint64 (numpy), identical to the Rust tests' generator."""
    import numpy as np
    with np.errstate(over="ignore"):
        idx = np.arange(1, count + 1, dtype=np.uint64)
        z = np.uint64(seed) + idx * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(seed, count, scale):
    """Values (k / 2^24) * 2 - 1 times a power-of-two scale: exact in float32."""
    import numpy as np
    u = (splitmix(seed, count) >> np.uint64(40)).astype(np.float64) / 2.0 ** 24
    return torch.from_numpy(((u * 2 - 1) * scale).astype(np.float32))


def ce_reference(h, w, b, y, *, reduction, smoothing, weights, ignore_index, z_loss, softcap, temperature, upstream):
    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    x = F.linear(h64, w64, b64)
    z = softcap * torch.tanh(x / softcap) if softcap else x
    z = z / temperature
    wt = weights.double() if weights is not None else None
    loss = F.cross_entropy(z, y, weight=wt, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
    lse = torch.logsumexp(z, dim=-1)
    keep = (y != ignore_index).double()
    zl = z_loss * lse ** 2 * keep
    if reduction == "mean":
        loss = loss + zl.sum() / keep.sum()
    elif reduction == "sum":
        loss = loss + zl.sum()
    else:
        loss = loss + zl
    loss.backward(upstream.double() if reduction == "none" else torch.tensor(float(upstream)).double())
    return loss.detach(), lse.detach(), h64.grad, w64.grad, (b64.grad if b is not None else None)


def cross_entropy_cases():
    g = torch.Generator().manual_seed(99)
    n, d, v = 13, 11, 37
    cases = {
        "mean_basic": dict(reduction="mean", smoothing=0.0, weights=False, ignore=[], ignore_index=-100,
                           z_loss=0.0, softcap=None, temperature=1.0, bias=True, scale=1.0),
        "smooth_weights_ignore": dict(reduction="mean", smoothing=0.1, weights=True, ignore=[2, 5, 11],
                                      ignore_index=-100, z_loss=0.0, softcap=None, temperature=1.0, bias=True, scale=1.0),
        "none_upstream": dict(reduction="none", smoothing=0.05, weights=False, ignore=[4], ignore_index=-100,
                              z_loss=0.0, softcap=None, temperature=1.0, bias=False, scale=1.0),
        "softcap_temp_zloss": dict(reduction="mean", smoothing=0.0, weights=True, ignore=[0], ignore_index=-100,
                                   z_loss=1e-3, softcap=2.0, temperature=0.8, bias=True, scale=3.0),
        "sum_ignore_custom": dict(reduction="sum", smoothing=0.2, weights=True, ignore=[1, 7], ignore_index=5,
                                  z_loss=0.01, softcap=None, temperature=1.5, bias=False, scale=1.0),
    }
    out = {}
    for name, c in cases.items():
        h = torch.randn(n, d, generator=g, dtype=torch.float32) * c["scale"]
        w = torch.randn(v, d, generator=g, dtype=torch.float32) / d ** 0.5
        b = torch.randn(v, generator=g, dtype=torch.float32) if c["bias"] else None
        y = torch.randint(0, v, (n,), generator=g, dtype=torch.int64)
        # Targets equal to a custom ignore_index must not occur by chance in kept rows.
        if c["ignore_index"] >= 0:
            y[y == c["ignore_index"]] = (c["ignore_index"] + 1) % v
        for i in c["ignore"]:
            y[i] = c["ignore_index"]
        weights = torch.rand(v, generator=g, dtype=torch.float32) + 0.25 if c["weights"] else None
        up = torch.randn(n, generator=g, dtype=torch.float32) if c["reduction"] == "none" else torch.tensor([0.75])
        loss, lse, gh, gw, gb = ce_reference(
            h, w, b, y, reduction=c["reduction"], smoothing=c["smoothing"], weights=weights,
            ignore_index=c["ignore_index"], z_loss=c["z_loss"], softcap=c["softcap"],
            temperature=c["temperature"], upstream=up if c["reduction"] == "none" else 0.75)
        t = {
            "hidden": h, "weight": w, "targets": y, "upstream": up,
            "options": torch.tensor([REDUCTIONS[c["reduction"]], c["smoothing"], c["z_loss"], c["softcap"] or 0.0,
                                     c["temperature"], c["ignore_index"]], dtype=torch.float64),
            "loss": loss.reshape(-1), "lse": lse, "grad_hidden": gh, "grad_weight": gw,
        }
        if b is not None:
            t["bias"], t["grad_bias"] = b, gb
        if weights is not None:
            t["class_weights"] = weights
        out.update({f"{name}.{k}": x.contiguous() for k, x in t.items()})
    save_file(out, os.path.join(OUT, "cross_entropy.safetensors"))


def cross_entropy_big():
    """n=2048, d=768, V=50257, inputs from SplitMix64 (regenerated by the test), outputs
    in float64: loss, lse, dH, and dW on 256 sampled rows plus its Frobenius norm."""
    n, d, v = 2048, 768, 50257
    h = uniform(1, n * d, 1.0).reshape(n, d)
    w = uniform(2, v * d, 1.0 / 16).reshape(v, d)
    y = torch.from_numpy((splitmix(3, n) % v).astype("int64"))
    loss, lse, gh, gw, _ = ce_reference(h, w, None, y, reduction="mean", smoothing=0.0, weights=None,
                                        ignore_index=-100, z_loss=0.0, softcap=None, temperature=1.0, upstream=1.0)
    rows = torch.from_numpy((splitmix(4, 256) % v).astype("int64"))
    save_file({
        "loss": loss.reshape(-1), "lse": lse, "grad_hidden": gh.float(), "grad_weight_rows": rows,
        "grad_weight_sampled": gw[rows].float().contiguous(), "grad_weight_norm": gw.norm().reshape(1),
        "grad_hidden_norm": gh.norm().reshape(1),
    }, os.path.join(OUT, "cross_entropy_big.safetensors"))


if __name__ == "__main__":
    cross_entropy_cases()
    import sys
    if "--big" in sys.argv:
        cross_entropy_big()
    print("wrote cross-entropy fixtures")
