//! bf16 products for the output layer: AMX tiles, AVX512-BF16, or portable code.
//!
//! A bf16 number keeps the top 16 bits of an `f32` (8 exponent bits, 7 stored mantissa
//! bits). The product of two bf16 numbers is exact in `f32`, so every path below computes
//! the same sums of the same exact products, in `f32`, and differs only in the order of the
//! additions.
//!
//! Precisions ([`Precision`]):
//!
//! ```text
//! F32      z = Σ_k h_k · w_k                                    (not this module)
//! Bf16     z = Σ_k bf(h_k) · bf(w_k)                            bf = round to nearest even
//! Bf16x3   x = hi + lo, hi = bf(x), lo = bf(x − hi)
//!          z = Σ_k lo(h)·hi(w) + hi(h)·lo(w) + hi(h)·hi(w)       (lo·lo, ≈ 2^-16 relative, dropped)
//! ```
//!
//! Layouts. `W` is packed once ([`PackedBf16Weights`]) in blocks of 16 classes; inside a
//! block, for each part (hi, then lo) and each pair of hidden units `(2p, 2p+1)`, 16 classes
//! × 2 values: `[block][part][d_pad / 2][16][2]`. That is the B operand of AMX's
//! `tdpbf16ps` (16 rows of 64 bytes: pairs of bf16 along k), and one zmm register of
//! AVX512-BF16's `vdpbf16ps`. Hidden rows are packed per task ([`PackedRows`]) in tiles of 16
//! rows: `[row tile][part][d_pad / 32][16][32]`, the A operand of `tdpbf16ps`. Padding
//! (rows, classes, `d` up to a multiple of 32) is zero, so it adds nothing.
//!
//! Paths ([`BfPath`]), chosen once at run time:
//! - [`BfPath::Amx`]: `tdpbf16ps` on tiles, through `asm!` (the intrinsics are not stable);
//!   needs CPUID leaf 7 EDX bits 22 (AMX-BF16) and 24 (AMX-TILE), the OS's XSAVE support of
//!   the tile state (XCR0 bits 17 and 18), and on Linux the permission
//!   `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, requested once per process.
//! - [`BfPath::Avx512Bf16`]: `vdpbf16ps` on zmm registers.
//! - [`BfPath::Portable`]: bf16 widened to `f32`, multiplied and added in `f32`.
//!
//! AMX and `vdpbf16ps` treat subnormal inputs and results as zero; the portable path does
//! not. Products of bf16 numbers whose magnitude is below `2^-126` differ in that way only.
//!
//! ```
//! use softmax_layer::{BfPath, LayerOptions, MatRef, Precision, SoftmaxLayer, WeightLayout};
//! // V = 3 classes, d = 2; W as PyTorch stores it, [V, d], packed once here.
//! let w = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
//! let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 3, 2, None::<&[f32]>)?
//!     .with_precision(Precision::Bf16x3)?;
//! let h = [2.0f32, 1.0];
//! let mut lse = [0f32];
//! layer.logsumexp(MatRef::new(&h, 1, 2)?, &mut lse, &LayerOptions::default())?;
//! // logits = [2, 1, 3], exact in bf16.
//! let want = (2f64.exp() + 1f64.exp() + 3f64.exp()).ln();
//! assert!((lse[0] as f64 - want).abs() < 1e-6);
//! // The portable path runs anywhere and gives the same numbers up to summation order.
//! let portable = layer.with_bf16_path(BfPath::Portable)?;
//! let mut lse2 = [0f32];
//! portable.logsumexp(MatRef::new(&h, 1, 2)?, &mut lse2, &LayerOptions::default())?;
//! assert!((lse2[0] - lse[0]).abs() < 1e-6);
//! # Ok::<(), softmax_layer::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::matrix::{MatRef, WeightLayout};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// A register-only loop of `path`'s product instruction, for measuring its peak on this
/// machine: `tdpbf16ps` on tiles for [`BfPath::Amx`], `vdpbf16ps` on zmm registers for
/// [`BfPath::Avx512Bf16`]. Returns the flops done, or 0 if the path is not available or
/// has no such instruction ([`BfPath::Portable`]). For benchmarks.
#[doc(hidden)]
pub fn peak_loop(path: BfPath, iters: u64) -> u64 {
    match path {
        #[cfg(target_arch = "x86_64")]
        BfPath::Amx => amx::peak_loop(iters),
        #[cfg(target_arch = "x86_64")]
        BfPath::Avx512Bf16 => avx512::peak_loop(iters),
        _ => 0,
    }
}

/// How the logits' matrix product is computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// `f32` operands, `f32` accumulation (the default).
    #[default]
    F32,
    /// Operands rounded to bf16 (nearest even), exact products, `f32` accumulation. Finite
    /// `f32` values beyond the bf16 range (about ±3.39e38) round to infinity: a weight is
    /// refused when the layer is made; a hidden state gives
    /// [`Error::LogitsOverflow`] for its row.
    Bf16,
    /// Each operand split into bf16 `hi + lo`; `hi·hi + hi·lo + lo·hi` accumulated in `f32`:
    /// about 16 correct bits per product, at three bf16 products' cost. For operands below
    /// about 2^-118 (3.3e-36) in magnitude, `lo` falls under bf16's normal range, so those
    /// products are only as accurate as plain bf16 (AMX and AVX512-BF16 take subnormal
    /// parts as 0; the portable path rounds them to bf16 subnormals).
    Bf16x3,
}

impl Precision {
    /// Parses `f32`, `bf16` or `bf16x3`.
    pub fn parse(s: &str) -> Option<Precision> {
        match s {
            "f32" => Some(Precision::F32),
            "bf16" => Some(Precision::Bf16),
            "bf16x3" => Some(Precision::Bf16x3),
            _ => None,
        }
    }

    /// Number of bf16 parts per operand: 1 (hi) or 2 (hi, lo); 0 for `F32`.
    pub fn parts(self) -> usize {
        match self {
            Precision::F32 => 0,
            Precision::Bf16 => 1,
            Precision::Bf16x3 => 2,
        }
    }

    /// The `(part of H, part of W)` products summed, small ones first.
    pub(crate) fn terms(self) -> &'static [(usize, usize)] {
        match self {
            Precision::F32 => &[],
            Precision::Bf16 => &[(0, 0)],
            Precision::Bf16x3 => &[(1, 0), (0, 1), (0, 0)],
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Bf16x3 => "bf16x3",
        })
    }
}

