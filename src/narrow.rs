//! The cross-entropy loss and its weight gradients for a *narrow* softmax layer: few
//! classes (`K ≤ MAX_CLASSES`), as in fitting a multinomial logistic regression.
//!
//! The general loss ([`crate::loss`]) hands row-major logits to a GEMM library. At
//! `K = 100` that library covers the classes with register tiles of 64 and 48 lanes (12
//! of its 112 lanes wasted), packs both operands on every call, and leaves a row's
//! `(max, sum)` to horizontal reductions over 7 vectors. Here the hidden rows go along the
//! vector lanes instead, `2·LANES` rows per panel:
//!
//! 1. the panel's features are transposed into `xt[f][r]` (zeros past the last row);
//! 2. the logits `z[c][r]`, up to [`MR`] classes at a time: per feature, two vector loads
//!    of `xt`, one broadcast of `Wᵀ` per class and two fused multiply-adds per class, so
//!    no lane is ever padding (the classes are split into near-equal panels);
//! 3. the row work lane-wise: each row's maximum, exponentials and sum over the classes
//!    with no horizontal reduction, then `G = (P − Y) · scale` in place;
//! 4. `dW[c][f] += Σ_r G[c][r] · X[r][f]` with the rows as the reduction: per row, two
//!    vector loads of `X`'s row (features along the lanes) and one broadcast of `G` per
//!    class.
//!
//! [`metrics`] runs steps 1–3 alone (the loss and whether each row's target has the largest
//! logit), for the training metrics.
//!
//! Memory: `O((K + d) · 2·LANES)` per call, plus `Wᵀ` packed once per evaluation (`K · d`).
//! The operation order is fixed by `K`, `d` and the instruction set, never by the
//! threads; callers split rows into fixed chunks and add the chunks' gradients in order.

use crate::kernels::generic::{Vector, exp_nonpositive};
use crate::kernels::{Isa, Kernels};
use crate::matrix::MatRef;

/// The most classes this path takes: `z` then holds `K · 2·LANES` values (32 KiB at
/// `K = 256` with AVX-512), which stay in L1 with the transposed panel.
pub(crate) const MAX_CLASSES: usize = 256;
/// The largest hidden size this path takes: the transposed panel (`d · 2·LANES` values,
/// 128 KiB at `d = 1024` with AVX-512) stays in L2.
pub(crate) const MAX_DIM: usize = 1024;
/// The most classes per register panel: `2·MR` accumulators, two operand vectors and a
/// broadcast fit AVX-512's and NEON's 32 vector registers.
const MR: usize = 12;
/// The same for AVX2's 16 registers (and the scalar code).
const MR_NARROW: usize = 6;

/// Whether `K` classes and hidden size `d` take this path.
pub(crate) fn applies(k: usize, d: usize) -> bool {
    (1..=MAX_CLASSES).contains(&k) && (1..=MAX_DIM).contains(&d)
}

/// `W` (`[K, d]`) as the logits' register panels read it, for one instruction set: the
/// panel of classes `c0..c0 + mr` at offset `c0·d`, as `[d][mr]`. Made once per evaluation
/// and shared by all its chunks of rows.
#[derive(Debug)]
pub(crate) struct PackedWeights {
    wt: Vec<f32>,
    panels: Vec<(usize, usize)>,
    isa: Isa,
    d: usize,
}

impl PackedWeights {
    /// Packs `w` for `isa` (the best instruction set available when `isa` is not).
    ///
    /// # Panics
    /// If `w` does not hold `k · d` values.
    pub(crate) fn new(isa: Isa, w: &[f32], k: usize, d: usize) -> PackedWeights {
        assert_eq!(w.len(), k * d, "narrow: W is not [K, d]");
        let isa = if Kernels::for_isa(isa).is_some() { isa } else { Kernels::best().isa() };
        let panels = panels(k, if matches!(isa, Isa::Avx512 | Isa::Neon) { MR } else { MR_NARROW });
        let mut wt = vec![0f32; k * d];
        for &(c0, mr) in &panels {
            let dst = &mut wt[c0 * d..(c0 + mr) * d];
            for j in 0..mr {
                for (f, &v) in w[(c0 + j) * d..(c0 + j + 1) * d].iter().enumerate() {
                    dst[f * mr + j] = v;
                }
            }
        }
        PackedWeights { wt, panels, isa, d }
    }

