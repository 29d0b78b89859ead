//! The parameterized softmax layer `P = softmax((H·Wᵀ + b) / T)` and its forward operations.
//!
//! `hidden: [n, d]`, `weight: [V, d]` ([`WeightLayout::VocabMajor`], as PyTorch and
//! Hugging Face store it) or `[d, V]` ([`WeightLayout::HiddenMajor`]), `bias: [V]`.
//!
//! Every operation runs through the tiled [`crate::engine`]. Those that reduce over
//! the classes — [`SoftmaxLayer::logsumexp`], [`SoftmaxLayer::target_log_probs`],
//! [`SoftmaxLayer::argmax`], [`SoftmaxLayer::top_k`] — never hold the `n × V` logits: their
//! extra memory is a few tiles per thread.
//!
//! Logits are `f32` dot products (the matrix product accumulates in `f32`); everything
//! after them is exact to `f32` rounding (see [`crate::rows`]).

use crate::bf16::{self, BfPath, PackedBf16Weights, PackedRows, Precision};
use crate::engine::{self, Consumer, LogitSource, Tiling};
use crate::error::{Error, Result};
use crate::kernels::{Kernels, MaxSum};
use crate::linalg::{self, Operand};
use crate::matrix::{MatMut, MatRef, WeightLayout};
use crate::tile_gemm;
use rayon::prelude::*;
use std::borrow::Cow;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

/// Rows per tile below which the product is computed as dot products over the weight
/// rows (memory-bound decoding) instead of by the blocked matrix product.
const GEMV_MAX_ROWS: usize = 4;

/// A softmax output layer with `f32` weights, owned or borrowed (for example from a
/// memory-mapped file).
///
/// ```
/// use softmax_layer::{MatRef, SoftmaxLayer, WeightLayout, LayerOptions};
/// // V = 3 classes, d = 2; W as PyTorch stores it, [V, d].
/// let w = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
/// let b = [0.0f32, 0.0, -1.0];
/// let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 3, 2, Some(&b[..]))?;
/// let h = [2.0f32, 1.0];
/// let mut lse = [0f32];
/// layer.logsumexp(MatRef::new(&h, 1, 2)?, &mut lse, &LayerOptions::default())?;
/// // logits = [2, 1, 2]
/// let want = (2f64.exp() + 1f64.exp() + 2f64.exp()).ln();
/// assert!((lse[0] as f64 - want).abs() < 1e-6);
/// # Ok::<(), softmax_layer::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct SoftmaxLayer<'a> {
    weight: Cow<'a, [f32]>,
    bias: Option<Cow<'a, [f32]>>,
    layout: WeightLayout,
    vocab: usize,
    hidden: usize,
    kernels: &'static Kernels,
    tiling: Tiling,
    precision: Precision,
    /// W packed for the bf16 products (`None` in `f32` precision); shared by clones.
    packed: Option<Arc<PackedBf16Weights>>,
    bf_path: BfPath,
    /// Whether `bf_path` was asked for ([`SoftmaxLayer::with_bf16_path`]) rather than chosen.
    bf_path_forced: bool,
    /// W packed a second way for the bf16 gradient `dH = G·W` (K along the classes), per
    /// segment of classes: made by the first gradient call, kept for the later ones; shared
    /// by clones.
    grad_packed: Arc<OnceLock<GradPacked>>,
}

/// The segments of classes and `W[seg]` packed for `dH = G·W`, one per segment.
#[derive(Debug)]
pub(crate) struct GradPacked {
    pub segments: Vec<Range<usize>>,
    pub weights: Vec<PackedBf16Weights>,
}

/// Options of the forward operations.
#[derive(Clone, Copy, Debug)]
pub struct LayerOptions {
    /// Divides the logits before the softmax; finite and `> 0`. Default 1.
    /// [`SoftmaxLayer::logits`] ignores it.
    pub temperature: f32,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions { temperature: 1.0 }
    }
}

/// The `k` most probable classes of each row.
#[derive(Clone, Debug, PartialEq)]
pub struct TopK {
    /// `k` per row.
    pub k: usize,
    /// Log-probabilities, `[n, k]`, each row in descending order.
    pub log_probs: Vec<f32>,
    /// Class ids, `[n, k]`; ties are broken by the lower id.
    pub indices: Vec<usize>,
}

impl<'a> SoftmaxLayer<'a> {
    /// A layer over `weight` (laid out as `layout`, `V = vocab` classes, hidden size
    /// `hidden`) and an optional `bias` of length `V`. Borrowed slices are not copied.
    ///
    /// Errors on lengths that do not match the shape, and on NaN or infinity in the weight
    /// or the bias (named with their row and column).
    pub fn new(
        weight: impl Into<Cow<'a, [f32]>>,
        layout: WeightLayout,
        vocab: usize,
        hidden: usize,
        bias: Option<impl Into<Cow<'a, [f32]>>>,
    ) -> Result<Self> {
        let weight = weight.into();
        let bias = bias.map(Into::into);
        if vocab == 0 || hidden == 0 {
            return Err(Error::Shape(format!(
                "a layer needs V > 0 classes and d > 0 hidden units, got V = {vocab}, d = {hidden}"
            )));
        }
        let [r, c] = layout.shape(vocab, hidden);
        let Some(len) = r.checked_mul(c) else {
            return Err(Error::Shape(format!("weight [{r}, {c}] (V = {vocab}, d = {hidden}) is too large to address")));
        };
        if weight.len() != len {
            return Err(Error::Shape(format!(
                "weight has {} elements, expected [{r}, {c}] = {len} for V = {vocab}, d = {hidden}",
                weight.len()
            )));
        }
        if let Some((i, j, v)) = MatRef::new(&weight, r, c)?.find_non_finite() {
            return Err(Error::NonFinite { tensor: "weight".into(), row: i, col: j, value: v });
        }
        if let Some(b) = &bias {
            check_bias(b, vocab)?;
        }
        Ok(SoftmaxLayer {
            weight,
            bias,
            layout,
            vocab,
            hidden,
            kernels: Kernels::best(),
            tiling: Tiling::default(),
            precision: Precision::F32,
            packed: None,
            bf_path: BfPath::best(),
            bf_path_forced: bf16::env_path().is_some(),
            grad_packed: Arc::default(),
        })
    }

