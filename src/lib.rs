//! # softmax-layer
//!
//! The parameterized softmax layer `P = softmax(H·Wᵀ + b)` — the output layer of language
//! models and classifiers — computed exactly and at the machine's speed on a CPU.
//!
//! It provides the row numerics (softmax, log-softmax and logsumexp over the rows of a
//! matrix, with a temperature and an additive mask, that never overflow or produce NaN on
//! finite input, read each element at most twice, and run on AVX-512, AVX2+FMA, NEON or
//! portable code chosen at run time), the layer with fused forward operations that never
//! hold the `n × V` logits, and the fused cross-entropy with its gradients.
//!
//! ```text
//! softmax(z / T)_j = exp((z_j - M) / T) / S,   M = max_j z_j,   S = Σ_j exp((z_j - M) / T)
//! ```
//!
//! ## Example
//!
//! ```
//! use softmax_layer::{log_softmax, logsumexp, softmax, MatMut, MatRef, RowOptions};
//!
//! // Two rows of three logits; the second row masks out its last class.
//! let logits = [2.0f32, 1.0, 0.1, /* row 1 */ 1.0, 5.0, 10.0];
//! let mask = [0.0f32, 0.0, 0.0, /* row 1 */ 0.0, 0.0, f32::NEG_INFINITY];
//! let x = MatRef::new(&logits, 2, 3)?;
//! let opts = RowOptions { temperature: 1.0, mask: Some(MatRef::new(&mask, 2, 3)?), ..Default::default() };
//!
//! let mut p = [0f32; 6];
//! softmax(x, MatMut::new(&mut p, 2, 3)?, &opts)?;
//! assert!((p[0] - 0.659).abs() < 5e-4);
//! assert_eq!(p[5], 0.0); // masked
//!
//! let mut lp = [0f32; 6];
//! log_softmax(x, MatMut::new(&mut lp, 2, 3)?, &opts)?;
//! assert!((lp[0] - p[0].ln()).abs() < 1e-6);
//!
//! // A temperature above 1 flattens the distribution.
//! let mut lse = [0f32; 2];
//! logsumexp(x, &mut lse, &RowOptions::with_temperature(2.0))?;
//! let expect = ((1.0f64 / 2.0).exp() + (5.0f64 / 2.0).exp() + (10.0f64 / 2.0).exp()).ln();
//! assert!((lse[1] as f64 - expect).abs() < 1e-6);
//! # Ok::<(), softmax_layer::Error>(())
//! ```
//!
//! Bad input is an [`Error`] that names the row and column:
//!
//! ```
//! use softmax_layer::{softmax_inplace, Error, MatMut, RowOptions};
//! let mut x = [0.0f32, f32::NAN, 1.0];
//! let err = softmax_inplace(MatMut::new(&mut x, 1, 3)?, &RowOptions::default()).unwrap_err();
//! assert!(matches!(err, Error::NonFinite { row: 0, col: 1, .. }));
//! # Ok::<(), softmax_layer::Error>(())
//! ```
//!
//! ## The layer, fused operations and the loss
//!
//! ```
//! use softmax_layer::loss::{cross_entropy_with_grad, CrossEntropyOptions, Upstream};
//! use softmax_layer::{LayerOptions, MatRef, SoftmaxLayer, WeightLayout};
//!
//! // V = 3 classes, d = 2; W as PyTorch stores it ([V, d]), with a bias.
//! let w = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
//! let b = [0.0f32, 0.5, -0.5];
//! let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 3, 2, Some(&b[..]))?;
//! let h = [2.0f32, 1.0, 0.5, -1.0]; // two rows of hidden states
//! let hv = MatRef::new(&h, 2, 2)?;
//!
//! // Row 0's logits are [2, 1.5, 2.5]: class 2 first, then 0.
//! let top = layer.top_k(hv, 2, &LayerOptions::default())?;
//! assert_eq!(&top.indices[..2], &[2, 0]);
//! let mut lp = [0f32; 2];
//! layer.target_log_probs(hv, &[2, 0], &mut lp, &LayerOptions::default())?;
//! assert_eq!(lp[0], top.log_probs[0]);
//!
//! // Mean cross-entropy and its gradients, PyTorch's semantics.
//! let opts = CrossEntropyOptions { label_smoothing: 0.1, ..Default::default() };
//! let (out, grads) = cross_entropy_with_grad(&layer, hv, &[2, 0], &opts, Upstream::Scalar(1.0))?;
//! assert!(out.loss[0] > 0.0);
//! assert_eq!((grads.hidden.len(), grads.weight.len(), grads.bias.unwrap().len()), (4, 6, 3));
//! # Ok::<(), softmax_layer::Error>(())
//! ```
//!
//! ## A vocabulary split across workers
//!
//! Each worker holds a layer over its own rows of `W` (and of the bias), wherever they live,
//! and the fused operations' results merge with `O(n)` numbers per worker: a row's
//! logsumexp by log-add-exp, a log-probability by adding back its shard's logsumexp, top-k
//! lists likewise (`tests/shards.rs` checks all three against the whole layer).
//!
//! ```
//! use softmax_layer::{LayerOptions, MatRef, SoftmaxLayer, WeightLayout};
//!
//! let (v, d) = (4, 2);
//! let w = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.5]; // [V, d]
//! let h = [2.0f32, 1.0];
//! let hv = MatRef::new(&h, 1, d)?;
//! let opts = LayerOptions::default();
//! // Two workers: classes 0..1 and 1..4.
//! let lse_of = |rows: std::ops::Range<usize>| -> softmax_layer::Result<f64> {
//!     let layer = SoftmaxLayer::new(&w[rows.start * d..rows.end * d], WeightLayout::VocabMajor, rows.len(), d, None::<&[f32]>)?;
//!     let mut lse = [0f32];
//!     layer.logsumexp(hv, &mut lse, &opts)?;
//!     Ok(lse[0] as f64)
//! };
//! let (a, b) = (lse_of(0..1)?, lse_of(1..v)?);
//! let merged = a.max(b) + ((a - a.max(b)).exp() + (b - a.max(b)).exp()).ln();
//! assert!((merged - lse_of(0..v)?).abs() < 1e-6);
//! # Ok::<(), softmax_layer::Error>(())
//! ```
//!
//! ## Training a softmax classifier
//!
//! ```
//! use softmax_layer::MatRef;
//! use softmax_layer::train::{train, Data, Optimizer, TrainConfig};
//!
//! // Four points in 1-D, two classes split at 0; scikit-learn's C = 1 is λ = 1/(C·n).
//! let x = [-2.0f32, -1.0, 1.0, 2.0];
//! let y = [0i64, 0, 1, 1];
//! let data = Data::new(MatRef::new(&x, 4, 1)?, &y)?;
//! let cfg = TrainConfig { optimizer: Optimizer::lbfgs(), l2: 0.25, ..Default::default() };
//! let out = train(data, &cfg, |_event| {})?;
//! assert_eq!(out.train.accuracy, 1.0);
//! // The penalty keeps the weights finite; the two classes' weights are opposite.
//! let w = &out.model.weight; // [K, d] = [2, 1]
//! assert!(w[1] > 0.0 && (w[0] + w[1]).abs() < 1e-4);
//! # Ok::<(), softmax_layer::Error>(())
//! ```
//!
//! ## Modules
//!
//! - [`rows`]: whole-matrix softmax, log-softmax and logsumexp (re-exported at the root).
//! - [`kernels`]: the per-row building blocks for tiled callers, and instruction-set choice.
//! - [`layer`]: [`SoftmaxLayer`] and its forward operations.
//! - [`loss`]: the fused cross-entropy and its gradients.
//! - [`bf16`]: bf16 and bf16x3 products on AMX tiles, AVX512-BF16 or portable code.
//! - [`engine`]: the tiled loop every operation runs through ([`engine::LogitSource`],
//!   [`engine::Consumer`]).
//! - [`score`]: sequence scoring with explicit alignment, and candidate ranking.
//! - [`sample`]: one seeded decoding step with a configurable sampler chain.
//! - [`rank`]: Plackett–Luce probabilities of rankings, their gradients, and sampling.
//! - [`rng`]: SplitMix64, the seeded random stream of sampling, ranking and training.
//! - [`train`]: L-BFGS, AdamW and SGD for a softmax layer on fixed features, with
//!   schedules, held-out evaluation, early stopping and checkpoints that resume exactly.
//! - [`io`]: `.npy` and `.safetensors` reading (memory-mapped) and atomic writing; numeric CSV.

pub mod bf16;
pub mod engine;
pub mod error;
pub mod io;
pub mod kernels;
pub mod layer;
mod linalg;
pub mod loss;
pub mod matrix;
mod narrow;
pub mod rank;
pub mod rng;
pub mod rows;
pub mod sample;
pub mod score;
#[doc(hidden)]
pub mod tile_gemm;
pub mod train;

pub use bf16::{BfPath, PackedBf16Weights, Precision};
pub use error::{Error, Result};
pub use kernels::{Isa, Kernels, MaxSum};
pub use layer::{LayerOptions, SoftmaxLayer, TargetStat, TopK};
pub use matrix::{MatMut, MatRef, WeightLayout};
pub use rows::{
    MIN_TEMPERATURE, RowOptions, check_temperature, log_softmax, log_softmax_inplace, logsumexp, softmax,
    softmax_inplace,
};
