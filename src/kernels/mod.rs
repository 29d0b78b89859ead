//! Row numerics: a vectorized `exp`, the online `(max, sum)` pass, softmax and log-softmax
//! of one row, with the instruction set chosen once at run time.
//!
//! These are the building blocks that whole-matrix functions ([`crate::softmax`] and
//! friends) and the tiled engine call on cache-resident rows: a row slice in, a
//! [`MaxSum`] out, no allocation.
//!
//! Terms `exp((z - max) / T)` below `exp(-86.5)` ≈ 2.7e-38 are flushed to exactly 0: a
//! probability that small is 0 in every sum, and producing it as a subnormal costs x86 a
//! microcode assist of ~150 cycles per vector (every masked entry and every `-inf`-filled
//! tail lane would pay it). So are the probabilities themselves (a term times `1/S`, or a
//! block's stored term times its factor), here and in the cross-entropy gradient. [`Kernels::exp`] itself keeps gradual underflow.
//!
//! ```
//! use softmax_layer::kernels::Kernels;
//! let k = Kernels::best();
//! let row = [2.0f32, 1.0, 0.1];
//! let stats = k.max_sum(&row, None, 1.0);
//! let mut p = [0f32; 3];
//! k.softmax_into(&row, None, 1.0, stats, &mut p);
//! assert!((p[0] - 0.659).abs() < 1e-3);
//! ```

pub(crate) mod generic;
pub(crate) mod scalar;

#[cfg(target_arch = "aarch64")]
pub(crate) mod aarch64;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;

use generic::Params;
use std::fmt;
use std::sync::OnceLock;

/// The running state of a softmax reduction: `max = M` and `sum = S = Σ exp((z_i - M) / T)`.
///
/// Partial states over disjoint parts of a row (chunks, tiles, vocabulary shards) combine
/// with [`MaxSum::merge`]; merging in a fixed order gives bit-identical results.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaxSum {
    /// The maximum of the (masked) logits, or `-f32::MAX` when every entry is `-inf`.
    pub max: f32,
    /// The sum of `exp((z_i - max) / T)`; `0` when every entry is `-inf`, NaN when any entry
    /// is NaN or `+inf`.
    pub sum: f64,
}

impl MaxSum {
    /// The state of an empty row.
    pub const EMPTY: MaxSum = MaxSum { max: -f32::MAX, sum: 0.0 };

    /// Combines the states of two disjoint parts of a row, at temperature `t`.
    pub fn merge(self, other: MaxSum, t: f32) -> MaxSum {
        let (hi, lo) = if other.max > self.max { (other, self) } else { (self, other) };
        let sum =
            if lo.sum == 0.0 { hi.sum } else { hi.sum + lo.sum * ((lo.max as f64 - hi.max as f64) / t as f64).exp() };
        MaxSum { max: hi.max, sum }
    }

    /// Whether the logits behind this state hold no distribution: a NaN or `+inf` among
    /// them, or every one `-inf` (which finite inputs to a layer give only by overflowing).
    pub fn overflowed(&self) -> bool {
        !(self.sum.is_finite() && self.sum > 0.0)
    }

    /// `ln Σ exp(z_i / T) = M / T + ln S`, in `f64`.
    pub fn logsumexp(&self, t: f32) -> f64 {
        self.max as f64 / t as f64 + self.sum.ln()
    }
}

/// The previous row of a pipelined softmax ([`Kernels::softmax_pass1_pipelined`]): its
/// stored terms and block maxima from [`Kernels::softmax_pass1`], its final state, and the
/// output they are rescaled into.
#[derive(Debug)]
pub(crate) struct PrevRow<'a> {
    /// Its terms, from the current chunk's first column to the end of the row.
    pub terms: &'a [f32],
    /// Its block maxima, from the current chunk's first block.
    pub block_max: &'a [f32],
    pub stats: MaxSum,
    /// Its output, as `terms`.
    pub out: &'a mut [f32],
    /// Whether this is the row's first chunk.
    pub head: bool,
}

