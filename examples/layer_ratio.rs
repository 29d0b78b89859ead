//! The fused operations against the bare product, alternated inside one process so that
//! this machine's drifts in speed hit both sides of each ratio alike:
//! `cargo run --release --example layer_ratio [N D V ROUNDS] [loss]` (default 2048 768
//! 50257 7; `loss` adds the fused cross-entropy forward + backward, a third of its time
//! against one bare product).
//!
//! Each round times the bare product (`H·Wᵀ` into `[n, V]`, the `gemm` crate on all
//! threads), then logsumexp, target log-probs and top-k (k = 10) through the engine, once
//! each; it prints every round's ratios, their medians, and the ratios of the best times
//! (the least disturbed by other tenants of a shared machine).
#[path = "../benches/support/data.rs"]
mod data;

use softmax_layer::{LayerOptions, MatRef, SoftmaxLayer, WeightLayout};
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).filter_map(|s| s.parse().ok()).collect();
    let with_loss = std::env::args().any(|s| s == "loss");
    let arg = |i: usize, default: usize| a.get(i).copied().unwrap_or(default);
    let (n, d, v, rounds) = (arg(0, 2048), arg(1, 768), arg(2, 50257), arg(3, 7));
    let h = data::fill(n * d, 1, -1.0, 1.0);
    let ws = (3.0 / d as f32).sqrt();
    let w = data::fill(v * d, 2, -ws, ws);
    let targets: Vec<i64> = (0..n as i64).map(|i| (i * 7919) % v as i64).collect();
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>).unwrap();
    let hv = MatRef::new(&h, n, d).unwrap();
    let opts = LayerOptions::default();
    let mut out = vec![0f32; n * v];
    let mut small = vec![0f32; n];
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    let names = ["logsumexp", "target_log_probs", "top_k", "loss_grad / 3"];
    let ops = if with_loss { 4 } else { 3 };
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); ops];
    let mut best = [f64::MAX; 4];
    let (mut gh, mut gw) = if with_loss { (vec![0f32; n * d], vec![0f32; v * d]) } else { (Vec::new(), Vec::new()) };
    let ce = softmax_layer::loss::CrossEntropyOptions::default();
    let mut bare = Vec::new();
    for r in 0..=rounds {
        let g = time(&mut || data::bare_product(&h, &w, &mut out, n, d, v));
        let mut t = vec![
            time(&mut || layer.logsumexp(hv, &mut small, &opts).unwrap()),
            time(&mut || layer.target_log_probs(hv, &targets, &mut small, &opts).unwrap()),
            time(&mut || {
                std::hint::black_box(layer.top_k(hv, 10, &opts).unwrap());
            }),
        ];
        if with_loss {
            // Forward + backward (dH, dW), a third of it against one bare product.
            let s = time(&mut || {
                let g = softmax_layer::loss::GradientsMut { hidden: Some(&mut gh), weight: &mut gw, bias: None };
                let up = softmax_layer::loss::Upstream::Scalar(1.0);
                std::hint::black_box(
                    softmax_layer::loss::cross_entropy_with_grad_into(&layer, hv, &targets, &ce, up, g).unwrap(),
                );
            });
            t.push(s / 3.0);
        }
        if r == 0 {
            continue; // warm-up
        }
        bare.push(g);
        print!("round {r}: bare product {:.0} ms", g * 1e3);
        for (i, x) in t.iter().enumerate() {
            best[i] = best[i].min(*x);
            ratios[i].push(x / g);
            print!(", {} {:.0} ms ({:.2}x)", names[i], x * 1e3, x / g);
        }
        println!();
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let bare_best = bare.iter().copied().fold(f64::MAX, f64::min);
    print!("best of each: bare product {:.0} ms", bare_best * 1e3);
    for (i, b) in best.iter().enumerate() {
        print!(", {} {:.0} ms ({:.2}x)", names[i], b * 1e3, b / bare_best);
    }
    println!();
    print!("median of the rounds' ratios: bare product {:.0} ms", med(&mut bare) * 1e3);
    for (i, r) in ratios.iter_mut().enumerate() {
        print!(", {} {:.2}x", names[i], med(r));
    }
    println!();
}
