//! The reference "plain read": every byte of a buffer read once, as fast as we can — four
//! concurrent streams per task (the same pattern as the decode step's `dot4`), so that
//! "fraction of read bandwidth" is measured against a strong baseline.
use rayon::prelude::*;
use softmax_layer::Kernels;

#[allow(dead_code)]
pub fn read_all(x: &[f32]) -> f32 {
    let k = Kernels::best();
    x.par_chunks(1 << 18)
        .map(|c| {
            let q = c.len() / 4;
            if q == 0 {
                return k.dot(c, c);
            }
            let (a, rest) = c.split_at(q);
            let (b, rest) = rest.split_at(q);
            let (d, rest) = rest.split_at(q);
            let (e, tail) = rest.split_at(q);
            // a is read from memory once, then again from L1 inside dot4.
            let s = k.dot4(a, [a, b, d, e]);
            s.iter().sum::<f32>() + k.dot(tail, tail)
        })
        .sum()
}
