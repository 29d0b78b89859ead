//! Times one layer operation, for `scripts/compare_torch.py` and the README:
//! `bench_layer OP N D V REPEATS [K]` prints one JSON line with the median time, the
//! throughput and the peak extra heap (beyond inputs and outputs).
//!
//! OP: gemm (the bare product H·Wᵀ into [n, V], 2 threads inside the gemm crate),
//! logits, probs, logsumexp, target_log_probs, score (sequence scoring), top_k, argmax,
//! loss, loss_grad (fused
//! cross-entropy forward, and forward+backward), read (a plain read of W).
#[path = "../benches/support/alloc.rs"]
mod alloc;
#[path = "../benches/support/data.rs"]
mod data;
#[path = "../benches/support/read.rs"]
mod read;

use softmax_layer::{LayerOptions, MatMut, MatRef, SoftmaxLayer, WeightLayout};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 6 {
        eprintln!("usage: bench_layer OP N D V REPEATS [K]");
        std::process::exit(2);
    }
    let op = a[1].as_str();
    let [n, d, v, reps]: [usize; 4] = std::array::from_fn(|i| a[i + 2].parse().unwrap());
    let k: usize = a.get(6).map_or(10, |s| s.parse().unwrap());
    let h = data::fill(n * d, 1, -1.0, 1.0);
    let ws = (3.0 / d as f32).sqrt();
    let w = data::fill(v * d, 2, -ws, ws);
    let targets: Vec<i64> = (0..n as i64).map(|i| (i * 7919) % v as i64).collect();
    // BENCH_LAYOUT=dv takes the same values as W stored [d, V] (`WeightLayout::HiddenMajor`).
    let layout = match std::env::var("BENCH_LAYOUT").as_deref() {
        Ok("dv") => WeightLayout::HiddenMajor,
        Ok("vd") | Err(_) => WeightLayout::VocabMajor,
        Ok(other) => panic!("BENCH_LAYOUT: vd or dv, not {other}"),
    };
    let mut layer = SoftmaxLayer::new(&w[..], layout, v, d, None::<&[f32]>).unwrap();
    // BENCH_TILING=rows,cols,segment overrides the engine's tiling (for tuning).
    if let Ok(t) = std::env::var("BENCH_TILING") {
        let p: Vec<usize> = t.split(',').map(|x| x.parse().unwrap()).collect();
        layer = layer.with_tiling(softmax_layer::engine::Tiling { row_block: p[0], col_tile: p[1], segment: p[2] });
    }
    // BENCH_PRECISION=bf16|bf16x3 runs the layer's products in that precision.
    if let Ok(p) = std::env::var("BENCH_PRECISION") {
        layer = layer
            .with_precision(softmax_layer::Precision::parse(&p).expect("BENCH_PRECISION: f32, bf16 or bf16x3"))
            .unwrap();
    }
    let hv = MatRef::new(&h, n, d).unwrap();
    let opts = LayerOptions::default();
    let needs_out = matches!(op, "gemm" | "logits" | "probs");
    let mut out = if needs_out { vec![0f32; n * v] } else { Vec::new() };
    let mut small = vec![0f32; n];
    let mut idx = vec![0usize; n];
    // Gradient outputs (not counted as extra heap: they are outputs).
    let (mut gh, mut gw) =
        if op == "loss_grad" { (vec![0f32; n * d], vec![0f32; v * d]) } else { (Vec::new(), Vec::new()) };
    let mut f = || match op {
        "gemm" => data::bare_product(&h, &w, &mut out, n, d, v),
        "logits" => layer.logits(hv, MatMut::new(&mut out, n, v).unwrap()).unwrap(),
        "probs" => layer.probs(hv, MatMut::new(&mut out, n, v).unwrap(), &opts).unwrap(),
        "logsumexp" => layer.logsumexp(hv, &mut small, &opts).unwrap(),
        "target_log_probs" => layer.target_log_probs(hv, &targets, &mut small, &opts).unwrap(),
        "argmax" => layer.argmax(hv, &mut idx).unwrap(),
        "loss" => {
            let o = softmax_layer::loss::CrossEntropyOptions::default();
            std::hint::black_box(softmax_layer::loss::cross_entropy(&layer, hv, &targets, &o).unwrap());
        }
        "loss_grad" => {
            let o = softmax_layer::loss::CrossEntropyOptions::default();
            let up = softmax_layer::loss::Upstream::Scalar(1.0);
            let g = softmax_layer::loss::GradientsMut { hidden: Some(&mut gh), weight: &mut gw, bias: None };
            std::hint::black_box(
                softmax_layer::loss::cross_entropy_with_grad_into(&layer, hv, &targets, &o, up, g).unwrap(),
            );
        }
        "score" => {
            let o = softmax_layer::score::ScoreOptions::default();
            std::hint::black_box(softmax_layer::score::score_sequences(&layer, hv, &targets, &o).unwrap());
        }
        "top_k" => {
            std::hint::black_box(layer.top_k(hv, k, &opts).unwrap());
        }
        "read" => {
            std::hint::black_box(read::read_all(&w));
        }
        _ => panic!("unknown op {op}"),
    };
    let ((), peak) = alloc::peak_extra(&mut f);
    let med = data::median_secs(reps, f);
    let gflops = 2.0 * (n * d * v) as f64 / med / 1e9;
    let w_gbs = (v * d * 4) as f64 / med / 1e9;
    println!(
        "{{\"op\": \"{op}\", \"n\": {n}, \"d\": {d}, \"v\": {v}, \"median_s\": {med:.6}, \"gflops\": {gflops:.1}, \"w_gb_per_s\": {w_gbs:.2}, \"peak_extra_heap_mib\": {:.2}}}",
        peak as f64 / (1 << 20) as f64
    );
}
