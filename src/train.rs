//! Training a softmax layer on fixed features: a softmax classifier (multinomial logistic
//! regression), or an LM head over fixed hidden states.
//!
//! The objective is the mean cross-entropy plus an L2 penalty on the weight, with
//! scikit-learn's meaning (the bias is not penalized):
//!
//! ```text
//! J(W, b) = (1/n)·Σ_i −log softmax(W·x_i + b)[y_i]  +  (λ/2)·‖W‖²        C = 1/(λ·n)
//! ```
//!
//! Gradients come from the fused loss ([`crate::loss`]) without `dL/dx` (the features are
//! fixed), so each evaluation costs two matrix products and never holds the `n × K` logits.
//!
//! Three optimizers:
//! - [`Optimizer::Sgd`], with momentum, over seeded mini-batches;
//! - [`Optimizer::AdamW`], with decoupled weight decay, over seeded mini-batches;
//! - [`Optimizer::Lbfgs`], full batch, for the convex problem: its iterate and history are
//!   kept in `f64`, while each evaluation runs in `f32`; it runs until the largest gradient
//!   entry falls below a tolerance.
//!
//! Mini-batch optimizers follow a learning-rate schedule of linear warmup then cosine decay,
//! with optional gradient clipping by global norm, an optional held-out split evaluated every
//! epoch and early stopping.
//!
//! # Reproducibility and checkpoints
//!
//! Every random choice (the held-out split, each epoch's shuffle) comes from a seeded
//! SplitMix64 stream, and every sum has a fixed order, so a run gives the same bits on any
//! thread count. A checkpoint ([`Checkpointing`]) is a `.safetensors` file holding the model,
//! the optimizer state, the step, the RNG state and the history, written atomically (temporary
//! file, fsync, rename): killing the process at any moment leaves the previous checkpoint
//! intact. Resuming from one continues the run to the same bits as an uninterrupted run.

use crate::bf16::Precision;
use crate::error::{Error, Result};
use crate::io::{self, OutTensor};
use crate::layer::{LayerOptions, SoftmaxLayer};
use crate::loss::{self, CrossEntropyOptions, GradientsMut, Reduction, Upstream};
use crate::matrix::{MatRef, WeightLayout};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A softmax layer being trained: `weight [K, d]` (PyTorch's layout) and `bias [K]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub classes: usize,
    pub dim: usize,
}

impl Model {
    /// All zeros (the convex problem's usual start, as in scikit-learn).
    pub fn zeros(classes: usize, dim: usize) -> Model {
        Model { weight: vec![0.0; classes * dim], bias: vec![0.0; classes], classes, dim }
    }

    /// The model as a [`SoftmaxLayer`] borrowing its parameters.
    pub fn layer(&self) -> Result<SoftmaxLayer<'_>> {
        SoftmaxLayer::new(&self.weight[..], WeightLayout::VocabMajor, self.classes, self.dim, Some(&self.bias[..]))
    }

    /// [`Model::layer`] computing its products in `precision` (bf16 precisions pack the
    /// weight here).
    pub fn layer_in(&self, precision: Precision) -> Result<SoftmaxLayer<'_>> {
        self.layer()?.with_precision(precision)
    }

    /// Class probabilities `[n, K]` for `features [n, d]`.
    pub fn predict_proba(&self, features: MatRef<'_>) -> Result<Vec<f32>> {
        self.predict_proba_in(features, Precision::F32)
    }

    /// [`Model::predict_proba`] with the product in `precision`.
    pub fn predict_proba_in(&self, features: MatRef<'_>, precision: Precision) -> Result<Vec<f32>> {
        check_dim(features, self.dim)?;
        // The model first (its shapes and values), then the output.
        let layer = self.layer_in(precision)?;
        let len = features
            .rows()
            .checked_mul(self.classes)
            .ok_or_else(|| Error::Shape(format!("the output [{}, {}] is too large", features.rows(), self.classes)))?;
        let mut out =
            crate::matrix::try_filled(len, 0f32, || format!("the output [{}, {}]", features.rows(), self.classes))?;
        let view = crate::MatMut::new(&mut out, features.rows(), self.classes)?;
        layer.probs(features, view, &LayerOptions::default())?;
        Ok(out)
    }

    /// Writes `weight [K, d]` and `bias [K]` to a `.safetensors` file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_with_metadata(path, None)
    }

    /// [`Model::save`] with a string map in the file's `__metadata__` (for example the names
    /// of the features, which the command line's `predict` matches CSV columns by);
    /// [`io::read_safetensors_metadata`] reads it back.
    pub fn save_with_metadata(
        &self,
        path: &Path,
        metadata: Option<std::collections::HashMap<String, String>>,
    ) -> Result<()> {
        io::write_safetensors_with_metadata(
            path,
            &[
                ("weight", vec![self.classes, self.dim], OutTensor::F32(&self.weight)),
                ("bias", vec![self.classes], OutTensor::F32(&self.bias)),
            ],
            metadata,
        )
    }

    /// Reads a model that [`Model::save`] wrote (or any `.safetensors` with `weight [K, d]`
    /// and an optional `bias [K]`).
    pub fn load(path: &Path) -> Result<Model> {
        let w = io::read_safetensors(path, "weight")?;
        let (classes, dim) = w.as_matrix_shape()?;
        let weight = w.to_f32()?.into_owned();
        let bias = match io::read_safetensors_optional(path, "bias")? {
            Some(b) => {
                if b.numel() != classes {
                    return Err(Error::Shape(format!(
                        "{}: bias has {} elements, expected K = {classes} (weight is [{classes}, {dim}])",
                        b.source,
                        b.numel()
                    )));
                }
                b.to_f32()?.into_owned()
            }
            None => vec![0.0; classes],
        };
        let m = Model { weight, bias, classes, dim };
        // Validates finiteness; a bad value is named with the file that holds it.
        m.layer().map_err(|e| match e {
            Error::NonFinite { .. } | Error::NonFiniteEntry { .. } => {
                Error::Format { path: path.to_path_buf(), what: e.to_string() }
            }
            e => e,
        })?;
        Ok(m)
    }
}

fn check_dim(features: MatRef<'_>, dim: usize) -> Result<()> {
    if features.cols() != dim {
        return Err(Error::Shape(format!(
            "features have {} columns, but the model expects d = {dim}",
            features.cols()
        )));
    }
    Ok(())
}

/// Features `[n, d]` with their class ids `[n]`, checked once by [`Data::new`] (so the
/// training loop never scans them again).
#[derive(Clone, Copy, Debug)]
pub struct Data<'a> {
    features: MatRef<'a>,
    labels: &'a [i64],
}

impl<'a> Data<'a> {
    /// Pairs features with labels, checking lengths, finiteness and that labels are
    /// non-negative.
    pub fn new(features: MatRef<'a>, labels: &'a [i64]) -> Result<Data<'a>> {
        if labels.len() != features.rows() {
            return Err(Error::Shape(format!(
                "labels have length {}, but features have {} rows",
                labels.len(),
                features.rows()
            )));
        }
        if let Some(i) = labels.iter().position(|&y| y < 0) {
            return Err(Error::InvalidArgument(format!(
                "labels[{i}] = {} is negative; labels are class ids",
                labels[i]
            )));
        }
        if let Some((i, j, v)) = features.find_non_finite() {
            return Err(Error::NonFinite { tensor: "features".into(), row: i, col: j, value: v });
        }
        Ok(Data { features, labels })
    }

    /// The features, `[n, d]`.
    pub fn features(&self) -> MatRef<'a> {
        self.features
    }

    /// The class ids, `[n]`.
    pub fn labels(&self) -> &'a [i64] {
        self.labels
    }

    /// Number of classes the labels imply: the largest label + 1.
    pub fn implied_classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |&m| m as usize + 1)
    }

    fn rows(&self) -> usize {
        self.labels.len()
    }
}

/// Loss, accuracy and perplexity of a model on some data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    /// Mean cross-entropy in nats (no penalty).
    pub loss: f64,
    /// Fraction of rows whose label is the argmax (ties to the lower class id, as in
    /// [`crate::SoftmaxLayer::argmax`]).
    pub accuracy: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
}

/// Evaluates `model` on `data` in one fused pass.
pub fn evaluate(model: &Model, data: Data<'_>) -> Result<Metrics> {
    evaluate_in(model, data, Precision::F32)
}

