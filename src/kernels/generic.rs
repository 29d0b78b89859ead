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
    unsafe fn div(self, b: Self) -> Self;
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
    /// `self * 2^n` for lanes `n` holding integers in `[-252, 252]`, rounded once (into
    /// the subnormal range or to infinity when the result leaves the normal range).
    #[inline(always)]
    unsafe fn scale_pow2(self, n: Self) -> Self {
        // Two exact steps, each a power of two in the normal range; only the last rounds.
        // SAFETY: the caller upholds this function's contract: the instruction set is
        // available and every pointer is valid for the elements the loops touch.
        unsafe {
            let n1 = n.mul(Self::splat(0.5)).round();
            let n2 = n.sub(n1);
            self.mul(n1.pow2i()).mul(n2.pow2i())
        }
    }
    /// Stores `LANES` values to `ptr`, which is aligned to `LANES * 4` bytes, bypassing the
    /// caches where the instruction set can (non-temporal store). Call
    /// [`Vector::stream_fence`] before the data are handed to another thread.
    #[inline(always)]
    unsafe fn store_stream(self, ptr: *mut f32) {
        // SAFETY: the caller upholds this function's contract: the instruction set is
        // available and every pointer is valid for the elements the loops touch.
        unsafe { self.store(ptr) }
    }
    /// Orders earlier non-temporal stores before later stores.
    #[inline(always)]
    unsafe fn stream_fence() {}
    /// Hints that the cache line holding `ptr` will be read soon. Never faults.
    #[inline(always)]
    unsafe fn prefetch(_ptr: *const f32) {}
    /// Hints that the cache line holding `ptr` will be read later: into L2, not L1. Never
    /// faults.
    #[inline(always)]
    unsafe fn prefetch_l2(_ptr: *const f32) {}
    /// Lane-wise `if x < lim { 0 } else { self }`; a NaN in `x` keeps `self`.
    unsafe fn zero_below(self, x: Self, lim: Self) -> Self;
    /// Lane-wise `if self < lim { 0 } else { self * f }`, with the lanes below `lim` never
    /// multiplied (so a product that would be subnormal costs no floating-point assist).
    #[inline(always)]
    unsafe fn mul_unless_below(self, f: Self, lim: Self) -> Self {
        // SAFETY: the caller guarantees the instruction set.
        unsafe { self.zero_below(self, lim).mul(f) }
    }
    /// Whether [`Vector::scale_pow2_unless_below`] skips the flushed lanes entirely (a
    /// masked instruction), so that their inputs need no clamping.
    const MASKED_SCALE: bool = false;
    /// `(self * 2^n).zero_below(x, lim)`. With [`Vector::MASKED_SCALE`], lanes where
    /// `x < lim` are not computed at all (no floating-point assist, whatever they hold).
    #[inline(always)]
    unsafe fn scale_pow2_unless_below(self, n: Self, x: Self, lim: Self) -> Self {
        // SAFETY: the caller guarantees the instruction set.
        unsafe { self.scale_pow2(n).zero_below(x, lim) }
    }
    /// How many lanes hold a value strictly greater than the same lane of `t`.
    unsafe fn count_gt(self, t: Self) -> usize;
    /// Bit `l` set for each lane `l` with `lo ≤ self[l] ≤ hi` (NaN never). This default
    /// stores the lanes (at most 16) and compares them one by one; x86 compares in
    /// registers.
    #[inline(always)]
    unsafe fn in_range_mask(self, lo: Self, hi: Self) -> u32 {
        let (mut x, mut l, mut h) = ([0f32; 16], [0f32; 16], [0f32; 16]);
        // SAFETY: the caller guarantees the instruction set; LANES ≤ 16 lanes each.
        unsafe {
            self.store(x.as_mut_ptr());
            lo.store(l.as_mut_ptr());
            hi.store(h.as_mut_ptr());
        }
        (0..Self::LANES).filter(|&i| x[i] >= l[i] && x[i] <= h[i]).fold(0, |m, i| m | 1 << i)
    }
    /// Maximum over the lanes, in a fixed order.
    unsafe fn reduce_max(self) -> f32;
    /// Sum over the lanes, in a fixed order.
    unsafe fn reduce_sum(self) -> f32;
    /// The lanes of four vectors summed in `f64`, in a fixed order (each lane widened
    /// exactly first): a term far below the row's largest (1) is not lost when it sits in
    /// another lane (`ln S` of [0, −17] is 4.1e-8, not 0). This default stores the lanes;
    /// x86 widens in registers.
    #[inline(always)]
    unsafe fn sum4_f64(a: Self, b: Self, c: Self, d: Self) -> f64 {
        let mut total = 0f64;
        for v in [a, b, c, d] {
            let mut lanes = [0f32; 16];
            // SAFETY: `LANES <= 16` for every implementation, so the store stays in `lanes`.
            unsafe { v.store(lanes.as_mut_ptr()) };
            total += lanes[..Self::LANES].iter().map(|&x| x as f64).sum::<f64>();
        }
        total
    }
}

/// Elements per block of the online pass: a block (4 KiB) is read twice from L1, once for
/// its maximum and once for its terms. A multiple of every instruction set's lane count.
pub(crate) const BLOCK: usize = 1024;

/// Terms that each lane of the online pass adds in `f32` before its partial sums join the
/// running `f64` sum: 16, so that a sum's relative error stays near `16·2^-24` at most
/// (about 1e-7 typically) on every instruction set. On AVX-512 that is one block (4
/// accumulators of 16 lanes); scalar code would otherwise add 256 terms per accumulator.
const FLUSH_TERMS: usize = 16;

/// Parameters shared by the row kernels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Params {
    /// Temperature `T`, finite and > 0.
    pub t: f32,
    /// `1 / T` rounded to `f32`.
    pub inv_t: f32,
    /// Write outputs with non-temporal stores (large outputs that will not be re-read soon).
    pub stream: bool,
    /// Null, or the address (the prefetch distance past `x`, see
    /// [`super::set_prefetch_distance`]) from
    /// which the online pass prefetches towards L2, one line per vector it reads: only a
    /// hint, never dereferenced, and it may lie past the end of `x`'s buffer.
    pub ahead: *const f32,
    /// For the `STORE` online pass only: the previous row's stored terms, rescaled into its
    /// output while this row is computed (null `src`: none).
    pub prev: PrevRow,
    /// For the read-only online pass only: the previous row of a pipelined log-softmax,
    /// written while this row is read (null `x`: none).
    pub prev_log: PrevLog,
}

/// The previous row of a software-pipelined softmax, from the offset of the current call
/// to the end of that row: its stored terms `src`, its output `out` (both valid for
/// `avail` elements) and its `block_max` (for `avail.div_ceil(BLOCK)` blocks, aligned with
/// the current row's), and its final `(M, S)`. The online pass writes
/// `out[e] = src[e] · exp((block_max[e / BLOCK] − m) / T) / sum`, as [`rescale`] does,
/// while it computes the current row's terms.
///
/// The previous row is covered `h` elements ahead of the current one, `h` being what
/// brings `out` to a vector boundary, so that its full vectors can be streamed: a call
/// over `len` current elements writes previous elements `[h, h + len)` (capped at
/// `avail`), plus `[0, h)` when `head` is set (the call at the start of the row).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PrevRow {
    pub src: *const f32,
    pub out: *mut f32,
    pub block_max: *const f32,
    pub avail: usize,
    pub m: f32,
    pub sum: f64,
    pub head: bool,
}

impl PrevRow {
    pub(crate) const NONE: PrevRow = PrevRow {
        src: std::ptr::null(),
        out: std::ptr::null_mut(),
        block_max: std::ptr::null(),
        avail: 0,
        m: 0.0,
        sum: 1.0,
        head: false,
    };

    /// The factor of block `b`, as [`rescale`] computes it; 0 past the row's last block.
    ///
    /// # Safety
    /// `block_max` is valid as described above.
    #[inline(always)]
    unsafe fn factor(&self, b: usize, t: f32) -> f32 {
        if b < self.avail.div_ceil(BLOCK) {
            // SAFETY: `b` is one of the row's blocks (checked above).
            block_factor(unsafe { *self.block_max.add(b) }, self.m, self.sum, t)
        } else {
            0.0
        }
    }

