//! The row algorithms, written once over the [`Vector`] trait.
//!
//! Every function here is `#[inline(always)]` and generic over `V: Vector`; the thin
//! per-instruction-set wrappers (see [`instantiate`]) carry the `#[target_feature]`
//! attribute, so after inlining each algorithm is compiled once per instruction set.
//!
//! # The math
//!
//! For one row `x` with optional additive mask `m` and temperature `T`, let `z = x + m`.
//!
//! ```text
//! M     = max_i z_i
//! S     = sum_i exp((z_i - M) / T)
//! lse   = M / T + ln S
//! p_i   = exp((z_i - M) / T) / S
//! log p = (z_i - M) / T - ln S
//! ```
//!
//! `M` and `S` come from one *online* read of the row: the row is cut into blocks that stay
//! in L1; each block's maximum is found first, the running sum is rescaled when the maximum
//! grows, and the block's terms are added. The running sum is kept in `f64`, so rows of
//! 2^24 and more elements keep full `f32` accuracy. A second read writes the output.

use super::MaxSum;

/// A SIMD vector of `f32` lanes.
///
/// # Safety
///
/// Every method is `unsafe` because it may execute instructions that the CPU must support.
/// Callers guarantee that the instruction set of the implementation is available (the
/// dispatcher checks this once), and that pointers are valid for the stated lengths.
pub(crate) trait Vector: Copy {
    /// Number of `f32` lanes.
    const LANES: usize;

    unsafe fn splat(x: f32) -> Self;
    /// Loads `LANES` values from `ptr` (no alignment needed).
    unsafe fn load(ptr: *const f32) -> Self;
    /// Loads `len < LANES` values from `ptr`; the other lanes hold `fill`.
    /// Reads nothing past `ptr + len`.
    unsafe fn load_partial(ptr: *const f32, len: usize, fill: f32) -> Self;
    /// Stores `LANES` values to `ptr` (no alignment needed).
    unsafe fn store(self, ptr: *mut f32);
    /// Stores the first `len < LANES` lanes to `ptr`; writes nothing past `ptr + len`.
    unsafe fn store_partial(self, ptr: *mut f32, len: usize);
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    /// `self * b + c`, with a single rounding.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// Lane-wise `if self > b { self } else { b }`: a NaN in `self` yields `b`, a NaN in `b`
    /// yields NaN. (The semantics of x86 `maxps`.)
    unsafe fn max(self, b: Self) -> Self;
    /// Lane-wise `if self < b { self } else { b }` (the semantics of x86 `minps`).
    unsafe fn min(self, b: Self) -> Self;
    /// Rounds to the nearest integer, ties to even.
    unsafe fn round(self) -> Self;
    /// `2^n` for lanes holding integers `n` in `[-126, 127]`.
    unsafe fn pow2i(self) -> Self;
    /// Maximum over the lanes, in a fixed order.
    unsafe fn reduce_max(self) -> f32;
    /// Sum over the lanes, in a fixed order.
    unsafe fn reduce_sum(self) -> f32;
}

/// Vectors per block of the online pass: a block is read twice from L1 (max, then sum).
const BLOCK_VECS: usize = 16;

/// Parameters shared by the row kernels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Params {
    /// Temperature `T`, finite and > 0.
    pub t: f32,
    /// `1 / T` rounded to `f32`.
    pub inv_t: f32,
}

impl Params {
    pub(crate) fn new(t: f32) -> Self {
        Params { t, inv_t: 1.0 / t }
    }
    fn scaled(&self) -> bool {
        self.t != 1.0
    }
}

