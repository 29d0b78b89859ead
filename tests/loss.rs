//! The fused cross-entropy against PyTorch fixtures (F.linear + F.cross_entropy + autograd
//! in float64, written by scripts/make_fixtures.py), finite differences, and its errors.

mod common;
use common::Rng;
use softmax_layer::io::{Tensor, TensorSpec};
use softmax_layer::loss::{
    CrossEntropyOptions, GradientsMut, Reduction, Upstream, cross_entropy, cross_entropy_with_grad,
    cross_entropy_with_grad_into,
};
use softmax_layer::{Error, MatRef, SoftmaxLayer, WeightLayout};

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cross_entropy.safetensors");

fn get(name: &str) -> Option<Tensor> {
    Tensor::load(&TensorSpec::parse(&format!("{FIX}:{name}")).unwrap()).ok()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_f32().unwrap().into_owned()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_f64().unwrap()
}

/// ‖a − b‖ / ‖b‖ (Frobenius).
fn rel_frob(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = w[i * cols + j];
        }
    }
    t
}

fn check_case(name: &str) {
    let t = |k: &str| get(&format!("{name}.{k}"));
    let h = t("hidden").unwrap();
    let (n, d) = (h.shape[0], h.shape[1]);
    let w = f32s(&t("weight").unwrap());
    let v = w.len() / d;
    let b = t("bias").map(|x| f32s(&x));
    let y = t("targets").unwrap().to_i64().unwrap();
    let cw = t("class_weights").map(|x| f32s(&x));
    let o = f64s(&t("options").unwrap());
    let reduction = [Reduction::Mean, Reduction::Sum, Reduction::None][o[0] as usize];
    let opts = CrossEntropyOptions {
        ignore_index: o[5] as i64,
        reduction,
        label_smoothing: o[1] as f32,
        class_weights: cw.as_deref(),
        z_loss: o[2] as f32,
        softcap: (o[3] != 0.0).then_some(o[3] as f32),
        temperature: o[4] as f32,
    };
    let up = f32s(&t("upstream").unwrap());
    let upstream = if reduction == Reduction::None { Upstream::PerRow(&up) } else { Upstream::Scalar(up[0]) };
    let hv = f32s(&h);
    let want_loss = f64s(&t("loss").unwrap());
    let want_lse = f64s(&t("lse").unwrap());
    let want_gh = f64s(&t("grad_hidden").unwrap());
    let want_gw = f64s(&t("grad_weight").unwrap());
    let want_gb = t("grad_bias").map(|x| f64s(&x));
    for layout in [WeightLayout::VocabMajor, WeightLayout::HiddenMajor] {
        let wl = if layout == WeightLayout::VocabMajor { w.clone() } else { transpose(&w, v, d) };
        let layer = SoftmaxLayer::new(&wl[..], layout, v, d, b.as_deref()).unwrap();
        let hm = MatRef::new(&hv, n, d).unwrap();
        let fwd = cross_entropy(&layer, hm, &y, &opts).unwrap();
        let (out, g) = cross_entropy_with_grad(&layer, hm, &y, &opts, upstream).unwrap();
        assert_eq!(fwd, out, "{name}: the forward-only loss differs from the one with gradients");
        assert_eq!(out.loss.len(), want_loss.len());
        for (a, b) in out.loss.iter().zip(&want_loss) {
            assert!((*a as f64 - b).abs() <= 1e-5 * b.abs().max(1e-3), "{name} {layout:?}: loss {a} vs {b}");
        }
        for (a, b) in out.lse.iter().zip(&want_lse) {
            assert!((*a as f64 - b).abs() <= 2e-6 * b.abs().max(1.0), "{name}: lse {a} vs {b}");
        }
        let gw = if layout == WeightLayout::VocabMajor { g.weight.clone() } else { transpose(&g.weight, d, v) };
        let e = [rel_frob(&g.hidden, &want_gh), rel_frob(&gw, &want_gw)];
        assert!(e[0] <= 1e-4 && e[1] <= 1e-4, "{name} {layout:?}: grad errors {e:?}");
        match (&g.bias, &want_gb) {
            (Some(gb), Some(wb)) => assert!(rel_frob(gb, wb) <= 1e-4, "{name}: grad_bias"),
            (None, None) => {}
            _ => panic!("{name}: bias gradient presence differs"),
        }
    }
}

