//! The AMX path: `tdpbf16ps` on 16×16 `f32` tiles, written with `asm!` because the AMX
//! intrinsics are not stable.
//!
//! All eight tiles are configured as 16 rows of 64 bytes: an A tile is 16 hidden rows × 32
//! bf16, a B tile is 16 pairs along k × 16 classes × 2 bf16, a C tile is 16 × 16 `f32`.
//! Tiles `tmm0..tmm3` accumulate C, `tmm4, tmm5` hold A, `tmm6, tmm7` hold B. The kernel
//! covers 32 rows × 32 classes (2×2 C tiles) per pass over k, or 16 rows × 64 classes
//! (1×4) when the block has 16 rows or fewer (decoding), so that zero rows are not
//! multiplied for nothing.
//!
//! In bf16x3 the 2×2 kernel runs the three products of each k-step together (hi·hi,
//! hi·lo, lo·hi), keeping A's hi tiles loaded: 10 tile loads per 12 products.
//!
//! The tile configuration is per thread: every call loads it and releases the tiles at
//! the end (`tilerelease`), so no AMX state outlives a call.

use super::{PackedBf16Weights, PackedRows};
use std::arch::asm;
use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
use std::ops::Range;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// `arch_prctl` request: ask for permission to use an extended state component.
const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
/// The AMX tile data state component.
const XFEATURE_XTILEDATA: usize = 18;
/// `arch_prctl`'s system call number on x86_64 Linux.
#[cfg(target_os = "linux")]
const SYS_ARCH_PRCTL: usize = 158;

/// Whether the CPU has AMX-TILE and AMX-BF16, the OS saves tile state, and (on Linux)
/// this process may use it. Asks for the permission on the first call; cached.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx() && request_permission())
}

fn cpu_has_amx() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};
    let max_leaf = __cpuid(0).eax;
    if max_leaf < 0xd {
        return false;
    }
    let l7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (l7.edx >> 22 & 1 == 1, l7.edx >> 24 & 1 == 1);
    let l1 = __cpuid(1);
    let osxsave = l1.ecx >> 27 & 1 == 1;
    if !(amx_bf16 && amx_tile && osxsave) {
        return false;
    }
    // SAFETY: OSXSAVE is set, so XGETBV is enabled; XCR0 is register 0.
    let xcr0 = unsafe { _xgetbv(0) };
    // Bits 17 (XTILECFG) and 18 (XTILEDATA): the OS may enable tile state.
    xcr0 >> 17 & 3 == 3
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    let mut ret = SYS_ARCH_PRCTL as isize;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) only changes this process's
    // permitted xsave features; it reads and writes no user memory. The syscall instruction
    // clobbers rcx and r11, declared; it does not touch the stack.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    // Other systems either enable AMX for every process or need calls we do not make.
    let _ = (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
    false
}

/// The 64-byte tile configuration (palette 1): all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_16x64() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for t in 0..8 {
            c[16 + 2 * t] = 64; // colsb[t], little-endian u16
            c[48 + t] = 16; // rows[t]
        }
        TileConfig(c)
    }
}

/// Row stride of packed A and B tiles, in bytes.
const STRIDE: usize = 64;
/// Elements (u16) per A or B tile.
const TILE: usize = 512;

macro_rules! tload {
    ($t:literal, $p:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) STRIDE,
             options(nostack, readonly, preserves_flags))
    };
}
macro_rules! tload_s {
    ($t:literal, $p:expr, $s:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $s,
             options(nostack, readonly, preserves_flags))
    };
}
macro_rules! tdp {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack, nomem, preserves_flags))
    };
}
macro_rules! tstore {
    ($t:literal, $p:expr, $s:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) $s,
             options(nostack, preserves_flags))
    };
}
macro_rules! tzero {
    ($t:literal) => {
        asm!(concat!("tilezero tmm", $t), options(nostack, nomem, preserves_flags))
    };
}

/// k-steps (of 32) per chunk for blocks that accumulate in place; 0 means "not set yet".
static K_CHUNK: AtomicUsize = AtomicUsize::new(0);

