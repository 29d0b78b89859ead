//! Fused cross-entropy of the layer, with its gradients, never holding the `n × V` logits.
//!
//! With `x = H·Wᵀ + b`, the optional softcap `z = s·tanh(x/s)` (else `z = x`), the
//! temperature `T`, `lse_i = logsumexp(z_i / T)` and `log p_ij = z_ij / T − lse_i`, row `i`
//! with target `y_i` (not `ignore_index`) contributes
//!
//! ```text
//! loss_i = (1 − ε)·w_y·(−log p_iy) + (ε / V)·Σ_j w_j·(−log p_ij)      PyTorch's cross_entropy
//! zl_i   = z_loss·lse_i²                                               the z-loss
//! ```
//!
//! with class weights `w` (all 1 without). `Mean` divides `Σ loss_i` by `Σ w_{y_i}` (the
//! count of non-ignored rows without weights) and `Σ zl_i` by that count; `Sum` adds;
//! `None` returns `loss_i + zl_i` per row (0 for ignored rows).
//!
//! **Difference from PyTorch:** when every row is ignored, `Mean` gives a loss of 0 and
//! zero gradients; PyTorch gives NaN. Likewise when the class weights of the kept rows'
//! targets sum to 0: the cross-entropy part is then 0 with no gradient (PyTorch: NaN), and
//! a z-loss, whose mean is over the kept rows, remains with its gradient.
//!
//! # The gradients
//!
//! `∂(loss_i + zl_i)/∂x_ij = [a_i·p_ij − b_i·w_j − c_i·(1−ε)·w_y·[j = y_i]]·g_ij`, where
//! `g_ij = (1 − (z_ij/s)²)/T` (or `1/T`), `a_i = c_i·((1−ε)·w_y + ε·Σw/V) + c'_i·2·z_loss·lse_i`,
//! `b_i = c_i·ε/V`, and `c_i`, `c'_i` are the upstream gradient over the reduction's
//! denominators. Then `dH = dX·W`, `dW = dXᵀ·H` (in `W`'s layout) and `db = Σ_i dX_i`.
//!
//! # The plan
//!
//! Rows are taken in blocks of `r` (so that `r × V` floats stay under 50 MiB, with `r` at
//! least 16), one after the other; within a block, work is spread over fixed segments of
//! classes:
//!
//! 1. each segment computes its logits into the block's buffer and their `(max, sum)`,
//!    target logit and weighted sum; these merge in class order into `lse` and the loss;
//! 2. each segment `G` turns its logits into `dX` in place, adds `dX[:, G]ᵀ·H[R]` into its
//!    own rows of `dW` (and `db`), and computes its part `dX[:, G]·W[G]` of `dH[R]` while
//!    `dX[:, G]` is still in cache;
//! 3. `dH[R]` is the sum of the segments' parts, added in segment order as they complete
//!    (segments are handed out in order, so few parts wait for an earlier one).
//!
//! Three matrix products in all (Liger's plan; recomputing the logits in a backward pass,
//! as Cut Cross-Entropy does, would cost a fourth). Every sum has a fixed order, so 1 and 2
//! threads give the same bits. Extra memory is the block buffer and the `dH` parts in
//! flight (`r × d` each, about one per thread), independent of `n`.
//!
//! The block buffer outlives the call: the next call (the next training step) takes it
//! back instead of having 50 MiB of fresh pages mapped, zeroed by the kernel and unmapped
//! again, which was 3% of the f32 loss at n = 2048, d = 768, V = 50257 (see
//! [`release_scratch`]). Calls running at once take one each; one is kept.
//!
//! In the bf16 precisions, `dH = G·W` needs W packed with K along the classes, unlike the
//! forward product's packing. The first gradient call on a layer makes that packing and the
//! layer keeps it (as large as the forward one: 77 MB at V = 50257, d = 768 in bf16, twice
//! that in bf16x3), so a layer reused for many calls packs W once, as for the forward.

use crate::bf16::{self, Output, PackedBf16Weights, PackedRows, Precision};
use crate::error::{Error, Result};
use crate::kernels::{CeGradCoef, Kernels, MaxSum};
use crate::layer::SoftmaxLayer;
use crate::linalg::{self, AlignedF32, Operand, SharedMut};
use crate::matrix::{MatRef, WeightLayout};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How per-row losses are combined, as in PyTorch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Weighted mean over the non-ignored rows.
    #[default]
    Mean,
    /// Sum over the rows.
    Sum,
    /// One loss per row.
    None,
}

impl Reduction {
    /// Parses `mean`, `sum` or `none`.
    pub fn parse(s: &str) -> Option<Reduction> {
        match s {
            "mean" => Some(Reduction::Mean),
            "sum" => Some(Reduction::Sum),
            "none" => Some(Reduction::None),
            _ => None,
        }
    }
}

/// Options of [`cross_entropy`], with PyTorch's defaults.
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropyOptions<'a> {
    /// Rows whose target equals this add nothing (default −100).
    pub ignore_index: i64,
    pub reduction: Reduction,
    /// ε in [0, 1] (default 0).
    pub label_smoothing: f32,
    /// Per-class weights `[V]`, finite and ≥ 0.
    pub class_weights: Option<&'a [f32]>,
    /// Coefficient of `lse²` per non-ignored row (default 0).
    pub z_loss: f32,
    /// Logit softcap `s > 0`: `x ← s·tanh(x/s)`, before the temperature.
    pub softcap: Option<f32>,
    /// Divides the (softcapped) logits; finite and > 0 (default 1).
    pub temperature: f32,
}

impl Default for CrossEntropyOptions<'_> {
    fn default() -> Self {
        CrossEntropyOptions {
            ignore_index: -100,
            reduction: Reduction::Mean,
            label_smoothing: 0.0,
            class_weights: None,
            z_loss: 0.0,
            softcap: None,
            temperature: 1.0,
        }
    }
}

/// The loss and each row's `lse`.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossEntropyOutput {
    /// One value for `Mean` and `Sum`, `n` for `None`.
    pub loss: Vec<f32>,
    /// `logsumexp(z_i / T)` per row, `[n]` (for ignored rows too).
    pub lse: Vec<f32>,
}

/// The upstream gradient `∂L/∂loss`.
#[derive(Clone, Copy, Debug)]
pub enum Upstream<'a> {
    /// For `Mean` and `Sum`; for `None`, the same value for every row.
    Scalar(f32),
    /// For `None`: one value per row, `[n]`.
    PerRow(&'a [f32]),
}

/// Gradient buffers supplied by the caller. They are **overwritten**, not accumulated into.
#[derive(Debug)]
pub struct GradientsMut<'g> {
    /// `dL/dH`, `[n, d]` (contiguous). `None` skips it, and with it one of the three matrix
    /// products: a classifier trained on fixed features needs only `dW` and `db`.
    pub hidden: Option<&'g mut [f32]>,
    /// `dL/dW`, in the layer's layout (`[V, d]` or `[d, V]`).
    pub weight: &'g mut [f32],
    /// `dL/db`, `[V]`; `None` when the layer has no bias.
    pub bias: Option<&'g mut [f32]>,
}