#[test]
fn matches_pytorch_mean() {
    check_case("mean_basic");
}

#[test]
fn matches_pytorch_smoothing_weights_ignore_index() {
    check_case("smooth_weights_ignore");
}

#[test]
fn matches_pytorch_none_with_upstream() {
    check_case("none_upstream");
}

#[test]
fn matches_pytorch_softcap_temperature_zloss() {
    check_case("softcap_temp_zloss");
}

#[test]
fn matches_pytorch_sum_custom_ignore_index() {
    check_case("sum_ignore_custom");
}

fn small_layer(rng: &mut Rng, n: usize, d: usize, v: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<i64>) {
    let h = rng.vec(n * d, -1.0, 1.0);
    let w = rng.vec(v * d, -0.5, 0.5);
    let b = rng.vec(v, -0.5, 0.5);
    let y = (0..n).map(|_| rng.below(v) as i64).collect();
    (h, w, b, y)
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng(31);
    let (n, d, v) = (5, 4, 9);
    let (h, w, b, mut y) = small_layer(&mut rng, n, d, v);
    y[3] = -100;
    let cw: Vec<f32> = (0..v).map(|j| 0.5 + j as f32 / 9.0).collect();
    // Class weights that sum to 0 over the targets: the cross-entropy part is 0 under mean
    // (not NaN), and the z-loss alone remains, with its gradient.
    let zero = vec![0f32; v];
    for cw in [&cw, &zero] {
        let opts = CrossEntropyOptions {
            label_smoothing: 0.1,
            class_weights: Some(cw),
            z_loss: 0.05,
            softcap: Some(3.0),
            temperature: 0.9,
            ..Default::default()
        };
        check_finite_differences(&h, &w, &b, &y, (n, d, v), &opts);
    }
}

fn check_finite_differences(
    h: &[f32],
    w: &[f32],
    b: &[f32],
    y: &[i64],
    (n, d, v): (usize, usize, usize),
    opts: &CrossEntropyOptions,
) {
    let (h, w, b) = (h.to_vec(), w.to_vec(), b.to_vec());
    let loss = |h: &[f32], w: &[f32], b: &[f32]| {
        let layer = SoftmaxLayer::new(w, WeightLayout::VocabMajor, v, d, Some(b)).unwrap();
        cross_entropy(&layer, MatRef::new(h, n, d).unwrap(), y, opts).unwrap().loss[0] as f64
    };
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, Some(&b[..])).unwrap();
    let (_, g) =
        cross_entropy_with_grad(&layer, MatRef::new(&h, n, d).unwrap(), y, opts, Upstream::Scalar(1.0)).unwrap();
    assert!(g.hidden.iter().any(|&x| x != 0.0), "a gradient to check");
    let step = 1e-2f32;
    let fd = |f: &dyn Fn(f32) -> f64| (f(step) - f(-step)) / (2.0 * step as f64);
    for i in 0..h.len() {
        let num = fd(&|e| {
            let mut x = h.clone();
            x[i] += e;
            loss(&x, &w, &b)
        });
        assert!((num - g.hidden[i] as f64).abs() <= 2e-3 * num.abs().max(0.05), "dH[{i}]: fd {num} vs {}", g.hidden[i]);
    }
    for i in (0..w.len()).step_by(5) {
        let num = fd(&|e| {
            let mut x = w.clone();
            x[i] += e;
            loss(&h, &x, &b)
        });
        assert!((num - g.weight[i] as f64).abs() <= 2e-3 * num.abs().max(0.05), "dW[{i}]: fd {num} vs {}", g.weight[i]);
    }
    for i in 0..v {
        let num = fd(&|e| {
            let mut x = b.clone();
            x[i] += e;
            loss(&h, &w, &x)
        });
        let gb = g.bias.as_ref().unwrap()[i] as f64;
        assert!((num - gb).abs() <= 2e-3 * num.abs().max(0.05), "db[{i}]: fd {num} vs {gb}");
    }
}