    /// A layer over weights that are already bf16 and packed ([`PackedBf16Weights::from_bf16_bits`]),
    /// computing in [`Precision::Bf16`] without ever holding `f32` weights: half the memory
    /// of an `f32` layer. [`SoftmaxLayer::weight`] is empty for such a layer, and the loss's
    /// gradients (which need `f32` weights) return an error.
    ///
    /// Errors on a bias whose length is not `V`, and on NaN or infinity in the weight or bias.
    pub fn from_packed_bf16(packed: PackedBf16Weights, bias: Option<impl Into<Cow<'a, [f32]>>>) -> Result<Self> {
        if packed.precision() != Precision::Bf16 {
            return Err(Error::InvalidArgument(format!(
                "bf16 weights must be packed for precision bf16, got {}",
                packed.precision()
            )));
        }
        if let Some((i, j, v)) = packed.find_non_finite() {
            return Err(Error::NonFinite { tensor: "weight".into(), row: i, col: j, value: v });
        }
        let (vocab, hidden) = (packed.vocab(), packed.hidden_dim());
        let bias = bias.map(Into::into);
        if let Some(b) = &bias {
            check_bias(b, vocab)?;
        }
        Ok(SoftmaxLayer {
            weight: Cow::Owned(Vec::new()),
            bias,
            layout: WeightLayout::VocabMajor,
            vocab,
            hidden,
            kernels: Kernels::best(),
            tiling: Tiling::default(),
            precision: Precision::Bf16,
            packed: Some(Arc::new(packed)),
            bf_path: BfPath::best(),
            bf_path_forced: bf16::env_path().is_some(),
            grad_packed: Arc::default(),
        })
    }