/// Owned gradients.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients {
    pub hidden: Vec<f32>,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

/// The loss of `softmax(layer(hidden))` against `targets` (`[n]`), without gradients.
pub fn cross_entropy(
    layer: &SoftmaxLayer<'_>,
    hidden: MatRef<'_>,
    targets: &[i64],
    opts: &CrossEntropyOptions<'_>,
) -> Result<CrossEntropyOutput> {
    run(layer, hidden, targets, opts, None, true)
}

/// The loss and its gradients with respect to `hidden`, the weight and the bias.
pub fn cross_entropy_with_grad(
    layer: &SoftmaxLayer<'_>,
    hidden: MatRef<'_>,
    targets: &[i64],
    opts: &CrossEntropyOptions<'_>,
    upstream: Upstream<'_>,
) -> Result<(CrossEntropyOutput, Gradients)> {
    let (n, d, v) = (hidden.rows(), layer.hidden_dim(), layer.vocab());
    let mut gh = vec![0f32; n * d];
    let mut gw = vec![0f32; v * d];
    let mut gb = layer.bias().map(|_| vec![0f32; v]);
    let out = cross_entropy_with_grad_into(
        layer,
        hidden,
        targets,
        opts,
        upstream,
        GradientsMut { hidden: Some(&mut gh), weight: &mut gw, bias: gb.as_deref_mut() },
    )?;
    Ok((out, Gradients { hidden: gh, weight: gw, bias: gb }))
}

/// [`cross_entropy_with_grad`] into caller buffers, which are overwritten (so a training
/// loop can reuse them). When it returns an error, their contents are unspecified: the
/// inputs are checked before anything is written, but a loss or gradient that overflows
/// `f32` is only found while the rows are computed.
pub fn cross_entropy_with_grad_into(
    layer: &SoftmaxLayer<'_>,
    hidden: MatRef<'_>,
    targets: &[i64],
    opts: &CrossEntropyOptions<'_>,
    upstream: Upstream<'_>,
    grads: GradientsMut<'_>,
) -> Result<CrossEntropyOutput> {
    run(layer, hidden, targets, opts, Some((upstream, grads)), true)
}

/// [`cross_entropy_with_grad_into`] for `hidden` whose values the caller has already
/// checked to be finite (a training loop checks its features once, not every step).
pub(crate) fn cross_entropy_with_grad_prechecked(
    layer: &SoftmaxLayer<'_>,
    hidden: MatRef<'_>,
    targets: &[i64],
    opts: &CrossEntropyOptions<'_>,
    upstream: Upstream<'_>,
    grads: GradientsMut<'_>,
) -> Result<CrossEntropyOutput> {
    run(layer, hidden, targets, opts, Some((upstream, grads)), false)
}

/// Validated, per-call constants.
struct Setup<'a> {
    t: f32,
    eps: f64,
    /// The class weights scaled by `2^k` so that the largest lies in `[1, 2)`: exact unless
    /// they span more than 2^149, and it keeps tiny weights' reciprocals and huge weights'
    /// sums within `f32`. The scale cancels under `Mean`; `Sum` and `None` multiply by it
    /// (`denom` is its reciprocal).
    weights: Option<std::borrow::Cow<'a, [f32]>>,
    /// Σ_j w_j (V without weights).
    w_sum: f64,
    inv_cap: f32,
    cap: Option<f32>,
    z_loss: f64,
    /// The reduction's denominators: of the loss (`Σ w_{y_i}` under `Mean`, else the
    /// reciprocal of the weights' scale), and of the z-loss (the kept rows' count under
    /// `Mean`, else 1).
    denom: f64,
    denom_z: f64,
}

fn check(
    layer: &SoftmaxLayer<'_>,
    hidden: MatRef<'_>,
    targets: &[i64],
    o: &CrossEntropyOptions<'_>,
    scan_hidden: bool,
) -> Result<()> {
    if scan_hidden {
        layer.check_inputs(hidden, o.temperature)?;
    } else {
        layer.check_shape(hidden, o.temperature)?;
    }
    let (n, v) = (hidden.rows(), layer.vocab());
    if targets.len() != n {
        return Err(Error::Shape(format!(
            "targets have length {}, expected n = {n} (one per row of hidden)",
            targets.len()
        )));
    }
    if let Some(i) = targets.iter().position(|&y| y != o.ignore_index && (y < 0 || y as u64 >= v as u64)) {
        return Err(Error::TargetOutOfRange { index: i, value: targets[i], vocab: v });
    }
    if !(0.0..=1.0).contains(&o.label_smoothing) {
        return Err(Error::InvalidArgument(format!("label_smoothing must be in [0, 1], got {}", o.label_smoothing)));
    }
    if let Some(w) = o.class_weights {
        if w.len() != v {
            return Err(Error::Shape(format!("class_weights have length {}, expected V = {v}", w.len())));
        }
        if let Some(j) = w.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(Error::InvalidArgument(format!("class_weights[{j}] = {} must be finite and >= 0", w[j])));
        }
    }
    if !(o.z_loss.is_finite() && o.z_loss >= 0.0) {
        return Err(Error::InvalidArgument(format!("z_loss must be finite and >= 0, got {}", o.z_loss)));
    }
    if let Some(s) = o.softcap
        && !(s.is_finite() && s > 0.0 && (1.0 / s).is_finite())
    {
        return Err(Error::InvalidArgument(format!(
            "softcap must be finite and > 0 (and at least 2.9e-39, so that 1/softcap is finite), got {s}"
        )));
    }
    Ok(())
}

fn setup<'a>(layer: &SoftmaxLayer<'_>, targets: &[i64], o: &CrossEntropyOptions<'a>) -> Setup<'a> {
    let v = layer.vocab();
    let (weights, scale) = match o.class_weights {
        Some(w) => {
            let max = w.iter().fold(0f32, |m, &x| m.max(x));
            // max = 2^e·(1 + f), from the bits of its f64 value (normal even when max is not).
            let e = ((max as f64).to_bits() >> 52 & 0x7ff) as i32 - 1023;
            if max == 0.0 || e == 0 {
                (Some(std::borrow::Cow::Borrowed(w)), 1.0)
            } else {
                let down = 2f64.powi(-e);
                (Some(std::borrow::Cow::Owned(w.iter().map(|&x| (x as f64 * down) as f32).collect())), 2f64.powi(e))
            }
        }
        None => (None, 1.0),
    };
    let w_of = |y: i64| weights.as_deref().map_or(1.0, |w| w[y as usize] as f64);
    let kept = targets.iter().filter(|&&y| y != o.ignore_index);
    let (denom, count) = kept.fold((0f64, 0f64), |(s, c), &y| (s + w_of(y), c + 1.0));
    let (denom, denom_z) = match o.reduction {
        Reduction::Mean => (denom, count),
        // (w = 2^e·w', so the loss is 2^e times that of the scaled weights.)
        _ => (1.0 / scale, 1.0),
    };
    Setup {
        t: o.temperature,
        eps: o.label_smoothing as f64,
        w_sum: weights.as_deref().map_or(v as f64, |w| w.iter().map(|&x| x as f64).sum()),
        weights,
        inv_cap: o.softcap.map_or(0.0, |s| 1.0 / s),
        cap: o.softcap,
        z_loss: o.z_loss as f64,
        denom,
        denom_z,
    }
}

