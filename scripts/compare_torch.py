#!/usr/bin/env python3
"""Side-by-side timing of the row kernels against PyTorch on 2 threads, interleaved.

    cargo build --release --example bench_rows
    python3 scripts/compare_torch.py [--rounds 3] [--repeats 7]

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


def torch_median(op, x, repeats):
    f = {
        "softmax": lambda: torch.softmax(x, dim=-1),
        "log_softmax": lambda: torch.log_softmax(x, dim=-1),
        "logsumexp": lambda: torch.logsumexp(x, dim=-1),
    }[op]
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        y = f()
        ts.append(time.perf_counter() - t)
        del y
    return statistics.median(ts)


def ours_median(op, n, v, repeats):
    out = subprocess.run([EXE, op, str(n), str(v), str(repeats)], check=True, capture_output=True, text=True,
                         env=dict(os.environ, RAYON_NUM_THREADS="2"))
    return json.loads(out.stdout)["median_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':>16} {'op':>12} {'torch ms':>10} {'ours ms':>10} {'speedup':>8}")
    for n, v in [(2048, 50257), (8, 1_000_003)]:
        x = torch.rand(n, v) * 24 - 12
        for op in ["softmax", "log_softmax", "logsumexp"]:
            tt, oo = [], []
            for _ in range(args.rounds):
                tt.append(torch_median(op, x, args.repeats))
                oo.append(ours_median(op, n, v, args.repeats))
            t, o = statistics.median(tt), statistics.median(oo)
            print(f"{f'[{n}, {v}]':>16} {op:>12} {t * 1e3:10.1f} {o * 1e3:10.1f} {t / o:7.2f}x")
        for op in ["copy", "read"]:
            o = statistics.median(ours_median(op, n, v, args.repeats) for _ in range(args.rounds))
            print(f"{f'[{n}, {v}]':>16} {op:>12} {'':>10} {o * 1e3:10.1f}")
        del x


if __name__ == "__main__":
    main()