#[test]
fn all_rows_ignored_gives_zero_under_mean() {
    let mut rng = Rng(2);
    let (n, d, v) = (4, 3, 6);
    let (h, w, b, _) = small_layer(&mut rng, n, d, v);
    let y = vec![-100i64; n];
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, Some(&b[..])).unwrap();
    let (out, g) = cross_entropy_with_grad(
        &layer,
        MatRef::new(&h, n, d).unwrap(),
        &y,
        &CrossEntropyOptions::default(),
        Upstream::Scalar(1.0),
    )
    .unwrap();
    assert_eq!(out.loss, vec![0.0]);
    assert!(g.hidden.iter().chain(&g.weight).chain(g.bias.as_ref().unwrap()).all(|&x| x == 0.0));
}

#[test]
fn class_weights_at_either_end_of_the_f32_range_scale_out() {
    // Weights w·2^k (exact: few significant bits): under mean the scale cancels, under sum
    // and none it multiplies the loss and the gradients. Subnormal weights with smoothing
    // used to give an infinite gradient coefficient, huge ones an overflowing Σ w_j·z_j.
    let mut rng = Rng(7);
    let (n, d, v) = (9, 4, 7);
    let (h, w, b, mut y) = small_layer(&mut rng, n, d, v);
    y[3] = -100;
    let cw: Vec<f32> = (0..v).map(|j| [0.5f32, 0.75, 1.0, 1.25, 2.0][j % 5]).collect();
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, Some(&b[..])).unwrap();
    let run = |weights: &[f32], reduction: Reduction, eps: f32| {
        let o = CrossEntropyOptions {
            class_weights: Some(weights),
            reduction,
            label_smoothing: eps,
            z_loss: 0.0,
            ..Default::default()
        };
        let up = vec![1f32; n];
        let upstream = if reduction == Reduction::None { Upstream::PerRow(&up) } else { Upstream::Scalar(1.0) };
        cross_entropy_with_grad(&layer, MatRef::new(&h, n, d).unwrap(), &y, &o, upstream).unwrap()
    };
    for k in [-140i32, -100, 120] {
        let f = 2f64.powi(k);
        let scaled: Vec<f32> = cw.iter().map(|&x| (x as f64 * f) as f32).collect();
        assert!(scaled.iter().zip(&cw).all(|(&a, &b)| a as f64 == b as f64 * f), "exact scaling");
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            // Under sum and none the outputs scale by 2^k: subnormal below 2^-126, where
            // only their absolute error (a few subnormal steps) can be asked for.
            let unit = if reduction == Reduction::Mean { 1.0 } else { f };
            let close = |got: &[f32], want: &[f32], what: &str| {
                for (&g, &w) in got.iter().zip(want) {
                    let want = w as f64 * unit;
                    let tol = 1e-5 * want.abs().max(unit * 1e-3) + 1e-44;
                    assert!(
                        g.is_finite() && (g as f64 - want).abs() <= tol,
                        "2^{k} {reduction:?} {what}: {g} against {want}"
                    );
                }
            };
            for eps in [0.0, 0.3] {
                let (a, ga) = run(&cw, reduction, eps);
                let (s, gs) = run(&scaled, reduction, eps);
                close(&s.loss, &a.loss, "loss");
                assert_eq!(s.lse, a.lse);
                close(&gs.hidden, &ga.hidden, "dH");
                close(&gs.weight, &ga.weight, "dW");
                close(gs.bias.as_ref().unwrap(), ga.bias.as_ref().unwrap(), "db");
            }
        }
    }
}

