//! `softmax-layer`: the command line, a thin layer over the library.
//!
//! Every failure prints one line on stderr and exits with status 2.

// Counts heap bytes (current and peak) so that `demo` can report the fused loss's memory.
#[path = "../../../benches/support/alloc.rs"]
mod alloc;
// Timing, data and the plain-read baseline for `selfcheck`, shared with the benches.
#[path = "../../../benches/support/data.rs"]
mod data;
mod demo;
mod layer;
mod plot;
mod rank;
#[path = "../../../benches/support/read.rs"]
mod read;
mod rows;
mod selfcheck;
mod train;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

#[derive(Parser)]
#[command(
    name = "softmax-layer",
    version,
    about = "The parameterized softmax layer softmax(H·Wᵀ + b): exact, fast, memory-frugal"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job, on built-in data: trains a next-character model (a softmax layer over
    /// hashed n-gram features) with a progress bar, prints held-out perplexity beside the
    /// source's true entropy rate, scores and samples continuations, measures the fused
    /// loss's memory, and writes the loss curve.
    Demo(demo::DemoArgs),
    /// Softmax of each row of the logits, written as f32 .npy.
    Softmax(rows::RowArgs),
    /// Log-softmax of each row of the logits, written as f32 .npy.
    LogSoftmax(rows::RowArgs),
    /// Logsumexp of each row, from --logits or fused from --hidden and --weight; f32 .npy [n].
    Logsumexp(LogsumexpArgs),
    /// The logits H·Wᵀ + b, f32 .npy [n, V].
    Logits(layer::LayerArgs),
    /// softmax((H·Wᵀ + b) / T), f32 .npy [n, V].
    Probs(layer::LayerArgs),
    /// log_softmax((H·Wᵀ + b) / T), f32 .npy [n, V]; with --targets, only the targets'
    /// log-probabilities, [n], without materializing the logits.
    LogProbs(LogProbsArgs),
    /// The most probable class of each row (lowest id on ties), int64 .npy [n].
    Argmax(layer::LayerArgs),
    /// Fused cross-entropy (PyTorch semantics) of softmax(H·Wᵀ + b) against targets: a
    /// .safetensors with `loss` and `lse`; with --grad also `grad_hidden`, `grad_weight` (in
    /// W's layout) and, with --bias, `grad_bias`.
    Loss(layer::LossArgs),
    /// The k most probable classes of each row: a .safetensors with `values` (log-probs,
    /// f32 [n, k], descending) and `indices` (int64 [n, k]; ties to the lower id).
    TopK(TopKArgs),
    /// Scores target tokens (aligned, or --shifted for causal LMs) per sequence: one JSON
    /// object per sequence with sum/mean log-probability, perplexity, greediness, and tokens.
    Score(layer::ScoreArgs),
    /// One seeded decoding step per hidden row through the sampler chain (penalties,
    /// temperature, top-k, top-p, min-p, typical-p): one JSON line per row.
    Sample(layer::SampleArgs),
    /// The Plackett–Luce log-probability of a (full or top-k) ranking under softmax scores:
    /// writes {"logprob": x}.
    RankProb(rank::RankProbArgs),
    /// Fits Plackett–Luce log-strengths to rankings (one per line, best first) by maximum
    /// likelihood, or with an L2 prior; writes f32 .npy [m].
    FitPl(rank::FitPlArgs),
    /// Fits a softmax layer (multinomial logistic regression, or an LM head over fixed
    /// hidden states) with L-BFGS, AdamW or SGD; writes `weight` [K, d] and `bias` [K] and a
    /// loss-curve SVG.
    Train(train::TrainArgs),
    /// Class probabilities [n, K] of a trained model, f32 .npy.
    Predict(train::PredictArgs),
    /// Checks the row kernels against float64 on built-in data and prints their
    /// throughput next to a plain copy and a plain read of the same bytes.
    Selfcheck(selfcheck::SelfcheckArgs),
}

#[derive(clap::Args)]
struct LogProbsArgs {
    #[command(flatten)]
    layer: layer::LayerArgs,
    /// Target class ids, int32 or int64 .npy [n]: write their log-probabilities only.
    #[arg(long, value_name = "Y")]
    targets: Option<String>,
}

#[derive(clap::Args)]
struct TopKArgs {
    #[command(flatten)]
    layer: layer::LayerArgs,
    /// How many classes per row, in [1, V].
    #[arg(long, value_name = "K", allow_hyphen_values = true)]
    k: usize,
}

