//! Single-threaded f32 GEMM for cache-sized tiles of a language-model output layer.
//!
//! Computes `C (m×n) = [C +] A · op(B)` where `A` is `m×k` row-major (packed once with
//! [`PackedA::pack`] and reused for many `B` tiles) and `B` is either
//! * [`BLayout::VocabMajor`]: `n×k` row-major (each weight row contiguous), `op(B) = Bᵀ`, or
//! * [`BLayout::HiddenMajor`]: `k×n` row-major, `op(B) = B`.
//!
//! Structure (BLIS/GotoBLAS): `A` is packed into `MR`-row panels laid out `[k][MR]`
//! (zero padded), `B` is packed per `NR`-column micro-panel `[kc][NR]` (zero padded) for
//! each `KC` block of the reduction dimension, and a register-blocked `MR×NR` micro-kernel
//! accumulates in vector registers. While a `B` micro-panel is being consumed, the
//! micro-kernel software-prefetches (to L2) the source lines of the next one.
//!
//! Kernels (chosen once at runtime, cached):
//! * AVX-512F: 12×32 (24 zmm accumulators); per `k` step 12 broadcasts from packed `A`
//!   and two aligned zmm loads of packed `B`. Edge panels of `m` use 2/4/8-row variants.
//! * AVX2+FMA: 6×16 (12 ymm accumulators).
//! * portable scalar: 4×8 (also used on non-x86_64 targets).
//!
//! Determinism: for a given instruction set, every output element is computed with a fixed
//! operation order that depends only on `k` (blocks of [`KC`] along `k`, in increasing
//! order; inside a block a sequential fused multiply-add chain (plain mul+add in the
//! scalar kernel) starting from zero, then added to `C` if accumulating or if it is not
//! the first block). It does not depend on `m`, `n`, strides,
//! the position of the element inside the tile, or alignment of the inputs.
//!
//! Thread safety: [`PackedA`] is immutable during [`gemm_packed`] and may be shared by many
//! threads (`&PackedA` is `Sync`); each thread needs its own [`Scratch`]. No global mutable
//! state besides the cached CPU-feature detection.

#![allow(clippy::too_many_arguments)]

use crate::linalg::{AlignedF32, Line};
use std::sync::OnceLock;

/// Maximum block size along `k` (reduction dimension). `k` is split into
/// `ceil(k / KC)` blocks of equal length (rounded up to a multiple of 16, last one shorter).
pub const KC: usize = 768;

/// Instruction set used by the micro-kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable scalar code (any target).
    Scalar,
    /// x86_64 AVX2 + FMA.
    Avx2,
    /// x86_64 AVX-512F (+ AVX2, FMA).
    Avx512,
}

impl Isa {
    /// Best instruction set available on this CPU (detected once, then cached).
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            if Isa::Avx512.is_available() {
                Isa::Avx512
            } else if Isa::Avx2.is_available() {
                Isa::Avx2
            } else {
                Isa::Scalar
            }
        })
    }

    /// Whether the kernels of this instruction set can run on this CPU.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    fn default_variant(self) -> Variant {
        match self {
            Isa::Scalar => Variant::Scalar4x8,
            Isa::Avx2 => Variant::Avx2x6x16,
            Isa::Avx512 => Variant::Avx512x12x32,
        }
    }
}

/// Micro-kernel shape (tuning / testing hook; use [`Isa`] normally).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    Scalar4x8,
    Avx2x6x16,
    Avx512x14x32,
    Avx512x12x32,
    Avx512x8x48,
    Avx512x6x64,
}

impl Variant {
    /// Instruction set required by this kernel shape.
    pub fn isa(self) -> Isa {
        match self {
            Variant::Scalar4x8 => Isa::Scalar,
            Variant::Avx2x6x16 => Isa::Avx2,
            _ => Isa::Avx512,
        }
    }
    /// `(MR, NR)` of the micro-kernel.
    pub fn shape(self) -> (usize, usize) {
        match self {
            Variant::Scalar4x8 => (4, 8),
            Variant::Avx2x6x16 => (6, 16),
            Variant::Avx512x14x32 => (14, 32),
            Variant::Avx512x12x32 => (12, 32),
            Variant::Avx512x8x48 => (8, 48),
            Variant::Avx512x6x64 => (6, 64),
        }
    }
}

/// Layout of the `B` operand passed to [`gemm_packed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BLayout {
    /// `B` is `n×k` row-major with row stride `ldb >= k`; computes `A·Bᵀ`.
    VocabMajor,
    /// `B` is `k×n` row-major with row stride `ldb >= n`; computes `A·B`.
    HiddenMajor,
}

/// `A` (m×k) packed into `MR`-row panels, each laid out `[k][MR]` (zero padded rows).
/// Owns its buffer; [`PackedA::pack`] reuses the allocation.
pub struct PackedA {
    buf: AlignedF32,
    m: usize,
    k: usize,
    variant: Variant,
}

impl Default for PackedA {
    fn default() -> Self {
        Self::new()
    }
}

impl PackedA {
    /// Empty packed matrix using the best instruction set of this CPU.
    pub fn new() -> Self {
        Self::with_variant(Isa::detect().default_variant())
    }

    /// Empty packed matrix whose products will use instruction set `isa`.
    ///
    /// # Panics
    /// If `isa` is not available on this CPU.
    pub fn with_isa(isa: Isa) -> Self {
        Self::with_variant(isa.default_variant())
    }

