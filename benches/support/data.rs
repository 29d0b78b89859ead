//! Deterministic benchmark data and timing, shared by the benches and the bench examples.
use rayon::prelude::*;
use std::time::Instant;

/// `n` pseudo-random values uniform in `[lo, hi)` (xorshift per 64K chunk, in parallel).
#[allow(dead_code)]
pub fn fill(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut out = vec![0f32; n];
    fill_into(&mut out, seed, lo, hi);
    out
}

/// [`fill`] into a caller's buffer.
#[allow(dead_code)]
pub fn fill_into(out: &mut [f32], seed: u64, lo: f32, hi: f32) {
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let mut s = (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
        for y in chunk {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *y = lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32);
        }
    });
}

/// The median of `reps` timed calls of `f`, in seconds (the caller warms up first).
#[allow(dead_code)]
pub fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

/// The bare product `out [n, V] = h [n, d] · w [V, d]ᵀ` with the `gemm` crate on all of
/// rayon's threads: the baseline the fused operations are compared with.
#[allow(dead_code)]
pub fn bare_product(h: &[f32], w: &[f32], out: &mut [f32], n: usize, d: usize, v: usize) {
    assert!(h.len() >= n * d && w.len() >= v * d && out.len() >= n * v, "bare_product: slices too short");
    // SAFETY: out is n x V row-major, h is n x d row-major, w is V x d row-major read as its
    // transpose (row stride 1, column stride d); all in bounds per the assertion above.
    unsafe {
        gemm::gemm(
            n,
            v,
            d,
            out.as_mut_ptr(),
            1,
            v as isize,
            false,
            h.as_ptr(),
            1,
            d as isize,
            w.as_ptr(),
            d as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
}