// Cephes-style expf: exp(x) = 2^n * exp(r), |r| <= ln2/2, with a degree-7 polynomial.
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n * LN2_HI` is exact for |n| < 2^15.
const LN2_HI: f32 = 0.693_359_375;
const LN2_LO: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 5.000_000_1e-1;
/// Above this, exp overflows to +inf; below `EXP_LO`, it rounds to 0.
const EXP_HI: f32 = 89.0;
const EXP_LO: f32 = -104.0;

/// `exp(hi + lo)` where `lo` is a small correction to `hi` (|lo| <= 1).
///
/// Accurate to about 1 ulp over the whole `f32` range, subnormal results included;
/// `+inf -> +inf`, `-inf -> 0`, NaN propagates.
#[inline(always)]
pub(crate) unsafe fn exp_ext<V: Vector>(hi: V, lo: V) -> V {
    unsafe {
        // `min`/`max` with the constant first propagate NaN (see `Vector::max`).
        let x = V::splat(EXP_LO).max(V::splat(EXP_HI).min(hi));
        let n = x.mul(V::splat(LOG2E)).round();
        // n * LN2_HI is exact, and x - n * LN2_HI is exact by Sterbenz-like cancellation.
        let r = n.mul_add(V::splat(-LN2_HI), x);
        let r = n.mul_add(V::splat(-LN2_LO), r).add(lo);
        let mut p = V::splat(P0);
        p = p.mul_add(r, V::splat(P1));
        p = p.mul_add(r, V::splat(P2));
        p = p.mul_add(r, V::splat(P3));
        p = p.mul_add(r, V::splat(P4));
        p = p.mul_add(r, V::splat(P5));
        let y = p.mul_add(r.mul(r), r).add(V::splat(1.0));
        // n lies in [-150, 128]; scale in two exact steps so that only the last
        // multiplication rounds (into the subnormal range or to infinity).
        let n1 = n.mul(V::splat(0.5)).round();
        let n2 = n.sub(n1);
        y.mul(n1.pow2i()).mul(n2.pow2i())
    }
}

#[inline(always)]
pub(crate) unsafe fn exp<V: Vector>(x: V) -> V {
    unsafe { exp_ext(x, V::splat(0.0)) }
}

/// Loads `z = x (+ mask)` at `i`, full vector.
#[inline(always)]
unsafe fn load_z<V: Vector, const MASK: bool>(x: *const f32, mask: *const f32, i: usize) -> V {
    unsafe {
        let v = V::load(x.add(i));
        if MASK { v.add(V::load(mask.add(i))) } else { v }
    }
}

/// Loads `z = x (+ mask)` at `i`, `len < LANES` values; other lanes are `-inf`.
#[inline(always)]
unsafe fn load_z_partial<V: Vector, const MASK: bool>(
    x: *const f32,
    mask: *const f32,
    i: usize,
    len: usize,
) -> V {
    unsafe {
        let v = V::load_partial(x.add(i), len, f32::NEG_INFINITY);
        if MASK { v.add(V::load_partial(mask.add(i), len, 0.0)) } else { v }
    }
}

/// `(z - m) / T` as an unevaluated sum `hi + lo`, accurate to far below one ulp of `hi`.
///
/// The rounding of `z - m` (and of the division) would otherwise cost up to
/// `|z - m| * 2^-24` of relative error in `exp`, i.e. 4e-6 for probabilities near 1e-30.
#[inline(always)]
unsafe fn scaled_diff<V: Vector, const SCALED: bool>(z: V, m: V, t: V, inv_t: V) -> (V, V) {
    unsafe {
        // TwoSum: d + err == z - m exactly.
        let d = z.sub(m);
        let bb = d.sub(z);
        let err = z.sub(d.sub(bb)).sub(m.add(bb));
        let (hi, lo) = if SCALED {
            let q = d.mul(inv_t);
            // d - q*T, exact up to a tiny rounding: the error of the quotient.
            let r = q.mul_add(V::splat(0.0).sub(t), d);
            (q, r.add(err).mul(inv_t))
        } else {
            (d, err)
        };
        // For masked entries (hi = -inf) the error terms are NaN; any bounded value will do
        // there, since exp(-inf + lo) = 0. For finite hi, |lo| << 1.
        (hi, lo.max(V::splat(-1.0)).min(V::splat(1.0)))
    }
}

/// The online pass: `(M, S)` over `z = x (+ mask)` for `len` elements.
///
/// NaN or `+inf` anywhere in `z` makes `S` NaN; a row of `-inf` gives `S = 0` and
/// `M = -f32::MAX`.
#[inline(always)]
unsafe fn max_sum_impl<V: Vector, const MASK: bool, const SCALED: bool>(
    x: *const f32,
    mask: *const f32,
    len: usize,
    p: Params,
) -> MaxSum {
    unsafe {
        let lanes = V::LANES;
        let block = lanes * BLOCK_VECS;
        // -f32::MAX rather than -inf: then z - m is never (-inf) - (-inf).
        let mut m = -f32::MAX;
        let mut s = 0f64;
        let inv_t = V::splat(p.inv_t);
        let mut i = 0;
        while i < len {
            let blen = block.min(len - i);
            let full = blen / lanes;
            let tail = blen % lanes;
            // Block maximum, four independent accumulators.
            let mut a = [V::splat(-f32::MAX); 4];
            for j in 0..full {
                a[j % 4] = a[j % 4].max(load_z::<V, MASK>(x, mask, i + j * lanes));
            }
            if tail > 0 {
                a[0] = a[0].max(load_z_partial::<V, MASK>(x, mask, i + full * lanes, tail));
            }
            let bm = a[0].max(a[1]).max(a[2].max(a[3])).reduce_max();
            if bm > m {
                // Rescale the running sum to the new maximum (skipped when s == 0).
                if s != 0.0 {
                    s *= ((m as f64 - bm as f64) / p.t as f64).exp();
                }
                m = bm;
            }
            let mv = V::splat(m);
            let mut acc = [V::splat(0.0); 4];
            for j in 0..full {
                let mut d = load_z::<V, MASK>(x, mask, i + j * lanes).sub(mv);
                if SCALED {
                    d = d.mul(inv_t);
                }
                acc[j % 4] = acc[j % 4].add(exp(d));
            }
            if tail > 0 {
                let mut d = load_z_partial::<V, MASK>(x, mask, i + full * lanes, tail).sub(mv);
                if SCALED {
                    d = d.mul(inv_t);
                }
                acc[0] = acc[0].add(exp(d));
            }
            s += acc[0].add(acc[1]).add(acc[2].add(acc[3])).reduce_sum() as f64;
            i += blen;
        }
        MaxSum { max: m, sum: s }
    }
}

/// `out[i] = exp((z_i - M) / T) * scale`, where `scale = 1 / S`.
/// `out` may equal `x` (in place); it may not otherwise overlap `x` or `mask`.
#[inline(always)]
unsafe fn softmax_impl<V: Vector, const MASK: bool, const SCALED: bool>(
    x: *const f32,
    mask: *const f32,
    out: *mut f32,
    len: usize,
    p: Params,
    m: f32,
    scale: f32,
) {
    unsafe {
        let lanes = V::LANES;
        let (mv, t, inv_t, sv) = (V::splat(m), V::splat(p.t), V::splat(p.inv_t), V::splat(scale));
        let full = len / lanes;
        for j in 0..full {
            let z = load_z::<V, MASK>(x, mask, j * lanes);
            let (hi, lo) = scaled_diff::<V, SCALED>(z, mv, t, inv_t);
            exp_ext(hi, lo).mul(sv).store(out.add(j * lanes));
        }
        let tail = len % lanes;
        if tail > 0 {
            let z = load_z_partial::<V, MASK>(x, mask, full * lanes, tail);
            let (hi, lo) = scaled_diff::<V, SCALED>(z, mv, t, inv_t);
            exp_ext(hi, lo).mul(sv).store_partial(out.add(full * lanes), tail);
        }
    }
}

/// `out[i] = (z_i - M) / T - ln_s`. Same aliasing rules as [`softmax_impl`].
#[inline(always)]
unsafe fn log_softmax_impl<V: Vector, const MASK: bool, const SCALED: bool>(
    x: *const f32,
    mask: *const f32,
    out: *mut f32,
    len: usize,
    p: Params,
    m: f32,
    ln_s: f32,
) {
    unsafe {
        let lanes = V::LANES;
        let (mv, lv) = (V::splat(m), V::splat(ln_s));
        let full = len / lanes;
        // (z/2 - m/2) * (2/T): halving is exact, and the difference cannot overflow even
        // when z - m would (|z - m| > f32::MAX is finite after dividing by T > 1).
        let (half, two_inv_t) = (V::splat(0.5), V::splat(2.0 * p.inv_t));
        let mh = mv.mul(half);
        let f = |z: V| z.mul(half).sub(mh).mul(two_inv_t).sub(lv);
        for j in 0..full {
            f(load_z::<V, MASK>(x, mask, j * lanes)).store(out.add(j * lanes));
        }
        let tail = len % lanes;
        if tail > 0 {
            let z = load_z_partial::<V, MASK>(x, mask, full * lanes, tail);
            f(z).store_partial(out.add(full * lanes), tail);
        }
    }
}

/// Dispatches on the presence of a mask and on `T != 1` to the four instantiations.
macro_rules! dispatch4 {
    ($f:ident, $V:ty, $mask:expr, $p:expr, ($($arg:expr),*)) => {
        match ($mask.is_null(), $p.scaled()) {
            (true, false) => $f::<$V, false, false>($($arg),*),
            (true, true) => $f::<$V, false, true>($($arg),*),
            (false, false) => $f::<$V, true, false>($($arg),*),
            (false, true) => $f::<$V, true, true>($($arg),*),
        }
    };
}

/// See [`max_sum_impl`]. `mask` is null or valid for `len` reads.
#[inline(always)]
pub(crate) unsafe fn max_sum<V: Vector>(x: *const f32, mask: *const f32, len: usize, p: Params) -> MaxSum {
    unsafe { dispatch4!(max_sum_impl, V, mask, p, (x, mask, len, p)) }
}

/// See [`softmax_impl`].
#[inline(always)]
pub(crate) unsafe fn softmax<V: Vector>(
    x: *const f32,
    mask: *const f32,
    out: *mut f32,
    len: usize,
    p: Params,
    m: f32,
    scale: f32,
) {
    unsafe { dispatch4!(softmax_impl, V, mask, p, (x, mask, out, len, p, m, scale)) }
}

/// See [`log_softmax_impl`].
#[inline(always)]
pub(crate) unsafe fn log_softmax<V: Vector>(
    x: *const f32,
    mask: *const f32,
    out: *mut f32,
    len: usize,
    p: Params,
    m: f32,
    ln_s: f32,
) {
    unsafe { dispatch4!(log_softmax_impl, V, mask, p, (x, mask, out, len, p, m, ln_s)) }
}

/// `out[i] = exp(x[i])`; `out` may equal `x`.
#[inline(always)]
pub(crate) unsafe fn exp_slice<V: Vector>(x: *const f32, out: *mut f32, len: usize) {
    unsafe {
        let lanes = V::LANES;
        let full = len / lanes;
        for j in 0..full {
            exp(V::load(x.add(j * lanes))).store(out.add(j * lanes));
        }
        let tail = len % lanes;
        if tail > 0 {
            exp(V::load_partial(x.add(full * lanes), tail, 0.0)).store_partial(out.add(full * lanes), tail);
        }
    }
}

/// Generates the four entry points of one instruction set, each compiled with its
/// `#[target_feature]`s so that the generic code above inlines into native instructions.
macro_rules! instantiate {
    ($V:ty $(, $feature:literal)?) => {
        use crate::kernels::generic::{self, Params};
        use crate::kernels::MaxSum;

        /// # Safety
        /// The CPU supports this module's instruction set; `x` (and `mask`, unless null)
        /// are valid for `len` reads.
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn max_sum(x: *const f32, mask: *const f32, len: usize, p: Params) -> MaxSum {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::max_sum::<$V>(x, mask, len, p) }
        }

        /// # Safety
        /// As [`max_sum`], and `out` is valid for `len` writes; it equals `x` or overlaps
        /// neither `x` nor `mask`.
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn softmax(
            x: *const f32, mask: *const f32, out: *mut f32, len: usize, p: Params, m: f32, scale: f32,
        ) {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::softmax::<$V>(x, mask, out, len, p, m, scale) }
        }

        /// # Safety
        /// As [`softmax`].
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn log_softmax(
            x: *const f32, mask: *const f32, out: *mut f32, len: usize, p: Params, m: f32, ln_s: f32,
        ) {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::log_softmax::<$V>(x, mask, out, len, p, m, ln_s) }
        }

        /// # Safety
        /// The CPU supports this module's instruction set; `x` is valid for `len` reads and
        /// `out` for `len` writes, and they are equal or do not overlap.
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn exp(x: *const f32, out: *mut f32, len: usize) {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::exp_slice::<$V>(x, out, len) }
        }
    };
}
pub(crate) use instantiate;
