//! Plackett–Luce ranking probabilities against brute force, finite differences and
//! sampling frequencies.

use softmax_layer::rank::{log_prob, log_prob_with_grad, sample_gumbel_top_k};

/// Naive log P: the product of softmaxes over the remaining items, in f64.
fn naive(scores: &[f32], ranking: &[usize]) -> f64 {
    let mut remaining: Vec<usize> = (0..scores.len()).collect();
    let mut lp = 0f64;
    for &r in ranking {
        let z: f64 = remaining.iter().map(|&j| (scores[j] as f64).exp()).sum();
        lp += (scores[r] as f64).exp().ln() - z.ln();
        remaining.retain(|&j| j != r);
    }
    lp
}

fn permutations(m: usize) -> Vec<Vec<usize>> {
    if m == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(m - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, m - 1);
            out.push(q);
        }
    }
    out
}

#[test]
fn full_rankings_sum_to_one_and_match_brute_force() {
    let s = [0.3f32, -1.2, 2.0, 0.7, -0.1];
    let mut total = 0f64;
    for p in permutations(5) {
        let lp = log_prob(&s, &p).unwrap();
        assert!((lp - naive(&s, &p)).abs() < 1e-12, "{p:?}");
        total += lp.exp();
    }
    assert!((total - 1.0).abs() < 1e-12, "{total}");
}

#[test]
fn top_k_is_the_marginal_over_the_rest() {
    let s = [0.3f32, -1.2, 2.0, 0.7, -0.1];
    for top in [[2usize, 3], [0, 4], [1, 2]] {
        let marginal: f64 = permutations(5).into_iter().filter(|p| p[..2] == top).map(|p| naive(&s, &p).exp()).sum();
        assert!((log_prob(&s, &top).unwrap() - marginal.ln()).abs() < 1e-12, "{top:?}");
    }
}

#[test]
fn large_score_gaps_stay_finite_and_exact() {
    let s = [0.0f32, 1000.0, -1000.0, 500.0];
    // In score order every step is all but certain: log P = -(e^-500 + ...) ~ 0.
    assert!(log_prob(&s, &[1, 3, 0, 2]).unwrap().abs() < 1e-200);
    // Reversed, each lse ~ 1000: (-1000 - 1000) + (0 - 1000) + (500 - 1000) + 0.
    let lp = log_prob(&s, &[2, 0, 3, 1]).unwrap();
    assert!((lp - (-2000.0 - 1000.0 - 500.0)).abs() < 1e-9, "{lp}");
    // A top-1 of a dominated item, and the gradient stays finite.
    let (lp, g) = log_prob_with_grad(&s, &[3]).unwrap();
    assert!((lp + 500.0).abs() < 1e-9 && g.iter().all(|x| x.is_finite()));
    assert!((g[1] + 1.0).abs() < 1e-12 && (g[3] - 1.0).abs() < 1e-12, "{g:?}");
}

#[test]
fn an_offset_shared_by_all_scores_changes_nothing() {
    // Equal scores at 0 and at offsets up to 1e30 (where lse itself rounds away everything
    // below 1e14): the same probabilities, gradients and sampling frequencies.
    let base = [0.0f32; 4];
    for c in [1e8f32, 1e15, 1e20, 1e30, -1e30] {
        let s = [c; 4];
        for ranking in [vec![0usize, 1, 2, 3], vec![2, 0], vec![3]] {
            let (lp0, g0) = log_prob_with_grad(&base, &ranking).unwrap();
            let (lp, g) = log_prob_with_grad(&s, &ranking).unwrap();
            assert!((lp - lp0).abs() < 1e-12 && (log_prob(&s, &ranking).unwrap() - lp0).abs() < 1e-12, "{c:e}: {lp}");
            for j in 0..4 {
                assert!((g[j] - g0[j]).abs() < 1e-12, "{c:e} {ranking:?}: grad[{j}] {} vs {}", g[j], g0[j]);
            }
        }
        let firsts = (0..4000).filter(|&seed| sample_gumbel_top_k(&s, 1, seed).unwrap()[0] == 1).count();
        assert!((850..=1150).contains(&firsts), "{c:e}: item 1 first in {firsts} of 4000");
    }
    // A dominant item far above equal others: the others' order is a fair coin.
    let s = [1e30f32, 0.0, 0.0];
    assert!((log_prob(&s, &[0, 1, 2]).unwrap() + 2f64.ln()).abs() < 1e-12);
    let (_, g) = log_prob_with_grad(&s, &[0, 1, 2]).unwrap();
    assert!(g[0].abs() < 1e-12 && (g[1] - 0.5).abs() < 1e-12 && (g[2] + 0.5).abs() < 1e-12, "{g:?}");
}