/// The previous row of a pipelined log-softmax ([`Kernels::max_sum_pipelined`]): its
/// logits, mask and final state, and its output.
#[derive(Debug)]
pub(crate) struct PrevLogRow<'a> {
    /// Its logits, from the current chunk's first column to the end of the row.
    pub src: &'a [f32],
    /// Its mask, as `src` (present exactly when the current row's is).
    pub mask: Option<&'a [f32]>,
    pub stats: MaxSum,
    /// Its output, as `src`.
    pub out: &'a mut [f32],
    /// Whether this is the row's first chunk.
    pub head: bool,
}

/// Coefficients of [`Kernels::ce_grad_in_place`]: `out_j = (a·p_j − b·w_j)·g_j`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CeGradCoef {
    pub a: f32,
    pub b: f32,
    /// `1/s` for a softcap `s`, 0 for none.
    pub inv_cap: f32,
}

/// An instruction set the row kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable one-lane code; bit-reproducible on every machine with IEEE `f32`.
    Scalar,
    /// x86_64 AVX2 with FMA, 8 lanes.
    Avx2,
    /// x86_64 AVX-512F, 16 lanes.
    Avx512,
    /// aarch64 NEON, 4 lanes.
    Neon,
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2+fma",
            Isa::Avx512 => "avx512f",
            Isa::Neon => "neon",
        })
    }
}

impl Isa {
    /// Parses `scalar`, `avx2`, `avx512` or `neon`.
    pub fn parse(s: &str) -> Option<Isa> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Some(Isa::Scalar),
            "avx2" | "avx2+fma" => Some(Isa::Avx2),
            "avx512" | "avx512f" => Some(Isa::Avx512),
            "neon" => Some(Isa::Neon),
            _ => None,
        }
    }

    /// Whether this CPU can run the instruction set.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("popcnt")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("popcnt"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every instruction set this CPU supports, best last.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Neon, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.is_supported()).collect()
    }
}

type MaxSumFn = unsafe fn(*const f32, *const f32, usize, Params) -> MaxSum;
type WriteFn = unsafe fn(*const f32, *const f32, *mut f32, usize, Params, f32, f32);
type ExpFn = unsafe fn(*const f32, *mut f32, usize);
type Pass1Fn = unsafe fn(*const f32, *const f32, *mut f32, *mut f32, usize, Params) -> MaxSum;
type RescaleFn = unsafe fn(*const f32, *mut f32, *const f32, usize, Params, f32, f64);
type DotFn = unsafe fn(*const f32, *const f32, usize, f32) -> f32;
type AxpyFn = unsafe fn(*mut f32, f32, *const f32, usize);
type Dot4Fn = unsafe fn(*const f32, [*const f32; 4], usize) -> [f32; 4];
type SoftcapFn = unsafe fn(*mut f32, usize, f32);
type WindowFn = unsafe fn(*const f32, usize, f32, f32, *mut u32, usize) -> (usize, usize);
type CeGradFn = unsafe fn(*mut f32, *const f32, usize, Params, f32, f64, generic::CeCoef);

/// The row kernels of one instruction set.
///
/// Obtain one with [`Kernels::best`] (chosen once per process, overridable with the
/// environment variable `SOFTMAX_LAYER_ISA=scalar|avx2|avx512|neon`) or
/// [`Kernels::for_isa`].
///
/// All methods take the temperature `t`, which the caller has checked to be finite and
/// `> 0` (see [`crate::check_temperature`]); `mask`, when given, has the row's length and
/// is added to it.
pub struct Kernels {
    isa: Isa,
    max_sum: MaxSumFn,
    softmax: WriteFn,
    log_softmax: WriteFn,
    exp: ExpFn,
    softmax_pass1: Pass1Fn,
    rescale: RescaleFn,
    dot: DotFn,
    axpy: AxpyFn,
    dot4: Dot4Fn,
    softcap: SoftcapFn,
    count_window: WindowFn,
    ce_grad: CeGradFn,
}

impl fmt::Debug for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernels").field("isa", &self.isa).finish()
    }
}

