//! Times one row operation for `scripts/compare_torch.py`:
//! `bench_rows OP N V REPEATS` prints `{"op":..., "median_s":...}` on stdout.
//! OP is softmax, log_softmax, logsumexp, copy, read (four streams per task) or read1 (one
//! stream per task). `BENCH_NO_AHEAD=1` turns off the rows' look-ahead prefetch;
//! `BENCH_PREFETCH_DISTANCE=ELEMENTS` sets how far ahead they prefetch;
//! `BENCH_STREAM_MIN=BYTES` sets the output size from which stores stream;
//! `BENCH_TEMPERATURE=T` sets the temperature (default 1).
#[path = "../benches/support/data.rs"]
mod data;
#[path = "../benches/support/read.rs"]
mod read;

use rayon::prelude::*;
use softmax_layer::{MatMut, MatRef, RowOptions};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 5 {
        eprintln!("usage: bench_rows OP N V REPEATS");
        std::process::exit(2);
    }
    let (op, n, v, reps): (&str, usize, usize, usize) =
        (&a[1], a[2].parse().unwrap(), a[3].parse().unwrap(), a[4].parse().unwrap());
    if std::env::var("BENCH_NO_AHEAD").as_deref() == Ok("1") {
        softmax_layer::rows::set_prefetch_ahead(false);
    }
    if let Some(e) = std::env::var("BENCH_PREFETCH_DISTANCE").ok().and_then(|s| s.parse().ok()) {
        softmax_layer::kernels::set_prefetch_distance(e);
    }
    if let Some(b) = std::env::var("BENCH_STREAM_MIN").ok().and_then(|s| s.parse().ok()) {
        softmax_layer::rows::set_stream_min_bytes(b);
    }
    let x = data::fill(n * v, 0, -12.0, 12.0);
    let mut out = vec![0f32; n * v];
    let mut lse = vec![0f32; n];
    let t = std::env::var("BENCH_TEMPERATURE").ok().map_or(1.0, |s| s.parse().expect("BENCH_TEMPERATURE: a number"));
    let opts = RowOptions::with_temperature(t);
    let xv = MatRef::new(&x, n, v).unwrap();
    let mut f = || match op {
        "softmax" => softmax_layer::softmax(xv, MatMut::new(&mut out, n, v).unwrap(), &opts).unwrap(),
        "log_softmax" => softmax_layer::log_softmax(xv, MatMut::new(&mut out, n, v).unwrap(), &opts).unwrap(),
        "logsumexp" => softmax_layer::logsumexp(xv, &mut lse, &opts).unwrap(),
        "copy" => out.par_chunks_mut(1 << 16).zip(x.par_chunks(1 << 16)).for_each(|(o, i)| o.copy_from_slice(i)),
        "read" => {
            std::hint::black_box(read::read_all(&x));
        }
        "read1" => {
            let k = softmax_layer::Kernels::best();
            std::hint::black_box(x.par_chunks(1 << 18).map(|c| k.dot(c, c)).sum::<f32>());
        }
        _ => panic!("unknown op {op}"),
    };
    f();
    let med = data::median_secs(reps, f);
    println!("{{\"op\": \"{op}\", \"n\": {n}, \"v\": {v}, \"median_s\": {med}}}");
}