#[derive(clap::Args)]
struct LogsumexpArgs {
    /// Logits [n, V] (or [V]): FILE.npy or FILE.safetensors:NAME.
    #[arg(long, value_name = "L", required_unless_present = "hidden", conflicts_with = "hidden")]
    logits: Option<String>,
    /// Hidden states [n, d], with --weight: the fused layer logsumexp.
    #[arg(long, value_name = "H", requires = "weight")]
    hidden: Option<String>,
    /// Weights [V, d] (vd) or [d, V] (dv).
    #[arg(long, value_name = "W", requires = "hidden")]
    weight: Option<String>,
    /// Bias [V] (with --hidden).
    #[arg(long, value_name = "B", requires = "hidden")]
    bias: Option<String>,
    /// `vd` or `dv` (with --hidden).
    #[arg(long, value_name = "vd|dv", default_value = "vd", conflicts_with = "logits")]
    weight_layout: String,
    /// Product precision (with --hidden): f32, bf16 or bf16x3.
    #[arg(long, value_name = "f32|bf16|bf16x3", default_value = "f32", conflicts_with = "logits")]
    precision: String,
    /// Additive mask (with --logits).
    #[arg(long, value_name = "M", conflicts_with = "hidden")]
    mask: Option<String>,
    /// Divide the logits by T (finite, > 0).
    #[arg(long, value_name = "T", default_value_t = 1.0, allow_hyphen_values = true, value_parser = crate::temperature_arg)]
    temperature: f32,
    /// Output .npy file (f32 [n]).
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    output: std::path::PathBuf,
}

fn logsumexp(a: LogsumexpArgs) -> Result<(), Failure> {
    match (a.logits, a.hidden, a.weight) {
        (Some(logits), _, _) => rows::run(
            rows::Op::Logsumexp,
            &rows::RowArgs { logits, temperature: a.temperature, mask: a.mask, output: a.output },
        ),
        (None, Some(hidden), Some(weight)) => layer::run(
            layer::LayerOp::Logsumexp,
            &layer::LayerArgs {
                model: layer::ModelArgs {
                    hidden,
                    weight,
                    bias: a.bias,
                    weight_layout: a.weight_layout,
                    precision: a.precision,
                },
                temperature: a.temperature,
                output: a.output,
            },
            None,
            None,
        ),
        _ => Err(Failure("logsumexp needs --logits L, or --hidden H with --weight W".into())),
    }
}

/// `--temperature`: finite and > 0, with `2 / T` finite in `f32`; the error quotes the
/// value as typed (`1e-46` is not "0", although it rounds to 0 in `f32`).
pub fn temperature_arg(s: &str) -> Result<f32, String> {
    let t: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(t.is_finite() && t > 0.0) {
        return Err(format!("the temperature must be finite and > 0, got {s}"));
    }
    let t32 = t as f32;
    if t32.is_infinite() {
        return Err(format!("the temperature {s} is beyond the f32 range (at most {:e})", f32::MAX));
    }
    softmax_layer::check_temperature(t32).map_err(|_| {
        format!(
            "the temperature {s} is too small: 2/T overflows f32 (the least allowed is {:e})",
            softmax_layer::MIN_TEMPERATURE
        )
    })?;
    Ok(t32)
}

/// The file of a tensor argument (`FILE.npy` or `FILE.safetensors:NAME`).
fn spec_file(spec: &str) -> std::path::PathBuf {
    match spec.rsplit_once(':') {
        Some((file, _)) if file.ends_with(".safetensors") => file.into(),
        _ => spec.into(),
    }
}

/// Whether two paths name the same file (by their absolute forms, or by the file itself
/// when both exist: links and `..` included).
pub fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
    }
}

/// A command's values as clap parsed them (defaults included): its outputs (`--output`,
/// `--plot`) with their flags, and every other value. Flags without a value are left out.
fn arg_values(def: &clap::Command, m: &clap::ArgMatches) -> (Vec<(String, String)>, Vec<String>) {
    let (mut outs, mut vals) = (Vec::new(), Vec::new());
    for arg in def.get_arguments().filter(|a| a.get_action().takes_values()) {
        let id = arg.get_id().as_str();
        let Ok(Some(raw)) = m.try_get_raw(id) else { continue };
        for v in raw.map(|v| v.to_string_lossy().into_owned()) {
            match arg.get_long().filter(|l| matches!(*l, "output" | "plot")) {
                Some(long) => outs.push((format!("--{long}"), v)),
                None => vals.push(v),
            }
        }
    }
    (outs, vals)
}

/// An output (`--output`, `--plot`) that names an existing file given as an input of the
/// same command (`--text F --plot F`, `--model M -o M`, …): the line to report, before
/// any work, instead of replacing the input.
fn output_over_input(outs: &[(String, String)], vals: &[String]) -> Option<String> {
    for (flag, out) in outs {
        let out_path = std::path::Path::new(out);
        if !out_path.exists() {
            continue;
        }
        for v in vals {
            let f = spec_file(v);
            if f.is_file() && same_file(out_path, &f) {
                return Some(format!("{flag} {out} would overwrite the input {v}"));
            }
        }
    }
    None
}

/// An output named `.npy` for a command that writes `.safetensors`, or the other way round:
/// the file would not read back as its name says.
fn output_kind_mismatch(cmd: &str, outs: &[(String, String)]) -> Option<String> {
    let writes = match cmd {
        "softmax" | "log-softmax" | "logsumexp" | "logits" | "probs" | "log-probs" | "argmax" | "fit-pl"
        | "predict" => "npy",
        "loss" | "top-k" | "train" => "safetensors",
        _ => return None,
    };
    let out = &outs.iter().find(|(flag, _)| flag == "--output")?.1;
    let ext = std::path::Path::new(out).extension()?.to_str()?.to_ascii_lowercase();
    let other = if writes == "npy" { "safetensors" } else { "npy" };
    (ext == other).then(|| format!("{cmd} writes a .{writes} file, but the output {out} is named .{other}"))
}

