//! Training: the convex optimum against scikit-learn, gradients against float64, optimizers,
//! determinism over thread counts, and checkpoints that resume to the same bits.

mod common;
use common::Rng;
use softmax_layer::MatRef;
use softmax_layer::io::read_safetensors;
use softmax_layer::train::{
    Checkpointing, Data, Event, Model, Optimizer, TrainConfig, evaluate, latest_checkpoint, loss_and_gradient, train,
};
use std::path::Path;

/// scikit-learn's digits (features / 16) and its LogisticRegression optimum at C = 1,
/// written by scripts/sklearn_reference.py.
struct Digits {
    x: Vec<f32>,
    y: Vec<i64>,
    /// objective, log-loss, accuracy, λ
    reference: Vec<f64>,
    coef: Vec<f64>,
    intercept: Vec<f64>,
}

fn digits() -> Digits {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/digits.safetensors");
    let t = |n: &str| read_safetensors(&p, n).unwrap();
    Digits {
        x: t("features").to_f32().unwrap().into_owned(),
        y: t("labels").to_i64().unwrap(),
        reference: t("sklearn_objective").to_f64().unwrap(),
        coef: t("sklearn_coef").to_f64().unwrap(),
        intercept: t("sklearn_intercept").to_f64().unwrap(),
    }
}

/// J(W, b) in float64, straight from the definition.
fn objective_f64(x: &[f32], y: &[i64], d: usize, w: &[f64], b: &[f64], lam: f64) -> f64 {
    let k = b.len();
    let n = y.len();
    let mut total = 0.0;
    for i in 0..n {
        let z: Vec<f64> =
            (0..k).map(|c| b[c] + (0..d).map(|j| w[c * d + j] * x[i * d + j] as f64).sum::<f64>()).collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        total += lse - z[y[i] as usize];
    }
    total / n as f64 + 0.5 * lam * w.iter().map(|v| v * v).sum::<f64>()
}

/// With an absurd penalty no step along L-BFGS's first direction lowers the objective
/// measurably in f64 (the weights' curvature is 1e30, the bias's about 1): it stops, and
/// says the tolerance is not met rather than claiming convergence.
#[test]
fn lbfgs_says_when_it_stops_without_meeting_its_tolerance() {
    let mut rng = Rng(3);
    let (n, d) = (40, 3);
    let x = rng.vec(n * d, -1.0, 1.0);
    let y: Vec<i64> = (0..n).map(|i| [0, 0, 1, 2][i % 4]).collect();
    let data = Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap();
    let mut stop = None;
    let cfg = TrainConfig { optimizer: Optimizer::lbfgs(), l2: 1e30, ..Default::default() };
    train(data, &cfg, |e| {
        if let Event::Converged { tolerance_met, max_gradient, .. } = e {
            stop = Some((tolerance_met, max_gradient));
        }
    })
    .unwrap();
    let (met, g) = stop.expect("L-BFGS stops");
    // The bias gradient at b = 0 is the class frequencies' gap to uniform: 1/2 − 1/3.
    assert!(!met && g > 0.1, "tolerance met: {met}, largest gradient entry {g}");
}

