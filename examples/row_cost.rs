//! Cycles-per-element view of the row kernels on one cache-resident row, one thread:
//! separates compute cost from memory cost. `cargo run --release --example row_cost`
use softmax_layer::kernels::{Isa, Kernels};
use std::time::Instant;

fn main() {
    let v = 50257;
    let x: Vec<f32> = (0..v).map(|i| ((i * 7919) % 1000) as f32 / 40.0 - 12.0).collect();
    let mut out = vec![0f32; v];
    for isa in Isa::available() {
        let k = Kernels::for_isa(isa).unwrap();
        let reps = if isa == Isa::Scalar { 50 } else { 2000 };
        let time = |f: &mut dyn FnMut()| {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let s = Instant::now();
                for _ in 0..reps {
                    f();
                }
                best = best.min(s.elapsed().as_secs_f64() / (reps * v) as f64 * 1e9);
            }
            best
        };
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
}