#[test]
fn bit_identical_for_any_thread_count() {
    // 10 segments of classes at V = 5000; 20 at V = 20000, more than the parts of dH that
    // two or three threads may hold at once, so that workers wait for earlier parts.
    for (n, d, v) in [(300, 40, 5000), (60, 8, 20000)] {
        let mut rng = Rng(3);
        let (h, w, b, y) = small_layer(&mut rng, n, d, v);
        let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, Some(&b[..])).unwrap();
        let opts = CrossEntropyOptions { label_smoothing: 0.1, z_loss: 1e-3, ..Default::default() };
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
                let hv = MatRef::new(&h, n, d).unwrap();
                cross_entropy_with_grad(&layer, hv, &y, &opts, Upstream::Scalar(1.0)).unwrap()
            })
        };
        let one = run(1);
        for t in [2, 3, 5] {
            assert!(run(t) == one, "V = {v}: {t} threads differ from 1");
        }
    }
}

/// Losses running at once on one pool (from `join`, from a parallel iterator, and nested
/// inside another pool's task) finish, and give the bits of one call on its own: each call
/// hands its segments to every worker of the pool and may make a worker wait for an
/// earlier segment's part of dH, which must never wait on another call.
#[test]
fn concurrent_losses_on_one_pool_finish_with_the_same_bits() {
    let mut rng = Rng(8);
    let (n, d, v) = (70, 8, 20000);
    let (h, w, b, y) = small_layer(&mut rng, n, d, v);
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, Some(&b[..])).unwrap();
    let opts = CrossEntropyOptions::default();
    let one = || {
        let hv = MatRef::new(&h, n, d).unwrap();
        cross_entropy_with_grad(&layer, hv, &y, &opts, Upstream::Scalar(1.0)).unwrap()
    };
    let want = one();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let (a, c) = pool.install(|| rayon::join(one, one));
        assert!(a == want && c == want, "{threads} threads: join");
        use rayon::prelude::*;
        let all: Vec<_> = pool.install(|| (0..6).into_par_iter().map(|_| one()).collect());
        assert!(all.iter().all(|r| *r == want), "{threads} threads: parallel iterator");
        let inner = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let nested = pool.install(|| rayon::join(|| inner.install(one), one));
        assert!(nested.0 == want && nested.1 == want, "{threads} threads: nested pool");
    }
}

/// The gradient buffers are written over, never read: buffers full of NaN give the same
/// bits as fresh ones, over several blocks of rows (the first block writes dW, the others
/// add to it), in both layouts, with and without dH.
#[test]
fn gradient_buffers_are_overwritten_not_read() {
    let mut rng = Rng(5);
    let (n, d, v) = (600, 24, 3000);
    let (h, w, b, y) = small_layer(&mut rng, n, d, v);
    let hv = MatRef::new(&h, n, d).unwrap();
    let wt = transpose(&w, v, d);
    let opts = CrossEntropyOptions { label_smoothing: 0.05, ..Default::default() };
    for (weights, layout) in [(&w, WeightLayout::VocabMajor), (&wt, WeightLayout::HiddenMajor)] {
        let layer = SoftmaxLayer::new(&weights[..], layout, v, d, Some(&b[..])).unwrap();
        let (_, fresh) = cross_entropy_with_grad(&layer, hv, &y, &opts, Upstream::Scalar(1.0)).unwrap();
        for with_dh in [true, false] {
            let (mut gh, mut gw, mut gb) = (vec![f32::NAN; n * d], vec![f32::NAN; v * d], vec![f32::NAN; v]);
            let g = GradientsMut { hidden: with_dh.then_some(&mut gh[..]), weight: &mut gw, bias: Some(&mut gb) };
            cross_entropy_with_grad_into(&layer, hv, &y, &opts, Upstream::Scalar(1.0), g).unwrap();
            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same(&gw, &fresh.weight), "{layout:?}, dH {with_dh}: dW");
            assert!(same(&gb, fresh.bias.as_ref().unwrap()), "{layout:?}, dH {with_dh}: db");
            if with_dh {
                assert!(same(&gh, &fresh.hidden), "{layout:?}: dH");
            }
            assert!(gw.iter().any(|&x| x != 0.0), "{layout:?}: dW is all zeros");
        }
    }
}