#[test]
fn gradient_matches_finite_differences() {
    let s = [0.3f32, -1.2, 2.0, 0.7, -0.1, 1.1];
    for ranking in [vec![2usize, 5, 3, 0, 4, 1], vec![1, 4], vec![5]] {
        let (_, g) = log_prob_with_grad(&s, &ranking).unwrap();
        for j in 0..s.len() {
            let h = 1e-2f32;
            let (mut a, mut b) = (s, s);
            a[j] += h;
            b[j] -= h;
            let fd = (log_prob(&a, &ranking).unwrap() - log_prob(&b, &ranking).unwrap()) / (2.0 * h as f64);
            assert!((fd - g[j]).abs() < 1e-4, "{ranking:?} j={j}: fd {fd} vs {}", g[j]);
        }
        // The scores are shift-invariant, so the gradient sums to 0.
        assert!(g.iter().sum::<f64>().abs() < 1e-12);
    }
}

#[test]
fn bad_rankings_are_errors() {
    let s = [0.0f32, 1.0, 2.0];
    assert!(log_prob(&s, &[0, 0]).unwrap_err().to_string().contains("repeats"));
    assert!(log_prob(&s, &[3]).unwrap_err().to_string().contains("ranking[0] = 3 is not an item"));
    assert!(log_prob(&s, &[]).unwrap_err().to_string().contains("empty"));
    assert!(log_prob(&[0.0, f32::NAN], &[0]).is_err());
    assert!(sample_gumbel_top_k(&s, 0, 1).is_err() && sample_gumbel_top_k(&s, 4, 1).is_err());
}

#[test]
fn gumbel_top_k_samples_follow_plackett_luce() {
    let s = [0.5f32, -0.5, 1.5, 0.0];
    let draws = 40_000;
    let mut counts = std::collections::HashMap::new();
    for seed in 0..draws {
        let r = sample_gumbel_top_k(&s, 2, seed).unwrap();
        assert_eq!(r, sample_gumbel_top_k(&s, 2, seed).unwrap(), "same seed, same ranking");
        *counts.entry((r[0], r[1])).or_insert(0u64) += 1;
    }
    // Chi-square over the 12 ordered pairs (11 degrees of freedom; 99.9% quantile 31.3).
    let mut chi2 = 0f64;
    for a in 0..4 {
        for b in 0..4 {
            if a == b {
                continue;
            }
            let expect = draws as f64 * log_prob(&s, &[a, b]).unwrap().exp();
            let got = *counts.get(&(a, b)).unwrap_or(&0) as f64;
            chi2 += (got - expect).powi(2) / expect;
        }
    }
    assert!(chi2 < 31.3, "chi-square {chi2}");
}

use softmax_layer::rank::{FitOptions, fit};

/// Σ over rankings of ∂ log P / ∂θ, each ranking over the items it lists.
fn likelihood_gradient(theta: &[f64], rankings: &[Vec<usize>]) -> Vec<f64> {
    let mut g = vec![0f64; theta.len()];
    for r in rankings {
        let scores: Vec<f32> = r.iter().map(|&j| theta[j] as f32).collect();
        let local: Vec<usize> = (0..r.len()).collect();
        let (_, gl) = log_prob_with_grad(&scores, &local).unwrap();
        for (q, &j) in r.iter().enumerate() {
            g[j] += gl[q];
        }
    }
    g
}