    /// Tuning hook: force a micro-kernel shape. Panics if its ISA is unavailable.
    #[doc(hidden)]
    pub fn with_variant(variant: Variant) -> Self {
        assert!(
            variant.isa().is_available(),
            "tile_gemm: instruction set {:?} is not available on this CPU",
            variant.isa()
        );
        PackedA { buf: AlignedF32::default(), m: 0, k: 0, variant }
    }

    /// Rows of the packed `A`.
    pub fn m(&self) -> usize {
        self.m
    }
    /// Columns (reduction length) of the packed `A`.
    pub fn k(&self) -> usize {
        self.k
    }
    /// Instruction set that [`gemm_packed`] will use with this matrix.
    pub fn isa(&self) -> Isa {
        self.variant.isa()
    }

    /// Packs `A` (m×k, row-major, row stride `lda >= k`). Only `a[i*lda + p]` for
    /// `i < m, p < k` is read.
    ///
    /// # Panics
    /// If `lda < k` (with `m > 1`) or `a` is too short.
    pub fn pack(&mut self, a: &[f32], m: usize, k: usize, lda: usize) {
        assert!(m <= 1 || lda >= k, "tile_gemm: lda ({lda}) < k ({k})");
        if m > 0 && k > 0 {
            let need = (m - 1) * lda + k;
            assert!(a.len() >= need, "tile_gemm: A slice too short: len {} < (m-1)*lda+k = {need}", a.len());
        }
        let (mr, _) = self.variant.shape();
        let panels = m.div_ceil(mr);
        let total = panels * mr * k;
        self.buf.ensure(total);
        self.m = m;
        self.k = k;
        let dst = &mut self.buf[..total];
        #[cfg(target_arch = "x86_64")]
        if self.variant.isa() == Isa::Avx512 && mr <= 16 {
            for ip in 0..panels {
                let rows = mr.min(m - ip * mr);
                let panel = &mut dst[ip * mr * k..(ip + 1) * mr * k];
                // SAFETY: AVX-512F is available (checked when the variant was chosen); rows
                // ip*mr.. ip*mr+rows of A hold k readable values each (asserted above); the
                // panel holds k*mr values.
                unsafe { x86::pack_a_panel_avx512(a[ip * mr * lda..].as_ptr(), lda, rows, k, mr, panel.as_mut_ptr()) };
            }
            return;
        }
        for ip in 0..panels {
            let panel = &mut dst[ip * mr * k..(ip + 1) * mr * k];
            for r in 0..mr {
                let i = ip * mr + r;
                if i < m {
                    let row = &a[i * lda..i * lda + k];
                    for (p, &v) in row.iter().enumerate() {
                        panel[p * mr + r] = v;
                    }
                } else {
                    for p in 0..k {
                        panel[p * mr + r] = 0.0;
                    }
                }
            }
        }
    }
}

/// Reusable packing buffer for `B`: one `KC×NR` micro-panel for VocabMajor (96 KiB for
/// the AVX-512 12×32 kernel), four for HiddenMajor (384 KiB). Grows on first use, never
/// shrinks. One per thread.
#[derive(Default)]
pub struct Scratch {
    buf: AlignedF32,
}

impl Scratch {
    /// Empty scratch (no allocation until first use).
    pub fn new() -> Self {
        Scratch { buf: AlignedF32::default() }
    }
}

/// `C (m×n, row stride ldc) = [C +] A·op(B)`, single-threaded.
///
/// * `a`: packed `A` (`m = a.m()`, `k = a.k()`).
/// * `b`: `VocabMajor`: `n×k` with row stride `ldb >= k` (C = A·Bᵀ);
///   `HiddenMajor`: `k×n` with row stride `ldb >= n` (C = A·B).
///   Only the `n×k` / `k×n` logical elements are read.
/// * `c`: `m×n` with row stride `ldc >= n`; only those elements are written
///   (and read only if `accumulate`).
///
/// # Panics
/// If a stride is smaller than the row width or a slice is too short.
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed(
    a: &PackedA,
    b: &[f32],
    layout: BLayout,
    n: usize,
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    scratch: &mut Scratch,
) {
    gemm_packed_kc(a, b, layout, n, ldb, c, ldc, accumulate, scratch, KC)
}

/// Tuning hook: [`gemm_packed`] with an explicit `k` block size (multiple of 4 recommended).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed_kc(
    a: &PackedA,
    b: &[f32],
    layout: BLayout,
    n: usize,
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    scratch: &mut Scratch,
    kc_block: usize,
) {
    let (m, k) = (a.m, a.k);
    assert!(kc_block > 0, "tile_gemm: kc_block must be > 0");
    if m == 0 || n == 0 {
        return;
    }
    assert!(m <= 1 || ldc >= n, "tile_gemm: ldc ({ldc}) < n ({n})");
    let c_need = (m - 1) * ldc + n;
    assert!(c.len() >= c_need, "tile_gemm: C slice too short: len {} < (m-1)*ldc+n = {c_need}", c.len());
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    match layout {
        BLayout::VocabMajor => {
            assert!(n <= 1 || ldb >= k, "tile_gemm: VocabMajor ldb ({ldb}) < k ({k})");
            let need = (n - 1) * ldb + k;
            assert!(b.len() >= need, "tile_gemm: B slice too short: len {} < (n-1)*ldb+k = {need}", b.len());
        }
        BLayout::HiddenMajor => {
            assert!(k <= 1 || ldb >= n, "tile_gemm: HiddenMajor ldb ({ldb}) < n ({n})");
            let need = (k - 1) * ldb + n;
            assert!(b.len() >= need, "tile_gemm: B slice too short: len {} < (k-1)*ldb+n = {need}", b.len());
        }
    }
    let (mr, _) = a.variant.shape();
    assert!(a.buf.len() >= m.div_ceil(mr) * mr * k, "tile_gemm: internal error: packed A buffer too small");
    let args = Args { a, b, layout, n, ldb, c, ldc, accumulate, kc_block };
    match a.variant {
        Variant::Scalar4x8 => drive::<ScalarK<4, 8>>(args, scratch),
        #[cfg(target_arch = "x86_64")]
        Variant::Avx2x6x16 => drive::<x86::Avx2K<6, 2>>(args, scratch),
        #[cfg(target_arch = "x86_64")]
        Variant::Avx512x14x32 => drive::<x86::Avx512K<14, 2>>(args, scratch),
        #[cfg(target_arch = "x86_64")]
        Variant::Avx512x12x32 => drive::<x86::Avx512K<12, 2>>(args, scratch),
        #[cfg(target_arch = "x86_64")]
        Variant::Avx512x8x48 => drive::<x86::Avx512K<8, 3>>(args, scratch),
        #[cfg(target_arch = "x86_64")]
        Variant::Avx512x6x64 => drive::<x86::Avx512K<6, 4>>(args, scratch),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("tile_gemm: SIMD variant constructed on a non-x86_64 target"),
    }
}

