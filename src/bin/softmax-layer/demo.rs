//! `demo`: the main job. Trains a character-level next-token model whose only trained part
//! is a softmax layer over fixed hashed n-gram features, then scores, samples and measures
//! memory, on a built-in corpus (or the user's text).
//!
//! The built-in corpus comes from a known source: a second-order Markov chain over 27
//! characters (`a`–`z` and space) with seeded, sparse transition probabilities. Its entropy
//! rate `H = Σ_s π(s)·H(P(·|s))` over the stationary distribution `π` of the pair states is
//! computed exactly, so the model's cross-entropy can be set beside the best achievable.

use crate::Failure;
use crate::alloc::peak_extra;
use crate::train::{Progress, plot_history};
use softmax_layer::io::write_atomic;
use softmax_layer::loss::{
    CrossEntropyOptions, GradientsMut, Upstream, cross_entropy_with_grad, cross_entropy_with_grad_into,
};
use softmax_layer::sample::{Sampler, SamplerConfig};
use softmax_layer::score::{ScoreOptions, rank_candidates, score_sequences};
use softmax_layer::train::{Data, Optimizer, TrainConfig, train_with_heldout};
use softmax_layer::{MatRef, SoftmaxLayer, WeightLayout};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Train on this UTF-8 text file instead of the built-in corpus (its entropy rate is
    /// then unknown).
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,
    /// Characters of built-in training text.
    #[arg(long, value_name = "N", default_value_t = 120_000, allow_hyphen_values = true)]
    pub train_chars: usize,
    #[arg(long, value_name = "N", default_value_t = 10, allow_hyphen_values = true)]
    pub epochs: usize,
    #[arg(long, value_name = "S", default_value_t = 7, allow_hyphen_values = true)]
    pub seed: u64,
    /// Hash buckets per hash function for the pair of previous characters.
    #[arg(long, value_name = "N", default_value_t = 384, allow_hyphen_values = true)]
    pub buckets: usize,
    /// Where to write the loss-curve plot.
    #[arg(long, value_name = "FILE.svg", default_value = "demo-loss.svg")]
    pub plot: PathBuf,
    /// Precision of the layer's products in training, scoring and sampling: f32, bf16 or
    /// bf16x3.
    #[arg(long, value_name = "f32|bf16|bf16x3", default_value = "f32")]
    pub precision: String,
}

use softmax_layer::rng::SplitMix64 as Rng;

const ALPHABET: &[u8; 27] = b" abcdefghijklmnopqrstuvwxyz";

/// The order-2 Markov source: `next[(a·27 + b)·27 + c] = P(c | a, b)`.
pub struct Source {
    p: Vec<f64>,
    k: usize,
}

impl Source {
    /// Seeded sparse transitions: after each pair of characters, 3 to 6 letters are
    /// possible with Zipf-like weights, and a word ends (space) with a probability that
    /// grows after two letters; after a space, a word starts. Vowels follow consonants
    /// more often, so the text reads like words.
    pub fn new(seed: u64) -> Source {
        let k = ALPHABET.len();
        let mut rng = Rng::new(seed);
        let vowel = |c: usize| b"aeiou".contains(&ALPHABET[c]);
        let mut p = vec![0f64; k * k * k];
        for a in 0..k {
            for b in 0..k {
                let row = &mut p[(a * k + b) * k..(a * k + b + 1) * k];
                let choices = 3 + rng.below(4);
                for r in 0..choices {
                    // Prefer a vowel after a consonant and a consonant after a vowel.
                    let c = loop {
                        let c = 1 + rng.below(26);
                        let want_vowel = b != 0 && !vowel(b);
                        if vowel(c) == want_vowel || rng.uniform() < 0.35 {
                            break c;
                        }
                    };
                    row[c] += 1.0 / (1.0 + r as f64).powf(1.3);
                }
                let space = match (a, b) {
                    (_, 0) => 0.0,
                    (0, _) => 0.04,
                    _ => 0.22,
                };
                let letters: f64 = row.iter().sum();
                row.iter_mut().for_each(|x| *x *= (1.0 - space) / letters);
                row[0] = space;
            }
        }
        Source { p, k }
    }

    fn row(&self, a: usize, b: usize) -> &[f64] {
        &self.p[(a * self.k + b) * self.k..(a * self.k + b + 1) * self.k]
    }