#[test]
fn the_kept_block_buffer_is_never_read_before_it_is_written() {
    // The loss keeps its block buffer for the next call. With the kept buffer filled with
    // NaN on its way back, a call that read any value it had not written would come out
    // NaN or differ: each case runs once on a fresh buffer and then on the poisoned one
    // (twice, in case a test running alongside took the buffer in between). Both layouts,
    // with and without a bias, f32 and bf16, with and without gradients, options that
    // touch every step of the row work.
    use softmax_layer::Precision;
    use softmax_layer::loss::{release_scratch, set_poison_kept_scratch};
    let mut rng = Rng(13);
    let (n, d, v) = (90, 16, 4000);
    let (h, w, b, y) = small_layer(&mut rng, n, d, v);
    let wt = transpose(&w, v, d);
    let hv = MatRef::new(&h, n, d).unwrap();
    let opts = CrossEntropyOptions {
        label_smoothing: 0.1,
        z_loss: 1e-3,
        softcap: Some(4.0),
        temperature: 0.9,
        ..Default::default()
    };
    set_poison_kept_scratch(true);
    for precision in [Precision::F32, Precision::Bf16] {
        for (weights, layout) in [(&w, WeightLayout::VocabMajor), (&wt, WeightLayout::HiddenMajor)] {
            for bias in [Some(&b[..]), None] {
                let layer =
                    SoftmaxLayer::new(&weights[..], layout, v, d, bias).unwrap().with_precision(precision).unwrap();
                let grads = || cross_entropy_with_grad(&layer, hv, &y, &opts, Upstream::Scalar(1.0)).unwrap();
                let forward = || cross_entropy(&layer, hv, &y, &opts).unwrap();
                release_scratch();
                let (want_g, want_f) = (grads(), forward());
                for _ in 0..2 {
                    let case = format!("{precision:?} {layout:?} bias {}", bias.is_some());
                    assert!(grads() == want_g, "{case}: gradients differ on a kept buffer");
                    assert!(forward() == want_f, "{case}: the loss differs on a kept buffer");
                }
            }
        }
    }
    set_poison_kept_scratch(false);
}

