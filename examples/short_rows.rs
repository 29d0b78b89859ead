//! Row kernels on many short rows (a classifier's logits): ns per row, one thread.
//! `cargo run --release --example short_rows [V]`
use softmax_layer::kernels::Kernels;
use std::time::Instant;

fn main() {
    let v: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    let rows = 256;
    let x: Vec<f32> = (0..rows * v).map(|i| ((i * 7919) % 1000) as f32 / 40.0 - 12.0).collect();
    let mut out = x.clone();
    let k = Kernels::best();
    let reps = 2000;
    let time = |f: &mut dyn FnMut()| {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let s = Instant::now();
            for _ in 0..reps {
                f();
            }
            best = best.min(s.elapsed().as_secs_f64() / (reps * rows) as f64 * 1e9);
        }
        best
    };
    let ms = time(&mut || {
        for r in x.chunks_exact(v) {
            std::hint::black_box(k.max_sum(std::hint::black_box(r), None, 1.0));
        }
    });
    let st: Vec<_> = x.chunks_exact(v).map(|r| k.max_sum(r, None, 1.0)).collect();
    let cg = time(&mut || {
        for (r, s) in out.chunks_exact_mut(v).zip(&st) {
            k.ce_grad_in_place(r, None, 1.0, *s, softmax_layer::kernels::CeGradCoef { a: 1.0, b: 0.0, inv_cap: 0.0 });
        }
    });
    println!("V={v}: max_sum {ms:.1} ns/row ({:.3} ns/elem), ce_grad {cg:.1} ns/row", ms / v as f64);
}