    /// `n` characters (as ids), starting after two spaces.
    pub fn generate(&self, n: usize, seed: u64) -> Vec<usize> {
        let mut rng = Rng::new(seed);
        let (mut a, mut b) = (0, 0);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let u = rng.uniform();
            let row = self.row(a, b);
            let mut acc = 0.0;
            let c = row.iter().position(|&p| {
                acc += p;
                u < acc
            });
            let c = c.unwrap_or_else(|| row.iter().rposition(|&p| p > 0.0).unwrap_or(0));
            out.push(c);
            (a, b) = (b, c);
        }
        out
    }

    /// The entropy rate in nats per character: the stationary distribution of the pair
    /// chain by power iteration (averaged, so periodicity cannot stall it).
    pub fn entropy_rate(&self) -> f64 {
        let k = self.k;
        let mut pi = vec![0f64; k * k];
        pi[0] = 1.0;
        let mut avg = vec![0f64; k * k];
        let iters = 3000;
        for it in 0..iters {
            let mut next = vec![0f64; k * k];
            for a in 0..k {
                for b in 0..k {
                    let m = pi[a * k + b];
                    if m == 0.0 {
                        continue;
                    }
                    for (c, &p) in self.row(a, b).iter().enumerate() {
                        next[b * k + c] += m * p;
                    }
                }
            }
            pi = next;
            if it >= iters / 2 {
                avg.iter_mut().zip(&pi).for_each(|(s, p)| *s += p);
            }
        }
        let total: f64 = avg.iter().sum();
        let mut h = 0.0;
        for (&m, row) in avg.iter().zip(self.p.chunks_exact(k)) {
            let w = m / total;
            h += w * row.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum::<f64>();
        }
        h
    }

    /// The source's own mean cross-entropy on `text` (nats per character after the first two).
    fn cross_entropy(&self, text: &[usize]) -> f64 {
        let mut s = 0.0;
        for w in text.windows(3) {
            s -= self.row(w[0], w[1])[w[2]].ln();
        }
        s / (text.len() - 2) as f64
    }
}

/// Hashed n-gram features of the characters before position `t`: one-hot of the last
/// character, one-hot of the one before, and the pair hashed by `hashes` functions into
/// `buckets` each (so two pairs rarely share all their buckets); all of weight 1, in a dense
/// row of `d = 2·V + hashes·buckets`.
struct Features {
    vocab: usize,
    buckets: usize,
    hashes: usize,
}

impl Features {
    fn dim(&self) -> usize {
        2 * self.vocab + self.hashes * self.buckets
    }

    /// Writes the features of the context `(a, b)` (the two previous ids; `vocab` = none).
    fn write(&self, a: usize, b: usize, row: &mut [f32]) {
        row.fill(0.0);
        let v = self.vocab;
        if b < v {
            row[b] = 1.0;
        }
        if a < v {
            row[v + a] = 1.0;
        }
        for k in 0..self.hashes {
            let mut r = Rng::new((a as u64) << 32 ^ (b as u64) << 8 ^ k as u64);
            row[2 * v + k * self.buckets + r.below(self.buckets)] = 1.0;
        }
    }

    /// Features `[len, d]` for predicting `text[t]` from `text[..t]`, for `t` in `range`.
    fn matrix(&self, text: &[usize], range: std::ops::Range<usize>) -> Vec<f32> {
        let d = self.dim();
        let mut x = vec![0f32; range.len() * d];
        for (row, t) in x.chunks_exact_mut(d).zip(range) {
            let a = if t >= 2 { text[t - 2] } else { self.vocab };
            let b = if t >= 1 { text[t - 1] } else { self.vocab };
            self.write(a, b, row);
        }
        x
    }
}

struct Corpus {
    text: Vec<usize>,
    symbols: Vec<char>,
    source: Option<Source>,
    name: String,
}

