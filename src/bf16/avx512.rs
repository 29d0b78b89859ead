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

/// The bytes of packed W per chunk of classes (see [`tile_product`]).
const CHUNK_BYTES: usize = 384 << 10;

/// Rows per micro-kernel call: a divisor of the packed rows' 16-row tiles.
const ROWS: usize = 8;
/// 16-class blocks per micro-kernel call: `ROWS × BLOCKS` accumulators, `BLOCKS` W
/// vectors and a broadcast fit the 32 zmm registers.
const BLOCKS: usize = 3;

/// `out[i * ldo + j] (+)= (A · W[cols]ᵀ)[i, j]` over the precision's terms: added to `out`,
/// or written over it when `overwrite` (then `out` is never read; the bits are those of an
/// addition onto zeros).
///
/// Rows go in groups of 8 (their bf16 pairs stay in L1) against every block of 16 classes
/// in `cols`, 3 blocks at a time: each W vector loaded serves 8 rows, so W, which streams
/// from L2, takes one load per 8 products (one per 4 with the 4 × 4 kernel before it).
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
    overwrite: bool,
) {
    let (b0, b1) = (cols.start / 16, cols.end.div_ceil(16));
    let m = rows.rows;
    // Classes go in chunks whose packed W fits in L2 beside the rows, every group of rows
    // against one chunk before the next: W then streams from L2, not from L3 (a loss's
    // segment of 1024 classes is 1.5 MB of W at d = 768).
    let chunk = (CHUNK_BYTES / (2 * w.block_len())).max(1).div_ceil(BLOCKS) * BLOCKS;
    for c0 in (b0..b1).step_by(chunk) {
        let c1 = (c0 + chunk).min(b1);
        for i0 in (0..m).step_by(ROWS) {
            let r = (m - i0).min(ROWS);
            let mut b = c0;
            while b < c1 {
                let nb = (c1 - b).min(BLOCKS);
                macro_rules! go {
                    ($($rr:literal $nn:literal),*) => {
                        match (r, nb) {
                            // SAFETY: the caller guarantees the CPU features and shapes; rows
                            // i0..i0+r < m and blocks b..b+nb ≤ ceil(V/16) exist.
                            $(($rr, $nn) => unsafe {
                                kernel::<$rr, $nn>(rows, w, i0, b, &cols, out, ldo, overwrite)
                            },)*
                            _ => unreachable!("bf16: row group {r}, block group {nb}"),
                        }
                    };
                }
                go!(1 1, 1 2, 1 3, 2 1, 2 2, 2 3, 3 1, 3 2, 3 3, 4 1, 4 2, 4 3,
                    5 1, 5 2, 5 3, 6 1, 6 2, 6 3, 7 1, 7 2, 7 3, 8 1, 8 2, 8 3);
                b += nb;
            }
        }
    }
}

/// The lanes of block `b` (classes `16b .. 16b + 16`) that fall inside `cols`, as a mask.
#[inline(always)]
fn lanes(b: usize, cols: &Range<usize>) -> u16 {
    let j0 = b * 16;
    let first = cols.start.saturating_sub(j0).min(16);
    let last = cols.end.saturating_sub(j0).min(16);
    let below = |k: usize| ((1u32 << k) - 1) as u16;
    below(last) & !below(first)
}

/// Rows `i0..i0 + R` (inside one 16-row tile, since `ROWS` divides 16) × blocks
/// `b..b + NB`.
///
/// # Safety
/// As [`tile_product`]; `i0 + R ≤ m`, `i0 % ROWS == 0`, `b + NB ≤ ceil(V / 16) + 1`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const R: usize, const NB: usize>(
    rows: &PackedRows,
    w: &PackedBf16Weights,
    i0: usize,
    b: usize,
    cols: &Range<usize>,
    out: &mut [f32],
    ldo: usize,
    overwrite: bool,
) {
    let (t, r0) = (i0 / 16, i0 % 16);
    let kp = w.d_pad / 2;
    // The address of lane 0 of block `b + x` in row `i0 + rr` of `out` (see the stores).
    let base = out.as_mut_ptr();
    let lane0 = |rr: usize, x: usize| base.wrapping_add((i0 + rr) * ldo + (b + x) * 16).wrapping_sub(cols.start);
    if !overwrite {
        // The output is read after the products: ask for it now, so that an output out of
        // cache (dW, added to by every block of rows) arrives while they run.
        for rr in 0..R {
            for x in 0..NB {
                // (A prefetch is a hint that never faults, whatever the address.)
                let at = lane0(rr, x);
                _mm_prefetch::<_MM_HINT_T0>(at.cast());
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(15).cast());
            }
        }
    }
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
    let zero = _mm512_setzero_ps();
    for x in 0..NB {
        let mask = lanes(b + x, cols);
        for (rr, accr) in acc.iter().enumerate() {
            // Lane c is class 16(b + x) + c, at out[i·ldo + 16(b + x) + c − cols.start];
            // the pointer to lane 0 may lie before `out` when cols.start is not a multiple
            // of 16, hence wrapping arithmetic: only the lanes in `mask` are touched.
            let at = lane0(rr, x);
            // SAFETY: the lanes in `mask` are classes in `cols`, so each index lies in
            // [i·ldo, i·ldo + cols.len()) with i < m, inside `out` (checked by the caller:
            // out.len() ≥ (m − 1)·ldo + cols.len()). Masked-off lanes are not accessed.
            unsafe {
                // (+0 turns a −0 sum into +0, as adding onto a zeroed output would.)
                let base = if overwrite { zero } else { _mm512_maskz_loadu_ps(mask, at) };
                _mm512_mask_storeu_ps(at, mask, _mm512_add_ps(base, accr[x]));
            }
        }
    }
}

/// Accumulators in [`peak_loop`]: more than `vdpbf16ps`'s latency times its throughput on
/// the CPUs we know, so that the loop is bound by throughput alone.
const PEAK_ACCUMULATORS: usize = 24;

/// A register-only `vdpbf16ps` loop for measuring the instruction's peak: `iters` passes of
/// 24 independent products on zmm registers, no memory. Returns the flops done
/// (`iters × 24 × 16 lanes × 2 pairs × 2`), or 0 without doing anything if AVX512-BF16 is
/// not available.
pub(super) fn peak_loop(iters: u64) -> u64 {
    if !available() {
        return 0;
    }
    // SAFETY: the CPU has AVX512F and AVX512-BF16 (checked above).
    unsafe { peak_impl(iters) };
    iters * PEAK_ACCUMULATORS as u64 * 16 * 2 * 2
}

/// # Safety
/// The CPU must have AVX512F and AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn peak_impl(iters: u64) {
    // Pairs (1, 1) times pairs (2^-24, 2^-24): each product adds 2^-23 per lane, so the
    // sums stay small and normal whatever `iters` is.
    let one: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80)) };
    let tiny: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3380_3380)) };
    let mut acc = [_mm512_setzero_ps(); PEAK_ACCUMULATORS];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm512_dpbf16_ps(*a, one, tiny);
        }
    }
    std::hint::black_box(acc);
}