    /// Scalar `out[e] = src[e] · f` for `e` in `[e0, e1)` (capped at `avail`), with `f` the
    /// factor `fb` below `split` and `fb1` from there (blocks b and b + 1), flushed as
    /// [`rescale`] does.
    ///
    /// # Safety
    /// `src` and `out` are valid as described above.
    #[inline(always)]
    unsafe fn scalar(&self, e0: usize, e1: usize, split: usize, fb: f32, fb1: f32) {
        let (lim, lim1) = (flush_threshold(fb), flush_threshold(fb1));
        for e in e0..e1.min(self.avail) {
            let (f, lim) = if e < split { (fb, lim) } else { (fb1, lim1) };
            // SAFETY: `e < avail` (contract).
            unsafe {
                let t = *self.src.add(e);
                *self.out.add(e) = if t < lim { 0.0 } else { t * f };
            }
        }
    }
}

/// The previous row of a software-pipelined log-softmax, from the offset of the current
/// call to the end of that row: its logits `x` and mask (null when the rows have none),
/// its output `out` (all valid for `avail` elements), and its final `M` and `ln S`. The
/// read-only online pass writes `out[e] = (z_e − M)/T − ln S` as [`log_softmax_impl`] does
/// (the same bits) while it reads the current row, covering the previous row `h` elements
/// ahead of the current one as [`PrevRow`] describes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PrevLog {
    pub x: *const f32,
    pub mask: *const f32,
    pub out: *mut f32,
    pub avail: usize,
    pub m: f32,
    pub ln_s: f32,
    pub head: bool,
}

impl PrevLog {
    pub(crate) const NONE: PrevLog = PrevLog {
        x: std::ptr::null(),
        mask: std::ptr::null(),
        out: std::ptr::null_mut(),
        avail: 0,
        m: 0.0,
        ln_s: 0.0,
        head: false,
    };
}

/// `exp((m_b − M) / T) / S`, computed in `f64`: the factor that turns the terms stored
/// against a block's running maximum `m_b` into probabilities.
#[inline(always)]
fn block_factor(m_b: f32, m: f32, sum: f64, t: f32) -> f32 {
    (((m_b as f64 - m as f64) / t as f64).exp() / sum) as f32
}

/// The flush bound of terms `exp(x)` that are then divided by `S = e^ln_s ≥ 1`: terms under
/// `exp(FLUSH_LO)·S` give results under `exp(FLUSH_LO)`, flushed to 0 in the exponential so
/// that the division is never subnormal.
#[inline(always)]
fn flush_bound(ln_s: f64) -> f32 {
    (FLUSH_LO as f64 + ln_s).clamp(FLUSH_LO as f64, 0.0) as f32
}

/// The stored terms below which a block with factor `f` gives a probability under
/// `exp(FLUSH_LO)` ≈ 2.7e-38: those are written as exactly 0, as the terms themselves are,
/// and never multiplied (a subnormal product costs x86 a microcode assist). At or above
/// it, `t·f` is at least about 2.7e-38, a normal number.
#[inline(always)]
fn flush_threshold(f: f32) -> f32 {
    // (f = 0 gives +inf: every term flushes, as its product would be 0.)
    ((FLUSH_LO as f64).exp() / f as f64) as f32
}

impl Params {
    pub(crate) fn new(t: f32) -> Self {
        Params {
            t,
            inv_t: 1.0 / t,
            stream: false,
            ahead: std::ptr::null(),
            prev: PrevRow::NONE,
            prev_log: PrevLog::NONE,
        }
    }
    pub(crate) fn finishing_log(mut self, prev: PrevLog) -> Self {
        self.prev_log = prev;
        self
    }
    pub(crate) fn rescaling(mut self, prev: PrevRow) -> Self {
        self.prev = prev;
        self
    }
    pub(crate) fn prefetching(mut self, ahead: *const f32) -> Self {
        self.ahead = ahead;
        self
    }
    pub(crate) fn streaming(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }
    /// Which instantiation of the kernels computes `(z − M)/T`: 0 for `T = 1`, 1 for other
    /// temperatures, 2 for `T >` [`HALVE_ABOVE`], which halves `z` and `M` first.
    fn scaling(&self) -> u8 {
        if self.t == 1.0 {
            0
        } else if self.t > HALVE_ABOVE {
            2
        } else {
            1
        }
    }
    /// `(h, h·T, 1/(h·T))` for [`scaled_diff`]: `h` = ½ when [`Params::scaling`] is 2, else 1.
    fn halved(&self) -> (f32, f32, f32) {
        let h = if self.scaling() == 2 { 0.5 } else { 1.0 };
        (h, self.t * h, self.inv_t / h)
    }
}

/// Above this temperature the kernels compute `(z − M)/T` as `(z/2 − M/2)/(T/2)` (halving
/// is exact), because a gap `z − M` beyond `f32::MAX`, which overflows, then matters: over
/// `T ≤ f32::MAX / 150` it is below −150, where `exp` is 0 anyway. The extra multiply stays
/// out of the kernels for every other temperature (7% of a softmax at `T = 2`).
const HALVE_ABOVE: f32 = 1.329_228e36; // 2^120