fn corpus(a: &DemoArgs) -> Result<Corpus, Failure> {
    match &a.text {
        None => {
            let source = Source::new(a.seed);
            let text = source.generate(a.train_chars + a.train_chars / 10, a.seed ^ 0xC0FFEE);
            let symbols = ALPHABET.iter().map(|&c| c as char).collect();
            Ok(Corpus { text, symbols, source: Some(source), name: "the built-in Markov source".into() })
        }
        Some(path) => {
            let raw = std::fs::read_to_string(path)
                .map_err(|e| Failure(format!("{}: {e} (the demo reads UTF-8 text)", path.display())))?;
            // The 95 most frequent characters; the rest map to the least frequent kept one.
            let mut counts = std::collections::HashMap::<char, usize>::new();
            for c in raw.chars() {
                *counts.entry(c).or_default() += 1;
            }
            let mut symbols: Vec<(char, usize)> = counts.into_iter().collect();
            symbols.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
            if symbols.len() > 95 {
                let merged: usize = symbols[94..].iter().map(|s| s.1).sum();
                eprintln!(
                    "note: {} has {} distinct characters; the demo keeps the 94 most frequent and merges \
                     the other {} ({merged} occurrences) into one symbol, so its figures describe that coarser text",
                    path.display(),
                    symbols.len(),
                    symbols.len() - 94
                );
            }
            symbols.truncate(95);
            let symbols: Vec<char> = symbols.into_iter().map(|s| s.0).collect();
            if raw.chars().count() < 1000 || symbols.len() < 2 {
                return Err(Failure(format!(
                    "{}: the demo needs at least 1000 characters and 2 distinct ones",
                    path.display()
                )));
            }
            let id = |c: char| symbols.iter().position(|&s| s == c).unwrap_or(symbols.len() - 1);
            let text: Vec<usize> = raw.chars().map(id).collect();
            Ok(Corpus { text, symbols, source: None, name: path.display().to_string() })
        }
    }
}

fn show(symbols: &[char], ids: &[usize]) -> String {
    ids.iter().map(|&i| symbols[i]).collect::<String>().replace('\n', "⏎")
}