#[test]
fn lbfgs_reaches_the_scikit_learn_optimum_on_digits() {
    let dg = digits();
    let (n, d) = (dg.y.len(), 64);
    assert_eq!(dg.x.len(), n * d);
    let lam = dg.reference[3];
    assert!((lam - 1.0 / 1797.0).abs() < 1e-15);
    let data = Data::new(MatRef::new(&dg.x, n, d).unwrap(), &dg.y).unwrap();
    let cfg = TrainConfig { optimizer: Optimizer::lbfgs(), l2: lam as f32, ..Default::default() };
    let mut converged = None;
    let out = train(data, &cfg, |e| {
        if let Event::Converged { iterations, evaluations, tolerance_met, .. } = e {
            assert!(tolerance_met);
            converged = Some((iterations, evaluations));
        }
    })
    .unwrap();
    let (iterations, evaluations) = converged.expect("L-BFGS runs to convergence by default");
    println!("{iterations} iterations, {evaluations} evaluations");
    // The starting point, then at least one evaluation per iteration; the line search
    // accepts the unit step most of the time.
    assert!(
        evaluations > iterations && evaluations <= 2 * iterations,
        "{iterations} iterations, {evaluations} evaluations"
    );
    // Our objective, recomputed independently in float64 from the f32 model.
    let w: Vec<f64> = out.model.weight.iter().map(|&v| v as f64).collect();
    let b: Vec<f64> = out.model.bias.iter().map(|&v| v as f64).collect();
    let ours = objective_f64(&dg.x, &dg.y, d, &w, &b, lam);
    let theirs = objective_f64(&dg.x, &dg.y, d, &dg.coef, &dg.intercept, lam);
    assert!((theirs - dg.reference[0]).abs() < 1e-9, "the float64 objective matches sklearn's: {theirs}");
    println!("f32: objective {ours:.7} against scikit-learn's {theirs:.7} ({:+.1e})", ours - theirs);
    assert!((ours - theirs).abs() < 1e-4, "objective {ours} vs scikit-learn's {theirs}");
    assert!((out.objective - ours).abs() < 1e-5, "reported {} vs float64 {ours}", out.objective);
    assert!((out.train.loss - dg.reference[1]).abs() < 1e-3, "log-loss {} vs {}", out.train.loss, dg.reference[1]);
    assert!((out.train.accuracy - dg.reference[2]).abs() < 0.003, "accuracy {}", out.train.accuracy);
}

#[test]
fn lbfgs_in_bf16_precisions_reaches_the_optimum_within_their_accuracy() {
    // The products in bf16x3 (about 16 bits) and bf16 (8 bits), the optimizer in f64: the
    // objective, recomputed in float64 from the f32 model, lands near scikit-learn's, and
    // bf16x3 as near as f32 does.
    use softmax_layer::bf16::Precision;
    let dg = digits();
    let (n, d) = (dg.y.len(), 64);
    let lam = dg.reference[3];
    let data = Data::new(MatRef::new(&dg.x, n, d).unwrap(), &dg.y).unwrap();
    let theirs = objective_f64(&dg.x, &dg.y, d, &dg.coef, &dg.intercept, lam);
    // (`cargo test --release --test train bf16_precisions -- --nocapture` prints the gaps.)
    for (precision, tol) in [(Precision::Bf16x3, 1e-5), (Precision::Bf16, 2e-3)] {
        let cfg = TrainConfig { l2: lam as f32, precision, ..Default::default() };
        let out = train(data, &cfg, |_| {}).unwrap();
        let w: Vec<f64> = out.model.weight.iter().map(|&v| v as f64).collect();
        let b: Vec<f64> = out.model.bias.iter().map(|&v| v as f64).collect();
        let ours = objective_f64(&dg.x, &dg.y, d, &w, &b, lam);
        println!("{precision}: objective {ours:.7} against scikit-learn's {theirs:.7} ({:+.1e})", ours - theirs);
        assert!((ours - theirs).abs() < tol, "{precision}: objective {ours} vs scikit-learn's {theirs}");
        // The reported metrics are computed in the same precision, close to float64's.
        assert!((out.objective - ours).abs() < 10.0 * tol, "{precision}: reported {} vs {ours}", out.objective);
        assert!((out.train.accuracy - dg.reference[2]).abs() < 0.01, "{precision}: accuracy {}", out.train.accuracy);
    }
}

/// Row `i`'s logits `W·x_i + b` in float64 (`x` is `[n, d]`).
fn logits_f64(model: &Model, x: &[f32], i: usize) -> Vec<f64> {
    let d = model.dim;
    (0..model.classes)
        .map(|c| {
            model.bias[c] as f64 + (0..d).map(|j| model.weight[c * d + j] as f64 * x[i * d + j] as f64).sum::<f64>()
        })
        .collect()
}