fn synthetic(true_theta: &[f32], count: u64) -> Vec<Vec<usize>> {
    let m = true_theta.len();
    (0..count)
        .map(|seed| {
            // A random subset of 3..=m participants, ranked by Plackett–Luce.
            let size = 3 + (seed as usize * 7919) % (m - 2);
            let start = (seed as usize * 104_729) % m;
            let items: Vec<usize> = (0..size).map(|q| (start + q) % m).collect();
            let scores: Vec<f32> = items.iter().map(|&j| true_theta[j]).collect();
            sample_gumbel_top_k(&scores, size, seed).unwrap().into_iter().map(|q| items[q]).collect()
        })
        .collect()
}

#[test]
fn maximum_likelihood_recovers_strengths_and_is_stationary() {
    let truth = [1.0f32, 0.5, 0.0, -0.5, -1.0, 0.25];
    let rankings = synthetic(&truth, 4000);
    let f = fit(&rankings, &FitOptions::default()).unwrap();
    let mean = truth.iter().sum::<f32>() / truth.len() as f32;
    for (j, (&t, &e)) in truth.iter().zip(&f.log_strengths).enumerate() {
        assert!((e - (t - mean) as f64).abs() < 0.1, "item {j}: fitted {e}, true {}", t - mean);
    }
    assert!(f.log_strengths.iter().sum::<f64>().abs() < 1e-9, "centred");
    // At the optimum the gradient of the log-likelihood vanishes (f32 scores: 1e-3).
    let g = likelihood_gradient(&f.log_strengths, &rankings);
    assert!(g.iter().all(|x| x.abs() < 1e-3 * rankings.len() as f64 / 100.0), "{g:?}");
}

#[test]
fn l2_prior_makes_disconnected_data_converge() {
    // Items {0, 1} and {2, 3} are never compared with each other; item 3 never wins.
    let rankings = vec![vec![0, 1], vec![1, 0], vec![0, 1], vec![2, 3], vec![2, 3]];
    assert!(fit(&rankings, &FitOptions::default()).unwrap_err().to_string().contains("item 3 is never ranked above"));
    let alpha = 0.5;
    let f = fit(&rankings, &FitOptions { l2: alpha, ..Default::default() }).unwrap();
    // Stationary for the penalized objective: ∇ log-likelihood − α θ = 0.
    let g = likelihood_gradient(&f.log_strengths, &rankings);
    for (j, (gj, t)) in g.iter().zip(&f.log_strengths).enumerate() {
        assert!((gj - alpha * t).abs() < 1e-5, "item {j}: {gj} vs {}", alpha * t);
    }
    assert!(f.log_strengths[0] > f.log_strengths[1] && f.log_strengths[2] > f.log_strengths[3]);
}

/// A small prior, where minorize–maximize crawled for 100000 iterations: an item that
/// always wins sits far out (near log(wins/α)), and the fit is still stationary and, for two
/// items, symmetric as the closed form says.
#[test]
fn a_small_prior_still_converges() {
    let mut rankings = Vec::new();
    for i in 0..60usize {
        rankings.push(vec![0, 1 + i % 7, 1 + (i * 3 + 1) % 7, 1 + (i * 5 + 4) % 7]);
    }
    rankings.retain(|r| r[1] != r[2] && r[1] != r[3] && r[2] != r[3]);
    let alpha = 1e-3;
    let f = fit(&rankings, &FitOptions { l2: alpha, ..Default::default() }).unwrap();
    let g = likelihood_gradient(&f.log_strengths, &rankings);
    for (j, (gj, t)) in g.iter().zip(&f.log_strengths).enumerate() {
        assert!((gj - alpha * t).abs() < 1e-6, "item {j}: {gj} vs {}", alpha * t);
    }
    assert!(f.log_strengths[0] > 5.0, "{:?}", f.log_strengths);
    // Two items, 0 above 1 twice: θ = (t, −t) with 2·σ(−2t) = α·t.
    let f = fit(&[vec![0, 1], vec![0, 1]], &FitOptions { l2: 1e-6, ..Default::default() }).unwrap();
    let (a, b) = (f.log_strengths[0], f.log_strengths[1]);
    assert!((a + b).abs() < 1e-6, "{a}, {b}");
    assert!((2.0 / (1.0 + (2.0 * a).exp()) - 1e-6 * a).abs() < 1e-9, "t = {a}");
}

