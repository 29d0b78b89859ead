#!/usr/bin/env python3
"""One PyTorch forward + backward of F.linear + F.cross_entropy at n=2048, d=768,
V=50257 on 2 threads, for a peak-RSS comparison with ours:

    /usr/bin/time -v python3 scripts/torch_loss_rss.py
    /usr/bin/time -v target/release/examples/bench_layer loss_grad 2048 768 50257 1
"""
import torch
import torch.nn.functional as F

torch.set_num_threads(2)
n, d, v = 2048, 768, 50257
h = (torch.rand(n, d) * 2 - 1).requires_grad_()
w = ((torch.rand(v, d) * 2 - 1) * (3.0 / d) ** 0.5).requires_grad_()
y = torch.randint(0, v, (n,))
loss = F.cross_entropy(F.linear(h, w), y)
loss.backward()
print(float(loss))