#[test]
fn bad_options_are_errors() {
    let mut rng = Rng(4);
    let (n, d, v) = (3, 2, 5);
    let (h, w, _, y) = small_layer(&mut rng, n, d, v);
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>).unwrap();
    let hm = MatRef::new(&h, n, d).unwrap();
    let e = |o: CrossEntropyOptions, y: &[i64]| cross_entropy(&layer, hm, y, &o).unwrap_err().to_string();
    assert_eq!(e(Default::default(), &[0, 5, 1]), "targets[1] = 5 is out of range [0, 5)");
    assert!(e(Default::default(), &[0, 1]).contains("targets have length 2, expected n = 3"));
    assert!(
        e(CrossEntropyOptions { label_smoothing: 1.5, ..Default::default() }, &y)
            .contains("label_smoothing must be in [0, 1], got 1.5")
    );
    let neg = [1.0f32, -0.5, 1.0, 1.0, 1.0];
    assert!(
        e(CrossEntropyOptions { class_weights: Some(&neg), ..Default::default() }, &y)
            .contains("class_weights[1] = -0.5")
    );
    let short = [1.0f32; 4];
    assert!(
        e(CrossEntropyOptions { class_weights: Some(&short), ..Default::default() }, &y)
            .contains("length 4, expected V = 5")
    );
    assert!(e(CrossEntropyOptions { softcap: Some(0.0), ..Default::default() }, &y).contains("softcap"));
    // A softcap whose reciprocal overflows, and finite logits whose lse overflows at T = 0.9:
    // errors, not an inf loss with NaN gradients.
    assert!(e(CrossEntropyOptions { softcap: Some(1e-45), ..Default::default() }, &y).contains("1/softcap"));
    let eye = [1.0f32, 0.0, 0.0, 1.0];
    let id = SoftmaxLayer::new(&eye[..], WeightLayout::VocabMajor, 2, 2, None::<&[f32]>).unwrap();
    let big = [3.3e38f32, 0.0];
    let hot = CrossEntropyOptions { temperature: 0.9, ..Default::default() };
    let err =
        cross_entropy_with_grad(&id, MatRef::new(&big, 1, 2).unwrap(), &[0], &hot, Upstream::Scalar(1.0)).unwrap_err();
    assert!(matches!(err, Error::LogitsOverflow { row: 0 }), "{err}");
    // Class weights or a z-loss so large that the loss itself overflows f32.
    let huge = [f32::MAX; 5];
    let none = CrossEntropyOptions {
        class_weights: Some(&huge),
        reduction: Reduction::None,
        z_loss: 1.0,
        ..Default::default()
    };
    assert!(e(none, &y).contains("the loss of row"));
    assert!(e(CrossEntropyOptions { z_loss: f32::MAX, ..Default::default() }, &y).contains("overflows f32"));
    assert!(e(CrossEntropyOptions { temperature: -1.0, ..Default::default() }, &y).contains("temperature"));
    let mut bad = h.clone();
    bad[3] = f32::INFINITY;
    let err = cross_entropy(&layer, MatRef::new(&bad, n, d).unwrap(), &y, &Default::default()).unwrap_err();
    assert!(matches!(err, Error::NonFinite { row: 1, col: 1, .. }), "{err}");
    let up = [1.0f32; 3];
    let err = cross_entropy_with_grad(&layer, hm, &y, &Default::default(), Upstream::PerRow(&up)).unwrap_err();
    assert!(err.to_string().contains("needs reduction 'none'"), "{err}");
}

/// SplitMix64 as in scripts/make_fixtures.py: the i-th output (from 1) of `seed`.
fn splitmix(seed: u64, count: usize) -> Vec<u64> {
    let mut r = Rng(seed);
    (0..count).map(|_| r.next_u64()).collect()
}

fn uniform(seed: u64, count: usize, scale: f64) -> Vec<f32> {
    splitmix(seed, count).into_iter().map(|z| (((z >> 40) as f64 / 16_777_216.0 * 2.0 - 1.0) * scale) as f32).collect()
}

#[test]
fn agrees_with_pytorch_at_full_scale() {
    let big = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cross_entropy_big.safetensors");
    let get = |k: &str| Tensor::load(&TensorSpec::parse(&format!("{big}:{k}")).unwrap()).unwrap();
    let (n, d, v) = (2048, 768, 50257);
    let h = uniform(1, n * d, 1.0);
    let w = uniform(2, v * d, 1.0 / 16.0);
    let y: Vec<i64> = splitmix(3, n).into_iter().map(|z| (z % v as u64) as i64).collect();
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>).unwrap();
    let (out, g) = cross_entropy_with_grad(
        &layer,
        MatRef::new(&h, n, d).unwrap(),
        &y,
        &CrossEntropyOptions::default(),
        Upstream::Scalar(1.0),
    )
    .unwrap();
    let want_loss = f64s(&get("loss"))[0];
    let rel = (out.loss[0] as f64 - want_loss).abs() / want_loss.abs();
    assert!(rel <= 1e-5, "loss {} vs {want_loss}: rel {rel:e}", out.loss[0]);
    for (a, b) in out.lse.iter().zip(f64s(&get("lse"))) {
        assert!((*a as f64 - b).abs() <= 2e-6 * b.abs().max(1.0), "lse {a} vs {b}");
    }
    let eh = rel_frob(&g.hidden, &f64s(&get("grad_hidden")));
    assert!(eh <= 1e-4, "grad_hidden rel Frobenius error {eh:e}");
    let rows = get("grad_weight_rows").to_i64().unwrap();
    let sampled: Vec<f32> =
        rows.iter().flat_map(|&j| g.weight[j as usize * d..(j as usize + 1) * d].iter().copied()).collect();
    let ew = rel_frob(&sampled, &f64s(&get("grad_weight_sampled")));
    assert!(ew <= 1e-4, "grad_weight (256 sampled rows) rel Frobenius error {ew:e}");
    let norm = g.weight.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let want_norm = f64s(&get("grad_weight_norm"))[0];
    assert!((norm - want_norm).abs() <= 1e-4 * want_norm, "‖dW‖ {norm} vs {want_norm}");
    println!("n=2048 d=768 V=50257: loss rel err {rel:.2e}, dH {eh:.2e}, dW rows {ew:.2e}");
}