    /// Classes `K`.
    fn classes(&self) -> usize {
        self.panels.last().map_or(0, |&(c0, mr)| c0 + mr)
    }
}

/// One call's inputs: rows `x` (`[n, d]`) with targets `y` (each in `[0, K)`), the packed
/// weights `w` and bias `b` (`[K]`), and the factor `scale` of the gradients.
#[derive(Clone, Copy)]
pub(crate) struct Problem<'a> {
    pub x: MatRef<'a>,
    pub y: &'a [i64],
    pub w: &'a PackedWeights,
    pub b: &'a [f32],
    pub scale: f32,
}

/// What a pass sums over its rows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Sums {
    /// `Σ_r (lse_r − z_{r, y_r})`.
    pub loss: f64,
    /// Rows whose target is the argmax, ties to the lower class id as in
    /// [`crate::SoftmaxLayer::argmax`] ([`metrics`] only; [`loss_grad`] leaves it 0).
    pub correct: usize,
}

/// Over the rows of `p.x`, on the instruction set `p.w` was packed for: returns
/// `Σ_r (lse_r − z_{r, y_r})` and adds `scale · (P − Y)ᵀ · X` to `dw` (`[K, d]`) and
/// `scale · Σ_r (P − Y)_r` to `db` (`[K]`), where `z = X · Wᵀ + b`, `P = softmax(z)` row by
/// row and `Y` the one-hot targets.
///
/// # Panics
/// If the shapes disagree, a target is out of range, or `(K, d)` is outside [`applies`].
pub(crate) fn loss_grad(p: &Problem<'_>, dw: &mut [f32], db: &mut [f32]) -> f64 {
    let (k, d) = (p.b.len(), p.x.cols());
    assert!(dw.len() == k * d && db.len() == k, "narrow: shapes disagree");
    run(p, Some((dw, db))).loss
}

/// The forward half of [`loss_grad`] (the logits and the row work, no gradient): the
/// loss summed over the rows of `p.x`, and how many rows' targets have the largest logit
/// (`p.scale` is not used). Each row's loss has the bits [`loss_grad`] gives it.
///
/// # Panics
/// As [`loss_grad`].
pub(crate) fn metrics(p: &Problem<'_>) -> Sums {
    run(p, None)
}

/// `dW` and `db` to add the gradients to, or none for the forward half alone.
type Grads<'a> = Option<(&'a mut [f32], &'a mut [f32])>;