/// The code that computes bf16 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BfPath {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX512-BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// bf16 widened to `f32`, any CPU.
    Portable,
}

/// Environment variable that overrides [`BfPath::best`]: `amx`, `avx512bf16` or
/// `portable`. An unavailable or unknown value is ignored.
pub const PATH_ENV: &str = "SOFTMAX_LAYER_BF16_PATH";

impl BfPath {
    /// All paths, fastest first.
    pub const ALL: [BfPath; 3] = [BfPath::Amx, BfPath::Avx512Bf16, BfPath::Portable];

    /// Parses `amx`, `avx512bf16` or `portable`.
    pub fn parse(s: &str) -> Option<BfPath> {
        match s {
            "amx" => Some(BfPath::Amx),
            "avx512bf16" => Some(BfPath::Avx512Bf16),
            "portable" => Some(BfPath::Portable),
            _ => None,
        }
    }

    /// Whether [`Output::Add`] on this path sums each product from zero and adds the sum to
    /// the output at the end, so that adding in place gives the bits of writing the product
    /// to a buffer and adding that. AMX instead starts its C tiles at the output's values
    /// (and splits deep products along k), which sums in another order.
    pub(crate) fn adds_whole_products(self) -> bool {
        self != BfPath::Amx
    }

    /// Whether this CPU (and OS) runs the path. For [`BfPath::Amx`] the first call asks
    /// Linux for the tile-data permission; the answer is cached.
    pub fn is_available(self) -> bool {
        match self {
            BfPath::Portable => true,
            #[cfg(target_arch = "x86_64")]
            BfPath::Amx => amx::available(),
            #[cfg(target_arch = "x86_64")]
            BfPath::Avx512Bf16 => avx512::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest available path, or the one [`PATH_ENV`] names if it is available;
    /// decided once per process.
    pub fn best() -> BfPath {
        static BEST: OnceLock<BfPath> = OnceLock::new();
        *BEST.get_or_init(|| {
            env_path().unwrap_or_else(|| BfPath::ALL.into_iter().find(|p| p.is_available()).unwrap_or(BfPath::Portable))
        })
    }

    /// `Ok(self)` if available, else an error that names the path.
    pub fn check(self) -> Result<BfPath> {
        if self.is_available() {
            Ok(self)
        } else {
            Err(Error::InvalidArgument(format!("bf16 path {self} is not supported by this CPU or OS")))
        }
    }
}

/// The available path [`PATH_ENV`] names, if any (read once).
pub(crate) fn env_path() -> Option<BfPath> {
    static ENV: OnceLock<Option<BfPath>> = OnceLock::new();
    *ENV.get_or_init(|| std::env::var(PATH_ENV).ok().as_deref().and_then(BfPath::parse).filter(|p| p.is_available()))
}

impl std::fmt::Display for BfPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BfPath::Amx => "amx",
            BfPath::Avx512Bf16 => "avx512bf16",
            BfPath::Portable => "portable",
        })
    }
}

/// `x` rounded to bf16, nearest even, as bits. Finite values beyond the largest bf16
/// (`≈ 3.39e38`) round to infinity; NaN stays NaN.
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The `f32` value of bf16 bits (exact).
#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x = hi + lo` (to about 16 bits): `hi = bf(x)`, `lo = bf(x − hi)`.
#[inline]
pub fn split(x: f32) -> (u16, u16) {
    let hi = to_bf16(x);
    // x − hi is exact in f32: hi is x rounded to a coarser grid of the same binade (or the next).
    (hi, to_bf16(x - from_bf16(hi)))
}

/// 64 bytes of bf16: the unit of the packed buffers, so that every tile row is one
/// aligned cache line (a tile load that straddles lines costs twice as many).
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([u16; 32]);

/// A zeroed, 64-byte-aligned buffer of bf16 bits whose length is a multiple of 32.
#[derive(Clone, Default)]
struct Buf(Vec<Line>);

impl Buf {
    fn zeroed(len: usize) -> Buf {
        debug_assert!(len.is_multiple_of(32));
        Buf(vec![Line::default(); len / 32])
    }
    /// Holds `len` values afterwards, keeping those it held (new ones zero): for packings
    /// that write every value but their padding, and then zero the padding themselves (no
    /// pass over the whole buffer first: 1.3% of the bf16x3 loss's samples).
    fn resize(&mut self, len: usize) {
        debug_assert!(len.is_multiple_of(32));
        self.0.resize(len / 32, Line::default());
    }
}

impl std::ops::Deref for Buf {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        // SAFETY: `Line` is `repr(C)` over `[u16; 32]` with no padding (64 bytes), so the
        // vector's lines are `32 · len` contiguous, initialized u16.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u16>(), self.0.len() * 32) }
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u16] {
        // SAFETY: as for `deref`, with unique access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u16>(), self.0.len() * 32) }
    }
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({} bf16)", self.0.len() * 32)
    }
}

/// Pads `d` to the AMX tile depth (32 bf16).
fn pad_d(d: usize) -> usize {
    d.div_ceil(32) * 32
}

/// `W` packed once for the bf16 products (see the module docs for the layout).
#[derive(Clone, Debug)]
pub struct PackedBf16Weights {
    vocab: usize,
    hidden: usize,
    d_pad: usize,
    precision: Precision,
    /// `[block][part][d_pad / 2][16][2]`, `ceil(V / 16) + 1` blocks (the last all zero, so
    /// that kernels can always take blocks in pairs).
    data: Buf,
}

impl PackedBf16Weights {
    fn block_len(&self) -> usize {
        self.precision.parts() * self.d_pad * 16
    }

    fn alloc(vocab: usize, hidden: usize, precision: Precision) -> Result<Self> {
        if vocab == 0 || hidden == 0 {
            return Err(Error::Shape(format!(
                "a layer needs V > 0 classes and d > 0 hidden units, got V = {vocab}, d = {hidden}"
            )));
        }
        if precision == Precision::F32 {
            return Err(Error::InvalidArgument("bf16 weights need precision bf16 or bf16x3, got f32".into()));
        }
        let d_pad = pad_d(hidden);
        let blocks = vocab.div_ceil(16) + 1;
        let len = blocks
            .checked_mul(precision.parts() * d_pad * 16)
            .ok_or_else(|| Error::Shape(format!("V = {vocab}, d = {hidden} is too large to pack")))?;
        Ok(PackedBf16Weights { vocab, hidden, d_pad, precision, data: Buf::zeroed(len) })
    }