// expf: exp(x) = 2^n * exp(r), |r| <= ln2/2, with a degree-6 polynomial for exp(r).
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n * LN2_HI` is exact for |n| < 2^15.
const LN2_HI: f32 = f32::from_bits(0x3f31_8000); // 0.693359375 = 355/512
const LN2_LO: f32 = -2.121_944_4e-4;
/// Coefficients `c` of `exp(r) ≈ 1 + r·(c0 + r·(c1 + …))` on `|r| ≤ ln2/2` (see
/// [`one_plus_r_times`]): a degree-6 fit of least maximum relative error (Lawson's iteration
/// in `f64`, rounded to `f32`; the coefficient of `r` came out as exactly 1). Evaluated in
/// `f32` with fused multiply-adds its relative error is at most 7.2e-8 (1.21 ulp), as
/// Cephes' degree-7 form `1 + r + r²·p(r)` (6.9e-8), in six operations instead of eight.
const EXP_POLY: [f32; 6] = [1.0, 0.499_999_94, 0.166_664_32, 0.041_668, 0.008_374_154, 0.001_384_364_1];

/// `1 + r·(c[0] + r·(c[1] + … + r·c[N−1]))` by Horner's rule, in `N` fused multiply-adds.
///
/// # Safety
/// The instruction set of `V` is available.
#[inline(always)]
unsafe fn one_plus_r_times<V: Vector, const N: usize>(r: V, c: [f32; N]) -> V {
    // SAFETY: pure arithmetic on registers; the caller guarantees the instruction set.
    unsafe {
        let mut q = V::splat(c[N - 1]);
        for &ck in c[..N - 1].iter().rev() {
            q = q.mul_add(r, V::splat(ck));
        }
        q.mul_add(r, V::splat(1.0))
    }
}
/// Above this, exp overflows to +inf; below `EXP_LO`, it rounds to 0.
const EXP_HI: f32 = 89.0;
const EXP_LO: f32 = -104.0;

/// Adding this rounds a value of magnitude < 2^22 to an integer (ties to even).
const ROUND_MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23

/// `exp(x + lo)`, where `lo` is a small correction to `x` (used when `EXT`), for `x` in
/// `[-160, 89]`: no clamping, so callers bound `x` themselves.
///
/// `exp(x) = 2^n * exp(r)` with `n = round(x / ln 2)` and `|r| <= ln2 / 2`, a degree-6
/// polynomial for `exp(r)` ([`EXP_POLY`]), and one final scaling. About 1 ulp over the whole range,
/// subnormal results included (see the exp sweep test).
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
unsafe fn exp_core<V: Vector, const EXT: bool>(x: V, lo: V) -> V {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let (y, n) = exp_parts::<V, EXT>(x, lo);
        y.scale_pow2(n)
    }
}

/// [`exp_core`] before its final scaling: `(y, n)` with `exp(x + lo) = y · 2^n`.
///
/// # Safety
/// The instruction set of `V` is available.
#[inline(always)]
unsafe fn exp_parts<V: Vector, const EXT: bool>(x: V, lo: V) -> (V, V) {
    // SAFETY: pure arithmetic on registers; the caller guarantees the instruction set.
    unsafe {
        let (r, n) = exp_reduce::<V, EXT>(x, lo);
        (one_plus_r_times(r, EXP_POLY), n)
    }
}

/// The range reduction of [`exp_parts`]: `(r, n)` with `x + lo = n·ln 2 + r`, `|r| ≤ ln2/2`
/// (up to rounding).
///
/// # Safety
/// The instruction set of `V` is available.
#[inline(always)]
unsafe fn exp_reduce<V: Vector, const EXT: bool>(x: V, lo: V) -> (V, V) {
    // SAFETY: pure arithmetic on registers; the caller guarantees the instruction set.
    unsafe {
        let n = x.mul_add(V::splat(LOG2E), V::splat(ROUND_MAGIC)).sub(V::splat(ROUND_MAGIC));
        // n * LN2_HI is exact, and x - n * LN2_HI is exact by Sterbenz-like cancellation.
        let r = n.mul_add(V::splat(-LN2_HI), x);
        let mut r = n.mul_add(V::splat(-LN2_LO), r);
        if EXT {
            r = r.add(lo);
        }
        (r, n)
    }
}

/// As [`EXP_POLY`], a degree-5 fit: a term's relative error stays under 1.6e-7 (about 2.7
/// ulp; 8.1e-8 with the full polynomial, the test
/// `summed_terms_stay_accurate_over_the_reduced_range`), one operation fewer.
const SUM_POLY: [f32; 5] = [0.999_999_7, 0.499_991_5, 0.166_676_36, 0.041_897_91, 0.008_290_297];

/// [`exp_nonpositive`] with the shorter polynomial ([`SUM_POLY`]): for terms that are only
/// summed (the online pass without stored terms), where an error of 1.6e-7 relative in
/// each term is at most 1.6e-7 in the sum, far inside the bounds of `logsumexp` and
/// `log_softmax` (2e-6). Terms that become probabilities keep [`exp_term`].
///
/// # Safety
/// The instruction set of `V` is available.
#[inline(always)]
unsafe fn exp_sum_term<V: Vector>(x: V) -> V {
    // SAFETY: pure arithmetic on registers; the caller guarantees the instruction set.
    unsafe {
        let lim = V::splat(FLUSH_LO);
        // As `exp_term_above`: masked lanes need no clamping, others are clamped first.
        let xc = if V::MASKED_SCALE { x } else { lim.max(x) };
        let (r, n) = exp_reduce::<V, false>(xc, xc);
        one_plus_r_times(r, SUM_POLY).scale_pow2_unless_below(n, x, lim)
    }
}

/// Below this, the row kernels' terms `exp(x)` are flushed to exactly 0: the result would
/// be under 2.7e-38. Above it, `exp_core` stays in the normal range (`2^n` with `n >= -125`).
/// An underflowing or subnormal result costs x86 a microcode assist of ~150 cycles, and
/// every tail lane filled with `-inf` (and every masked entry) would pay it: on rows of 100
/// classes that was half the time of the online pass.
const FLUSH_LO: f32 = -86.5;

/// [`exp_core`] for the row kernels' terms: `exp(x + lo)`, with `x < FLUSH_LO` (`-inf`
/// included) giving exactly 0 and no subnormal arithmetic; a NaN `x` propagates.
///
/// # Safety
/// The instruction set of `V` is available.
#[inline(always)]
unsafe fn exp_term<V: Vector, const EXT: bool>(x: V, lo: V) -> V {
    // SAFETY: as `exp_term_above`'s.
    unsafe { exp_term_above::<V, EXT>(x, lo, V::splat(FLUSH_LO)) }
}

/// [`exp_term`] with the flush below `lim >= FLUSH_LO` instead.
///
/// # Safety
/// The instruction set of `V` is available.
#[inline(always)]
unsafe fn exp_term_above<V: Vector, const EXT: bool>(x: V, lo: V, lim: V) -> V {
    // SAFETY: pure arithmetic on registers; the caller guarantees the instruction set.
    unsafe {
        if V::MASKED_SCALE {
            // The flushed lanes are never scaled, so they need no clamping: whatever they
            // hold (NaN from -inf included) never reaches an underflowing operation.
            let (y, n) = exp_parts::<V, EXT>(x, lo);
            y.scale_pow2_unless_below(n, x, lim)
        } else {
            exp_core::<V, EXT>(lim.max(x), lo).zero_below(x, lim)
        }
    }
}

/// `exp(x)` over the whole `f32` range: `+inf -> +inf`, `-inf -> 0`, NaN propagates.
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
pub(crate) unsafe fn exp<V: Vector>(x: V) -> V {
    // `min`/`max` with the constant first propagate NaN (see `Vector::max`).
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe { exp_core::<V, false>(V::splat(EXP_LO).max(V::splat(EXP_HI).min(x)), x) }
}

/// `exp(x)` for `x <= 0` (or NaN, which propagates): the online pass's terms, flushed to 0
/// below [`FLUSH_LO`].
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
pub(crate) unsafe fn exp_nonpositive<V: Vector>(x: V) -> V {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe { exp_term::<V, false>(x, x) }
}

/// Loads `z = x (+ mask)` at `i`, full vector.
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
unsafe fn load_z<V: Vector, const MASK: bool>(x: *const f32, mask: *const f32, i: usize) -> V {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let v = V::load(x.add(i));
        if MASK { v.add(V::load(mask.add(i))) } else { v }
    }
}

/// Loads `z = x (+ mask)` at `i`, `len < LANES` values; other lanes are `-inf`.
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
unsafe fn load_z_partial<V: Vector, const MASK: bool>(x: *const f32, mask: *const f32, i: usize, len: usize) -> V {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let v = V::load_partial(x.add(i), len, f32::NEG_INFINITY);
        if MASK { v.add(V::load_partial(mask.add(i), len, 0.0)) } else { v }
    }
}

/// `(z - m) / T` as an unevaluated sum `hi + lo`, accurate to far below one ulp of `hi`.
/// With `S` > 0 (see [`Params::scaling`]), it takes `mh = h·m`, `h`, `th = h·T` and
/// `inv_th = 1/(h·T)` (see [`Params::halved`]) and computes `(h·z − mh)/th`, multiplying by
/// `h` only when `S` is 2; with `S` = 0, `z - m` (`T = 1`).
///
/// The rounding of `z - m` (and of the division) would otherwise cost up to
/// `|z - m| * 2^-24` of relative error in `exp`, i.e. 4e-6 for probabilities near 1e-30.
/// Without [`Vector::MASKED_SCALE`], `hi` is clamped to `>= -150` and `lo` to `[-1, 1]`,
/// ready for [`exp_core`]; with it, the parts are left as they are, for
/// [`exp_term_above`] only, which never computes the lanes that would need the bounds.
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
unsafe fn scaled_diff<V: Vector, const S: u8>(z: V, m: V, half: V, t: V, inv_t: V) -> (V, V) {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let z = if S == 2 { z.mul(half) } else { z };
        // TwoSum: d + err == z - m exactly.
        let d = z.sub(m);
        let bb = d.sub(z);
        let err = z.sub(d.sub(bb)).sub(m.add(bb));
        let (hi, lo) = if S > 0 {
            let q = d.mul(inv_t);
            // d - q*T, exact up to a tiny rounding: the error of the quotient.
            let r = q.mul_add(V::splat(0.0).sub(t), d);
            (q, r.add(err).mul(inv_t))
        } else {
            (d, err)
        };
        if V::MASKED_SCALE {
            // Every caller passes both parts to `exp_term_above`, which never scales the
            // lanes below its flush bound: those are the only ones that can hold a `hi`
            // below -150 or a NaN or huge `lo` (masked entries, differences beyond the f32
            // range). In the others |lo| is far below 1. No bounds needed (three operations).
            (hi, lo)
        } else {
            // Bound both parts for `exp_core`: below -150 the result is 0 anyway. Masked
            // entries (z = -inf) and differences beyond the f32 range make `lo` NaN or huge;
            // any value in [-1, 1] will do there. For the rest, |lo| is far below 1.
            // (`max` with the constant first keeps a NaN `hi`, so errors still show in sums.)
            (V::splat(-150.0).max(hi), lo.max(V::splat(-1.0)).min(V::splat(1.0)))
        }
    }
}

/// The online pass: `(M, S)` over `z = x (+ mask)` for `len` elements.
///
/// NaN or `+inf` anywhere in `z` makes `S` NaN; a row of `-inf` gives `S = 0` and
/// `M = -f32::MAX`.
///
/// With `STORE`, it also writes `out[i] = exp((z_i - m_b) / T)`, where `m_b` is the running
/// maximum after block `b` (of [`BLOCK`] elements), and stores `m_b` in `block_max[b]`;
/// [`rescale`] then turns these into probabilities. `out` may equal `x`. With `PREV` = 1
/// too, it rescales `p.prev`'s blocks into their output as it goes (see [`PrevRow`]), so
/// that one row's stores overlap with the next row's exponentials. Without `STORE`,
/// `PREV` = 2 writes `p.prev_log`'s log-probabilities in the same way (see [`PrevLog`]).
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
// (Not inlined in debug builds: there every inlined instantiation keeps its own stack
// slots, and the dispatching functions' frames grew past 2 MiB, a test thread's stack.)
#[cfg_attr(not(debug_assertions), inline(always))]
unsafe fn online_impl<V: Vector, const MASK: bool, const S: u8, const STORE: bool, const PREV: u8>(
    x: *const f32,
    mask: *const f32,
    out: *mut f32,
    block_max: *mut f32,
    len: usize,
    p: Params,
) -> MaxSum {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let lanes = V::LANES;
        // -f32::MAX rather than -inf: then z - m is never (-inf) - (-inf).
        let mut m = -f32::MAX;
        let mut s = 0f64;
        let (hf, th, inv_th) = p.halved();
        let (half, t, inv_t) = (V::splat(hf), V::splat(th), V::splat(inv_th));
        let mut i = 0;
        let mut b = 0;
        // The previous row's shift to a vector boundary of its output, its head, and the
        // factor of the block being written.
        let h = match PREV {
            1 => (p.prev.out as usize).wrapping_neg() % (lanes * 4) / 4,
            2 => (p.prev_log.out as usize).wrapping_neg() % (lanes * 4) / 4,
            _ => 0,
        };
        let pl = p.prev_log;
        let lsm = LogSoftmaxOf::<V, MASK> {
            x: pl.x,
            mask: pl.mask,
            mh: V::splat(pl.m).mul(V::splat(0.5)),
            two_inv_t: V::splat(2.0 * p.inv_t),
            ln_s: V::splat(pl.ln_s),
        };
        if PREV == 2 && pl.head {
            write_span::<V, _, false>(&lsm, pl.out, 0, h.min(pl.avail));
        }
        let mut f_cur = 0.0;
        if PREV == 1 {
            f_cur = p.prev.factor(0, p.t);
            if p.prev.head {
                p.prev.scalar(0, h, BLOCK, f_cur, f_cur);
            }
        }
        while i < len {
            let blen = BLOCK.min(len - i);
            let full = blen / lanes;
            let tail = blen % lanes;
            // Block maximum, four independent accumulators (named, so they stay in registers).
            let (mut a0, mut a1, mut a2, mut a3) =
                (V::splat(-f32::MAX), V::splat(-f32::MAX), V::splat(-f32::MAX), V::splat(-f32::MAX));
            let mut j = 0;
            while j + 4 <= full {
                a0 = a0.max(load_z::<V, MASK>(x, mask, i + j * lanes));
                a1 = a1.max(load_z::<V, MASK>(x, mask, i + (j + 1) * lanes));
                a2 = a2.max(load_z::<V, MASK>(x, mask, i + (j + 2) * lanes));
                a3 = a3.max(load_z::<V, MASK>(x, mask, i + (j + 3) * lanes));
                j += 4;
            }
            while j < full {
                a0 = a0.max(load_z::<V, MASK>(x, mask, i + j * lanes));
                j += 1;
            }
            if tail > 0 {
                a1 = a1.max(load_z_partial::<V, MASK>(x, mask, i + full * lanes, tail));
            }
            let bm = a0.max(a1).max(a2.max(a3)).reduce_max();
            if bm > m {
                // Rescale the running sum to the new maximum (skipped when s == 0).
                if s != 0.0 {
                    s *= ((m as f64 - bm as f64) / p.t as f64).exp();
                }
                m = bm;
            }
            let mv = V::splat(m * hf);
            // The previous row's vectors `[i + k·lanes + h, +lanes)` go along with this
            // block's; those wholly inside its block `b` and its row (below `limit`) in one
            // vector store each, the one or two that straddle either in scalar.
            let (pf, plim, limit, f_next) = if PREV == 1 {
                let f_next = p.prev.factor(b + 1, p.t);
                (V::splat(f_cur), V::splat(flush_threshold(f_cur)), (i + BLOCK).min(p.prev.avail), f_next)
            } else {
                (V::splat(0.0), V::splat(0.0), 0, 0.0)
            };
            /// # Safety
            /// The instruction set of `V` is available, and every pointer is valid for the
            /// elements this function reads or writes.
            #[inline(always)]
            unsafe fn term<V: Vector, const S: u8, const STORE: bool>(z: V, mv: V, half: V, t: V, inv_t: V) -> V {
                // SAFETY: the caller upholds this function's contract: the instruction set is
                // available and every pointer is valid for the elements the loops touch.
                unsafe {
                    if STORE {
                        // Stored terms become probabilities: keep them accurate to ~1 ulp.
                        let (hi, lo) = scaled_diff::<V, S>(z, mv, half, t, inv_t);
                        exp_term::<V, true>(hi, lo)
                    } else if S == 2 {
                        // h·z − h·M with one rounding, as `sub` has without halving.
                        exp_sum_term(z.mul_add(half, V::splat(0.0).sub(mv)).mul(inv_t))
                    } else if S == 1 {
                        exp_sum_term(z.sub(mv).mul(inv_t))
                    } else {
                        exp_sum_term(z.sub(mv))
                    }
                }
            }
            let (mut s0, mut s1, mut s2, mut s3) = (V::splat(0.0), V::splat(0.0), V::splat(0.0), V::splat(0.0));
            let mut j = 0;
            macro_rules! step {
                ($acc:ident, $k:expr) => {{
                    let z = load_z::<V, MASK>(x, mask, i + $k * lanes);
                    let e = term::<V, S, STORE>(z, mv, half, t, inv_t);
                    if STORE {
                        e.store(out.add(i + $k * lanes));
                    }
                    if PREV == 2 {
                        let e0 = i + $k * lanes + h;
                        if e0 + lanes <= pl.avail {
                            if p.stream {
                                lsm.full(e0).store_stream(pl.out.add(e0));
                            } else {
                                lsm.full(e0).store(pl.out.add(e0));
                            }
                        } else if e0 < pl.avail {
                            write_span::<V, _, false>(&lsm, pl.out, e0, pl.avail);
                        }
                    }
                    if PREV == 1 {
                        let e0 = i + $k * lanes + h;
                        if e0 + lanes <= limit {
                            let y = V::load(p.prev.src.add(e0)).mul_unless_below(pf, plim);
                            if p.stream {
                                y.store_stream(p.prev.out.add(e0));
                            } else {
                                y.store(p.prev.out.add(e0));
                            }
                        } else {
                            p.prev.scalar(e0, e0 + lanes, i + BLOCK, f_cur, f_next);
                        }
                    }
                    $acc = $acc.add(e);
                }};
            }
            while j + 4 <= full {
                // While the terms are computed (the compute-heavy half), bring the next
                // block in (mask lines too), and the next row towards L2 when asked: memory
                // reads then overlap with compute instead of alternating with it.
                for q in 0..4 {
                    V::prefetch(x.wrapping_add(i + BLOCK + (j + q) * lanes));
                    if MASK {
                        V::prefetch(mask.wrapping_add(i + BLOCK + (j + q) * lanes));
                    }
                    if !p.ahead.is_null() {
                        V::prefetch_l2(p.ahead.wrapping_add(i + (j + q) * lanes));
                    }
                }
                step!(s0, j);
                step!(s1, j + 1);
                step!(s2, j + 2);
                step!(s3, j + 3);
                j += 4;
                // Each lane's f32 partial sums take at most FLUSH_TERMS terms before joining
                // the f64 sum: a whole block on AVX-512, a part of one on narrower vectors.
                if j % (4 * FLUSH_TERMS) == 0 && j < full {
                    s += V::sum4_f64(s0, s1, s2, s3);
                    (s0, s1, s2, s3) = (V::splat(0.0), V::splat(0.0), V::splat(0.0), V::splat(0.0));
                }
            }
            // (The last vectors into different accumulators, as in the loop above.)
            while j < full {
                match j % 4 {
                    0 => step!(s0, j),
                    1 => step!(s1, j),
                    2 => step!(s2, j),
                    _ => step!(s3, j),
                }
                j += 1;
            }
            if tail > 0 {
                let z = load_z_partial::<V, MASK>(x, mask, i + full * lanes, tail);
                let e = term::<V, S, STORE>(z, mv, half, t, inv_t);
                if STORE {
                    e.store_partial(out.add(i + full * lanes), tail);
                }
                let e0 = i + full * lanes + h;
                if PREV == 2 && e0 < pl.avail {
                    write_span::<V, _, false>(&lsm, pl.out, e0, (e0 + tail).min(pl.avail));
                }
                if PREV == 1 {
                    p.prev.scalar(e0, e0 + tail, i + BLOCK, f_cur, f_next);
                }
                s1 = s1.add(e);
            }
            s += V::sum4_f64(s0, s1, s2, s3);
            if STORE {
                *block_max.add(b) = m;
            }
            if PREV == 1 {
                f_cur = f_next;
            }
            b += 1;
            i += blen;
        }
        if PREV != 0 && p.stream {
            V::stream_fence();
        }
        MaxSum { max: m, sum: s }
    }
}

/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes.
#[inline(always)]
unsafe fn max_sum_impl<V: Vector, const MASK: bool, const S: u8>(
    x: *const f32,
    mask: *const f32,
    len: usize,
    p: Params,
) -> MaxSum {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let (out, block_max) = (std::ptr::null_mut(), std::ptr::null_mut());
        if p.prev_log.x.is_null() {
            online_impl::<V, MASK, S, false, 0>(x, mask, out, block_max, len, p)
        } else {
            online_impl::<V, MASK, S, false, 2>(x, mask, out, block_max, len, p)
        }
    }
}

/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes.
#[inline(always)]
unsafe fn softmax_pass1_impl<V: Vector, const MASK: bool, const S: u8>(
    x: *const f32,
    mask: *const f32,
    out: *mut f32,
    block_max: *mut f32,
    len: usize,
    p: Params,
) -> MaxSum {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        if p.prev.src.is_null() {
            online_impl::<V, MASK, S, true, 0>(x, mask, out, block_max, len, p)
        } else {
            online_impl::<V, MASK, S, true, 1>(x, mask, out, block_max, len, p)
        }
    }
}

/// Produces the output of a pass-2 kernel, one vector at a time.
trait Producer<V: Vector> {
    /// Values of elements `[i, i + LANES)`.
    ///
    /// # Safety
    /// The instruction set of `V` is available, and every pointer is valid for the
    /// elements this function reads or writes, as described above.
    unsafe fn full(&self, i: usize) -> V;
    /// Values of elements `[i, i + len)`, `len < LANES`; other lanes are ignored.
    ///
    /// # Safety
    /// The instruction set of `V` is available, and every pointer is valid for the
    /// elements this function reads or writes, as described above.
    unsafe fn partial(&self, i: usize, len: usize) -> V;
}

/// Writes `out[i] = producer(i)` for `i` in `[start, end)`. With `STREAM`, full vectors
/// go out as aligned non-temporal stores (the unaligned head and the tail as plain masked
/// stores).
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
unsafe fn write_span<V: Vector, P: Producer<V>, const STREAM: bool>(p: &P, out: *mut f32, start: usize, end: usize) {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let lanes = V::LANES;
        let mut i = start;
        if STREAM {
            let misalign = (out.add(i) as usize % (lanes * 4)) / 4;
            if misalign != 0 && i < end {
                let head = (lanes - misalign).min(end - i);
                p.partial(i, head).store_partial(out.add(i), head);
                i += head;
            }
            while i + lanes <= end {
                p.full(i).store_stream(out.add(i));
                i += lanes;
            }
        } else {
            while i + lanes <= end {
                p.full(i).store(out.add(i));
                i += lanes;
            }
        }
        if i < end {
            p.partial(i, end - i).store_partial(out.add(i), end - i);
        }
    }
}

/// `src[i] * f`.
struct Scaled<V> {
    src: *const f32,
    f: V,
    /// [`flush_threshold`] of `f`.
    lim: V,
}

impl<V: Vector> Producer<V> for Scaled<V> {
    /// # Safety
    /// The instruction set of `V` is available, and every pointer is valid for the
    /// elements this function reads or writes.
    #[inline(always)]
    unsafe fn full(&self, i: usize) -> V {
        // SAFETY: the caller upholds this function's contract: the instruction set is
        // available and every pointer is valid for the elements the loops touch.
        unsafe { V::load(self.src.add(i)).mul_unless_below(self.f, self.lim) }
    }
    /// # Safety
    /// The instruction set of `V` is available, and every pointer is valid for the
    /// elements this function reads or writes.
    #[inline(always)]
    unsafe fn partial(&self, i: usize, len: usize) -> V {
        // SAFETY: the caller upholds this function's contract: the instruction set is
        // available and every pointer is valid for the elements the loops touch.
        unsafe { V::load_partial(self.src.add(i), len, 0.0).mul_unless_below(self.f, self.lim) }
    }
}

/// Second step after the `STORE` online pass: block `b` of `src` (the stored terms) is
/// multiplied by `exp((block_max[b] - M) / T) / S`, computed in `f64`, into `out`; a
/// probability under `exp(FLUSH_LO)` is written as 0 ([`flush_threshold`]).
/// `out` may equal `src`, but then `p.stream` must be false.
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
pub(crate) unsafe fn rescale<V: Vector>(
    src: *const f32,
    out: *mut f32,
    block_max: *const f32,
    len: usize,
    p: Params,
    m: f32,
    sum: f64,
) {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let mut i = 0;
        let mut b = 0;
        while i < len {
            let end = (i + BLOCK).min(len);
            let f = block_factor(*block_max.add(b), m, sum, p.t);
            let prod = Scaled { src, f: V::splat(f), lim: V::splat(flush_threshold(f)) };
            if p.stream {
                write_span::<V, _, true>(&prod, out, i, end);
            } else {
                write_span::<V, _, false>(&prod, out, i, end);
            }
            b += 1;
            i = end;
        }
        if p.stream {
            V::stream_fence();
        }
    }
}

/// `out[i] = exp((z_i - M) / T) * scale`, where `scale = 1 / S`.
/// `out` may equal `x` (in place); it may not otherwise overlap `x` or `mask`.
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
unsafe fn softmax_impl<V: Vector, const MASK: bool, const S: u8>(
    x: *const f32,
    mask: *const f32,
    out: *mut f32,
    len: usize,
    p: Params,
    m: f32,
    scale: f32,
) {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let lanes = V::LANES;
        let (h, th, inv_th) = p.halved();
        let (mv, half, t, inv_t, sv) = (V::splat(m * h), V::splat(h), V::splat(th), V::splat(inv_th), V::splat(scale));
        // (scale = 1/S.)
        let lim = V::splat(flush_bound(-(scale as f64).ln()));
        // A closure here would not inherit the caller's target features, and is not inlined.
        /// # Safety
        /// The instruction set of `V` is available, and every pointer is valid for the
        /// elements this function reads or writes.
        #[inline(always)]
        unsafe fn f<V: Vector, const S: u8>(z: V, mv: V, half: V, t: V, inv_t: V, sv: V, lim: V) -> V {
            // SAFETY: the caller upholds this function's contract: the instruction set is
            // available and every pointer is valid for the elements the loops touch.
            unsafe {
                let (hi, lo) = scaled_diff::<V, S>(z, mv, half, t, inv_t);
                exp_term_above::<V, true>(hi, lo, lim).mul(sv)
            }
        }
        let full = len / lanes;
        for j in 0..full {
            let z = load_z::<V, MASK>(x, mask, j * lanes);
            f::<V, S>(z, mv, half, t, inv_t, sv, lim).store(out.add(j * lanes));
        }
        let tail = len % lanes;
        if tail > 0 {
            let z = load_z_partial::<V, MASK>(x, mask, full * lanes, tail);
            f::<V, S>(z, mv, half, t, inv_t, sv, lim).store_partial(out.add(full * lanes), tail);
        }
    }
}

/// `(z_i - M) / T - ln_s`, computed as `(z/2 - M/2) * (2/T) - ln_s`: halving is exact, and
/// the difference cannot overflow even when `z - M` would (|z - M| > f32::MAX is finite after
/// dividing by T > 1).
struct LogSoftmaxOf<V, const MASK: bool> {
    x: *const f32,
    mask: *const f32,
    mh: V,
    two_inv_t: V,
    ln_s: V,
}

impl<V: Vector, const MASK: bool> Producer<V> for LogSoftmaxOf<V, MASK> {
    /// # Safety
    /// The instruction set of `V` is available, and every pointer is valid for the
    /// elements this function reads or writes.
    #[inline(always)]
    unsafe fn full(&self, i: usize) -> V {
        // SAFETY: the caller upholds this function's contract: the instruction set is
        // available and every pointer is valid for the elements the loops touch.
        unsafe {
            let z = load_z::<V, MASK>(self.x, self.mask, i);
            z.mul(V::splat(0.5)).sub(self.mh).mul(self.two_inv_t).sub(self.ln_s)
        }
    }
    /// # Safety
    /// The instruction set of `V` is available, and every pointer is valid for the
    /// elements this function reads or writes.
    #[inline(always)]
    unsafe fn partial(&self, i: usize, len: usize) -> V {
        // SAFETY: the caller upholds this function's contract: the instruction set is
        // available and every pointer is valid for the elements the loops touch.
        unsafe {
            let z = load_z_partial::<V, MASK>(self.x, self.mask, i, len);
            z.mul(V::splat(0.5)).sub(self.mh).mul(self.two_inv_t).sub(self.ln_s)
        }
    }
}

/// `out[i] = (z_i - M) / T - ln_s`. Same aliasing rules as [`softmax_impl`]; with
/// `p.stream`, `out` must not equal `x`.
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
unsafe fn log_softmax_impl<V: Vector, const MASK: bool, const S: u8>(
    x: *const f32,
    mask: *const f32,
    out: *mut f32,
    len: usize,
    p: Params,
    m: f32,
    ln_s: f32,
) {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let prod = LogSoftmaxOf::<V, MASK> {
            x,
            mask,
            mh: V::splat(m).mul(V::splat(0.5)),
            two_inv_t: V::splat(2.0 * p.inv_t),
            ln_s: V::splat(ln_s),
        };
        if p.stream {
            write_span::<V, _, true>(&prod, out, 0, len);
            V::stream_fence();
        } else {
            write_span::<V, _, false>(&prod, out, 0, len);
        }
    }
}

/// The gradient of the cross-entropy with respect to the logits `x`, from the (softcapped)
/// logits `z` of one row: `out_j = (a * p_j - b * w_j) * g_j`, with
/// `p_j = exp((z_j - M) / T) / S`, `w_j` the class weight (1 without weights) and
/// `g_j = dz_j/dx_j = (1 - (z_j / s)^2) / T` under a softcap `s`, else `1 / T`.
struct CeGrad<V, const CAP: bool, const WEIGHTS: bool, const S: u8> {
    z: *const f32,
    w: *const f32,
    /// `h·M`, `h`, `h·T` and `1/(h·T)` for [`scaled_diff`] (see [`Params::halved`]).
    mh: V,
    half: V,
    th: V,
    inv_th: V,
    /// `1/T`, for `g`.
    inv_t: V,
    inv_sum: V,
    a: V,
    b: V,
    inv_cap: V,
    /// The flush bound of the terms (see [`ce_grad`]).
    lim: V,
}

impl<V: Vector, const CAP: bool, const WEIGHTS: bool, const S: u8> CeGrad<V, CAP, WEIGHTS, S> {
    /// # Safety
    /// The instruction set of `V` is available, and every pointer is valid for the
    /// elements this function reads or writes.
    #[inline(always)]
    unsafe fn value(&self, z: V, w: V) -> V {
        // SAFETY: the caller upholds this function's contract: the instruction set is
        // available and every pointer is valid for the elements the loops touch.
        unsafe {
            let (hi, lo) = scaled_diff::<V, S>(z, self.mh, self.half, self.th, self.inv_th);
            let p = exp_term_above::<V, true>(hi, lo, self.lim).mul(self.inv_sum);
            let bw = if WEIGHTS { self.b.mul(w) } else { self.b };
            let g = if CAP {
                let u = z.mul(self.inv_cap);
                V::splat(1.0).sub(u.mul(u)).mul(self.inv_t)
            } else {
                self.inv_t
            };
            self.a.mul(p).sub(bw).mul(g)
        }
    }
}

impl<V: Vector, const CAP: bool, const WEIGHTS: bool, const S: u8> Producer<V> for CeGrad<V, CAP, WEIGHTS, S> {
    /// # Safety
    /// The instruction set of `V` is available, and every pointer is valid for the
    /// elements this function reads or writes.
    #[inline(always)]
    unsafe fn full(&self, i: usize) -> V {
        // SAFETY: the caller upholds this function's contract: the instruction set is
        // available and every pointer is valid for the elements the loops touch.
        unsafe {
            let w = if WEIGHTS { V::load(self.w.add(i)) } else { V::splat(1.0) };
            self.value(V::load(self.z.add(i)), w)
        }
    }
    /// # Safety
    /// The instruction set of `V` is available, and every pointer is valid for the
    /// elements this function reads or writes.
    #[inline(always)]
    unsafe fn partial(&self, i: usize, len: usize) -> V {
        // SAFETY: the caller upholds this function's contract: the instruction set is
        // available and every pointer is valid for the elements the loops touch.
        unsafe {
            let w = if WEIGHTS { V::load_partial(self.w.add(i), len, 0.0) } else { V::splat(1.0) };
            self.value(V::load_partial(self.z.add(i), len, 0.0), w)
        }
    }
}

/// Coefficients of [`ce_grad`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct CeCoef {
    pub a: f32,
    pub b: f32,
    /// `1 / s` for a softcap `s`, or 0 for none.
    pub inv_cap: f32,
}

/// Overwrites the logits row `z` (length `len`) with the cross-entropy gradient
/// (see [`CeGrad`]); `w` is null or the class weights of the same length.
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
pub(crate) unsafe fn ce_grad<V: Vector>(
    z: *mut f32,
    w: *const f32,
    len: usize,
    p: Params,
    m: f32,
    sum: f64,
    c: CeCoef,
) {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let (h, th, inv_th) = p.halved();
        // A probability under exp(FLUSH_LO) ≈ 2.7e-38 is 0 here as in softmax: flushed in
        // the exponential, so that p is never subnormal (a subnormal costs x86 a microcode
        // assist, here and in the products that read the gradient). The scale a/T is not
        // folded in: when it is tiny the whole gradient is, and it is kept.
        let lim = flush_bound(sum.ln());
        macro_rules! go {
            ($cap:literal, $w:literal, $s:literal) => {{
                let g = CeGrad::<V, $cap, $w, $s> {
                    z,
                    w,
                    mh: V::splat(m * h),
                    half: V::splat(h),
                    th: V::splat(th),
                    inv_th: V::splat(inv_th),
                    inv_t: V::splat(p.inv_t),
                    inv_sum: V::splat((1.0 / sum) as f32),
                    a: V::splat(c.a),
                    b: V::splat(c.b),
                    inv_cap: V::splat(c.inv_cap),
                    lim: V::splat(lim),
                };
                write_span::<V, _, false>(&g, z, 0, len)
            }};
        }
        match (c.inv_cap != 0.0, !w.is_null(), p.scaling()) {
            (false, false, 0) => go!(false, false, 0),
            (false, false, 1) => go!(false, false, 1),
            (false, false, _) => go!(false, false, 2),
            (false, true, 0) => go!(false, true, 0),
            (false, true, 1) => go!(false, true, 1),
            (false, true, _) => go!(false, true, 2),
            (true, false, 0) => go!(true, false, 0),
            (true, false, 1) => go!(true, false, 1),
            (true, false, _) => go!(true, false, 2),
            (true, true, 0) => go!(true, true, 0),
            (true, true, 1) => go!(true, true, 1),
            (true, true, _) => go!(true, true, 2),
        }
    }
}

/// Dispatches on the presence of a mask and on [`Params::scaling`] to the six
/// instantiations.
macro_rules! dispatch6 {
    ($f:ident, $V:ty, $mask:expr, $p:expr, ($($arg:expr),*)) => {
        match ($mask.is_null(), $p.scaling()) {
            (true, 0) => $f::<$V, false, 0>($($arg),*),
            (true, 1) => $f::<$V, false, 1>($($arg),*),
            (true, _) => $f::<$V, false, 2>($($arg),*),
            (false, 0) => $f::<$V, true, 0>($($arg),*),
            (false, 1) => $f::<$V, true, 1>($($arg),*),
            (false, _) => $f::<$V, true, 2>($($arg),*),
        }
    };
}

/// See [`max_sum_impl`]. `mask` is null or valid for `len` reads; unless `p.prev_log.x` is
/// null, `p.prev_log` is valid as [`PrevLog`] describes (its mask null exactly when `mask`
/// is), and its output overlaps none of the inputs.
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
pub(crate) unsafe fn max_sum<V: Vector>(x: *const f32, mask: *const f32, len: usize, p: Params) -> MaxSum {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe { dispatch6!(max_sum_impl, V, mask, p, (x, mask, len, p)) }
}

/// See [`online_impl`] with `STORE`. `block_max` is valid for `len.div_ceil(BLOCK)` writes.
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
pub(crate) unsafe fn softmax_pass1<V: Vector>(
    x: *const f32,
    mask: *const f32,
    out: *mut f32,
    block_max: *mut f32,
    len: usize,
    p: Params,
) -> MaxSum {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe { dispatch6!(softmax_pass1_impl, V, mask, p, (x, mask, out, block_max, len, p)) }
}

/// See [`softmax_impl`].
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
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
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe { dispatch6!(softmax_impl, V, mask, p, (x, mask, out, len, p, m, scale)) }
}

/// See [`log_softmax_impl`].
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
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
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe { dispatch6!(log_softmax_impl, V, mask, p, (x, mask, out, len, p, m, ln_s)) }
}

/// `out[i] = exp(x[i])`; `out` may equal `x`.
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
pub(crate) unsafe fn exp_slice<V: Vector>(x: *const f32, out: *mut f32, len: usize) {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
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

/// Bound on `|u|` below which `tanh(u)` is the odd polynomial [`TANH_POLY`]; above it,
/// `(1 − e)/(1 + e)` has no cancellation (`1 − e ≥ 0.71`).
const TANH_SMALL: f32 = 0.625;
/// `tanh(u) ≈ u + u³·P(u²)` on `|u| ≤ 0.625`, `P`'s coefficients from the constant term up:
/// a weighted least-squares fit of ours (relative error in `tanh`), within 0.9 ulp there
/// when evaluated in `f32` (see the softcap test).
const TANH_POLY: [f32; 5] = [-0.333_332_87, 0.133_315_13, -0.053_744_64, 0.020_653_063, -0.005_718_891_5];

/// The logit softcap `z = s·tanh(x/s)`, in place: `x·(1 + u²·P(u²))` for `|u| = |x/s| ≤
/// 0.625`, and `s·sign(u)·(1 − e)/(1 + e)` with `e = exp(−2|u|)` beyond: within a few
/// `f32` ulps of `tanh(u)` relative to itself, so a logit far below the cap keeps its own
/// precision (`z ≈ x`), whatever the cap.
///
/// # Safety
/// The instruction set of `V` is available and `x` is valid for `len` reads and writes.
#[inline(always)]
pub(crate) unsafe fn softcap<V: Vector>(x: *mut f32, len: usize, cap: f32) {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        struct Cap<V> {
            x: *const f32,
            inv: V,
            cap: V,
        }
        impl<V: Vector> Cap<V> {
            #[inline(always)]
            unsafe fn value(&self, x: V) -> V {
                // SAFETY: pure arithmetic on registers.
                unsafe {
                    let u = x.mul(self.inv);
                    let neg_abs = u.min(V::splat(0.0).sub(u));
                    // Large |u|: sign(u)·(1 − e)/(1 + e), kept where |u| > 0.625.
                    let e = exp_term::<V, false>(neg_abs.add(neg_abs), neg_abs);
                    let t = V::splat(1.0).sub(e).div(V::splat(1.0).add(e));
                    // sign(u), exactly ±1 unless |u| < 2^-100 (where this branch is not kept).
                    let sgn = V::splat(-1.0).max(V::splat(1.0).min(u.mul(V::splat(1.2676506e30))));
                    let large = sgn.mul(t).zero_below(V::splat(0.0).sub(neg_abs), V::splat(TANH_SMALL.next_up()));
                    // Small |u|: the odd polynomial, kept where |u| <= 0.625 (a lane-wise
                    // select: whatever it computes elsewhere, even inf or NaN, is dropped).
                    let z = u.mul(u);
                    let mut p = V::splat(TANH_POLY[4]);
                    for &c in TANH_POLY[..4].iter().rev() {
                        p = p.mul_add(z, V::splat(c));
                    }
                    // s·tanh(u) = x·(1 + u²·P(u²)): from x itself, so that neither the rounding
                    // of u nor its underflow (a tiny logit under a huge cap) costs precision.
                    let small = x.mul(z).mul_add(p, x).zero_below(neg_abs, V::splat(-TANH_SMALL));
                    small.add(self.cap.mul(large))
                }
            }
        }
        impl<V: Vector> Producer<V> for Cap<V> {
            #[inline(always)]
            unsafe fn full(&self, i: usize) -> V {
                // SAFETY: `i + LANES <= len`, per `write_span`.
                unsafe { self.value(V::load(self.x.add(i))) }
            }
            #[inline(always)]
            unsafe fn partial(&self, i: usize, len: usize) -> V {
                // SAFETY: `i + len <= len` of the row, per `write_span`.
                unsafe { self.value(V::load_partial(self.x.add(i), len, 0.0)) }
            }
        }
        let c = Cap { x, inv: V::splat(1.0 / cap), cap: V::splat(cap) };
        write_span::<V, _, false>(&c, x, 0, len);
    }
}