/// [`evaluate`] with the product in `precision`.
///
/// With few classes in `f32` (the narrow path of training's evaluations), this is the
/// forward half of that path, over fixed chunks of rows summed in order; otherwise the
/// layer's fused target statistics.
pub fn evaluate_in(model: &Model, data: Data<'_>, precision: Precision) -> Result<Metrics> {
    check_dim(data.features, model.dim)?;
    // (Also checks the model: a non-finite weight is an error.)
    let layer = model.layer_in(precision)?;
    let (n, k) = (data.rows(), model.classes);
    let (loss_sum, correct) = if let Some(w) = narrow_weights(model, precision) {
        if let Some(i) = data.labels.iter().position(|&y| y as u64 >= k as u64) {
            return Err(Error::TargetOutOfRange { index: i, value: data.labels[i], vocab: k });
        }
        // Half the work of the general pass here: one product, lane-wise row work.
        let parts = over_chunks(n, |r| {
            let (x, y) = (data.features.sub_rows(r.clone()), &data.labels[r]);
            crate::narrow::metrics(&crate::narrow::Problem { x, y, w: &w, b: &model.bias, scale: 1.0 })
        });
        parts.iter().fold((0f64, 0usize), |(l, c), p| (l + p.loss, c + p.correct))
    } else {
        let stats = layer.target_stats(data.features, data.labels, 0, &LayerOptions::default())?;
        let loss_sum = -stats.iter().map(|s| s.log_prob as f64).sum::<f64>();
        (loss_sum, stats.iter().filter(|s| s.rank == 1).count())
    };
    let n = n.max(1) as f64;
    let loss = loss_sum / n;
    Ok(Metrics { loss, accuracy: correct as f64 / n, perplexity: loss.exp() })
}

/// The optimizer and its own settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `v ← μ·v + g; θ ← θ − lr·v` (PyTorch's form).
    Sgd { momentum: f32 },
    /// Adam with decoupled weight decay: `θ ← θ − lr·(m̂/(√v̂ + eps) + weight_decay·θ)`;
    /// the decay skips the bias.
    AdamW { beta1: f32, beta2: f32, eps: f32, weight_decay: f32 },
    /// Full-batch L-BFGS with a strong-Wolfe line search, `history` correction pairs; stops
    /// when `max |∇J| ≤ tolerance` (or when `f32` evaluations can no longer decrease `J`).
    Lbfgs { history: usize, tolerance: f64 },
}

impl Optimizer {
    /// SGD with momentum 0.9.
    pub fn sgd() -> Optimizer {
        Optimizer::Sgd { momentum: 0.9 }
    }
    /// AdamW with PyTorch's defaults (betas 0.9, 0.999; eps 1e-8; weight decay 0.01).
    pub fn adamw() -> Optimizer {
        Optimizer::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
    /// L-BFGS with 10 pairs and tolerance 1e-5 on the largest gradient entry.
    pub fn lbfgs() -> Optimizer {
        Optimizer::Lbfgs { history: 10, tolerance: 1e-5 }
    }
    /// `sgd`, `adamw` or `lbfgs`.
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd { .. } => "sgd",
            Optimizer::AdamW { .. } => "adamw",
            Optimizer::Lbfgs { .. } => "lbfgs",
        }
    }
}

/// Where and how often to write checkpoints.
#[derive(Clone, Debug)]
pub struct Checkpointing {
    pub dir: PathBuf,
    /// Every this many epochs (L-BFGS: iterations); at least 1.
    pub every: usize,
    /// Continue from the latest checkpoint in `dir`, if there is one.
    pub resume: bool,
}

/// Settings of [`train`].
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub optimizer: Optimizer,
    /// Passes over the training rows. For L-BFGS, the most iterations (`None`: until
    /// convergence, at most 10 000).
    pub epochs: Option<usize>,
    /// Rows per mini-batch (mini-batch optimizers).
    pub batch_size: usize,
    /// Peak learning rate (mini-batch optimizers).
    pub lr: f32,
    /// Linear warmup over this fraction of all steps, then cosine decay to `lr·min_lr_ratio`.
    /// With `T` steps in all and `W = round(T·warmup)`, 0-based step `s` uses
    /// `lr·(s + 1)/W` while `s < W`, then `lr·(r + (1 − r)·½·(1 + cos(π·(s − W)/(T − W))))`
    /// with `r = min_lr_ratio`. So no step has a learning rate of 0: Hugging Face's
    /// `get_cosine_schedule_with_warmup` gives its first step `lr·0/W = 0`, and this schedule
    /// is that one advanced by one step during warmup.
    pub warmup: f32,
    /// Where the cosine decay ends, as a fraction of `lr`, in `[0, 1]`.
    pub min_lr_ratio: f32,
    /// λ of the L2 penalty `(λ/2)·‖W‖²` (the bias is not penalized).
    pub l2: f32,
    /// Scale the gradient down to this global norm when it is larger.
    pub clip_norm: Option<f32>,
    /// Seed of the held-out split and the shuffles.
    pub seed: u64,
    /// This fraction of the rows (chosen by the seed) is held out and evaluated every epoch.
    pub holdout: f32,
    /// Stop when the held-out loss has not improved for this many epochs, keeping the best
    /// model.
    pub patience: Option<usize>,
    /// Number of classes; `None` takes the largest label + 1.
    pub classes: Option<usize>,
    pub checkpoint: Option<Checkpointing>,
    /// L-BFGS also stops once `J` is at most this (to time reaching a peer's objective).
    pub target_objective: Option<f64>,
    /// Precision of the layer's products in the loss, its gradients and the metrics
    /// ([`Precision::F32`] by default). The optimizer's state and updates stay f32 (f64
    /// for L-BFGS).
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optimizer: Optimizer::lbfgs(),
            epochs: None,
            batch_size: 256,
            lr: 1e-2,
            warmup: 0.05,
            min_lr_ratio: 0.0,
            l2: 0.0,
            clip_norm: None,
            seed: 0,
            holdout: 0.0,
            patience: None,
            classes: None,
            checkpoint: None,
            target_objective: None,
            precision: Precision::F32,
        }
    }
}

/// One epoch (L-BFGS: one iteration) of the history.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Mean training objective over the epoch's steps (L-BFGS: `J` at the new iterate).
    pub train_objective: f64,
    pub heldout: Option<Metrics>,
}