fn run(p: &Problem<'_>, grads: Grads<'_>) -> Sums {
    let (n, d, k) = (p.x.rows(), p.x.cols(), p.b.len());
    assert!(applies(k, d), "narrow: K = {k}, d = {d} outside the narrow path");
    assert!(p.w.classes() == k && p.w.d == d, "narrow: W is packed for another shape");
    assert!(p.y.len() == n, "narrow: shapes disagree");
    assert!(p.y.iter().all(|&t| (0..k as i64).contains(&t)), "narrow: a target is out of range");
    match p.w.isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the instruction set is available (checked when packing); shapes checked.
        Isa::Avx512 => unsafe { avx512(p, grads) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { avx2(p, grads) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon => unsafe { neon(p, grads) },
        // SAFETY: the one-lane code needs no instruction set; shapes checked.
        _ => unsafe { body::<crate::kernels::scalar::F32x1, MR_NARROW>(p, grads) },
    }
}

/// Spreads prefetches (towards L2) of a block of rows over the iterations of a loop: the
/// next panel's features arrive while this panel's products run, instead of being waited
/// for by the transposition. Only hints: the addresses are never dereferenced.
#[derive(Clone, Copy)]
struct Prefetch {
    /// The first row, its stride, and the cache lines of each row.
    base: *const u8,
    stride: usize,
    row_lines: usize,
    /// The next line to fetch (row, line in the row) and how many are left.
    row: usize,
    line: usize,
    left: usize,
}

impl Prefetch {
    const NONE: Prefetch = Prefetch { base: std::ptr::null(), stride: 0, row_lines: 1, row: 0, line: 0, left: 0 };

    /// The lines `first..first + count` of `rows` rows of `row_len` values from `base`.
    fn new(base: *const f32, stride: usize, row_len: usize, first: usize, count: usize) -> Prefetch {
        let row_lines = (row_len * 4).div_ceil(64).max(1);
        Prefetch {
            base: base.cast(),
            stride: stride * 4,
            row_lines,
            row: first / row_lines,
            line: first % row_lines,
            left: count,
        }
    }

    /// Fetches the next line, if any is left.
    ///
    /// # Safety
    /// The instruction set of `V` is available.
    #[inline(always)]
    unsafe fn next<V: Vector>(&mut self) {
        if self.left == 0 {
            return;
        }
        let p = self.base.wrapping_add(self.row * self.stride + self.line * 64);
        // SAFETY: a prefetch is a hint and never faults, whatever the address.
        unsafe { V::prefetch_l2(p.cast()) };
        self.left -= 1;
        self.line += 1;
        if self.line == self.row_lines {
            self.line = 0;
            self.row += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
/// # Safety
/// AVX-512F is available; `args` and `grads` are checked (see [`run`]).
unsafe fn avx512(args: &Problem<'_>, grads: Grads<'_>) -> Sums {
    // SAFETY: forwarded from this function's contract.
    unsafe { body::<crate::kernels::x86_64::F32x16, MR>(args, grads) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
/// # Safety
/// AVX2 and FMA are available; `args` and `grads` are checked (see [`run`]).
unsafe fn avx2(args: &Problem<'_>, grads: Grads<'_>) -> Sums {
    // SAFETY: forwarded from this function's contract.
    unsafe { body::<crate::kernels::x86_64::F32x8, MR_NARROW>(args, grads) }
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
/// # Safety
/// NEON is available; `args` and `grads` are checked (see [`run`]).
unsafe fn neon(args: &Problem<'_>, grads: Grads<'_>) -> Sums {
    // SAFETY: forwarded from this function's contract.
    unsafe { body::<crate::kernels::aarch64::F32x4, MR>(args, grads) }
}

/// Splits `k` classes into the fewest panels of at most `mr`, of near-equal sizes:
/// `(first class, classes)`.
fn panels(k: usize, mr: usize) -> Vec<(usize, usize)> {
    let count = k.div_ceil(mr);
    let (base, extra) = (k / count, k % count);
    let mut c0 = 0;
    (0..count)
        .map(|p| {
            let size = base + usize::from(p < extra);
            c0 += size;
            (c0 - size, size)
        })
        .collect()
}

/// Calls `$f::<V, MR>` with the panel size `$mr` as a constant (1 ..= 12).
macro_rules! with_mr {
    ($mr:expr, $f:ident, $V:ty, ($($arg:expr),*)) => {
        match $mr {
            1 => $f::<$V, 1>($($arg),*),
            2 => $f::<$V, 2>($($arg),*),
            3 => $f::<$V, 3>($($arg),*),
            4 => $f::<$V, 4>($($arg),*),
            5 => $f::<$V, 5>($($arg),*),
            6 => $f::<$V, 6>($($arg),*),
            7 => $f::<$V, 7>($($arg),*),
            8 => $f::<$V, 8>($($arg),*),
            9 => $f::<$V, 9>($($arg),*),
            10 => $f::<$V, 10>($($arg),*),
            11 => $f::<$V, 11>($($arg),*),
            _ => $f::<$V, 12>($($arg),*),
        }
    };
}

/// The whole computation for one instruction set, panels of at most `PMAX` classes.
///
/// # Safety
/// The instruction set of `V` is available; `args` is checked (see [`run`]), and `grads`,
/// if given, holds `dW` (`K · d` elements) and `db` (`K`).
#[inline(always)]
unsafe fn body<V: Vector, const PMAX: usize>(args: &Problem<'_>, mut grads: Grads<'_>) -> Sums {
    let (x, y, w, b, scale) = (args.x, args.y, args.w, args.b, args.scale);
    let (n, d, k) = (x.rows(), x.cols(), b.len());
    let (l, nr) = (V::LANES, 2 * V::LANES);
    let (panels, wt) = (&w.panels, &w.wt);
    debug_assert!(panels.iter().all(|&(_, mr)| mr <= PMAX));
    let mut xt = vec![0f32; d * nr];
    let mut z = vec![0f32; k * nr];
    // Per class, lane-wise partial sums of G for db.
    let mut dbv = vec![0f32; k * l];
    let mut target = vec![0f32; nr];
    let (mut m_lanes, mut s_lanes) = (vec![0f32; nr], vec![0f32; nr]);
    let mut sums = Sums::default();
    let ldx = x.row_stride();
    for r0 in (0..n).step_by(nr) {
        let rows = nr.min(n - r0);
        // 1. The panel's features, transposed; rows past the end are zeros.
        crate::linalg::transpose_into(x.sub_rows(r0..r0 + rows).as_slice(), ldx, &mut xt, nr, d, rows, None);
        if rows < nr {
            for f in 0..d {
                xt[f * nr + rows..(f + 1) * nr].fill(0.0);
            }
        }
        // 2. Logits, panel by panel, each prefetching its share of the next panel's rows.
        let next_rows = nr.min(n.saturating_sub(r0 + nr));
        let lines = next_rows * (d * 4).div_ceil(64);
        for (p, &(c0, mr)) in panels.iter().enumerate() {
            let (first, last) = (p * lines / panels.len(), (p + 1) * lines / panels.len());
            let pf = if next_rows > 0 {
                Prefetch::new(x.row(r0 + nr).as_ptr(), ldx, d, first, last - first)
            } else {
                Prefetch::NONE
            };
            // SAFETY: `xt` holds d·nr values, the panel's Wᵀ mr·d from c0·d, `b` mr from
            // c0, and `z` mr·nr from c0·nr (c0 + mr ≤ K).
            unsafe {
                with_mr!(
                    mr,
                    logits_panel,
                    V,
                    (xt.as_ptr(), wt.as_ptr().add(c0 * d), b.as_ptr().add(c0), z.as_mut_ptr().add(c0 * nr), d, pf)
                )
            };
        }
        // 3. The row work, lane-wise: z becomes G (with gradients).
        for r in 0..rows {
            target[r] = z[y[r0 + r] as usize * nr + r];
        }
        for h in 0..2 {
            // SAFETY: every access is one vector at c·nr + h·l < K·nr (z) or c·l (dbv).
            unsafe {
                let zp = z.as_mut_ptr();
                let at = |c: usize| zp.add(c * nr + h * l);
                let mut m = V::splat(-f32::MAX);
                for c in 0..k {
                    m = m.max(V::load(at(c)));
                }
                // The terms are kept only when G is to be made of them.
                let keep = grads.is_some();
                let mut s = V::splat(0.0);
                for c in 0..k {
                    let e = exp_nonpositive(V::load(at(c)).sub(m));
                    if keep {
                        e.store(at(c));
                    }
                    s = s.add(e);
                }
                m.store(m_lanes.as_mut_ptr().add(h * l));
                s.store(s_lanes.as_mut_ptr().add(h * l));
                if grads.is_none() {
                    continue;
                }
                let f = V::splat(scale).div(s);
                for c in 0..k {
                    V::load(at(c)).mul(f).store(at(c));
                }
            }
        }
        for r in 0..rows {
            sums.loss += m_lanes[r] as f64 + (s_lanes[r] as f64).ln() - target[r] as f64;
        }
        if grads.is_none() {
            // (z still holds the logits.) A target with the largest logit is the argmax
            // unless a lower class has the same logit.
            for r in 0..rows {
                let t = y[r0 + r] as usize;
                let first = target[r] >= m_lanes[r] && (0..t).all(|c| z[c * nr + r] != target[r]);
                sums.correct += usize::from(first);
            }
        }
        let Some((dw, _)) = grads.as_mut() else { continue };
        for r in 0..rows {
            z[y[r0 + r] as usize * nr + r] -= scale;
        }
        for c in 0..k {
            z[c * nr + rows..(c + 1) * nr].fill(0.0);
            for h in 0..2 {
                // SAFETY: one vector inside z's class c and one inside dbv's.
                unsafe {
                    let p = dbv.as_mut_ptr().add(c * l);
                    V::load(p).add(V::load(z.as_ptr().add(c * nr + h * l))).store(p);
                }
            }
        }
        // 4. dW, feature panel by feature panel, then class panel by class panel.
        for f0 in (0..d).step_by(nr) {
            let fw = nr.min(d - f0);
            for &(c0, mr) in panels {
                // SAFETY: rows r0..r0 + rows of `x` (stride ldx) hold d values from f0 - fw
                // of them are read; G's panel is mr·nr values from c0·nr; dW's rows c0.. c0 + mr
                // hold d values each, fw of them from f0 are updated.
                unsafe {
                    let args = (
                        x.row(r0).as_ptr().add(f0),
                        ldx,
                        rows,
                        fw,
                        z.as_ptr().add(c0 * nr),
                        dw.as_mut_ptr().add(c0 * d + f0),
                        d,
                    );
                    if fw == nr {
                        with_mr!(mr, weight_panel_full, V, (args))
                    } else {
                        with_mr!(mr, weight_panel_part, V, (args))
                    }
                };
            }
        }
    }
    if let Some((_, db)) = grads {
        for (c, out) in db.iter_mut().enumerate() {
            // SAFETY: one vector of dbv's class c.
            *out += unsafe { V::load(dbv.as_ptr().add(c * l)).reduce_sum() };
        }
    }
    sums
}

/// `z[j][r] = Σ_f xt[f][r] · wt[f][j] + b[j]` for `MR` classes `j` and `2·LANES` rows `r`
/// (`z`'s class rows `2·LANES` apart).
///
/// # Safety
/// The instruction set of `V` is available; `xt` holds `d · 2·LANES` values, `wt`
/// `d · MR`, `b` `MR`, `z` `MR · 2·LANES`.
#[inline(always)]
unsafe fn logits_panel<V: Vector, const MR: usize>(
    xt: *const f32,
    wt: *const f32,
    b: *const f32,
    z: *mut f32,
    d: usize,
    mut pf: Prefetch,
) {
    let (l, nr) = (V::LANES, 2 * V::LANES);
    // SAFETY: every access is inside the extents of the contract.
    unsafe {
        let mut acc = [[V::splat(0.0); 2]; MR];
        // `pf.left` lines over `d` iterations, evenly (Bresenham).
        let (count, mut due) = (pf.left, 0usize);
        for f in 0..d {
            due += count;
            while due >= d {
                due -= d;
                pf.next::<V>();
            }
            let x0 = V::load(xt.add(f * nr));
            let x1 = V::load(xt.add(f * nr + l));
            for (j, a) in acc.iter_mut().enumerate() {
                let wv = V::splat(*wt.add(f * MR + j));
                a[0] = wv.mul_add(x0, a[0]);
                a[1] = wv.mul_add(x1, a[1]);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let bv = V::splat(*b.add(j));
            a[0].add(bv).store(z.add(j * nr));
            a[1].add(bv).store(z.add(j * nr + l));
        }
    }
}

/// `dw[j][f] += Σ_{r < rows} g[j][r] · x[r][f]` for `MR` classes `j` (`dw`'s rows `d`
/// apart, `g`'s `2·LANES` apart) and `fw ≤ 2·LANES` features `f` (`x`'s rows `ldx` apart).
///
/// # Safety
/// The instruction set of `V` is available; `x` holds `rows` rows of `fw` values (stride
/// `ldx`), `g` `MR · 2·LANES` values, `dw` `MR` rows of `fw` values (stride `d`).
#[inline(always)]
unsafe fn weight_panel<V: Vector, const MR: usize, const FULL: bool>(
    x: *const f32,
    ldx: usize,
    rows: usize,
    fw: usize,
    g: *const f32,
    dw: *mut f32,
    d: usize,
) {
    let (l, nr) = (V::LANES, 2 * V::LANES);
    let (w0, w1) = (fw.min(l), fw.saturating_sub(l));
    // SAFETY: every access is inside the extents of the contract; partial loads and stores
    // touch only their first `w0` or `w1` lanes.
    unsafe {
        let mut acc = [[V::splat(0.0); 2]; MR];
        for r in 0..rows {
            let xr = x.add(r * ldx);
            // (Whole panels load without a test per row: a test's scalar operations would
            // take slots from the multiply-adds.)
            let (x0, x1) = if FULL {
                (V::load(xr), V::load(xr.add(l)))
            } else {
                (load_upto::<V>(xr, w0), if w1 > 0 { load_upto::<V>(xr.add(l), w1) } else { V::splat(0.0) })
            };
            for (j, a) in acc.iter_mut().enumerate() {
                let gv = V::splat(*g.add(j * nr + r));
                a[0] = gv.mul_add(x0, a[0]);
                a[1] = gv.mul_add(x1, a[1]);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let p = dw.add(j * d);
            let s0 = load_upto::<V>(p, w0).add(a[0]);
            if w0 == l {
                s0.store(p)
            } else {
                s0.store_partial(p, w0)
            }
            if w1 > 0 {
                let s1 = load_upto::<V>(p.add(l), w1).add(a[1]);
                if w1 == l { s1.store(p.add(l)) } else { s1.store_partial(p.add(l), w1) }
            }
        }
    }
}

/// [`weight_panel`] over two whole vectors of features (`fw = 2·LANES`).
///
/// # Safety
/// As [`weight_panel`].
#[inline(always)]
unsafe fn weight_panel_full<V: Vector, const MR: usize>(
    args: (*const f32, usize, usize, usize, *const f32, *mut f32, usize),
) {
    let (x, ldx, rows, fw, g, dw, d) = args;
    // SAFETY: forwarded from this function's contract.
    unsafe { weight_panel::<V, MR, true>(x, ldx, rows, fw, g, dw, d) }
}

/// [`weight_panel`] over the last, partial panel of features.
///
/// # Safety
/// As [`weight_panel`].
#[inline(always)]
unsafe fn weight_panel_part<V: Vector, const MR: usize>(
    args: (*const f32, usize, usize, usize, *const f32, *mut f32, usize),
) {
    let (x, ldx, rows, fw, g, dw, d) = args;
    // SAFETY: forwarded from this function's contract.
    unsafe { weight_panel::<V, MR, false>(x, ldx, rows, fw, g, dw, d) }
}

/// `w ≤ LANES` values from `p` (the other lanes zero).
///
/// # Safety
/// The instruction set of `V` is available; `p` is valid for `w` reads.
#[inline(always)]
unsafe fn load_upto<V: Vector>(p: *const f32, w: usize) -> V {
    // SAFETY: forwarded from this function's contract.
    unsafe { if w == V::LANES { V::load(p) } else { V::load_partial(p, w, 0.0) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (splitmix64) for uniform values in `[lo, hi)`.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
            (0..n).map(|_| lo + (hi - lo) * (self.next() >> 40) as f32 / (1u64 << 24) as f32).collect()
        }
    }

    /// Float64 reference: the loss sum, `scale · (P − Y)ᵀ X` and `scale · Σ (P − Y)`, and
    /// the sums of absolute terms of each gradient entry (for error bounds).
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        ldx: usize,
        n: usize,
        d: usize,
        y: &[i64],
        w: &[f32],
        b: &[f32],
        scale: f32,
    ) -> (f64, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let k = b.len();
        let (mut loss, mut dw, mut db, mut abs) = (0f64, vec![0f64; k * d], vec![0f64; k], vec![0f64; k * d]);
        // Per row: the target's logit minus the largest other one.
        let mut margins = vec![0f64; n];
        for r in 0..n {
            let xr = &x[r * ldx..r * ldx + d];
            let z: Vec<f64> =
                (0..k).map(|c| b[c] as f64 + (0..d).map(|f| xr[f] as f64 * w[c * d + f] as f64).sum::<f64>()).collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
            loss += m + s.ln() - z[y[r] as usize];
            let other = (0..k).filter(|&c| c as i64 != y[r]).map(|c| z[c]).fold(f64::NEG_INFINITY, f64::max);
            margins[r] = z[y[r] as usize] - other;
            for c in 0..k {
                let g = scale as f64 * ((z[c] - m).exp() / s - if c as i64 == y[r] { 1.0 } else { 0.0 });
                db[c] += g;
                for f in 0..d {
                    dw[c * d + f] += g * xr[f] as f64;
                    abs[c * d + f] += (g * xr[f] as f64).abs();
                }
            }
        }
        (loss, dw, db, abs, margins)
    }

    /// Runs every instruction set on one problem and checks each against float64.
    fn check(n: usize, d: usize, k: usize, ldx: usize, seed: u64) {
        let mut g = Gen(seed);
        let x = g.vec(n.saturating_sub(1) * ldx + d, -2.0, 2.0);
        let w = g.vec(k * d, -0.5, 0.5);
        let b = g.vec(k, -1.0, 1.0);
        let y: Vec<i64> = (0..n).map(|_| (g.next() % k as u64) as i64).collect();
        let scale = 1.0 / n.max(1) as f32;
        let xv = MatRef::with_stride(&x, n, d, ldx).unwrap();
        let (loss, dw, db, abs, margins) = reference(&x, ldx, n, d, &y, &w, &b, scale);
        // Rows whose target is the argmax beyond any doubt, and those that may be.
        let tol = 1e-4;
        let sure = margins.iter().filter(|&&m| m > tol).count();
        let maybe = margins.iter().filter(|&&m| m >= -tol).count();
        // The logits are f32 dot products of d terms, and dW's entries sums of n: their
        // roundings (≈ 2^-24 each) dominate.
        let rel = 1e-6 * (4.0 + (d + n) as f64 / 16.0);
        for isa in Isa::available() {
            let (mut gw, mut gb) = (vec![0f32; k * d], vec![0f32; k]);
            let packed = PackedWeights::new(isa, &w, k, d);
            let problem = Problem { x: xv, y: &y, w: &packed, b: &b, scale };
            let l = loss_grad(&problem, &mut gw, &mut gb);
            let what = format!("{isa:?} n={n} d={d} K={k} ldx={ldx}");
            // The forward half: the same loss, bit for bit, and the rows it ranks first.
            let sums = metrics(&problem);
            assert_eq!(sums.loss.to_bits(), l.to_bits(), "{what}: metrics' loss {} vs {l}", sums.loss);
            assert!(
                (sure..=maybe).contains(&sums.correct),
                "{what}: {} correct, not in {sure}..={maybe}",
                sums.correct
            );
            assert!((l - loss).abs() <= rel * (n as f64 + loss.abs()), "{what}: loss {l} vs {loss}");
            for i in 0..k * d {
                let err = (gw[i] as f64 - dw[i]).abs();
                assert!(err <= rel * abs[i] + 1e-9, "{what}: dW[{i}] = {} vs {}", gw[i], dw[i]);
            }
            for c in 0..k {
                assert!((gb[c] as f64 - db[c]).abs() <= rel + 1e-9, "{what}: db[{c}] = {} vs {}", gb[c], db[c]);
            }
            // The gradients are added to what the buffers hold.
            let (mut gw2, mut gb2) = (vec![0.5f32; k * d], vec![0.5f32; k]);
            let l2 = loss_grad(&problem, &mut gw2, &mut gb2);
            assert_eq!(l2, l, "{what}: the loss depends on the buffers");
            for (a, g) in gw2.iter().zip(&gw).chain(gb2.iter().zip(&gb)) {
                assert!((a - 0.5 - g).abs() <= 1e-6, "{what}: not accumulated: {a} vs 0.5 + {g}");
            }
        }
    }

    #[test]
    fn every_row_tail_matches_float64() {
        // Panels of 2, 8, 16 and 32 rows (one lane to AVX-512): every remainder.
        for n in 1..=70 {
            check(n, 19, 7, 19, n as u64);
        }
    }

    #[test]
    fn every_feature_tail_matches_float64() {
        for d in 1..=40 {
            check(33, d, 13, d + 3, 100 + d as u64);
        }
    }

    #[test]
    fn every_panel_split_of_the_classes_matches_float64() {
        // 1..=30 classes give panels of every size from 1 to 12 (and 6 for AVX2).
        for k in 1..=30 {
            check(37, 33, k, 33, 200 + k as u64);
        }
        check(300, 256, 100, 256, 7);
        check(65, 70, MAX_CLASSES, 70, 8);
    }

    #[test]
    fn ties_go_to_the_lower_class() {
        // Classes 1 and 3 have the same weights and bias, far above the others', so their
        // logits are equal and largest: the argmax is 1 (the lower id), never 3 or 0.
        let (n, d, k) = (40, 9, 5);
        let mut g = Gen(5);
        let x = g.vec(n * d, -1.0, 1.0);
        let mut w = g.vec(k * d, -0.1, 0.1);
        let row1 = w[d..2 * d].to_vec();
        w[3 * d..4 * d].copy_from_slice(&row1);
        let b = [0.0, 50.0, 0.0, 50.0, 0.0];
        let y: Vec<i64> = (0..n as i64).map(|i| [1, 3, 0][i as usize % 3]).collect();
        let want = y.iter().filter(|&&t| t == 1).count();
        assert!(want > 0 && want < n);
        for isa in Isa::available() {
            let packed = PackedWeights::new(isa, &w, k, d);
            let problem = Problem { x: MatRef::new(&x, n, d).unwrap(), y: &y, w: &packed, b: &b, scale: 1.0 };
            assert_eq!(metrics(&problem).correct, want, "{isa:?}");
        }
    }

    #[test]
    fn panels_cover_the_classes_evenly() {
        for mr in [MR, MR_NARROW] {
            for k in 1..=300 {
                let p = panels(k, mr);
                assert_eq!(p.len(), k.div_ceil(mr));
                let mut next = 0;
                for &(c0, size) in &p {
                    assert!(c0 == next && (1..=mr).contains(&size) && size + 1 >= p[0].1, "k={k} mr={mr}: {p:?}");
                    next += size;
                }
                assert_eq!(next, k);
            }
        }
    }
}