/// What can make a loss of finite inputs overflow `f32`, among the options in use: "the
/// class weights, the z-loss or the logits' range (over the temperature)".
fn overflow_causes(s: &Setup<'_>) -> String {
    let logits = if s.t < 1.0 { "the logits' range (over the temperature)" } else { "the logits' range" };
    let options: Vec<&str> = [(s.weights.is_some(), "the class weights"), (s.z_loss > 0.0, "the z-loss")]
        .into_iter()
        .filter_map(|(used, what)| used.then_some(what))
        .collect();
    if options.is_empty() { logits.to_string() } else { format!("{} or {logits}", options.join(", ")) }
}

/// What one segment of classes knows about one row after phase 1.
#[derive(Clone, Copy, Debug)]
struct RowPart {
    stats: MaxSum,
    /// The target's (softcapped) logit, if the target is in this segment (else 0).
    zy: f32,
    /// Σ_j w_j·(z_j − wz_ref) over the segment, for label smoothing: against a reference
    /// among the logits (the first tile's maximum), so that an offset they all share
    /// cancels before the sum.
    wz: f64,
    wz_ref: Option<f32>,
}

impl RowPart {
    const EMPTY: RowPart = RowPart { stats: MaxSum::EMPTY, zy: 0.0, wz: 0.0, wz_ref: None };

    /// Adds `Σ w·(z − c)` (`weights`: `Σ w`) of the classes after this part's so far.
    fn add_wz(&mut self, wz: f64, c: f32, weights: f64) {
        match self.wz_ref {
            None => (self.wz, self.wz_ref) = (wz, Some(c)),
            Some(r) => self.wz += wz + weights * (c as f64 - r as f64),
        }
    }
}

/// The block buffer's budget: a block of rows holds its `r × V` logits in at most this
/// many bytes (at least 16 rows). 50 MiB leaves the rest of the 64 MiB heap budget to the
/// workers' buffers and the parts of `dH` in flight (57.9 MiB in all at n = 2048, d = 768,
/// V = 50257: 256 rows, segments of 1024 classes). Deeper blocks make `dW`'s reduction
/// deeper: 240 rows took 1.168–1.181 s against 1.185–1.220 s for 160 (32 MiB), three
/// alternated rounds. 256 rows, four blocks of the `gemm` crate's 64-row kernel, leave no
/// rows to its edge kernel in the logits' product (48 of 240 did, 5% of a profile):
/// 1.100–1.118 s against 1.139–1.171 s for 240 (48 MiB), four alternated pairs on Zen 5
/// (session 14).
const BLOCK_BYTES: usize = 50 << 20;

/// The block buffer kept between calls (see the module's notes on memory).
static BLOCK_BUFFER: std::sync::Mutex<Option<AlignedF32>> = std::sync::Mutex::new(None);
/// Whether a buffer going back to [`BLOCK_BUFFER`] is filled with NaN first (tests).
static POISON_KEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Frees the block buffer that the loss keeps between calls so that the next call need not
/// map it again: up to 50 MiB (100 MiB for bf16 and bf16x3 gradients, whose blocks are twice
/// as deep), or 16 rows of `V` floats for vocabularies above 819200. The next call allocates a
/// new one.
pub fn release_scratch() {
    // (A poisoned lock only means another call panicked while swapping an `Option`.)
    drop(BLOCK_BUFFER.lock().unwrap_or_else(|e| e.into_inner()).take());
}

/// Fills every buffer the loss keeps with NaN as it returns it, so that a test can tell
/// whether a later call reads values it did not write (it never should).
#[doc(hidden)]
pub fn set_poison_kept_scratch(on: bool) {
    POISON_KEPT.store(on, Ordering::Relaxed);
}

/// A block buffer of at least `len` values: the kept one (its values are whatever the last
/// call left; every value is written before it is read), else a new zeroed one. It goes
/// back to be kept when the guard drops.
fn take_block_buffer(len: usize) -> BlockBuffer {
    let kept = BLOCK_BUFFER.lock().unwrap_or_else(|e| e.into_inner()).take();
    let mut buf = kept.unwrap_or_default();
    buf.ensure(len);
    BlockBuffer(buf)
}

/// A block buffer on loan from [`BLOCK_BUFFER`].
struct BlockBuffer(AlignedF32);

impl Drop for BlockBuffer {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.0);
        if POISON_KEPT.load(Ordering::Relaxed) {
            buf.fill(f32::NAN);
        }
        // The one kept is the last returned (a concurrent call's, if any, is freed).
        *BLOCK_BUFFER.lock().unwrap_or_else(|e| e.into_inner()) = Some(buf);
    }
}

fn rows_per_block(v: usize) -> usize {
    ((BLOCK_BYTES / (4 * v.max(1))) / 16 * 16).clamp(16, 256)
}

