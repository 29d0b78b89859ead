//! The layer's forward operations against float64 references.

mod common;
use common::{Rng, assert_log_close, assert_prob_close, reference, transpose};
use softmax_layer::engine::Tiling;
use softmax_layer::loss::{CrossEntropyOptions, cross_entropy};
use softmax_layer::{Error, LayerOptions, MatMut, MatRef, SoftmaxLayer, WeightLayout};

struct Case {
    n: usize,
    d: usize,
    v: usize,
    h: Vec<f32>,
    w_vd: Vec<f32>,
    w_dv: Vec<f32>,
    b: Option<Vec<f32>>,
}

fn case(rng: &mut Rng, n: usize, d: usize, v: usize, bias: bool) -> Case {
    let h = rng.vec(n * d, -1.0, 1.0);
    let w_vd = rng.vec(v * d, -1.0, 1.0);
    let w_dv = transpose(&w_vd, v, d);
    let b = bias.then(|| rng.vec(v, -2.0, 2.0));
    Case { n, d, v, h, w_vd, w_dv, b }
}

impl Case {
    fn layer(&self, layout: WeightLayout, tiling: Tiling) -> SoftmaxLayer<'_> {
        let w = match layout {
            WeightLayout::VocabMajor => &self.w_vd[..],
            WeightLayout::HiddenMajor => &self.w_dv[..],
        };
        SoftmaxLayer::new(w, layout, self.v, self.d, self.b.as_deref()).unwrap().with_tiling(tiling)
    }
    /// Float64 logits and the bound on f32 dot-product rounding: d·2^-24·Σ|h·w| + 2^-24·|b|.
    fn ref_logits(&self, i: usize) -> (Vec<f64>, Vec<f64>) {
        let h = &self.h[i * self.d..(i + 1) * self.d];
        (0..self.v)
            .map(|j| {
                let w = &self.w_vd[j * self.d..(j + 1) * self.d];
                let dot: f64 = h.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = h.iter().zip(w).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                let b = self.b.as_ref().map_or(0.0, |b| b[j] as f64);
                (dot + b, (self.d as f64 + 2.0) * 2f64.powi(-24) * (mag + b.abs()))
            })
            .unzip()
    }
}

const SMALL: Tiling = Tiling { row_block: 8, col_tile: 64, segment: 256 };

fn check_all(c: &Case, layout: WeightLayout, tiling: Tiling, t: f32) {
    let layer = c.layer(layout, tiling);
    let opts = LayerOptions { temperature: t };
    let hv = MatRef::new(&c.h, c.n, c.d).unwrap();
    let (n, v) = (c.n, c.v);
    let mut logits = vec![0f32; n * v];
    layer.logits(hv, MatMut::new(&mut logits, n, v).unwrap()).unwrap();
    let mut probs = vec![0f32; n * v];
    layer.probs(hv, MatMut::new(&mut probs, n, v).unwrap(), &opts).unwrap();
    let mut lp = vec![0f32; n * v];
    layer.log_probs(hv, MatMut::new(&mut lp, n, v).unwrap(), &opts).unwrap();
    let mut lse = vec![0f32; n];
    layer.logsumexp(hv, &mut lse, &opts).unwrap();
    let targets: Vec<i64> = (0..n).map(|i| ((i * 7919 + 13) % v) as i64).collect();
    let mut tlp = vec![0f32; n];
    layer.target_log_probs(hv, &targets, &mut tlp, &opts).unwrap();
    let mut am = vec![0usize; n];
    layer.argmax(hv, &mut am).unwrap();
    let k = v.min(5);
    let top = layer.top_k(hv, k, &opts).unwrap();
    for i in 0..n {
        // (a) The logits: float64 up to f32 rounding of the dot products.
        let (want, tol) = c.ref_logits(i);
        let row = &logits[i * v..(i + 1) * v];
        for j in 0..v {
            assert!(
                (row[j] as f64 - want[j]).abs() <= tol[j],
                "logit [{i},{j}] {} vs {} (tol {:e})",
                row[j],
                want[j],
                tol[j]
            );
        }
        // (b) Everything after the logits: exact to f32 rounding, against float64 of the
        // same logits; no other error source.
        let (ref_lp, ref_lse) = reference(row, None, t);
        assert_log_close(lse[i], ref_lse, 2e-6, "lse");
        for j in 0..v {
            assert_prob_close(probs[i * v + j], ref_lp[j].exp(), "probs");
            assert_log_close(lp[i * v + j], ref_lp[j], 2e-6, "log_probs");
        }
        assert_log_close(tlp[i], ref_lp[targets[i] as usize], 2e-6, "target_log_probs");
        // argmax: the first maximum.
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(am[i], row.iter().position(|&z| z == mx).unwrap(), "argmax row {i}");
        // top-k: sorted by logit descending, then lower id.
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        assert_eq!(&top.indices[i * k..(i + 1) * k], &order[..k], "top-k ids row {i}");
        for (q, &j) in order[..k].iter().enumerate() {
            assert_log_close(top.log_probs[i * k + q], ref_lp[j], 2e-6, "top-k values");
        }
    }
}