    /// Packs an `f32` weight (`[V, d]` or `[d, V]` by `layout`), rounding to bf16 (or
    /// splitting into hi and lo for [`Precision::Bf16x3`]). Errors on a length that does
    /// not match the shape, and on `precision == F32`.
    pub fn from_f32(
        weight: &[f32],
        layout: WeightLayout,
        vocab: usize,
        hidden: usize,
        precision: Precision,
    ) -> Result<Self> {
        check_weight_len(weight.len(), layout, vocab, hidden)?;
        let mut p = Self::alloc(vocab, hidden, precision)?;
        let (lo_offset, parts) = (p.d_pad * 16, precision.parts());
        p.pack_weight(weight, layout, |blk, at, src| store_chunk(blk, at, lo_offset, parts, src));
        Ok(p)
    }

    /// Packs a weight that is already bf16 (bits, `[V, d]` or `[d, V]` by `layout`) for
    /// [`Precision::Bf16`], unchanged.
    pub fn from_bf16_bits(weight: &[u16], layout: WeightLayout, vocab: usize, hidden: usize) -> Result<Self> {
        check_weight_len(weight.len(), layout, vocab, hidden)?;
        let mut p = Self::alloc(vocab, hidden, Precision::Bf16)?;
        p.pack_weight(weight, layout, |blk, at, src| blk[at..at + src.len()].copy_from_slice(src));
        Ok(p)
    }

    /// Fills the blocks from a weight in `layout` (the last block, past V, stays zero): each
    /// pair along k of 16 classes is gathered, then stored at once by `store(block, at,
    /// values)`.
    fn pack_weight<T: Copy + Default + Sync>(
        &mut self,
        weight: &[T],
        layout: WeightLayout,
        store: impl Fn(&mut [u16], usize, &[T]) + Sync,
    ) {
        let (bl, vocab, hidden) = (self.block_len(), self.vocab, self.hidden);
        self.data.par_chunks_mut(bl).enumerate().take(vocab.div_ceil(16)).for_each(|(b, blk)| {
            let nr = 16.min(vocab - 16 * b);
            match layout {
                // Class rows of W: row 16·b + r.
                WeightLayout::VocabMajor => {
                    let rows = &weight[16 * b * hidden..(16 * b + nr) * hidden];
                    pack_pairs(blk, nr, hidden, |r, k| rows[r * hidden + k], &store);
                }
                // Rows of W are hidden units: element (class 16·b + r, k) = W[k, 16·b + r].
                WeightLayout::HiddenMajor => pack_pairs(blk, nr, hidden, |r, k| weight[k * vocab + 16 * b + r], &store),
            }
        });
    }

    /// Number of classes `V`.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// Hidden size `d`.
    pub fn hidden_dim(&self) -> usize {
        self.hidden
    }
    /// The precision the weight was packed for.
    pub fn precision(&self) -> Precision {
        self.precision
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// The packed parts of `W[class, k]`: `(hi, lo)` as `f32` (`lo` is 0 in bf16 mode).
    ///
    /// # Panics
    /// If `class ≥ V` or `k ≥ d`.
    pub fn parts_at(&self, class: usize, k: usize) -> (f32, f32) {
        assert!(
            class < self.vocab && k < self.hidden,
            "parts_at: W[{class}, {k}] is outside [{}, {}]",
            self.vocab,
            self.hidden
        );
        let at = (class / 16) * self.block_len() + (k / 2) * 32 + (class % 16) * 2 + (k % 2);
        let hi = from_bf16(self.data[at]);
        let lo = if self.precision.parts() == 2 { from_bf16(self.data[at + self.d_pad * 16]) } else { 0.0 };
        (hi, lo)
    }

    /// Does a NaN or infinity lie in the packed weight? `(class, k, value)` of the first.
    pub fn find_non_finite(&self) -> Option<(usize, usize, f32)> {
        // A bf16 is NaN or infinite iff its exponent bits are all ones: scan the packed bits
        // in parallel (padding is zero), then locate the first offender class by class.
        let bad = |h: &u16| h & 0x7f80 == 0x7f80;
        if !self.data.par_chunks(1 << 16).any(|c| c.iter().any(bad)) {
            return None;
        }
        (0..self.vocab).find_map(|j| {
            (0..self.hidden).find_map(|k| {
                let (hi, lo) = self.parts_at(j, k);
                (!(hi + lo).is_finite()).then_some((j, k, hi + lo))
            })
        })
    }

    /// Pointer to part `part`, pair row 0, of block `block`.
    #[inline]
    pub(crate) fn block_ptr(&self, block: usize, part: usize) -> *const u16 {
        debug_assert!(block <= self.vocab.div_ceil(16) && part < self.precision.parts());
        self.data[block * self.block_len() + part * self.d_pad * 16..].as_ptr()
    }
}

fn check_weight_len(len: usize, layout: WeightLayout, vocab: usize, hidden: usize) -> Result<()> {
    let [r, c] = layout.shape(vocab, hidden);
    if Some(len) != r.checked_mul(c) {
        return Err(Error::Shape(format!(
            "weight has {len} elements, expected [{r}, {c}] for V = {vocab}, d = {hidden}"
        )));
    }
    Ok(())
}

/// A block of hidden rows packed for the bf16 products (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct PackedRows {
    rows: usize,
    d_pad: usize,
    parts: usize,
    /// `[row tile][part][d_pad / 32][16][32]`, an even number of row tiles.
    data: Buf,
}

impl PackedRows {
    /// Packs `hidden` (`[m, d]`) for `precision` (Bf16 or Bf16x3).
    pub fn pack(hidden: MatRef<'_>, precision: Precision) -> PackedRows {
        let mut p = PackedRows::default();
        p.repack(hidden, precision);
        p
    }

    /// Packs `hidden` again, reusing the allocation.
    pub fn repack(&mut self, hidden: MatRef<'_>, precision: Precision) {
        self.repack_rows(hidden.rows(), hidden.cols(), precision, |i| hidden.row(i));
    }