    /// The same layer computing its logits in `precision`. For `bf16` and `bf16x3` the
    /// weight is packed here, once (every later call reuses the packing); `f32` drops it.
    ///
    /// Errors if the layer holds only bf16 weights ([`SoftmaxLayer::from_packed_bf16`]) and
    /// `precision` is not `bf16`.
    pub fn with_precision(mut self, precision: Precision) -> Result<Self> {
        if precision == self.precision {
            return Ok(self);
        }
        if self.weight.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "this layer holds bf16 weights only; it computes in bf16, not {precision}"
            )));
        }
        self.grad_packed = Arc::default();
        self.packed = match precision {
            Precision::F32 => None,
            p => {
                let packed = PackedBf16Weights::from_f32(&self.weight, self.layout, self.vocab, self.hidden, p)?;
                // A finite f32 weight beyond bf16's range rounds to infinity.
                if let Some((class, k, value)) = packed.find_non_finite() {
                    let [r, c] = if self.layout == WeightLayout::VocabMajor { [class, k] } else { [k, class] };
                    let x = self.weight[r * self.layout.shape(self.vocab, self.hidden)[1] + c];
                    return Err(Error::InvalidArgument(format!(
                        "weight[{r}, {c}] = {x:e} rounds to {value} in {p}: beyond the bf16 range (about ±3.39e38)"
                    )));
                }
                Some(Arc::new(packed))
            }
        };
        self.precision = precision;
        Ok(self)
    }

    /// The same layer running its bf16 products on `path` (by default [`BfPath::best`]).
    /// Errors if this CPU or OS does not run the path.
    pub fn with_bf16_path(mut self, path: BfPath) -> Result<Self> {
        self.bf_path = path.check()?;
        self.bf_path_forced = true;
        Ok(self)
    }

    /// The precision of the logits' product.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The code that runs the bf16 products. When it was chosen automatically (not by
    /// [`SoftmaxLayer::with_bf16_path`] or [`crate::bf16::PATH_ENV`]) and is AMX, tiles of
    /// at most 4 rows (decoding) run on AVX512-BF16 where the CPU has it: faster there.
    pub fn bf16_path(&self) -> BfPath {
        self.bf_path
    }

    /// `W[class, k]` as the product sees it: in `bf16x3` the sum `hi + lo`.
    fn weight_parts(&self, class: usize, k: usize) -> (f32, f32) {
        match &self.packed {
            Some(p) => p.parts_at(class, k),
            None => (
                match self.layout {
                    WeightLayout::VocabMajor => self.weight[class * self.hidden + k],
                    WeightLayout::HiddenMajor => self.weight[k * self.vocab + class],
                },
                0.0,
            ),
        }
    }

    /// Number of classes `V`.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// Hidden size `d`.
    pub fn hidden_dim(&self) -> usize {
        self.hidden
    }
    /// The weight's layout.
    pub fn layout(&self) -> WeightLayout {
        self.layout
    }
    /// The weight, in its layout; empty for a layer built from bf16 weights
    /// ([`SoftmaxLayer::from_packed_bf16`]).
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }
    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
    /// Overrides the engine's tiling (for tuning; results depend on it only through the
    /// summation order of the dot products). Zeros and a segment that is not a whole number
    /// of tiles are made usable ([`Tiling::normalized`]).
    pub fn with_tiling(mut self, tiling: Tiling) -> Self {
        self.tiling = tiling.normalized();
        self.grad_packed = Arc::default();
        self
    }

    /// `W[seg]` packed for the bf16 gradient `dH = G·W` over `segments`: by `pack` on the
    /// first call, then kept with the layer, so that a layer reused for many gradient calls
    /// packs W once. `None` for other segments than the kept ones (the caller packs them).
    pub(crate) fn grad_packed(
        &self,
        segments: &[Range<usize>],
        pack: impl FnOnce() -> Vec<PackedBf16Weights>,
    ) -> Option<&[PackedBf16Weights]> {
        let kept = self.grad_packed.get_or_init(|| GradPacked { segments: segments.to_vec(), weights: pack() });
        (kept.segments == segments).then_some(&kept.weights[..])
    }

    fn check(&self, hidden: MatRef<'_>, opts: &LayerOptions) -> Result<()> {
        self.check_shape(hidden, opts.temperature)?;
        if let Some((i, j, v)) = hidden.find_non_finite() {
            return Err(Error::NonFinite { tensor: "hidden".into(), row: i, col: j, value: v });
        }
        Ok(())
    }

    /// The temperature and `hidden`'s width, without scanning its values (for callers that
    /// validated them once, like a training loop).
    pub(crate) fn check_shape(&self, hidden: MatRef<'_>, temperature: f32) -> Result<()> {
        crate::check_temperature(temperature)?;
        if hidden.cols() != self.hidden {
            return Err(Error::Shape(format!(
                "hidden is [{}, {}] but the layer has d = {} (weight [{}])",
                hidden.rows(),
                hidden.cols(),
                self.hidden,
                self.layout.shape(self.vocab, self.hidden).map(|x| x.to_string()).join(", ")
            )));
        }
        Ok(())
    }

    fn run<C: Consumer>(&self, hidden: MatRef<'_>, c: &C) -> Vec<(Range<usize>, C::State)> {
        engine::run(self, hidden, c, self.tiling)
    }

    /// `out = H·Wᵀ + b`, `[n, V]` (no temperature).
    pub fn logits(&self, hidden: MatRef<'_>, out: MatMut<'_>) -> Result<()> {
        self.materialize(hidden, out, &LayerOptions::default(), Materialize::Logits)
    }

    /// `out = softmax((H·Wᵀ + b) / T)`, `[n, V]`.
    pub fn probs(&self, hidden: MatRef<'_>, out: MatMut<'_>, opts: &LayerOptions) -> Result<()> {
        self.materialize(hidden, out, opts, Materialize::Probs)
    }

    /// `out = log_softmax((H·Wᵀ + b) / T)`, `[n, V]`.
    pub fn log_probs(&self, hidden: MatRef<'_>, out: MatMut<'_>, opts: &LayerOptions) -> Result<()> {
        self.materialize(hidden, out, opts, Materialize::LogProbs)
    }

    fn materialize(
        &self,
        hidden: MatRef<'_>,
        mut out: MatMut<'_>,
        opts: &LayerOptions,
        what: Materialize,
    ) -> Result<()> {
        self.check(hidden, opts)?;
        let n = hidden.rows();
        if (out.rows(), out.cols()) != (n, self.vocab) {
            return Err(Error::Shape(format!(
                "output is [{}, {}], expected [{n}, {}]",
                out.rows(),
                out.cols(),
                self.vocab
            )));
        }
        let t = opts.temperature;
        let stride = out.row_stride();
        let consumer = WriteOut {
            out: SharedOut(out.data_mut().as_mut_ptr()),
            stride,
            stats: what != Materialize::Logits,
            t,
            k: self.kernels,
        };
        let states = self.run(hidden, &consumer);
        if what == Materialize::Logits {
            return match states.iter().filter_map(|(_, s)| s.1).min() {
                Some(row) => Err(Error::LogitsOverflow { row }),
                None => Ok(()),
            };
        }
        let stats: Vec<MaxSum> = states.into_iter().flat_map(|(_, s)| s.0).collect();
        if let Some(row) = stats.iter().position(MaxSum::overflowed) {
            return Err(Error::LogitsOverflow { row });
        }
        let k = self.kernels;
        out.data_mut().par_chunks_mut(stride).take(n).zip(stats.par_iter()).for_each(|(row, &st)| {
            let row = &mut row[..self.vocab];
            match what {
                Materialize::Probs => k.softmax_in_place(row, None, t, st),
                _ => k.log_softmax_in_place(row, None, t, st),
            }
        });
        Ok(())
    }

    /// `out[i] = logsumexp((H·Wᵀ + b)[i] / T)`, `[n]`, without holding the logits. A row
    /// whose logits, or whose logsumexp, lie beyond `f32` is [`Error::LogitsOverflow`].
    pub fn logsumexp(&self, hidden: MatRef<'_>, out: &mut [f32], opts: &LayerOptions) -> Result<()> {
        self.check(hidden, opts)?;
        check_len(out.len(), hidden.rows(), "logsumexp output")?;
        let c = Stats { t: opts.temperature, k: self.kernels };
        let mut i = 0;
        for (_, st) in self.run(hidden, &c) {
            for s in st {
                // (Also when the logsumexp itself is beyond f32, as finite logits over a
                // small T can be: the loss refuses those rows too.)
                let l = s.logsumexp(opts.temperature) as f32;
                if s.overflowed() || !l.is_finite() {
                    return Err(Error::LogitsOverflow { row: i });
                }
                out[i] = l;
                i += 1;
            }
        }
        Ok(())
    }

    /// `out[i] = log softmax((H·Wᵀ + b)[i] / T)[targets[i]]`, `[n]`, without holding the
    /// logits. Targets must lie in `[0, V)`.
    pub fn target_log_probs(
        &self,
        hidden: MatRef<'_>,
        targets: &[i64],
        out: &mut [f32],
        opts: &LayerOptions,
    ) -> Result<()> {
        self.check(hidden, opts)?;
        check_len(targets.len(), hidden.rows(), "targets")?;
        check_len(out.len(), hidden.rows(), "target log-prob output")?;
        check_targets(targets, self.vocab)?;
        let c = Target { targets, t: opts.temperature, k: self.kernels };
        let t = opts.temperature as f64;
        let mut i = 0;
        for (_, (stats, z)) in self.run(hidden, &c) {
            for (s, z) in stats.into_iter().zip(z) {
                if s.overflowed() {
                    return Err(Error::LogitsOverflow { row: i });
                }
                out[i] = ((z as f64 - s.max as f64) / t - s.sum.ln()) as f32;
                i += 1;
            }
        }
        Ok(())
    }

    /// `out[i]` = the class with the largest logit of row `i` (the lowest id on ties).
    pub fn argmax(&self, hidden: MatRef<'_>, out: &mut [usize]) -> Result<()> {
        self.check(hidden, &LayerOptions::default())?;
        check_len(out.len(), hidden.rows(), "argmax output")?;
        let mut i = 0;
        for (_, st) in self.run(hidden, &Argmax) {
            for (z, j) in st {
                // A row whose logits overflowed upwards (NaN or +inf), or all downwards
                // (every one -inf), has no maximum to speak of.
                if j == usize::MAX || !z.is_finite() {
                    return Err(Error::LogitsOverflow { row: i });
                }
                out[i] = j;
                i += 1;
            }
        }
        Ok(())
    }

    /// The `k` most probable classes of each row with their log-probabilities, sorted in
    /// descending order, ties broken by the lower class id.
    pub fn top_k(&self, hidden: MatRef<'_>, k: usize, opts: &LayerOptions) -> Result<TopK> {
        self.check(hidden, opts)?;
        if k == 0 || k > self.vocab {
            return Err(Error::InvalidArgument(format!("k = {k} must be in [1, V = {}]", self.vocab)));
        }
        let n = hidden.rows();
        let c = TopKConsumer { k, t: opts.temperature, kern: self.kernels };
        let t = opts.temperature as f64;
        let mut log_probs = Vec::with_capacity(n * k);
        let mut indices = Vec::with_capacity(n * k);
        let mut i = 0;
        for (_, rows) in self.run(hidden, &c) {
            for (s, mut cand) in rows {
                if s.overflowed() {
                    return Err(Error::LogitsOverflow { row: i });
                }
                cand.finish(k);
                let ln_s = s.sum.ln();
                for &(z, j) in &cand.items {
                    log_probs.push(((z as f64 - s.max as f64) / t - ln_s) as f32);
                    indices.push(j as usize);
                }
                i += 1;
            }
        }
        Ok(TopK { k, log_probs, indices })
    }
}