#[test]
fn forward_ops_match_float64_over_shapes_layouts_and_tilings() {
    let mut rng = Rng(21);
    for &(n, d, v) in
        &[(1, 1, 1), (1, 5, 7), (3, 64, 600), (17, 33, 1100), (130, 16, 300), (5, 100, 9000), (2, 768, 2000)]
    {
        for bias in [false, true] {
            let c = case(&mut rng, n, d, v, bias);
            for layout in [WeightLayout::VocabMajor, WeightLayout::HiddenMajor] {
                for tiling in [Tiling::default(), SMALL] {
                    for t in [1.0, 0.7] {
                        check_all(&c, layout, tiling, t);
                    }
                }
            }
        }
    }
}

#[test]
fn layouts_agree() {
    let mut rng = Rng(4);
    let c = case(&mut rng, 40, 50, 3000, true);
    let hv = MatRef::new(&c.h, c.n, c.d).unwrap();
    let mut a = vec![0f32; c.n];
    let mut b = vec![0f32; c.n];
    c.layer(WeightLayout::VocabMajor, Tiling::default()).logsumexp(hv, &mut a, &LayerOptions::default()).unwrap();
    c.layer(WeightLayout::HiddenMajor, Tiling::default()).logsumexp(hv, &mut b, &LayerOptions::default()).unwrap();
    for i in 0..c.n {
        assert!((a[i] - b[i]).abs() <= 1e-5 * a[i].abs().max(1.0), "{} vs {}", a[i], b[i]);
    }
}

#[test]
fn ties_go_to_the_lower_class_id() {
    // Classes 2, 5 and 6 share the largest logit; 1 and 4 the next.
    let d = 2;
    let w = [0.0f32, 0.0, 1.0, 0.0, 2.0, 0.0, 0.5, 0.0, 1.0, 0.0, 2.0, 0.0, 2.0, 0.0];
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 7, d, None::<&[f32]>)
        .unwrap()
        .with_tiling(Tiling { row_block: 1, col_tile: 2, segment: 4 });
    let h = [1.0f32, 0.0];
    let hv = MatRef::new(&h, 1, 2).unwrap();
    let mut am = [9usize];
    layer.argmax(hv, &mut am).unwrap();
    assert_eq!(am[0], 2);
    let top = layer.top_k(hv, 5, &LayerOptions::default()).unwrap();
    assert_eq!(top.indices, vec![2, 5, 6, 1, 4]);
    assert_eq!(top.log_probs[0], top.log_probs[2]);
}