    /// Packs the `[m, d]` operand whose row `i` is `row(i)` (`d` values), rounded (or split)
    /// for `precision`: rows read front to back, 32 values at a time (vectorizes). For
    /// operands that are not one slice, such as a block of columns that other threads
    /// write beside.
    pub fn from_rows<'r>(m: usize, d: usize, precision: Precision, row: impl Fn(usize) -> &'r [f32]) -> PackedRows {
        let mut p = PackedRows::default();
        p.repack_rows(m, d, precision, row);
        p
    }

    /// Packs the transpose of a `[k, m]` operand whose row `p` is `row(p)` (`m` values):
    /// packed row `i` is column `i` of the source, so element `(i, p)` = `row(p)[i]`. Takes
    /// 32 source rows at a time and transposes them through 16 × 32 blocks, each stored as
    /// `repack` stores rows. For `Gᵀ` in the weight gradient, whose source is the row-major
    /// `G`.
    pub fn from_rows_transposed<'r>(
        m: usize,
        k: usize,
        precision: Precision,
        row: impl Fn(usize) -> &'r [f32],
    ) -> PackedRows {
        let mut p = PackedRows::default();
        p.repack_transposed(m, k, precision, row);
        p
    }

    /// [`PackedRows::from_rows_transposed`] into this packing, reusing its allocation.
    pub fn repack_transposed<'r>(
        &mut self,
        m: usize,
        k: usize,
        precision: Precision,
        row: impl Fn(usize) -> &'r [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if packing_avx512() {
            // SAFETY: the CPU has AVX-512F and AVX-512BW (just checked).
            return unsafe { self.transposed_avx512(m, k, precision, row) };
        }
        self.transposed_impl(m, k, precision, row, transpose_block)
    }

    /// The same loop compiled for AVX-512, with the blocks transposed in registers: the
    /// rounding to bf16 vectorizes 16 lanes wide instead of 4 (SSE2), with the same bits.
    /// (In a profile of the bf16x3 loss, this packing of `Gᵀ` was 10% of the samples in the
    /// SSE2 build, most of it the element-by-element transpose.)
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512BW.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn transposed_avx512<'r>(
        &mut self,
        m: usize,
        k: usize,
        precision: Precision,
        row: impl Fn(usize) -> &'r [f32],
    ) {
        // (The closure inherits this function's target features, so it calls the AVX-512
        // transpose without `unsafe`.)
        self.transposed_impl(m, k, precision, row, |srcs, c0, blk| transpose_block_avx512(srcs, c0, blk))
    }

    /// [`PackedRows::from_rows_transposed`] compiled for any x86_64 (for the tests, which
    /// check it against the AVX-512 build).
    #[doc(hidden)]
    pub fn from_rows_transposed_portable<'r>(
        m: usize,
        k: usize,
        precision: Precision,
        row: impl Fn(usize) -> &'r [f32],
    ) -> PackedRows {
        let mut p = PackedRows::default();
        p.transposed_impl(m, k, precision, row, transpose_block);
        p
    }

    #[inline(always)]
    fn transposed_impl<'r>(
        &mut self,
        m: usize,
        k: usize,
        precision: Precision,
        row: impl Fn(usize) -> &'r [f32],
        fill: impl Fn(&[&[f32]], usize, &mut [[f32; 32]; 16]),
    ) {
        assert!(precision != Precision::F32, "bf16: packing needs a bf16 precision");
        let parts = precision.parts();
        let d_pad = pad_d(k.max(1));
        let tl = parts * d_pad * 16;
        self.data.resize(m.div_ceil(32) * 2 * tl);
        (self.rows, self.d_pad, self.parts) = (m, d_pad, parts);
        self.zero_padding(k);
        // 32 source rows at a time (one k-chunk), transposed 16 columns at a time through a
        // small block, whose rows are then stored like `repack`'s (contiguous, vectorized).
        let mut rows: [&[f32]; 32] = [&[]; 32];
        for p0 in (0..k).step_by(32) {
            let srcs = &mut rows[..(k - p0).min(32)];
            for (kk, r) in srcs.iter_mut().enumerate() {
                *r = row(p0 + kk);
                debug_assert_eq!(r.len(), m);
            }
            for t in 0..m.div_ceil(16) {
                let mut blk = [[0f32; 32]; 16];
                fill(srcs, 16 * t, &mut blk);
                for (r, b) in blk.iter().enumerate().take(m - 16 * t) {
                    let at = t * tl + (p0 / 32) * 512 + r * 32;
                    store_chunk(&mut self.data, at, d_pad * 16, parts, &b[..srcs.len()]);
                }
            }
        }
    }

    /// Packs the `[m, d]` operand whose row `i` is `row_of(i)` into this packing, reusing its
    /// allocation (the AVX-512 build where the CPU has it).
    pub(crate) fn repack_rows<'r>(
        &mut self,
        m: usize,
        d: usize,
        precision: Precision,
        row_of: impl Fn(usize) -> &'r [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if packing_avx512() {
            // SAFETY: the CPU has AVX-512F and AVX-512BW (just checked).
            return unsafe { self.repack_rows_avx512(m, d, precision, row_of) };
        }
        self.repack_rows_impl(m, d, precision, row_of)
    }

    /// [`PackedRows::repack_rows`] compiled for AVX-512 (as `transposed_avx512`).
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512BW.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn repack_rows_avx512<'r>(
        &mut self,
        m: usize,
        d: usize,
        precision: Precision,
        row_of: impl Fn(usize) -> &'r [f32],
    ) {
        self.repack_rows_impl(m, d, precision, row_of)
    }

    #[inline(always)]
    fn repack_rows_impl<'r>(&mut self, m: usize, d: usize, precision: Precision, row_of: impl Fn(usize) -> &'r [f32]) {
        let parts = precision.parts().max(1);
        let d_pad = pad_d(d);
        let tiles = m.div_ceil(32) * 2;
        self.data.resize(tiles * parts * d_pad * 16);
        (self.rows, self.d_pad, self.parts) = (m, d_pad, parts);
        self.zero_padding(d);
        let tl = parts * d_pad * 16;
        for i in 0..m {
            let row = row_of(i);
            debug_assert_eq!(row.len(), d);
            let base = (i / 16) * tl + (i % 16) * 32;
            // 32 hidden units at a time: contiguous in the packed tile row (vectorizes).
            for (kc, src) in row.chunks(32).enumerate() {
                store_chunk(&mut self.data, base + kc * 512, d_pad * 16, parts, src);
            }
        }
    }

    /// Zeroes what packing `rows` rows of `d` values does not write, whatever the buffer
    /// held before: every value of the rows past `rows` in the last tiles, and each row's
    /// hidden units `d..d_pad`, in every part.
    fn zero_padding(&mut self, d: usize) {
        let (m, parts, d_pad) = (self.rows, self.parts, self.d_pad);
        let tl = parts * d_pad * 16;
        let tiles = self.data.len() / tl.max(1);
        let (full, rem) = (d / 32, d % 32);
        for i in 0..tiles * 16 {
            for q in 0..parts {
                // Row i of part q, k-chunk c: 32 values at `row + c·512`.
                let row = (i / 16) * tl + q * d_pad * 16 + (i % 16) * 32;
                let from = if i >= m { 0 } else { full };
                for c in from..d_pad / 32 {
                    let skip = if i < m && c == full { rem } else { 0 };
                    self.data[row + c * 512 + skip..row + c * 512 + 32].fill(0);
                }
            }
        }
    }

    /// Number of rows `m`.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of 16-row tiles held (even, padded with zero rows).
    pub(crate) fn tiles(&self) -> usize {
        self.data.len() / (self.parts * self.d_pad * 16).max(1)
    }

    /// Pointer to part `part`, k-chunk 0, of row tile `tile`.
    #[inline]
    pub(crate) fn tile_ptr(&self, tile: usize, part: usize) -> *const u16 {
        debug_assert!(tile < self.tiles() && part < self.parts);
        self.data[(tile * self.parts + part) * self.d_pad * 16..].as_ptr()
    }

    /// The value at row `i`, hidden unit `k`, part `part` (for the portable path).
    #[inline]
    fn at(&self, tile: usize, part: usize, r: usize, k: usize) -> f32 {
        from_bf16(self.data[(tile * self.parts + part) * self.d_pad * 16 + (k / 32) * 512 + r * 32 + (k % 32)])
    }
}

