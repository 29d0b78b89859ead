//! `selfcheck`: checks the row kernels against float64 on built-in data, then prints their
//! throughput next to a plain copy and a plain read of the same bytes, measured in the
//! same run.

use crate::Failure;

/// The median of `repeats` timed calls after one warm-up call (page faults, caches).
fn median_secs(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    crate::data::median_secs(repeats, f)
}
use rayon::prelude::*;
use softmax_layer::{Kernels, MatMut, MatRef, RowOptions};

#[derive(clap::Args)]
pub struct SelfcheckArgs {
    /// Rows of the built-in logits.
    #[arg(long, default_value_t = 2048, allow_hyphen_values = true)]
    rows: usize,
    /// Columns (classes) of the built-in logits.
    #[arg(long, default_value_t = 50257, allow_hyphen_values = true)]
    cols: usize,
    /// Timed repetitions of each operation; the median is reported.
    #[arg(long, default_value_t = 7, allow_hyphen_values = true)]
    repeats: usize,
}

/// Worst relative error of probabilities >= 1e-30 and worst absolute lse error, on a row.
fn check_row(x: &[f32], p: &[f32], lse: f32) -> (f64, f64) {
    let m = x.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
    let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
    let want_lse = m + s.ln();
    let mut worst = 0f64;
    for (&xi, &pi) in x.iter().zip(p) {
        let want = (xi as f64 - want_lse).exp();
        if want >= 1e-30 {
            worst = worst.max((pi as f64 - want).abs() / want);
        }
    }
    (worst, (lse as f64 - want_lse).abs())
}

pub fn run(a: &SelfcheckArgs) -> Result<(), Failure> {
    let (n, v) = (a.rows, a.cols);
    if n == 0 || v == 0 {
        return Err(Failure(format!("--rows and --cols must be > 0, got {n} and {v}")));
    }
    if !(1..=10_000).contains(&a.repeats) {
        return Err(Failure(format!("--repeats must be in [1, 10000], got {}", a.repeats)));
    }
    // Two [n, V] f32 buffers (the logits and the output).
    let bytes = (n as f64) * (v as f64) * 8.0;
    if bytes > 8e9 {
        return Err(Failure(format!(
            "cannot allocate {:.1} GB for --rows {n} --cols {v} (two [n, V] f32 buffers; at most 8 GB)",
            bytes / 1e9
        )));
    }
    let gb = (n * v * 4) as f64 / 1e9;
    println!(
        "softmax-layer selfcheck: logits [{n}, {v}] f32 ({gb:.2} GB), {} threads, kernels: {}",
        rayon::current_num_threads(),
        Kernels::best().isa()
    );
    let mut x = crate::output_buffer(n, v, "built-in logits")?;
    // Deterministic pseudo-random logits in [-12, 12), like a language model's.
    crate::data::fill_into(&mut x, 0xD1B5_4A32_D192_ED03, -12.0, 12.0);
    let mut out = crate::output_buffer(n, v, "output")?;
    let mut lse = vec![0f32; n];
    let xv = MatRef::new(&x, n, v)?;
    let opts = RowOptions::default();

    // Correctness first.
    softmax_layer::softmax(xv, MatMut::new(&mut out, n, v)?, &opts)?;
    softmax_layer::logsumexp(xv, &mut lse, &opts)?;
    let (mut rel, mut abs) = (0f64, 0f64);
    for i in [0, n / 2, n - 1] {
        let (r, l) = check_row(xv.row(i), &out[i * v..(i + 1) * v], lse[i]);
        rel = rel.max(r);
        abs = abs.max(l);
    }
    println!("accuracy vs float64 (rows 0, n/2, n-1): max rel error of p = {rel:.2e}, max |lse error| = {abs:.2e}");
    if rel > 1e-6 || abs > 2e-6 * lse.iter().fold(1f32, |m, &l| m.max(l.abs())) as f64 {
        return Err(Failure(format!("selfcheck failed: errors {rel:e} / {abs:e} exceed 1e-6 / 2e-6")));
    }

    // Throughput, everything in one run.
    let chunk = 1 << 20;
    let copy = median_secs(a.repeats, || {
        out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(o, i)| o.copy_from_slice(i));
    });
    // The fastest plain read we have (four streams per task), a strong baseline.
    let read = median_secs(a.repeats, || {
        std::hint::black_box(crate::read::read_all(&x));
    });
    let sm = median_secs(a.repeats, || {
        softmax_layer::softmax(xv, MatMut::new(&mut out, n, v).unwrap(), &opts).unwrap();
    });
    let lsm = median_secs(a.repeats, || {
        softmax_layer::log_softmax(xv, MatMut::new(&mut out, n, v).unwrap(), &opts).unwrap();
    });
    let lse_t = median_secs(a.repeats, || {
        softmax_layer::logsumexp(xv, &mut lse, &opts).unwrap();
    });
    println!("{:<12} {:>10} {:>14} {:>12}", "operation", "median", "GB/s (r+w)", "vs baseline");
    let row = |name: &str, t: f64, bytes: f64, base: f64, base_name: &str| {
        println!("{name:<12} {:>8.1}ms {:>14.1} {:>9.2} x {base_name}", t * 1e3, bytes / t, base / t);
    };
    row("copy", copy, 2.0 * gb, copy, "copy");
    row("read", read, gb, read, "read");
    row("softmax", sm, 2.0 * gb, copy, "copy");
    row("log_softmax", lsm, 2.0 * gb, copy, "copy");
    row("logsumexp", lse_t, gb, read, "read");
    println!("(GB/s counts each input byte read once and each output byte written once)");
    Ok(())
}