fn run(
    layer: &SoftmaxLayer<'_>,
    hidden: MatRef<'_>,
    targets: &[i64],
    o: &CrossEntropyOptions<'_>,
    grad: Option<(Upstream<'_>, GradientsMut<'_>)>,
    scan_hidden: bool,
) -> Result<CrossEntropyOutput> {
    check(layer, hidden, targets, o, scan_hidden)?;
    let (n, d, v) = (hidden.rows(), layer.hidden_dim(), layer.vocab());
    let s = setup(layer, targets, o);
    let mut grad = match grad {
        Some((up, mut g)) => {
            if layer.weight().is_empty() {
                return Err(Error::InvalidArgument(
                    "the gradients need f32 weights; this layer holds bf16 weights only".into(),
                ));
            }
            if g.hidden.as_ref().is_some_and(|h| h.len() != n * d) || g.weight.len() != v * d {
                return Err(Error::Shape(format!(
                    "gradient buffers have {} and {} elements, expected n·d = {} and V·d = {}",
                    g.hidden.as_ref().map_or(n * d, |h| h.len()),
                    g.weight.len(),
                    n * d,
                    v * d
                )));
            }
            if g.bias.is_some() != layer.bias().is_some() || g.bias.as_ref().is_some_and(|b| b.len() != v) {
                return Err(Error::Shape(
                    "the bias gradient buffer must be [V] exactly when the layer has a bias".into(),
                ));
            }
            let up_row: Vec<f32> = match up {
                Upstream::Scalar(g) => vec![g; n],
                Upstream::PerRow(u) => {
                    if o.reduction != Reduction::None {
                        return Err(Error::InvalidArgument(
                            "a per-row upstream gradient needs reduction 'none'".into(),
                        ));
                    }
                    if u.len() != n {
                        return Err(Error::Shape(format!(
                            "upstream gradient has length {}, expected n = {n}",
                            u.len()
                        )));
                    }
                    u.to_vec()
                }
            };
            if let Some(i) = up_row.iter().position(|g| !g.is_finite()) {
                return Err(Error::NonFiniteEntry { tensor: "upstream gradient".into(), index: i, value: up_row[i] });
            }
            // dW is written over by the first block of rows and added to by the others (no
            // pass over its V·d values first); with no rows at all it is zero.
            if n == 0 {
                g.weight.fill(0.0);
            }
            if let Some(b) = g.bias.as_deref_mut() {
                b.fill(0.0);
            }
            Some((up_row, g))
        }
        None => None,
    };

    let k = layer.kernels();
    let col_tile = layer.tiling().col_tile;
    // About 64 segments (whole column tiles), so that the threads' shares of each phase
    // differ by little: at V = 50257, 50 segments of 1024 classes took 1.5–2% less time than
    // 25 of 2048 (f32 and bf16 loss, five alternated runs on 2 threads; 99 of 512 were no
    // faster than 50).
    let seg_len = v.div_ceil(64).div_ceil(col_tile).max(1) * col_tile;
    debug_assert!(seg_len >= col_tile);
    let segments: Vec<Range<usize>> = (0..v).step_by(seg_len).map(|a| a..(a + seg_len).min(v)).collect();
    // bf16 gradients: K of dW = Gᵀ·H is the block's rows, and every block of rows reads and
    // writes all of dW once, so they want deeper blocks: 2x the rows and the block buffer.
    // On AMX: 1.41 s against 1.68 s with 1x and 1.44 s with 4x (bf16 loss at n=2048, d=768,
    // V=50257, alternated in one process). With AVX512-BF16 on Zen 5, once its products went
    // straight into dW: 0.558–0.571 s against 0.585–0.590 s (bf16), 1.49–1.52 s against
    // 1.57 s (bf16x3), alternated runs.
    let r = if layer.precision() != Precision::F32 && grad.is_some() {
        (2 * rows_per_block(v)).min(512)
    } else {
        rows_per_block(v)
    };
    let r = r.min(n.max(1));
    // The block buffer, segment-major: segment `seg`'s logits (then dX) for the block's rows
    // are `r × |seg|` from `r·seg.start` on, row stride `|seg|`. Each task's part is one
    // slice apart from the others', and products see short rows (not V apart). Parts start
    // on 64-byte boundaries (seg.start is a multiple of the tile width), so that AMX updates
    // them in place.
    let mut zbuf = take_block_buffer(r * v);
    // Buffers for the segments' parts of dH (aligned likewise when d is a multiple of 16),
    // as many as are in flight at once: reused by every block of rows.
    let dh_pool = std::sync::Mutex::new(Vec::<AlignedF32>::new());
    let mut lse = vec![0f32; n];
    let mut loss_rows = vec![0f64; n];
    let mut zl_rows = vec![0f64; n];
    // Weights for the smoothing term's Σ w_j z_j (ones without class weights; only built
    // when smoothing is on).
    let ones;
    let wvec: &[f32] = match s.weights.as_deref() {
        Some(w) => w,
        None if s.eps > 0.0 => {
            ones = vec![1f32; v];
            &ones
        }
        None => &[],
    };
    // Prefix sums of those weights, for the weight of any range of classes (smoothing only).
    let w_prefix: Vec<f64> = if s.eps > 0.0 {
        std::iter::once(0.0)
            .chain(wvec.iter().scan(0f64, |acc, &w| {
                *acc += w as f64;
                Some(*acc)
            }))
            .collect()
    } else {
        Vec::new()
    };

    // bf16 gradients: W packed per segment for dH = G·W, once per layer (kept with it).
    let own_packing;
    let w_segs: &[PackedBf16Weights] = if grad.is_some() && layer.precision() != Precision::F32 {
        match layer.grad_packed(&segments, || pack_weight_segments(layer, &segments)) {
            Some(kept) => kept,
            None => {
                own_packing = pack_weight_segments(layer, &segments);
                &own_packing
            }
        }
    } else {
        &[]
    };
    // bf16: the block's rows packed for the logits, and for dW; reused from block to block.
    let (mut h_rows, mut h_grad) = (PackedRows::default(), None);
    let scratch = PerWorker::<Scratch>::new();
    for r0 in (0..n).step_by(r) {
        let rows = r0..(r0 + r).min(n);
        let m = rows.len();
        let h = hidden.sub_rows(rows.clone());
        let z = SharedMut(zbuf.0.as_mut_ptr());
        let y = &targets[rows.clone()];

        // bf16: H[R] packed once for every segment's product.
        let h_bf16 = (layer.precision() != Precision::F32).then(|| {
            h_rows.repack_rows(m, d, layer.precision(), |i| h.row(i));
            &h_rows
        });
        // Phase 1: logits into the block buffer, per-segment row parts.
        let parts: Vec<Vec<RowPart>> = segments
            .par_iter()
            .map(|seg| {
                let mut part = vec![RowPart::EMPTY; m];
                // Row i's logits over `cols`: softcap in place, then fold into its part.
                let fold = |p: &mut RowPart, row: &mut [f32], i: usize, cols: &Range<usize>| {
                    if let Some(cap) = s.cap {
                        k.softcap_in_place(row, cap);
                    }
                    let tile = k.max_sum(row, None, s.t);
                    p.stats = p.stats.merge(tile, s.t);
                    let yi = y[i];
                    if yi != o.ignore_index && cols.contains(&(yi as usize)) {
                        p.zy = row[yi as usize - cols.start];
                    }
                    if s.eps > 0.0 {
                        let wz = k.dot_shifted(row, &wvec[cols.clone()], tile.max) as f64;
                        p.add_wz(wz, tile.max, w_prefix[cols.end] - w_prefix[cols.start]);
                    }
                };
                // This segment's part of the block buffer: m rows of |seg| logits.
                // SAFETY: segments are disjoint, so this part is this task's alone; in bounds
                // (r·seg.start + m·|seg| ≤ r·V).
                let part_z = unsafe { std::slice::from_raw_parts_mut(z.ptr().add(r * seg.start), m * seg.len()) };
                if layer.precision() == Precision::F32 {
                    // In f32, one product of the `gemm` crate per segment (11% faster than the
                    // engine's tiles with 100 classes, no slower with 50257; alternated runs).
                    // Each tile's row statistics follow while it is in cache.
                    let (c, w) = (seg.len(), layer.weight());
                    let a_op = Operand { ptr: h.row(0).as_ptr(), rs: h.row_stride() as isize, cs: 1 };
                    // W[seg] as the product's right operand: element (p, j) is W[seg.start + j, p]
                    // ([V, d]) or W[p, seg.start + j] ([d, V]).
                    let b_op = match layer.layout() {
                        WeightLayout::VocabMajor => Operand { ptr: w[seg.start * d..].as_ptr(), rs: 1, cs: d as isize },
                        WeightLayout::HiddenMajor => Operand { ptr: w[seg.start..].as_ptr(), rs: v as isize, cs: 1 },
                    };
                    if layer.layout() == WeightLayout::VocabMajor && c > m {
                        // A row-major result makes the crate transpose the problem and pack
                        // W[seg] across its rows (a gather, 10% of the loss's time, redone for
                        // every block of rows). Computed column-major instead, the crate packs
                        // the block's rows (the smaller operand here) and reads W where it
                        // lies; this worker's buffer then goes into the part row by row, with
                        // the bias added.
                        let mut ws = scratch.get();
                        let cm = ws.cols.prefix_mut(m * c);
                        let c_op = Operand { ptr: cm.as_mut_ptr(), rs: 1, cs: m as isize };
                        // SAFETY: the buffer holds m·c values (column stride m), this task's
                        // alone while it holds its worker's scratch; H[R] is m × d; W[seg] is
                        // in bounds.
                        unsafe { linalg::gemm(m, c, d, c_op, false, a_op, b_op) };
                        linalg::transpose_into(cm, m, part_z, c, m, c, layer.bias().map(|b| &b[seg.clone()]));
                    } else {
                        // Straight into the part: with a bias the product adds to it; without,
                        // it writes over the part.
                        let add = layer.start_tile(part_z, seg.clone());
                        let c_op = Operand { ptr: part_z.as_mut_ptr(), rs: c as isize, cs: 1 };
                        // SAFETY: the part is m × |seg| with row stride |seg|; H[R] is m × d;
                        // W[seg] is in bounds for either layout.
                        unsafe { linalg::gemm(m, c, d, c_op, add, a_op, b_op) };
                    }
                } else {
                    // bf16: the tile product over the whole segment, written into the part.
                    let bf = h_bf16.expect("packed with the bf16 precision");
                    layer.bf16_logits(bf, seg.clone(), part_z);
                }
                // Row statistics a tile at a time, while it is in cache.
                for c0 in (seg.start..seg.end).step_by(col_tile) {
                    let cols = c0..(c0 + col_tile).min(seg.end);
                    for (i, p) in part.iter_mut().enumerate() {
                        fold(p, &mut part_z[i * seg.len() + cols.start - seg.start..][..cols.len()], i, &cols);
                    }
                }
                part
            })
            .collect();

        // Merge in class order; the loss of each row.
        let mut row_stats = Vec::with_capacity(m);
        for i in 0..m {
            let mut acc = RowPart::EMPTY;
            for (p, seg) in parts.iter().zip(&segments) {
                acc.stats = acc.stats.merge(p[i].stats, s.t);
                acc.zy += p[i].zy;
                if let Some(c) = p[i].wz_ref {
                    acc.add_wz(p[i].wz, c, w_prefix[seg.end] - w_prefix[seg.start]);
                }
            }
            if acc.stats.overflowed() || (y[i] != o.ignore_index && !acc.zy.is_finite()) {
                return Err(Error::LogitsOverflow { row: r0 + i });
            }
            let l = acc.stats.logsumexp(s.t);
            // An lse beyond f32 (finite logits divided by a small T) would make the loss and
            // the gradients inf and NaN.
            if !(l as f32).is_finite() {
                return Err(Error::LogitsOverflow { row: r0 + i });
            }
            lse[r0 + i] = l as f32;
            if y[i] != o.ignore_index {
                let t = s.t as f64;
                let wy = s.weights.as_deref().map_or(1.0, |w| w[y[i] as usize] as f64);
                // (M − z_y)/T + ln S, not lse − z_y/T: logits that share an offset far above
                // their spread (1e17) would lose ln S in the sum and cancel to 0.
                let nll = (acc.stats.max as f64 - acc.zy as f64) / t + acc.stats.sum.ln();
                // Σ_j w_j·(lse − z_j/T), from the logits against their reference.
                let (m, c) = (acc.stats.max as f64, acc.wz_ref.map_or(0.0, |c| c as f64));
                let smooth = (s.w_sum * (m - c) - acc.wz) / t + s.w_sum * acc.stats.sum.ln();
                loss_rows[r0 + i] = (1.0 - s.eps) * wy * nll + s.eps / v as f64 * smooth;
                zl_rows[r0 + i] = s.z_loss * l * l;
            }
            row_stats.push((acc.stats, acc.zy));
        }

        let Some((up, g)) = grad.as_mut() else { continue };
        let gw = SharedMut(g.weight.as_mut_ptr());
        let gb = g.bias.as_deref_mut().map(|b| SharedMut(b.as_mut_ptr()));
        // Per-row coefficients of dX.
        let coef: Vec<Option<(f32, f32, f32)>> = (0..m)
            .map(|i| {
                if y[i] == o.ignore_index {
                    return None;
                }
                // A zero denominator (under mean: no weight on any kept row's target) drops
                // that part of the loss, and so of the gradient; the z-loss keeps its own.
                let part = |den: f64| if den == 0.0 { 0.0 } else { up[r0 + i] as f64 / den };
                let (c, cz) = (part(s.denom), part(s.denom_z));
                if c == 0.0 && cz * s.z_loss == 0.0 {
                    return None;
                }
                let wy = s.weights.as_deref().map_or(1.0, |w| w[y[i] as usize] as f64);
                let l = lse[r0 + i] as f64;
                let a = c * ((1.0 - s.eps) * wy + s.eps * s.w_sum / v as f64) + cz * 2.0 * s.z_loss * l;
                let b = c * s.eps / v as f64;
                let target = c * (1.0 - s.eps) * wy;
                Some((a as f32, b as f32, target as f32))
            })
            .collect();
        if let Some(i) =
            coef.iter().position(|c| c.is_some_and(|(a, b, t)| !(a.is_finite() && b.is_finite() && t.is_finite())))
        {
            return Err(Error::InvalidArgument(format!(
                "the gradient of row {} overflows f32; lower {}",
                r0 + i,
                overflow_causes(&s)
            )));
        }

        // Phase 2, per segment G: dX[:, G] in place, db[G] += Σ_i dX_i, dW[G] += dX[:, G]ᵀ·H[R],
        // and this segment's part of dH[R]: dX[:, G]·W[G], while dX[:, G] is still in cache.
        // The parts are added into dH[R] in segment order as they complete (the first one
        // written): each element sums its parts in the same order whatever the thread count.
        // Segments are handed out in order, so only the parts that finish ahead of an
        // earlier one wait, a few at a time, instead of one per segment.
        let dh_sum = g
            .hidden
            .as_deref_mut()
            .map(|gh| OrderedSum::new(&mut gh[r0 * d..(r0 + m) * d], segments.len(), &dh_pool, k));
        let h_packed = (layer.precision() != Precision::F32).then(|| PackedHidden::repack(&mut h_grad, layer, h));
        let next_segment = AtomicUsize::new(0);
        let segment_grads = |gi: usize| {
            let seg = &segments[gi];
            // This segment's part of dH (m × d), in a buffer from the pool.
            let mut dh_part = dh_sum.as_ref().map(OrderedSum::buffer);
            let dh_ptr = dh_part.as_mut().map(|b| b.as_mut_ptr());
            // This segment's part of the block buffer (m rows of |seg|, row stride |seg|).
            let dx = z.ptr().wrapping_add(r * seg.start);
            for i in 0..m {
                // SAFETY: row i of this segment's part: this task's alone.
                let row = unsafe { std::slice::from_raw_parts_mut(dx.add(i * seg.len()), seg.len()) };
                match coef[i] {
                    None => row.fill(0.0),
                    Some((a, b, target)) => {
                        let (stats, zy) = row_stats[i];
                        let w = s.weights.as_deref().map(|w| &w[seg.clone()]);
                        k.ce_grad_in_place(row, w, s.t, stats, CeGradCoef { a, b, inv_cap: s.inv_cap });
                        let yi = y[i] as usize;
                        if seg.contains(&yi) {
                            let gy = if s.cap.is_some() { 1.0 - (zy * s.inv_cap).powi(2) } else { 1.0 };
                            row[yi - seg.start] -= target * gy / s.t;
                        }
                    }
                }
                if let Some(gb) = gb {
                    // SAFETY: db[seg] is this task's alone (segments are disjoint).
                    let db = unsafe { std::slice::from_raw_parts_mut(gb.ptr().add(seg.start), seg.len()) };
                    k.axpy(db, 1.0, row);
                }
            }
            if layer.precision() != Precision::F32 {
                // The gradient products in the forward's precision: G rounded (or split) to
                // bf16, like H and W, f32 accumulation.
                // SAFETY: as for the f32 products below: dW's part for `seg` and dH part `gi`
                // are this task's alone; dX[:, seg] was written by this task.
                unsafe {
                    bf16_grads(
                        layer,
                        m,
                        seg.clone(),
                        dx as *const f32,
                        gw.ptr(),
                        dh_ptr,
                        &w_segs[gi],
                        h_packed.expect("packed with the bf16 precision"),
                        &mut scratch.get(),
                        r0 == 0,
                    )
                };
            } else {
                // SAFETY: dW's rows (or columns) `seg` belong to this task alone; the block
                // buffer's columns `seg` were written by this task; H[R] is read-only.
                unsafe { weight_grad(layer, h, seg.clone(), dx as *const f32, gw.ptr(), r0 == 0) };
                if let Some(dh_ptr) = dh_ptr {
                    // dH part G (m x d) = dX[:, G] (m x |G|) · W[G] (|G| x d).
                    let c_op = Operand { ptr: dh_ptr, rs: d as isize, cs: 1 };
                    let a_op = Operand { ptr: dx, rs: seg.len() as isize, cs: 1 };
                    let w = layer.weight();
                    let b_op = match layer.layout() {
                        // W[j, p]: (k = j, n = p).
                        WeightLayout::VocabMajor => Operand { ptr: w[seg.start * d..].as_ptr(), rs: d as isize, cs: 1 },
                        // W[p, j]: (k = j, n = p).
                        WeightLayout::HiddenMajor => Operand { ptr: w[seg.start..].as_ptr(), rs: 1, cs: v as isize },
                    };
                    // SAFETY: this task's dH buffer holds m·d values; dX[:, G] and W[G] are
                    // in bounds for k = |G|.
                    unsafe { linalg::gemm(m, d, seg.len(), c_op, false, a_op, b_op) };
                }
            }
            if let (Some(sum), Some(part)) = (&dh_sum, dh_part) {
                sum.add(gi, part);
            }
        };
        // Every worker of the pool takes the next segment until none is left, at most two
        // per thread ahead of the next part of dH to add.
        let ahead = 2 * rayon::current_num_threads().max(1);
        rayon::broadcast(|_| {
            loop {
                let gi = next_segment.fetch_add(1, Ordering::Relaxed);
                if gi >= segments.len() {
                    break;
                }
                if let Some(sum) = &dh_sum {
                    sum.wait_for_room(gi, ahead);
                }
                segment_grads(gi);
            }
        });
    }

    let part = |x: f64, den: f64| if den == 0.0 { 0.0 } else { x / den };
    let loss = match o.reduction {
        Reduction::None => loss_rows.iter().zip(&zl_rows).map(|(&a, &b)| (part(a, s.denom) + b) as f32).collect(),
        _ => {
            // (Summed from +0, so that no row gives 0 rather than −0.)
            let sum = |x: &[f64]| x.iter().fold(0f64, |acc, &v| acc + v);
            vec![(part(sum(&loss_rows), s.denom) + part(sum(&zl_rows), s.denom_z)) as f32]
        }
    };
    // Finite inputs and options can still make the loss overflow f32 (class weights or a
    // z-loss near 3e38, a tiny temperature): an error, as a NaN or an infinity in the inputs is.
    if let Some(i) = loss.iter().position(|l| !l.is_finite()) {
        let at = if loss.len() > 1 { format!(" of row {i}") } else { String::new() };
        return Err(Error::InvalidArgument(format!(
            "the loss{at} overflows f32 ({}); lower {}",
            loss[i],
            overflow_causes(&s)
        )));
    }
    // So can the gradients' products and sums, with finite coefficients (an upstream
    // gradient of 3e38, weights near the f32 range): checked once they are complete.
    if let Some((_, g)) = &grad {
        let (wr, wc) = match layer.layout() {
            WeightLayout::VocabMajor => (v, d),
            WeightLayout::HiddenMajor => (d, v),
        };
        let bad = match &g.hidden {
            Some(gh) => {
                MatRef::new(gh, n, d)?.find_non_finite().map(|(i, j, x)| format!("grad_hidden[{i}, {j}] is {x}"))
            }
            None => None,
        }
        .or_else(|| {
            MatRef::new(g.weight, wr, wc)
                .ok()?
                .find_non_finite()
                .map(|(i, j, x)| format!("grad_weight[{i}, {j}] is {x}"))
        })
        .or_else(|| {
            let gb = g.bias.as_deref()?;
            gb.iter().position(|x| !x.is_finite()).map(|j| format!("grad_bias[{j}] is {}", gb[j]))
        });
        if let Some(what) = bad {
            return Err(Error::InvalidArgument(format!(
                "the gradient overflows f32 ({what}); lower the upstream gradient, or the scale of the weights \
                 and hidden states"
            )));
        }
    }
    Ok(CrossEntropyOutput { loss, lse })
}

