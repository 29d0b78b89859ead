//! One decoding step: a configurable, seeded sampler chain over a row of logits.
//!
//! The chain, in its default order (Hugging Face's: processors first, then temperature,
//! then the truncations; llama.cpp instead applies temperature last — set
//! [`SamplerConfig::order`] to follow it):
//!
//! 1. logit bias, banned and allowed tokens;
//! 2. penalties over the token `history`: repetition (CTRL: positive logits divided by `r`,
//!    negative ones multiplied), then frequency and presence (OpenAI: `−f·count − p·[count>0]`);
//! 3. [`Stage::Temperature`] (`T = 0` means greedy: the largest logit among the tokens the
//!    stages before it kept, lowest id on ties);
//! 4. [`Stage::TopK`] (exactly `k` tokens: at a tie on the k-th logit the lower ids are kept,
//!    where Hugging Face keeps every tied token), [`Stage::TopP`] (the smallest set of most
//!    probable tokens whose mass is ≥ p, including the token that crosses p; ties to the
//!    lower ids), [`Stage::MinP`] (`p_i ≥ min_p·p_max`), [`Stage::TypicalP`].
//!
//! Each stage sees only the tokens the stages before it kept. `order` lists each stage at
//! most once, and every option that is set needs its stage in it. The logits must be
//! finite: mask tokens with `banned` or `allowed`, not with `-inf`; `top_p`, `min_p` and
//! `typical_p` are in (0, 1] (leave one unset to turn it off).
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
    /// How many top alternatives each [`Draw`] reports (0: none).
    pub alternatives: usize,
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
            alternatives: 0,
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
    /// The [`SamplerConfig::alternatives`] most probable tokens of the processed
    /// distribution with their log-probabilities, descending, ties to the lower id.
    pub alternatives: Vec<(usize, f32)>,
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
    // Each stage once, and every option that is set with its stage in the order.
    for (i, st) in cfg.order.iter().enumerate() {
        if cfg.order[..i].contains(st) {
            return bad(format!("order lists {st:?} twice"));
        }
    }
    let set = [
        (Stage::Temperature, cfg.temperature != 1.0),
        (Stage::TopK, cfg.top_k.is_some()),
        (Stage::TopP, cfg.top_p.is_some()),
        (Stage::MinP, cfg.min_p.is_some()),
        (Stage::TypicalP, cfg.typical_p.is_some()),
    ];
    if let Some((st, _)) = set.iter().find(|(st, on)| *on && !cfg.order.contains(st)) {
        return bad(format!("{st:?} is set but not in the order of stages {:?}", cfg.order));
    }
    if let Some(&(id, b)) = cfg.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
        return bad(format!("the logit bias of token {id} must be finite, got {b}"));
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

/// Applies the chain to `logits` and draws `num_samples` tokens from the result.
pub fn sample_row(logits: &[f32], history: &[usize], cfg: &SamplerConfig, num_samples: usize) -> Result<Vec<Draw>> {
    Sampler::default().sample(logits, history, cfg, num_samples)
}

/// Reusable working memory for [`sample_row`]: a decoding loop that keeps one `Sampler`
/// avoids allocating (and page-faulting) three vocabulary-sized buffers per step.
#[derive(Clone, Debug, Default)]
pub struct Sampler {
    z: Vec<f32>,
    p: Vec<f32>,
    kept: Vec<u32>,
    /// The kept logits, while `z` is cleared around them.
    saved: Vec<f32>,
}

impl Sampler {
    /// [`sample_row`] with this sampler's buffers.
    pub fn sample(
        &mut self,
        logits: &[f32],
        history: &[usize],
        cfg: &SamplerConfig,
        num_samples: usize,
    ) -> Result<Vec<Draw>> {
        sample_with(self, logits, history, cfg, num_samples)
    }
}