struct Args<'a> {
    a: &'a PackedA,
    b: &'a [f32],
    layout: BLayout,
    n: usize,
    ldb: usize,
    c: &'a mut [f32],
    ldc: usize,
    accumulate: bool,
    kc_block: usize,
}

/// Largest `MR * NR` of any kernel (size of the edge staging buffer).
const MAX_TILE: usize = 512;

/// A micro-kernel family (instruction set + register shape).
///
/// Implementations are only instantiated by `gemm_packed_kc` for a [`Variant`] whose
/// instruction set was verified available when the [`PackedA`] was created.
trait Kern {
    const MR: usize;
    const NR: usize;

    /// `C[0..rows][0..NR] (row stride ldc) = [C +] Σ_p a[p*MR + i] * b[p*NR + j]`,
    /// computing at least `rows` rows (`rows <= MR`); rows `>= rows` of `C` may be
    /// written only if `rows == MR`.
    ///
    /// # Safety
    /// * The CPU supports the kernel's instruction set.
    /// * `a` is valid for reads of `kc * MR` f32, `b` for reads of `kc * NR` f32.
    /// * `c` is valid for reads (if `add`) and writes of `NR` f32 at `c + i*ldc` for every
    ///   `i < MR` if `rows == MR`, else for every `i < rows` rounded up to the kernel's row
    ///   granularity (callers pass a `MAX_TILE` staging buffer with `ldc == NR` then).
    /// * `pf` is any [`Pf`] (its addresses are only prefetched, never dereferenced).
    unsafe fn kernel(rows: usize, kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, add: bool, pf: Pf);

    /// Packs `nr <= NR` rows × `kc` columns of VocabMajor `B` starting at `b` (row stride
    /// `ldb`) into `dst[p*NR + j]`, zero-padding `j >= nr`.
    ///
    /// # Safety
    /// * The CPU supports the kernel's instruction set.
    /// * `b + j*ldb + p` is readable for `j < nr`, `p < kc`; `dst` is valid for writes of
    ///   `kc * NR` f32 and 64-byte aligned.
    unsafe fn pack_vocab(b: *const f32, ldb: usize, nr: usize, kc: usize, dst: *mut f32);

    /// Packs `kc` rows × `ncols <= npan*NR` columns of HiddenMajor `B` starting at `b`
    /// (row stride `ldb`) into `npan` consecutive micro-panels: column `j` goes to
    /// `dst[(j / NR)*kc*NR + p*NR + j % NR]`, zero-padding columns `>= ncols`.
    ///
    /// # Safety
    /// * The CPU supports the kernel's instruction set.
    /// * `b + p*ldb + j` is readable for `p < kc`, `j < ncols`; `dst` is valid for writes
    ///   of `npan * kc * NR` f32 and 64-byte aligned.
    unsafe fn pack_hidden(b: *const f32, ldb: usize, ncols: usize, npan: usize, kc: usize, dst: *mut f32);
}

/// Number of `NR`-column micro-panels packed together for `HiddenMajor` `B` (so every
/// source row is read as one longer contiguous run: fewer pages and lines touched).
const HM_GROUP: usize = 4;

