//! The sampler chain: exact truncation boundaries, greedy, penalties, and empirical
//! frequencies against the processed distribution (chi-square at fixed seeds).

use softmax_layer::sample::{SamplerConfig, Stage, sample_row};

fn logits_of(p: &[f64]) -> Vec<f32> {
    p.iter().map(|x| x.ln() as f32).collect()
}

fn kept(logits: &[f32], cfg: &SamplerConfig) -> Vec<usize> {
    let mut s: Vec<usize> = (0..400)
        .flat_map(|seed| {
            let c = SamplerConfig { seed, ..cfg.clone() };
            sample_row(logits, &[], &c, 1).unwrap().into_iter().map(|d| d.token)
        })
        .collect();
    s.sort_unstable();
    s.dedup();
    s
}

#[test]
fn top_p_and_min_p_boundaries_are_exact() {
    let z = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    let cfg = |top_p: Option<f32>, min_p: Option<f32>| SamplerConfig { top_p, min_p, ..Default::default() };
    assert_eq!(kept(&z, &cfg(Some(0.45), None)), vec![0]);
    assert_eq!(kept(&z, &cfg(Some(0.75), None)), vec![0, 1], "the token that crosses p is kept");
    assert_eq!(kept(&z, &cfg(Some(0.81), None)), vec![0, 1, 2]);
    assert_eq!(kept(&z, &cfg(Some(1.0), None)), vec![0, 1, 2, 3]);
    assert_eq!(kept(&z, &cfg(None, Some(0.29))), vec![0, 1, 2], "0.15 >= 0.29 * 0.5");
    assert_eq!(kept(&z, &cfg(None, Some(0.31))), vec![0, 1], "0.15 < 0.31 * 0.5");
    // The processed log-probability renormalizes over the kept set.
    let d = sample_row(&z, &[], &cfg(Some(0.75), None), 1).unwrap()[0].clone();
    let want = if d.token == 0 { (0.5f64 / 0.8).ln() } else { (0.3f64 / 0.8).ln() };
    assert!((d.logprob as f64 - want).abs() < 1e-6);
    assert!((d.logprob_raw as f64 - [0.5f64, 0.3][d.token].ln()).abs() < 1e-6);
    // Shift-invariant: two equal logits far from 0 (1e20, 1e9) and a third far below them
    // give the raw log-probabilities of [1/2, 1/2, ~0], not 0 (z − lse rounded to z's ulp).
    for (shift, gap) in [(1e20f32, 1e15f32), (1e9, 128.0)] {
        let far = [shift, shift, shift - gap];
        for d in sample_row(&far, &[], &SamplerConfig::default(), 20).unwrap() {
            let want = [0.5f64.ln(), 0.5f64.ln(), -(gap as f64) - 2f64.ln()][d.token];
            assert!((d.logprob_raw as f64 - want).abs() < 1e-6, "shift {shift:e}: {} vs {want}", d.logprob_raw);
        }
    }
}

#[test]
fn temperature_zero_is_greedy_with_ties_to_the_lowest_id() {
    let z = [1.0f32, 3.0, 0.5, 3.0, -2.0];
    let g = sample_row(&z, &[], &SamplerConfig { temperature: 0.0, ..Default::default() }, 5).unwrap();
    assert!(g.iter().all(|d| d.token == 1 && d.logprob == 0.0));
    // A vanishing temperature gives the argmax too (here without a tie).
    let z = [1.0f32, 3.0, 0.5, 2.9, -2.0];
    for seed in 0..50 {
        let d = sample_row(&z, &[], &SamplerConfig { temperature: 1e-3, seed, ..Default::default() }, 1).unwrap();
        assert_eq!(d[0].token, 1);
    }
    // Temperatures so small that z / T would overflow f32 (even 1/T for the last): still
    // the argmax, with all the mass.
    let z = [10.0f32, 300.0, 0.5, 299.9, -2.0];
    for t in [1e-30f32, 1e-38, 1e-40, f32::from_bits(1)] {
        let d = sample_row(&z, &[], &SamplerConfig { temperature: t, ..Default::default() }, 3).unwrap();
        assert!(d.iter().all(|d| d.token == 1 && d.logprob == 0.0), "T = {t:e}: {d:?}");
    }
}

