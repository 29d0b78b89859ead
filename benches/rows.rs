//! Row kernels against a plain copy and a plain read of the same bytes, in one run.
//!
//! `cargo bench --bench rows` — compare each op's time with `copy` (softmax, log_softmax:
//! one read + one write per element) or `read` (logsumexp: one read per element).

#[path = "support/data.rs"]
mod data;
#[path = "support/read.rs"]
mod read;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rayon::prelude::*;
use softmax_layer::{MatMut, MatRef, RowOptions};
use std::hint::black_box;
use std::time::Duration;

fn bench_shape(c: &mut Criterion, n: usize, v: usize) {
    let x = data::fill(n * v, 0, -12.0, 12.0);
    let mut out = vec![0f32; n * v];
    let mut lse = vec![0f32; n];
    let xv = MatRef::new(&x, n, v).unwrap();
    let opts = RowOptions::default();
    let mut g = c.benchmark_group(format!("rows_{n}x{v}"));
    g.sample_size(10).measurement_time(Duration::from_secs(6)).warm_up_time(Duration::from_secs(1));
    let bytes = (n * v * 4) as u64;
    g.throughput(Throughput::Bytes(2 * bytes));
    g.bench_function(BenchmarkId::new("copy", "r+w"), |b| {
        b.iter(|| out.par_chunks_mut(1 << 16).zip(x.par_chunks(1 << 16)).for_each(|(o, i)| o.copy_from_slice(i)))
    });
    g.bench_function(BenchmarkId::new("softmax", "r+w"), |b| {
        b.iter(|| softmax_layer::softmax(xv, MatMut::new(&mut out, n, v).unwrap(), &opts).unwrap())
    });
    g.bench_function(BenchmarkId::new("log_softmax", "r+w"), |b| {
        b.iter(|| softmax_layer::log_softmax(xv, MatMut::new(&mut out, n, v).unwrap(), &opts).unwrap())
    });
    g.bench_function(BenchmarkId::new("softmax_inplace", "r+w"), |b| {
        b.iter(|| softmax_layer::softmax_inplace(MatMut::new(&mut out, n, v).unwrap(), &opts).unwrap())
    });
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function(BenchmarkId::new("read", "r"), |b| b.iter(|| black_box(read::read_all(&x))));
    g.bench_function(BenchmarkId::new("logsumexp", "r"), |b| {
        b.iter(|| softmax_layer::logsumexp(xv, &mut lse, &opts).unwrap())
    });
    g.finish();
}

fn rows(c: &mut Criterion) {
    bench_shape(c, 2048, 50257);
    bench_shape(c, 8, 1_000_003);
}

criterion_group!(benches, rows);
criterion_main!(benches);