/// `out = Σ_g part_g` over `parts` parts that arrive in any order, added in the order of `g`
/// (the first copied, the others added one by one, as `axpy` does): the sum's bits do not
/// depend on the order of arrival. A part that arrives before all earlier ones waits in
/// its buffer; each buffer goes back to the pool once added.
struct OrderedSum<'a> {
    state: std::sync::Mutex<SumState<'a>>,
    /// Signalled whenever `next` moves.
    moved: std::sync::Condvar,
    /// `out`'s length, the length of every part.
    len: usize,
    /// Buffers for parts, kept across calls' blocks of rows.
    pool: &'a std::sync::Mutex<Vec<AlignedF32>>,
    k: &'a Kernels,
}

struct SumState<'a> {
    out: &'a mut [f32],
    /// The next part to add.
    next: usize,
    /// Parts that arrived ahead of `next`.
    waiting: Vec<Option<AlignedF32>>,
}

impl<'a> OrderedSum<'a> {
    fn new(out: &'a mut [f32], parts: usize, pool: &'a std::sync::Mutex<Vec<AlignedF32>>, k: &'a Kernels) -> Self {
        let (len, waiting) = (out.len(), (0..parts).map(|_| None).collect());
        OrderedSum {
            state: std::sync::Mutex::new(SumState { out, next: 0, waiting }),
            moved: std::sync::Condvar::new(),
            len,
            pool,
            k,
        }
    }

