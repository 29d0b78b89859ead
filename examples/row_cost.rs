//! Cycles-per-element view of the row kernels, one thread: separates compute cost from
//! memory cost. `cargo run --release --example row_cost [SHORT_V]`
//!
//! First one cache-resident row of 50257 per instruction set; then 256 short rows of
//! `SHORT_V` classes (default 100, a classifier's logits), where the per-row overhead
//! shows: the online pass and the cross-entropy gradient, in ns per row.
use softmax_layer::kernels::{CeGradCoef, Isa, Kernels};
use std::time::Instant;

/// The best of 5 timings of `reps` calls of `f`, in ns per `per` units of work.
fn best_ns(reps: usize, per: usize, f: &mut dyn FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let s = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(s.elapsed().as_secs_f64() / (reps * per) as f64 * 1e9);
    }
    best
}

fn logits(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919) % 1000) as f32 / 40.0 - 12.0).collect()
}

fn main() {
    let v = 50257;
    let x = logits(v);
    let mut out = vec![0f32; v];
    for isa in Isa::available() {
        let k = Kernels::for_isa(isa).unwrap();
        let reps = if isa == Isa::Scalar { 50 } else { 2000 };
        let time = |f: &mut dyn FnMut()| best_ns(reps, v, f);
        let st = k.max_sum(&x, None, 1.0);
        let p1 = time(&mut || {
            std::hint::black_box(k.max_sum(std::hint::black_box(&x), None, 1.0));
        });
        let p1t = time(&mut || {
            std::hint::black_box(k.max_sum(std::hint::black_box(&x), None, 0.7));
        });
        let p2 = time(&mut || k.softmax_into(&x, None, 1.0, st, &mut out));
        let p2l = time(&mut || k.log_softmax_into(&x, None, 1.0, st, &mut out));
        let ex = time(&mut || k.exp(&x, &mut out));
        let mut bm = vec![0f32; v.div_ceil(Kernels::BLOCK)];
        let f1 = time(&mut || {
            std::hint::black_box(k.softmax_pass1(&mut out, Some(&x), None, 1.0, &mut bm));
        });
        let f2 = time(&mut || k.rescale(&mut out, &bm, 1.0, st));
        println!(
            "{isa:>10}: max_sum {p1:.3} ns/elem (T!=1: {p1t:.3}), softmax write {p2:.3}, log_softmax write {p2l:.3}, exp {ex:.3}, fused pass1 {f1:.3} + rescale {f2:.3}"
        );
    }

    let short: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    let rows = 256;
    let x = logits(rows * short);
    let mut g = x.clone();
    let k = Kernels::best();
    let ms = best_ns(2000, rows, &mut || {
        for r in x.chunks_exact(short) {
            std::hint::black_box(k.max_sum(std::hint::black_box(r), None, 1.0));
        }
    });
    let st: Vec<_> = x.chunks_exact(short).map(|r| k.max_sum(r, None, 1.0)).collect();
    let coef = CeGradCoef { a: 1.0, b: 0.0, inv_cap: 0.0 };
    let cg = best_ns(2000, rows, &mut || {
        for (r, s) in g.chunks_exact_mut(short).zip(&st) {
            k.ce_grad_in_place(r, None, 1.0, *s, coef);
        }
    });
    println!("rows of {short} ({}): max_sum {ms:.1} ns/row, ce_grad {cg:.1} ns/row", k.isa());
}