/// Top-k against a naive sort of the layer's own logits, on integer-valued operands (exact
/// products, so the logits tie often): every k from 1 to past the candidate list's size,
/// tilings whose tiles and segments cut the 16-value pieces anywhere, both layouts.
#[test]
fn top_k_matches_a_sort_of_the_logits_among_many_ties() {
    let mut rng = Rng(21);
    let (n, d, v) = (7, 6, 3001);
    let ints = |rng: &mut Rng, len: usize, span: usize| -> Vec<f32> {
        (0..len).map(|_| rng.below(2 * span + 1) as f32 - span as f32).collect()
    };
    let h = ints(&mut rng, n * d, 2);
    let w = ints(&mut rng, v * d, 3);
    let wt = transpose(&w, v, d);
    let hv = MatRef::new(&h, n, d).unwrap();
    let tilings = [
        Tiling::default(),
        Tiling { row_block: 3, col_tile: 40, segment: 200 },
        Tiling { row_block: 8, col_tile: 17, segment: 1001 },
        // Many blocks of rows, each walking many segments in order (each segment's list
        // starts from the threshold of those to its left).
        Tiling { row_block: 1, col_tile: 40, segment: 120 },
        Tiling { row_block: 2, col_tile: 17, segment: 51 },
    ];
    for (weights, layout) in [(&w, WeightLayout::VocabMajor), (&wt, WeightLayout::HiddenMajor)] {
        for tiling in tilings {
            let layer = SoftmaxLayer::new(&weights[..], layout, v, d, None::<&[f32]>).unwrap().with_tiling(tiling);
            let mut logits = vec![0f32; n * v];
            layer.logits(hv, MatMut::new(&mut logits, n, v).unwrap()).unwrap();
            for k in [1, 2, 9, 10, 16, 17, 33, 100] {
                let top = layer.top_k(hv, k, &LayerOptions::default()).unwrap();
                for i in 0..n {
                    let row = &logits[i * v..(i + 1) * v];
                    let mut order: Vec<usize> = (0..v).collect();
                    // Larger logit first, then the lower class id.
                    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                    assert_eq!(&top.indices[i * k..(i + 1) * k], &order[..k], "{layout:?} {tiling:?} k={k} row {i}");
                }
            }
        }
    }
}