static SCALAR: Kernels = Kernels {
    isa: Isa::Scalar,
    max_sum: scalar::max_sum,
    softmax: scalar::softmax,
    log_softmax: scalar::log_softmax,
    exp: scalar::exp,
    softmax_pass1: scalar::softmax_pass1,
    rescale: scalar::rescale,
    dot: scalar::dot,
    axpy: scalar::axpy,
    dot4: scalar::dot4,
    softcap: scalar::softcap,
    count_window: scalar::count_window,
    ce_grad: scalar::ce_grad,
};

#[cfg(target_arch = "x86_64")]
static AVX2: Kernels = Kernels {
    isa: Isa::Avx2,
    max_sum: x86_64::avx2::max_sum,
    softmax: x86_64::avx2::softmax,
    log_softmax: x86_64::avx2::log_softmax,
    exp: x86_64::avx2::exp,
    softmax_pass1: x86_64::avx2::softmax_pass1,
    rescale: x86_64::avx2::rescale,
    dot: x86_64::avx2::dot,
    axpy: x86_64::avx2::axpy,
    dot4: x86_64::avx2::dot4,
    softcap: x86_64::avx2::softcap,
    count_window: x86_64::avx2::count_window,
    ce_grad: x86_64::avx2::ce_grad,
};

#[cfg(target_arch = "x86_64")]
static AVX512: Kernels = Kernels {
    isa: Isa::Avx512,
    max_sum: x86_64::avx512::max_sum,
    softmax: x86_64::avx512::softmax,
    log_softmax: x86_64::avx512::log_softmax,
    exp: x86_64::avx512::exp,
    softmax_pass1: x86_64::avx512::softmax_pass1,
    rescale: x86_64::avx512::rescale,
    dot: x86_64::avx512::dot,
    axpy: x86_64::avx512::axpy,
    dot4: x86_64::avx512::dot4,
    softcap: x86_64::avx512::softcap,
    count_window: x86_64::avx512::count_window,
    ce_grad: x86_64::avx512::ce_grad,
};

#[cfg(target_arch = "aarch64")]
static NEON: Kernels = Kernels {
    isa: Isa::Neon,
    max_sum: aarch64::neon::max_sum,
    softmax: aarch64::neon::softmax,
    log_softmax: aarch64::neon::log_softmax,
    exp: aarch64::neon::exp,
    softmax_pass1: aarch64::neon::softmax_pass1,
    rescale: aarch64::neon::rescale,
    dot: aarch64::neon::dot,
    axpy: aarch64::neon::axpy,
    dot4: aarch64::neon::dot4,
    softcap: aarch64::neon::softcap,
    count_window: aarch64::neon::count_window,
    ce_grad: aarch64::neon::ce_grad,
};

impl Kernels {
    /// The kernels for `isa`, or `None` when this CPU cannot run it.
    pub fn for_isa(isa: Isa) -> Option<&'static Kernels> {
        if !isa.is_supported() {
            return None;
        }
        match isa {
            Isa::Scalar => Some(&SCALAR),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Some(&AVX2),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Some(&AVX512),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => Some(&NEON),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The best kernels for this CPU, detected on first use and cached.
    ///
    /// `SOFTMAX_LAYER_ISA` overrides the choice when it names a supported instruction set.
    pub fn best() -> &'static Kernels {
        static BEST: OnceLock<&'static Kernels> = OnceLock::new();
        BEST.get_or_init(|| {
            if let Some(k) =
                std::env::var("SOFTMAX_LAYER_ISA").ok().as_deref().and_then(Isa::parse).and_then(Kernels::for_isa)
            {
                return k;
            }
            let best = *Isa::available().last().expect("scalar is always available");
            Kernels::for_isa(best).expect("available ISAs are supported")
        })
    }

    /// The instruction set these kernels run on.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The online pass over one row: `(max, Σ exp((z - max)/t))` for `z = row (+ mask)`.
    /// Reads each element once.
    ///
    /// # Panics
    /// If `mask` is given with a different length than `row`.
    pub fn max_sum(&self, row: &[f32], mask: Option<&[f32]>, t: f32) -> MaxSum {
        self.max_sum_ahead(row, mask, t, false)
    }