/// What [`train`] reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// Once, first. `first_step` > 0 when resuming.
    Start {
        total_steps: usize,
        first_step: usize,
        rows: usize,
        heldout_rows: usize,
    },
    /// After each optimizer step (L-BFGS: each iteration).
    Step {
        step: usize,
        epoch: usize,
        objective: f64,
        lr: f32,
    },
    Epoch(&'a EpochRecord),
    Checkpoint(&'a Path),
    Resumed {
        path: &'a Path,
        epoch: usize,
    },
    /// A checkpoint that could not be read (truncated or corrupt) was passed over for the
    /// one before it. Before [`Event::Resumed`], or before an error when none loads.
    /// `reason` is the error, which names the file.
    SkippedCheckpoint {
        path: &'a Path,
        reason: &'a str,
    },
    /// The held-out loss stopped improving.
    EarlyStop {
        epoch: usize,
        best_epoch: usize,
    },
    /// L-BFGS stopped: it met its tolerance (or the target objective), or no step along its
    /// direction lowers the objective measurably any more (`tolerance_met` then tells
    /// whether the gradient is small anyway: near the `f32` evaluations' floor it is; on a
    /// badly scaled problem it need not be).
    Converged {
        iterations: usize,
        max_gradient: f64,
        /// Whether the largest gradient entry is within the tolerance, or the target
        /// objective was reached.
        tolerance_met: bool,
        /// Evaluations of the loss and its gradient by this call of [`train`] (the line
        /// searches' and, unless resumed, the starting point's): L-BFGS's cost.
        evaluations: usize,
    },
}

/// What [`train`] returns.
#[derive(Clone, Debug)]
pub struct TrainOutput {
    pub model: Model,
    pub history: Vec<EpochRecord>,
    /// The objective after every step, for the loss curve.
    pub step_objectives: Vec<f64>,
    /// Final objective `J` on the training rows (with the penalty).
    pub objective: f64,
    pub train: Metrics,
    pub heldout: Option<Metrics>,
}

use crate::rng::SplitMix64 as Rng;

/// Rows per parallel chunk when the model is small enough to keep one gradient per chunk.
const CHUNK_ROWS: usize = 2048;
/// Largest `K·d` for which chunks keep their own gradient (4 MiB each).
const CHUNKED_MAX_PARAMS: usize = 1 << 20;

/// `f` over the fixed chunks of [`CHUNK_ROWS`] rows of `0..n`, in parallel; the results in
/// chunk order, whatever the thread count.
fn over_chunks<T: Send>(n: usize, f: impl Fn(std::ops::Range<usize>) -> T + Sync + Send) -> Vec<T> {
    (0..n.div_ceil(CHUNK_ROWS)).into_par_iter().map(|c| f(c * CHUNK_ROWS..((c + 1) * CHUNK_ROWS).min(n))).collect()
}

/// `model`'s weights packed for the narrow path (rows along the vector lanes; see
/// `narrow`) when it takes it: few classes, in `f32`. Packed once per call for all its
/// chunks of rows.
fn narrow_weights(model: &Model, precision: Precision) -> Option<crate::narrow::PackedWeights> {
    let (k, d) = (model.classes, model.dim);
    (precision == Precision::F32 && crate::narrow::applies(k, d))
        .then(|| crate::narrow::PackedWeights::new(crate::Kernels::best().isa(), &model.weight, k, d))
}

/// The mean cross-entropy over `rows` of `data` (all rows when `None`) and its gradient
/// with respect to `weight` and `bias`, overwriting `gw` and `gb`. The loss is summed in
/// `f64`.
///
/// Small models (`K·d` ≤ 2²⁰) split the rows into fixed chunks computed in parallel, each
/// with its own gradient, summed in chunk order; larger ones run one fused call that is
/// parallel over classes. Either way the result does not depend on the thread count.
pub fn loss_and_gradient(model: &Model, data: Data<'_>, gw: &mut [f32], gb: &mut [f32]) -> Result<f64> {
    loss_and_gradient_in(model, data, Precision::F32, gw, gb)
}

/// [`loss_and_gradient`] with the products in `precision`.
pub fn loss_and_gradient_in(
    model: &Model,
    data: Data<'_>,
    precision: Precision,
    gw: &mut [f32],
    gb: &mut [f32],
) -> Result<f64> {
    let (features, labels) = (data.features, data.labels);
    check_dim(features, model.dim)?;
    if let Some(i) = labels.iter().position(|&y| y as u64 >= model.classes as u64) {
        return Err(Error::TargetOutOfRange { index: i, value: labels[i], vocab: model.classes });
    }
    if gw.len() != model.classes * model.dim || gb.len() != model.classes {
        return Err(Error::Shape(format!(
            "gradient buffers have {} and {} elements, expected K·d = {} and K = {}",
            gw.len(),
            gb.len(),
            model.classes * model.dim,
            model.classes
        )));
    }
    let n = features.rows();
    let (k, d) = (model.classes, model.dim);
    if n == 0 {
        gw.fill(0.0);
        gb.fill(0.0);
        return Ok(0.0);
    }
    let layer = model.layer_in(precision)?;
    let opts = CrossEntropyOptions { reduction: Reduction::None, ..Default::default() };
    let up = Upstream::Scalar(1.0 / n as f32);
    let narrow = narrow_weights(model, precision);
    let one = |x: MatRef<'_>, y: &[i64], gw: &mut [f32], gb: &mut [f32]| -> Result<f64> {
        if let Some(w) = &narrow {
            gw.fill(0.0);
            gb.fill(0.0);
            let problem = crate::narrow::Problem { x, y, w, b: &model.bias, scale: 1.0 / n as f32 };
            return Ok(crate::narrow::loss_grad(&problem, gw, gb));
        }
        let g = GradientsMut { hidden: None, weight: gw, bias: Some(gb) };
        let out = loss::cross_entropy_with_grad_prechecked(&layer, x, y, &opts, up, g)?;
        Ok(out.loss.iter().map(|&l| l as f64).sum())
    };
    if k * d > CHUNKED_MAX_PARAMS || n <= CHUNK_ROWS {
        return Ok(one(features, labels, gw, gb)? / n as f64);
    }
    let chunks = over_chunks(n, |r| {
        let (mut w, mut b) = (vec![0f32; k * d], vec![0f32; k]);
        let l = one(features.sub_rows(r.clone()), &labels[r], &mut w, &mut b)?;
        Ok((l, w, b))
    })
    .into_iter()
    .collect::<Result<Vec<(f64, Vec<f32>, Vec<f32>)>>>()?;
    let mut total = 0f64;
    gw.fill(0.0);
    gb.fill(0.0);
    for (l, w, b) in &chunks {
        total += l;
        gw.iter_mut().zip(w).for_each(|(a, x)| *a += x);
        gb.iter_mut().zip(b).for_each(|(a, x)| *a += x);
    }
    Ok(total / n as f64)
}

/// The optimizer's state, all of it saved in checkpoints.
#[derive(Clone, Debug, PartialEq)]
enum OptState {
    Sgd { velocity: Vec<f32> },
    AdamW { m: Vec<f32>, v: Vec<f32> },
    Lbfgs(Lbfgs),
}

/// L-BFGS in `f64` over the flat parameters `[weight, bias]`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Lbfgs {
    pub(crate) x: Vec<f64>,
    pub(crate) f: f64,
    pub(crate) g: Vec<f64>,
    /// Correction pairs, oldest first.
    s: Vec<Vec<f64>>,
    y: Vec<Vec<f64>>,
    done: bool,
}

impl Lbfgs {
    /// A fresh state at `x`, where the objective is `f` with gradient `g`.
    pub(crate) fn new(x: Vec<f64>, f: f64, g: Vec<f64>) -> Lbfgs {
        Lbfgs { x, f, g, s: vec![], y: vec![], done: false }
    }
}

/// Everything a run carries from one epoch to the next.
#[derive(Clone, Debug)]
struct RunState {
    model: Model,
    opt: OptState,
    step: usize,
    epoch: usize,
    rng: Rng,
    history: Vec<EpochRecord>,
    step_objectives: Vec<f64>,
    best: Option<(f64, usize, Model)>,
}

impl RunState {
    /// Whether early stopping ended the run at this state: the held-out loss has not
    /// improved for `patience` epochs (at least one; an improving epoch never stops). It
    /// follows from the state, so a checkpoint needs no flag for it, and a resume from the
    /// stopping epoch's checkpoint returns `best` without training further.
    fn stopped(&self, patience: Option<usize>) -> bool {
        match (patience, &self.best) {
            (Some(p), Some((_, best_epoch, _))) => self.epoch - best_epoch >= p.max(1),
            _ => false,
        }
    }
}

/// Trains a softmax layer on `data` and returns the model with its history.
///
/// With `cfg.holdout > 0`, a seeded random fraction of the rows is held out (both parts are
/// copied once); [`train_with_heldout`] takes a held-out set of its own instead.
///
/// `on_event` sees progress as it happens (a progress bar, a log); it cannot change the run.
pub fn train(data: Data<'_>, cfg: &TrainConfig, on_event: impl FnMut(Event<'_>)) -> Result<TrainOutput> {
    let (n_all, d) = (data.rows(), data.features.cols());
    let classes = classes_of(cfg, &[data])?;
    check_config(cfg, n_all, classes, cfg.holdout > 0.0)?;
    if cfg.holdout == 0.0 {
        return run_training(data, None, cfg, classes, n_all, on_event);
    }
    // The held-out split: a seeded permutation, its tail held out.
    let mut order: Vec<usize> = (0..n_all).collect();
    Rng::new(cfg.seed ^ 0x0005_EED0_F591).shuffle(&mut order);
    let n_held = ((n_all as f64) * cfg.holdout as f64).round() as usize;
    let (train_idx, held_idx) = order.split_at(n_all - n_held);
    let (mut train_idx, mut held_idx) = (train_idx.to_vec(), held_idx.to_vec());
    train_idx.sort_unstable();
    held_idx.sort_unstable();
    let gather = |idx: &[usize]| -> (Vec<f32>, Vec<i64>) {
        let mut x = Vec::with_capacity(idx.len() * d);
        for &i in idx {
            x.extend_from_slice(data.features.row(i));
        }
        (x, idx.iter().map(|&i| data.labels[i]).collect())
    };
    let (tx, ty) = gather(&train_idx);
    let (hx, hy) = gather(&held_idx);
    // Rows of checked data.
    let train_data = Data { features: MatRef::new(&tx, train_idx.len(), d)?, labels: &ty };
    let held = Data { features: MatRef::new(&hx, n_held, d)?, labels: &hy };
    run_training(train_data, Some(held), cfg, classes, n_all, on_event)
}