/// What [`SoftmaxLayer::target_stats`] reports for one row.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetStat {
    /// `log softmax(z / T)[target]`.
    pub log_prob: f32,
    /// The target's place in the order of [`SoftmaxLayer::argmax`] and
    /// [`SoftmaxLayer::top_k`] (larger logit first, ties to the lower id): 1 + the classes
    /// whose logit is greater than the target's, or equal with a lower id. 1 for the argmax.
    pub rank: usize,
    /// The `top` most probable classes with their log-probabilities, descending, ties to
    /// the lower id (empty when `top` is 0).
    pub top: Vec<(usize, f32)>,
}

impl SoftmaxLayer<'_> {
    /// For each row: the target's log-probability, its rank among all classes, and
    /// optionally the `top` most probable classes, in one fused pass that never holds the
    /// `n × V` logits.
    ///
    /// The rank is exact with respect to the logits the pass computes: the target's logit is
    /// estimated first by a dot product, classes far from the estimate (beyond the bound on
    /// `f32` rounding) are counted on the fly, and the few within it are compared with the
    /// target's own logit at the end.
    pub fn target_stats(
        &self,
        hidden: MatRef<'_>,
        targets: &[i64],
        top: usize,
        opts: &LayerOptions,
    ) -> Result<Vec<TargetStat>> {
        self.check(hidden, opts)?;
        let (n, d) = (hidden.rows(), self.hidden);
        check_len(targets.len(), n, "targets")?;
        check_targets(targets, self.vocab)?;
        if top > self.vocab {
            return Err(Error::InvalidArgument(format!("top = {top} must be at most V = {}", self.vocab)));
        }
        // Estimates of the target logits and a bound on how far the tile product can be.
        // Row by row in parallel (on one thread this was a quarter of the whole call at
        // n = 50000, d = 256, V = 100).
        let products = if self.precision == Precision::Bf16x3 { 3 * d } else { d };
        let mu = (products as f64 + 2.0) * 2f64.powi(-24);
        let gamma = mu / (1.0 - mu);
        let est: Vec<(f32, f32)> = (0..n)
            .into_par_iter()
            .with_min_len(256)
            .map(|i| {
                let (h, y) = (hidden.row(i), targets[i] as usize);
                let b = self.bias.as_ref().map_or(0.0, |b| b[y] as f64);
                if let (None, WeightLayout::VocabMajor) = (&self.packed, self.layout) {
                    // f32 with W's row contiguous: the estimate is itself an f32 dot product
                    // (vectorized), within γ_d·Σ|h_p·w_p| ≤ γ_d·‖h‖·‖w‖ of the exact value, as
                    // the tile's is; twice that, and doubled again for margin (the norms'
                    // own rounding is far inside it). A wider window only adds candidates.
                    let w = &self.weight[y * d..(y + 1) * d];
                    let k = self.kernels;
                    let (hh, ww) = (k.dot(h, h), k.dot(w, w));
                    let z = k.dot(h, w) as f64 + b;
                    let mag = (hh as f64).sqrt() * (ww as f64).sqrt();
                    let delta = (4.0 * gamma * (mag + b.abs()) + 1e-30) as f32;
                    // Norms beyond the f32 range, and squared norms under 2^-100 (whose
                    // squares may have underflowed: h ~ 1e-24 against w ~ 1e18 gave a norm of
                    // 0 and a window too narrow for the tile's own rounding), take the exact
                    // path below.
                    let norms_ok = hh >= NORM2_MIN && ww >= NORM2_MIN;
                    if norms_ok && (z as f32).is_finite() && delta.is_finite() {
                        return (z as f32, delta);
                    }
                }
                let (mut dot, mut mag, mut flushable) = (0f64, 0f64, 0f64);
                let subnormal = |x: f64| x != 0.0 && x.abs() < f32::MIN_POSITIVE as f64;
                for (p, &hp) in h.iter().enumerate() {
                    let (wh, wl) = self.weight_parts(y, p);
                    let wh = wh as f64;
                    // The products the tile computes: h·w in f32, the bf16 parts otherwise.
                    let pairs = match self.precision {
                        Precision::F32 => [(hp as f64, wh), (0.0, 0.0), (0.0, 0.0)],
                        Precision::Bf16 => [(bf16::from_bf16(bf16::to_bf16(hp)) as f64, wh), (0.0, 0.0), (0.0, 0.0)],
                        Precision::Bf16x3 => {
                            let (a, b) = bf16::split(hp);
                            let (a, b) = (bf16::from_bf16(a) as f64, bf16::from_bf16(b) as f64);
                            [(a, wh), (a, wl as f64), (b, wh)]
                        }
                    };
                    for (x, w) in pairs {
                        let t = x * w;
                        dot += t;
                        mag += t.abs();
                        // AMX and AVX512-BF16 take subnormal bf16 operands as 0 and flush
                        // subnormal products: the tile's logit may lack such a term whole.
                        if self.precision != Precision::F32 && (subnormal(x) || subnormal(w) || subnormal(t)) {
                            flushable += t.abs();
                        }
                    }
                }
                // |fl(Σ) − Σ| ≤ γ_m·Σ|terms|, γ_m = m·u/(1 − m·u), u = 2^-24, for any summation
                // order, with m = d products (3d in bf16x3) and sums plus the bias; doubled
                // for margin.
                // (The bound capped at f32::MAX: an infinite one would make `e + delta` NaN
                // for a target logit of −inf, and no class would count as above it.)
                // Terms a path may flush widen it by their whole size. The estimate is kept
                // finite: a sum just beyond f32::MAX can round to ±f32::MAX in the tile, and
                // an infinite estimate would leave the window at ±inf, missing it.
                let e = ((dot + b) as f32).clamp(-f32::MAX, f32::MAX);
                (e, ((2.0 * gamma * (mag + b.abs()) + flushable + 1e-30) as f32).min(f32::MAX))
            })
            .collect();
        let c = Scorer { targets, est: &est, top, t: opts.temperature, kern: self.kernels };
        let t = opts.temperature as f64;
        let mut out = Vec::with_capacity(n);
        for (rows, states) in self.run(hidden, &c) {
            for (i, mut st) in rows.zip(states) {
                if st.stats.overflowed() {
                    return Err(Error::LogitsOverflow { row: i });
                }
                let y = targets[i] as u32;
                // (Equal logits tie to the lower id, so those count as above too.)
                let near_above = st.window.iter().filter(|&&(z, j)| z > st.zy || (z == st.zy && j < y)).count();
                let ln_s = st.stats.sum.ln();
                let lp = |z: f32| ((z as f64 - st.stats.max as f64) / t - ln_s) as f32;
                let topv = if top > 0 {
                    st.cand.finish(top);
                    st.cand.items.iter().map(|&(z, j)| (j as usize, lp(z))).collect()
                } else {
                    Vec::new()
                };
                out.push(TargetStat { log_prob: lp(st.zy), rank: 1 + st.above + near_above, top: topv });
            }
        }
        Ok(out)
    }
}

