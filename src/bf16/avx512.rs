//! The AVX512-BF16 path: `vdpbf16ps` on zmm registers.
//!
//! A packed W block holds, for each pair of hidden units, 16 classes × 2 bf16: one zmm.
//! `vdpbf16ps(acc, broadcast(h[2p], h[2p+1]), W[pair p])` adds `h[2p]·w[2p] + h[2p+1]·w[2p+1]`
//! to each class's `f32` accumulator. The kernel keeps up to 4 rows × 4 blocks (64 classes)
//! of accumulators in 16 registers.

use super::{PackedBf16Weights, PackedRows};
use std::arch::x86_64::*;
use std::ops::Range;

/// Whether the CPU has AVX512F and AVX512-BF16.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// `out[i * ldo + j] += (A · W[cols]ᵀ)[i, j]` over the precision's terms.
///
/// # Safety
/// The CPU must have AVX512F and AVX512-BF16 ([`available`]). Shapes as in
/// [`super::tile_product`], which checks them.
pub(crate) unsafe fn tile_product(
    rows: &PackedRows,
    w: &PackedBf16Weights,
    cols: Range<usize>,
    out: &mut [f32],
    ldo: usize,
) {
    let (b0, b1) = (cols.start / 16, cols.end.div_ceil(16));
    let m = rows.rows;
    for i0 in (0..m).step_by(4) {
        let r = (m - i0).min(4);
        let mut b = b0;
        while b < b1 {
            let nb = (b1 - b).min(4);
            macro_rules! go {
                ($($rr:literal $nn:literal),*) => {
                    match (r, nb) {
                        // SAFETY: the caller guarantees the CPU features and shapes; rows
                        // i0..i0+r < m and blocks b..b+nb ≤ ceil(V/16) exist.
                        $(($rr, $nn) => unsafe { kernel::<$rr, $nn>(rows, w, i0, b, &cols, out, ldo) },)*
                        _ => unreachable!("bf16: row group {r}, block group {nb}"),
                    }
                };
            }
            go!(1 1, 1 2, 1 3, 1 4, 2 1, 2 2, 2 3, 2 4, 3 1, 3 2, 3 3, 3 4, 4 1, 4 2, 4 3, 4 4);
            b += nb;
        }
    }
}

/// Rows `i0..i0 + R` (inside one 16-row tile, since 4 divides 16) × blocks `b..b + NB`.
///
/// # Safety
/// As [`tile_product`]; `i0 + R ≤ m`, `i0 % 4 == 0`, `b + NB ≤ ceil(V / 16) + 1`.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const R: usize, const NB: usize>(
    rows: &PackedRows,
    w: &PackedBf16Weights,
    i0: usize,
    b: usize,
    cols: &Range<usize>,
    out: &mut [f32],
    ldo: usize,
) {
    let (t, r0) = (i0 / 16, i0 % 16);
    let kp = w.d_pad / 2;
    let mut acc = [[_mm512_setzero_ps(); NB]; R];
    for &(qa, qb) in w.precision.terms() {
        let a = rows.tile_ptr(t, qa);
        let mut wb = [std::ptr::null::<u16>(); NB];
        for (x, p) in wb.iter_mut().enumerate() {
            *p = w.block_ptr(b + x, qb);
        }
        for p in 0..kp {
            let k = 2 * p;
            // SAFETY: pair p of each block lies inside the packed W (d_pad / 2 pairs of 32
            // u16 per part); the pair (k, k+1) of row r0 + r lies inside the row tile
            // (k / 32 < d_pad / 32 chunks of 16 rows × 32). Unaligned loads.
            unsafe {
                // Plain loops, not closures: a closure would not inherit this function's
                // target features, and its intrinsics would not be inlined.
                let mut bv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); NB];
                for x in 0..NB {
                    bv[x] = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wb[x].add(p * 32).cast()));
                }
                for (rr, accr) in acc.iter_mut().enumerate() {
                    let hp = a.add((k / 32) * 512 + (r0 + rr) * 32 + k % 32).cast::<i32>().read_unaligned();
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(hp));
                    for x in 0..NB {
                        accr[x] = _mm512_dpbf16_ps(accr[x], av, bv[x]);
                    }
                }
            }
        }
    }
    for (rr, accr) in acc.iter().enumerate() {
        let i = i0 + rr;
        for (x, v) in accr.iter().enumerate() {
            let mut lanes = [0f32; 16];
            // SAFETY: 16 f32 into a 16-f32 array.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *v) };
            let j0 = (b + x) * 16;
            for (c, z) in lanes.iter().enumerate() {
                let j = j0 + c;
                if j >= cols.start && j < cols.end {
                    out[i * ldo + j - cols.start] += z;
                }
            }
        }
    }
}
