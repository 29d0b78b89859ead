#!/usr/bin/env python3
"""Side-by-side timing of the row kernels against PyTorch on 2 threads, interleaved.

    cargo build --release --examples
    python3 scripts/compare_torch.py [--only rows|layer] [--rounds 3] [--repeats 7]

For each shape and op, each round times PyTorch (median of --repeats calls, out of place)
then ours (the bench_rows example, same shape, same distribution of logits, median of
--repeats), and prints the median over rounds of each and their ratio. A plain copy and a
plain read of the same bytes are timed in the same run, for reference.
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXE = os.path.join(ROOT, "target", "release", "examples", "bench_rows")
EXE_LAYER = os.path.join(ROOT, "target", "release", "examples", "bench_layer")


def torch_median(op, x, repeats):
    f = {
        "softmax": lambda: torch.softmax(x, dim=-1),
        "log_softmax": lambda: torch.log_softmax(x, dim=-1),
        "logsumexp": lambda: torch.logsumexp(x, dim=-1),
    }[op]
    return timed(f, repeats)


def ours_median(op, n, v, repeats):
    out = subprocess.run([EXE, op, str(n), str(v), str(repeats)], check=True, capture_output=True, text=True,
                         env=dict(os.environ, RAYON_NUM_THREADS="2"))
    return json.loads(out.stdout)["median_s"]


def ours_layer(op, n, d, v, repeats, k=10):
    out = subprocess.run([EXE_LAYER, op, str(n), str(d), str(v), str(repeats), str(k)], check=True,
                         capture_output=True, text=True, env=dict(os.environ, RAYON_NUM_THREADS="2"))
    return json.loads(out.stdout)


def timed(f, repeats):
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        y = f()
        ts.append(time.perf_counter() - t)
        del y
    return statistics.median(ts)


def layer(args):
    import torch.nn.functional as F
    n, d, v, k = 2048, 768, 50257, 10
    g = torch.Generator().manual_seed(0)
    h = torch.rand(n, d, generator=g) * 2 - 1
    w = (torch.rand(v, d, generator=g) * 2 - 1) * (3.0 / d) ** 0.5
    y = torch.randint(0, v, (n, 1), generator=g)
    torch_ops = {
        "gemm": lambda: h @ w.T,
        "logsumexp": lambda: torch.logsumexp(F.linear(h, w), -1),
        "target_log_probs": lambda: torch.log_softmax(F.linear(h, w), -1).gather(1, y),
        "top_k": lambda: torch.topk(F.linear(h, w), k, dim=-1),
    }
    print(f"\nlayer n={n} d={d} V={v} (ours: GFLOP/s counts the product; heap = peak extra MiB)")
    print(f"{'op':>18} {'torch ms':>10} {'ours ms':>10} {'speedup':>8} {'ours/gemm':>10} {'heap MiB':>9}")
    res = {}
    for op, f in torch_ops.items():
        tt, oo, heap = [], [], 0.0
        for _ in range(args.rounds):
            tt.append(timed(f, max(3, args.repeats // 2)))
            r = ours_layer(op, n, d, v, max(3, args.repeats // 2), k)
            oo.append(r["median_s"])
            heap = r["peak_extra_heap_mib"]
        res[op] = (statistics.median(tt), statistics.median(oo), heap)
    for op, (t, o, heap) in res.items():
        print(f"{op:>18} {t * 1e3:10.1f} {o * 1e3:10.1f} {t / o:7.2f}x {o / res['gemm'][1]:10.3f} {heap:9.2f}")
    print(f"{'':>18} torch gemm {2 * n * d * v / res['gemm'][0] / 1e9:.0f} GFLOP/s, "
          f"ours {2 * n * d * v / res['gemm'][1] / 1e9:.0f} GFLOP/s (gemm crate baseline)")
    # The fused loss, forward + backward, against PyTorch eager and three bare products.
    hg = h.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    yy = y[:, 0]

    def torch_loss():
        hg.grad = None
        wg.grad = None
        loss = F.cross_entropy(F.linear(hg, wg), yy)
        loss.backward()
        return loss.detach()

    tt, oo = [], []
    for _ in range(args.rounds):
        tt.append(timed(torch_loss, 3))
        oo.append(ours_layer("loss_grad", n, d, v, 3)["median_s"])
    t, o = statistics.median(tt), statistics.median(oo)
    g3 = 3 * res["gemm"][1]
    print(f"\nloss fwd+bwd n={n} d={d} V={v}: torch {t * 1e3:.0f} ms, ours {o * 1e3:.0f} ms ({t / o:.2f}x); "
          f"ours / (3 bare products) = {o / g3:.2f}")
    del h, w, hg, wg
    # The decode step: one row, d=4096, V=128256, logits + softmax.
    n, d, v = 1, 4096, 128256
    h = torch.rand(n, d, generator=g) * 2 - 1
    w = (torch.rand(v, d, generator=g) * 2 - 1) * (3.0 / d) ** 0.5
    tt, oo, rr = [], [], []
    for _ in range(args.rounds):
        tt.append(timed(lambda: torch.softmax(F.linear(h, w), -1), args.repeats))
        oo.append(ours_layer("probs", n, d, v, args.repeats)["median_s"])
        rr.append(ours_layer("read", n, d, v, args.repeats)["median_s"])
    t, o, r = statistics.median(tt), statistics.median(oo), statistics.median(rr)
    gb = v * d * 4 / 1e9
    print(f"\ndecode n=1 d={d} V={v}: torch {t * 1e3:.1f} ms ({gb / t:.1f} GB/s over W), "
          f"ours {o * 1e3:.1f} ms ({gb / o:.1f} GB/s), plain read of W {r * 1e3:.1f} ms ({gb / r:.1f} GB/s); "
          f"ours = {r / o:.2f} of read bandwidth")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", choices=["rows", "layer"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only != "rows":
        layer(args)
    if args.only == "layer":
        return
    print(f"{'shape':>16} {'op':>12} {'torch ms':>10} {'ours ms':>10} {'speedup':>8}")
    for n, v in [(2048, 50257), (8, 1_000_003)]:
        x = torch.rand(n, v) * 24 - 12
        ours = {}
        for op in ["softmax", "log_softmax", "logsumexp"]:
            tt, oo = [], []
            for _ in range(args.rounds):
                tt.append(torch_median(op, x, args.repeats))
                oo.append(ours_median(op, n, v, args.repeats))
            t, o = statistics.median(tt), statistics.median(oo)
            ours[op] = o
            print(f"{f'[{n}, {v}]':>16} {op:>12} {t * 1e3:10.2f} {o * 1e3:10.2f} {t / o:7.2f}x")
        for op in ["copy", "read"]:
            o = statistics.median(ours_median(op, n, v, args.repeats) for _ in range(args.rounds))
            ours[op] = o
            print(f"{f'[{n}, {v}]':>16} {op:>12} {'':>10} {o * 1e3:10.2f}")
        print(f"{'':>16} throughput as a fraction of the copy (softmax, log_softmax) or the read (logsumexp): "
              f"{ours['copy'] / ours['softmax']:.2f}, {ours['copy'] / ours['log_softmax']:.2f}, "
              f"{ours['read'] / ours['logsumexp']:.2f}")
        del x


if __name__ == "__main__":
    main()