#[test]
fn fused_ops_are_bit_identical_for_any_thread_count() {
    let mut rng = Rng(8);
    for &(n, d, v) in &[(1, 64, 20000), (9, 32, 20000), (300, 48, 5000)] {
        let c = case(&mut rng, n, d, v, true);
        let layer = c.layer(WeightLayout::VocabMajor, Tiling::default());
        let hv = MatRef::new(&c.h, n, d).unwrap();
        let targets: Vec<i64> = (0..n as i64).map(|i| i * 31 % v as i64).collect();
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
                let opts = LayerOptions { temperature: 0.8 };
                let mut lse = vec![0f32; n];
                let mut tlp = vec![0f32; n];
                layer.logsumexp(hv, &mut lse, &opts).unwrap();
                layer.target_log_probs(hv, &targets, &mut tlp, &opts).unwrap();
                let top = layer.top_k(hv, 3, &opts).unwrap();
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                (bits(&lse), bits(&tlp), bits(&top.log_probs), top.indices)
            })
        };
        let one = run(1);
        for t in [2, 3] {
            assert!(run(t) == one, "[{n},{d},{v}]: {t} threads differ");
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let w = vec![0.5f32; 12];
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 4, 3, None::<&[f32]>).unwrap();
    let h = [1.0f32, 2.0, f32::NAN, 0.0, 0.0, 0.0];
    let err = layer.logsumexp(MatRef::new(&h, 2, 3).unwrap(), &mut [0.0; 2], &LayerOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "hidden[0, 2] is NaN; only finite values are allowed");
    let h = [1.0f32; 4];
    let err = layer.logsumexp(MatRef::new(&h, 2, 2).unwrap(), &mut [0.0; 2], &LayerOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
    let h = [1.0f32; 6];
    let hv = MatRef::new(&h, 2, 3).unwrap();
    let err = layer.target_log_probs(hv, &[0, 4], &mut [0.0; 2], &LayerOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "targets[1] = 4 is out of range [0, 4)");
    let err = layer.target_log_probs(hv, &[-1, 0], &mut [0.0; 2], &LayerOptions::default()).unwrap_err();
    assert!(matches!(err, Error::TargetOutOfRange { index: 0, value: -1, .. }));
    assert!(layer.top_k(hv, 0, &LayerOptions::default()).is_err());
    assert!(layer.top_k(hv, 5, &LayerOptions::default()).is_err());
    assert!(layer.logsumexp(hv, &mut [0.0; 2], &LayerOptions { temperature: 0.0 }).is_err());
    let mut bad_w = w.clone();
    bad_w[7] = f32::INFINITY;
    let err = SoftmaxLayer::new(&bad_w[..], WeightLayout::VocabMajor, 4, 3, None::<&[f32]>).unwrap_err();
    assert_eq!(err.to_string(), "weight[2, 1] is inf; only finite values are allowed");
    let err =
        SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 4, 3, Some(&[0.0f32, 0.0, f32::NAN, 0.0][..])).unwrap_err();
    assert_eq!(err.to_string(), "bias[2] is NaN; only finite values are allowed");
    assert!(SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 5, 3, None::<&[f32]>).is_err());
    // A shape whose size overflows usize names the weight (it wrapped to 0, then failed
    // later on a "matrix" view).
    for layout in [WeightLayout::VocabMajor, WeightLayout::HiddenMajor] {
        let err = SoftmaxLayer::new(&[][..], layout, 1usize << 63, 2, None::<&[f32]>).unwrap_err().to_string();
        assert!(err.contains("weight [") && err.contains("too large"), "{err}");
    }
    // Finite inputs whose logits overflow f32.
    let big = [3e38f32; 12];
    let layer = SoftmaxLayer::new(&big[..], WeightLayout::VocabMajor, 4, 3, None::<&[f32]>).unwrap();
    let err = layer.logsumexp(hv, &mut [0.0; 2], &LayerOptions::default()).unwrap_err();
    assert!(matches!(err, Error::LogitsOverflow { row: 0 }), "{err}");
    // Finite logits whose logsumexp over T is beyond f32 (2e38 / 0.5): refused, as the loss
    // refuses them, not written as +inf.
    let w2 = [2e38f32, 0.0];
    let layer = SoftmaxLayer::new(&w2[..], WeightLayout::VocabMajor, 2, 1, None::<&[f32]>).unwrap();
    let opts = LayerOptions { temperature: 0.5 };
    let err = layer.logsumexp(MatRef::new(&[1.0], 1, 1).unwrap(), &mut [0.0], &opts).unwrap_err();
    assert!(matches!(err, Error::LogitsOverflow { row: 0 }), "{err}");
}