#[test]
fn gradient_matches_float64() {
    let mut rng = Rng(3);
    // n > 2048 and K·d small: the chunked parallel path; and a small n: the single call.
    for (n, d, k) in [(5000usize, 7usize, 5usize), (37, 9, 4)] {
        let x = rng.vec(n * d, -2.0, 2.0);
        let y: Vec<i64> = (0..n).map(|_| rng.below(k) as i64).collect();
        let model = Model { weight: rng.vec(k * d, -0.5, 0.5), bias: rng.vec(k, -0.5, 0.5), classes: k, dim: d };
        let (mut gw, mut gb) = (vec![f32::NAN; k * d], vec![f32::NAN; k]);
        let data = Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap();
        let loss = loss_and_gradient(&model, data, &mut gw, &mut gb).unwrap();
        let (mut rw, mut rb, mut rl) = (vec![0f64; k * d], vec![0f64; k], 0f64);
        for i in 0..n {
            let z = logits_f64(&model, &x, i);
            let m = z.iter().cloned().fold(f64::MIN, f64::max);
            let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
            rl += m + s.ln() - z[y[i] as usize];
            for c in 0..k {
                let g = ((z[c] - m).exp() / s - if c as i64 == y[i] { 1.0 } else { 0.0 }) / n as f64;
                rb[c] += g;
                for j in 0..d {
                    rw[c * d + j] += g * x[i * d + j] as f64;
                }
            }
        }
        assert!((loss - rl / n as f64).abs() < 1e-6, "loss {loss} vs {}", rl / n as f64);
        for (g, r) in gw.iter().zip(&rw).chain(gb.iter().zip(&rb)) {
            assert!((*g as f64 - r).abs() < 1e-6, "gradient {g} vs {r} (n={n})");
        }
    }
}

/// `evaluate` against float64, on both of its paths: few classes (the narrow path, over
/// several chunks of rows and one) and more than it takes (the layer's target statistics).
#[test]
fn evaluate_matches_float64() {
    let mut rng = Rng(17);
    for (n, d, k) in [(5000usize, 7usize, 5usize), (37, 9, 4), (300, 6, 300)] {
        let x = rng.vec(n * d, -2.0, 2.0);
        let y: Vec<i64> = (0..n).map(|_| rng.below(k) as i64).collect();
        let model = Model { weight: rng.vec(k * d, -1.0, 1.0), bias: rng.vec(k, -0.5, 0.5), classes: k, dim: d };
        let m = evaluate(&model, Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap()).unwrap();
        let (mut loss, mut sure, mut maybe) = (0f64, 0usize, 0usize);
        for i in 0..n {
            let z = logits_f64(&model, &x, i);
            let mx = z.iter().cloned().fold(f64::MIN, f64::max);
            loss += mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln() - z[y[i] as usize];
            // The target's margin over the best other class: beyond rounding either way?
            let t = y[i] as usize;
            let other = (0..k).filter(|&c| c != t).map(|c| z[c]).fold(f64::MIN, f64::max);
            sure += usize::from(z[t] - other > 1e-4);
            maybe += usize::from(z[t] - other >= -1e-4);
        }
        let what = format!("n={n} d={d} K={k}");
        assert!((m.loss - loss / n as f64).abs() < 1e-6, "{what}: loss {} vs {}", m.loss, loss / n as f64);
        let correct = (m.accuracy * n as f64).round() as usize;
        assert!((sure..=maybe).contains(&correct), "{what}: {correct} rows right, not in {sure}..={maybe}");
        // (Labels at random: about n/K rows right, so neither none nor all.)
        assert!(sure > 0 && maybe < n, "{what}: a range that cannot tell ({sure}..={maybe})");
        assert!((m.perplexity - m.loss.exp()).abs() < 1e-12);
    }
}

fn blobs(n: usize, d: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng(seed);
    let centers = rng.vec(k * d, -2.0, 2.0);
    let mut x = Vec::with_capacity(n * d);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        let c = rng.below(k);
        y.push(c as i64);
        for j in 0..d {
            x.push(centers[c * d + j] + rng.uniform(-1.5, 1.5));
        }
    }
    (x, y)
}

