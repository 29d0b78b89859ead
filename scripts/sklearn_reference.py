#!/usr/bin/env python3
"""Reference values from scikit-learn's LogisticRegression, for the training tests and the
speed comparison. Needs numpy, scikit-learn and safetensors (never needed by the tests).

    python3 scripts/sklearn_reference.py            # writes tests/fixtures/digits.safetensors
    python3 scripts/sklearn_reference.py --speed    # times sklearn against `softmax-layer train`

The objective both sides minimize is the mean log-loss + (λ/2)·‖W‖², λ = 1/(C·n), which is
scikit-learn's C·Σ loss + ½‖W‖² divided by C·n; the intercept is not penalized.
"""
import argparse, json, os, subprocess, sys, tempfile, time
import numpy as np


def objective(clf, X, y, lam):
    from sklearn.metrics import log_loss
    p = clf.predict_proba(X)
    ll = log_loss(y, p, labels=np.arange(p.shape[1]))
    return ll + 0.5 * lam * float((clf.coef_.astype(np.float64) ** 2).sum()), ll


def digits():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from safetensors.numpy import save_file
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    n = X.shape[0]
    lam = 1.0 / n
    t = time.perf_counter()
    clf = LogisticRegression(C=1.0, max_iter=100000, tol=1e-12).fit(X.astype(np.float64), y)
    secs = time.perf_counter() - t
    obj, ll = objective(clf, X.astype(np.float64), y, lam)
    acc = float((clf.predict(X) == y).mean())
    print(f"digits: n={n}, objective={obj:.10f}, log-loss={ll:.6f}, accuracy={acc:.4f}, {secs:.2f} s")
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "digits.safetensors")
    save_file({
        "features": X,
        "labels": y.astype(np.int64),
        "sklearn_coef": np.ascontiguousarray(clf.coef_, dtype=np.float64),
        "sklearn_intercept": np.ascontiguousarray(clf.intercept_, dtype=np.float64),
        "sklearn_objective": np.array([obj, ll, acc, lam], dtype=np.float64),
    }, out)
    print("wrote", os.path.normpath(out))


def synthetic(n=50000, d=256, k=100, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    W = rng.standard_normal((k, d)) * scale
    z = X.astype(np.float64) @ W.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    u = rng.random((n, 1))
    y = (p.cumsum(1) < u).sum(1).clip(0, k - 1).astype(np.int64)
    return X, y


def speed():
    from sklearn.linear_model import LogisticRegression
    X, y = synthetic()
    n = X.shape[0]
    lam = 1.0 / n
    t = time.perf_counter()
    clf = LogisticRegression(C=1.0).fit(X, y)
    sk = time.perf_counter() - t
    obj, ll = objective(clf, X, y, lam)
    print(f"sklearn lbfgs: {sk:.2f} s, objective {obj:.6f}, log-loss {ll:.6f}, iterations {clf.n_iter_[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/x.npy", X)
        np.save(f"{tmp}/y.npy", y)
        exe = os.path.join(os.path.dirname(__file__), "..", "target", "release", "softmax-layer")
        cmd = [exe, "train", "--features", f"{tmp}/x.npy", "--labels", f"{tmp}/y.npy", "--optimizer", "lbfgs",
               "--l2", repr(lam), "--target-objective", repr(obj), "-o", f"{tmp}/m.safetensors", "--json"]
        def timed(cmd):
            t = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True)
            secs = time.perf_counter() - t
            if res.returncode != 0:
                sys.exit(res.stderr)
            return secs, json.loads(res.stdout.strip().splitlines()[-1])
        ours, summary = timed(cmd)
        print(f"softmax-layer lbfgs to sklearn's objective: {ours:.2f} s (whole process, loading included), "
              f"objective {summary['objective']:.6f}, iterations {summary['steps']}")
        print(f"ratio sklearn / ours: {sk / ours:.1f}x")
        full, s2 = timed([c for c in cmd if c not in ("--target-objective", repr(obj))])
        print(f"softmax-layer lbfgs to convergence (max |grad| <= 1e-5): {full:.2f} s, objective {s2['objective']:.6f}, "
              f"iterations {s2['steps']}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--save-synthetic", metavar="DIR",
                    help="write the speed problem's features and labels as DIR/x.npy and DIR/y.npy, then stop")
    a = ap.parse_args()
    if a.save_synthetic:
        X, y = synthetic()
        os.makedirs(a.save_synthetic, exist_ok=True)
        np.save(os.path.join(a.save_synthetic, "x.npy"), X)
        np.save(os.path.join(a.save_synthetic, "y.npy"), y)
    elif a.speed:
        speed()
    else:
        digits()