fn drive<K: Kern>(args: Args<'_>, scratch: &mut Scratch) {
    let Args { a, b, layout, n, ldb, c, ldc, accumulate, kc_block } = args;
    let (m, k) = (a.m, a.k);
    let (mr, nr) = (K::MR, K::NR);
    assert!(mr * nr <= MAX_TILE, "tile_gemm: internal error: tile too large");
    // Equal-length blocks along k (multiple of 16), at most `kc_block` long unless
    // rounding pushes it slightly over.
    let nblocks = k.div_ceil(kc_block);
    let kcb = k.div_ceil(nblocks).next_multiple_of(16).min(k);
    // Micro-panels packed per group.
    let group = match layout {
        BLayout::VocabMajor => 1,
        BLayout::HiddenMajor => HM_GROUP,
    };
    let gw = group * nr;
    scratch.buf.ensure(kcb * gw);
    let bp = scratch.buf.as_mut_ptr();
    let apack = &a.buf[..];
    let mpanels = m.div_ceil(mr);
    let mut tmp = [Line([0.0; 16]); MAX_TILE / 16];
    let mut pc = 0;
    while pc < k {
        let kc = kcb.min(k - pc);
        let add = accumulate || pc > 0;
        let mut j0 = 0;
        while j0 < n {
            let ncols = gw.min(n - j0);
            let npan = ncols.div_ceil(nr);
            match layout {
                // SAFETY: the CPU supports K's ISA (checked when `a` was created). The B
                // slice was checked to hold (n-1)*ldb+k elements, so rows j0..j0+ncols,
                // columns pc..pc+kc are in bounds (ncols <= NR here). The scratch holds
                // >= kcb*gw >= kc*NR floats and is 64-byte aligned (`AlignedF32`).
                BLayout::VocabMajor => unsafe { K::pack_vocab(b.as_ptr().add(j0 * ldb + pc), ldb, ncols, kc, bp) },
                // SAFETY: as above with the bound (k-1)*ldb+n for rows pc..pc+kc, columns
                // j0..j0+ncols; the scratch holds npan*kc*NR floats.
                BLayout::HiddenMajor => unsafe {
                    K::pack_hidden(b.as_ptr().add(pc * ldb + j0), ldb, ncols, npan, kc, bp)
                },
            }
            // Software prefetch (to L2) of the source lines of the next packing group,
            // spread over this group's kernel calls, so its packing does not stall on
            // memory latency (short strided streams defeat the hardware prefetchers).
            let next = if j0 + gw < n {
                Some((j0 + gw, pc, kc))
            } else if pc + kc < k {
                Some((0, pc + kc, kcb.min(k - pc - kc)))
            } else {
                None
            };
            let region = next.map_or(PfRegion::NONE, |(jn, pn, kn)| {
                PfRegion::of(b.as_ptr(), layout, ldb, jn, gw.min(n - jn), pn, kn)
            });
            let pf_total = region.total();
            let calls = npan * mpanels;
            for q in 0..npan {
                let jq = j0 + q * nr;
                let nrv = nr.min(n - jq);
                let bq = scratch.buf[q * kc * nr..(q + 1) * kc * nr].as_ptr();
                for ip in 0..mpanels {
                    let call = q * mpanels + ip;
                    let (lo, hi) = (pf_total * call / calls, pf_total * (call + 1) / calls);
                    let pf = Pf { region, first: lo, n: hi - lo };
                    let i0 = ip * mr;
                    let mrv = mr.min(m - i0);
                    let aoff = ip * mr * k + pc * mr;
                    let ap = apack[aoff..aoff + kc * mr].as_ptr();
                    if mrv == mr && nrv == nr {
                        let coff = i0 * ldc + jq;
                        // Bounds: the last element touched is (i0+mr-1)*ldc + jq+nr-1 <= (m-1)*ldc + n-1.
                        let cp = c[coff..(i0 + mr - 1) * ldc + jq + nr].as_mut_ptr();
                        // SAFETY: ISA available (see above); `ap` covers kc*MR packed floats;
                        // `bq` covers the kc*NR packed panel; `cp` covers MR rows of NR floats
                        // at stride ldc (range checked by the slice above); `pf`'s addresses
                        // are only prefetched.
                        unsafe { K::kernel(mr, kc, ap, bq, cp, ldc, add, pf) };
                    } else {
                        let tp = tmp.as_mut_ptr().cast::<f32>();
                        // SAFETY: as above; `tmp` holds MAX_TILE >= MR*NR floats written with
                        // stride NR (`add == false`: never read before written).
                        unsafe { K::kernel(mrv, kc, ap, bq, tp, nr, false, pf) };
                        let t = tmp.as_flattened_f32();
                        for i in 0..mrv {
                            let crow = &mut c[(i0 + i) * ldc + jq..(i0 + i) * ldc + jq + nrv];
                            let trow = &t[i * nr..i * nr + nrv];
                            if add {
                                for (cv, tv) in crow.iter_mut().zip(trow) {
                                    *cv += *tv;
                                }
                            } else {
                                crow.copy_from_slice(trow);
                            }
                        }
                    }
                }
            }
            j0 += gw;
        }
        pc += kc;
    }
}

/// The source of the next `B` micro-panel's packing, as runs of consecutive elements: the
/// cache lines a micro-kernel prefetches (to L2) spread over its `k` loop, so that the next
/// packing does not stall on memory latency (short strided streams defeat the hardware
/// prefetchers). Lines are numbered run by run, `lines` per run: the run's elements rounded
/// out to whole lines, plus one line (a run that does not start on a line boundary reaches
/// one line further), so a run's last number may name the line just past it. The addresses
/// are only prefetched, never dereferenced.
#[derive(Clone, Copy)]
struct PfRegion {
    base: *const f32,
    /// Elements between the starts of consecutive runs.
    stride: usize,
    runs: usize,
    lines: usize,
}

impl PfRegion {
    const NONE: PfRegion = PfRegion { base: std::ptr::null(), stride: 0, runs: 0, lines: 0 };

    /// The region of the micro-panel `(j0.., pc..)` (`nr` columns of C, `kc` steps of k) of
    /// `B` at `b`.
    fn of(b: *const f32, layout: BLayout, ldb: usize, j0: usize, nr: usize, pc: usize, kc: usize) -> PfRegion {
        let (off, runs, len) = match layout {
            BLayout::VocabMajor => (j0 * ldb + pc, nr, kc),
            BLayout::HiddenMajor => (pc * ldb + j0, kc, nr),
        };
        PfRegion { base: b.wrapping_add(off), stride: ldb, runs, lines: len.div_ceil(16) + 1 }
    }

    /// Lines in the region.
    fn total(&self) -> usize {
        self.runs * self.lines
    }

    /// The line-aligned start of run `run`.
    #[inline(always)]
    fn run_start(&self, run: usize) -> *const f32 {
        let start = self.base.wrapping_add(run * self.stride);
        start.wrapping_sub((start as usize % 64) / 4)
    }
}