/// k-steps per chunk: [`set_k_chunk`], else `SOFTMAX_LAYER_AMX_KCHUNK`, else all of k (no
/// chunking: at d = 768, chunks of 8 and 12 steps made the product 15–35% slower,
/// `bench_bf16 -- 9 kchunk`).
fn k_chunk() -> usize {
    match K_CHUNK.load(Ordering::Relaxed) {
        0 => {
            let k = std::env::var("SOFTMAX_LAYER_AMX_KCHUNK").ok().and_then(|s| s.parse().ok()).filter(|&k| k > 0);
            let k = k.unwrap_or(usize::MAX);
            K_CHUNK.store(k, Ordering::Relaxed);
            k
        }
        k => k,
    }
}

/// How the next W blocks are prefetched: 0 = the next pair into L2 (default), 1 = none,
/// 2 = the next pair into L1, 3 = the pair after next into L2.
static PREFETCH: AtomicUsize = AtomicUsize::new(0);

fn prefetch_mode() -> usize {
    PREFETCH.load(Ordering::Relaxed)
}

/// Sets the prefetch mode of the AMX kernel (for tuning; results do not change).
#[doc(hidden)]
pub fn set_prefetch_mode(mode: usize) {
    PREFETCH.store(mode.min(3), Ordering::Relaxed);
}

/// Whether bf16x3 runs its three terms per k-step (10 tile loads per 12 products).
static FUSE3: AtomicBool = AtomicBool::new(true);

/// Sets whether bf16x3 fuses its three terms per k-step (for tuning; results change only
/// in the order of the `f32` additions).
#[doc(hidden)]
pub fn set_fuse3(on: bool) {
    FUSE3.store(on, Ordering::Relaxed);
}

/// Sets the k-chunk of the AMX kernel's in-place blocks (for tuning; results change only
/// in the order of the `f32` additions). 0 is ignored.
#[doc(hidden)]
pub fn set_k_chunk(k: usize) {
    if k > 0 {
        K_CHUNK.store(k, Ordering::Relaxed);
    }
}

/// C scratch: 32 rows × 64 `f32` (a 2×2 or 1×4 block of C tiles), row stride 256 bytes.
#[repr(C, align(64))]
struct CBlock([f32; 32 * 64]);
const C_STRIDE: usize = 64 * 4;

