//! Times one row operation for `scripts/compare_torch.py`:
//! `bench_rows OP N V REPEATS` prints `{"op":..., "median_s":...}` on stdout.
//! OP is softmax, log_softmax, logsumexp, copy or read.
#[path = "../benches/support/read.rs"]
mod read;

use rayon::prelude::*;
use softmax_layer::{MatMut, MatRef, RowOptions};
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 5 {
        eprintln!("usage: bench_rows OP N V REPEATS");
        std::process::exit(2);
    }
    let (op, n, v, reps): (&str, usize, usize, usize) =
        (&a[1], a[2].parse().unwrap(), a[3].parse().unwrap(), a[4].parse().unwrap());
    let mut x = vec![0f32; n * v];
    x.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let mut s = (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for y in chunk {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *y = ((s >> 40) as f32 / (1u64 << 24) as f32) * 24.0 - 12.0;
        }
    });
    let mut out = vec![0f32; n * v];
    let mut lse = vec![0f32; n];
    let opts = RowOptions::default();
    let xv = MatRef::new(&x, n, v).unwrap();
    let mut f = || match op {
        "softmax" => softmax_layer::softmax(xv, MatMut::new(&mut out, n, v).unwrap(), &opts).unwrap(),
        "log_softmax" => softmax_layer::log_softmax(xv, MatMut::new(&mut out, n, v).unwrap(), &opts).unwrap(),
        "logsumexp" => softmax_layer::logsumexp(xv, &mut lse, &opts).unwrap(),
        "copy" => out.par_chunks_mut(1 << 16).zip(x.par_chunks(1 << 16)).for_each(|(o, i)| o.copy_from_slice(i)),
        "read" => {
            std::hint::black_box(read::read_all(&x));
        }
        _ => panic!("unknown op {op}"),
    };
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    println!("{{\"op\": \"{op}\", \"n\": {n}, \"v\": {v}, \"median_s\": {}}}", t[t.len() / 2]);
}