#[test]
fn penalties_and_biases() {
    let z = [2.0f32, -1.0, 0.5, 1.0];
    // Repetition penalty 2 on tokens 0 (positive: 2 -> 1) and 1 (negative: -1 -> -2),
    // frequency 0.25 per occurrence and presence 0.5: token 0 seen twice -> 1 - 0.5 - 0.5 = 0.
    let cfg = SamplerConfig {
        repetition_penalty: 2.0,
        frequency_penalty: 0.25,
        presence_penalty: 0.5,
        temperature: 0.0,
        ..Default::default()
    };
    let d = sample_row(&z, &[0, 1, 0], &cfg, 1).unwrap();
    assert_eq!(d[0].token, 3, "after penalties the logits are [0, -2.75, 0.5, 1]");
    let cfg = SamplerConfig { temperature: 0.0, banned: vec![0, 3], ..Default::default() };
    assert_eq!(sample_row(&z, &[], &cfg, 1).unwrap()[0].token, 2);
    let cfg = SamplerConfig { temperature: 0.0, allowed: Some(vec![1]), ..Default::default() };
    assert_eq!(sample_row(&z, &[], &cfg, 1).unwrap()[0].token, 1);
    let cfg = SamplerConfig { temperature: 0.0, logit_bias: vec![(1, 10.0)], ..Default::default() };
    assert_eq!(sample_row(&z, &[], &cfg, 1).unwrap()[0].token, 1);
    // The penalty window only looks at the last tokens.
    let cfg =
        SamplerConfig { repetition_penalty: 100.0, penalty_window: Some(1), temperature: 0.0, ..Default::default() };
    assert_eq!(sample_row(&z, &[3, 1], &cfg, 1).unwrap()[0].token, 0);
}