/// [`train`] with a held-out set of its own (`cfg.holdout` must be 0), evaluated every
/// epoch and used for early stopping; nothing is copied.
pub fn train_with_heldout(
    data: Data<'_>,
    heldout: Data<'_>,
    cfg: &TrainConfig,
    on_event: impl FnMut(Event<'_>),
) -> Result<TrainOutput> {
    if cfg.holdout != 0.0 {
        return Err(Error::InvalidArgument("give either a holdout fraction or a held-out set, not both".into()));
    }
    if heldout.features.cols() != data.features.cols() {
        return Err(Error::Shape(format!(
            "the held-out features have {} columns, the training features {}",
            heldout.features.cols(),
            data.features.cols()
        )));
    }
    let classes = classes_of(cfg, &[data, heldout])?;
    check_config(cfg, data.rows(), classes, heldout.rows() > 0)?;
    let held = (heldout.rows() > 0).then_some(heldout);
    run_training(data, held, cfg, classes, data.rows() + heldout.rows(), on_event)
}

/// The most classes the labels may imply on their own (2^24, the longest rows the layer is
/// built for): a larger label is far more likely a mistake than a class, and would allocate
/// `K · d` weights and their optimizer state; [`TrainConfig::classes`] allows more.
pub const MAX_IMPLIED_CLASSES: usize = 1 << 24;

/// `cfg.classes`, checked against every label, or the largest label + 1.
fn classes_of(cfg: &TrainConfig, sets: &[Data<'_>]) -> Result<usize> {
    let d = sets.first().map_or(0, |s| s.features.cols());
    let k = classes_checked(cfg, sets)?;
    if k.checked_mul(d + 1).is_none_or(|p| p > isize::MAX as usize / 16) {
        return Err(Error::InvalidArgument(format!("{k} classes of {d} features are too many parameters to hold")));
    }
    Ok(k)
}

fn classes_checked(cfg: &TrainConfig, sets: &[Data<'_>]) -> Result<usize> {
    match cfg.classes {
        Some(k) => {
            for set in sets {
                if let Some(i) = set.labels.iter().position(|&y| y as u64 >= k as u64) {
                    return Err(Error::InvalidArgument(format!(
                        "labels[{i}] = {} is not a class id below the {k} classes asked for",
                        set.labels[i]
                    )));
                }
            }
            Ok(k)
        }
        None => {
            for set in sets {
                if let Some(i) = set.labels.iter().position(|&y| y as u64 >= MAX_IMPLIED_CLASSES as u64) {
                    return Err(Error::InvalidArgument(format!(
                        "labels[{i}] = {} would make {} classes (more than {MAX_IMPLIED_CLASSES}); set the number \
                         of classes (--classes) if that is intended",
                        set.labels[i],
                        set.labels[i] as u64 + 1
                    )));
                }
            }
            Ok(sets.iter().map(Data::implied_classes).max().unwrap_or(0))
        }
    }
}

/// Epochs of a mini-batch optimizer when [`TrainConfig::epochs`] is `None`.
const DEFAULT_EPOCHS: usize = 10;

/// The training loop proper, over checked training rows and an optional held-out set.
fn run_training(
    train_data: Data<'_>,
    held: Option<Data<'_>>,
    cfg: &TrainConfig,
    classes: usize,
    n_all: usize,
    mut on_event: impl FnMut(Event<'_>),
) -> Result<TrainOutput> {
    let (train_view, train_y) = (train_data.features, train_data.labels);
    let (n, d) = (train_view.rows(), train_view.cols());
    let n_held = held.map_or(0, |h| h.rows());
    let is_lbfgs = matches!(cfg.optimizer, Optimizer::Lbfgs { .. });
    let steps_per_epoch = if is_lbfgs { 1 } else { n.div_ceil(cfg.batch_size) };
    let epochs = cfg.epochs.unwrap_or(if is_lbfgs { 10_000 } else { DEFAULT_EPOCHS });
    let total_steps = epochs * steps_per_epoch;

    // The model, its gradient and the optimizer's state, sized before any is allocated: an
    // absurd class count is an error here, not an abort (the probe is never touched, so a
    // feasible size costs nothing).
    let per_param = match cfg.optimizer {
        Optimizer::Lbfgs { history, .. } => history.saturating_mul(16).saturating_add(32),
        _ => 16,
    };
    let bytes = (classes * d + classes).saturating_mul(per_param);
    if Vec::<u8>::new().try_reserve_exact(bytes).is_err() {
        return Err(Error::InvalidArgument(format!(
            "{classes} classes of {d} features need about {:.3e} bytes for the model and the optimizer's state, \
             more than can be allocated",
            bytes as f64
        )));
    }
    let data = cfg
        .checkpoint
        .as_ref()
        .map(|_| data_digest(&[Some(train_data), held].into_iter().flatten().collect::<Vec<_>>()));
    let fields = fingerprint_fields(cfg, n_all, d, classes, data);
    let fingerprint = fingerprint(&fields);
    // L-BFGS's objective J and its gradient at a flat point.
    let objective = |x: &[f64]| objective_f64(x, classes, d, train_data, cfg.l2, cfg.precision);
    // Loss-and-gradient evaluations by L-BFGS in this call.
    let mut evaluations = 0usize;
    // Resume from the newest checkpoint that loads; a damaged one is skipped (and said), an
    // older one of the same run taking its place.
    let mut resumed = None;
    let mut damaged = Vec::new();
    for path in cfg.checkpoint.as_ref().filter(|c| c.resume).map_or_else(Vec::new, |c| checkpoints(&c.dir)) {
        match load_checkpoint(&path, &fields, cfg.optimizer, classes, d) {
            Ok(st) => {
                resumed = Some((path, st));
                break;
            }
            Err(NotResumed::OtherRun(e)) => return Err(e),
            Err(NotResumed::Damaged(e)) => {
                on_event(Event::SkippedCheckpoint { path: &path, reason: &e.to_string() });
                damaged.push(e.to_string());
            }
        }
    }
    if resumed.is_none() && !damaged.is_empty() {
        // Starting over would silently discard the run.
        return Err(Error::InvalidArgument(format!(
            "--resume: no checkpoint could be loaded ({}); remove the folder's checkpoints to start over",
            damaged.join("; ")
        )));
    }
    let mut st = match resumed {
        Some((path, st)) => {
            if st.epoch > epochs {
                return Err(Error::InvalidArgument(format!(
                    "{}: the checkpoint is at epoch {}, past the {epochs} epochs asked for",
                    path.display(),
                    st.epoch
                )));
            }
            on_event(Event::Resumed { path: &path, epoch: st.epoch });
            // (A resume that trains no further writes no checkpoint, which would clear them.)
            if let Some(c) = &cfg.checkpoint {
                clear_temporary_files(&c.dir);
            }
            st
        }
        None => {
            let model = Model::zeros(classes, d);
            let p = classes * d;
            let opt = match cfg.optimizer {
                Optimizer::Sgd { .. } => OptState::Sgd { velocity: vec![0.0; p + classes] },
                Optimizer::AdamW { .. } => OptState::AdamW { m: vec![0.0; p + classes], v: vec![0.0; p + classes] },
                Optimizer::Lbfgs { .. } => {
                    let mut lb =
                        Lbfgs { x: vec![0.0; p + classes], f: 0.0, g: Vec::new(), s: vec![], y: vec![], done: false };
                    let (f, g) = objective(&lb.x)?;
                    evaluations += 1;
                    lb.f = f;
                    lb.g = g;
                    OptState::Lbfgs(lb)
                }
            };
            RunState {
                model,
                opt,
                step: 0,
                epoch: 0,
                rng: Rng::new(cfg.seed),
                history: vec![],
                step_objectives: vec![],
                best: None,
            }
        }
    };
    on_event(Event::Start { total_steps, first_step: st.step, rows: n, heldout_rows: n_held });

    let p = classes * d;
    let (mut gw, mut gb) = (vec![0f32; p], vec![0f32; classes]);
    let mut batch_x: Vec<f32> = Vec::new();
    let mut batch_y: Vec<i64> = Vec::new();
    while st.epoch < epochs && !st.stopped(cfg.patience) {
        let epoch = st.epoch + 1;
        let train_objective = if let OptState::Lbfgs(lb) = &mut st.opt {
            if lb.done {
                break;
            }
            let Optimizer::Lbfgs { history, tolerance } = cfg.optimizer else { unreachable!() };
            let (converged, evals) = lbfgs_iteration(lb, history, tolerance, objective)?;
            evaluations += evals;
            let reached = cfg.target_objective.is_some_and(|t| lb.f <= t);
            let converged = converged || reached;
            st.model = model_from_flat(&lb.x, classes, d);
            st.step += 1;
            st.step_objectives.push(lb.f);
            on_event(Event::Step { step: st.step, epoch, objective: lb.f, lr: 0.0 });
            if converged {
                lb.done = true;
                let max_gradient = max_abs(&lb.g);
                let tolerance_met = reached || max_gradient <= tolerance;
                on_event(Event::Converged { iterations: st.step, max_gradient, tolerance_met, evaluations });
            }
            lb.f
        } else {
            let mut perm: Vec<usize> = (0..n).collect();
            st.rng.shuffle(&mut perm);
            let mut sum = 0f64;
            for batch in perm.chunks(cfg.batch_size) {
                batch_x.clear();
                batch_y.clear();
                for &i in batch {
                    batch_x.extend_from_slice(train_view.row(i));
                    batch_y.push(train_y[i]);
                }
                // Rows of already checked data.
                let batch_data = Data { features: MatRef::new(&batch_x, batch.len(), d)?, labels: &batch_y };
                let loss = loss_and_gradient_in(&st.model, batch_data, cfg.precision, &mut gw, &mut gb).map_err(
                    |e| match e {
                        // Inputs were checked: a non-finite weight now is the optimizer's doing.
                        Error::NonFinite { tensor, .. } | Error::NonFiniteEntry { tensor, .. }
                            if tensor == "weight" || tensor == "bias" =>
                        {
                            Error::InvalidArgument(format!(
                                "training diverged at step {}: the model's {tensor} is no longer finite; \
                                 lower the learning rate (or the weight decay)",
                                st.step + 1
                            ))
                        }
                        e => e,
                    },
                )?;
                let objective = loss + penalty(&st.model.weight, cfg.l2);
                let lr = lr_at(cfg, st.step, total_steps);
                minibatch_step(&mut st, cfg, &mut gw, &mut gb, lr);
                st.step += 1;
                sum += objective;
                st.step_objectives.push(objective);
                on_event(Event::Step { step: st.step, epoch, objective, lr });
            }
            sum / steps_per_epoch as f64
        };
        st.epoch = epoch;
        let heldout = held.map(|h| evaluate_in(&st.model, h, cfg.precision)).transpose()?;
        let rec = EpochRecord { epoch, train_objective, heldout };
        st.history.push(rec);
        on_event(Event::Epoch(&rec));
        if let (Some(patience), Some(m)) = (cfg.patience, heldout) {
            if st.best.as_ref().is_none_or(|b| m.loss < b.0) {
                st.best = Some((m.loss, epoch, st.model.clone()));
            }
            if st.stopped(Some(patience)) {
                on_event(Event::EarlyStop { epoch, best_epoch: st.best.as_ref().map_or(0, |b| b.1) });
            }
        }
        let finished =
            st.stopped(cfg.patience) || st.epoch == epochs || matches!(&st.opt, OptState::Lbfgs(lb) if lb.done);
        if let Some(c) = &cfg.checkpoint
            && (epoch % c.every.max(1) == 0 || finished)
        {
            let path = save_checkpoint(&c.dir, &st, &fingerprint)?;
            on_event(Event::Checkpoint(&path));
        }
    }
    let model = match (st.stopped(cfg.patience), st.best) {
        (true, Some((_, _, m))) => m,
        _ => st.model,
    };
    // One fused forward pass gives the training loss (the mean −log p) and the accuracy.
    let train_metrics = evaluate_in(&model, train_data, cfg.precision)?;
    let heldout = held.map(|h| evaluate_in(&model, h, cfg.precision)).transpose()?;
    Ok(TrainOutput {
        objective: train_metrics.loss + penalty(&model.weight, cfg.l2),
        model,
        history: st.history,
        step_objectives: st.step_objectives,
        train: train_metrics,
        heldout,
    })
}

fn check_config(cfg: &TrainConfig, n: usize, classes: usize, has_heldout: bool) -> Result<()> {
    let bad = |s: String| Err(Error::InvalidArgument(s));
    if n == 0 {
        return bad("there are no training rows".into());
    }
    if classes < 2 {
        return bad(format!("training needs at least 2 classes, the labels give {classes}"));
    }
    if cfg.batch_size == 0 {
        return bad("batch size must be at least 1".into());
    }
    if cfg.epochs == Some(0) {
        return bad("epochs must be at least 1".into());
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return bad(format!("learning rate must be finite and > 0, got {}", cfg.lr));
    }
    if !(0.0..1.0).contains(&cfg.warmup) {
        return bad(format!("warmup must be a fraction of the steps in [0, 1), got {}", cfg.warmup));
    }
    if !(0.0..=1.0).contains(&cfg.min_lr_ratio) {
        return bad(format!("min_lr_ratio must be in [0, 1], got {}", cfg.min_lr_ratio));
    }
    if !(cfg.l2.is_finite() && cfg.l2 >= 0.0) {
        return bad(format!("l2 must be finite and >= 0, got {}", cfg.l2));
    }
    if cfg.clip_norm.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
        return bad(format!("clip norm must be finite and > 0, got {}", cfg.clip_norm.unwrap_or(0.0)));
    }
    if !(0.0..1.0).contains(&cfg.holdout)
        || (cfg.holdout > 0.0 && ((n as f64) * cfg.holdout as f64).round() as usize >= n)
    {
        return bad(format!("holdout must be in [0, 1) and leave training rows, got {}", cfg.holdout));
    }
    if cfg.holdout > 0.0 && ((n as f64) * cfg.holdout as f64).round() as usize == 0 {
        return bad(format!("holdout {} of {n} rows holds out no row; raise it or leave it at 0", cfg.holdout));
    }
    if cfg.patience.is_some() && !has_heldout {
        return bad("early stopping (patience) needs a held-out split".into());
    }
    match cfg.optimizer {
        Optimizer::Sgd { momentum } if !(0.0..1.0).contains(&momentum) => {
            bad(format!("momentum must be in [0, 1), got {momentum}"))
        }
        Optimizer::AdamW { beta1, beta2, eps, weight_decay }
            if !((0.0..1.0).contains(&beta1)
                && (0.0..1.0).contains(&beta2)
                && eps > 0.0
                && weight_decay.is_finite()
                && weight_decay >= 0.0) =>
        {
            bad(format!(
                "AdamW needs betas in [0, 1), eps > 0, weight_decay >= 0; got {beta1}, {beta2}, {eps}, {weight_decay}"
            ))
        }
        Optimizer::Lbfgs { history: 0, .. } => bad("L-BFGS needs a history of at least 1 pair".into()),
        Optimizer::Lbfgs { tolerance, .. } if tolerance.is_nan() || tolerance <= 0.0 => {
            bad(format!("the L-BFGS tolerance must be > 0, got {tolerance}"))
        }
        _ => Ok(()),
    }
}

/// `(λ/2)·‖W‖²`.
fn penalty(weight: &[f32], l2: f32) -> f64 {
    if l2 == 0.0 {
        return 0.0;
    }
    0.5 * l2 as f64 * weight.iter().map(|&w| w as f64 * w as f64).sum::<f64>()
}

/// Warmup then cosine, at 0-based `step` of `total`.
fn lr_at(cfg: &TrainConfig, step: usize, total: usize) -> f32 {
    let warm = ((total as f64) * cfg.warmup as f64).round() as usize;
    let lr = cfg.lr as f64;
    if step < warm {
        return (lr * (step + 1) as f64 / warm as f64) as f32;
    }
    let span = (total - warm).max(1) as f64;
    let t = ((step - warm) as f64 / span).min(1.0);
    let floor = cfg.min_lr_ratio as f64;
    (lr * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))) as f32
}

fn minibatch_step(st: &mut RunState, cfg: &TrainConfig, gw: &mut [f32], gb: &mut [f32], lr: f32) {
    let p = gw.len();
    if cfg.l2 > 0.0 {
        gw.iter_mut().zip(&st.model.weight).for_each(|(g, w)| *g += cfg.l2 * w);
    }
    if let Some(clip) = cfg.clip_norm {
        let norm = gw.iter().chain(gb.iter()).map(|&g| g as f64 * g as f64).sum::<f64>().sqrt();
        if norm > clip as f64 {
            let s = (clip as f64 / norm) as f32;
            gw.iter_mut().chain(gb.iter_mut()).for_each(|g| *g *= s);
        }
    }
    let step = st.step + 1;
    let params = st.model.weight.iter_mut().chain(st.model.bias.iter_mut());
    let grads = gw.iter().chain(gb.iter());
    match (&mut st.opt, cfg.optimizer) {
        (OptState::Sgd { velocity }, Optimizer::Sgd { momentum }) => {
            for ((w, &g), v) in params.zip(grads).zip(velocity.iter_mut()) {
                *v = momentum * *v + g;
                *w -= lr * *v;
            }
        }
        (OptState::AdamW { m, v }, Optimizer::AdamW { beta1, beta2, eps, weight_decay }) => {
            let bc1 = 1.0 - (beta1 as f64).powi(step as i32);
            let bc2 = 1.0 - (beta2 as f64).powi(step as i32);
            let (a, s2) = ((lr as f64 / bc1) as f32, (1.0 / bc2.sqrt()) as f32);
            for (i, ((w, &g), (m, v))) in params.zip(grads).zip(m.iter_mut().zip(v.iter_mut())).enumerate() {
                if i < p {
                    *w *= 1.0 - lr * weight_decay;
                }
                *m = beta1 * *m + (1.0 - beta1) * g;
                *v = beta2 * *v + (1.0 - beta2) * g * g;
                *w -= a * *m / (v.sqrt() * s2 + eps);
            }
        }
        _ => unreachable!("optimizer state matches the optimizer"),
    }
}

fn model_from_flat(x: &[f64], classes: usize, d: usize) -> Model {
    let p = classes * d;
    Model {
        weight: x[..p].iter().map(|&v| v as f32).collect(),
        bias: x[p..].iter().map(|&v| v as f32).collect(),
        classes,
        dim: d,
    }
}

/// `J` and `∇J` at the flat `f64` point `x`, evaluated through the `f32` model.
fn objective_f64(
    x: &[f64],
    classes: usize,
    d: usize,
    data: Data<'_>,
    l2: f32,
    precision: Precision,
) -> Result<(f64, Vec<f64>)> {
    let model = model_from_flat(x, classes, d);
    let p = classes * d;
    let (mut gw, mut gb) = (vec![0f32; p], vec![0f32; classes]);
    let loss = loss_and_gradient_in(&model, data, precision, &mut gw, &mut gb)?;
    let l2 = l2 as f64;
    let mut g: Vec<f64> = gw.iter().chain(&gb).map(|&v| v as f64).collect();
    let mut pen = 0.0;
    for (gi, &xi) in g[..p].iter_mut().zip(&x[..p]) {
        *gi += l2 * xi;
        pen += xi * xi;
    }
    Ok((loss + 0.5 * l2 * pen, g))
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, &x| m.max(x.abs()))
}