/// `out[i * ldo + j] += (A · W[cols]ᵀ)[i, j]` over the precision's terms, or `=` with
/// `overwrite` (C tiles then start at zero instead of at `out`'s values, never read).
///
/// # Safety
/// AMX must be available and permitted ([`available`]). `rows` and `w` must be packed for
/// the same `d` and precision, `cols ⊂ [0, V)`, and `out` must hold `(m − 1)·ldo + c`
/// elements with `ldo ≥ c` (checked by the caller, [`super::tile_product`]).
pub(crate) unsafe fn tile_product(
    rows: &PackedRows,
    w: &PackedBf16Weights,
    cols: Range<usize>,
    out: &mut [f32],
    ldo: usize,
    overwrite: bool,
) {
    let cfg = TileConfig::all_16x64();
    // SAFETY: the configuration is a valid palette-1 configuration (16 rows × 64 bytes per
    // tile, within the palette's limits); AMX is available and permitted (caller).
    unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags)) };
    let kc = w.d_pad / 32;
    let terms = w.precision.terms();
    let mut scratch = CBlock([0.0; 32 * 64]);
    let (b0, b1) = (cols.start / 16, cols.end.div_ceil(16));
    let m = rows.rows;
    // Adds (or, with `copy`, writes) the computed C block (row tiles from `t`, class blocks
    // from `b`) into `out`.
    let flush = |out: &mut [f32], scratch: &CBlock, t: usize, b: usize, nr: usize, nc: usize, copy: bool| {
        let r_end = (nr * 16).min(m - t * 16);
        let (j0, j1) = ((b * 16).max(cols.start), ((b + nc) * 16).min(cols.end));
        if j0 >= j1 {
            return;
        }
        for r in 0..r_end {
            let i = t * 16 + r;
            let dst = &mut out[i * ldo + j0 - cols.start..i * ldo + j1 - cols.start];
            let src = &scratch.0[r * 64 + j0 - b * 16..r * 64 + j1 - b * 16];
            if copy {
                dst.copy_from_slice(src);
            } else {
                for (o, s) in dst.iter_mut().zip(src) {
                    *o += s;
                }
            }
        }
    };
    // Copies `out`'s part of the 32 × 32 C block (row tiles t, t+1; class blocks b, b+1)
    // into the scratch, zeros elsewhere.
    let gather = |out: &[f32], scratch: &mut CBlock, t: usize, b: usize| {
        scratch.0.fill(0.0);
        let r_end = 32.min(m - t * 16);
        let (j0, j1) = ((b * 16).max(cols.start), ((b + 2) * 16).min(cols.end));
        if j0 >= j1 {
            return;
        }
        for r in 0..r_end {
            let i = t * 16 + r;
            let src = &out[i * ldo + j0 - cols.start..i * ldo + j1 - cols.start];
            scratch.0[r * 64 + j0 - b * 16..r * 64 + j1 - b * 16].copy_from_slice(src);
        }
    };
    if m <= 16 {
        // 1×4: one A tile, four B tiles per k-chunk.
        let mut b = b0;
        while b < b1 {
            // Four blocks when three or more are wanted: b + 3 ≤ b1 ≤ ceil(V/16), the
            // zero block, so all four exist; else two (b + 1 ≤ ceil(V/16) likewise).
            let nc = if b1 - b > 2 { 4 } else { 2 };
            // SAFETY: tiles configured above; every load reads one 16 × 64-byte tile inside
            // the packed buffers: row tile 0 of `rows` (there are at least 2), blocks
            // b..b+nc of `w` (b + nc ≤ ceil(V/16) + 1 blocks exist, the last zero), parts
            // < precision.parts(), k-chunks < d_pad / 32. Stores write the 64-byte-aligned
            // 32 × 64 f32 scratch with stride 256 bytes.
            unsafe {
                tzero!(0);
                tzero!(1);
                tzero!(2);
                tzero!(3);
                for &(qa, qb) in terms {
                    let a = rows.tile_ptr(0, qa);
                    let bp: [*const u16; 4] = std::array::from_fn(|x| w.block_ptr(b + x.min(nc - 1), qb));
                    for k in 0..kc {
                        tload!(4, a.add(k * TILE));
                        tload!(6, bp[0].add(k * TILE));
                        tload!(7, bp[1].add(k * TILE));
                        tdp!(0, 4, 6);
                        tdp!(1, 4, 7);
                        if nc > 2 {
                            tload!(6, bp[2].add(k * TILE));
                            tload!(7, bp[3].add(k * TILE));
                            tdp!(2, 4, 6);
                            tdp!(3, 4, 7);
                        }
                    }
                }
                let s = scratch.0.as_mut_ptr();
                tstore!(0, s, C_STRIDE);
                tstore!(1, s.add(16), C_STRIDE);
                if nc > 2 {
                    tstore!(2, s.add(32), C_STRIDE);
                    tstore!(3, s.add(48), C_STRIDE);
                }
            }
            flush(out, &scratch, 0, b, 1, nc, overwrite);
            b += nc;
        }
    } else {
        // 2×2: two A tiles, two B tiles per k-chunk; class-block pairs outside, row-tile
        // pairs inside, so a pair of W blocks is reused by every row pair.
        let tiles = rows.tiles();
        // Blocks that accumulate in place can run over k in chunks of `k_chunk()` steps, all
        // blocks per chunk, so that a W pair's chunk may stay in L1 while the row pairs pass
        // (off by default: it was slower where measured).
        let k_chunk = k_chunk();
        let fuse3 = w.precision == super::Precision::Bf16x3 && FUSE3.load(Ordering::Relaxed);
        for kb0 in (0..kc).step_by(k_chunk) {
            let mut b = b0;
            while b < b1 {
                // The pair's blocks for each term (at most three terms; no allocation here, in
                // the loop over W's pairs).
                let bp = [0, 1].map(|x| {
                    let mut p = [std::ptr::null::<u16>(); 3];
                    for (slot, &(_, qb)) in p.iter_mut().zip(terms) {
                        *slot = w.block_ptr(b + x, qb);
                    }
                    p
                });
                // The next pair of W blocks (contiguous) is fetched into L2 while this pair is
                // used (first chunk only): spread over the row pairs and k-steps of this pair.
                let mode = prefetch_mode();
                let ahead = if mode == 3 { 4 } else { 2 };
                let next = if b + ahead < b1 && kb0 == 0 && mode != 1 { Some(w.block_ptr(b + ahead, 0)) } else { None };
                let next_lines = 2 * w.precision.parts() * w.d_pad * 16 * 2 / 64;
                let steps = m.div_ceil(32) * kc * terms.len();
                let per_step = next_lines.div_ceil(steps.max(1)).min(4);
                let mut fetched = 0usize;
                // Prefetches the next `count` lines of the next pair, if any are left. Only a
                // hint: the lines lie inside the packed W (blocks b + ahead.. exist since
                // b + ahead < b1).
                let mut prefetch_next = |count: usize| {
                    let Some(nx) = next else { return };
                    for _ in 0..count.min(next_lines - fetched) {
                        let line = nx.cast::<i8>().wrapping_add(fetched * 64);
                        // SAFETY: SSE is part of x86_64; a prefetch never faults.
                        unsafe {
                            if mode == 2 {
                                _mm_prefetch::<_MM_HINT_T0>(line);
                            } else {
                                _mm_prefetch::<_MM_HINT_T1>(line);
                            }
                        }
                        fetched += 1;
                    }
                };
                for t in (0..tiles).step_by(2) {
                    if t * 16 >= m {
                        break;
                    }
                    // A block wholly inside the output accumulates there directly: C is loaded
                    // from `out` and stored back (no scratch, no second pass).
                    // Only where its rows are whole cache lines: unaligned tile rows cost double.
                    let ldb = ldo * 4;
                    let inside = t * 16 + 32 <= m
                        && b * 16 >= cols.start
                        && (b + 2) * 16 <= cols.end
                        && ldb.is_multiple_of(64)
                        && (out[t * 16 * ldo + b * 16 - cols.start..].as_ptr() as usize).is_multiple_of(64);
                    // Blocks that go through the scratch take all of k in the first chunk.
                    if !inside && kb0 > 0 {
                        continue;
                    }
                    let ks = if inside { kb0..kb0.saturating_add(k_chunk).min(kc) } else { 0..kc };
                    // With `overwrite`, C starts at zero in the first k-chunk: nothing to gather.
                    let fresh = overwrite && kb0 == 0;
                    let c0 = if inside {
                        out[t * 16 * ldo + b * 16 - cols.start..].as_mut_ptr()
                    } else {
                        if !fresh {
                            gather(out, &mut scratch, t, b);
                        }
                        scratch.0.as_mut_ptr()
                    };
                    let (c1, c2, c3) = if inside {
                        // SAFETY: offsets inside `out`: rows t·16 .. t·16 + 32 ≤ m, classes
                        // b·16 .. b·16 + 32 inside `cols` (checked just above).
                        unsafe { (c0.add(16), c0.add(16 * ldo), c0.add(16 * ldo + 16)) }
                    } else {
                        // SAFETY: inside the 32 × 64 scratch.
                        unsafe { (c0.add(16), c0.add(16 * 64), c0.add(16 * 64 + 16)) }
                    };
                    // SAFETY: as for the 1×4 kernel: row tiles t, t+1 < tiles (an even count),
                    // blocks b, b+1 ≤ ceil(V/16) (b < b1 ≤ ceil(V/16)), each load one tile
                    // inside the packed buffers. C tiles are 16 rows × 16 f32 at c0..c3 with
                    // row stride `ldb` bytes inside `out` (rows < m, classes in `cols`) when
                    // `inside`, else with stride 256 bytes inside the scratch.
                    unsafe {
                        if fresh {
                            tzero!(0);
                            tzero!(1);
                            tzero!(2);
                            tzero!(3);
                        } else if inside {
                            tload_s!(0, c0, ldb);
                            tload_s!(1, c1, ldb);
                            tload_s!(2, c2, ldb);
                            tload_s!(3, c3, ldb);
                        } else {
                            // From `out` through the scratch, so that C accumulates onto
                            // `out`'s values in the same order as in place: the result never
                            // depends on where `out` happens to be in memory.
                            tload_s!(0, c0, C_STRIDE);
                            tload_s!(1, c1, C_STRIDE);
                            tload_s!(2, c2, C_STRIDE);
                            tload_s!(3, c3, C_STRIDE);
                        }
                        if fuse3 {
                            // bf16x3 with the three terms per k-step: hi·hi, then hi·lo with
                            // A's hi parts kept, then lo·hi: 10 tile loads per 12 products
                            // instead of 12.
                            let (ah0, ah1) = (rows.tile_ptr(t, 0), rows.tile_ptr(t + 1, 0));
                            let (al0, al1) = (rows.tile_ptr(t, 1), rows.tile_ptr(t + 1, 1));
                            let (bh0, bh1) = (w.block_ptr(b, 0), w.block_ptr(b + 1, 0));
                            let (bl0, bl1) = (w.block_ptr(b, 1), w.block_ptr(b + 1, 1));
                            for k in ks.clone() {
                                prefetch_next(3 * per_step);
                                let o = k * TILE;
                                tload!(4, ah0.add(o));
                                tload!(6, bh0.add(o));
                                tdp!(0, 4, 6);
                                tload!(5, ah1.add(o));
                                tdp!(2, 5, 6);
                                tload!(7, bh1.add(o));
                                tdp!(1, 4, 7);
                                tdp!(3, 5, 7);
                                tload!(6, bl0.add(o));
                                tdp!(0, 4, 6);
                                tdp!(2, 5, 6);
                                tload!(7, bl1.add(o));
                                tdp!(1, 4, 7);
                                tdp!(3, 5, 7);
                                tload!(4, al0.add(o));
                                tload!(6, bh0.add(o));
                                tdp!(0, 4, 6);
                                tload!(5, al1.add(o));
                                tdp!(2, 5, 6);
                                tload!(7, bh1.add(o));
                                tdp!(1, 4, 7);
                                tdp!(3, 5, 7);
                            }
                        }
                        for (ti, &(qa, _)) in terms.iter().enumerate().filter(|_| !fuse3) {
                            let (a0, a1) = (rows.tile_ptr(t, qa), rows.tile_ptr(t + 1, qa));
                            let (w0, w1) = (bp[0][ti], bp[1][ti]);
                            for k in ks.clone() {
                                prefetch_next(per_step);
                                // Each operand tile is freed as early as possible
                                // (B0 after two products, A0 after three) so the next
                                // step's loads can start while products still run.
                                tload!(4, a0.add(k * TILE));
                                tload!(6, w0.add(k * TILE));
                                tdp!(0, 4, 6);
                                tload!(5, a1.add(k * TILE));
                                tdp!(2, 5, 6);
                                tload!(7, w1.add(k * TILE));
                                tdp!(1, 4, 7);
                                tdp!(3, 5, 7);
                            }
                        }
                        let st = if inside { ldb } else { C_STRIDE };
                        tstore!(0, c0, st);
                        tstore!(1, c1, st);
                        tstore!(2, c2, st);
                        tstore!(3, c3, st);
                    }
                    if !inside {
                        flush(out, &scratch, t, b, 2, 2, true);
                    }
                }
                b += 2;
            }
        }
    }
    // SAFETY: releases this thread's tile state; no tile is used after this point.
    unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
}