#[test]
fn minibatch_optimizers_approach_the_optimum() {
    let (n, d, k) = (3000, 10, 4);
    let (x, y) = blobs(n, d, k, 11);
    let data = Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap();
    let l2 = 1e-3;
    let exact = train(data, &TrainConfig { optimizer: Optimizer::lbfgs(), l2, ..Default::default() }, |_| {})
        .unwrap()
        .objective;
    let start = evaluate(&Model::zeros(k, d), data).unwrap().loss;
    assert!((start - (k as f64).ln()).abs() < 1e-6);
    for (opt, lr) in [(Optimizer::adamw(), 0.05), (Optimizer::sgd(), 0.2)] {
        let opt = match opt {
            Optimizer::AdamW { beta1, beta2, eps, .. } => Optimizer::AdamW { beta1, beta2, eps, weight_decay: 0.0 },
            o => o,
        };
        let cfg =
            TrainConfig { optimizer: opt, epochs: Some(30), batch_size: 100, lr, l2, seed: 5, ..Default::default() };
        let out = train(data, &cfg, |_| {}).unwrap();
        assert!(out.objective >= exact - 1e-5, "{opt:?}: {} below the optimum {exact}", out.objective);
        assert!(out.objective - exact < 0.01, "{opt:?}: objective {} vs optimum {exact}", out.objective);
        assert_eq!(out.step_objectives.len(), 30 * 30);
    }
}

#[test]
fn heldout_split_early_stopping_and_clipping() {
    let (n, d, k) = (2000, 6, 3);
    let (x, y) = blobs(n, d, k, 2);
    let data = Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap();
    let cfg = TrainConfig {
        optimizer: Optimizer::adamw(),
        epochs: Some(40),
        batch_size: 50,
        lr: 0.05,
        holdout: 0.25,
        patience: Some(2),
        clip_norm: Some(0.5),
        seed: 9,
        ..Default::default()
    };
    let mut stop = None;
    let out = train(data, &cfg, |e| {
        if let Event::EarlyStop { epoch, best_epoch } = e {
            stop = Some((epoch, best_epoch))
        }
    })
    .unwrap();
    let held = out.heldout.expect("held-out metrics");
    assert!(out.history.iter().all(|r| r.heldout.is_some()));
    // The returned model is the best epoch's: its held-out loss is the history's minimum.
    let best = out.history.iter().map(|r| r.heldout.unwrap().loss).fold(f64::MAX, f64::min);
    assert_eq!(held.loss, best);
    // 40 epochs of a separable problem: the held-out loss stops improving well before.
    let (epoch, best_epoch) = stop.expect("early stopping happened");
    assert_eq!(epoch - best_epoch, 2);
    assert_eq!(out.history.len(), epoch);
    assert!((held.perplexity - held.loss.exp()).abs() < 1e-12);
    assert!(held.accuracy > 0.8, "accuracy {}", held.accuracy);
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (n, d, k) = (6000, 12, 5);
    let (x, y) = blobs(n, d, k, 4);
    let data = Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap();
    let cfg = TrainConfig { optimizer: Optimizer::lbfgs(), epochs: Some(15), l2: 1e-3, ..Default::default() };
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| train(data, &cfg, |_| {}).unwrap())
    };
    let (a, b) = (run(1), run(2));
    assert_eq!(a.model, b.model);
    assert_eq!(a.step_objectives, b.step_objectives);
}

/// Runs `cfg` (with checkpoints) and "kills" it right after its checkpoint of `epoch`.
fn kill_after_checkpoint(data: Data<'_>, cfg: &TrainConfig, epoch: usize) {
    let mark = format!("{epoch:08}");
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train(data, cfg, |e| {
            if let Event::Checkpoint(p) = e
                && p.to_string_lossy().contains(&mark)
            {
                panic!("killed");
            }
        })
    }));
    assert!(crashed.is_err(), "the run was not killed after epoch {epoch}");
}

/// Checkpoints into `dir` every `every` epochs, resuming from them.
fn resumable(dir: &tempfile::TempDir, every: usize) -> Option<Checkpointing> {
    Some(Checkpointing { dir: dir.path().to_path_buf(), every, resume: true })
}

/// Runs `cfg` (resuming) and returns its output with the epoch it resumed after, if any.
fn train_resumed(data: Data<'_>, cfg: &TrainConfig) -> (softmax_layer::train::TrainOutput, Option<usize>) {
    let mut at = None;
    let out = train(data, cfg, |e| {
        if let Event::Resumed { epoch, .. } = e {
            at = Some(epoch)
        }
    })
    .unwrap();
    (out, at)
}