/// Walks lines of a [`PfRegion`] in order without dividing per line (a division in the
/// micro-kernel's loop made the compiler spill its broadcasts).
#[derive(Clone, Copy)]
struct PfCursor {
    region: PfRegion,
    run: usize,
    line: usize,
    at: *const f32,
}

impl PfCursor {
    fn new(region: PfRegion, first: usize) -> PfCursor {
        let run = first.checked_div(region.lines).unwrap_or(0);
        let line = first.checked_rem(region.lines).unwrap_or(0);
        PfCursor { region, run, line, at: region.run_start(run) }
    }

    /// Prefetches the current line (to L2) and moves to the next.
    #[inline(always)]
    fn next(&mut self) {
        prefetch_l2(self.at.wrapping_add(16 * self.line));
        self.line += 1;
        if self.line == self.region.lines {
            self.line = 0;
            self.run += 1;
            self.at = self.region.run_start(self.run);
        }
    }
}

/// Software-prefetch work handed to a micro-kernel: lines `[first, first + n)` of `region`.
#[derive(Clone, Copy)]
struct Pf {
    region: PfRegion,
    first: usize,
    n: usize,
}

#[inline(always)]
fn prefetch_l2(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint; it never faults and has no architectural effect.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

trait FlattenArr {
    fn as_flattened_f32(&self) -> &[f32];
}
impl<const L: usize> FlattenArr for [Line; L] {
    fn as_flattened_f32(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` around `[f32; 16]` with size 64, so `[Line; L]` is
        // `16 * L` contiguous initialized f32.
        unsafe { std::slice::from_raw_parts(self.as_ptr().cast::<f32>(), L * 16) }
    }
}

// ---------------------------------------------------------------------------------------
// Portable scalar kernel.
// ---------------------------------------------------------------------------------------

struct ScalarK<const MR: usize, const NR: usize>;

impl<const MR: usize, const NR: usize> Kern for ScalarK<MR, NR> {
    const MR: usize = MR;
    const NR: usize = NR;

    /// # Safety
    /// See [`Kern::kernel`].
    unsafe fn kernel(rows: usize, kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, add: bool, pf: Pf) {
        // SAFETY: the caller guarantees `a`/`b` are readable for kc*MR / kc*NR floats.
        let (a, b) = unsafe { (std::slice::from_raw_parts(a, kc * MR), std::slice::from_raw_parts(b, kc * NR)) };
        let _ = pf; // no prefetching in the portable kernel
        let mut acc = [[0.0f32; NR]; MR];
        for (ar, br) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
            for i in 0..MR {
                let av = ar[i];
                for j in 0..NR {
                    acc[i][j] += av * br[j];
                }
            }
        }
        for (i, row) in acc.iter().enumerate().take(rows) {
            // SAFETY: the caller guarantees row i < rows of C is valid for NR reads/writes.
            let crow = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), NR) };
            if add {
                for (cv, v) in crow.iter_mut().zip(row) {
                    *cv += *v;
                }
            } else {
                crow.copy_from_slice(row);
            }
        }
    }

    /// # Safety
    /// See [`Kern::pack_vocab`].
    unsafe fn pack_vocab(b: *const f32, ldb: usize, nr: usize, kc: usize, dst: *mut f32) {
        // SAFETY: the caller guarantees `dst` is valid for kc*NR writes.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst, kc * NR) };
        // SAFETY: the caller guarantees the source region is readable (Kern contract).
        unsafe { pack_vocab_scalar::<NR>(b, ldb, nr, kc, dst) };
    }

    /// # Safety
    /// See [`Kern::pack_hidden`].
    unsafe fn pack_hidden(b: *const f32, ldb: usize, ncols: usize, npan: usize, kc: usize, dst: *mut f32) {
        // SAFETY: the caller guarantees `dst` is valid for npan*kc*NR writes.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst, npan * kc * NR) };
        for (q, d) in dst.chunks_exact_mut(kc * NR).enumerate() {
            let nr = ncols.saturating_sub(q * NR).min(NR);
            // SAFETY: the caller guarantees columns < ncols of rows < kc are readable
            // (Kern contract); only columns q*NR..q*NR+nr are read.
            unsafe { pack_hidden_scalar::<NR>(b.wrapping_add(q * NR), ldb, nr, kc, d) };
        }
    }
}

/// Portable VocabMajor packing (transpose) into `[kc][NR]`.
///
/// # Safety
/// `b + j*ldb + p` is readable for `j < nr`, `p < kc`.
unsafe fn pack_vocab_scalar<const NR: usize>(b: *const f32, ldb: usize, nr: usize, kc: usize, dst: &mut [f32]) {
    for j in 0..NR {
        if j < nr {
            // SAFETY: the caller guarantees row j < nr is readable for kc floats.
            let row = unsafe { std::slice::from_raw_parts(b.add(j * ldb), kc) };
            for (p, &v) in row.iter().enumerate() {
                dst[p * NR + j] = v;
            }
        } else {
            for p in 0..kc {
                dst[p * NR + j] = 0.0;
            }
        }
    }
}

/// Portable HiddenMajor packing into `[kc][NR]`.
///
/// # Safety
/// `b + p*ldb + j` is readable for `p < kc`, `j < nr`.
unsafe fn pack_hidden_scalar<const NR: usize>(b: *const f32, ldb: usize, nr: usize, kc: usize, dst: &mut [f32]) {
    for p in 0..kc {
        // SAFETY: the caller guarantees row p < kc is readable for nr floats.
        let row = unsafe { std::slice::from_raw_parts(b.add(p * ldb), nr) };
        let d = &mut dst[p * NR..(p + 1) * NR];
        d[..nr].copy_from_slice(row);
        d[nr..].fill(0.0);
    }
}

// ---------------------------------------------------------------------------------------
// x86_64 SIMD kernels.
// ---------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{Kern, Pf, PfCursor, pack_hidden_scalar, pack_vocab_scalar};
    use std::arch::x86_64::*;

    /// AVX2+FMA kernel: `MR` rows × `NV` ymm (8 lanes) columns.
    pub(super) struct Avx2K<const MR: usize, const NV: usize>;

    impl<const MR: usize, const NV: usize> Kern for Avx2K<MR, NV> {
        const MR: usize = MR;
        const NR: usize = NV * 8;

        /// # Safety
        /// See [`Kern::kernel`].
        unsafe fn kernel(
            rows: usize,
            kc: usize,
            a: *const f32,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            add: bool,
            pf: Pf,
        ) {
            // SAFETY: forwarded contract of `Kern::kernel` (ISA checked by caller).
            unsafe { kernel_avx2::<MR, NV>(rows, kc, a, b, c, ldc, add, pf) }
        }
        /// # Safety
        /// See [`Kern::pack_vocab`].
        unsafe fn pack_vocab(b: *const f32, ldb: usize, nr: usize, kc: usize, dst: *mut f32) {
            // SAFETY: `dst` valid for kc*NR writes (caller contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(dst, kc * NV * 8) };
            match NV {
                // SAFETY: the caller guarantees the source region is readable (Kern contract).
                2 => unsafe { pack_vocab_scalar::<16>(b, ldb, nr, kc, dst) },
                _ => unreachable!("tile_gemm: unsupported AVX2 NV"),
            }
        }
        /// # Safety
        /// See [`Kern::pack_hidden`].
        unsafe fn pack_hidden(b: *const f32, ldb: usize, ncols: usize, npan: usize, kc: usize, dst: *mut f32) {
            assert!(NV == 2, "tile_gemm: unsupported AVX2 NV");
            // SAFETY: `dst` valid for npan*kc*NR writes (caller contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(dst, npan * kc * 16) };
            for (q, d) in dst.chunks_exact_mut(kc * 16).enumerate() {
                let nr = ncols.saturating_sub(q * 16).min(16);
                // SAFETY: the caller guarantees columns < ncols of rows < kc are readable
                // (Kern contract); only columns q*16..q*16+nr are read.
                unsafe { pack_hidden_scalar::<16>(b.wrapping_add(q * 16), ldb, nr, kc, d) };
            }
        }
    }

    /// # Safety
    /// CPU supports AVX2 and FMA; pointer contract of `Kern::kernel` (rows computed: all MR).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel_avx2<const MR: usize, const NV: usize>(
        rows: usize,
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        add: bool,
        pf: Pf,
    ) {
        let _ = pf; // prefetching is only used by the AVX-512 kernel
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let mut bv = [_mm256_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                // SAFETY: b is readable for NV*8 floats in this k step (kc*NR total).
                *x = unsafe { _mm256_loadu_ps(b.add(8 * v)) };
            }
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: a is readable for MR floats in this k step (kc*MR total).
                let av = _mm256_set1_ps(unsafe { *a.add(i) });
                for v in 0..NV {
                    row[v] = _mm256_fmadd_ps(av, bv[v], row[v]);
                }
            }
            // SAFETY: stays within (or one past) the kc*MR / kc*NR buffers.
            unsafe {
                a = a.add(MR);
                b = b.add(NV * 8);
            }
        }
        for (i, row) in acc.iter().enumerate().take(rows) {
            for (v, x) in row.iter().enumerate() {
                // SAFETY: row i < rows of C is valid for NV*8 reads/writes (caller contract).
                unsafe {
                    let cp = c.add(i * ldc + 8 * v);
                    let r = if add { _mm256_add_ps(_mm256_loadu_ps(cp), *x) } else { *x };
                    _mm256_storeu_ps(cp, r);
                }
            }
        }
    }

    /// AVX-512F kernel: `MR` rows × `NV` zmm (16 lanes) columns.
    pub(super) struct Avx512K<const MR: usize, const NV: usize>;

    impl<const MR: usize, const NV: usize> Kern for Avx512K<MR, NV> {
        const MR: usize = MR;
        const NR: usize = NV * 16;

        /// # Safety
        /// See [`Kern::kernel`].
        unsafe fn kernel(
            rows: usize,
            kc: usize,
            a: *const f32,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            add: bool,
            pf: Pf,
        ) {
            // SAFETY (all arms): forwarded contract of `Kern::kernel`; each variant computes
            // R >= rows rows, reading only the first R floats of every MR-float A group.
            // Edge calls (rows < MR) write into a MAX_TILE staging buffer with ldc == NR,
            // which holds R <= MR rows.
            unsafe {
                if rows >= MR {
                    kernel_avx512::<MR, MR, NV>(kc, a, b, c, ldc, add, pf)
                } else if rows <= 2 && 2 < MR {
                    kernel_avx512::<MR, 2, NV>(kc, a, b, c, ldc, add, pf)
                } else if rows <= 4 && 4 < MR {
                    kernel_avx512::<MR, 4, NV>(kc, a, b, c, ldc, add, pf)
                } else if rows <= 8 && 8 < MR {
                    kernel_avx512::<MR, 8, NV>(kc, a, b, c, ldc, add, pf)
                } else {
                    kernel_avx512::<MR, MR, NV>(kc, a, b, c, ldc, add, pf)
                }
            }
        }
        /// # Safety
        /// See [`Kern::pack_vocab`].
        unsafe fn pack_vocab(b: *const f32, ldb: usize, nr: usize, kc: usize, dst: *mut f32) {
            // SAFETY: forwarded contract of `Kern::pack_vocab`.
            unsafe { pack_vocab_avx512::<NV>(b, ldb, nr, kc, dst) }
        }
        /// # Safety
        /// See [`Kern::pack_hidden`].
        unsafe fn pack_hidden(b: *const f32, ldb: usize, ncols: usize, npan: usize, kc: usize, dst: *mut f32) {
            // SAFETY: forwarded contract of `Kern::pack_hidden`.
            unsafe { pack_hidden_avx512::<NV>(b, ldb, ncols, npan, kc, dst) }
        }
    }

    /// Computes `R` rows (`R <= MR`) of an `MR×(16·NV)` tile; A panel stride is `MR`.
    ///
    /// # Safety
    /// CPU supports AVX-512F; `a` readable for `kc*MR` floats, `b` for `kc*16*NV`;
    /// `c + i*ldc` valid for `16*NV` reads (if `add`) and writes for every `i < R`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn kernel_avx512<const MR: usize, const R: usize, const NV: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        add: bool,
        pf: Pf,
    ) {
        const U: usize = 4;
        // Spread the prefetches evenly over the unrolled k iterations.
        let pf_per_iter = if pf.n == 0 { 0 } else { pf.n.div_ceil((kc / U).max(1)) };
        let mut pf_i = 0;
        let mut cursor = PfCursor::new(pf.region, pf.first);
        assert!(R <= MR && R > 0, "tile_gemm: internal error: kernel rows R > MR"); // folded at compile time
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        let (mut a, mut b) = (a, b);
        let mut left = kc;
        // Bring the C tile towards L1 while the FMAs run.
        for i in 0..R {
            for v in 0..NV {
                _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + 16 * v).cast::<i8>());
            }
        }
        while left >= U {
            for u in 0..U {
                let mut bv = [_mm512_setzero_ps(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    // SAFETY: b is readable for U*NV*16 floats in this unrolled step.
                    *x = unsafe { _mm512_loadu_ps(b.add(u * NV * 16 + 16 * v)) };
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    // SAFETY: a is readable for U*MR floats in this step, i < R <= MR.
                    let av = _mm512_set1_ps(unsafe { *a.add(u * MR + i) });
                    for v in 0..NV {
                        row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
                    }
                }
            }
            for _ in 0..pf_per_iter {
                if pf_i < pf.n {
                    cursor.next();
                    pf_i += 1;
                }
            }
            // SAFETY: stays within (or one past) the kc*MR / kc*NR buffers.
            unsafe {
                a = a.add(U * MR);
                b = b.add(U * NV * 16);
            }
            left -= U;
        }
        while left > 0 {
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                // SAFETY: b is readable for NV*16 floats in this k step.
                *x = unsafe { _mm512_loadu_ps(b.add(16 * v)) };
            }
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: a is readable for MR floats in this k step, i < R <= MR.
                let av = _mm512_set1_ps(unsafe { *a.add(i) });
                for v in 0..NV {
                    row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
                }
            }
            // SAFETY: stays within (or one past) the kc*MR / kc*NR buffers.
            unsafe {
                a = a.add(MR);
                b = b.add(NV * 16);
            }
            left -= 1;
        }
        while pf_i < pf.n {
            cursor.next();
            pf_i += 1;
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                // SAFETY: row i < R of C is valid for NV*16 reads/writes (caller contract).
                unsafe {
                    let cp = c.add(i * ldc + 16 * v);
                    let r = if add { _mm512_add_ps(_mm512_loadu_ps(cp), *x) } else { *x };
                    _mm512_storeu_ps(cp, r);
                }
            }
        }
    }

    /// In-register transpose of a 16×16 f32 block (also the bf16 packing's, for `Gᵀ`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn transpose16(r: &mut [__m512; 16]) {
        let mut t = [_mm512_setzero_ps(); 16];
        for q in 0..8 {
            t[2 * q] = _mm512_unpacklo_ps(r[2 * q], r[2 * q + 1]);
            t[2 * q + 1] = _mm512_unpackhi_ps(r[2 * q], r[2 * q + 1]);
        }
        // u[4g + s]: rows 4g..4g+4, column offset s within each 128-bit lane group.
        let mut u = [_mm512_setzero_pd(); 16];
        for g in 0..4 {
            let (t0, t1, t2, t3) = (
                _mm512_castps_pd(t[4 * g]),
                _mm512_castps_pd(t[4 * g + 1]),
                _mm512_castps_pd(t[4 * g + 2]),
                _mm512_castps_pd(t[4 * g + 3]),
            );
            u[4 * g] = _mm512_unpacklo_pd(t0, t2);
            u[4 * g + 1] = _mm512_unpackhi_pd(t0, t2);
            u[4 * g + 2] = _mm512_unpacklo_pd(t1, t3);
            u[4 * g + 3] = _mm512_unpackhi_pd(t1, t3);
        }
        for s in 0..4 {
            let (u0, u1, u2, u3) = (
                _mm512_castpd_ps(u[s]),
                _mm512_castpd_ps(u[4 + s]),
                _mm512_castpd_ps(u[8 + s]),
                _mm512_castpd_ps(u[12 + s]),
            );
            let x = _mm512_shuffle_f32x4::<0x88>(u0, u1); // cols s, s+8 ; rows 0-7
            let y = _mm512_shuffle_f32x4::<0xdd>(u0, u1); // cols s+4, s+12 ; rows 0-7
            let z = _mm512_shuffle_f32x4::<0x88>(u2, u3); // cols s, s+8 ; rows 8-15
            let w = _mm512_shuffle_f32x4::<0xdd>(u2, u3); // cols s+4, s+12 ; rows 8-15
            r[s] = _mm512_shuffle_f32x4::<0x88>(x, z);
            r[s + 8] = _mm512_shuffle_f32x4::<0xdd>(x, z);
            r[s + 4] = _mm512_shuffle_f32x4::<0x88>(y, w);
            r[s + 12] = _mm512_shuffle_f32x4::<0xdd>(y, w);
        }
    }

    /// Packs one `A` panel: `rows <= mr <= 16` rows of `k` values (row stride `lda`) into
    /// `dst[p * mr + r]`, by 16×16 in-register transposes. Rows `rows..mr` are written as
    /// zeros.
    ///
    /// # Safety
    /// CPU supports AVX-512F; `a + r*lda + p` is readable for `r < rows`, `p < k`; `dst` is
    /// valid for `k * mr` writes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_a_panel_avx512(
        a: *const f32,
        lda: usize,
        rows: usize,
        k: usize,
        mr: usize,
        dst: *mut f32,
    ) {
        debug_assert!(rows <= mr && mr <= 16);
        let out_mask: __mmask16 = ((1u32 << mr) - 1) as u16;
        let mut p0 = 0;
        while p0 < k {
            let w = (k - p0).min(16);
            let in_mask: __mmask16 = ((1u32 << w) - 1) as u16;
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, v) in r.iter_mut().enumerate().take(rows) {
                // SAFETY: row i < rows, columns p0..p0+w < k are readable (contract); the
                // mask keeps the load inside them.
                *v = unsafe { _mm512_maskz_loadu_ps(in_mask, a.add(i * lda + p0)) };
            }
            transpose16(&mut r);
            for (q, v) in r.iter().enumerate().take(w) {
                // SAFETY: column p0+q < k: its `mr` slots dst[(p0+q)*mr..][..mr] are in the
                // k*mr output; the mask writes exactly mr lanes.
                unsafe { _mm512_mask_storeu_ps(dst.add((p0 + q) * mr), out_mask, *v) };
            }
            p0 += 16;
        }
    }

    /// VocabMajor packing with 16×16 in-register transposes.
    ///
    /// # Safety
    /// CPU supports AVX-512F; contract of `Kern::pack_vocab` with `NR = 16*NV`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn pack_vocab_avx512<const NV: usize>(b: *const f32, ldb: usize, nr: usize, kc: usize, dst: *mut f32) {
        let nrr = NV * 16;
        for g in 0..NV {
            let rows = nr.saturating_sub(16 * g).min(16);
            let mut p = 0;
            while p < kc {
                let cols = (kc - p).min(16);
                let mask: __mmask16 = if cols == 16 { 0xffff } else { (1u16 << cols) - 1 };
                let mut r = [_mm512_setzero_ps(); 16];
                if rows == 16 && cols == 16 {
                    for (j, x) in r.iter_mut().enumerate() {
                        // SAFETY: row 16g+j < nr, columns p..p+16 <= kc are readable.
                        *x = unsafe { _mm512_loadu_ps(b.add((16 * g + j) * ldb + p)) };
                    }
                } else {
                    for (j, x) in r.iter_mut().enumerate().take(rows) {
                        // SAFETY: row 16g+j < nr is readable for columns p..p+cols; masked
                        // lanes are neither read nor faulted.
                        *x = unsafe { _mm512_maskz_loadu_ps(mask, b.add((16 * g + j) * ldb + p)) };
                    }
                }
                transpose16(&mut r);
                for (t, x) in r.iter().enumerate().take(cols) {
                    // SAFETY: (p+t) < kc, so the 16 floats at dst + (p+t)*NR + 16g lie inside
                    // the kc*NR destination, 64-byte aligned (dst aligned, NR*4 and 64 multiples of 64).
                    unsafe { _mm512_store_ps(dst.add((p + t) * nrr + 16 * g), *x) };
                }
                p += 16;
            }
        }
    }

    /// HiddenMajor packing of `npan` consecutive micro-panels, row by row (each source
    /// row is read as one contiguous run), masked at the `n` edge.
    ///
    /// # Safety
    /// CPU supports AVX-512F; contract of `Kern::pack_hidden` with `NR = 16*NV`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn pack_hidden_avx512<const NV: usize>(
        b: *const f32,
        ldb: usize,
        ncols: usize,
        npan: usize,
        kc: usize,
        dst: *mut f32,
    ) {
        let nrr = NV * 16;
        let pstride = kc * nrr;
        let full = ncols / 16; // complete 16-column vectors
        let total = npan * NV;
        for p in 0..kc {
            let src = b.wrapping_add(p * ldb);
            for v in 0..total {
                let d = (v / NV) * pstride + p * nrr + (v % NV) * 16;
                // SAFETY: vector v covers columns 16v..16v+16 of row p < kc; for v < full
                // they are all < ncols and readable; otherwise only lanes < ncols-16v are
                // loaded (masked lanes are neither read nor faulted). `d` is the start of a
                // 64-byte aligned line inside the npan*kc*NR destination.
                unsafe {
                    let x = if v < full {
                        _mm512_loadu_ps(src.add(16 * v))
                    } else {
                        let cols = ncols.saturating_sub(16 * v).min(16);
                        let mask: __mmask16 = ((1u32 << cols) - 1) as u16;
                        _mm512_maskz_loadu_ps(mask, src.wrapping_add(16 * v))
                    };
                    _mm512_store_ps(dst.add(d), x);
                }
            }
        }
    }
}