    /// [`Kernels::max_sum`]; with `ahead`, the memory [`prefetch_distance`]
    /// elements past each element read is prefetched towards L2 (the rest of the row, then
    /// whatever follows it in memory: the next row of a matrix), so that memory reads
    /// overlap with this row's compute.
    pub(crate) fn max_sum_ahead(&self, row: &[f32], mask: Option<&[f32]>, t: f32, ahead: bool) -> MaxSum {
        let mask_ptr = mask_ptr(row.len(), mask);
        let p = Params::new(t).prefetching(ahead_ptr(row.as_ptr(), ahead));
        // SAFETY: this table was built for a supported ISA; `row` and `mask` are valid for
        // `row.len()` reads; `p.ahead` is only prefetched, never read.
        unsafe { (self.max_sum)(row.as_ptr(), mask_ptr, row.len(), p) }
    }

    /// [`Kernels::max_sum_ahead`] of a row (or of a chunk of it) that also finishes the
    /// previous row of a log-softmax pipeline: `prev`'s log-probabilities, as
    /// [`Kernels::log_softmax_into_mode`] computes them (the same bits), go to its output
    /// while this row's exponentials are computed; `stream` writes them with non-temporal
    /// stores. `prev`'s slices start at the same column as `row` and run to the end of its
    /// row. Over all the chunks of a row, in order, the whole previous row is written.
    ///
    /// # Panics
    /// If lengths differ, or `prev` has a mask where `row` has none or the reverse.
    pub(crate) fn max_sum_pipelined(
        &self,
        row: &[f32],
        mask: Option<&[f32]>,
        t: f32,
        ahead: bool,
        prev: Option<PrevLogRow<'_>>,
        stream: bool,
    ) -> MaxSum {
        let len = row.len();
        let this_mask = mask_ptr(len, mask);
        let mut p = Params::new(t).prefetching(ahead_ptr(row.as_ptr(), ahead)).streaming(stream);
        if let Some(q) = prev {
            let avail = q.src.len();
            assert!(avail >= len && q.out.len() == avail, "max_sum_pipelined: previous row's lengths differ");
            assert_eq!(q.mask.is_some(), mask.is_some(), "max_sum_pipelined: one row masked, the other not");
            p = p.finishing_log(generic::PrevLog {
                x: q.src.as_ptr(),
                mask: mask_ptr(avail, q.mask),
                out: q.out.as_mut_ptr(),
                avail,
                m: q.stats.max,
                ln_s: q.stats.sum.ln() as f32,
                head: q.head,
            });
        }
        // SAFETY: supported ISA; `row` and its mask have `len` elements; `prev`'s logits,
        // mask and output (a distinct `&mut`) have `avail` elements (checked above), and its
        // mask is there exactly when this row's is, as the kernel's `MASK` assumes for both;
        // `p.ahead` is only prefetched.
        unsafe { (self.max_sum)(row.as_ptr(), this_mask, len, p) }
    }

    /// Writes `out = softmax((row + mask) / t)` given the row's [`MaxSum`].
    ///
    /// # Panics
    /// If the lengths of `row`, `mask` and `out` differ.
    pub fn softmax_into(&self, row: &[f32], mask: Option<&[f32]>, t: f32, stats: MaxSum, out: &mut [f32]) {
        assert_eq!(row.len(), out.len(), "softmax_into: row and out lengths differ");
        let mask_ptr = mask_ptr(row.len(), mask);
        // SAFETY: supported ISA; `out` is a distinct `&mut` of `row.len()` elements.
        unsafe {
            (self.softmax)(
                row.as_ptr(),
                mask_ptr,
                out.as_mut_ptr(),
                row.len(),
                Params::new(t),
                stats.max,
                (1.0 / stats.sum) as f32,
            )
        }
    }

    /// Elements per block of [`Kernels::softmax_pass1`]: `block_max` needs
    /// `len.div_ceil(Kernels::BLOCK)` entries.
    pub const BLOCK: usize = generic::BLOCK;