#[test]
fn resuming_a_killed_run_gives_the_same_bits() {
    let (n, d, k) = (1500, 8, 4);
    let (x, y) = blobs(n, d, k, 8);
    let data = Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap();
    for opt in [Optimizer::adamw(), Optimizer::sgd(), Optimizer::lbfgs()] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TrainConfig {
            optimizer: opt,
            epochs: Some(6),
            batch_size: 64,
            lr: 0.02,
            l2: 1e-3,
            holdout: 0.2,
            patience: Some(50),
            seed: 1,
            ..Default::default()
        };
        let whole = train(data, &cfg, |_| {}).unwrap();
        let ck = TrainConfig { checkpoint: resumable(&dir, 1), ..cfg.clone() };
        kill_after_checkpoint(data, &ck, 3);
        let latest = latest_checkpoint(dir.path()).unwrap();
        assert!(latest.to_string_lossy().ends_with("checkpoint-00000003.safetensors"), "{latest:?}");
        let (resumed, resumed_at) = train_resumed(data, &ck);
        assert_eq!(resumed_at, Some(3), "{opt:?}");
        assert_eq!(resumed.model, whole.model, "{opt:?}: resumed model differs");
        assert_eq!(resumed.step_objectives, whole.step_objectives, "{opt:?}");
        assert_eq!(resumed.history, whole.history, "{opt:?}");
        // Only the newest two checkpoints are kept.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        // A checkpoint from another configuration is refused, not silently mixed in.
        let other = TrainConfig { seed: 2, ..ck.clone() };
        let err = train(data, &other, |_| {}).unwrap_err().to_string();
        assert!(err.contains("different run (seed 1 there, 2 here"), "{err}");
        // So is one for other data of the same shape.
        let (x2, y2) = blobs(n, d, k, 9);
        let other_data = Data::new(MatRef::new(&x2, n, d).unwrap(), &y2).unwrap();
        let err = train(other_data, &ck, |_| {}).unwrap_err().to_string();
        assert!(err.contains("different run (other data (rows or labels))"), "{err}");
        // So is one in another precision.
        let other = TrainConfig { precision: softmax_layer::bf16::Precision::Bf16, ..ck.clone() };
        let err = train(data, &other, |_| {}).unwrap_err().to_string();
        assert!(err.contains("different run"), "{err}");
        // Fewer epochs than the checkpoint has done: refused. More: a mini-batch
        // optimizer's schedule spans all epochs, so that is another run; L-BFGS's epochs only
        // cap its iterations, so it goes on.
        let fewer = TrainConfig { epochs: Some(2), ..ck.clone() };
        let err = train(data, &fewer, |_| {}).unwrap_err().to_string();
        assert!(err.contains("different run") || err.contains("past the 2 epochs"), "{opt:?}: {err}");
        let more = TrainConfig { epochs: Some(8), ..ck.clone() };
        let resumed = train(data, &more, |_| {});
        if matches!(opt, Optimizer::Lbfgs { .. }) {
            assert!(resumed.unwrap().history.len() >= 6);
        } else {
            let err = resumed.unwrap_err().to_string();
            assert!(err.contains("different run") && err.contains("epochs 6 there, 8 here"), "{opt:?}: {err}");
        }
    }
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_one_before() {
    let (n, d, k) = (600, 5, 3);
    let (x, y) = blobs(n, d, k, 3);
    let data = Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        TrainConfig { optimizer: Optimizer::adamw(), epochs: Some(4), batch_size: 50, lr: 0.05, ..Default::default() };
    let whole = train(data, &cfg, |_| {}).unwrap();
    let ck = TrainConfig { checkpoint: resumable(&dir, 1), ..cfg.clone() };
    kill_after_checkpoint(data, &ck, 3);
    // The newest checkpoint (epoch 3) is damaged after the fact: truncated to half.
    let newest = latest_checkpoint(dir.path()).unwrap();
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let (mut skipped, mut resumed_at) = (vec![], None);
    let resumed = train(data, &ck, |e| match e {
        Event::SkippedCheckpoint { path, reason } => skipped.push((path.to_path_buf(), reason.to_string())),
        Event::Resumed { epoch, .. } => resumed_at = Some(epoch),
        _ => {}
    })
    .unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].0, newest);
    assert_eq!(resumed_at, Some(2), "resumed from the checkpoint before the damaged one");
    assert_eq!(resumed.model, whole.model, "the fallback still ends bit-identical");
    assert_eq!(resumed.step_objectives, whole.step_objectives);
    // When no checkpoint loads, the run is not silently started over.
    for p in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::write(p.unwrap().path(), b"not a checkpoint").unwrap();
    }
    let err = train(data, &ck, |_| {}).unwrap_err().to_string();
    assert!(err.contains("no checkpoint could be loaded") && err.contains("checkpoint-00000004"), "{err}");
}