/// `#{i : x[i] > hi}`, and the indices `i` (ascending) with `lo ≤ x[i] ≤ hi`, in one pass:
/// the first `cap` of those go to `found`. Returns `(above, in_window)`; `in_window` may
/// exceed `cap`. With an empty window (`lo > hi`, say `lo = +inf`) and `cap = 0` it is a
/// plain count of the values above `hi`.
///
/// # Safety
/// The instruction set of `V` is available, `x` is valid for `len` reads and `found` for
/// `cap` writes.
#[inline(always)]
pub(crate) unsafe fn count_window<V: Vector>(
    x: *const f32,
    len: usize,
    lo: f32,
    hi: f32,
    found: *mut u32,
    cap: usize,
) -> (usize, usize) {
    // SAFETY: the caller upholds this function's contract; lane reads stay below `len`,
    // writes to `found` below `cap`.
    unsafe {
        let lanes = V::LANES;
        let (lov, hiv) = (V::splat(lo), V::splat(hi));
        let (mut above, mut hits) = (0, 0);
        let mut i = 0;
        while i < len {
            let n = lanes.min(len - i);
            // The fill (-inf) is never greater than `hi`; lanes past `len` are masked off.
            let v = if n == lanes { V::load(x.add(i)) } else { V::load_partial(x.add(i), n, f32::NEG_INFINITY) };
            above += v.count_gt(hiv);
            let mut m = v.in_range_mask(lov, hiv) & (u32::MAX >> (32 - n));
            while m != 0 {
                if hits < cap {
                    *found.add(hits) = (i + m.trailing_zeros() as usize) as u32;
                }
                hits += 1;
                m &= m - 1;
            }
            i += n;
        }
        (above, hits)
    }
}