#[test]
fn frequencies_match_the_processed_distribution() {
    let z: Vec<f32> = (0..10).map(|i| ((i * 37) % 10) as f32 * 0.3).collect();
    let t = 0.8f64;
    let cfg = SamplerConfig { temperature: t as f32, top_k: Some(6), seed: 12345, ..Default::default() };
    let draws = 30_000;
    let d = sample_row(&z, &[], &cfg, draws).unwrap();
    // Independent reference: the 6 largest logits, softmax at T.
    let mut order: Vec<usize> = (0..10).collect();
    order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
    let top = &order[..6];
    let w: Vec<f64> = top.iter().map(|&j| (z[j] as f64 / t).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut counts = [0usize; 10];
    d.iter().for_each(|x| counts[x.token] += 1);
    let mut chi2 = 0.0;
    for (q, &j) in top.iter().enumerate() {
        let e = draws as f64 * w[q] / total;
        chi2 += (counts[j] as f64 - e).powi(2) / e;
    }
    assert_eq!(
        counts.iter().sum::<usize>(),
        counts.iter().enumerate().filter(|(j, _)| top.contains(j)).map(|(_, c)| c).sum::<usize>()
    );
    assert!(chi2 < 20.5, "chi-square {chi2} (5 degrees of freedom, 99.9% quantile 20.5)");
    // Same seed, same draws.
    assert_eq!(d, sample_row(&z, &[], &cfg, draws).unwrap());
}

#[test]
fn llama_cpp_order_applies_temperature_last() {
    let z = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    // With T = 10 first the distribution flattens and top-p 0.45 keeps more tokens than
    // with T applied after the truncation.
    let hf = SamplerConfig { temperature: 10.0, top_p: Some(0.45), ..Default::default() };
    let llama = SamplerConfig {
        order: vec![Stage::TopK, Stage::TopP, Stage::MinP, Stage::TypicalP, Stage::Temperature],
        ..hf.clone()
    };
    assert_eq!(kept(&z, &llama), vec![0]);
    assert_eq!(kept(&z, &hf), vec![0, 1]);
}

#[test]
fn bad_settings_are_errors() {
    let z = [0.0f32, 1.0];
    let e = |c: SamplerConfig| sample_row(&z, &[], &c, 1).unwrap_err().to_string();
    assert!(e(SamplerConfig { top_p: Some(0.0), ..Default::default() }).contains("top_p must be in (0, 1]"));
    assert!(e(SamplerConfig { top_p: Some(1.5), ..Default::default() }).contains("top_p"));
    assert!(e(SamplerConfig { min_p: Some(-0.1), ..Default::default() }).contains("min_p"));
    assert!(e(SamplerConfig { top_k: Some(0), ..Default::default() }).contains("top_k must be >= 1"));
    assert!(e(SamplerConfig { temperature: -1.0, ..Default::default() }).contains("temperature"));
    assert!(e(SamplerConfig { banned: vec![0, 1], ..Default::default() }).contains("every token"));
    assert!(e(SamplerConfig { banned: vec![5], ..Default::default() }).contains("token id 5 is out of range"));
    assert!(
        e(SamplerConfig { logit_bias: vec![(1, f32::NAN)], ..Default::default() })
            .contains("logit bias of token 1 must be finite")
    );
    assert!(sample_row(&z, &[7], &SamplerConfig::default(), 1).unwrap_err().to_string().contains("history token 7"));
}

#[test]
fn large_vocabulary_top_p_and_top_k_match_a_full_sort() {
    let v = 20_000;
    let z: Vec<f32> = (0..v).map(|i| (((i * 7919) % 10007) as f32 / 10007.0 - 0.5) * 12.0).collect();
    let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let p: Vec<f64> = z.iter().map(|&x| (x as f64 - m).exp()).collect();
    let total: f64 = p.iter().sum();
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
    for (top_k, top_p) in [(None, 0.9f32), (None, 0.3), (Some(500), 0.99), (Some(50), 0.5), (None, 0.999)] {
        // Naive: sort, cut at k, then the shortest prefix with mass >= p of the kept mass.
        let pool = &order[..top_k.unwrap_or(v)];
        let pool_mass: f64 = pool.iter().map(|&j| p[j]).sum();
        let mut acc = 0.0;
        let mut n = pool.len();
        for (q, &j) in pool.iter().enumerate() {
            acc += p[j];
            if acc >= top_p as f64 * pool_mass {
                n = q + 1;
                break;
            }
        }
        let want: std::collections::HashSet<usize> = pool[..n].iter().copied().collect();
        let kept_mass: f64 = pool[..n].iter().map(|&j| p[j]).sum::<f64>() / total;
        for seed in 0..50 {
            let cfg = SamplerConfig { top_k, top_p: Some(top_p), seed, ..Default::default() };
            let d = sample_row(&z, &[], &cfg, 1).unwrap()[0].clone();
            assert!(want.contains(&d.token), "top_k {top_k:?} top_p {top_p}: token {} outside the naive set", d.token);
            // The processed log-probability is p_j / (kept mass).
            let implied = (p[d.token] / total) / (d.logprob as f64).exp();
            assert!((implied - kept_mass).abs() <= 1e-4 * kept_mass, "kept mass {implied} vs {kept_mass}");
        }
    }
}

#[test]
fn alternatives_and_many_rows() {
    use softmax_layer::MatRef;
    use softmax_layer::sample::sample_rows;
    let z = logits_of(&[0.1, 0.4, 0.2, 0.3]);
    let cfg = SamplerConfig { alternatives: 3, seed: 5, ..Default::default() };
    let d = sample_row(&z, &[], &cfg, 1).unwrap()[0].clone();
    let alts: Vec<usize> = d.alternatives.iter().map(|a| a.0).collect();
    assert_eq!(alts, vec![1, 3, 2]);
    assert!((d.alternatives[0].1 as f64 - 0.4f64.ln()).abs() < 1e-6);
    // With top-p the alternatives come from the processed (renormalized) distribution.
    let cfg = SamplerConfig { alternatives: 5, top_p: Some(0.6), ..Default::default() };
    let d = sample_row(&z, &[], &cfg, 1).unwrap()[0].clone();
    assert_eq!(d.alternatives.iter().map(|a| a.0).collect::<Vec<_>>(), vec![1, 3]);
    assert!((d.alternatives[0].1 as f64 - (0.4f64 / 0.7).ln()).abs() < 1e-6);
    // Many rows, each with its own settings: the same draws as one row at a time, for any
    // number of threads.
    let rows: Vec<f32> = (0..6).flat_map(|r| (0..50).map(move |j| ((r * 31 + j * 17) % 23) as f32 * 0.2)).collect();
    let m = MatRef::new(&rows, 6, 50).unwrap();
    let cfgs: Vec<SamplerConfig> =
        (0..6).map(|r| SamplerConfig { seed: r, top_k: Some(10 + r as usize), ..Default::default() }).collect();
    let hist: Vec<&[usize]> = vec![&[]; 6];
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| sample_rows(m, &hist, &cfgs, 4).unwrap());
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
        .install(|| sample_rows(m, &hist, &cfgs, 4).unwrap());
    assert_eq!(one, two);
    for r in 0..6 {
        assert_eq!(one[r], sample_row(m.row(r), &[], &cfgs[r], 4).unwrap());
    }
}