#[test]
fn a_run_that_stopped_early_resumes_to_its_best_model() {
    let (n, d, k) = (2000, 6, 3);
    let (x, y) = blobs(n, d, k, 2);
    let data = Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap();
    let cfg = TrainConfig {
        optimizer: Optimizer::adamw(),
        epochs: Some(40),
        batch_size: 50,
        lr: 0.05,
        holdout: 0.25,
        patience: Some(2),
        seed: 9,
        ..Default::default()
    };
    let mut stopped_at = None;
    let whole = train(data, &cfg, |e| {
        if let Event::EarlyStop { epoch, .. } = e {
            stopped_at = Some(epoch)
        }
    })
    .unwrap();
    let stop = stopped_at.expect("early stopping happened");
    // Killed after the last checkpoint (the one written as the run stopped), before the
    // model was saved: the resume trains no further and returns the best epoch's model.
    let dir = tempfile::tempdir().unwrap();
    let ck = TrainConfig { checkpoint: resumable(&dir, 1), ..cfg.clone() };
    kill_after_checkpoint(data, &ck, stop);
    let resume = || {
        let mut steps = 0;
        let resumed = train(data, &ck, |e| steps += matches!(e, Event::Step { .. }) as usize).unwrap();
        assert_eq!(steps, 0, "a finished run trains no further");
        assert_eq!(resumed.model, whole.model);
        assert_eq!(resumed.history, whole.history);
        assert_eq!(resumed.heldout, whole.heldout);
    };
    resume();
    // A temporary file left by a kill is cleared by a resume that writes no checkpoint.
    let stale = dir.path().join(".softmax-layer-Zz9Yy8");
    std::fs::write(&stale, b"half a model").unwrap();
    resume();
    assert!(!stale.exists());
    // A checkpoint whose counters carry a fourth entry, a stop flag (as some commits wrote
    // them before the stop was derived from the state): it loads, and resumes as stopped.
    let newest = latest_checkpoint(dir.path()).unwrap();
    let bytes = std::fs::read(&newest).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let four: Vec<u8> = file.tensor("counters").unwrap().data().iter().copied().chain(1i64.to_le_bytes()).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = file
        .tensors()
        .into_iter()
        .map(|(name, t)| match name.as_str() {
            "counters" => (name, safetensors::tensor::TensorView::new(t.dtype(), vec![4], &four).unwrap()),
            _ => (name, t),
        })
        .collect();
    std::fs::write(&newest, safetensors::serialize(views, meta.metadata().clone()).unwrap()).unwrap();
    resume();
}

#[test]
fn checkpoints_every_few_epochs_keep_the_one_before_too() {
    let (n, d, k) = (300, 4, 3);
    let (x, y) = blobs(n, d, k, 5);
    let data = Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        optimizer: Optimizer::sgd(),
        epochs: Some(9),
        batch_size: 64,
        lr: 0.05,
        checkpoint: resumable(&dir, 3),
        ..Default::default()
    };
    // A temporary file left by a run killed while writing a checkpoint is cleared away.
    std::fs::write(dir.path().join(".softmax-layer-Ab12Cd"), b"half a checkpoint").unwrap();
    let whole = train(data, &cfg, |_| {}).unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["checkpoint-00000006.safetensors", "checkpoint-00000009.safetensors"]);
    // The newest damaged: the resume falls back on epoch 6 and ends on the same bits.
    std::fs::write(dir.path().join(&names[1]), b"damaged").unwrap();
    let (resumed, resumed_at) = train_resumed(data, &cfg);
    assert_eq!(resumed_at, Some(6));
    assert_eq!(resumed.model, whole.model);
}