fn sample_with(
    buf: &mut Sampler,
    logits: &[f32],
    history: &[usize],
    cfg: &SamplerConfig,
    num_samples: usize,
) -> Result<Vec<Draw>> {
    let v = logits.len();
    if v == 0 {
        return Err(Error::InvalidArgument("cannot sample from an empty row".into()));
    }
    check(cfg, v)?;
    if let Some((_, j, x)) = crate::MatRef::from_row(logits).find_non_finite() {
        return Err(Error::NonFiniteEntry { tensor: "logits".into(), index: j, value: x });
    }
    if let Some(&h) = history.iter().find(|&&h| h >= v) {
        return Err(Error::InvalidArgument(format!("history token {h} is out of range [0, {v})")));
    }
    let k = crate::Kernels::best();
    // The raw distribution's (max, ln sum): a log-probability is (z − max) − ln sum, the
    // difference taken first (z − lse loses everything when |z| ≫ 1: 1e20 + ln 2 is 1e20).
    let raw_stats = k.max_sum(logits, None, 1.0);
    let z = &mut buf.z;
    z.clear();
    z.extend_from_slice(logits);
    for &(j, b) in &cfg.logit_bias {
        z[j] += b;
    }
    if let Some(allowed) = &cfg.allowed {
        let mut keep = vec![false; v];
        allowed.iter().for_each(|&j| keep[j] = true);
        z.iter_mut().zip(&keep).filter(|(_, k)| !**k).for_each(|(x, _)| *x = f32::NEG_INFINITY);
    }
    for &j in &cfg.banned {
        z[j] = f32::NEG_INFINITY;
    }
    // Penalties over the (windowed) history.
    let window = &history[history.len().saturating_sub(cfg.penalty_window.unwrap_or(history.len()))..];
    let mut counts = std::collections::BTreeMap::new();
    window.iter().for_each(|&h| *counts.entry(h).or_insert(0usize) += 1);
    let r = cfg.repetition_penalty;
    for (&j, &c) in &counts {
        if z[j] == f32::NEG_INFINITY {
            continue;
        }
        if r != 1.0 {
            z[j] = if z[j] > 0.0 { z[j] / r } else { z[j] * r };
        }
        z[j] -= cfg.frequency_penalty * c as f32 + cfg.presence_penalty;
    }
    if z.iter().all(|x| *x == f32::NEG_INFINITY) {
        return Err(Error::InvalidArgument(
            "every token is banned, disallowed or pushed to -inf by the logit bias and penalties".into(),
        ));
    }
    // (Only the biased and penalized logits can have left the f32 range.)
    let changed = cfg.logit_bias.iter().map(|b| b.0).chain(counts.keys().copied());
    if let Some(j) = changed.into_iter().find(|&j| z[j].is_nan() || z[j] == f32::INFINITY) {
        return Err(Error::InvalidArgument(format!(
            "the logit of token {j} is {} after the logit bias and penalties (beyond f32)",
            z[j]
        )));
    }
    // From here on in f32 with the vectorized kernels: `z` the current logits, `kept` the
    // surviving ids (unordered), `p` the softmax of `z` over all ids when fresh.
    let kept = &mut buf.kept;
    kept.clear();
    if z.chunks(64).all(|c| c.iter().fold(true, |ok, x| ok & (*x != f32::NEG_INFINITY))) {
        kept.extend(0..v as u32); // nothing banned: no per-element test
    } else {
        kept.extend((0..v as u32).filter(|&j| z[j as usize] != f32::NEG_INFINITY));
    }
    let p = &mut buf.p;
    p.resize(v, 0.0);
    let mut p_fresh = false;
    // The softmax of `z` into `p`, and its (max, sum): log-probabilities are formed from
    // them, not from `p`, which flushes below e^-86.5.
    let mut stats = crate::kernels::MaxSum::EMPTY;
    let refresh = |z: &[f32], p: &mut [f32], stats: &mut crate::kernels::MaxSum| {
        *stats = k.max_sum(z, None, 1.0);
        k.softmax_into(z, None, 1.0, *stats, p);
    };
    // After a truncation, the dropped ids leave `z` (−inf), so that a later temperature's
    // shift and softmax see only the kept ones (typical-p may drop the largest logit).
    let drop_others = |z: &mut [f32], kept: &[u32], saved: &mut Vec<f32>| {
        if kept.len() < z.len() {
            saved.clear();
            saved.extend(kept.iter().map(|&j| z[j as usize]));
            z.fill(f32::NEG_INFINITY);
            kept.iter().zip(saved.iter()).for_each(|(&j, &x)| z[j as usize] = x);
        }
    };
    // Order: larger logit first, then lower id.
    let better = |z: &[f32], a: u32, b: u32| z[a as usize] > z[b as usize] || (z[a as usize] == z[b as usize] && a < b);
    let mut greedy = false;
    // A temperature stage after a truncation shifts by the kept maximum and recomputes the
    // softmax over all ids: only then must the dropped ids leave `z`. (Otherwise `p`, the
    // softmax over all ids, stays proportional to the kept distribution, which is all the
    // later stages and the draw use.)
    let temperature_after = |si: usize| cfg.order[si + 1..].contains(&Stage::Temperature);
    for (si, stage) in cfg.order.iter().enumerate() {
        let before = kept.len();
        match stage {
            // Greedy over what the stages before it kept: the later ones cannot change the pick.
            Stage::Temperature if cfg.temperature == 0.0 => {
                greedy = true;
                break;
            }
            Stage::Temperature => {
                // Shifted by the largest kept logit first (the later stages see only the
                // distribution and the order, which the shift keeps), so that a tiny T
                // cannot overflow z / T: the largest becomes 0, the others -(gap / T). A gap
                // beyond f32::MAX overflows to -inf in f32, which is right for T <= 1; above,
                // gap / T may be finite (a log-probability of -400 at T = 1e36), so such a
                // row divides in f64. (Non-kept ids are -inf here, or all are kept.)
                let (t, m) = (cfg.temperature, kept_max(z, kept));
                let lowest = || z.iter().fold(f32::INFINITY, |a, &x| if x > f32::NEG_INFINITY { a.min(x) } else { a });
                if t > 1.0 && m as f64 - lowest() as f64 > f32::MAX as f64 {
                    z.iter_mut().for_each(|x| *x = ((*x as f64 - m as f64) / t as f64) as f32);
                } else {
                    z.iter_mut().for_each(|x| *x = (*x - m) / t);
                }
                p_fresh = false;
            }
            Stage::TopK => {
                if let Some(kk) = cfg.top_k
                    && kk < kept.len()
                {
                    // Narrow first by a histogram of counts by logit (as for top-p).
                    let zmax = kept_max(z, kept);
                    let mut bins = [0usize; 64];
                    for &j in kept.iter() {
                        bins[(((zmax - z[j as usize]) * 2.0) as usize).min(63)] += 1;
                    }
                    let mut acc = 0;
                    if let Some(last) = bins.iter().position(|&c| {
                        acc += c;
                        acc >= kk
                    }) && last < 63
                    {
                        let floor = zmax - (last as f32 + 1.0) * 0.5;
                        kept.retain(|&j| z[j as usize] >= floor);
                    }
                    kept.select_nth_unstable_by(kk - 1, |&a, &b| order_of(a, b, better(z, a, b)));
                    kept.truncate(kk);
                }
            }
            Stage::TopP => {
                if let Some(pp) = cfg.top_p {
                    if !p_fresh {
                        refresh(z, p, &mut stats);
                        p_fresh = true;
                    }
                    // Narrow the search first: a histogram of the kept mass by logit (64 bins
                    // of 0.5 below the maximum) finds a logit floor above which the mass
                    // already reaches `need`; the top-p set lies above that floor, since it is
                    // a prefix in logit order. The same pass sums the kept mass.
                    let zmax = kept_max(z, kept);
                    let mut bins = [0f64; 64];
                    for &j in kept.iter() {
                        let b = (((zmax - z[j as usize]) * 2.0) as usize).min(63);
                        bins[b] += p[j as usize] as f64;
                    }
                    let total: f64 = bins.iter().sum();
                    let need = pp as f64 * total;
                    let mut acc = 0.0;
                    let mut last = 63;
                    for (b, m) in bins.iter().enumerate() {
                        acc += m;
                        if acc >= need {
                            last = b;
                            break;
                        }
                    }
                    if last < 63 {
                        let floor = zmax - (last as f32 + 1.0) * 0.5;
                        kept.retain(|&j| z[j as usize] >= floor);
                    }
                    let n = best_mass_prefix(kept, |a, b| better(z, a, b), p, need);
                    kept.truncate(n);
                }
            }
            Stage::MinP => {
                if let Some(mp) = cfg.min_p {
                    let max = kept_max(z, kept) as f64;
                    let floor = max + (mp as f64).ln();
                    kept.retain(|&j| z[j as usize] as f64 >= floor);
                }
            }
            Stage::TypicalP => {
                if let Some(pp) = cfg.typical_p {
                    if !p_fresh {
                        refresh(z, p, &mut stats);
                        p_fresh = true;
                    }
                    let total: f64 = kept.iter().map(|&j| p[j as usize] as f64).sum();
                    // Entropy of the kept distribution; closeness of each surprisal to it.
                    let h: f64 = kept
                        .iter()
                        .map(|&j| {
                            let q = p[j as usize] as f64 / total;
                            if q > 0.0 { -q * q.ln() } else { 0.0 }
                        })
                        .sum();
                    let dist = |j: u32| {
                        let q = p[j as usize] as f64 / total;
                        if q > 0.0 { (-q.ln() - h).abs() } else { f64::INFINITY }
                    };
                    let n = best_mass_prefix(kept, |a, b| (dist(a), a) < (dist(b), b), p, pp as f64 * total);
                    kept.truncate(n);
                }
            }
        }
        if kept.len() < before && temperature_after(si) {
            drop_others(z, kept, &mut buf.saved);
        }
    }
    let mut rng = crate::rng::SplitMix64::new(cfg.seed);
    let raw = |j: usize| ((logits[j] as f64 - raw_stats.max as f64) - raw_stats.sum.ln()) as f32;
    if greedy {
        let best = kept.iter().copied().reduce(|a, b| if better(z, b, a) { b } else { a }).expect("non-empty") as usize;
        // The processed distribution is a point mass.
        let alts = if cfg.alternatives > 0 { vec![(best, 0.0)] } else { Vec::new() };
        return Ok((0..num_samples)
            .map(|_| Draw { token: best, logprob_raw: raw(best), logprob: 0.0, alternatives: alts.clone() })
            .collect());
    }
    if !p_fresh {
        refresh(z, p, &mut stats);
    }
    // The kept tokens by id, for a reproducible inverse-CDF draw: sorted when few, through
    // a bitmap when many.
    let ids: Vec<usize> = if kept.len() == v {
        (0..v).collect()
    } else if kept.len() < v / 16 {
        let mut ids: Vec<usize> = kept.iter().map(|&j| j as usize).collect();
        ids.sort_unstable();
        ids
    } else {
        let mut mask = vec![false; v];
        kept.iter().for_each(|&j| mask[j as usize] = true);
        (0..v).filter(|&j| mask[j]).collect()
    };
    let total: f64 = ids.iter().map(|&j| p[j] as f64).sum();
    if total == 0.0 || !total.is_finite() {
        return Err(Error::InvalidArgument(
            "the processed distribution has no mass (all kept probabilities underflow)".into(),
        ));
    }
    // log(p_j / total) = (z_j − M) − ln S − ln total, exact where p_j has flushed to 0.
    let (m, ln_s, ln_total) = (stats.max as f64, stats.sum.ln(), total.ln());
    // (At most 0: the f64 sum and the f32 probabilities may round it above; one kept token
    // has exactly 0.)
    let single = ids.len() == 1;
    let logprob = |j: usize| if single { 0.0 } else { ((((z[j] as f64 - m) - ln_s) - ln_total) as f32).min(0.0) };
    // The top alternatives of the processed distribution (partial selection), by logit.
    let alts: Vec<(usize, f32)> = if cfg.alternatives > 0 {
        let mut top: Vec<usize> = ids.clone();
        let a = cfg.alternatives.min(top.len());
        // (+0 added: −0 ties with +0, as in `better`.)
        let cmp = |x: &usize, y: &usize| (z[*y] + 0.0).total_cmp(&(z[*x] + 0.0)).then(x.cmp(y));
        if a < top.len() {
            top.select_nth_unstable_by(a - 1, cmp);
            top.truncate(a);
        }
        top.sort_unstable_by(cmp);
        top.into_iter().map(|j| (j, logprob(j))).collect()
    } else {
        Vec::new()
    };
    Ok((0..num_samples)
        .map(|_| {
            let u = rng.uniform() * total;
            let mut acc = 0.0;
            let mut pick = *ids.last().expect("non-empty");
            for &j in &ids {
                acc += p[j] as f64;
                if u < acc {
                    pick = j;
                    break;
                }
            }
            Draw { token: pick, logprob_raw: raw(pick), logprob: logprob(pick), alternatives: alts.clone() }
        })
        .collect())
}