/// Finite inputs whose logits overflow `f32`. Row 3's overflow upwards (+inf): every
/// operation names it, none returns a silent result. Row 2's only downwards (its largest
/// logit is finite, another -inf): `logits` cannot write it and says so; for the others -inf
/// is the correctly rounded answer (probability 0), and argmax is unaffected.
#[test]
fn every_operation_reports_overflowing_logits() {
    let w = [1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, -2.0];
    let h = [1.0f32, 1.0, 1.0, 1.0, 2.0, 3.0, 0.0, 0.0, 3e38, 0.0, 0.0, -3e38];
    let (all, down) = (MatRef::new(&h, 4, 3).unwrap(), MatRef::new(&h[..9], 3, 3).unwrap());
    let opts = LayerOptions::default();
    for layout in [WeightLayout::VocabMajor, WeightLayout::HiddenMajor] {
        let w = if layout == WeightLayout::VocabMajor { w.to_vec() } else { transpose(&w, 4, 3) };
        let layer = SoftmaxLayer::new(&w[..], layout, 4, 3, None::<&[f32]>).unwrap();
        let mut out = vec![0f32; 16];
        let overflow = |r: Result<(), Error>, row: usize, what: &str| {
            let err = r.expect_err(what);
            assert!(matches!(err, Error::LogitsOverflow { row: r } if r == row), "{what}: {err}");
        };
        overflow(layer.logits(all, MatMut::new(&mut out, 4, 4).unwrap()), 2, "logits");
        overflow(layer.logits(down, MatMut::new(&mut out[..12], 3, 4).unwrap()), 2, "logits");
        overflow(layer.probs(all, MatMut::new(&mut out, 4, 4).unwrap(), &opts), 3, "probs");
        overflow(layer.log_probs(all, MatMut::new(&mut out, 4, 4).unwrap(), &opts), 3, "log_probs");
        overflow(layer.logsumexp(all, &mut [0.0; 4], &opts), 3, "logsumexp");
        overflow(layer.target_log_probs(all, &[0, 1, 2, 0], &mut [0.0; 4], &opts), 3, "target_log_probs");
        overflow(layer.argmax(all, &mut [0; 4]), 3, "argmax");
        overflow(layer.top_k(all, 2, &opts).map(|_| ()), 3, "top_k");
        overflow(layer.target_stats(all, &[0, 1, 2, 0], 1, &opts).map(|_| ()), 3, "target_stats");
        // Downwards only: exact answers.
        let mut idx = [0usize; 3];
        layer.argmax(down, &mut idx).unwrap();
        assert_eq!(idx, [0, 2, 2]);
        layer.probs(down, MatMut::new(&mut out[..12], 3, 4).unwrap(), &opts).unwrap();
        assert_eq!(&out[8..12], &[0.0, 0.0, 1.0, 0.0]);
        layer.logits(MatRef::new(&h[..6], 2, 3).unwrap(), MatMut::new(&mut out[..8], 2, 4).unwrap()).unwrap();
        assert_eq!(&out[..8], &[1.0, 1.0, 1.0, -2.0, 1.0, 2.0, 3.0, -6.0]);
    }
}

#[test]
fn target_stats_rank_and_top_agree_with_the_logits() {
    let mut rng = Rng(77);
    for &(n, d, v, top) in &[(1usize, 8usize, 300usize, 3usize), (37, 24, 5000, 5), (300, 16, 1200, 0)] {
        let c = case(&mut rng, n, d, v, true);
        for layout in [WeightLayout::VocabMajor, WeightLayout::HiddenMajor] {
            for tiling in [Tiling::default(), SMALL] {
                let layer = c.layer(layout, tiling);
                let hv = MatRef::new(&c.h, n, d).unwrap();
                let y: Vec<i64> = (0..n).map(|i| ((i * 131 + 7) % v) as i64).collect();
                let opts = LayerOptions { temperature: 0.9 };
                let stats = layer.target_stats(hv, &y, top, &opts).unwrap();
                let mut logits = vec![0f32; n * v];
                layer.logits(hv, MatMut::new(&mut logits, n, v).unwrap()).unwrap();
                let tk = (top > 0).then(|| layer.top_k(hv, top, &opts).unwrap());
                for i in 0..n {
                    let row = &logits[i * v..(i + 1) * v];
                    let rank = 1 + rank_ahead(row, y[i] as usize);
                    assert_eq!(stats[i].rank, rank, "row {i} {layout:?}");
                    let (lp, _) = reference(row, None, 0.9);
                    assert_log_close(stats[i].log_prob, lp[y[i] as usize], 2e-6, "target log-prob");
                    if let Some(tk) = &tk {
                        let want: Vec<(usize, f32)> =
                            (0..top).map(|q| (tk.indices[i * top + q], tk.log_probs[i * top + q])).collect();
                        assert_eq!(stats[i].top, want);
                    }
                }
            }
        }
    }
}