/// A register-only `tdpbf16ps` loop for measuring the tiles' peak: `iters` passes of 4
/// independent tile products (2×2 C tiles, A and B never reloaded). Returns the flops done
/// (`iters × 4 × 16·16·32·2`).
///
/// Returns 0 without doing anything if AMX is not available.
pub fn peak_loop(iters: u64) -> u64 {
    if !available() {
        return 0;
    }
    let cfg = TileConfig::all_16x64();
    // SAFETY: AMX is available and permitted; the configuration is valid (see
    // `tile_product`). The loop touches tiles only (tilezero, tdpbf16ps) and no memory;
    // the tiles are released at the end.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags));
        for t in [0, 1, 2, 3, 4, 5, 6, 7] {
            match t {
                0 => tzero!(0),
                1 => tzero!(1),
                2 => tzero!(2),
                3 => tzero!(3),
                4 => tzero!(4),
                5 => tzero!(5),
                6 => tzero!(6),
                _ => tzero!(7),
            }
        }
        for _ in 0..iters {
            tdp!(0, 4, 6);
            tdp!(1, 4, 7);
            tdp!(2, 5, 6);
            tdp!(3, 5, 7);
        }
        asm!("tilerelease", options(nostack, nomem, preserves_flags));
    }
    iters * 4 * 16 * 16 * 32 * 2
}

