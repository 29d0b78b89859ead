//! Time of one training evaluation (loss and gradient over all rows) of a small softmax
//! classifier, the unit of L-BFGS's cost.
//!
//! `cargo run --release --example bench_train [n d K reps]` (default 50000 256 100 9);
//! with `BENCH_DATA=DIR`, the features and labels are `DIR/x.npy` and `DIR/y.npy`, and n
//! and d come from the file (`python3 scripts/sklearn_reference.py --save-synthetic DIR`
//! writes scikit-learn's speed problem there). `ONLY_EVAL=1` runs the loss once, so that a
//! profile sees mostly the closing metrics pass (`train::evaluate`); `ONLY_LOSS=1` skips
//! that pass, so that a profile sees only the loss and gradient.

use softmax_layer::MatRef;
use softmax_layer::train::{Data, Model, evaluate, loss_and_gradient};
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).filter_map(|s| s.parse().ok()).collect();
    let (n, d, k, reps) = (
        a.first().copied().unwrap_or(50000),
        a.get(1).copied().unwrap_or(256),
        a.get(2).copied().unwrap_or(100),
        a.get(3).copied().unwrap_or(9),
    );
    let mut s = 1u64;
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    // BENCH_DATA=DIR reads DIR/x.npy (f32 [n, d]) and DIR/y.npy instead (n and d from the file).
    let (x, y, n, d) = match std::env::var("BENCH_DATA") {
        Ok(dir) => {
            let x = softmax_layer::io::read_npy(&std::path::Path::new(&dir).join("x.npy")).unwrap();
            let (n, d) = x.as_matrix_shape().unwrap();
            let y = softmax_layer::io::read_npy(&std::path::Path::new(&dir).join("y.npy")).unwrap();
            (x.to_f32().unwrap().into_owned(), y.to_i64().unwrap(), n, d)
        }
        Err(_) => {
            let x: Vec<f32> = (0..n * d).map(|_| next()).collect();
            (x, (0..n).map(|i| (i * 7919 % k) as i64).collect(), n, d)
        }
    };
    let model = Model { weight: (0..k * d).map(|_| next() * 0.1).collect(), bias: vec![0.0; k], classes: k, dim: d };
    let (mut gw, mut gb) = (vec![0f32; k * d], vec![0f32; k]);
    let xv = MatRef::new(&x, n, d).unwrap();
    let data = Data::new(xv, &y).unwrap();
    let cpu0 = cpu_seconds();
    let mut times = vec![];
    for _ in 0..if std::env::var("ONLY_EVAL").is_ok() { 1 } else { reps } {
        let t = Instant::now();
        std::hint::black_box(loss_and_gradient(&model, data, &mut gw, &mut gb).unwrap());
        times.push(t.elapsed().as_secs_f64());
    }
    let cpu = (cpu_seconds() - cpu0) / reps as f64;
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let flops = 2.0 * 2.0 * n as f64 * d as f64 * k as f64;
    println!(
        "loss_and_gradient n={n} d={d} K={k}: median {:.1} ms, {:.0} GFLOP/s (2 products)",
        med * 1e3,
        flops / med / 1e9
    );
    // CPU time is less disturbed than wall time by other processes on a shared machine.
    println!("  CPU time per evaluation (all threads): {:.1} ms", cpu * 1e3);
    if std::env::var("ONLY_LOSS").is_ok() {
        return;
    }
    // The metrics pass that ends a run (loss and accuracy): one fused forward product.
    let mut times = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        std::hint::black_box(evaluate(&model, data).unwrap());
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "evaluate (loss, accuracy): median {:.1} ms, {:.0} GFLOP/s (1 product)",
        med * 1e3,
        flops / 2.0 / med / 1e9
    );
}

/// User + system CPU seconds of this process so far, from /proc (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the ")".
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}