fn dotf(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One L-BFGS iteration on `objective` (`J` and `∇J` at a point): direction by the two-loop
/// recursion, step by a strong-Wolfe line search. Returns whether it has converged, and how
/// many evaluations the line search made.
pub(crate) fn lbfgs_iteration(
    lb: &mut Lbfgs,
    history: usize,
    tolerance: f64,
    objective: impl Fn(&[f64]) -> Result<(f64, Vec<f64>)>,
) -> Result<(bool, usize)> {
    if max_abs(&lb.g) <= tolerance {
        return Ok((true, 0));
    }
    // Two-loop recursion: dir = −H·g.
    let mut q = lb.g.clone();
    let m = lb.s.len();
    let mut alpha = vec![0.0; m];
    for i in (0..m).rev() {
        let rho = 1.0 / dotf(&lb.y[i], &lb.s[i]);
        alpha[i] = rho * dotf(&lb.s[i], &q);
        q.iter_mut().zip(&lb.y[i]).for_each(|(q, y)| *q -= alpha[i] * y);
    }
    let gamma = if m > 0 { dotf(&lb.s[m - 1], &lb.y[m - 1]) / dotf(&lb.y[m - 1], &lb.y[m - 1]) } else { 1.0 };
    q.iter_mut().for_each(|q| *q *= gamma);
    for ((s, y), a) in lb.s.iter().zip(&lb.y).zip(&alpha) {
        let beta = dotf(y, &q) / dotf(y, s);
        q.iter_mut().zip(s).for_each(|(q, s)| *q += (a - beta) * s);
    }
    let mut dir: Vec<f64> = q.iter().map(|v| -v).collect();
    let mut dg = dotf(&dir, &lb.g);
    if dg.is_nan() || dg >= 0.0 {
        // Not a descent direction (history spoiled by f32 noise): restart along −g.
        lb.s.clear();
        lb.y.clear();
        dir = lb.g.iter().map(|v| -v).collect();
        dg = dotf(&dir, &lb.g);
    }
    let t0 = if m == 0 { (1.0 / dotf(&lb.g, &lb.g).sqrt().max(1e-12)).min(1.0) } else { 1.0 };
    let evaluations = std::cell::Cell::new(0);
    let eval = |t: f64| -> Result<(f64, Vec<f64>, Vec<f64>)> {
        evaluations.set(evaluations.get() + 1);
        let x: Vec<f64> = lb.x.iter().zip(&dir).map(|(x, p)| x + t * p).collect();
        let (f, g) = objective(&x)?;
        Ok((f, g, x))
    };
    let Some((f, g, x)) = wolfe_search(lb.f, dg, t0, &dir, eval)? else {
        // No decrease is measurable any more: the f32 evaluation's floor.
        return Ok((true, evaluations.get()));
    };
    let s: Vec<f64> = x.iter().zip(&lb.x).map(|(a, b)| a - b).collect();
    let y: Vec<f64> = g.iter().zip(&lb.g).map(|(a, b)| a - b).collect();
    let sy = dotf(&s, &y);
    if sy > 1e-12 * dotf(&y, &y).sqrt() * dotf(&s, &s).sqrt() {
        if lb.s.len() == history {
            lb.s.remove(0);
            lb.y.remove(0);
        }
        lb.s.push(s);
        lb.y.push(y);
    }
    let df = lb.f - f;
    lb.x = x;
    lb.g = g;
    lb.f = f;
    Ok((max_abs(&lb.g) <= tolerance || df.abs() <= 1e-15 * f.abs().max(1.0), evaluations.get()))
}

type Point = (f64, Vec<f64>, Vec<f64>);

/// Strong-Wolfe line search (Nocedal & Wright, algorithms 3.5 and 3.6, with safeguarded
/// cubic interpolation), c1 = 1e-4, c2 = 0.9. `None` when no step decreases `f`.
fn wolfe_search(
    f0: f64,
    dg0: f64,
    t0: f64,
    dir: &[f64],
    mut eval: impl FnMut(f64) -> Result<Point>,
) -> Result<Option<Point>> {
    const C1: f64 = 1e-4;
    const C2: f64 = 0.9;
    let slope = |p: &Point| dotf(&p.1, dir);
    let (mut t_prev, mut f_prev, mut dg_prev) = (0.0, f0, dg0);
    let mut t = t0;
    let mut best: Option<(f64, Point)> = None;
    let keep_best = |t: f64, p: &Point, best: &mut Option<(f64, Point)>| {
        if p.0 < f0 && best.as_ref().is_none_or(|b| p.0 < b.1.0) {
            *best = Some((t, p.clone()));
        }
    };
    for i in 0..20 {
        let p = eval(t)?;
        keep_best(t, &p, &mut best);
        let dg = slope(&p);
        if p.0 > f0 + C1 * t * dg0 || (i > 0 && p.0 >= f_prev) {
            return zoom(f0, dg0, (t_prev, f_prev, dg_prev), (t, p.0, dg), dir, &mut eval, best);
        }
        if dg.abs() <= -C2 * dg0 {
            return Ok(Some(p));
        }
        if dg >= 0.0 {
            return zoom(f0, dg0, (t, p.0, dg), (t_prev, f_prev, dg_prev), dir, &mut eval, best);
        }
        // Still descending steeply: expand, to where the slope would vanish if it kept
        // rising as it did from the last point (secant), within 2x..8x.
        let secant = if dg > dg_prev { t - dg * (t - t_prev) / (dg - dg_prev) } else { f64::INFINITY };
        (t_prev, f_prev, dg_prev) = (t, p.0, dg);
        t = secant.clamp(2.0 * t, 8.0 * t);
    }
    Ok(best.map(|b| b.1))
}

/// Minimizer of the cubic through `(a, fa, ga)` and `(b, fb, gb)`, kept inside the bracket.
fn cubic_min(a: f64, fa: f64, ga: f64, b: f64, fb: f64, gb: f64) -> f64 {
    let d1 = ga + gb - 3.0 * (fa - fb) / (a - b);
    let disc = d1 * d1 - ga * gb;
    let (lo, hi) = (a.min(b), a.max(b));
    let mid = 0.5 * (a + b);
    if disc < 0.0 {
        return mid;
    }
    let d2 = (b - a).signum() * disc.sqrt();
    let t = b - (b - a) * (gb + d2 - d1) / (gb - ga + 2.0 * d2);
    let margin = 0.1 * (hi - lo);
    if t.is_finite() && t > lo + margin && t < hi - margin { t } else { mid }
}

#[allow(clippy::too_many_arguments)]
fn zoom(
    f0: f64,
    dg0: f64,
    mut lo: (f64, f64, f64),
    mut hi: (f64, f64, f64),
    dir: &[f64],
    eval: &mut impl FnMut(f64) -> Result<Point>,
    mut best: Option<(f64, Point)>,
) -> Result<Option<Point>> {
    const C1: f64 = 1e-4;
    const C2: f64 = 0.9;
    for _ in 0..30 {
        let t = cubic_min(lo.0, lo.1, lo.2, hi.0, hi.1, hi.2);
        let p = eval(t)?;
        if p.0 < f0 && best.as_ref().is_none_or(|b| p.0 < b.1.0) {
            best = Some((t, p.clone()));
        }
        let dg = dotf(&p.1, dir);
        if p.0 > f0 + C1 * t * dg0 || p.0 >= lo.1 {
            hi = (t, p.0, dg);
        } else {
            if dg.abs() <= -C2 * dg0 {
                return Ok(Some(p));
            }
            if dg * (hi.0 - lo.0) >= 0.0 {
                hi = lo;
            }
            lo = (t, p.0, dg);
        }
        if (hi.0 - lo.0).abs() <= 1e-12 * lo.0.abs().max(1e-12) {
            break;
        }
    }
    Ok(best.map(|b| b.1))
}

// ---- checkpoints ----

const CKPT_PREFIX: &str = "checkpoint-";
const CKPT_SUFFIX: &str = ".safetensors";

/// A 64-bit digest of the features' bits and the labels, in row order (not cryptographic:
/// it tells a run's own data from other data, in parallel over fixed chunks of rows).
fn data_digest(sets: &[Data<'_>]) -> u64 {
    let mix = |h: u64, w: u64| {
        let h = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 29)
    };
    sets.iter().fold(0x5EED_u64, |acc, set| {
        let parts = over_chunks(set.rows(), |r| {
            r.fold(0u64, |h, i| {
                let row = set.features.row(i).iter().fold(h, |h, v| mix(h, v.to_bits() as u64));
                mix(row, set.labels[i] as u64)
            })
        });
        parts.into_iter().fold(acc, mix)
    })
}

/// The settings a checkpoint must share with the run that resumes it, in order, as
/// `(key, value)`; a setting without a value is left out of the fingerprint (so that
/// checkpoints written before it existed still resume). Every key is listed, with or
/// without a value: [`fingerprint_diff`] parses stored fingerprints with these keys.
fn fingerprint_fields(
    cfg: &TrainConfig,
    n: usize,
    d: usize,
    classes: usize,
    data: Option<u64>,
) -> Vec<(&'static str, Option<String>)> {
    let s = |v: String| Some(v);
    vec![
        ("optimizer", s(format!("{:?}", cfg.optimizer))),
        ("batch", s(cfg.batch_size.to_string())),
        ("lr", s(cfg.lr.to_string())),
        ("warmup", s(cfg.warmup.to_string())),
        ("min_lr_ratio", s(cfg.min_lr_ratio.to_string())),
        ("l2", s(cfg.l2.to_string())),
        ("clip", s(format!("{:?}", cfg.clip_norm))),
        ("seed", s(cfg.seed.to_string())),
        ("holdout", s(cfg.holdout.to_string())),
        ("patience", s(format!("{:?}", cfg.patience))),
        ("rows", s(n.to_string())),
        ("d", s(d.to_string())),
        ("K", s(classes.to_string())),
        // (Absent for f32, the setting's default before it existed.)
        ("precision", (cfg.precision != Precision::F32).then(|| cfg.precision.to_string())),
        // The learning-rate schedule spans all epochs: another count is another run.
        // (L-BFGS's epochs only cap its iterations: a resumed run may ask for more.)
        (
            "epochs",
            (!matches!(cfg.optimizer, Optimizer::Lbfgs { .. }))
                .then(|| cfg.epochs.unwrap_or(DEFAULT_EPOCHS).to_string()),
        ),
        // A digest of the rows and labels (with checkpoints only), so that a checkpoint of
        // other data of the same shape is refused too.
        ("data", data.map(|x| format!("{x:016x}"))),
    ]
}

/// `key=value` for each field with a value, joined by spaces.
fn fingerprint(fields: &[(&'static str, Option<String>)]) -> String {
    let set: Vec<String> = fields.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}"))).collect();
    set.join(" ")
}

/// What differs between a stored fingerprint and this run's fields, setting by setting:
/// `epochs 3 there, 6 here`.
fn fingerprint_diff(there: &str, here: &[(&'static str, Option<String>)]) -> String {
    // `key=value` pairs, a value running to the next known key (the optimizer's holds spaces).
    let mut at: Vec<(usize, &str)> = here
        .iter()
        .filter_map(|&(k, _)| {
            let pat = format!("{k}=");
            there.match_indices(&pat).find(|(i, _)| *i == 0 || there.as_bytes()[i - 1] == b' ').map(|(i, _)| (i, k))
        })
        .collect();
    at.sort();
    let stored = |key: &str| {
        let n = at.iter().position(|x| x.1 == key)?;
        let (i, k) = at[n];
        let end = at.get(n + 1).map_or(there.len(), |x| x.0);
        Some(there[i + k.len() + 1..end].trim().to_string())
    };
    let diffs: Vec<String> = here
        .iter()
        .filter_map(|(k, y)| {
            let x = stored(k);
            (x != *y).then(|| {
                let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "unset".into());
                if *k == "data" {
                    "other data (rows or labels)".to_string()
                } else {
                    format!("{k} {} there, {} here", show(x.as_ref()), show(y.as_ref()))
                }
            })
        })
        .collect();
    if diffs.is_empty() { "settings differ".into() } else { diffs.join("; ") }
}

/// The checkpoint with the highest epoch in `dir`, if any.
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    checkpoints(dir).into_iter().next()
}

/// The checkpoints in `dir`, newest (highest epoch) first.
fn checkpoints(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let epoch: usize = name.strip_prefix(CKPT_PREFIX)?.strip_suffix(CKPT_SUFFIX)?.parse().ok()?;
            Some((epoch, dir.join(name)))
        })
        .collect();
    found.sort_by_key(|x| std::cmp::Reverse(x.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// Removes the temporary files that a run killed while writing left in a checkpoint folder.
fn clear_temporary_files(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_str().is_some_and(|n| n.starts_with(io::TEMP_PREFIX)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn save_checkpoint(dir: &Path, st: &RunState, fingerprint: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    let path = dir.join(format!("{CKPT_PREFIX}{:08}{CKPT_SUFFIX}", st.epoch));
    let (k, d) = (st.model.classes, st.model.dim);
    let p = k * d + k;
    let mut meta = HashMap::new();
    meta.insert("fingerprint".to_string(), fingerprint.to_string());
    meta.insert("format".to_string(), "softmax-layer checkpoint 1".to_string());
    let counters = [st.step as i64, st.epoch as i64, st.rng.state() as i64];
    let hist: Vec<f64> = st
        .history
        .iter()
        .flat_map(|r| {
            let h = r.heldout;
            [
                r.epoch as f64,
                r.train_objective,
                h.map_or(f64::NAN, |m| m.loss),
                h.map_or(f64::NAN, |m| m.accuracy),
                if h.is_some() { 1.0 } else { 0.0 },
            ]
        })
        .collect();
    let mut t: Vec<(&str, Vec<usize>, OutTensor<'_>)> = vec![
        ("weight", vec![k, d], OutTensor::F32(&st.model.weight)),
        ("bias", vec![k], OutTensor::F32(&st.model.bias)),
        ("counters", vec![3], OutTensor::I64(&counters)),
        ("history", vec![st.history.len(), 5], OutTensor::F64(&hist)),
        ("step_objectives", vec![st.step_objectives.len()], OutTensor::F64(&st.step_objectives)),
    ];
    let best_meta;
    if let Some((loss, epoch, m)) = &st.best {
        best_meta = [*loss, *epoch as f64];
        t.push(("best_weight", vec![k, d], OutTensor::F32(&m.weight)));
        t.push(("best_bias", vec![k], OutTensor::F32(&m.bias)));
        t.push(("best_meta", vec![2], OutTensor::F64(&best_meta)));
    }
    let lb_scalars;
    let (s_flat, y_flat);
    match &st.opt {
        OptState::Sgd { velocity } => t.push(("opt.velocity", vec![p], OutTensor::F32(velocity))),
        OptState::AdamW { m, v } => {
            t.push(("opt.m", vec![p], OutTensor::F32(m)));
            t.push(("opt.v", vec![p], OutTensor::F32(v)));
        }
        OptState::Lbfgs(lb) => {
            lb_scalars = [lb.f, if lb.done { 1.0 } else { 0.0 }];
            s_flat = lb.s.concat();
            y_flat = lb.y.concat();
            t.push(("opt.x", vec![p], OutTensor::F64(&lb.x)));
            t.push(("opt.g", vec![p], OutTensor::F64(&lb.g)));
            t.push(("opt.scalars", vec![2], OutTensor::F64(&lb_scalars)));
            t.push(("opt.s", vec![lb.s.len(), p], OutTensor::F64(&s_flat)));
            t.push(("opt.y", vec![lb.y.len(), p], OutTensor::F64(&y_flat)));
        }
    }
    io::write_safetensors_with_metadata(&path, &t, Some(meta))?;
    // Keep the two newest: the one just written, and the newest before it (whatever the
    // interval), so that a resume can fall back on it if this one is damaged.
    clear_temporary_files(dir);
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut older: Vec<(usize, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let ep = name.strip_prefix(CKPT_PREFIX)?.strip_suffix(CKPT_SUFFIX)?.parse::<usize>().ok()?;
                (ep < st.epoch).then(|| (ep, e.path()))
            })
            .collect();
        older.sort_unstable_by_key(|o| std::cmp::Reverse(o.0));
        for (_, p) in older.iter().skip(1) {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(path)
}

/// Why a checkpoint was not resumed from.
enum NotResumed {
    /// It belongs to another run (its fingerprint differs): resuming from the folder would
    /// continue someone else's run, so the error stands.
    OtherRun(Error),
    /// It cannot be read (truncated, corrupt, not a checkpoint): an older one may do.
    Damaged(Error),
}

/// The state a checkpoint holds, if it was written by this run (`fields`).
fn load_checkpoint(
    path: &Path,
    fields: &[(&'static str, Option<String>)],
    optimizer: Optimizer,
    classes: usize,
    d: usize,
) -> std::result::Result<RunState, NotResumed> {
    let meta = io::read_safetensors_metadata(path).map_err(NotResumed::Damaged)?;
    let fingerprint = fingerprint(fields);
    let bad = |what: String| Error::Format { path: path.to_path_buf(), what };
    match meta.get("fingerprint") {
        Some(f) if *f == fingerprint => {}
        Some(f) => {
            return Err(NotResumed::OtherRun(bad(format!(
                "this checkpoint belongs to a different run ({}); it was written with [{f}], this run has \
                 [{fingerprint}]",
                fingerprint_diff(f, fields)
            ))));
        }
        None => return Err(NotResumed::Damaged(bad("not a softmax-layer checkpoint (no fingerprint)".into()))),
    }
    load_checkpoint_state(path, optimizer, classes, d).map_err(NotResumed::Damaged)
}

/// The state in a checkpoint whose fingerprint matched.
fn load_checkpoint_state(path: &Path, optimizer: Optimizer, classes: usize, d: usize) -> Result<RunState> {
    let bad = |what: String| Error::Format { path: path.to_path_buf(), what };
    let p = classes * d + classes;
    // The state is finite wherever training wrote it: a NaN read back would only show up
    // later, in the weights, as if the optimizer had diverged.
    let finite = |name: &str, i: Option<usize>| match i {
        Some(i) => Err(bad(format!("tensor '{name}' holds a NaN or infinity at element {i}"))),
        None => Ok(()),
    };
    let f32s = |name: &str, len: usize| -> Result<Vec<f32>> {
        let t = io::read_safetensors(path, name)?;
        if t.numel() != len {
            return Err(bad(format!("tensor '{name}' has {} elements, expected {len}", t.numel())));
        }
        let v = t.to_f32()?.into_owned();
        finite(name, v.iter().position(|x| !x.is_finite()))?;
        Ok(v)
    };
    let f64s = |name: &str| -> Result<(Vec<usize>, Vec<f64>)> {
        let t = io::read_safetensors(path, name)?;
        Ok((t.shape.clone(), t.to_f64()?))
    };
    let model = Model { weight: f32s("weight", classes * d)?, bias: f32s("bias", classes)?, classes, dim: d };
    let counters = io::read_safetensors(path, "counters")?.to_i64()?;
    // (A fourth entry, a stop flag that some of this session's commits wrote, is ignored:
    // the stop follows from the state.)
    let (step, epoch, rng) = match counters[..] {
        [step, epoch, rng] | [step, epoch, rng, 0 | 1] => (step, epoch, rng),
        _ => return Err(bad("tensor 'counters' must be [step, epoch, rng]".into())),
    };
    let (_, hist) = f64s("history")?;
    let history = hist
        .chunks_exact(5)
        .map(|r| EpochRecord {
            epoch: r[0] as usize,
            train_objective: r[1],
            heldout: (r[4] == 1.0).then(|| Metrics { loss: r[2], accuracy: r[3], perplexity: r[2].exp() }),
        })
        .collect();
    let (_, step_objectives) = f64s("step_objectives")?;
    let best = match io::read_safetensors_optional(path, "best_meta")? {
        Some(t) => {
            let bm = t.to_f64()?;
            let [loss, epoch] = bm[..] else { return Err(bad("tensor 'best_meta' must have 2 elements".into())) };
            let m =
                Model { weight: f32s("best_weight", classes * d)?, bias: f32s("best_bias", classes)?, classes, dim: d };
            Some((loss, epoch as usize, m))
        }
        None => None,
    };
    // The fingerprint matched, so the checkpoint holds this optimizer's state.
    let opt = match optimizer {
        Optimizer::Sgd { .. } => OptState::Sgd { velocity: f32s("opt.velocity", p)? },
        Optimizer::AdamW { .. } => OptState::AdamW { m: f32s("opt.m", p)?, v: f32s("opt.v", p)? },
        Optimizer::Lbfgs { .. } => {
            let state = |name: &str| -> Result<Vec<f64>> {
                let (_, v) = f64s(name)?;
                finite(name, v.iter().position(|x| !x.is_finite()))?;
                Ok(v)
            };
            let (x, g, sc) = (state("opt.x")?, state("opt.g")?, state("opt.scalars")?);
            let split = |name: &str| -> Result<Vec<Vec<f64>>> {
                Ok(state(name)?.chunks_exact(p).map(<[f64]>::to_vec).collect())
            };
            if x.len() != p || g.len() != p || sc.len() != 2 {
                return Err(bad("L-BFGS state has the wrong size".into()));
            }
            OptState::Lbfgs(Lbfgs { x, g, f: sc[0], done: sc[1] == 1.0, s: split("opt.s")?, y: split("opt.y")? })
        }
    };
    Ok(RunState {
        model,
        opt,
        step: step as usize,
        epoch: epoch as usize,
        rng: Rng::new(rng as u64),
        history,
        step_objectives,
        best,
    })
}
