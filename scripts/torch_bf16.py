"""PyTorch's bf16 baselines for examples/bench_bf16.rs, on 2 threads, medians of REPEATS.

    python3 scripts/torch_bf16.py [REPEATS]

Prints one JSON line per figure: the bf16 product H @ W.T and the bf16 target
log-probs log_softmax(F.linear(H, W).float()).gather(...), at n=2048, d=768, V=50257;
with a second argument `loss`, also the fp32 eager cross-entropy forward + backward
(F.cross_entropy(F.linear(H, W), y).backward()), the issue's baseline for the bf16 loss.
"""
import json
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
n, d, v = 2048, 768, 50257
g = torch.Generator().manual_seed(0)
h = (torch.rand(n, d, generator=g) * 2 - 1).bfloat16()
s = (3.0 / d) ** 0.5
w = ((torch.rand(v, d, generator=g) * 2 - 1) * s).bfloat16()
y = torch.randint(0, v, (n,), generator=g)


def median(f):
    f()
    t = []
    for _ in range(reps):
        a = time.perf_counter()
        f()
        t.append(time.perf_counter() - a)
    t.sort()
    return t[len(t) // 2]


with torch.no_grad():
    m = median(lambda: h @ w.T)
    print(json.dumps({"what": "torch_bf16_product", "n": n, "d": d, "v": v, "median_s": round(m, 6),
                      "gflops": round(2 * n * d * v / m / 1e9, 1), "torch": torch.__version__}))
    m = median(lambda: F.log_softmax(F.linear(h, w).float(), -1).gather(1, y[:, None]))
    print(json.dumps({"what": "torch_bf16_target_log_probs", "n": n, "d": d, "v": v, "median_s": round(m, 6)}))

if len(sys.argv) > 2 and sys.argv[2] == "loss":
    hf = h.float().requires_grad_()
    wf = w.float().requires_grad_()

    def step():
        hf.grad = None
        wf.grad = None
        F.cross_entropy(F.linear(hf, wf), y).backward()

    m = median(step)
    print(json.dumps({"what": "torch_fp32_loss_forward_backward", "n": n, "d": d, "v": v, "median_s": round(m, 6)}))