/// `out[i * ldo + j] += Σ_p a(i, p) · b(p, j)` for `i < m`, `j < n`, `p < k`, with the
/// operands rounded (or split) to bf16 as `precision` says and the products accumulated in
/// `f32`: a general product (for the gradients), packing both operands on each call. Use
/// [`PackedRows::from_fn`] and [`PackedBf16Weights::from_fn`] with [`tile_product`] to pack
/// an operand once for many products.
///
/// # Panics
/// If `precision` is `F32`, `out` is shorter than `(m − 1)·ldo + n` or `ldo < n`, or `path`
/// is not available: internal invariants.
pub fn gemm_fn(
    path: BfPath,
    precision: Precision,
    (m, n, k): (usize, usize, usize),
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
    out: &mut [f32],
    ldo: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let ap = PackedRows::from_fn(m, k, precision, a);
    let bp = PackedBf16Weights::from_fn(n, k, precision, |j, p| b(p, j));
    tile_product(path, &ap, &bp, 0..n, out, ldo, Output::Add);
}

impl PackedRows {
    /// Packs the `[m, k]` operand whose element `(i, p)` is `a(i, p)`, rounded (or split) for
    /// `precision` (not `F32`). Visits 16 rows at a time for each `p`, so a transposed
    /// source is read along its rows.
    ///
    /// # Panics
    /// If `precision` is `F32` (an internal invariant).
    pub fn from_fn(m: usize, k: usize, precision: Precision, a: impl Fn(usize, usize) -> f32) -> PackedRows {
        assert!(precision != Precision::F32, "bf16: packing needs a bf16 precision");
        let parts = precision.parts();
        let d_pad = pad_d(k.max(1));
        let tiles = m.div_ceil(32) * 2;
        let tl = parts * d_pad * 16;
        let mut ap = PackedRows { rows: m, d_pad, parts, data: Buf::zeroed(tiles * tl) };
        for t in 0..m.div_ceil(16) {
            let rows = t * 16..(t * 16 + 16).min(m);
            for p in 0..k {
                let at = t * tl + (p / 32) * 512 + p % 32;
                for i in rows.clone() {
                    put(&mut ap.data, at + (i % 16) * 32, d_pad * 16, parts, a(i, p));
                }
            }
        }
        ap
    }
}

/// Packs one block of 16 classes of the right operand (classes `r < nr` of the block, the
/// rest left zero): element `(r, k)` is `value(r, k)`, `k < depth`. Each pair along k of
/// the 16 classes is 32 contiguous values, gathered, then stored at once by
/// `store(block, at, values)`.
#[inline]
fn pack_pairs<T: Copy + Default>(
    blk: &mut [u16],
    nr: usize,
    depth: usize,
    value: impl Fn(usize, usize) -> T,
    store: impl Fn(&mut [u16], usize, &[T]),
) {
    for k in (0..depth).step_by(2) {
        let mut pair = [T::default(); 32];
        for r in 0..nr {
            pair[2 * r] = value(r, k);
            if k + 1 < depth {
                pair[2 * r + 1] = value(r, k + 1);
            }
        }
        store(blk, (k / 2) * 32, &pair[..2 * nr]);
    }
}

/// `blk[r][kk] = srcs[kk][c0 + r]` for the `srcs.len() ≤ 32` source rows and the columns
/// `c0 + r` they have (`r < 16`); the rest of `blk` is left as it is (zero).
#[inline(always)]
fn transpose_block(srcs: &[&[f32]], c0: usize, blk: &mut [[f32; 32]; 16]) {
    for (kk, src) in srcs.iter().enumerate() {
        for (r, &x) in src[c0..(c0 + 16).min(src.len())].iter().enumerate() {
            blk[r][kk] = x;
        }
    }
}

/// [`transpose_block`] in registers: two 16 × 16 transposes (`tile_gemm`'s). Callers
/// outside AVX-512 code must know the CPU has AVX-512F (hence `unsafe` there).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose_block_avx512(srcs: &[&[f32]], c0: usize, blk: &mut [[f32; 32]; 16]) {
    use std::arch::x86_64::*;
    for half in 0..2 {
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, x) in r.iter_mut().enumerate() {
            if let Some(src) = srcs.get(16 * half + i) {
                let len = src.len().saturating_sub(c0).min(16);
                let mask = ((1u32 << len) - 1) as __mmask16;
                // SAFETY: the masked lanes are elements c0 .. c0 + len of `src`, in bounds;
                // masked-off lanes are not read.
                *x = unsafe { _mm512_maskz_loadu_ps(mask, src.as_ptr().wrapping_add(c0)) };
            }
        }
        crate::tile_gemm::x86::transpose16(&mut r);
        for (row, v) in r.into_iter().enumerate() {
            // SAFETY: 16 floats at blk[row][16·half ..], inside the row of 32.
            unsafe { _mm512_storeu_ps(blk[row][16 * half..].as_mut_ptr(), v) };
        }
    }
}

/// Whether this CPU runs the packing loops' AVX-512 builds (F and BW; detected once).
#[cfg(target_arch = "x86_64")]
fn packing_avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"))
}