/// `Σ (a[i] − c) * b[i]` with four vector accumulators, in a fixed order (`c = 0`: the
/// plain dot product, with no subtraction at all).
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
pub(crate) unsafe fn dot<V: Vector>(a: *const f32, b: *const f32, len: usize, c: f32) -> f32 {
    // SAFETY: forwarded from this function's contract.
    unsafe { if c == 0.0 { dot_impl::<V, false>(a, b, len, c) } else { dot_impl::<V, true>(a, b, len, c) } }
}

/// [`dot`], with the shift by `c` only when `SHIFT`.
///
/// # Safety
/// As [`dot`]'s.
#[inline(always)]
unsafe fn dot_impl<V: Vector, const SHIFT: bool>(a: *const f32, b: *const f32, len: usize, c: f32) -> f32 {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let cv = V::splat(c);
        // (A closure would not inherit the caller's target features.)
        /// # Safety
        /// The instruction set of `V` is available.
        #[inline(always)]
        unsafe fn shift<V: Vector, const SHIFT: bool>(x: V, cv: V) -> V {
            // SAFETY: pure arithmetic on registers.
            unsafe { if SHIFT { x.sub(cv) } else { x } }
        }
        let lanes = V::LANES;
        let (mut s0, mut s1, mut s2, mut s3) = (V::splat(0.0), V::splat(0.0), V::splat(0.0), V::splat(0.0));
        let full = len / lanes;
        let mut j = 0;
        while j + 4 <= full {
            // `b` streams from memory in decoding (a weight row); fetch 2 KiB ahead.
            V::prefetch(b.wrapping_add(j * lanes + 512));
            V::prefetch(b.wrapping_add((j + 2) * lanes + 512));
            s0 = shift::<V, SHIFT>(V::load(a.add(j * lanes)), cv).mul_add(V::load(b.add(j * lanes)), s0);
            s1 = shift::<V, SHIFT>(V::load(a.add((j + 1) * lanes)), cv).mul_add(V::load(b.add((j + 1) * lanes)), s1);
            s2 = shift::<V, SHIFT>(V::load(a.add((j + 2) * lanes)), cv).mul_add(V::load(b.add((j + 2) * lanes)), s2);
            s3 = shift::<V, SHIFT>(V::load(a.add((j + 3) * lanes)), cv).mul_add(V::load(b.add((j + 3) * lanes)), s3);
            j += 4;
        }
        while j < full {
            s0 = shift::<V, SHIFT>(V::load(a.add(j * lanes)), cv).mul_add(V::load(b.add(j * lanes)), s0);
            j += 1;
        }
        let tail = len % lanes;
        if tail > 0 {
            let i = full * lanes;
            // (Padding lanes load 0 from `b`, so their `0 − c` adds nothing.)
            let x = shift::<V, SHIFT>(V::load_partial(a.add(i), tail, 0.0), cv);
            s1 = x.mul_add(V::load_partial(b.add(i), tail, 0.0), s1);
        }
        s0.add(s1).add(s2.add(s3)).reduce_sum()
    }
}