#[test]
fn a_huge_temperature_over_a_gap_beyond_f32_counts_the_gap() {
    // Logits [3e38, −3e38] over T = 3e38 are [1, −1], though their gap exceeds f32::MAX.
    let w = [1.0f32, -1.0];
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 2, 1, None::<&[f32]>).unwrap();
    let h = [3e38f32];
    let o = CrossEntropyOptions { temperature: 3e38, ..Default::default() };
    let (out, g) =
        cross_entropy_with_grad(&layer, MatRef::new(&h, 1, 1).unwrap(), &[1], &o, Upstream::Scalar(1.0)).unwrap();
    let ln_s = (1.0 + (-2f64).exp()).ln();
    assert!((out.loss[0] as f64 - (2.0 + ln_s)).abs() < 1e-6, "loss {}", out.loss[0]);
    assert!((out.lse[0] as f64 - (1.0 + ln_s)).abs() < 1e-6, "lse {}", out.lse[0]);
    // dL/dh = Σ_j (p_j − [j = 1])·W_j / T = 2·p_0 / T (subnormal: absolute precision).
    let p0 = 1.0 / (1.0 + (-2f64).exp());
    assert!((g.hidden[0] as f64 - 2.0 * p0 / 3e38).abs() < 1e-44, "dH {}", g.hidden[0]);
}

/// A class whose probability is under exp(-86.5) ≈ 2.7e-38 gets exactly 0 in the gradient,
/// never a subnormal (which costs x86 a microcode assist in every product that reads it);
/// the others match float64. (Upstream 1 over one row: the gradient is p − [j = y].)
#[test]
fn gradient_shares_below_the_normal_range_flush_to_zero() {
    let v = 3000;
    // Logits: the bias alone (W = 0): many near 0, a few 80–87 below.
    let bias: Vec<f32> = (0..v).map(|j| [0.0f32, -3.0, -1.0, -84.0, -86.0, -80.0, -87.5][j % 7]).collect();
    let w = vec![0.0f32; v];
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, 1, Some(&bias[..])).unwrap();
    let h = [1.0f32];
    let opts = CrossEntropyOptions::default();
    let (_, g) =
        cross_entropy_with_grad(&layer, MatRef::new(&h, 1, 1).unwrap(), &[1], &opts, Upstream::Scalar(1.0)).unwrap();
    let s: f64 = bias.iter().map(|&b| (b as f64).exp()).sum();
    for (j, &gj) in g.bias.as_ref().unwrap().iter().enumerate() {
        let want = (bias[j] as f64).exp() / s - if j == 1 { 1.0 } else { 0.0 };
        assert!(gj == 0.0 || gj.abs() >= f32::MIN_POSITIVE, "class {j}: {gj:e} is subnormal");
        if want.abs() >= 1e-30 {
            assert!(((gj as f64) - want).abs() <= 1e-5 * want.abs(), "class {j}: {gj} vs {want}");
        } else if want.abs() < 2.6e-38 {
            assert_eq!(gj, 0.0, "class {j}: {gj:e} should be flushed");
        }
    }
}