    /// Step 1 of the fused two-step softmax: the online pass of [`Kernels::max_sum`] that
    /// also writes `out[i] = exp((z_i - m_b) / t)`, with `m_b` the running maximum of block
    /// `b`, stored in `block_max[b]`. Step 2 is [`Kernels::rescale`] with the row's final
    /// [`MaxSum`] (merged over chunks, if the row was cut). Compared with
    /// [`Kernels::softmax_into`], each exponential is computed once instead of twice.
    ///
    /// With `out == None` the row is overwritten in place.
    ///
    /// # Panics
    /// If lengths differ or `block_max` is too short.
    pub fn softmax_pass1(
        &self,
        row: &mut [f32],
        src: Option<&[f32]>,
        mask: Option<&[f32]>,
        t: f32,
        block_max: &mut [f32],
    ) -> MaxSum {
        self.softmax_pass1_ahead(row, src, mask, t, block_max, false)
    }

    /// [`Kernels::softmax_pass1`], prefetching ahead as [`Kernels::max_sum_ahead`] does.
    pub(crate) fn softmax_pass1_ahead(
        &self,
        row: &mut [f32],
        src: Option<&[f32]>,
        mask: Option<&[f32]>,
        t: f32,
        block_max: &mut [f32],
        ahead: bool,
    ) -> MaxSum {
        let len = row.len();
        assert!(block_max.len() >= len.div_ceil(Self::BLOCK), "softmax_pass1: block_max too short");
        let mask_ptr = mask_ptr(len, mask);
        let out = row.as_mut_ptr();
        let x = match src {
            Some(s) => {
                assert_eq!(s.len(), len, "softmax_pass1: source and output lengths differ");
                s.as_ptr()
            }
            None => out as *const f32,
        };
        let p = Params::new(t).prefetching(ahead_ptr(x, ahead));
        // SAFETY: supported ISA; `x` is the distinct `src` or the output row itself, both
        // of `len` elements; `block_max` was checked above; `p.ahead` is only prefetched.
        unsafe { (self.softmax_pass1)(x, mask_ptr, out, block_max.as_mut_ptr(), len, p) }
    }