/// `[a·b0, a·b1, a·b2, a·b3]`: four weight rows against one vector, read as four
/// concurrent streams (more memory-level parallelism than one row at a time).
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
pub(crate) unsafe fn dot4<V: Vector>(a: *const f32, b: [*const f32; 4], len: usize) -> [f32; 4] {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let lanes = V::LANES;
        let mut s = [V::splat(0.0); 4];
        let mut t = [V::splat(0.0); 4];
        let full = len / lanes;
        let mut j = 0;
        while j + 2 <= full {
            let (x0, x1) = (V::load(a.add(j * lanes)), V::load(a.add((j + 1) * lanes)));
            for r in 0..4 {
                s[r] = x0.mul_add(V::load(b[r].add(j * lanes)), s[r]);
                t[r] = x1.mul_add(V::load(b[r].add((j + 1) * lanes)), t[r]);
            }
            j += 2;
        }
        while j < full {
            let x0 = V::load(a.add(j * lanes));
            for r in 0..4 {
                s[r] = x0.mul_add(V::load(b[r].add(j * lanes)), s[r]);
            }
            j += 1;
        }
        let tail = len % lanes;
        if tail > 0 {
            let i = full * lanes;
            let x = V::load_partial(a.add(i), tail, 0.0);
            for r in 0..4 {
                t[r] = x.mul_add(V::load_partial(b[r].add(i), tail, 0.0), t[r]);
            }
        }
        [
            s[0].add(t[0]).reduce_sum(),
            s[1].add(t[1]).reduce_sum(),
            s[2].add(t[2]).reduce_sum(),
            s[3].add(t[3]).reduce_sum(),
        ]
    }
}