/// The largest logit among the kept ids (all of `z` when every id is kept: vectorized).
fn kept_max(z: &[f32], kept: &[u32]) -> f32 {
    if kept.len() == z.len() {
        lane_max(z)
    } else {
        kept.iter().map(|&j| z[j as usize]).fold(f32::NEG_INFINITY, f32::max)
    }
}

/// The largest of `z` (no NaN), in 16 independent lanes so that it vectorizes.
fn lane_max(z: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = z.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    tail.iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// A total order from a strict "comes before" on distinct ids.
fn order_of(a: u32, b: u32, a_before_b: bool) -> std::cmp::Ordering {
    if a == b {
        std::cmp::Ordering::Equal
    } else if a_before_b {
        std::cmp::Ordering::Less
    } else {
        std::cmp::Ordering::Greater
    }
}

/// Reorders `idx` so that its first `n` entries are the shortest prefix, in the order
/// `before`, whose weights sum to at least `need` (all of them if the total falls short),
/// and returns `n`. Weighted quickselect: expected linear time, no full sort.
fn best_mass_prefix(idx: &mut [u32], before: impl Fn(u32, u32) -> bool, w: &[f32], mut need: f64) -> usize {
    let (mut lo, mut hi) = (0, idx.len());
    while hi - lo > 32 {
        // Median-of-three pivot, moved to `lo`.
        let mid = lo + (hi - lo) / 2;
        let (a, b, c) = (idx[lo], idx[mid], idx[hi - 1]);
        let m = if before(a, b) == before(b, c) {
            mid
        } else if before(b, a) == before(a, c) {
            lo
        } else {
            hi - 1
        };
        idx.swap(lo, m);
        let pivot = idx[lo];
        // Partition (lo+1..hi) into [before pivot | the rest].
        let mut split = lo + 1;
        for q in lo + 1..hi {
            if before(idx[q], pivot) {
                idx.swap(q, split);
                split += 1;
            }
        }
        // Put the pivot right after the better part.
        idx.swap(lo, split - 1);
        let pos = split - 1;
        let mass_better: f64 = idx[lo..pos].iter().map(|&j| w[j as usize] as f64).sum();
        if mass_better >= need {
            hi = pos;
        } else if mass_better + w[pivot as usize] as f64 >= need {
            return pos + 1;
        } else {
            need -= mass_better + w[pivot as usize] as f64;
            lo = pos + 1;
        }
    }
    idx[lo..hi].sort_unstable_by(|&a, &b| order_of(a, b, before(a, b)));
    for q in lo..hi {
        need -= w[idx[q] as usize] as f64;
        if need <= 0.0 {
            return q + 1;
        }
    }
    hi
}

/// One decoding step for many rows at once (`logits: [n, V]`), each with its own history
/// and settings (seed included), in parallel. Row `i`'s draws are the same as
/// [`sample_row`]'s for that row, whatever the number of threads.
pub fn sample_rows(
    logits: crate::MatRef<'_>,
    histories: &[&[usize]],
    cfgs: &[SamplerConfig],
    num_samples: usize,
) -> Result<Vec<Vec<Draw>>> {
    use rayon::prelude::*;
    let n = logits.rows();
    if histories.len() != n || cfgs.len() != n {
        return Err(Error::Shape(format!(
            "{} rows of logits, {} histories and {} configurations: expected one of each per row",
            n,
            histories.len(),
            cfgs.len()
        )));
    }
    (0..n)
        .into_par_iter()
        .map_init(Sampler::default, |s, i| {
            s.sample(logits.row(i), histories[i], &cfgs[i], num_samples)
                .map_err(|e| Error::InvalidArgument(format!("row {i}: {e}")))
        })
        .collect()
}