#[test]
fn a_non_finite_value_in_a_checkpoint_or_model_names_the_file() {
    use softmax_layer::io::{OutTensor, read_safetensors, read_safetensors_metadata, write_safetensors_with_metadata};
    let (n, d, k) = (200, 4, 3);
    let (x, y) = blobs(n, d, k, 6);
    let data = Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        optimizer: Optimizer::adamw(),
        epochs: Some(2),
        batch_size: 50,
        lr: 0.05,
        checkpoint: resumable(&dir, 1),
        ..Default::default()
    };
    kill_after_checkpoint(data, &cfg, 2);
    // The newest checkpoint rewritten with a NaN in AdamW's first moment.
    let newest = latest_checkpoint(dir.path()).unwrap();
    let meta = read_safetensors_metadata(&newest).unwrap();
    let f32s = |name: &str| read_safetensors(&newest, name).unwrap().to_f32().unwrap().into_owned();
    let f64s = |name: &str| read_safetensors(&newest, name).unwrap().to_f64().unwrap();
    let (w, b, mut m, v) = (f32s("weight"), f32s("bias"), f32s("opt.m"), f32s("opt.v"));
    m[5] = f32::NAN;
    let counters = read_safetensors(&newest, "counters").unwrap().to_i64().unwrap();
    let (hist, objs) = (f64s("history"), f64s("step_objectives"));
    let tensors = [
        ("weight", vec![k, d], OutTensor::F32(&w)),
        ("bias", vec![k], OutTensor::F32(&b)),
        ("counters", vec![counters.len()], OutTensor::I64(&counters)),
        ("history", vec![hist.len() / 5, 5], OutTensor::F64(&hist)),
        ("step_objectives", vec![objs.len()], OutTensor::F64(&objs)),
        ("opt.m", vec![m.len()], OutTensor::F32(&m)),
        ("opt.v", vec![v.len()], OutTensor::F32(&v)),
    ];
    write_safetensors_with_metadata(&newest, &tensors, Some(meta)).unwrap();
    let mut skipped = vec![];
    train(data, &cfg, |e| {
        if let Event::SkippedCheckpoint { reason, .. } = e {
            skipped.push(reason.to_string())
        }
    })
    .unwrap();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].contains("checkpoint-00000002") && skipped[0].contains("'opt.m'"), "{skipped:?}");
    // A model file with a NaN: the error names the file.
    let model = dir.path().join("model.safetensors");
    let mut w = w.clone();
    w[1] = f32::NAN;
    softmax_layer::io::write_safetensors(&model, &[("weight", vec![k, d], OutTensor::F32(&w))]).unwrap();
    let err = Model::load(&model).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("weight[0, 1] is NaN"), "{err}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let x = vec![0f32; 6];
    let fx = MatRef::new(&x, 3, 2).unwrap();
    let e = Data::new(fx, &[0, 1]).unwrap_err().to_string();
    assert!(e.contains("labels have length 2") && e.contains("3 rows"), "{e}");
    let e = Data::new(fx, &[0, -1, 1]).unwrap_err().to_string();
    assert!(e.contains("labels[1] = -1"), "{e}");
    let data = Data::new(fx, &[0, 1, 1]).unwrap();
    let e = train(data, &TrainConfig { classes: Some(1), ..Default::default() }, |_| {}).unwrap_err().to_string();
    assert!(e.contains("labels[1] = 1") && e.contains("1 classes"), "{e}");
    let e = train(data, &TrainConfig { lr: -1.0, ..Default::default() }, |_| {}).unwrap_err().to_string();
    assert!(e.contains("learning rate"), "{e}");
    let e = train(data, &TrainConfig { patience: Some(3), ..Default::default() }, |_| {}).unwrap_err().to_string();
    assert!(e.contains("held-out"), "{e}");
    // A held-out fraction that rounds to no row (0.1 of 3) is not a held-out split.
    let cfg = TrainConfig { holdout: 0.1, patience: Some(1), ..Default::default() };
    let e = train(data, &cfg, |_| {}).unwrap_err().to_string();
    assert!(e.contains("holds out no row"), "{e}");
    let mut bad = x.clone();
    bad[3] = f32::NAN;
    let e = Data::new(MatRef::new(&bad, 3, 2).unwrap(), &[0, 1, 1]).unwrap_err().to_string();
    assert!(e.contains("features[1, 1]"), "{e}");
}

