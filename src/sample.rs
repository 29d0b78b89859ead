//! One decoding step: a configurable, seeded sampler chain over a row of logits.
//!
//! The chain, in its default order (Hugging Face's: processors first, then temperature,
//! then the truncations; llama.cpp instead applies temperature last — set
//! [`SamplerConfig::order`] to follow it):
//!
//! 1. logit bias, banned and allowed tokens;
//! 2. penalties over the token `history`: repetition (CTRL: positive logits divided by `r`,
//!    negative ones multiplied), then frequency and presence (OpenAI: `−f·count − p·[count>0]`);
//! 3. [`Stage::Temperature`] (`T = 0` means greedy: the largest logit, lowest id on ties);
//! 4. [`Stage::TopK`], [`Stage::TopP`] (the smallest set of most probable tokens whose mass
//!    is ≥ p, including the token that crosses p), [`Stage::MinP`] (`p_i ≥ min_p·p_max`),
//!    [`Stage::TypicalP`].
//!
//! Draws use SplitMix64 seeded per row, and kept tokens are laid out by id before the
//! inverse-CDF draw, so the same seed and inputs give the same token on every machine.
//! Truncations use partial selection, not a full sort of the vocabulary.

use crate::error::{Error, Result};

/// A truncation or scaling stage of the chain (biases and penalties always come first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Temperature,
    TopK,
    TopP,
    MinP,
    TypicalP,
}

/// The sampler chain's settings. `Default` samples from the plain softmax.
#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// ≥ 0; 0 is greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub typical_p: Option<f32>,
    /// CTRL-style repetition penalty `r > 0` (1 = none; > 1 discourages repeats).
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// The last this-many tokens of the history are penalized (`None`: all).
    pub penalty_window: Option<usize>,
    /// Added to the logits of these tokens.
    pub logit_bias: Vec<(usize, f32)>,
    /// Never sampled.
    pub banned: Vec<usize>,
    /// If set, only these may be sampled.
    pub allowed: Option<Vec<usize>>,
    pub order: Vec<Stage>,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            min_p: None,
            typical_p: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_window: None,
            logit_bias: Vec::new(),
            banned: Vec::new(),
            allowed: None,
            order: vec![Stage::Temperature, Stage::TopK, Stage::TopP, Stage::MinP, Stage::TypicalP],
            seed: 0,
        }
    }
}

/// One drawn token.
#[derive(Clone, Debug, PartialEq)]
pub struct Draw {
    pub token: usize,
    /// `log softmax(logits)[token]` before any processing.
    pub logprob_raw: f32,
    /// Its log-probability in the processed distribution that was sampled.
    pub logprob: f32,
}

fn check(cfg: &SamplerConfig, v: usize) -> Result<()> {
    let bad = |what: String| Err(Error::InvalidArgument(what));
    if !(cfg.temperature.is_finite() && cfg.temperature >= 0.0) {
        return bad(format!("temperature must be finite and >= 0, got {}", cfg.temperature));
    }
    if cfg.top_k == Some(0) {
        return bad("top_k must be >= 1, got 0".into());
    }
    for (name, p) in [("top_p", cfg.top_p), ("min_p", cfg.min_p), ("typical_p", cfg.typical_p)] {
        if let Some(p) = p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad(format!("{name} must be in (0, 1], got {p}"));
        }
    }
    if !(cfg.repetition_penalty.is_finite() && cfg.repetition_penalty > 0.0) {
        return bad(format!("repetition_penalty must be finite and > 0, got {}", cfg.repetition_penalty));
    }
    if !cfg.frequency_penalty.is_finite() || !cfg.presence_penalty.is_finite() {
        return bad("frequency and presence penalties must be finite".into());
    }
    let ids = cfg
        .logit_bias
        .iter()
        .map(|b| b.0)
        .chain(cfg.banned.iter().copied())
        .chain(cfg.allowed.iter().flatten().copied());
    for id in ids {
        if id >= v {
            return bad(format!("token id {id} is out of range [0, {v})"));
        }
    }
    Ok(())
}

