//! Sequence scoring: per-token log-probabilities of given targets, with the alignment
//! between rows and targets made explicit, and per-sequence statistics.
//!
//! `hidden: [n, d]` holds one or more sequences laid end to end (`lengths`, summing to
//! `n`; one sequence without), `targets: [n]` token ids and an optional `mask: [n]` of the
//! target positions that are scored (prompt positions are not).
//!
//! ```text
//! rows:      h0  h1  h2  h3 | h4  h5        two sequences, lengths [4, 2]
//! targets:   y0  y1  y2  y3 | y4  y5
//!
//! Aligned    h0→y0  h1→y1  h2→y2  h3→y3 | h4→y4  h5→y5      row t scores y[t] if mask[t]
//! Shifted    h0→y1  h1→y2  h2→y3  h3 ·  | h4→y5  h5 ·       row t scores y[t+1] of the same
//!                                                            sequence, if mask[t+1]; the last
//!                                                            row of a sequence scores nothing
//! ```
//!
//! Scores are sums of log-probabilities (never of probabilities or logits) at temperature
//! 1 unless one is asked for explicitly.

use crate::error::{Error, Result};
use crate::layer::{LayerOptions, SoftmaxLayer};
use crate::matrix::MatRef;

/// Which target each row scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Alignment {
    /// Row `t` scores `targets[t]`.
    #[default]
    Aligned,
    /// Row `t` scores `targets[t + 1]` of the same sequence (causal language models).
    Shifted,
}

/// Options of [`score_sequences`].
#[derive(Clone, Copy, Debug)]
pub struct ScoreOptions<'a> {
    /// Rows per sequence, summing to `n`; `None` is one sequence.
    pub lengths: Option<&'a [usize]>,
    /// Which target positions are scored (`[n]`); `None` scores all.
    pub mask: Option<&'a [bool]>,
    pub alignment: Alignment,
    /// How many alternatives to report per scored token (0: none).
    pub top_logprobs: usize,
    /// Applied only when set explicitly; default 1.
    pub temperature: f32,
    /// UTF-8 bytes per sequence, for bits per byte.
    pub bytes: Option<&'a [usize]>,
    /// Characters per sequence, for the per-character score.
    pub chars: Option<&'a [usize]>,
}

impl Default for ScoreOptions<'_> {
    fn default() -> Self {
        ScoreOptions {
            lengths: None,
            mask: None,
            alignment: Alignment::Aligned,
            top_logprobs: 0,
            temperature: 1.0,
            bytes: None,
            chars: None,
        }
    }
}

/// One scored token.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenScore {
    /// The position of the target within its sequence.
    pub position: usize,
    pub target: usize,
    pub logprob: f32,
    /// 1 for the argmax; equal logits rank the lower id first, as `argmax` and `top_k` do.
    pub rank: usize,
    /// The `top_logprobs` most probable tokens (descending), plus the target when it is
    /// not among them.
    pub top_logprobs: Vec<(usize, f32)>,
}

/// One sequence's score. Means and perplexity are `None` when nothing was scored.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceScore {
    pub tokens: Vec<TokenScore>,
    pub sum_logprob: f64,
    pub num_scored: usize,
    pub mean_logprob: Option<f64>,
    /// `exp(−mean_logprob)`.
    pub perplexity: Option<f64>,
    /// Every scored target is the argmax (rank 1).
    pub is_greedy: bool,
    /// `−sum / bytes / ln 2`, as lm-evaluation-harness defines it.
    pub bits_per_byte: Option<f64>,
    /// `sum / chars`.
    pub logprob_per_char: Option<f64>,
}

