//! `rank-prob` and `fit-pl`: Plackett–Luce on the command line.

use crate::Failure;
use softmax_layer::io::{Tensor, TensorSpec, write_atomic, write_npy_f32};
use softmax_layer::rank::{FitOptions, fit, log_prob};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct RankProbArgs {
    /// Scores of the m items, [m]: FILE.npy or FILE.safetensors:NAME.
    #[arg(long, value_name = "S")]
    scores: String,
    /// The ranking, best first: integer item ids [k], a full (k = m) or top-k ranking.
    #[arg(long, value_name = "R")]
    ranking: String,
    /// Output .json: {"logprob": x}.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    output: PathBuf,
}

#[derive(clap::Args)]
pub struct FitPlArgs {
    /// A text file with one ranking per line: item ids separated by spaces, best first.
    /// Each line ranks the items it lists; m is the largest id + 1.
    #[arg(long, value_name = "FILE")]
    rankings: PathBuf,
    /// L2 penalty α/2·‖θ‖² on the log-strengths (0: pure maximum likelihood).
    #[arg(long, value_name = "A", default_value_t = 0.0, allow_hyphen_values = true)]
    l2: f64,
    /// Output .npy: the log-strengths [m], f32.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    output: PathBuf,
}

fn load(spec: &str) -> Result<Tensor, Failure> {
    Ok(Tensor::load(&TensorSpec::parse(spec)?)?)
}

pub fn rank_prob(a: &RankProbArgs) -> Result<(), Failure> {
    let s = load(&a.scores)?;
    if s.shape.len() != 1 {
        return Err(Failure(format!("{}: scores must be 1-D [m], got shape {:?}", s.source, s.shape)));
    }
    let r = load(&a.ranking)?;
    if r.shape.len() != 1 {
        return Err(Failure(format!("{}: the ranking must be 1-D [k], got shape {:?}", r.source, r.shape)));
    }
    let scores = s.to_f32()?;
    let ids = r.to_i64()?;
    let ranking: Vec<usize> = ids
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            usize::try_from(x).map_err(|_| {
                Failure(format!("{}: ranking[{i}] = {x} is not an item (there are {} items)", r.source, scores.len()))
            })
        })
        .collect::<Result<_, _>>()?;
    let lp = log_prob(&scores, &ranking).map_err(|e| match e {
        // The scores' entry, in the file that holds it.
        e @ softmax_layer::Error::NonFiniteEntry { .. } => Failure(format!("{}: {e}", s.source)),
        e => Failure(format!("{}: {e}", r.source)),
    })?;
    write_atomic(&a.output, format!("{{\"logprob\": {lp}}}\n").as_bytes())?;
    Ok(())
}

pub fn fit_pl(a: &FitPlArgs) -> Result<(), Failure> {
    if !(a.l2.is_finite() && a.l2 >= 0.0) {
        return Err(Failure(format!("--l2 must be finite and >= 0, got {}", a.l2)));
    }
    let path = a.rankings.display();
    let text = std::fs::read_to_string(&a.rankings).map_err(|e| Failure(format!("{path}: {e}")))?;
    let mut rankings = Vec::new();
    for (no, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Vec<usize> = line
            .split_whitespace()
            .map(|tok| {
                tok.parse::<usize>().map_err(|_| Failure(format!("{path}:{}: '{tok}' is not an item id", no + 1)))
            })
            .collect::<Result<_, _>>()?;
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = r.iter().find(|&&x| !seen.insert(x)) {
            return Err(Failure(format!("{path}:{}: item {dup} appears twice in one ranking", no + 1)));
        }
        rankings.push(r);
    }
    if rankings.is_empty() {
        return Err(Failure(format!("{path}: the file holds no rankings")));
    }
    let f =
        fit(&rankings, &FitOptions { l2: a.l2, ..Default::default() }).map_err(|e| Failure(format!("{path}: {e}")))?;
    let theta: Vec<f32> = f.log_strengths.iter().map(|&t| t as f32).collect();
    write_npy_f32(&a.output, &[theta.len()], &theta)?;
    Ok(())
}