/// Stores up to 32 values `src` from `at` on, contiguous: rounded to bf16 (one part), or
/// split into `hi` there and `lo` at `at + lo_offset` (two parts). Vectorizes.
#[inline(always)]
fn store_chunk(data: &mut [u16], at: usize, lo_offset: usize, parts: usize, src: &[f32]) {
    let hi = &mut data[at..at + src.len()];
    for (h, &x) in hi.iter_mut().zip(src) {
        *h = to_bf16(x);
    }
    if parts == 2 {
        // The hi parts just stored are read back where they lie (the lo part starts
        // `lo_offset ≥ src.len()` further on), without a copy.
        let (head, tail) = data.split_at_mut(at + lo_offset);
        let lo = &mut tail[..src.len()];
        for ((l, &x), &h) in lo.iter_mut().zip(src).zip(&head[at..at + src.len()]) {
            *l = to_bf16(x - from_bf16(h));
        }
    }
}

/// Stores `x` at `at`: rounded to bf16 (one part), or split into `hi` there and `lo` at
/// `at + lo_offset` (two parts).
#[inline]
fn put(data: &mut [u16], at: usize, lo_offset: usize, parts: usize, x: f32) {
    if parts == 2 {
        let (hi, lo) = split(x);
        data[at] = hi;
        data[at + lo_offset] = lo;
    } else {
        data[at] = to_bf16(x);
    }
}

impl PackedBf16Weights {
    /// Packs `n` "classes" of `k` values from `k` source rows of `n` values: element
    /// `(j, p)` = `row(p)[j]`, rounded (or split) for `precision` (not `F32`). Reads each
    /// source row once, in pairs (the tiles interleave pairs along k), 16 classes at a time.
    /// For `W[seg]` as the right operand of `dH = G·W`, and `H` of `dW = Gᵀ·H`.
    ///
    /// # Panics
    /// If `n` or `k` is 0 or `precision` is `F32` (internal invariants).
    pub fn from_rows<'r>(
        n: usize,
        k: usize,
        precision: Precision,
        row: impl Fn(usize) -> &'r [f32],
    ) -> PackedBf16Weights {
        let Ok(mut bp) = PackedBf16Weights::alloc(n, k, precision) else {
            panic!("bf16: packing needs n, k > 0 and a bf16 precision")
        };
        bp.fill_rows(row);
        bp
    }

    /// [`PackedBf16Weights::from_rows`] into this packing: in place when the shape and
    /// precision are the same as its own (every value the packing writes is written again,
    /// and the padding, which it never writes, is still zero), else into a new one. For the
    /// loss, which packs each block of rows at the same shape.
    pub(crate) fn repack_rows<'r>(
        &mut self,
        n: usize,
        k: usize,
        precision: Precision,
        row: impl Fn(usize) -> &'r [f32],
    ) {
        if (self.vocab, self.hidden, self.precision) == (n, k, precision) {
            self.fill_rows(row);
        } else {
            *self = PackedBf16Weights::from_rows(n, k, precision, row);
        }
    }

    /// Writes the values of [`PackedBf16Weights::from_rows`] (its shape and precision are
    /// this packing's), leaving the padding as it is.
    fn fill_rows<'r>(&mut self, row: impl Fn(usize) -> &'r [f32]) {
        #[cfg(target_arch = "x86_64")]
        if packing_avx512() {
            // SAFETY: the CPU has AVX-512F and AVX-512BW (just checked).
            return unsafe { self.fill_rows_avx512(row) };
        }
        self.fill_rows_portable(row)
    }

    /// [`PackedBf16Weights::fill_rows`] with AVX-512: each pair of source rows is loaded 16
    /// classes at a time and interleaved in registers, then rounded 16 lanes wide (the same
    /// bits). The portable loop gathers element by element; in a profile of the bf16 loss
    /// with `[d, V]` weights, where `G` is packed this way, it was 4% of the samples.
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512BW.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn fill_rows_avx512<'r>(&mut self, row: impl Fn(usize) -> &'r [f32]) {
        use std::arch::x86_64::*;
        let (n, k) = (self.vocab, self.hidden);
        let (bl, parts, d_pad) = (self.block_len(), self.precision.parts(), self.d_pad);
        let rows: Vec<&[f32]> = (0..k).map(&row).collect();
        debug_assert!(rows.iter().all(|r| r.len() == n));
        // Lanes (a0, b0, a1, b1, …) of two vectors a and b: the first 8 pairs, the last 8.
        let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let last = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        for (b, blk) in self.data.chunks_mut(bl).enumerate().take(n.div_ceil(16)) {
            let nr = 16.min(n - 16 * b);
            let mask = ((1u32 << nr) - 1) as u16;
            // The 16 classes of block b in source row p (0 past the last row).
            let load = |p: usize| match rows.get(p) {
                // SAFETY: classes 16b .. 16b + nr lie inside the row (n values); the lanes
                // past nr are masked off and not read.
                Some(r) => unsafe { _mm512_maskz_loadu_ps(mask, r.as_ptr().add(16 * b)) },
                None => _mm512_setzero_ps(),
            };
            for p in (0..k).step_by(2) {
                let (a, c) = (load(p), load(p + 1));
                let mut pair = [0f32; 32];
                // SAFETY: two stores of 16 lanes into the 32 values of `pair`.
                unsafe {
                    _mm512_storeu_ps(pair.as_mut_ptr(), _mm512_permutex2var_ps(a, first, c));
                    _mm512_storeu_ps(pair.as_mut_ptr().add(16), _mm512_permutex2var_ps(a, last, c));
                }
                store_chunk(blk, (p / 2) * 32, d_pad * 16, parts, &pair[..2 * nr]);
            }
        }
    }

    /// [`PackedBf16Weights::fill_rows`] element by element, for any CPU.
    fn fill_rows_portable<'r>(&mut self, row: impl Fn(usize) -> &'r [f32]) {
        let (n, k) = (self.vocab, self.hidden);
        let (bl, parts, d_pad) = (self.block_len(), self.precision.parts(), self.d_pad);
        let rows: Vec<&[f32]> = (0..k).map(&row).collect();
        debug_assert!(rows.iter().all(|r| r.len() == n));
        for (b, blk) in self.data.chunks_mut(bl).enumerate().take(n.div_ceil(16)) {
            let nr = 16.min(n - 16 * b);
            let store = |blk: &mut [u16], at: usize, src: &[f32]| store_chunk(blk, at, d_pad * 16, parts, src);
            pack_pairs(blk, nr, k, |r, p| rows[p][16 * b + r], store);
        }
    }

    /// Packs `n` "classes" of `k` values, element `(j, p)` = `w(j, p)`, rounded (or split)
    /// for `precision` (not `F32`): the right operand of [`tile_product`]. Visits 16
    /// classes at a time for each `p`.
    ///
    /// # Panics
    /// If `n` or `k` is 0 or `precision` is `F32` (internal invariants).
    pub fn from_fn(n: usize, k: usize, precision: Precision, w: impl Fn(usize, usize) -> f32) -> PackedBf16Weights {
        let Ok(mut bp) = PackedBf16Weights::alloc(n, k, precision) else {
            panic!("bf16: packing needs n, k > 0 and a bf16 precision")
        };
        let (bl, parts, d_pad) = (bp.block_len(), precision.parts(), bp.d_pad);
        for blk in 0..n.div_ceil(16) {
            let cols = blk * 16..(blk * 16 + 16).min(n);
            for p in 0..k {
                let at = blk * bl + (p / 2) * 32 + (p % 2);
                for j in cols.clone() {
                    put(&mut bp.data, at + (j % 16) * 2, d_pad * 16, parts, w(j, p));
                }
            }
        }
        bp
    }
}