struct ScoreState {
    stats: MaxSum,
    zy: f32,
    above: usize,
    window: Vec<(f32, u32)>,
    cand: Candidates,
}

struct Scorer<'a> {
    targets: &'a [i64],
    est: &'a [(f32, f32)],
    top: usize,
    t: f32,
    kern: &'static Kernels,
}

/// Squared norms below this (2^-100) take the exact path of the target-logit estimate: some
/// of their squares may have underflowed (any below 2^-126), so the norm would understate
/// the products' size.
const NORM2_MIN: f32 = 7.888_609e-31;

impl Consumer for Scorer<'_> {
    type State = Vec<ScoreState>;
    fn init(&self, rows: Range<usize>) -> Self::State {
        (0..rows.len())
            .map(|_| ScoreState {
                stats: MaxSum::EMPTY,
                zy: 0.0,
                above: 0,
                window: Vec::new(),
                cand: Candidates::new(),
            })
            .collect()
    }
    fn visit(&self, st: &mut Self::State, tile: &[f32], rows: Range<usize>, cols: Range<usize>) {
        for ((s, row), i) in st.iter_mut().zip(tile.chunks_exact(cols.len())).zip(rows) {
            let ms = self.kern.max_sum(row, None, self.t);
            s.stats = s.stats.merge(ms, self.t);
            let y = self.targets[i] as usize;
            if cols.contains(&y) {
                s.zy = row[y - cols.start];
            }
            let (e, delta) = self.est[i];
            let (lo, hi) = (e - delta, e + delta);
            if ms.max >= lo {
                // Larger than the bound's top: above the target. Inside [lo, hi]: decided
                // after the pass, against the tile's value of the target. One pass over the
                // row for both; the window holds few values. The target's own logit lies in
                // [lo, hi] (that is what the estimate's bound says) and is left out: pushing
                // it for every row cost target stats at n = 50000, V = 100 a quarter of its
                // time (46–55 ms at commit `941d528` against 32–40 ms, `bench_train`'s
                // evaluate, three pairs).
                s.above += self.kern.count_window(row, lo, hi, cols.start as u32, y as u32, &mut s.window);
            }
            if self.top > 0 {
                s.cand.offer(row, cols.start, ms.max, self.top);
            }
        }
    }
    fn merge(&self, a: Self::State, b: Self::State) -> Self::State {
        a.into_iter()
            .zip(b)
            .map(|(mut x, y)| {
                x.stats = x.stats.merge(y.stats, self.t);
                x.zy += y.zy; // the target lies in exactly one class range
                x.above += y.above;
                x.window.extend(y.window);
                if self.top > 0 {
                    x.cand.items.extend(y.cand.items);
                    x.cand.prune(self.top);
                }
                x
            })
            .collect()
    }
}

fn check_len(got: usize, want: usize, what: &str) -> Result<()> {
    if got == want { Ok(()) } else { Err(Error::Shape(format!("{what} has length {got}, expected n = {want}"))) }
}

/// A bias must have `V` finite entries.
fn check_bias(b: &[f32], vocab: usize) -> Result<()> {
    if b.len() != vocab {
        return Err(Error::Shape(format!("bias has length {}, expected V = {vocab}", b.len())));
    }
    match b.iter().position(|v| !v.is_finite()) {
        Some(j) => Err(Error::NonFiniteEntry { tensor: "bias".into(), index: j, value: b[j] }),
        None => Ok(()),
    }
}

fn check_targets(targets: &[i64], vocab: usize) -> Result<()> {
    match targets.iter().position(|&y| y < 0 || y as u64 >= vocab as u64) {
        Some(i) => Err(Error::TargetOutOfRange { index: i, value: targets[i], vocab }),
        None => Ok(()),
    }
}