/// The tile-load patterns [`load_loop`] can run.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadPattern {
    /// The 2×2 kernel's step: 4 tile loads (2 A, 2 B), 4 products into 4 C tiles.
    Kernel,
    /// The 4 tile loads alone, no products.
    LoadsOnly,
    /// 2 tile loads (A) per 4 products into 2 C tiles.
    HalfLoads,
    /// The kernel's step with its 4 loads from 4 streams 24 KiB apart (as A and B at d = 768).
    Streams,
}

/// A diagnostic of the tile-load path: `iters` steps of `pattern`, whose loads cycle over
/// `buf` (4 KiB per step, from its first 64-byte boundary). Returns the flops of the
/// products the step would do in the 2×2 kernel (`iters × 4 × 16·16·32·2`), so that its
/// rate compares with [`peak_loop`]'s. Returns 0 if AMX is not available or `buf` holds
/// less than one step.
#[doc(hidden)]
pub fn load_loop(iters: u64, buf: &[u16], pattern: LoadPattern) -> u64 {
    let off = buf.as_ptr().align_offset(64).min(buf.len());
    let steps = if pattern == LoadPattern::Streams {
        (buf.len() - off) / TILE / 4 / 24 * 24
    } else {
        (buf.len() - off) / (4 * TILE)
    };
    if !available() || steps == 0 {
        return 0;
    }
    let cfg = TileConfig::all_16x64();
    let base = buf[off..].as_ptr();
    // SAFETY: AMX is available and permitted; the configuration is valid (see
    // `tile_product`). Every load reads one 16 × 64-byte tile at `base + i·TILE` with
    // i < steps·4, inside `buf` (steps·4·TILE elements from `off`): i = s·4 + x (x < 4)
    // for the 4 KiB pieces; for the streams (steps a multiple of 24),
    // i = ⌊s/24⌋·96 + s mod 24 + 24·x ≤ (steps/24 − 1)·96 + 23 + 72 = steps·4 − 1. The
    // tiles are released at the end.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags));
        tzero!(0);
        tzero!(1);
        tzero!(2);
        tzero!(3);
        let mut s = 0;
        for _ in 0..iters {
            let q = base.add(s * 4 * TILE);
            match pattern {
                LoadPattern::Kernel | LoadPattern::Streams => {
                    // A0, B0, A1, B1: one 4 KiB piece, or four streams 24 KiB apart.
                    let [a0, b0, a1, b1] = if pattern == LoadPattern::Kernel {
                        [q, q.add(TILE), q.add(2 * TILE), q.add(3 * TILE)]
                    } else {
                        let r = base.add((s / 24 * 96 + s % 24) * TILE);
                        [r, r.add(48 * TILE), r.add(24 * TILE), r.add(72 * TILE)]
                    };
                    tload!(4, a0);
                    tload!(6, b0);
                    tdp!(0, 4, 6);
                    tload!(5, a1);
                    tdp!(2, 5, 6);
                    tload!(7, b1);
                    tdp!(1, 4, 7);
                    tdp!(3, 5, 7);
                }
                LoadPattern::LoadsOnly => {
                    tload!(4, q);
                    tload!(6, q.add(TILE));
                    tload!(5, q.add(2 * TILE));
                    tload!(7, q.add(3 * TILE));
                }
                LoadPattern::HalfLoads => {
                    tdp!(0, 4, 6);
                    tdp!(1, 4, 7);
                    tload!(4, q);
                    tdp!(0, 5, 6);
                    tdp!(1, 5, 7);
                    tload!(5, q.add(TILE));
                }
            }
            s += 1;
            if s == steps {
                s = 0;
            }
        }
        asm!("tilerelease", options(nostack, nomem, preserves_flags));
    }
    iters * 4 * 16 * 16 * 32 * 2
}