/// Scores every sequence; see the module docs for the alignment.
pub fn score_sequences(
    layer: &SoftmaxLayer<'_>,
    hidden: MatRef<'_>,
    targets: &[i64],
    opts: &ScoreOptions<'_>,
) -> Result<Vec<SequenceScore>> {
    let n = hidden.rows();
    let v = layer.vocab();
    // The width and the temperature up front, even when nothing turns out to be scored.
    layer.check_shape(hidden, opts.temperature)?;
    if targets.len() != n {
        return Err(Error::Shape(format!("targets have length {}, expected n = {n}", targets.len())));
    }
    if let Some(i) = targets.iter().position(|&y| y < 0 || y as u64 >= v as u64) {
        return Err(Error::TargetOutOfRange { index: i, value: targets[i], vocab: v });
    }
    let whole = [n];
    let lengths = opts.lengths.unwrap_or(&whole);
    // (Checked: lengths that wrap around to n would pass a plain sum.)
    let total = lengths.iter().try_fold(0usize, |s, &l| s.checked_add(l)).unwrap_or(usize::MAX);
    if total != n {
        return Err(Error::Shape(format!("lengths sum to {total}, but hidden has n = {n} rows")));
    }
    if let Some(m) = opts.mask
        && m.len() != n
    {
        return Err(Error::Shape(format!("the mask has length {}, expected n = {n}", m.len())));
    }
    for (name, x) in [("bytes", opts.bytes), ("chars", opts.chars)] {
        if let Some(x) = x
            && x.len() != lengths.len()
        {
            return Err(Error::Shape(format!(
                "{name} has length {}, expected one per sequence ({})",
                x.len(),
                lengths.len()
            )));
        }
    }
    // (row, target index, sequence, position) of every scored token.
    let mut jobs = Vec::new();
    let mut start = 0;
    for (s, &len) in lengths.iter().enumerate() {
        for t in start..start + len {
            let target = match opts.alignment {
                Alignment::Aligned => Some(t),
                Alignment::Shifted => (t + 1 < start + len).then_some(t + 1),
            };
            if let Some(y) = target
                && opts.mask.is_none_or(|m| m[y])
            {
                jobs.push((t, y, s, y - start));
            }
        }
        start += len;
    }
    // The scored rows, compacted, through one fused pass.
    let d = layer.hidden_dim();
    let mut rows = Vec::with_capacity(jobs.len() * d);
    jobs.iter().for_each(|&(t, ..)| rows.extend_from_slice(hidden.row(t)));
    let ys: Vec<i64> = jobs.iter().map(|&(_, y, ..)| targets[y]).collect();
    let stats = if jobs.is_empty() {
        Vec::new()
    } else {
        let h = MatRef::new(&rows, jobs.len(), d)?;
        layer.target_stats(h, &ys, opts.top_logprobs, &LayerOptions { temperature: opts.temperature })?
    };
    let mut out: Vec<SequenceScore> = (0..lengths.len())
        .map(|_| SequenceScore {
            tokens: Vec::new(),
            sum_logprob: 0.0,
            num_scored: 0,
            mean_logprob: None,
            perplexity: None,
            is_greedy: true,
            bits_per_byte: None,
            logprob_per_char: None,
        })
        .collect();
    for ((&(_, _, s, pos), st), &y) in jobs.iter().zip(stats).zip(&ys) {
        let mut top = st.top;
        if opts.top_logprobs > 0 && !top.iter().any(|&(j, _)| j as i64 == y) {
            top.push((y as usize, st.log_prob));
        }
        let seq = &mut out[s];
        seq.sum_logprob += st.log_prob as f64;
        seq.num_scored += 1;
        seq.is_greedy &= st.rank == 1;
        seq.tokens.push(TokenScore {
            position: pos,
            target: y as usize,
            logprob: st.log_prob,
            rank: st.rank,
            top_logprobs: top,
        });
    }
    for (s, seq) in out.iter_mut().enumerate() {
        if seq.num_scored > 0 {
            let mean = seq.sum_logprob / seq.num_scored as f64;
            seq.mean_logprob = Some(mean);
            seq.perplexity = Some((-mean).exp());
        }
        seq.bits_per_byte =
            opts.bytes.and_then(|b| (b[s] > 0).then(|| -seq.sum_logprob / b[s] as f64 / std::f64::consts::LN_2));
        seq.logprob_per_char = opts.chars.and_then(|c| (c[s] > 0).then(|| seq.sum_logprob / c[s] as f64));
    }
    Ok(out)
}

/// Candidate continuations of one context, ranked.
#[derive(Clone, Debug, PartialEq)]
pub struct CandidateRanking {
    /// Candidate indices, best first, by total log-probability.
    pub by_sum: Vec<usize>,
    /// By mean log-probability per scored token.
    pub by_mean: Vec<usize>,
    /// By log-probability per character (when the scores have it).
    pub by_char: Option<Vec<usize>>,
    /// By bits per byte, lowest first (when the scores have it).
    pub by_byte: Option<Vec<usize>>,
    /// The softmax over the candidates' total log-probabilities (uniform when every one is
    /// −inf: impossible candidates tie).
    pub softmax_of_sums: Vec<f64>,
}

/// Ranks candidates (each a scored continuation of the same context). Ties keep the
/// lower index first; candidates without a mean sort last.
pub fn rank_candidates(scores: &[SequenceScore]) -> CandidateRanking {
    let order = |key: &dyn Fn(&SequenceScore) -> Option<f64>| {
        let mut idx: Vec<usize> = (0..scores.len()).collect();
        idx.sort_by(|&a, &b| {
            let (ka, kb) = (key(&scores[a]).unwrap_or(f64::NEG_INFINITY), key(&scores[b]).unwrap_or(f64::NEG_INFINITY));
            kb.total_cmp(&ka).then(a.cmp(&b))
        });
        idx
    };
    let all = |f: &dyn Fn(&SequenceScore) -> Option<f64>| scores.iter().all(|s| f(s).is_some());
    let max = scores.iter().map(|s| s.sum_logprob).fold(f64::NEG_INFINITY, f64::max);
    // Candidates that are all impossible (every sum −inf) tie: a uniform softmax, not NaN.
    let shifted = |s: &SequenceScore| if max == f64::NEG_INFINITY { 0.0 } else { s.sum_logprob - max };
    let z: f64 = scores.iter().map(|s| shifted(s).exp()).sum();
    CandidateRanking {
        by_sum: order(&|s| Some(s.sum_logprob)),
        by_mean: order(&|s| s.mean_logprob),
        by_char: all(&|s| s.logprob_per_char).then(|| order(&|s| s.logprob_per_char)),
        by_byte: all(&|s| s.bits_per_byte).then(|| order(&|s| s.bits_per_byte.map(|b| -b))),
        softmax_of_sums: scores.iter().map(|s| shifted(s).exp() / z).collect(),
    }
}