pub fn run(a: &DemoArgs) -> Result<(), Failure> {
    let started = Instant::now();
    let precision = crate::layer::parse_precision(&a.precision)?;
    // Options checked before any work.
    if !(1..=1 << 20).contains(&a.buckets) {
        return Err(Failure(format!("--buckets must be in [1, {}], got {}", 1 << 20, a.buckets)));
    }
    if a.epochs == 0 {
        return Err(Failure("--epochs must be at least 1".into()));
    }
    if a.text.is_none() && !(1000..=100_000_000).contains(&a.train_chars) {
        return Err(Failure(format!("--train-chars must be in [1000, 100000000], got {}", a.train_chars)));
    }
    softmax_layer::io::check_output_folder(&a.plot)?;
    let c = corpus(a)?;
    let v = c.symbols.len();
    let feats = Features { vocab: v, buckets: a.buckets, hashes: 2 };
    let d = feats.dim();
    let n_all = c.text.len();
    // The demo holds its features densely: say so rather than exhaust the memory.
    let bytes = (n_all as f64) * (d as f64) * 4.0;
    if bytes > 8e9 {
        return Err(Failure(format!(
            "{n_all} characters with d = {d} features would need {:.1} GB of dense features (at most 8); \
             use fewer characters or --buckets",
            bytes / 1e9
        )));
    }
    let n_train = n_all - n_all / 11;
    println!("softmax-layer demo: a next-character model on {}", c.name);
    println!(
        "  {} characters ({} for training, {} held out), V = {v} symbols, d = {d} hashed n-gram features",
        n_all,
        n_train,
        n_all - n_train
    );
    println!("  sample of the corpus: \"{}\"", show(&c.symbols, &c.text[..90.min(n_all)]));

    // 1. Train the softmax layer (AdamW, warmup + cosine), with a progress bar.
    let x = feats.matrix(&c.text, 0..n_train);
    let y: Vec<i64> = c.text[..n_train].iter().map(|&t| t as i64).collect();
    let xv = MatRef::new(&x, n_train, d)?;
    let cfg = TrainConfig {
        optimizer: Optimizer::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        epochs: Some(a.epochs),
        batch_size: 512,
        lr: 0.05,
        classes: Some(v),
        seed: a.seed,
        precision,
        ..TrainConfig::default()
    };
    println!("\n1. Training (AdamW, batch 512, {} epochs)", a.epochs);
    let mut progress = Progress::new(false);
    // The held-out text is evaluated every epoch, for the loss curve.
    let held = &c.text[n_train..];
    let hx = feats.matrix(&c.text, n_train..n_all);
    let hy: Vec<i64> = held.iter().map(|&t| t as i64).collect();
    let held_data = Data::new(MatRef::new(&hx, held.len(), d)?, &hy)?;
    let out = train_with_heldout(Data::new(xv, &y)?, held_data, &cfg, |e| progress.event(e));
    progress.finish();
    let out = out?;
    let layer = out.model.layer_in(precision)?;

    // 2. Held-out perplexity, beside the truth.
    let hm = out.heldout.expect("a held-out set was given");
    let bits = |nats: f64| nats / std::f64::consts::LN_2;
    println!("\n2. Held-out text ({} characters)", held.len());
    println!(
        "  model:  cross-entropy {:.4} bits/char, perplexity {:.3}, accuracy {:.3}",
        bits(hm.loss),
        hm.perplexity,
        hm.accuracy
    );
    let entropy = c.source.as_ref().map(Source::entropy_rate);
    match (&c.source, entropy) {
        (Some(s), Some(h)) => {
            println!(
                "  source: entropy rate {:.4} bits/char (perplexity {:.3}); its own cross-entropy on this text {:.4} bits/char",
                bits(h),
                h.exp(),
                bits(s.cross_entropy(&c.text[n_train - 2..]))
            );
            println!("  the model is {:.4} bits/char above the best any model can do", bits(hm.loss - h));
        }
        _ => println!("  (the entropy rate of your text is unknown)"),
    }

    // 3. Score candidate continuations of a held-out context.
    let ctx_end = n_train + 200.min(held.len() / 2);
    let context = &c.text[..ctx_end];
    let truth = &c.text[ctx_end..(ctx_end + 30).min(n_all)];
    let mut rng = Rng::new(a.seed ^ 0xFACE);
    let mut shuffled = truth.to_vec();
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, rng.below(i + 1));
    }
    let random: Vec<usize> = (0..truth.len()).map(|_| rng.below(v)).collect();
    let short: Vec<usize> = truth[..truth.len() / 3].to_vec();
    let cands = [
        ("the true continuation", truth.to_vec()),
        ("its letters shuffled", shuffled),
        ("uniform random symbols", random),
        ("the true one, first third", short),
    ];
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut lengths = Vec::new();
    let mut chars = Vec::new();
    for (_, cand) in &cands {
        let mut seq = context.to_vec();
        seq.extend_from_slice(cand);
        rows.extend(feats.matrix(&seq, context.len()..seq.len()));
        targets.extend(cand.iter().map(|&t| t as i64));
        lengths.push(cand.len());
        chars.push(cand.len());
    }
    let opts = ScoreOptions { lengths: Some(&lengths), chars: Some(&chars), ..Default::default() };
    let scores = score_sequences(&layer, MatRef::new(&rows, targets.len(), d)?, &targets, &opts)?;
    let ranking = rank_candidates(&scores);
    println!("\n3. Scoring continuations of \"…{}\"", show(&c.symbols, &context[context.len() - 40..]));
    println!("  {:<28} {:>9} {:>9} {:>9} {:>9}  text", "candidate", "sum", "mean", "per char", "P(cand)");
    for (i, (name, cand)) in cands.iter().enumerate() {
        let s = &scores[i];
        println!(
            "  {:<28} {:>9.2} {:>9.3} {:>9.3} {:>9.4}  \"{}\"",
            name,
            s.sum_logprob,
            s.mean_logprob.unwrap_or(f64::NAN),
            s.logprob_per_char.unwrap_or(f64::NAN),
            ranking.softmax_of_sums[i],
            show(&c.symbols, cand)
        );
    }
    println!(
        "  best by sum: {}; by mean: {} (a sum favours short candidates; compare per character)",
        cands[ranking.by_sum[0]].0, cands[ranking.by_mean[0]].0
    );

    // 4. Sample at several temperatures with top-p 0.9.
    println!("\n4. Sampling 80 characters after the same context (top-p 0.9, seeded)");
    let mut sampler = Sampler::default();
    let mut logits = vec![0f32; v];
    let mut row = vec![0f32; d];
    for t in [0.5f32, 1.0, 1.5] {
        let cfg = SamplerConfig { temperature: t, top_p: Some(0.9), seed: a.seed, ..Default::default() };
        let mut seq = context.to_vec();
        let mut cfg_step = cfg.clone();
        for step in 0..80 {
            let n = seq.len();
            feats.write(seq[n - 2], seq[n - 1], &mut row);
            layer.logits(MatRef::from_row(&row), softmax_layer::MatMut::from_row(&mut logits))?;
            cfg_step.seed = cfg.seed.wrapping_add(step);
            let draw = sampler.sample(&logits, &[], &cfg_step, 1)?;
            seq.push(draw[0].token);
        }
        println!("  T = {t:<4} \"{}\"", show(&c.symbols, &seq[context.len()..]));
    }

    // 5. Memory of the fused loss against materialized logits, measured.
    println!("\n5. Memory: the fused loss with gradients never holds the n × V logits");
    let opts = CrossEntropyOptions::default();
    // Training a classifier needs dW and db only: the fused loss skips dH.
    let (mut gw, mut gb) = (vec![0f32; v * d], vec![0f32; v]);
    let (res, extra) = peak_extra(|| {
        let g = GradientsMut { hidden: None, weight: &mut gw, bias: Some(&mut gb) };
        cross_entropy_with_grad_into(&layer, xv, &y, &opts, Upstream::Scalar(1.0), g)
    });
    res?;
    println!(
        "  this model (n = {n_train}, V = {v}): {:.2} MiB peak extra heap for loss, lse, dW and db; the logits alone would be {:.1} MiB",
        mib(extra),
        mib(n_train * v * 4)
    );
    let (n2, d2, v2) = (1024usize, 256usize, 50257usize);
    let w2: Vec<f32> = (0..v2 * d2).map(|i| ((i * 2654435761) % 1000) as f32 * 1e-4 - 0.05).collect();
    let h2: Vec<f32> = (0..n2 * d2).map(|i| ((i * 40503) % 1000) as f32 * 1e-3 - 0.5).collect();
    let y2: Vec<i64> = (0..n2).map(|i| (i * 7919 % v2) as i64).collect();
    let big = SoftmaxLayer::new(&w2[..], WeightLayout::VocabMajor, v2, d2, None::<&[f32]>)?;
    let t2 = Instant::now();
    let (res, extra2) =
        peak_extra(|| cross_entropy_with_grad(&big, MatRef::new(&h2, n2, d2)?, &y2, &opts, Upstream::Scalar(1.0)));
    res?;
    let grads2 = (n2 * d2 + v2 * d2) * 4;
    println!(
        "  a GPT-2-sized head (n = {n2}, d = {d2}, V = {v2}): {:.1} MiB peak extra heap beyond the {:.1} MiB of gradients it returns; materialized logits and their gradient would be {:.1} MiB ({:.2} s)",
        mib(extra2.saturating_sub(grads2)),
        mib(grads2),
        mib(2 * n2 * v2 * 4),
        t2.elapsed().as_secs_f64()
    );

    // 6. The loss curve.
    let mut refs = Vec::new();
    if let Some(h) = entropy {
        refs.push(("source entropy rate", h));
    }
    let svg = plot_history(&out, "softmax-layer demo: next-character training", &refs);
    write_atomic(&a.plot, svg.as_bytes())?;
    println!("\n6. Loss curve: {}", a.plot.display());
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn mib(b: usize) -> f64 {
    b as f64 / (1 << 20) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_rate_matches_the_empirical_cross_entropy_of_long_text() {
        let s = Source::new(3);
        let h = s.entropy_rate();
        let text = s.generate(400_000, 9);
        let emp = s.cross_entropy(&text);
        // The sample mean of −log p over 400k characters is within a few 1e-3 of the rate.
        assert!((emp - h).abs() < 0.01, "entropy rate {h} vs empirical {emp}");
        assert!(h > 0.5 && h < 2.5, "{h}");
        for a in 0..27 {
            for b in 0..27 {
                assert!((s.row(a, b).iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn features_are_one_hot_blocks() {
        let f = Features { vocab: 27, buckets: 200, hashes: 2 };
        let x = f.matrix(&[3, 5, 7], 0..3);
        let d = f.dim();
        assert_eq!(x.len(), 3 * d);
        // Row 0 has no context but the hashed (none, none) pair; row 2 has all three.
        assert_eq!(x[..d].iter().sum::<f32>(), 2.0);
        assert_eq!(x[2 * d..].iter().sum::<f32>(), 4.0);
        assert_eq!(x[2 * d + 5], 1.0);
        assert_eq!(x[2 * d + 27 + 3], 1.0);
    }
}