/// `y[i] += alpha * x[i]`.
///
/// # Safety
/// The instruction set of `V` is available, and every pointer is valid for the
/// elements this function reads or writes, as described above.
#[inline(always)]
pub(crate) unsafe fn axpy<V: Vector>(y: *mut f32, alpha: f32, x: *const f32, len: usize) {
    // SAFETY: the caller upholds this function's contract: the instruction set is
    // available and every pointer is valid for the elements the loops touch.
    unsafe {
        let lanes = V::LANES;
        let a = V::splat(alpha);
        let full = len / lanes;
        for j in 0..full {
            let q = y.add(j * lanes);
            V::load(x.add(j * lanes)).mul_add(a, V::load(q)).store(q);
        }
        let tail = len % lanes;
        if tail > 0 {
            let i = full * lanes;
            V::load_partial(x.add(i), tail, 0.0)
                .mul_add(a, V::load_partial(y.add(i), tail, 0.0))
                .store_partial(y.add(i), tail);
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
        /// are valid for `len` reads; `p.prev_log` as [`generic::max_sum`] requires.
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn max_sum(x: *const f32, mask: *const f32, len: usize, p: Params) -> MaxSum {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::max_sum::<$V>(x, mask, len, p) }
        }

        /// # Safety
        /// As [`max_sum`]; `out` is valid for `len` writes and equals `x` or overlaps
        /// neither `x` nor `mask`; `block_max` is valid for `len.div_ceil(BLOCK)` writes.
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn softmax_pass1(
            x: *const f32, mask: *const f32, out: *mut f32, block_max: *mut f32, len: usize, p: Params,
        ) -> MaxSum {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::softmax_pass1::<$V>(x, mask, out, block_max, len, p) }
        }

        /// # Safety
        /// The CPU supports this module's instruction set; `src` is valid for `len` reads,
        /// `out` for `len` writes (equal to `src`, then without `p.stream`, or not
        /// overlapping it), `block_max` for `len.div_ceil(BLOCK)` reads.
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn rescale(
            src: *const f32, out: *mut f32, block_max: *const f32, len: usize, p: Params, m: f32, sum: f64,
        ) {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::rescale::<$V>(src, out, block_max, len, p, m, sum) }
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
        /// The CPU supports this module's instruction set; `z` is valid for `len` reads and
        /// writes; `w` is null or valid for `len` reads and does not overlap `z`.
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn ce_grad(
            z: *mut f32, w: *const f32, len: usize, p: Params, m: f32, sum: f64, c: generic::CeCoef,
        ) {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::ce_grad::<$V>(z, w, len, p, m, sum, c) }
        }

        /// # Safety
        /// The CPU supports this module's instruction set; `a` and `b` are valid for `len`
        /// reads.
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn dot(a: *const f32, b: *const f32, len: usize, c: f32) -> f32 {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::dot::<$V>(a, b, len, c) }
        }

        /// # Safety
        /// The CPU supports this module's instruction set; `x` is valid for `len` reads and
        /// `found` for `cap` writes.
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn count_window(
            x: *const f32,
            len: usize,
            lo: f32,
            hi: f32,
            found: *mut u32,
            cap: usize,
        ) -> (usize, usize) {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::count_window::<$V>(x, len, lo, hi, found, cap) }
        }

        /// # Safety
        /// The CPU supports this module's instruction set; `x` is valid for `len` reads and
        /// writes.
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn softcap(x: *mut f32, len: usize, cap: f32) {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::softcap::<$V>(x, len, cap) }
        }

        /// # Safety
        /// The CPU supports this module's instruction set; `a` and each of `b` are valid
        /// for `len` reads.
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn dot4(a: *const f32, b: [*const f32; 4], len: usize) -> [f32; 4] {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::dot4::<$V>(a, b, len) }
        }

        /// # Safety
        /// The CPU supports this module's instruction set; `y` is valid for `len` reads and
        /// writes and does not overlap `x`, which is valid for `len` reads.
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn axpy(y: *mut f32, alpha: f32, x: *const f32, len: usize) {
            // SAFETY: forwarded from this function's contract.
            unsafe { generic::axpy::<$V>(y, alpha, x, len) }
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