#[test]
fn fit_errors() {
    assert!(fit(&[], &FitOptions::default()).unwrap_err().to_string().contains("no rankings"));
    assert!(fit(&[vec![0, 1, 0]], &FitOptions::default()).unwrap_err().to_string().contains("repeats"));
    assert!(
        fit(&[vec![0, 2], vec![2, 0]], &FitOptions::default())
            .unwrap_err()
            .to_string()
            .contains("item 1 appears in no ranking")
    );
    assert!(fit(&[vec![0, 1]], &FitOptions { l2: -1.0, ..Default::default() }).is_err());
    let nan = FitOptions { l2: 0.1, tolerance: f64::NAN, ..Default::default() };
    assert!(fit(&[vec![0, 1]], &nan).unwrap_err().to_string().contains("tolerance"));
    // Every item wins once, but {0, 1} and {2, 3} are never compared (Hunter's condition).
    let groups = [vec![0, 1], vec![1, 0], vec![0, 1], vec![2, 3], vec![3, 2]];
    let e = fit(&groups, &FitOptions::default()).unwrap_err().to_string();
    assert!(e.contains("not connected") && e.contains("item 2"), "{e}");
    // Connected through one more comparison: a fit.
    let linked = [vec![0, 1], vec![1, 0], vec![0, 1], vec![2, 3], vec![3, 2], vec![1, 2], vec![3, 0]];
    assert!(fit(&linked, &FitOptions::default()).is_ok());
}

#[test]
fn list_mle_gradients_match_finite_differences() {
    use softmax_layer::rank::list_mle;
    use softmax_layer::{MatRef, SoftmaxLayer, WeightLayout};
    let (n, d, v) = (2, 3, 6);
    let h: Vec<f32> = (0..n * d).map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0).collect();
    let w: Vec<f32> = (0..v * d).map(|i| ((i * 53 % 13) as f32 - 6.0) / 6.0).collect();
    let b: Vec<f32> = (0..v).map(|i| (i as f32 - 2.5) / 4.0).collect();
    let rankings = vec![vec![3, 0, 5], vec![1, 2, 0, 4, 5, 3]];
    let loss = |h: &[f32], w: &[f32], b: &[f32]| {
        let layer = SoftmaxLayer::new(w, WeightLayout::VocabMajor, v, d, Some(b)).unwrap();
        list_mle(&layer, MatRef::new(h, n, d).unwrap(), &rankings).unwrap().0
    };
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, Some(&b[..])).unwrap();
    let (l0, g) = list_mle(&layer, MatRef::new(&h, n, d).unwrap(), &rankings).unwrap();
    // The loss is the sum of the rankings' negative log-probabilities.
    let mut logits = vec![0f32; n * v];
    layer.logits(MatRef::new(&h, n, d).unwrap(), softmax_layer::MatMut::new(&mut logits, n, v).unwrap()).unwrap();
    let want = -(log_prob(&logits[..v], &rankings[0]).unwrap() + log_prob(&logits[v..], &rankings[1]).unwrap());
    assert!((l0 - want).abs() < 1e-9);
    let e = 1e-2f32;
    let fd = |f: &dyn Fn(f32) -> f64| (f(e) - f(-e)) / (2.0 * e as f64);
    for i in 0..h.len() {
        let num = fd(&|t| {
            let mut x = h.clone();
            x[i] += t;
            loss(&x, &w, &b)
        });
        assert!((num - g.hidden[i] as f64).abs() < 2e-3, "dH[{i}]: {num} vs {}", g.hidden[i]);
    }
    for i in 0..w.len() {
        let num = fd(&|t| {
            let mut x = w.clone();
            x[i] += t;
            loss(&h, &x, &b)
        });
        assert!((num - g.weight[i] as f64).abs() < 2e-3, "dW[{i}]: {num} vs {}", g.weight[i]);
    }
    for i in 0..v {
        let num = fd(&|t| {
            let mut x = b.clone();
            x[i] += t;
            loss(&h, &w, &x)
        });
        assert!((num - g.bias.as_ref().unwrap()[i] as f64).abs() < 2e-3, "db[{i}]");
    }
}
