//! Plackett–Luce: the probability of a ranking under softmax scores.
//!
//! Items `0..m` have scores `s`. A ranking `r = (r_1, …, r_k)` lists the `k` best items in
//! order (`k = m` for a full ranking; for `k < m` the other items rank below them in no
//! stated order). Each position is a softmax over the items that remain:
//!
//! ```text
//! log P(r | s) = Σ_{i=1..k} [ s_{r_i} − lse(R_i) ],   R_i = items not among r_1 … r_{i−1}
//! ```
//!
//! # Stability
//!
//! `lse(R_i)` is never formed as `log(Z − cumsum)`, which cancels when the top items carry
//! almost all the mass. The sets `R_k ⊂ … ⊂ R_1` grow backwards, so the lse's are built
//! from the last position to the first by `logaddexp` alone: no subtraction, exact to
//! rounding whatever the score gaps.
//!
//! The gradient is `∂/∂s_j = [j ranked] − Σ_{i ≤ p(j)} exp(s_j − lse(R_i))`, with `p(j)` the
//! position of `j` (or `k` for unranked items); the inner sum is kept in log space too.

use crate::error::{Error, Result};

fn logaddexp(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// Checks a ranking of items `0..m`: non-empty, no repeats, no unknown items.
fn check_ranking(m: usize, ranking: &[usize]) -> Result<()> {
    if ranking.is_empty() {
        return Err(Error::InvalidArgument("the ranking is empty".into()));
    }
    let mut seen = vec![false; m];
    for (i, &r) in ranking.iter().enumerate() {
        if r >= m {
            return Err(Error::InvalidArgument(format!("ranking[{i}] = {r} is not an item (there are {m} items)")));
        }
        if std::mem::replace(&mut seen[r], true) {
            return Err(Error::InvalidArgument(format!("ranking[{i}] = {r} repeats an item ranked earlier")));
        }
    }
    Ok(())
}

/// `lse(R_i)` for every position `i` of the ranking, built backwards by `logaddexp`.
fn position_lse(scores: &[f32], ranking: &[usize]) -> Vec<f64> {
    let mut ranked = vec![false; scores.len()];
    ranking.iter().for_each(|&r| ranked[r] = true);
    // Items below the ranking (none for a full ranking).
    let mut acc =
        scores.iter().zip(&ranked).filter(|(_, r)| !**r).fold(f64::NEG_INFINITY, |a, (&s, _)| logaddexp(a, s as f64));
    let mut lse = vec![0f64; ranking.len()];
    for (i, &r) in ranking.iter().enumerate().rev() {
        acc = logaddexp(acc, scores[r] as f64);
        lse[i] = acc;
    }
    lse
}

fn check_scores(scores: &[f32]) -> Result<()> {
    match scores.iter().position(|s| !s.is_finite()) {
        Some(j) => Err(Error::NonFinite { tensor: "scores".into(), row: 0, col: j, value: scores[j] }),
        None => Ok(()),
    }
}

/// `log P(ranking | scores)` for a full or top-k ranking.
///
/// ```
/// // Two items: P(1 before 0) = e^1 / (e^0 + e^1).
/// let lp = softmax_layer::rank::log_prob(&[0.0, 1.0], &[1]).unwrap();
/// assert!((lp - (1f64 - (1f64.exp() + 1.0).ln())).abs() < 1e-12);
/// ```
pub fn log_prob(scores: &[f32], ranking: &[usize]) -> Result<f64> {
    check_scores(scores)?;
    check_ranking(scores.len(), ranking)?;
    let lse = position_lse(scores, ranking);
    Ok(ranking.iter().zip(&lse).map(|(&r, l)| scores[r] as f64 - l).sum())
}

/// `log P(ranking | scores)` and its gradient with respect to the scores (`[m]`).
pub fn log_prob_with_grad(scores: &[f32], ranking: &[usize]) -> Result<(f64, Vec<f64>)> {
    check_scores(scores)?;
    check_ranking(scores.len(), ranking)?;
    let lse = position_lse(scores, ranking);
    // log Σ_{i ≤ p} exp(−lse_i), for each position p.
    let mut log_a = Vec::with_capacity(lse.len());
    let mut acc = f64::NEG_INFINITY;
    for l in &lse {
        acc = logaddexp(acc, -l);
        log_a.push(acc);
    }
    let k = ranking.len();
    let mut pos = vec![k - 1; scores.len()];
    let mut grad = vec![0f64; scores.len()];
    for (i, &r) in ranking.iter().enumerate() {
        pos[r] = i;
        grad[r] = 1.0;
    }
    for (j, g) in grad.iter_mut().enumerate() {
        *g -= (scores[j] as f64 + log_a[pos[j]]).exp();
    }
    let lp = ranking.iter().zip(&lse).map(|(&r, l)| scores[r] as f64 - l).sum();
    Ok((lp, grad))
}

/// Samples a top-`k` ranking from Plackett–Luce(scores) by the Gumbel-top-k trick:
/// perturb each score by Gumbel noise and sort. Seeded: the same `seed` gives the same
/// ranking on every machine.
pub fn sample_gumbel_top_k(scores: &[f32], k: usize, seed: u64) -> Result<Vec<usize>> {
    check_scores(scores)?;
    if k == 0 || k > scores.len() {
        return Err(Error::InvalidArgument(format!("k = {k} must be in [1, {}]", scores.len())));
    }
    let mut state = seed;
    let mut keyed: Vec<(f64, usize)> = scores
        .iter()
        .enumerate()
        .map(|(j, &s)| {
            // SplitMix64, then a uniform in (0, 1) with 53 random bits.
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            (s as f64 - (-u.ln()).ln(), j)
        })
        .collect();
    let cmp = |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if k < keyed.len() {
        keyed.select_nth_unstable_by(k - 1, cmp);
        keyed.truncate(k);
    }
    keyed.sort_unstable_by(cmp);
    Ok(keyed.into_iter().map(|(_, j)| j).collect())
}