/// How many classes come before class `y` in argmax order: larger logits, and equal ones
/// with lower ids.
fn rank_ahead(row: &[f32], y: usize) -> usize {
    row.iter().enumerate().filter(|&(j, &z)| z > row[y] || (z == row[y] && j < y)).count()
}

#[test]
fn target_stats_ties_go_to_the_lower_id() {
    // Classes 1, 3 and 4 share the largest logit: argmax order 1, 3, 4, 2, 0, 5.
    let w = [0.0f32, 2.0, 1.0, 2.0, 2.0, -1.0];
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 6, 1, None::<&[f32]>).unwrap();
    let h = [1.0f32, 1.0, 1.0, 1.0];
    let hv = MatRef::new(&h, 4, 1).unwrap();
    let st = layer.target_stats(hv, &[3, 4, 2, 5], 2, &LayerOptions::default()).unwrap();
    assert_eq!(st.iter().map(|s| s.rank).collect::<Vec<_>>(), vec![2, 3, 4, 6]);
    assert_eq!(st[0].top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
}

#[test]
fn negative_zero_logits_tie_with_positive_zero() {
    // W = [−1, 1, −1] as [d, V] and h = 0: the logits are ±0 (the `gemm` product, used for
    // more than 4 rows, writes −0 for −1·0). All three tie, so the lower id comes first, as
    // argmax has it.
    let w = [-1.0f32, 1.0, -1.0];
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::HiddenMajor, 3, 1, None::<&[f32]>).unwrap();
    let h = [0.0f32; 6];
    let hv = MatRef::new(&h, 6, 1).unwrap();
    let mut am = [9usize; 6];
    layer.argmax(hv, &mut am).unwrap();
    let top = layer.top_k(hv, 3, &LayerOptions::default()).unwrap();
    let st = layer.target_stats(hv, &[0, 1, 2, 0, 1, 2], 3, &LayerOptions::default()).unwrap();
    for i in 0..6 {
        assert_eq!(am[i], 0);
        assert_eq!(&top.indices[i * 3..i * 3 + 3], &[0, 1, 2], "top_k row {i}");
        assert_eq!(st[i].top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1, 2], "target_stats row {i}");
        assert_eq!(st[i].rank, i % 3 + 1, "rank row {i}");
    }
}

#[test]
fn a_target_whose_logit_is_minus_infinity_ranks_below_the_finite_ones() {
    // Logits [0, −inf] (3e38 · −3e38 rounds to −inf): the target, class 1, is ranked 2nd.
    let w = [0.0f32, -3e38];
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 2, 1, None::<&[f32]>).unwrap();
    let h = [3e38f32];
    let st = layer.target_stats(MatRef::new(&h, 1, 1).unwrap(), &[1], 1, &LayerOptions::default()).unwrap();
    assert_eq!(st[0].rank, 2);
    assert_eq!(st[0].log_prob, f32::NEG_INFINITY);
    assert_eq!(st[0].top[0].0, 0);
}

#[test]
fn a_huge_temperature_over_a_gap_beyond_f32_counts_the_gap() {
    // Logits [3e38, −3e38] over T = 3e38 are [1, −1], though their gap exceeds f32::MAX.
    let w = [1.0f32, -1.0];
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 2, 1, None::<&[f32]>).unwrap();
    let h = [3e38f32];
    let hv = MatRef::new(&h, 1, 1).unwrap();
    let opts = LayerOptions { temperature: 3e38 };
    let ln_s = (1.0 + (-2f64).exp()).ln();
    let mut p = [0f32; 2];
    layer.probs(hv, MatMut::new(&mut p, 1, 2).unwrap(), &opts).unwrap();
    let want = [1.0 / (1.0 + (-2f64).exp()), 1.0 / (1.0 + 2f64.exp())];
    for j in 0..2 {
        assert!((p[j] as f64 - want[j]).abs() < 1e-6, "p[{j}] = {}, want {}", p[j], want[j]);
    }
    let mut lse = [0f32];
    layer.logsumexp(hv, &mut lse, &opts).unwrap();
    assert!((lse[0] as f64 - (1.0 + ln_s)).abs() < 1e-6, "lse {}", lse[0]);
    let mut lp = [0f32];
    layer.target_log_probs(hv, &[1], &mut lp, &opts).unwrap();
    assert!((lp[0] as f64 - (-2.0 - ln_s)).abs() < 1e-6, "target log-prob {}", lp[0]);
}