#[test]
fn a_huge_temperature_over_a_gap_beyond_f32_counts_the_gap() {
    // (3e38 − (−3e38)) / 3e38 = 2: probabilities [0.881, 0.119], although the gap itself
    // exceeds f32::MAX. Token 1 is drawn about 119 times in 1000.
    let z = [3e38f32, -3e38];
    let cfg = SamplerConfig { temperature: 3e38, ..Default::default() };
    let ones = (0..1000)
        .filter(|&seed| sample_row(&z, &[], &SamplerConfig { seed, ..cfg.clone() }, 1).unwrap()[0].token == 1)
        .count();
    assert!((80..=160).contains(&ones), "token 1 drawn {ones} times in 1000");
    let d = sample_row(&z, &[], &SamplerConfig { seed: 1, ..cfg }, 1).unwrap()[0].clone();
    let want = [-(1.0 + (-2f64).exp()).ln(), -2.0 - (1.0 + (-2f64).exp()).ln()][d.token];
    assert!((d.logprob as f64 - want).abs() < 1e-6, "{} vs {want}", d.logprob);
}

#[test]
fn a_gap_beyond_f32_over_a_temperature_above_one_keeps_its_log_probability() {
    // (3e38 − (−1e38)) / 1e36 = 400: token 1's log-probability is −400 − ln 2 (not −inf),
    // although the gap overflows f32. At T = 1 it is below −3e38, so −inf in f32.
    let z = [3e38f32, -1e38, 3e38];
    let cfg = SamplerConfig { temperature: 1e36, alternatives: 3, ..Default::default() };
    let d = sample_row(&z, &[], &cfg, 1).unwrap()[0].clone();
    let want = [-(2f64.ln()), -400.0 - 2f64.ln(), -(2f64.ln())];
    assert_eq!(d.alternatives.len(), 3);
    for (j, lp) in d.alternatives {
        assert!((lp as f64 - want[j]).abs() < 1e-4 * want[j].abs(), "token {j}: {lp} vs {}", want[j]);
    }
    let at1 = SamplerConfig { temperature: 1.0, ..cfg };
    let d = sample_row(&z, &[], &at1, 1).unwrap()[0].clone();
    assert!(d.alternatives.iter().any(|&(j, lp)| j == 1 && lp == f32::NEG_INFINITY), "{d:?}");
}