    /// [`Kernels::softmax_pass1_ahead`] of a row (or of a chunk of it) into `terms`, which
    /// also finishes the previous row of a pipeline: `prev`'s stored terms, scaled as
    /// [`Kernels::rescale_into`] would scale them (the same bits), go to its output while
    /// this row's exponentials are computed; `stream` writes them with non-temporal stores.
    /// `prev`'s slices start at the same column as `src` and run to the end of its row.
    /// Over all the chunks of a row, in order, the whole previous row is written.
    ///
    /// # Panics
    /// If lengths differ or a `block_max` is too short.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn softmax_pass1_pipelined(
        &self,
        terms: &mut [f32],
        src: &[f32],
        mask: Option<&[f32]>,
        t: f32,
        block_max: &mut [f32],
        ahead: bool,
        prev: Option<PrevRow<'_>>,
        stream: bool,
    ) -> MaxSum {
        let len = terms.len();
        assert_eq!(src.len(), len, "softmax_pass1: source and output lengths differ");
        assert!(block_max.len() >= len.div_ceil(Self::BLOCK), "softmax_pass1: block_max too short");
        let mask_ptr = mask_ptr(len, mask);
        let mut p = Params::new(t).prefetching(ahead_ptr(src.as_ptr(), ahead)).streaming(stream);
        if let Some(q) = prev {
            let avail = q.terms.len();
            assert!(avail >= len && q.out.len() == avail, "softmax_pass1: previous row's lengths differ");
            assert!(q.block_max.len() >= avail.div_ceil(Self::BLOCK), "softmax_pass1: previous block_max too short");
            p = p.rescaling(generic::PrevRow {
                src: q.terms.as_ptr(),
                out: q.out.as_mut_ptr(),
                block_max: q.block_max.as_ptr(),
                avail,
                m: q.stats.max,
                sum: q.stats.sum,
                head: q.head,
            });
        }
        // SAFETY: supported ISA; `src`, `terms` (a distinct `&mut`) and the mask have `len`
        // elements, `block_max` at least `len / BLOCK` rounded up (checked above); `prev`'s
        // terms and output (distinct from each other and from this row's) have `avail`
        // elements and its block maxima cover them; `p.ahead` is only prefetched.
        unsafe { (self.softmax_pass1)(src.as_ptr(), mask_ptr, terms.as_mut_ptr(), block_max.as_mut_ptr(), len, p) }
    }

    /// Step 2 of the fused softmax: scales block `b` of `out` by
    /// `exp((block_max[b] - stats.max) / t) / stats.sum`.
    ///
    /// # Panics
    /// If `block_max` is too short.
    pub fn rescale(&self, out: &mut [f32], block_max: &[f32], t: f32, stats: MaxSum) {
        assert!(block_max.len() >= out.len().div_ceil(Self::BLOCK), "rescale: block_max too short");
        let p = out.as_mut_ptr();
        // SAFETY: supported ISA; lengths checked above; in place without streaming.
        unsafe { (self.rescale)(p, p, block_max.as_ptr(), out.len(), Params::new(t), stats.max, stats.sum) }
    }

    /// [`Kernels::rescale`] from the stored terms `src` into `out`; `stream` writes `out` with
    /// non-temporal stores (for outputs too large to be re-read from cache).
    ///
    /// # Panics
    /// If lengths differ or `block_max` is too short.
    pub fn rescale_into(&self, src: &[f32], block_max: &[f32], t: f32, stats: MaxSum, out: &mut [f32], stream: bool) {
        assert_eq!(src.len(), out.len(), "rescale_into: lengths differ");
        assert!(block_max.len() >= out.len().div_ceil(Self::BLOCK), "rescale_into: block_max too short");
        let p = Params::new(t).streaming(stream);
        // SAFETY: supported ISA; `out` is a distinct `&mut`; lengths checked above.
        unsafe {
            (self.rescale)(src.as_ptr(), out.as_mut_ptr(), block_max.as_ptr(), out.len(), p, stats.max, stats.sum)
        }
    }

    /// In-place [`Kernels::softmax_into`].
    pub fn softmax_in_place(&self, row: &mut [f32], mask: Option<&[f32]>, t: f32, stats: MaxSum) {
        let mask_ptr = mask_ptr(row.len(), mask);
        let p = row.as_mut_ptr();
        // SAFETY: supported ISA; in and out are the same row, which the kernel allows.
        unsafe { (self.softmax)(p, mask_ptr, p, row.len(), Params::new(t), stats.max, (1.0 / stats.sum) as f32) }
    }

    /// Writes `out = log_softmax((row + mask) / t)` given the row's [`MaxSum`].
    ///
    /// # Panics
    /// If the lengths of `row`, `mask` and `out` differ.
    pub fn log_softmax_into(&self, row: &[f32], mask: Option<&[f32]>, t: f32, stats: MaxSum, out: &mut [f32]) {
        self.log_softmax_into_mode(row, mask, t, stats, out, false)
    }

    /// [`Kernels::log_softmax_into`]; `stream` writes `out` with non-temporal stores.
    pub fn log_softmax_into_mode(
        &self,
        row: &[f32],
        mask: Option<&[f32]>,
        t: f32,
        stats: MaxSum,
        out: &mut [f32],
        stream: bool,
    ) {
        assert_eq!(row.len(), out.len(), "log_softmax_into: row and out lengths differ");
        let mask_ptr = mask_ptr(row.len(), mask);
        // SAFETY: supported ISA; `out` is a distinct `&mut` of `row.len()` elements.
        unsafe {
            (self.log_softmax)(
                row.as_ptr(),
                mask_ptr,
                out.as_mut_ptr(),
                row.len(),
                Params::new(t).streaming(stream),
                stats.max,
                stats.sum.ln() as f32,
            )
        }
    }

    /// In-place [`Kernels::log_softmax_into`].
    pub fn log_softmax_in_place(&self, row: &mut [f32], mask: Option<&[f32]>, t: f32, stats: MaxSum) {
        let mask_ptr = mask_ptr(row.len(), mask);
        let p = row.as_mut_ptr();
        // SAFETY: supported ISA; in and out are the same row, which the kernel allows.
        unsafe { (self.log_softmax)(p, mask_ptr, p, row.len(), Params::new(t), stats.max, stats.sum.ln() as f32) }
    }

    /// `out[i] = exp(x[i])`, accurate to 2 ulp over the whole `f32` range (see the tests).
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn exp(&self, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), out.len(), "exp: lengths differ");
        // SAFETY: supported ISA; `out` is a distinct `&mut` of `x.len()` elements.
        unsafe { (self.exp)(x.as_ptr(), out.as_mut_ptr(), x.len()) }
    }

    /// `Σ a[i]·b[i]`, accumulated in `f32` in a fixed order.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot: lengths differ");
        // SAFETY: supported ISA; both slices hold `a.len()` elements.
        unsafe { (self.dot)(a.as_ptr(), b.as_ptr(), a.len(), 0.0) }
    }

    /// `Σ (a[i] − c)·b[i]`, accumulated in `f32` in a fixed order: a sum of weighted
    /// logits against a reference `c` near them, precise whatever offset they share.
    ///
    /// # Panics
    /// If the lengths differ.
    pub(crate) fn dot_shifted(&self, a: &[f32], b: &[f32], c: f32) -> f32 {
        assert_eq!(a.len(), b.len(), "dot: lengths differ");
        // SAFETY: supported ISA; both slices hold `a.len()` elements.
        unsafe { (self.dot)(a.as_ptr(), b.as_ptr(), a.len(), c) }
    }

    /// `[a·b[0], a·b[1], a·b[2], a·b[3]]`, each accumulated in a fixed order.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn dot4(&self, a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
        assert!(b.iter().all(|r| r.len() == a.len()), "dot4: lengths differ");
        // SAFETY: supported ISA; all five slices hold `a.len()` elements.
        unsafe { (self.dot4)(a.as_ptr(), b.map(|r| r.as_ptr()), a.len()) }
    }

    /// `y += alpha·x`.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn axpy(&self, y: &mut [f32], alpha: f32, x: &[f32]) {
        assert_eq!(y.len(), x.len(), "axpy: lengths differ");
        // SAFETY: supported ISA; `y` is a distinct `&mut` of `x.len()` elements.
        unsafe { (self.axpy)(y.as_mut_ptr(), alpha, x.as_ptr(), x.len()) }
    }

    /// Overwrites a row of (softcapped) logits `z` with `(a·p_j − b·w_j)·g_j`, where
    /// `p = softmax(z / t)` from the row's `stats`, `w` the class weights (1 without) and
    /// `g_j = (1 − (z_j/s)²)/t` for a softcap `s` (`inv_cap = 1/s`), else `1/t`: the gradient
    /// of a (smoothed, weighted, z-regularized) cross-entropy with respect to the raw logits,
    /// before the target's own term.
    ///
    /// # Panics
    /// If `weights` has a different length.
    pub fn ce_grad_in_place(&self, z: &mut [f32], weights: Option<&[f32]>, t: f32, stats: MaxSum, coef: CeGradCoef) {
        let w = match weights {
            Some(w) => {
                assert_eq!(w.len(), z.len(), "ce_grad: weights and row lengths differ");
                w.as_ptr()
            }
            None => std::ptr::null(),
        };
        let c = generic::CeCoef { a: coef.a, b: coef.b, inv_cap: coef.inv_cap };
        // SAFETY: supported ISA; `z` is a `&mut` of its length; `w` is null or checked above.
        unsafe { (self.ce_grad)(z.as_mut_ptr(), w, z.len(), Params::new(t), stats.max, stats.sum, c) }
    }

    /// The logit softcap in place: `x ← s·tanh(x/s)` for `s = cap > 0` (Gemma 2). Absolute
    /// error within a few ulps of `s`.
    pub fn softcap_in_place(&self, x: &mut [f32], cap: f32) {
        // SAFETY: supported ISA; `x` is a `&mut` of its length.
        unsafe { (self.softcap)(x.as_mut_ptr(), x.len(), cap) }
    }

    /// `#{i : x[i] > t}` (NaN counts as not greater).
    pub fn count_greater(&self, x: &[f32], t: f32) -> usize {
        // The window pass with the window [+inf, t], which holds no finite value, and no
        // room for its hits: only the count above `t` is used.
        // SAFETY: supported ISA; `x` is valid for its length; `cap = 0`, so nothing is written.
        unsafe {
            (self.count_window)(x.as_ptr(), x.len(), f32::INFINITY, t, std::ptr::NonNull::dangling().as_ptr(), 0).0
        }
    }

    /// `#{j : x[j] > hi}`, in the same pass pushing `(x[j], base + j)` onto `window` for
    /// every `j` (ascending) with `lo ≤ x[j] ≤ hi` and `base + j ≠ skip`: a rank's count of
    /// larger logits and the few that an error bound leaves undecided (`skip`: the target's
    /// own class, which needs no look).
    pub fn count_window(
        &self,
        x: &[f32],
        lo: f32,
        hi: f32,
        base: u32,
        skip: u32,
        window: &mut Vec<(f32, u32)>,
    ) -> usize {
        const CAP: usize = 64;
        let mut found = [0u32; CAP];
        // SAFETY: supported ISA; `x` is valid for its length, `found` for CAP writes.
        let (above, hits) = unsafe { (self.count_window)(x.as_ptr(), x.len(), lo, hi, found.as_mut_ptr(), CAP) };
        if hits <= CAP {
            let picked = found[..hits].iter().map(|&j| (x[j as usize], base + j));
            window.extend(picked.filter(|&(_, j)| j != skip));
        } else {
            // More than CAP in the window (a wide bound or many equal logits): all of them.
            let picked = x.iter().enumerate().filter(|&(_, &z)| z >= lo && z <= hi).map(|(j, &z)| (z, base + j as u32));
            window.extend(picked.filter(|&(_, j)| j != skip));
        }
        above
    }

    /// In-place [`Kernels::exp`].
    pub fn exp_in_place(&self, x: &mut [f32]) {
        let p = x.as_mut_ptr();
        // SAFETY: supported ISA; the kernel allows in == out.
        unsafe { (self.exp)(p, p, x.len()) }
    }
}