    /// A buffer for a part, from the pool (or new), holding at least `out.len()` values.
    fn buffer(&self) -> AlignedF32 {
        let mut b = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        b.ensure(self.len);
        b
    }

    /// Blocks until part `g` is fewer than `ahead` parts past the next one to add, so that
    /// at most `ahead` parts are computed or waiting at once, however the threads are
    /// scheduled. The part being waited for was handed out before `g` to a worker that is
    /// not waiting here (it is within `ahead` of itself), so it completes.
    fn wait_for_room(&self, g: usize, ahead: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while g >= st.next + ahead {
            st = self.moved.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Part `g` (its first `out.len()` values): added now if every earlier part has been,
    /// else kept until they have; each buffer added goes back to the pool.
    fn add(&self, g: usize, part: AlignedF32) {
        let len = self.len;
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        st.waiting[g] = Some(part);
        while let Some(b) = st.waiting.get_mut(st.next).and_then(Option::take) {
            if st.next == 0 {
                st.out.copy_from_slice(&b[..len]);
            } else {
                self.k.axpy(st.out, 1.0, &b[..len]);
            }
            st.next += 1;
            self.pool.lock().unwrap_or_else(|e| e.into_inner()).push(b);
            self.moved.notify_all();
        }
    }
}

/// A worker's buffers, kept for the whole call and reused by every segment and block of
/// rows it takes (rather than allocated, zeroed and freed per task).
#[derive(Default)]
struct Scratch {
    /// f32: a segment's logits computed column-major, before they go into the block buffer.
    cols: AlignedF32,
    /// bf16: a chunk of `dW`'s product before it goes into `dW`, on AMX or with `[d, V]`
    /// weights (the other paths add `[V, d]` chunks in place).
    part: AlignedF32,
    /// bf16: `Gᵀ` or `G` packed for a product.
    packed: PackedRows,
    /// bf16, `[d, V]` weights: `G` packed as the right operand of `dW = Hᵀ·G`.
    g_right: Option<PackedBf16Weights>,
}

/// One value per worker of the current `rayon` pool, held for a call: a task takes its
/// worker's. Never contended, as long as a task holding one starts no parallel work (which
/// could run another task of the same worker inside it).
struct PerWorker<T>(Vec<std::sync::Mutex<T>>);

impl<T: Default> PerWorker<T> {
    fn new() -> Self {
        PerWorker((0..rayon::current_num_threads().max(1)).map(|_| Default::default()).collect())
    }
    fn get(&self) -> std::sync::MutexGuard<'_, T> {
        let slot = rayon::current_thread_index().unwrap_or(0) % self.0.len();
        self.0[slot].lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Rows of the left operand per bf16 gradient product of `dW` (a multiple of 32).
const GRAD_CHUNK: usize = 256;

/// The part of L2 that a bf16 product of `dH` may fill: a chunk of `G`'s rows, packed, and
/// the pair of `W[seg]` blocks in use with the next one, prefetched.
const DH_L2_BYTES: usize = 1536 << 10;

/// Rows of `G` per bf16 product of `dH = G·W[seg]` over `c` classes: as many as keep their
/// packing in L2 beside two pairs of `W[seg]` blocks (a multiple of 32, at least 32), so
/// that each pair, read from beyond L2, serves every row pair of the chunk. At 1024
/// classes (the segments at V = 50257): 704 rows in bf16 (a whole block of 512 rows), 320
/// in bf16x3 (two parts each side).
/// `cargo run --release --example bench_bf16 -- 7 dh_chunks` times this product against
/// chunks of 128 rows.
#[doc(hidden)]
pub fn dh_chunk_rows(c: usize, precision: Precision) -> usize {
    let per_row = 2 * precision.parts() * c.max(1);
    let w_pairs = 2 * (2 * 16 * per_row);
    (DH_L2_BYTES.saturating_sub(w_pairs) / per_row / 32 * 32).max(32)
}

/// `H[R]` packed once per block of rows for the bf16 weight gradient: the right operand of
/// `dW = Gᵀ·H` (`[V, d]` weights) or the left one of `dW = Hᵀ·G` (`[d, V]`).
enum PackedHidden {
    Right(PackedBf16Weights),
    Left(PackedRows),
}

impl PackedHidden {
    /// Packs `h` into `slot`, reusing the packing already there (the previous block's).
    fn repack<'s>(slot: &'s mut Option<PackedHidden>, layer: &SoftmaxLayer<'_>, h: MatRef<'_>) -> &'s PackedHidden {
        let (m, d, p) = (h.rows(), layer.hidden_dim(), layer.precision());
        match (layer.layout(), slot.as_mut()) {
            // N = d units, K = m rows: element (unit q, row i) = H[i, q].
            (WeightLayout::VocabMajor, Some(PackedHidden::Right(w))) => w.repack_rows(d, m, p, |i| h.row(i)),
            (WeightLayout::VocabMajor, _) => {
                *slot = Some(PackedHidden::Right(PackedBf16Weights::from_rows(d, m, p, |i| h.row(i))))
            }
            // Hᵀ: d rows, K = m: element (q, i) = H[i, q].
            (WeightLayout::HiddenMajor, Some(PackedHidden::Left(r))) => r.repack_transposed(d, m, p, |i| h.row(i)),
            (WeightLayout::HiddenMajor, _) => {
                *slot = Some(PackedHidden::Left(PackedRows::from_rows_transposed(d, m, p, |i| h.row(i))))
            }
        }
        slot.as_ref().expect("packed just above")
    }
}

/// `W[seg]` packed per segment for `dH = G·W`: N = d units, K = |seg| classes.
fn pack_weight_segments(layer: &SoftmaxLayer<'_>, segments: &[Range<usize>]) -> Vec<PackedBf16Weights> {
    let (d, v, w) = (layer.hidden_dim(), layer.vocab(), layer.weight());
    segments
        .par_iter()
        .map(|seg| match layer.layout() {
            // Element (unit q, class j) = W[seg.start + j, q]: row j of W[seg].
            WeightLayout::VocabMajor => {
                PackedBf16Weights::from_rows(d, seg.len(), layer.precision(), |j| &w[(seg.start + j) * d..][..d])
            }
            WeightLayout::HiddenMajor => {
                PackedBf16Weights::from_fn(d, seg.len(), layer.precision(), |q, j| w[q * v + seg.start + j])
            }
        })
        .collect()
}

/// The bf16 (or bf16x3) gradient products for the classes `cols` of one block of rows:
/// `dW[cols] += dX[:, cols]ᵀ · H` (or `dW[:, cols] += Hᵀ · dX[:, cols]` for `[d, V]`; `=`
/// for the `first` block of rows), and `dH_part = dX[:, cols] · W[cols]` (overwritten;
/// skipped when `dh` is `None`), every operand rounded or split to bf16, `W[cols]` and `H`
/// packed by the caller.
///
/// # Safety
/// `dx` holds `G[:, cols]`: `m` rows of `|cols|` values, row stride `|cols|`; `gw` is the
/// `V·d` gradient buffer,
/// whose part for `cols` no other thread touches; `dh`, if given, is an `m × d` buffer that
/// no other thread touches.
#[allow(clippy::too_many_arguments)]
unsafe fn bf16_grads(
    layer: &SoftmaxLayer<'_>,
    m: usize,
    cols: Range<usize>,
    dx: *const f32,
    gw: *mut f32,
    dh: Option<*mut f32>,
    w_seg: &PackedBf16Weights,
    hp: &PackedHidden,
    scratch: &mut Scratch,
    first: bool,
) {
    let (c, d, v) = (cols.len(), layer.hidden_dim(), layer.vocab());
    let (path, precision) = (layer.bf16_path(), layer.precision());
    // Row i < m of G: the block buffer's classes `cols` (this task's columns).
    // SAFETY: in bounds per the contract; no other thread writes these columns.
    let g_row = |i: usize| unsafe { std::slice::from_raw_parts(dx.add(i * c), c) };
    match hp {
        PackedHidden::Right(hb) => {
            // dW[cols] (c x d) += Gᵀ (c x m, K = m) · H, GRAD_CHUNK classes at a time so that
            // the packed Gᵀ stays in L2 while H streams past it.
            // SAFETY: rows `cols` of dW ([V, d]): c·d elements from cols.start·d, ours alone.
            let out = unsafe { std::slice::from_raw_parts_mut(gw.add(cols.start * d), c * d) };
            for j0 in (0..c).step_by(GRAD_CHUNK) {
                let cj = GRAD_CHUNK.min(c - j0);
                scratch.packed.repack_transposed(cj, m, precision, |i| &g_row(i)[j0..j0 + cj]);
                let Scratch { part, packed, .. } = scratch;
                let dst = &mut out[j0 * d..(j0 + cj) * d];
                if !path.adds_whole_products() {
                    // (AMX.) A product added in place would sum in another order than one
                    // onto zeros. The chunk goes to an aligned buffer, written over, then is
                    // added to dW: the same bits as in the first block, and wherever dW lies.
                    let part = part.prefix_mut(cj * d);
                    bf16::tile_product(path, packed, hb, 0..d, part, d, Output::Overwrite);
                    if first {
                        dst.copy_from_slice(part);
                    } else {
                        layer.kernels().axpy(dst, 1.0, part);
                    }
                } else {
                    // The product, then one addition: the chunk goes straight into dW.
                    let output = if first { Output::Overwrite } else { Output::Add };
                    bf16::tile_product(path, packed, hb, 0..d, dst, d, output);
                }
            }
        }
        PackedHidden::Left(ha) => {
            // dW[:, cols] (d x c) += Hᵀ · G (N = c classes, K = m). It interleaves with other
            // tasks' columns: computed apart, then added.
            let Scratch { part, g_right, .. } = scratch;
            let gb = match g_right {
                Some(p) => {
                    p.repack_rows(c, m, precision, g_row);
                    p
                }
                None => g_right.insert(PackedBf16Weights::from_rows(c, m, precision, g_row)),
            };
            let part = part.prefix_mut(d * c);
            bf16::tile_product(path, ha, gb, 0..c, part, c, Output::Overwrite);
            for (q, row) in part.chunks_exact(c).enumerate() {
                // SAFETY: dW[q, cols] ([d, V]): the columns `cols` of row q, ours alone.
                let dst = unsafe { std::slice::from_raw_parts_mut(gw.add(q * v + cols.start), c) };
                if first {
                    dst.copy_from_slice(row);
                } else {
                    layer.kernels().axpy(dst, 1.0, row);
                }
            }
        }
    }
    // dH part (m x d) = G (m x c, K = c) · W[cols], in chunks of rows sized to L2 (K is
    // deep here; see `dh_chunk_rows`).
    let Some(dh) = dh else { return };
    // SAFETY: the m × d part, this task's alone.
    let out = unsafe { std::slice::from_raw_parts_mut(dh, m * d) };
    let rows = dh_chunk_rows(c, precision);
    let ga = &mut scratch.packed;
    for i0 in (0..m).step_by(rows) {
        let mi = rows.min(m - i0);
        ga.repack_rows(mi, c, precision, |i| g_row(i0 + i));
        // Each row chunk is written once, over all of d: no need to zero `out` first.
        bf16::tile_product(path, ga, w_seg, 0..d, &mut out[i0 * d..(i0 + mi) * d], d, Output::Overwrite);
    }
}

/// `dW[cols] += dX[:, cols]ᵀ · H` (or, in the `[d, V]` layout, `dW[:, cols] += Hᵀ · dX`);
/// `=` instead of `+=` for the `first` block of rows.
///
/// # Safety
/// `dx` holds `G[:, cols]`: `h.rows()` rows of `|cols|` values, row stride `|cols|`; `gw` is
/// the `V·d` gradient buffer, whose part for `cols` no other thread touches.
unsafe fn weight_grad(
    layer: &SoftmaxLayer<'_>,
    h: MatRef<'_>,
    cols: Range<usize>,
    dx: *const f32,
    gw: *mut f32,
    first: bool,
) {
    let (m, c, d, v) = (h.rows(), cols.len(), layer.hidden_dim(), layer.vocab());
    let hs = h.row_stride() as isize;
    let hp = h.row(0).as_ptr();
    // SAFETY (both arms): all operands in bounds per the contract and the shapes.
    match layer.layout() {
        WeightLayout::VocabMajor => {
            // dW[cols] (c x d) += dXᵀ (c x m) · H (m x d).
            let c_op = Operand { ptr: gw.wrapping_add(cols.start * d), rs: d as isize, cs: 1 };
            let a_op = Operand { ptr: dx, rs: 1, cs: c as isize };
            let b_op = Operand { ptr: hp, rs: hs, cs: 1 };
            unsafe { linalg::gemm(c, d, m, c_op, !first, a_op, b_op) }
        }
        WeightLayout::HiddenMajor => {
            // dW[:, cols] (d x c) += Hᵀ (d x m) · dX (m x c).
            let c_op = Operand { ptr: gw.wrapping_add(cols.start), rs: v as isize, cs: 1 };
            let a_op = Operand { ptr: hp, rs: 1, cs: hs };
            let b_op = Operand { ptr: dx, rs: c as isize, cs: 1 };
            // SAFETY: as above, for the [d, V] layout.
            unsafe { linalg::gemm(d, c, m, c_op, !first, a_op, b_op) }
        }
    }
}