#[test]
fn target_stats_rank_follows_the_computed_logits_among_near_ties() {
    // Every class's weights are one base row, each entry nudged by a few ulps: in exact
    // arithmetic the logits differ by about the rounding of the dot products themselves, so
    // the rank depends on the order the product's rounding puts them in, which the target's
    // estimate window has to resolve exactly as the tiles computed them.
    let mut rng = Rng(2024);
    let (n, d, v) = (40usize, 96usize, 300usize);
    let base = rng.vec(d, -1.0, 1.0);
    let mut w_vd = vec![0f32; v * d];
    for j in 0..v {
        for p in 0..d {
            w_vd[j * d + p] = base[p] * (1.0 + rng.vec(1, -4e-7, 4e-7)[0]);
        }
    }
    let w_dv = transpose(&w_vd, v, d);
    let h = rng.vec(n * d, -1.0, 1.0);
    let hv = MatRef::new(&h, n, d).unwrap();
    let y: Vec<i64> = (0..n).map(|i| ((i * 37 + 5) % v) as i64).collect();
    for (layout, w) in [(WeightLayout::VocabMajor, &w_vd), (WeightLayout::HiddenMajor, &w_dv)] {
        for tiling in [Tiling::default(), SMALL] {
            let layer = SoftmaxLayer::new(&w[..], layout, v, d, None::<&[f32]>).unwrap().with_tiling(tiling);
            let stats = layer.target_stats(hv, &y, 0, &LayerOptions::default()).unwrap();
            let mut logits = vec![0f32; n * v];
            layer.logits(hv, MatMut::new(&mut logits, n, v).unwrap()).unwrap();
            let mut spread = 0usize;
            for i in 0..n {
                let row = &logits[i * v..(i + 1) * v];
                let rank = 1 + rank_ahead(row, y[i] as usize);
                assert_eq!(stats[i].rank, rank, "row {i} {layout:?} {tiling:?}");
                spread += (rank > 1 && rank < v) as usize;
            }
            // The case is a real test: most targets are neither first nor last.
            assert!(spread > n / 2, "{spread} of {n} rows have a rank strictly inside");
        }
    }
}

/// The target's estimate window must hold its tile logit whatever the scales: hidden states
/// near 1e-24 against weights near 1e18 (and the reverse) have squared norms that underflow
/// f32, which once gave a window of about 1e-30 around a logit near 1e-6 whose rounding is
/// near 1e-13, so ties among identical rows were miscounted (ranks 1 or 3 of 2, 601 of 600).
#[test]
fn target_stats_rank_holds_when_squared_norms_underflow() {
    let mut rng = Rng(12345);
    for (v, d, n) in [(2usize, 100usize, 8usize), (16, 16, 8), (600, 100, 3)] {
        for (hs, ws) in [(1e-24f64, 1e18f64), (1e18, 1e-24)] {
            let row: Vec<f32> = rng.vec(d, -ws, ws);
            // Identical rows: every logit of a row ties with the target's.
            let w: Vec<f32> = (0..v).flat_map(|_| row.iter().copied()).collect();
            let h = rng.vec(n * d, -hs, hs);
            let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>).unwrap();
            let hv = MatRef::new(&h, n, d).unwrap();
            let y = vec![1i64; n];
            let stats = layer.target_stats(hv, &y, 0, &LayerOptions::default()).unwrap();
            let mut logits = vec![0f32; n * v];
            layer.logits(hv, MatMut::new(&mut logits, n, v).unwrap()).unwrap();
            for i in 0..n {
                let want = 1 + rank_ahead(&logits[i * v..(i + 1) * v], 1);
                assert_eq!(want, 2, "the rows tie: class 0 alone comes first");
                assert_eq!(stats[i].rank, want, "V = {v}, d = {d}, scales {hs:e} / {ws:e}, row {i}");
            }
        }
    }
}