/// The default of [`set_prefetch_distance`]: 16384 elements, 64 KiB. At [2048, 50257] on
/// Zen 5, 8192 and 16384 elements made the softmax 6% and the log-softmax 4% faster than
/// one row (50257) ahead; 32768 was in between (four alternated rounds; `bench_rows` with
/// `BENCH_PREFETCH_DISTANCE=ELEMENTS` reproduces the sweep).
pub const DEFAULT_PREFETCH_DISTANCE: usize = 1 << 14;
static PREFETCH_DISTANCE: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(DEFAULT_PREFETCH_DISTANCE);

/// Sets how far ahead of a pass the prefetching passes ([`Kernels::max_sum_ahead`] and its
/// kin) prefetch, in elements (default [`DEFAULT_PREFETCH_DISTANCE`]). The results are the
/// same whatever it is; benchmarks use this to choose it.
#[doc(hidden)]
pub fn set_prefetch_distance(elements: usize) {
    PREFETCH_DISTANCE.store(elements, std::sync::atomic::Ordering::Relaxed);
}

/// The current prefetch distance (see [`set_prefetch_distance`]).
fn prefetch_distance() -> usize {
    PREFETCH_DISTANCE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Where the pass over a row starting at `x` prefetches: [`prefetch_distance`] elements
/// ahead, or null (no prefetch). The address may lie past the row's buffer; it is only ever
/// prefetched, which never faults.
fn ahead_ptr(x: *const f32, ahead: bool) -> *const f32 {
    if ahead { x.wrapping_add(prefetch_distance()) } else { std::ptr::null() }
}

fn mask_ptr(len: usize, mask: Option<&[f32]>) -> *const f32 {
    match mask {
        Some(m) => {
            assert_eq!(m.len(), len, "mask and row lengths differ");
            m.as_ptr()
        }
        None => std::ptr::null(),
    }
}