impl SoftmaxLayer<'_> {
    /// Starts a tile of logits for the classes `cols` (rows of `|cols|`): with a bias, each
    /// row is set to it and the product must add to the tile (returns `true`); without, the
    /// tile is left as it is and the product writes over it (`false`), so that no pass zeroes
    /// it first.
    pub(crate) fn start_tile(&self, tile: &mut [f32], cols: Range<usize>) -> bool {
        let Some(b) = &self.bias else { return false };
        tile.chunks_exact_mut(cols.len()).for_each(|r| r.copy_from_slice(&b[cols.clone()]));
        true
    }

    /// The logits of the classes `cols` for rows already packed in this layer's bf16
    /// precision, into `tile` (`m × |cols|`): bias, then the product. Shared by the engine's
    /// tiles and the loss, which packs a block's rows once for all its segments.
    ///
    /// # Panics
    /// If the layer computes in `f32` (an internal invariant), or `tile` has the wrong length.
    pub(crate) fn bf16_logits(&self, rows: &PackedRows, cols: Range<usize>, tile: &mut [f32]) {
        let (m, c) = (rows.rows(), cols.len());
        assert_eq!(tile.len(), m * c, "bf16_logits: tile length");
        let w = self.packed.as_ref().expect("bf16_logits: a bf16 layer");
        let output = if self.start_tile(tile, cols.clone()) { bf16::Output::Add } else { bf16::Output::Overwrite };
        // Decoding (a few rows) is bound by reading W: there AVX512-BF16 was 6–11% faster
        // than AMX's 1×4 kernel (bench_bf16 decode_paths), unless a path was asked for.
        let path = match self.bf_path {
            BfPath::Amx if !self.bf_path_forced && m <= GEMV_MAX_ROWS && BfPath::Avx512Bf16.is_available() => {
                BfPath::Avx512Bf16
            }
            p => p,
        };
        // (Written over, AMX does not even load C.)
        bf16::tile_product(path, rows, w, cols, tile, c, output);
    }
}

/// Hidden rows prepared for the tile product: packed once per task for the blocked
/// kernel (weights `[V, d]`), with the kernel's scratch space.
pub struct PreparedRows {
    packed: Option<tile_gemm::PackedA>,
    scratch: tile_gemm::Scratch,
    /// The rows rounded (or split) to bf16, in bf16 precisions.
    bf: Option<PackedRows>,
}

impl LogitSource for SoftmaxLayer<'_> {
    type Rows = PreparedRows;

    fn prepare_rows(&self, hidden: MatRef<'_>) -> PreparedRows {
        let m = hidden.rows();
        if self.packed.is_some() {
            let bf = Some(PackedRows::pack(hidden, self.precision));
            return PreparedRows { packed: None, scratch: tile_gemm::Scratch::new(), bf };
        }
        // With all classes in one column tile (a classifier's few), the `gemm` crate's product
        // is faster: target stats at n = 50000, d = 256, V = 100 (`bench_train`'s evaluate,
        // three alternated pairs, twice, the blocked kernel switched on in a temporary build)
        // took 52–53 against 60–61 ms, and after the estimates were vectorized 40–45 against
        // 44–47 ms.
        let narrow = self.vocab <= self.tiling.col_tile;
        let packed = (self.layout == WeightLayout::VocabMajor && m > GEMV_MAX_ROWS && !narrow).then(|| {
            let mut p = tile_gemm::PackedA::new();
            p.pack(hidden.as_slice(), m, self.hidden, hidden.row_stride());
            p
        });
        PreparedRows { packed, scratch: tile_gemm::Scratch::new(), bf: None }
    }

    fn vocab(&self) -> usize {
        self.vocab
    }
    fn hidden_dim(&self) -> usize {
        self.hidden
    }
    fn logits_tile(&self, rows: &mut PreparedRows, hidden: MatRef<'_>, cols: Range<usize>, tile: &mut [f32]) {
        let (m, c, d) = (hidden.rows(), cols.len(), self.hidden);
        debug_assert_eq!(tile.len(), m * c);
        if let Some(bf) = &rows.bf {
            self.bf16_logits(bf, cols, tile);
            return;
        }
        let add = self.start_tile(tile, cols.clone());
        let k = self.kernels;
        if let Some(packed) = &rows.packed {
            // The blocked kernel (weights [V, d]): H packed once per task, W[cols] per tile.
            let w = &self.weight[cols.start * d..cols.end * d];
            tile_gemm::gemm_packed(packed, w, tile_gemm::BLayout::VocabMajor, c, d, tile, c, add, &mut rows.scratch);
            return;
        }
        // The dot-product paths below add into the tile; the `gemm` crate's product writes
        // over it when there is no bias.
        if !add && m <= GEMV_MAX_ROWS {
            tile.fill(0.0);
        }
        match self.layout {
            WeightLayout::VocabMajor if m <= GEMV_MAX_ROWS => {
                // Decoding: memory-bound, one pass over the weight rows, four at a time.
                let wb = &self.weight[cols.start * d..cols.end * d];
                let quads = c / 4;
                for q in 0..quads {
                    let r = |x: usize| &wb[(4 * q + x) * d..(4 * q + x + 1) * d];
                    for i in 0..m {
                        let z = k.dot4(hidden.row(i), [r(0), r(1), r(2), r(3)]);
                        for (x, zx) in z.into_iter().enumerate() {
                            tile[i * c + 4 * q + x] += zx;
                        }
                    }
                }
                for j in 4 * quads..c {
                    for i in 0..m {
                        tile[i * c + j] += k.dot(hidden.row(i), &wb[j * d..(j + 1) * d]);
                    }
                }
            }
            WeightLayout::HiddenMajor if m <= GEMV_MAX_ROWS => {
                for i in 0..m {
                    let h = hidden.row(i);
                    let out = &mut tile[i * c..(i + 1) * c];
                    for (p, &hp) in h.iter().enumerate() {
                        k.axpy(out, hp, &self.weight[p * self.vocab + cols.start..p * self.vocab + cols.end]);
                    }
                }
            }
            layout => {
                let c_op = Operand { ptr: tile.as_mut_ptr(), rs: c as isize, cs: 1 };
                // SAFETY: `tile` is m x c row-major and ours alone; `hidden` is m x d within
                // its slice; `weight_block` addresses W inside `self.weight` (cols.end <= V).
                // It adds onto the bias written above, or writes over the tile.
                unsafe { linalg::gemm(m, c, d, c_op, add, hidden_op(hidden), self.weight_block(layout, cols.start)) }
            }
        }
    }
}