/// Reports a command line clap refused (or help asked for) and returns the exit status.
fn usage(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    // Keep usage errors to one line, like every other failure. A first line that ends in
    // ':' introduces indented lines (the missing arguments): they join it.
    let text = e.render().to_string();
    let mut lines = text.lines().skip_while(|l| l.trim().is_empty());
    let mut line = lines.next().unwrap_or("invalid arguments").trim_start_matches("error: ").to_string();
    if line.ends_with(':') {
        let more: Vec<&str> = lines.take_while(|l| l.starts_with(' ') && !l.trim().is_empty()).map(str::trim).collect();
        line = format!("{line} {}", more.join(", "));
    }
    eprintln!("softmax-layer: {line}");
    ExitCode::from(2)
}

/// A failure: the one line printed on stderr.
pub struct Failure(pub String);

/// A zeroed output buffer of `rows x cols` floats, or a clear failure when it cannot be
/// had (instead of an abort on a huge allocation).
pub fn output_buffer(rows: usize, cols: usize, what: &str) -> Result<Vec<f32>, Failure> {
    let n = rows.checked_mul(cols).ok_or_else(|| Failure(format!("the {what} [{rows}, {cols}] is too large")))?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Failure(format!("cannot allocate {:.1} GB for the {what} [{rows}, {cols}]", n as f64 * 4.0 / 1e9))
    })?;
    v.resize(n, 0f32);
    Ok(v)
}

impl From<softmax_layer::Error> for Failure {
    fn from(e: softmax_layer::Error) -> Self {
        Failure(e.to_string())
    }
}

/// Restores the default action of SIGPIPE (Rust ignores it), so that output into a closed
/// pipe (`… | head -1`) ends the process quietly, as it does any Unix tool, instead of making
/// `println!` panic.
#[cfg(unix)]
fn default_sigpipe() {
    unsafe extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: `signal` is the C library's, called once at start-up before any thread exists,
    // with a valid signal number (13 is SIGPIPE on Linux and the BSDs) and SIG_DFL.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

fn main() -> ExitCode {
    #[cfg(unix)]
    default_sigpipe();
    let def = Cli::command();
    let matches = match def.clone().try_get_matches() {
        Ok(m) => m,
        Err(e) => return usage(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage(e),
    };
    // The library ignores an unknown or unavailable forced bf16 path; here that is a typo to
    // report, not a setting to drop silently.
    if let Ok(v) = std::env::var(softmax_layer::bf16::PATH_ENV) {
        let msg = match softmax_layer::bf16::BfPath::parse(&v) {
            None => Some(format!("must be amx, avx512bf16 or portable, got '{v}'")),
            Some(p) => p.check().err().map(|e| e.to_string()),
        };
        if let Some(msg) = msg {
            eprintln!("softmax-layer: error: {}: {msg}", softmax_layer::bf16::PATH_ENV);
            return ExitCode::from(2);
        }
    }
    if let Some((name, sub)) = matches.subcommand()
        && let Some(sub_def) = def.find_subcommand(name)
    {
        let (outs, vals) = arg_values(sub_def, sub);
        if let Some(msg) = output_over_input(&outs, &vals).or_else(|| output_kind_mismatch(name, &outs)) {
            eprintln!("softmax-layer: error: {msg}");
            return ExitCode::from(2);
        }
    }
    let result = match cli.command {
        Command::Softmax(a) => rows::run(rows::Op::Softmax, &a),
        Command::LogSoftmax(a) => rows::run(rows::Op::LogSoftmax, &a),
        Command::Logsumexp(a) => logsumexp(a),
        Command::Logits(a) => layer::run(layer::LayerOp::Logits, &a, None, None),
        Command::Probs(a) => layer::run(layer::LayerOp::Probs, &a, None, None),
        Command::LogProbs(a) => layer::run(layer::LayerOp::LogProbs, &a.layer, a.targets.as_deref(), None),
        Command::Argmax(a) => layer::run(layer::LayerOp::Argmax, &a, None, None),
        Command::Loss(a) => layer::loss(&a),
        Command::TopK(a) => layer::run(layer::LayerOp::TopK, &a.layer, None, Some(a.k)),
        Command::Selfcheck(a) => selfcheck::run(&a),
        Command::RankProb(a) => rank::rank_prob(&a),
        Command::Score(a) => layer::score(&a),
        Command::Sample(a) => layer::sample(&a),
        Command::FitPl(a) => rank::fit_pl(&a),
        Command::Demo(a) => demo::run(&a),
        Command::Train(a) => train::run_train(&a),
        Command::Predict(a) => train::run_predict(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("softmax-layer: error: {msg}");
            ExitCode::from(2)
        }
    }
}