/// SplitMix64 uniform in [0, 1).
fn uniform(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// `ln Σ exp(z)` over finite-or-(−inf) values, in f64.
fn lse(z: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = z.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + z.map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// Applies the chain to `logits` and draws `num_samples` tokens from the result.
pub fn sample_row(logits: &[f32], history: &[usize], cfg: &SamplerConfig, num_samples: usize) -> Result<Vec<Draw>> {
    let v = logits.len();
    if v == 0 {
        return Err(Error::InvalidArgument("cannot sample from an empty row".into()));
    }
    check(cfg, v)?;
    if let Some(j) = logits.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite { tensor: "logits".into(), row: 0, col: j, value: logits[j] });
    }
    if let Some(&h) = history.iter().find(|&&h| h >= v) {
        return Err(Error::InvalidArgument(format!("history token {h} is out of range [0, {v})")));
    }
    let raw_lse = lse(logits.iter().map(|&x| x as f64));
    let mut z: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    for &(j, b) in &cfg.logit_bias {
        z[j] += b as f64;
    }
    if let Some(allowed) = &cfg.allowed {
        let mut keep = vec![false; v];
        allowed.iter().for_each(|&j| keep[j] = true);
        z.iter_mut().zip(&keep).filter(|(_, k)| !**k).for_each(|(x, _)| *x = f64::NEG_INFINITY);
    }
    for &j in &cfg.banned {
        z[j] = f64::NEG_INFINITY;
    }
    // Penalties over the (windowed) history.
    let window = &history[history.len().saturating_sub(cfg.penalty_window.unwrap_or(history.len()))..];
    let mut counts = std::collections::BTreeMap::new();
    window.iter().for_each(|&h| *counts.entry(h).or_insert(0usize) += 1);
    let r = cfg.repetition_penalty as f64;
    for (&j, &c) in &counts {
        if z[j] == f64::NEG_INFINITY {
            continue;
        }
        if r != 1.0 {
            z[j] = if z[j] > 0.0 { z[j] / r } else { z[j] * r };
        }
        z[j] -= cfg.frequency_penalty as f64 * c as f64 + cfg.presence_penalty as f64;
    }
    if z.iter().all(|x| *x == f64::NEG_INFINITY) {
        return Err(Error::InvalidArgument("every token is banned or disallowed".into()));
    }
    // Candidates: (id, logit), all finite ones to start with.
    let mut cand: Vec<(usize, f64)> =
        z.iter().enumerate().filter(|(_, x)| x.is_finite()).map(|(j, &x)| (j, x)).collect();
    let by_logit = |a: &(usize, f64), b: &(usize, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut greedy = false;
    for stage in &cfg.order {
        match stage {
            Stage::Temperature if cfg.temperature == 0.0 => greedy = true,
            Stage::Temperature => {
                let t = cfg.temperature as f64;
                cand.iter_mut().for_each(|c| c.1 /= t);
            }
            Stage::TopK => {
                if let Some(k) = cfg.top_k
                    && k < cand.len()
                {
                    cand.select_nth_unstable_by(k - 1, by_logit);
                    cand.truncate(k);
                }
            }
            Stage::TopP => {
                if let Some(p) = cfg.top_p {
                    cand = top_p(cand, p as f64, by_logit);
                }
            }
            Stage::MinP => {
                if let Some(mp) = cfg.min_p {
                    let max = cand.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
                    let floor = max + (mp as f64).ln();
                    cand.retain(|c| c.1 >= floor);
                }
            }
            Stage::TypicalP => {
                if let Some(p) = cfg.typical_p {
                    cand = typical_p(cand, p as f64);
                }
            }
        }
    }
    let mut seed = cfg.seed;
    let raw = |j: usize| (logits[j] as f64 - raw_lse) as f32;
    if greedy {
        let best = cand.iter().copied().min_by(|a, b| by_logit(a, b)).expect("non-empty").0;
        return Ok((0..num_samples).map(|_| Draw { token: best, logprob_raw: raw(best), logprob: 0.0 }).collect());
    }
    // The processed distribution, laid out by id for a reproducible inverse-CDF draw.
    cand.sort_unstable_by_key(|c| c.0);
    let l = lse(cand.iter().map(|c| c.1));
    let probs: Vec<f64> = cand.iter().map(|c| (c.1 - l).exp()).collect();
    let total: f64 = probs.iter().sum();
    Ok((0..num_samples)
        .map(|_| {
            let u = uniform(&mut seed) * total;
            let mut acc = 0.0;
            let mut pick = cand.len() - 1;
            for (q, p) in probs.iter().enumerate() {
                acc += p;
                if u < acc {
                    pick = q;
                    break;
                }
            }
            let (token, zt) = cand[pick];
            Draw { token, logprob_raw: raw(token), logprob: (zt - l) as f32 }
        })
        .collect())
}

/// The smallest set of most probable candidates whose mass is ≥ p (the token that
/// crosses p included), by growing partial selections rather than a full sort.
fn top_p(
    mut cand: Vec<(usize, f64)>,
    p: f64,
    by_logit: impl Fn(&(usize, f64), &(usize, f64)) -> std::cmp::Ordering + Copy,
) -> Vec<(usize, f64)> {
    let l = lse(cand.iter().map(|c| c.1));
    let mut m = 256.min(cand.len());
    loop {
        if m < cand.len() {
            cand.select_nth_unstable_by(m - 1, by_logit);
        }
        let head = &mut cand[..m];
        head.sort_unstable_by(by_logit);
        let mut mass = 0.0;
        for (q, c) in head.iter().enumerate() {
            mass += (c.1 - l).exp();
            if mass >= p {
                cand.truncate(q + 1);
                return cand;
            }
        }
        if m == cand.len() {
            return cand; // rounding: p ~ 1 and the whole mass falls just short
        }
        m = (2 * m).min(cand.len());
    }
}

/// Typical sampling (Meister et al.): keep the tokens whose surprisal is closest to the
/// entropy, in that order, until their mass is ≥ p.
fn typical_p(mut cand: Vec<(usize, f64)>, p: f64) -> Vec<(usize, f64)> {
    let l = lse(cand.iter().map(|c| c.1));
    let entropy: f64 = cand.iter().map(|c| -(c.1 - l).exp() * (c.1 - l)).sum();
    let key = |c: &(usize, f64)| ((l - c.1) - entropy).abs();
    cand.sort_unstable_by(|a, b| key(a).total_cmp(&key(b)).then(a.0.cmp(&b.0)));
    let mut mass = 0.0;
    for q in 0..cand.len() {
        mass += (cand[q].1 - l).exp();
        if mass >= p {
            cand.truncate(q + 1);
            break;
        }
    }
    cand
}