#[test]
fn learning_rate_warms_up_then_follows_a_cosine() {
    let (n, d, k) = (100, 3, 2);
    let (x, y) = blobs(n, d, k, 1);
    let data = Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap();
    let cfg = TrainConfig {
        optimizer: Optimizer::sgd(),
        epochs: Some(10),
        batch_size: 10,
        lr: 0.5,
        warmup: 0.1,
        min_lr_ratio: 0.2,
        ..Default::default()
    };
    let mut lrs = vec![];
    train(data, &cfg, |e| {
        if let Event::Step { lr, .. } = e {
            lrs.push(lr as f64)
        }
    })
    .unwrap();
    assert_eq!(lrs.len(), 100);
    for (s, &lr) in lrs.iter().enumerate() {
        let want = if s < 10 {
            0.5 * (s + 1) as f64 / 10.0
        } else {
            let t = (s - 10) as f64 / 90.0;
            0.5 * (0.2 + 0.8 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
        };
        assert!((lr - want).abs() < 1e-6, "step {s}: lr {lr} vs {want}");
    }
}

#[test]
fn an_explicit_heldout_set_is_evaluated_every_epoch() {
    let (n, d, k) = (1200, 5, 3);
    let (x, y) = blobs(n, d, k, 13);
    let train_part = Data::new(MatRef::new(&x[..1000 * d], 1000, d).unwrap(), &y[..1000]).unwrap();
    let held = Data::new(MatRef::new(&x[1000 * d..], 200, d).unwrap(), &y[1000..]).unwrap();
    let cfg = TrainConfig {
        optimizer: Optimizer::adamw(),
        epochs: Some(4),
        batch_size: 100,
        lr: 0.05,
        patience: Some(10),
        ..Default::default()
    };
    let out = softmax_layer::train::train_with_heldout(train_part, held, &cfg, |_| {}).unwrap();
    assert_eq!(out.history.len(), 4);
    // The reported held-out metrics are those of the returned model on exactly that set.
    let m = evaluate(&out.model, held).unwrap();
    assert_eq!(out.heldout.unwrap(), m);
    assert_eq!(out.history[3].heldout.unwrap(), m);
    let both = TrainConfig { holdout: 0.1, ..cfg.clone() };
    let e = softmax_layer::train::train_with_heldout(train_part, held, &both, |_| {}).unwrap_err().to_string();
    assert!(e.contains("not both"), "{e}");
    let wrong = Data::new(MatRef::new(&x[..200 * 5], 250, 4).unwrap(), &y[..250]).unwrap();
    let e = softmax_layer::train::train_with_heldout(train_part, wrong, &cfg, |_| {}).unwrap_err().to_string();
    assert!(e.contains("4 columns"), "{e}");
}

#[test]
fn clipping_bounds_the_step() {
    // One SGD step without momentum from zero, lr 1, clipped to a global norm of 1e-3: the
    // parameters move by exactly the clipped gradient, norm 1e-3.
    let (n, d, k) = (200, 4, 3);
    let (x, y) = blobs(n, d, k, 3);
    let data = Data::new(MatRef::new(&x, n, d).unwrap(), &y).unwrap();
    let cfg = TrainConfig {
        optimizer: Optimizer::Sgd { momentum: 0.0 },
        epochs: Some(1),
        batch_size: n,
        lr: 1.0,
        warmup: 0.0,
        clip_norm: Some(1e-3),
        ..Default::default()
    };
    let out = train(data, &cfg, |_| {}).unwrap();
    let norm = out.model.weight.iter().chain(&out.model.bias).map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    assert!((norm - 1e-3).abs() < 1e-8, "step norm {norm}");
    // Unclipped, the same step is far larger.
    let free = train(data, &TrainConfig { clip_norm: None, ..cfg }, |_| {}).unwrap();
    let norm_free = free.model.weight.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    assert!(norm_free > 0.1, "unclipped step norm {norm_free}");
}
