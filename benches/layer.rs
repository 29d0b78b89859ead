//! The layer's fused operations against the bare matrix product, in one run, at the main
//! case n=2048, d=768, V=50257, and the decode step n=1, d=4096, V=128256 against a plain
//! read of W. Prints the peak extra heap of each operation (counting allocator).
//!
//! `cargo bench --bench layer`

#[path = "support/alloc.rs"]
mod alloc;
#[path = "support/data.rs"]
mod data;
#[path = "support/read.rs"]
mod read;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use softmax_layer::{LayerOptions, MatMut, MatRef, SoftmaxLayer, WeightLayout};
use std::hint::black_box;
use std::time::Duration;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

fn main_case(c: &mut Criterion) {
    let (n, d, v) = (2048, 768, 50257);
    let h = data::fill(n * d, 1, -1.0, 1.0);
    let ws = (3.0 / d as f32).sqrt();
    let w = data::fill(v * d, 2, -ws, ws);
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>).unwrap();
    let hv = MatRef::new(&h, n, d).unwrap();
    let targets: Vec<i64> = (0..n as i64).map(|i| i * 7919 % v as i64).collect();
    let opts = LayerOptions::default();
    let mut out = vec![0f32; n * v];
    let mut small = vec![0f32; n];

    for (name, peak) in [
        ("logsumexp", alloc::peak_extra(|| layer.logsumexp(hv, &mut small, &opts).unwrap()).1),
        ("target_log_probs", alloc::peak_extra(|| layer.target_log_probs(hv, &targets, &mut small, &opts).unwrap()).1),
        ("top_k(10)", alloc::peak_extra(|| black_box(layer.top_k(hv, 10, &opts).unwrap())).1),
    ] {
        println!("peak extra heap of {name}: {:.2} MiB", peak as f64 / (1u64 << 20) as f64);
    }

    let mut g = c.benchmark_group(format!("layer_{n}x{d}x{v}"));
    g.sample_size(10).measurement_time(Duration::from_secs(20)).warm_up_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements((2 * n * d * v) as u64)); // FLOPs
    g.bench_function("gemm_bare", |b| b.iter(|| data::bare_product(&h, &w, &mut out, n, d, v)));
    g.bench_function("logits", |b| b.iter(|| layer.logits(hv, MatMut::new(&mut out, n, v).unwrap()).unwrap()));
    g.bench_function("logsumexp", |b| b.iter(|| layer.logsumexp(hv, &mut small, &opts).unwrap()));
    g.bench_function("target_log_probs", |b| {
        b.iter(|| layer.target_log_probs(hv, &targets, &mut small, &opts).unwrap())
    });
    g.bench_function("top_k_10", |b| b.iter(|| black_box(layer.top_k(hv, 10, &opts).unwrap())));
    g.finish();
}

fn decode(c: &mut Criterion) {
    let (d, v) = (4096, 128256);
    let h = data::fill(d, 3, -1.0, 1.0);
    let ws = (3.0 / d as f32).sqrt();
    let w = data::fill(v * d, 4, -ws, ws);
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>).unwrap();
    let hv = MatRef::new(&h, 1, d).unwrap();
    let mut p = vec![0f32; v];
    let mut g = c.benchmark_group(format!("decode_1x{d}x{v}"));
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes((v * d * 4) as u64)); // bytes of W
    g.bench_function("read_w", |b| b.iter(|| black_box(read::read_all(&w))));
    g.bench_function("probs", |b| {
        b.iter(|| layer.probs(hv, MatMut::new(&mut p, 1, v).unwrap(), &LayerOptions::default()).unwrap())
    });
    g.finish();
}

criterion_group!(benches, main_case, decode);
criterion_main!(benches);