#[test]
fn stages_see_only_the_tokens_kept_before_them() {
    // Typical-p drops the most probable token (0.3 against 700 of 0.001); temperature comes
    // after it (llama.cpp's order). The dropped token must not take the mass back: at a low
    // temperature the kept ones are still a uniform distribution, as at T = 1.
    let mut z = vec![0.3f64.ln() as f32];
    z.extend(std::iter::repeat_n(0.001f64.ln() as f32, 700));
    let order = vec![Stage::TopK, Stage::TopP, Stage::MinP, Stage::TypicalP, Stage::Temperature];
    let cfg =
        |t: f32| SamplerConfig { typical_p: Some(0.5), temperature: t, order: order.clone(), ..Default::default() };
    let at1 = sample_row(&z, &[], &cfg(1.0), 1).unwrap()[0].clone();
    let cold = sample_row(&z, &[], &cfg(0.05), 1).unwrap()[0].clone();
    assert!(at1.token != 0 && cold.token != 0);
    assert!((cold.logprob - at1.logprob).abs() < 1e-5, "{} vs {}", cold.logprob, at1.logprob);
    // Greedy over what typical-p kept: the lowest id among the tied tokens.
    assert_eq!(sample_row(&z, &[], &cfg(0.0), 1).unwrap()[0].token, 1);
    // In the default order temperature comes first, so greedy takes the largest logit
    // whatever typical-p would have dropped after it (the limit of small temperatures).
    let first = SamplerConfig { typical_p: Some(0.5), temperature: 0.0, ..Default::default() };
    assert_eq!(sample_row(&z, &[], &first, 1).unwrap()[0].token, 0);
    let cold = SamplerConfig { temperature: 0.05, ..first };
    assert_eq!(sample_row(&z, &[], &cold, 1).unwrap()[0].token, 0);
    // One kept token has log-probability exactly 0; none is above 0.
    let one = SamplerConfig { top_k: Some(1), ..Default::default() };
    assert_eq!(sample_row(&[1.0, 2.0, 0.5], &[], &one, 1).unwrap()[0].logprob, 0.0);
    for seed in 0..200 {
        let c = SamplerConfig { top_p: Some(0.5), alternatives: 3, seed, ..Default::default() };
        let d = sample_row(&[1.0, 2.0, 0.5], &[], &c, 1).unwrap()[0].clone();
        assert!(d.logprob <= 0.0 && d.alternatives.iter().all(|a| a.1 <= 0.0), "{d:?}");
    }
}

#[test]
fn the_order_of_stages_is_checked() {
    let z = [0.0f32, 1.0, 2.0];
    let no_temperature = SamplerConfig { temperature: 0.0, order: vec![Stage::TopK], ..Default::default() };
    let e = sample_row(&z, &[], &no_temperature, 1).unwrap_err().to_string();
    assert!(e.contains("Temperature is set but not in the order"), "{e}");
    let twice = SamplerConfig { order: vec![Stage::Temperature, Stage::Temperature], ..Default::default() };
    let e = sample_row(&z, &[], &twice, 1).unwrap_err().to_string();
    assert!(e.contains("Temperature twice"), "{e}");
}

#[test]
fn alternatives_keep_tiny_log_probabilities() {
    // p of token 1 is e^-100 / (1 + e^-100 + e^-1): below f32's normal range, yet its
    // log-probability is -100.313, not -inf.
    let z = [0.0f32, -100.0, -1.0];
    let d = sample_row(&z, &[], &SamplerConfig { alternatives: 3, ..Default::default() }, 1).unwrap()[0].clone();
    let ln_s = (1.0 + (-100f64).exp() + (-1f64).exp()).ln();
    let want = [(0usize, -ln_s), (2, -1.0 - ln_s), (1, -100.0 - ln_s)];
    for ((j, lp), (wj, wlp)) in d.alternatives.iter().zip(want) {
        assert_eq!(*j, wj);
        assert!((*lp as f64 - wlp).abs() < 1e-5, "token {j}: {lp} vs {wlp}");
    }
    // −0 ties with +0: the lower id first.
    let d = sample_row(&[-0.0, 0.0], &[], &SamplerConfig { alternatives: 2, ..Default::default() }, 1).unwrap();
    assert_eq!(d[0].alternatives.iter().map(|a| a.0).collect::<Vec<_>>(), vec![0, 1]);
}

#[test]
fn a_logit_pushed_beyond_f32_by_a_bias_is_named() {
    let z = [3e38f32, 0.0];
    let cfg = SamplerConfig { logit_bias: vec![(0, 3e38)], ..Default::default() };
    let e = sample_row(&z, &[], &cfg, 1).unwrap_err().to_string();
    assert!(e.contains("token 0 is inf after the logit bias and penalties"), "{e}");
}