/// How a tile product meets the values its output holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// `out += product`.
    Add,
    /// `out = product`: `out`'s values are never read, so a caller that would zero it
    /// first need not. The bits are those of [`Output::Add`] onto zeros.
    Overwrite,
}

/// `out[i * ldo + j] (+)= Σ_terms A_part(i) · W_part(cols.start + j)` for the packed rows
/// and the classes `cols`, with `path`: added to `out` or written over it, as `output` says.
///
/// # Panics
/// If the shapes disagree (`rows` and `w` packed for different `d` or precision), `cols`
/// leaves `[0, V)`, `out` is too short, or `path` is not available: internal invariants.
pub fn tile_product(
    path: BfPath,
    rows: &PackedRows,
    w: &PackedBf16Weights,
    cols: Range<usize>,
    out: &mut [f32],
    ldo: usize,
    output: Output,
) {
    assert_eq!(rows.d_pad, w.d_pad, "bf16: packed rows and weights disagree on d");
    assert_eq!(rows.parts, w.precision.parts(), "bf16: packed rows and weights disagree on precision");
    assert!(cols.start <= cols.end && cols.end <= w.vocab, "bf16: classes {cols:?} out of range");
    let (m, c) = (rows.rows, cols.len());
    if m == 0 || c == 0 {
        return;
    }
    assert!(ldo >= c && out.len() >= (m - 1) * ldo + c, "bf16: output too short");
    // The AMX and AVX512-BF16 kernels write over `out` themselves; the portable path
    // accumulates.
    if output == Output::Overwrite && path == BfPath::Portable {
        out[..(m - 1) * ldo + c].chunks_mut(ldo).for_each(|r| r[..c].fill(0.0));
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        BfPath::Amx => {
            assert!(amx::available(), "bf16: AMX is not available");
            // SAFETY: AMX is available (and permitted); the shape checks above are the
            // kernel's contract.
            unsafe { amx::tile_product(rows, w, cols, out, ldo, output == Output::Overwrite) }
        }
        #[cfg(target_arch = "x86_64")]
        BfPath::Avx512Bf16 => {
            assert!(avx512::available(), "bf16: AVX512-BF16 is not available");
            // SAFETY: the CPU has AVX512F and AVX512-BF16; shapes checked above.
            unsafe { avx512::tile_product(rows, w, cols, out, ldo, output == Output::Overwrite) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        BfPath::Amx | BfPath::Avx512Bf16 => panic!("bf16: path {path} exists only on x86_64"),
        BfPath::Portable => portable(rows, w, cols, out, ldo),
    }
}

/// The portable path: per 16-class block, 16 `f32` accumulators per row, pairs along k.
fn portable(rows: &PackedRows, w: &PackedBf16Weights, cols: Range<usize>, out: &mut [f32], ldo: usize) {
    let kp = w.d_pad / 2;
    for b in cols.start / 16..cols.end.div_ceil(16) {
        let j0 = b * 16;
        for i in 0..rows.rows {
            let (t, r) = (i / 16, i % 16);
            let mut acc = [0f32; 16];
            for &(qa, qb) in w.precision.terms() {
                let wb = &w.data[b * w.block_len() + qb * w.d_pad * 16..][..kp * 32];
                for p in 0..kp {
                    let (a0, a1) = (rows.at(t, qa, r, 2 * p), rows.at(t, qa, r, 2 * p + 1));
                    let wp = &wb[p * 32..p * 32 + 32];
                    for (cc, a) in acc.iter_mut().enumerate() {
                        *a += a0 * from_bf16(wp[2 * cc]) + a1 * from_bf16(wp[2 * cc + 1]);
                    }
                }
            }
            for (cc, a) in acc.iter().enumerate() {
                let j = j0 + cc;
                if cols.contains(&j) {
                    out[i * ldo + j - cols.start] += a;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
        assert_eq!(to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(to_bf16(-2.5), half::bf16::from_f32(-2.5).to_bits());
        for x in [0.1f32, -3.7e-5, 12345.678, 1e30, -7e-39] {
            assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
        let (hi, lo) = split(0.1);
        let err = (from_bf16(hi) as f64 + from_bf16(lo) as f64 - 0.1f32 as f64).abs();
        assert!(err <= 0.1 * 2f64.powi(-16), "{err}");
    }

    #[test]
    fn transposed_packing_matches_element_by_element_over_every_tail() {
        // Both builds (AVX-512 where the CPU has it, and the portable one) over every row
        // tail of a 16-row tile (and 37) and the k-chunk tails around 32 (and 45); and one
        // packing reused for every shape in turn (larger and smaller), as the loss reuses it.
        let mut reused = PackedRows::default();
        for m in (1..=34).chain([37]) {
            for k in [1, 2, 15, 16, 17, 31, 32, 33, 45, 63, 65] {
                let src: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 37.0).collect();
                for precision in [Precision::Bf16, Precision::Bf16x3] {
                    let want = PackedRows::from_fn(m, k, precision, |i, p| src[p * m + i]);
                    let fast = PackedRows::from_rows_transposed(m, k, precision, |p| &src[p * m..(p + 1) * m]);
                    let portable =
                        PackedRows::from_rows_transposed_portable(m, k, precision, |p| &src[p * m..(p + 1) * m]);
                    assert_eq!((fast.rows, fast.d_pad, fast.parts), (want.rows, want.d_pad, want.parts));
                    assert!(fast.data[..] == want.data[..], "m={m} k={k} {precision}: fast build");
                    reused.repack_transposed(m, k, precision, |p| &src[p * m..(p + 1) * m]);
                    assert_eq!((reused.rows, reused.d_pad, reused.parts), (want.rows, want.d_pad, want.parts));
                    assert!(reused.data[..] == want.data[..], "m={m} k={k} {precision}: reused packing");
                    assert!(portable.data[..] == want.data[..], "m={m} k={k} {precision}: portable build");
                }
            }
        }
    }

    #[test]
    fn a_reused_row_packing_equals_a_fresh_one() {
        // One packing repacked for shapes larger and smaller in turn, and across precisions
        // (as the loss reuses its buffers): its padding must be zero again every time.
        let mut reused = PackedRows::default();
        for (m, k) in [(37, 45), (5, 7), (64, 96), (1, 1), (33, 31), (16, 64), (40, 3)] {
            let src: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 37.0).collect();
            for precision in [Precision::Bf16x3, Precision::Bf16] {
                let want = PackedRows::from_fn(m, k, precision, |i, p| src[i * k + p]);
                reused.repack_rows(m, k, precision, |i| &src[i * k..(i + 1) * k]);
                assert_eq!((reused.rows, reused.d_pad, reused.parts), (want.rows, want.d_pad, want.parts));
                assert!(reused.data[..] == want.data[..], "m={m} k={k} {precision}: reused packing");
            }
        }
    }

    #[test]
    fn a_reused_weight_packing_equals_a_fresh_one() {
        // Repacked with the same shape (in place: the padding must still be zero) and with
        // other shapes and precisions in between (a new packing).
        let mut reused = PackedBf16Weights::from_rows(3, 5, Precision::Bf16, |_| &[1.0, 2.0, 3.0]);
        for (n, k, precision) in [
            (37, 45, Precision::Bf16x3),
            (37, 45, Precision::Bf16x3),
            (37, 45, Precision::Bf16),
            (16, 33, Precision::Bf16),
            (16, 33, Precision::Bf16),
            (5, 2, Precision::Bf16x3),
        ] {
            for seed in 0..2usize {
                let src: Vec<f32> =
                    (0..n * k).map(|i| (((i + 31 * seed) * 7919 % 1013) as f32 - 506.0) / 37.0).collect();
                let want = PackedBf16Weights::from_rows(n, k, precision, |p| &src[p * n..(p + 1) * n]);
                reused.repack_rows(n, k, precision, |p| &src[p * n..(p + 1) * n]);
                assert!(reused.data[..] == want.data[..], "n={n} k={k} {precision} seed {seed}");
                assert_eq!((reused.vocab, reused.hidden, reused.d_pad), (want.vocab, want.hidden, want.d_pad));
            }
        }
    }

    #[test]
    fn weight_packing_from_rows_matches_element_by_element_over_every_tail() {
        // Both builds (AVX-512 where the CPU has it, and the portable one) over every class
        // tail of a 16-class block (and 37), odd and even depths around 16 and 32 (and 45).
        for n in (1..=34).chain([37]) {
            for k in [1, 2, 3, 15, 16, 17, 31, 32, 33, 45] {
                let src: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 37.0).collect();
                let row = |p: usize| &src[p * n..(p + 1) * n];
                for precision in [Precision::Bf16, Precision::Bf16x3] {
                    let want = PackedBf16Weights::from_fn(n, k, precision, |j, p| src[p * n + j]);
                    let fast = PackedBf16Weights::from_rows(n, k, precision, row);
                    assert!(fast.data[..] == want.data[..], "n={n} k={k} {precision}: fast build");
                    let mut portable = PackedBf16Weights::alloc(n, k, precision).unwrap();
                    portable.fill_rows_portable(row);
                    assert!(portable.data[..] == want.data[..], "n={n} k={k} {precision}: portable build");
                }
            }
        }
    }

    #[test]
    fn packing_from_rows_matches_packing_element_by_element() {
        // Sizes off every multiple of 16 and 32; the reference is `from_fn`.
        let (m, k) = (37, 45);
        let src: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 37.0).collect();
        for precision in [Precision::Bf16, Precision::Bf16x3] {
            let want = PackedRows::from_fn(m, k, precision, |i, p| src[i * k + p]);
            let got = PackedRows::from_rows(m, k, precision, |i| &src[i * k..(i + 1) * k]);
            assert_eq!((got.rows, got.d_pad, got.parts), (want.rows, want.d_pad, want.parts));
            assert!(got.data[..] == want.data[..], "{precision}: from_rows");
            // (The transpose, at this shape too, is checked with every tail above.)
            // Weights-side packing from source rows along k: element (j, p) = row p, value j.
            let want = PackedBf16Weights::from_fn(m, k, precision, |j, p| src[p * m + j]);
            let got = PackedBf16Weights::from_rows(m, k, precision, |p| &src[p * m..(p + 1) * m]);
            assert!(got.data[..] == want.data[..], "{precision}: weights from_rows");
            // Whole weights in both layouts: src as [m, k] (classes × units) and as [k, m].
            let want = PackedBf16Weights::from_fn(m, k, precision, |j, p| src[j * k + p]);
            let got = PackedBf16Weights::from_f32(&src, WeightLayout::VocabMajor, m, k, precision).unwrap();
            assert!(got.data[..] == want.data[..], "{precision}: from_f32 [V, d]");
            let want = PackedBf16Weights::from_fn(m, k, precision, |j, p| src[p * m + j]);
            let got = PackedBf16Weights::from_f32(&src, WeightLayout::HiddenMajor, m, k, precision).unwrap();
            assert!(got.data[..] == want.data[..], "{precision}: from_f32 [d, V]");
            if precision == Precision::Bf16 {
                // bf16 bits in both layouts pack like the rounded f32 weight.
                let bits: Vec<u16> = src.iter().map(|&x| to_bf16(x)).collect();
                for layout in [WeightLayout::VocabMajor, WeightLayout::HiddenMajor] {
                    let want = PackedBf16Weights::from_f32(&src, layout, m, k, precision).unwrap();
                    let got = PackedBf16Weights::from_bf16_bits(&bits, layout, m, k).unwrap();
                    assert!(got.data[..] == want.data[..], "from_bf16_bits {layout:?}");
                }
            }
        }
    }
}