/// `hidden` as a product operand.
pub(crate) fn hidden_op(hidden: MatRef<'_>) -> Operand {
    Operand { ptr: hidden.row(0).as_ptr(), rs: hidden.row_stride() as isize, cs: 1 }
}

impl SoftmaxLayer<'_> {
    /// `W[cols]ᵀ` from class `start` on, as the `d x c` right operand of `H · Wᵀ`.
    pub(crate) fn weight_block(&self, layout: WeightLayout, start: usize) -> Operand {
        let d = self.hidden;
        match layout {
            // Element (p, j) at W[(start + j) * d + p].
            WeightLayout::VocabMajor => Operand { ptr: self.weight[start * d..].as_ptr(), rs: 1, cs: d as isize },
            // Element (p, j) at W[p * V + start + j].
            WeightLayout::HiddenMajor => Operand { ptr: self.weight[start..].as_ptr(), rs: self.vocab as isize, cs: 1 },
        }
    }

    pub(crate) fn kernels(&self) -> &'static Kernels {
        self.kernels
    }

    /// The engine's tiling.
    pub fn tiling(&self) -> Tiling {
        self.tiling
    }

    pub(crate) fn check_inputs(&self, hidden: MatRef<'_>, temperature: f32) -> Result<()> {
        self.check(hidden, &LayerOptions { temperature })
    }
}

/// Where an `[n, V]` output is written from many tasks at once.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint regions (each (row, class) belongs to exactly one tile of
// one task), and the engine joins every task before the output is used again.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

#[derive(Clone, Copy, PartialEq)]
enum Materialize {
    Logits,
    Probs,
    LogProbs,
}

/// Writes each tile into the output; optionally tracks each row's [`MaxSum`].
struct WriteOut {
    out: SharedOut,
    stride: usize,
    stats: bool,
    t: f32,
    k: &'static Kernels,
}

impl Consumer for WriteOut {
    /// Each row's statistics (when asked for), and the first row with a logit beyond the
    /// `f32` range (logits alone: the statistics show it otherwise).
    type State = (Vec<MaxSum>, Option<usize>);
    fn init(&self, rows: Range<usize>) -> Self::State {
        (vec![MaxSum::EMPTY; if self.stats { rows.len() } else { 0 }], None)
    }
    fn visit(&self, st: &mut Self::State, tile: &[f32], rows: Range<usize>, cols: Range<usize>) {
        for (i, row) in tile.chunks_exact(cols.len()).enumerate() {
            // SAFETY: (rows.start + i, cols) lies inside the [n, V] output with this row
            // stride, and only this task writes it (see `SharedOut`).
            unsafe {
                let dst = self.out.0.add((rows.start + i) * self.stride + cols.start);
                std::ptr::copy_nonoverlapping(row.as_ptr(), dst, row.len());
            }
            if self.stats {
                st.0[i] = st.0[i].merge(self.k.max_sum(row, None, self.t), self.t);
            } else if st.1.is_none() && !crate::matrix::all_finite(row) {
                st.1 = Some(rows.start + i);
            }
        }
    }
    fn merge(&self, a: Self::State, b: Self::State) -> Self::State {
        let stats = a.0.into_iter().zip(b.0).map(|(x, y)| x.merge(y, self.t)).collect();
        (stats, a.1.into_iter().chain(b.1).min())
    }
}

/// Each row's [`MaxSum`]: logsumexp.
struct Stats {
    t: f32,
    k: &'static Kernels,
}

impl Consumer for Stats {
    type State = Vec<MaxSum>;
    fn init(&self, rows: Range<usize>) -> Self::State {
        vec![MaxSum::EMPTY; rows.len()]
    }
    fn visit(&self, st: &mut Self::State, tile: &[f32], _rows: Range<usize>, cols: Range<usize>) {
        for (s, row) in st.iter_mut().zip(tile.chunks_exact(cols.len())) {
            *s = s.merge(self.k.max_sum(row, None, self.t), self.t);
        }
    }
    fn merge(&self, a: Self::State, b: Self::State) -> Self::State {
        a.into_iter().zip(b).map(|(x, y)| x.merge(y, self.t)).collect()
    }
}

/// Each row's [`MaxSum`] and its target's logit.
struct Target<'t> {
    targets: &'t [i64],
    t: f32,
    k: &'static Kernels,
}

impl Consumer for Target<'_> {
    type State = (Vec<MaxSum>, Vec<f32>);
    fn init(&self, rows: Range<usize>) -> Self::State {
        (vec![MaxSum::EMPTY; rows.len()], vec![0.0; rows.len()])
    }
    fn visit(&self, st: &mut Self::State, tile: &[f32], rows: Range<usize>, cols: Range<usize>) {
        for (i, row) in tile.chunks_exact(cols.len()).enumerate() {
            st.0[i] = st.0[i].merge(self.k.max_sum(row, None, self.t), self.t);
            let y = self.targets[rows.start + i] as usize;
            if cols.contains(&y) {
                st.1[i] = row[y - cols.start];
            }
        }
    }
    fn merge(&self, a: Self::State, b: Self::State) -> Self::State {
        // A target lies in exactly one class range; the other side holds 0.
        let stats = a.0.into_iter().zip(b.0).map(|(x, y)| x.merge(y, self.t)).collect();
        let z = a.1.into_iter().zip(b.1).map(|(x, y)| x + y).collect();
        (stats, z)
    }
}

/// Each row's largest logit and its class (lowest id on ties).
struct Argmax;

impl Consumer for Argmax {
    type State = Vec<(f32, usize)>;
    fn init(&self, rows: Range<usize>) -> Self::State {
        vec![(f32::NEG_INFINITY, usize::MAX); rows.len()]
    }
    fn visit(&self, st: &mut Self::State, tile: &[f32], _rows: Range<usize>, cols: Range<usize>) {
        for (s, row) in st.iter_mut().zip(tile.chunks_exact(cols.len())) {
            // A logit overflowed upwards (or to NaN) poisons the row's maximum (NaN compares
            // false below); one overflowed downwards, -inf, is below the maximum anyway.
            let mut ok = true;
            for (j, &z) in row.iter().enumerate() {
                ok &= z < f32::INFINITY;
                if z > s.0 || s.1 == usize::MAX {
                    *s = (z, cols.start + j);
                }
            }
            if !ok {
                s.0 = f32::NAN;
            }
        }
    }
    fn merge(&self, a: Self::State, b: Self::State) -> Self::State {
        a.into_iter()
            .zip(b)
            .map(|(x, y)| {
                if x.0.is_nan() || y.0.is_nan() {
                    (f32::NAN, x.1.min(y.1))
                } else if y.0 > x.0 || x.1 == usize::MAX {
                    y
                } else {
                    x
                }
            })
            .collect()
    }
}