/// A target logit whose exact value lies just beyond f32::MAX but that the product rounds to
/// f32::MAX (finite: no overflow error) once gave an infinite estimate, so the window missed
/// it and the tie with a lower class went uncounted.
#[test]
fn target_stats_rank_holds_at_the_edge_of_the_f32_range() {
    let p102 = 2f32.powi(102);
    for sign in [1f32, -1.0] {
        let w = [sign * f32::MAX, sign * p102, sign * f32::MAX, sign * p102];
        let b = [sign * p102, sign * p102];
        let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 2, 2, Some(&b[..])).unwrap();
        let hv = MatRef::new(&[1.0f32, 1.0], 1, 2).unwrap();
        let mut z = [0f32; 2];
        layer.logits(hv, MatMut::new(&mut z, 1, 2).unwrap()).unwrap();
        assert_eq!(z, [sign * f32::MAX; 2], "the product rounds to ±f32::MAX");
        let stats = layer.target_stats(hv, &[1], 0, &LayerOptions::default()).unwrap();
        assert_eq!(stats[0].rank, 2, "sign {sign}: class 0 ties and comes first");
    }
}

/// Any tiling is usable: zeros, a segment that is not a whole number of tiles, and huge
/// values give the default tiling's results (up to the dot products' summation order),
/// for the forward operations and the loss.
#[test]
fn degenerate_tilings_are_made_usable() {
    let mut rng = Rng(404);
    let (n, d, v) = (37usize, 12usize, 300usize);
    let (h, w, b) = (rng.vec(n * d, -1.0, 1.0), rng.vec(v * d, -0.5, 0.5), rng.vec(v, -0.5, 0.5));
    let y: Vec<i64> = (0..n).map(|i| (i * 31 % v) as i64).collect();
    let hv = MatRef::new(&h, n, d).unwrap();
    let base = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, Some(&b[..])).unwrap();
    let opts = LayerOptions::default();
    let mut want = vec![0f32; n];
    base.logsumexp(hv, &mut want, &opts).unwrap();
    let want_top = base.top_k(hv, 3, &opts).unwrap();
    let want_loss = cross_entropy(&base, hv, &y, &CrossEntropyOptions::default()).unwrap().loss[0];
    for t in [
        Tiling { row_block: 0, col_tile: 0, segment: 0 },
        Tiling { row_block: 1, col_tile: 1, segment: 1 },
        Tiling { row_block: 5, col_tile: 7, segment: 10 },
        Tiling { row_block: usize::MAX, col_tile: usize::MAX, segment: usize::MAX },
        Tiling { row_block: 3, col_tile: 64, segment: usize::MAX },
    ] {
        let layer = base.clone().with_tiling(t);
        let u = layer.tiling();
        assert!(u.row_block >= 1 && u.col_tile >= 1 && u.segment % u.col_tile == 0, "{t:?} -> {u:?}");
        let mut got = vec![f32::NAN; n];
        layer.logsumexp(hv, &mut got, &opts).unwrap();
        for (g, e) in got.iter().zip(&want) {
            assert!((g - e).abs() <= 1e-5 * e.abs().max(1.0), "{t:?}: {g} vs {e}");
        }
        assert_eq!(layer.top_k(hv, 3, &opts).unwrap().indices, want_top.indices, "{t:?}");
        let loss = cross_entropy(&layer, hv, &y, &CrossEntropyOptions::default()).unwrap().loss[0];
        assert!((loss - want_loss).abs() <= 1e-5 * want_loss.abs(), "{t:?}: loss {loss} vs {want_loss}");
    }
}