/// Logits that share an offset far above their spread: the loss is (M − z_y)/T + ln S, not
/// lse − z_y/T (which lost ln 2 against 1e17 and gave 0), and agrees with the target
/// log-probabilities.
#[test]
fn a_large_common_offset_keeps_the_loss() {
    let w = [1.0f32, 1.0];
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 2, 1, None::<&[f32]>).unwrap();
    for h in [1e14f32, 1e17, 1e20, -3e38] {
        let hm = MatRef::new(std::slice::from_ref(&h), 1, 1).unwrap();
        for eps in [0.0, 0.4, 1.0] {
            // Uniform logits: every −log p is ln 2, whatever the smoothing.
            let o = CrossEntropyOptions { label_smoothing: eps, ..Default::default() };
            let out = cross_entropy(&layer, hm, &[0], &o).unwrap();
            assert!((out.loss[0] as f64 - 2f64.ln()).abs() < 1e-7, "h = {h}, ε = {eps}: loss {}", out.loss[0]);
        }
    }
    // Smoothing with class weights over 3000 classes in tiles and segments, logits spread
    // by a few units over an offset of 1e6 (1e5 gave 5e-6 relative before): float64.
    let (v, d) = (3000usize, 2usize);
    let w: Vec<f32> = (0..v).flat_map(|j| [1.0f32, ((j * 37) % 101) as f32 * 0.05]).collect();
    let cw: Vec<f32> = (0..v).map(|j| 0.5 + (j % 7) as f32 * 0.25).collect();
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>).unwrap();
    let h = [1e6f32, 1.0];
    let o = CrossEntropyOptions { label_smoothing: 0.3, class_weights: Some(&cw), ..Default::default() };
    let y = 17usize;
    let out = cross_entropy(&layer, MatRef::new(&h, 1, d).unwrap(), &[y as i64], &o).unwrap();
    // (The logits as the f32 product rounds them: 1e6 + w, on a grid of 1/16.)
    let z: Vec<f64> = (0..v).map(|j| (1e6f32 * w[j * d] + w[j * d + 1]) as f64 - 1e6).collect();
    let m = z.iter().cloned().fold(f64::MIN, f64::max);
    let lse = m + z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
    let smooth: f64 = (0..v).map(|j| cw[j] as f64 * (lse - z[j])).sum();
    let want = ((1.0 - 0.3) * cw[y] as f64 * (lse - z[y]) + 0.3 / v as f64 * smooth) / cw[y] as f64;
    assert!((out.loss[0] as f64 - want).abs() <= 1e-6 * want, "loss {} vs {want}", out.loss[0]);
}

/// A gradient that overflows f32 with finite coefficients (an upstream gradient of 3e38
/// over a sum, weights near the range's end) is an error, not an infinity returned as Ok.
#[test]
fn an_overflowing_gradient_is_an_error() {
    let o = CrossEntropyOptions { reduction: Reduction::Sum, ..Default::default() };
    let w = [1.0f32, 0.0];
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 2, 1, None::<&[f32]>).unwrap();
    let h = [2.0f32, 2.0];
    let err = cross_entropy_with_grad(&layer, MatRef::new(&h, 2, 1).unwrap(), &[1, 1], &o, Upstream::Scalar(3e38))
        .unwrap_err()
        .to_string();
    assert!(err.contains("the gradient overflows f32 (grad_weight[0, 0] is inf)"), "{err}");
    let w = [3e38f32, -3e38];
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 2, 1, None::<&[f32]>).unwrap();
    let err = cross_entropy_with_grad(&layer, MatRef::new(&[1e-38], 1, 1).unwrap(), &[1], &o, Upstream::Scalar(1.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("grad_hidden[0, 0] is inf"), "{err}");
}