/// Top-k candidates of one row: at most `2k` `(logit, class)` pairs above a threshold,
/// pruned to the best `k` when full. Order: larger logit first, then lower class.
#[derive(Clone, Debug, Default)]
struct Candidates {
    items: Vec<(f32, u32)>,
    /// The k-th best logit after the last prune; anything at or below it cannot enter
    /// (ties lose to the lower class ids seen earlier).
    threshold: f32,
    /// The threshold of the classes to the left of these (another list holds `k` values at
    /// or above it, with lower class ids): nothing at or below it can enter either, even
    /// before this list holds `k`.
    floor: Option<f32>,
}

/// Higher logits first, ties to the lower class id; −0 ties with +0 (adding +0 turns −0
/// into +0), as in every other comparison of logits here.
fn better(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    (b.0 + 0.0).total_cmp(&(a.0 + 0.0)).then(a.1.cmp(&b.1))
}

impl Candidates {
    fn new() -> Self {
        Candidates { items: Vec::new(), threshold: f32::NEG_INFINITY, floor: None }
    }
    /// A list for the classes to the right of `left`'s, starting from its threshold.
    fn after(left: &Candidates, k: usize) -> Self {
        let floor = (left.items.len() >= k).then_some(left.threshold).or(left.floor);
        Candidates { items: Vec::new(), threshold: f32::NEG_INFINITY, floor }
    }
    /// What a value must exceed to enter, once the list (or the floor) holds `k`; `None`
    /// while anything enters.
    fn bar(&self, k: usize) -> Option<f32> {
        match (self.items.len() >= k, self.floor) {
            (true, Some(f)) => Some(self.threshold.max(f)),
            (true, None) => Some(self.threshold),
            (false, f) => f,
        }
    }
    fn prune(&mut self, k: usize) {
        if self.items.len() > k {
            self.items.select_nth_unstable_by(k - 1, better);
            self.items.truncate(k);
            self.threshold = self.items.iter().map(|x| x.0).fold(f32::INFINITY, f32::min);
        }
    }
    /// Offers a row of logits for classes `start..`, given the row's maximum: only
    /// values that can still enter the top `k` are kept (strictly above the threshold:
    /// an equal logit seen later has a higher class id).
    fn offer(&mut self, row: &[f32], start: usize, row_max: f32, k: usize) {
        if self.bar(k).is_some_and(|bar| row_max <= bar) {
            return;
        }
        // Pieces of 16 values: most hold nothing above the threshold once it has risen.
        const PIECE: usize = 16;
        for (p, piece) in row.chunks(PIECE).enumerate() {
            let at = start + p * PIECE;
            if let Some(thr) = self.bar(k) {
                // Once `k` candidates are held: the lanes above the threshold as a bit mask
                // (16 branch-free compares, which vectorize), then only those lanes. A value
                // let in after a prune raised the threshold within the piece is pruned later.
                // (Top-k, k = 10, n = 2048, d = 768, V = 50257: the scan and its count took
                // 3.95% of a profile against 5.0% with a vectorized count and then 16 scalar
                // looks per piece that passed it.)
                let above = |m: u32, (j, &z): (usize, &f32)| m | (u32::from(z > thr) << j);
                let mut mask = match <&[f32; PIECE]>::try_from(piece) {
                    Ok(full) => full.iter().enumerate().fold(0, above),
                    Err(_) => piece.iter().enumerate().fold(0, above),
                };
                while mask != 0 {
                    let j = mask.trailing_zeros() as usize;
                    mask &= mask - 1;
                    self.push(piece[j], at + j, k);
                }
                continue;
            }
            // Fewer than `k` held and no floor: everything enters (-inf included).
            for (j, &z) in piece.iter().enumerate() {
                self.push(z, at + j, k);
            }
        }
    }
    /// Adds a candidate, pruning to the best `k` when the list is full.
    fn push(&mut self, z: f32, class: usize, k: usize) {
        self.items.push((z, class as u32));
        if self.items.len() >= 2 * k.max(16) {
            self.prune(k);
        }
    }
    fn finish(&mut self, k: usize) {
        self.prune(k);
        self.items.sort_unstable_by(better);
    }
}

struct TopKConsumer {
    k: usize,
    t: f32,
    kern: &'static Kernels,
}

impl Consumer for TopKConsumer {
    type State = Vec<(MaxSum, Candidates)>;
    fn init(&self, rows: Range<usize>) -> Self::State {
        vec![(MaxSum::EMPTY, Candidates::new()); rows.len()]
    }
    /// Starts each row's list from the threshold of the classes to its left, so that a
    /// segment does not take its first candidates one by one again (the result is the same:
    /// nothing at or below that threshold can be among the best `k`).
    fn init_after(&self, _rows: Range<usize>, left: &Self::State) -> Self::State {
        left.iter().map(|(_, c)| (MaxSum::EMPTY, Candidates::after(c, self.k))).collect()
    }
    fn visit(&self, st: &mut Self::State, tile: &[f32], _rows: Range<usize>, cols: Range<usize>) {
        for ((s, cand), row) in st.iter_mut().zip(tile.chunks_exact(cols.len())) {
            let ms = self.kern.max_sum(row, None, self.t);
            *s = s.merge(ms, self.t);
            cand.offer(row, cols.start, ms.max, self.k);
        }
    }
    fn merge(&self, a: Self::State, b: Self::State) -> Self::State {
        a.into_iter()
            .zip(b)
            .map(|((sa, mut ca), (sb, cb))| {
                ca.items.extend(cb.items);
                ca.prune(self.k);
                (sa.merge(sb, self.t), ca)
            })
            .collect()
    }
}
