//! `train` and `predict`: fitting a softmax layer on features and labels, and using it.

use crate::layer::parse_precision;
use crate::plot::{Series, svg};
use crate::{Failure, same_file};
use indicatif::{ProgressBar, ProgressStyle};
use softmax_layer::io::{CsvTable, Tensor, TensorSpec, check_output_folder, read_csv, write_atomic, write_npy_f32};
use softmax_layer::train::{Checkpointing, Data, Event, Model, Optimizer, TrainConfig, TrainOutput, train};
use softmax_layer::{Error, MatRef};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the training rows come from.
#[derive(clap::Args)]
pub struct DataArgs {
    /// A CSV file with a header row; every column but the label column is a feature.
    #[arg(long, value_name = "FILE.csv", conflicts_with = "features")]
    pub data: Option<PathBuf>,
    /// The label column of --data.
    #[arg(long, value_name = "NAME", requires = "data")]
    pub label_column: Option<String>,
    /// Features [n, d]: FILE.npy or FILE.safetensors:NAME (LM heads: the hidden states).
    #[arg(long, value_name = "X")]
    pub features: Option<String>,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Class ids [n], .npy or .safetensors:NAME: integers, or floats that are whole numbers
    /// (LM heads: the next-token ids).
    #[arg(long, value_name = "Y", requires = "features")]
    pub labels: Option<String>,
    /// lbfgs (full batch, to convergence), adamw or sgd (mini-batches).
    #[arg(long, value_name = "NAME", default_value = "lbfgs")]
    pub optimizer: String,
    /// λ of the L2 penalty (λ/2)·‖W‖² on the mean loss; scikit-learn's C = 1/(λ·n).
    #[arg(long, value_name = "λ", default_value_t = 0.0, allow_hyphen_values = true)]
    pub l2: f32,
    /// Epochs (L-BFGS: the most iterations; default until convergence). Default 10 for adamw/sgd.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub epochs: Option<usize>,
    /// Rows per mini-batch.
    #[arg(long, value_name = "B", default_value_t = 256, allow_hyphen_values = true)]
    pub batch: usize,
    /// Peak learning rate (adamw, sgd). Default 0.01 for adamw, 0.1 for sgd.
    #[arg(long, value_name = "LR", allow_hyphen_values = true)]
    pub lr: Option<f32>,
    /// Momentum (sgd).
    #[arg(long, value_name = "μ", default_value_t = 0.9, allow_hyphen_values = true)]
    pub momentum: f32,
    /// Decoupled weight decay (adamw; the bias is not decayed). The default is PyTorch's and
    /// the library's, `Optimizer::adamw()`.
    #[arg(long, value_name = "WD", default_value_t = 0.01, allow_hyphen_values = true)]
    pub weight_decay: f32,
    /// Warmup as a fraction of all steps, before the cosine decay.
    #[arg(long, value_name = "F", default_value_t = 0.05, allow_hyphen_values = true)]
    pub warmup: f32,
    /// Where the cosine decay ends, as a fraction of --lr (in [0, 1]).
    #[arg(long, value_name = "R", default_value_t = 0.0, allow_hyphen_values = true)]
    pub min_lr_ratio: f32,
    /// Clip the gradient to this global norm.
    #[arg(long, value_name = "NORM", allow_hyphen_values = true)]
    pub clip: Option<f32>,
    /// Tolerance on the largest gradient entry (lbfgs).
    #[arg(long, value_name = "TOL", default_value_t = 1e-5, allow_hyphen_values = true)]
    pub tol: f64,
    /// Stop L-BFGS once the objective is at most this.
    #[arg(long, value_name = "J", hide = true, allow_hyphen_values = true)]
    pub target_objective: Option<f64>,
    /// Hold out this fraction of rows, evaluated every epoch.
    #[arg(long, value_name = "F", default_value_t = 0.0, allow_hyphen_values = true)]
    pub holdout: f32,
    /// Stop when the held-out loss has not improved for N epochs, keeping the best model.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub patience: Option<usize>,
    /// Number of classes K (default: the largest label + 1).
    #[arg(long, value_name = "K", allow_hyphen_values = true)]
    pub classes: Option<usize>,
    /// Seed of the mini-batch shuffles and the held-out split.
    #[arg(long, value_name = "S", default_value_t = 0, allow_hyphen_values = true)]
    pub seed: u64,
    /// Folder for checkpoints.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// Write a checkpoint every N epochs.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "checkpoint", allow_hyphen_values = true)]
    pub checkpoint_every: usize,
    /// Continue from the latest checkpoint in --checkpoint (from scratch when there is none).
    #[arg(long, requires = "checkpoint")]
    pub resume: bool,
    /// The loss-curve plot (SVG); default: next to the model, OUT.loss.svg.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Print the summary as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Precision of the layer's products (loss, gradients, metrics): f32, bf16 or bf16x3.
    /// The optimizer's state and updates stay f32 (f64 for L-BFGS).
    #[arg(long, value_name = "f32|bf16|bf16x3", default_value = "f32")]
    pub precision: String,
    /// The model: a .safetensors with `weight` [K, d] and `bias` [K].
    #[arg(short = 'o', long = "output", value_name = "MODEL")]
    pub output: PathBuf,
}

#[derive(clap::Args)]
pub struct PredictArgs {
    /// A model written by `train`.
    #[arg(long, value_name = "MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Precision of the product: f32, bf16 or bf16x3.
    #[arg(long, value_name = "f32|bf16|bf16x3", default_value = "f32")]
    pub precision: String,
    /// Probabilities [n, K], f32 .npy.
    #[arg(short = 'o', long = "output", value_name = "PROBS.npy")]
    pub output: PathBuf,
}

/// Features and optional labels, from CSV or tensor files.
struct Loaded {
    x: Features,
    n: usize,
    d: usize,
    y: Option<Vec<i64>>,
    /// The feature columns' names (from a CSV header).
    names: Option<Vec<String>>,
}

/// The model file's metadata key for the names of the features it was trained on, written
/// as one CSV record.
const FEATURE_NAMES: &str = "feature_names";

fn names_to_record(names: &[String]) -> Result<String, Failure> {
    let mut w = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(Vec::new());
    w.write_record(names).map_err(|e| Failure(format!("feature names: {e}")))?;
    let bytes = w.into_inner().map_err(|e| Failure(format!("feature names: {e}")))?;
    Ok(String::from_utf8_lossy(&bytes).trim_end_matches('\n').to_string())
}

fn record_to_names(text: &str) -> Option<Vec<String>> {
    let mut r = csv::ReaderBuilder::new().has_headers(false).from_reader(text.as_bytes());
    r.records().next()?.ok().map(|rec| rec.iter().map(str::to_string).collect())
}

/// The CSV's feature columns reordered to the model's, matched by name: every column the
/// model was trained on must be there, and no other (besides the label column).
fn match_columns(data: &mut Loaded, want: &[String], source: &Path, model: &Path) -> Result<(), Failure> {
    let have = data.names.as_deref().unwrap_or_default();
    let perm: Vec<usize> = want
        .iter()
        .map(|name| {
            have.iter().position(|h| h == name).ok_or_else(|| {
                Failure(format!(
                    "{}: no column '{name}', which the model {} was trained on (it has: {})",
                    source.display(),
                    model.display(),
                    have.join(", ")
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    if let Some(extra) = have.iter().find(|h| !want.contains(h)) {
        return Err(Failure(format!(
            "{}: column '{extra}' is not a feature of the model {} (its features: {}); name it --label-column or drop it",
            source.display(),
            model.display(),
            want.join(", ")
        )));
    }
    if perm.iter().enumerate().all(|(i, &j)| i == j) {
        return Ok(());
    }
    let x = data.x.as_slice();
    let mut out = Vec::with_capacity(data.n * want.len());
    for row in x.chunks_exact(data.d.max(1)).take(data.n) {
        out.extend(perm.iter().map(|&j| row[j]));
    }
    data.x = Features::Owned(out);
    data.d = want.len();
    Ok(())
}

fn load_tensor(spec: &str) -> Result<Tensor, Failure> {
    Ok(Tensor::load(&TensorSpec::parse(spec)?)?)
}

/// The features: read from CSV or converted, or f32 in the tensor file as loaded (no copy).
enum Features {
    Owned(Vec<f32>),
    Tensor(Tensor),
}

impl Features {
    fn as_slice(&self) -> &[f32] {
        match self {
            Features::Owned(v) => v,
            Features::Tensor(t) => t.as_f32().expect("kept as a tensor only when it holds f32 in C order"),
        }
    }
}

fn load_data(a: &DataArgs, labels: Option<&str>, need_labels: bool) -> Result<Loaded, Failure> {
    if let Some(path) = &a.data {
        if labels.is_some() {
            return Err(Failure(
                "--labels goes with --features; with --data the labels are --label-column NAME".into(),
            ));
        }
        if need_labels && a.label_column.is_none() {
            return Err(Failure("--data needs --label-column NAME to train".into()));
        }
        let CsvTable { features, rows, cols, labels, feature_names } = read_csv(path, a.label_column.as_deref())?;
        return Ok(Loaded { x: Features::Owned(features), n: rows, d: cols, y: labels, names: Some(feature_names) });
    }
    let Some(fx) = &a.features else {
        return Err(Failure("give the data: --data FILE.csv or --features X".into()));
    };
    if a.label_column.is_some() {
        return Err(Failure(
            "--label-column goes with --data FILE.csv; with --features the labels are --labels Y".into(),
        ));
    }
    let t = load_tensor(fx)?;
    let (n, d) = match t.shape[..] {
        [n, d] => (n, d),
        _ => return Err(Failure(format!("{}: features must be [n, d], got {:?}", t.source, t.shape))),
    };
    let source = t.source.clone();
    let x = if t.as_f32().is_some() { Features::Tensor(t) } else { Features::Owned(t.to_f32()?.into_owned()) };
    let y = match labels {
        None if need_labels => return Err(Failure("--features needs --labels Y to train".into())),
        None => None,
        Some(spec) => {
            let ty = load_tensor(spec)?;
            let y = if ty.dtype.name().starts_with('f') {
                // Float labels are accepted when they are whole numbers, as in a CSV ("2.0").
                let v = ty.to_f64()?;
                if let Some(i) = v.iter().position(|x| x.fract() != 0.0 || !x.is_finite() || x.abs() >= 2f64.powi(63)) {
                    return Err(Failure(format!("{}: label [{i}] = {} is not an integer class id", ty.source, v[i])));
                }
                v.iter().map(|&x| x as i64).collect()
            } else {
                ty.to_i64()?
            };
            if ty.shape.len() != 1 {
                return Err(Failure(format!("{}: labels must be [n], got {:?}", ty.source, ty.shape)));
            }
            if y.len() != n {
                return Err(Failure(format!(
                    "{}: labels have length {}, but the features {} have n = {n} rows",
                    ty.source,
                    y.len(),
                    source
                )));
            }
            if let Some(i) = y.iter().position(|&v| v < 0) {
                return Err(Failure(format!(
                    "{}: label [{i}] = {} is negative; labels are class ids",
                    ty.source, y[i]
                )));
            }
            Some(y)
        }
    };
    Ok(Loaded { x, n, d, y, names: None })
}

/// Progress on stderr: a bar on a terminal, plain lines otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    first_step: usize,
    total: usize,
    lbfgs: bool,
    last_message: Instant,
}

impl Progress {
    pub fn new(lbfgs: bool) -> Progress {
        Progress { bar: None, started: Instant::now(), first_step: 0, total: 0, lbfgs, last_message: Instant::now() }
    }

    fn say(&mut self, line: String) {
        match &self.bar {
            Some(b) => b.println(&line),
            None => eprintln!("{line}"),
        }
    }

    pub fn event(&mut self, e: Event<'_>) {
        match e {
            Event::Start { total_steps, first_step, rows, heldout_rows } => {
                self.first_step = first_step;
                self.total = total_steps;
                self.started = Instant::now();
                if std::io::stderr().is_terminal() {
                    // L-BFGS runs until it converges: a counter, not a bar with a false end.
                    let (b, template) = if self.lbfgs {
                        (ProgressBar::new_spinner(), "{spinner} iteration {pos}  {msg}  {elapsed}")
                    } else {
                        (ProgressBar::new(total_steps as u64), "{bar:32.cyan/blue} {pos}/{len} steps  {msg}  ETA {eta}")
                    };
                    b.set_style(
                        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    b.set_position(first_step as u64);
                    self.bar = Some(b);
                }
                let what = if self.lbfgs { "iterations at most" } else { "steps" };
                self.say(format!("training on {rows} rows ({heldout_rows} held out), {total_steps} {what}"));
            }
            Event::Step { step, objective, .. } => {
                if let Some(b) = &self.bar {
                    b.set_position(step as u64);
                    // Steps can be many thousands a second: refresh the text at most 20 times a second.
                    if self.last_message.elapsed().as_millis() >= 50 || step == self.total {
                        self.last_message = Instant::now();
                        let rate = (step - self.first_step) as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
                        let what = if self.lbfgs { "objective" } else { "loss" };
                        b.set_message(format!("{rate:.0} steps/s  {what} {objective:.6}"));
                    }
                }
            }
            Event::Epoch(r) => {
                let secs = self.started.elapsed().as_secs_f64();
                let held = r.heldout.map_or(String::new(), |m| {
                    format!("  held-out loss {:.5} accuracy {:.4} perplexity {:.3}", m.loss, m.accuracy, m.perplexity)
                });
                let unit = if self.lbfgs { "iteration" } else { "epoch" };
                // L-BFGS iterations are many and quick: every tenth, without a bar.
                if !self.lbfgs || (self.bar.is_none() && r.epoch % 10 == 0) {
                    self.say(format!("{unit} {:>4}  objective {:.6}{held}  ({secs:.1} s)", r.epoch, r.train_objective));
                }
            }
            Event::Checkpoint(p) => {
                if self.bar.is_none() && !self.lbfgs {
                    self.say(format!("checkpoint {}", p.display()));
                }
            }
            Event::Resumed { path, epoch } => {
                self.say(format!("resumed from {} (after epoch {epoch})", path.display()))
            }
            // (The reason names the file.)
            Event::SkippedCheckpoint { reason, .. } => {
                self.say(format!("warning: skipped a damaged checkpoint (an older one is tried): {reason}"))
            }
            Event::EarlyStop { epoch, best_epoch } => {
                self.say(format!("early stop at epoch {epoch}: the held-out loss was best at epoch {best_epoch}"))
            }
            Event::Converged { iterations, max_gradient, tolerance_met: true, evaluations } => self.say(format!(
                "converged after {iterations} iterations, {evaluations} evaluations of the loss and gradient \
                 (largest gradient entry {max_gradient:.2e})"
            )),
            Event::Converged { iterations, max_gradient, tolerance_met: false, evaluations } => self.say(format!(
                "stopped after {iterations} iterations, {evaluations} evaluations, NOT converged: no step along \
                 the search direction lowers the objective measurably, yet the largest gradient entry is \
                 {max_gradient:.2e} (above --tol); the problem may be badly scaled (a very large --l2?)"
            )),
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// The loss curve of a run: objective per step, held-out loss per epoch.
pub fn plot_history(out: &TrainOutput, title: &str, refs: &[(&str, f64)]) -> String {
    let steps_per_epoch = out.step_objectives.len() as f64 / out.history.len().max(1) as f64;
    // Mini-batch objectives are noisy and many: plot means over at most 400 buckets.
    let s = &out.step_objectives;
    let bucket = s.len().div_ceil(400).max(1);
    let train: Vec<(f64, f64)> = s
        .chunks(bucket)
        .enumerate()
        .map(|(i, c)| ((i * bucket + c.len()) as f64 / steps_per_epoch, c.iter().sum::<f64>() / c.len() as f64))
        .collect();
    let held: Vec<(f64, f64)> =
        out.history.iter().filter_map(|r| r.heldout.map(|m| (r.epoch as f64, m.loss))).collect();
    let mut series = vec![Series { name: "training objective", color: "#1f77b4", points: train }];
    if !held.is_empty() {
        series.push(Series { name: "held-out loss", color: "#d62728", points: held });
    }
    svg(title, "epoch", "nats per row", &series, refs)
}

pub fn run_train(a: &TrainArgs) -> Result<(), Failure> {
    let optimizer = match a.optimizer.as_str() {
        "lbfgs" => Optimizer::Lbfgs { history: 10, tolerance: a.tol },
        "adamw" => Optimizer::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: a.weight_decay },
        "sgd" => Optimizer::Sgd { momentum: a.momentum },
        o => return Err(Failure(format!("--optimizer must be lbfgs, adamw or sgd, got '{o}'"))),
    };
    if a.optimizer == "lbfgs" && a.lr.is_some() {
        return Err(Failure("--lr applies to adamw and sgd; L-BFGS chooses its own steps".into()));
    }
    if a.checkpoint_every == 0 {
        return Err(Failure("--checkpoint-every must be at least 1 (epochs)".into()));
    }
    if !(0.0..=1.0).contains(&a.min_lr_ratio) {
        return Err(Failure(format!("--min-lr-ratio must be in [0, 1], got {}", a.min_lr_ratio)));
    }
    let precision = parse_precision(&a.precision)?;
    let data = load_data(&a.data, a.labels.as_deref(), true)?;
    let metadata = match &data.names {
        Some(names) => Some([(FEATURE_NAMES.to_string(), names_to_record(names)?)].into()),
        None => None,
    };
    let labels = data.y.as_deref().expect("labels are required");
    let x = MatRef::new(data.x.as_slice(), data.n, data.d)?;
    let lr = a.lr.unwrap_or(if a.optimizer == "sgd" { 0.1 } else { 0.01 });
    let cfg = TrainConfig {
        optimizer,
        epochs: a.epochs,
        batch_size: a.batch,
        lr,
        warmup: a.warmup,
        min_lr_ratio: a.min_lr_ratio,
        l2: a.l2,
        clip_norm: a.clip,
        seed: a.seed,
        holdout: a.holdout,
        patience: a.patience,
        classes: a.classes,
        checkpoint: a.checkpoint.as_ref().map(|dir| Checkpointing {
            dir: dir.clone(),
            every: a.checkpoint_every,
            resume: a.resume,
        }),
        target_objective: a.target_objective,
        precision,
    };
    let mut progress = Progress::new(a.optimizer == "lbfgs");
    let started = Instant::now();
    let source =
        a.data.data.as_ref().map_or_else(|| a.data.features.clone().unwrap_or_default(), |p| p.display().to_string());
    let data = Data::new(x, labels).map_err(|e| Failure(format!("{source}: {e}")))?;
    // Fail before training, not after, when the model or the plot cannot be written where
    // asked, or would overwrite each other. (Outputs over inputs: `main` checks every command.)
    let plot = a.plot.clone().unwrap_or_else(|| with_suffix(&a.output, ".loss.svg"));
    check_output_folder(&a.output)?;
    check_output_folder(&plot)?;
    if same_file(&a.output, &plot) {
        return Err(Failure(format!("--plot {} is the model's own path (-o)", plot.display())));
    }
    if let Some(dir) = &a.checkpoint
        && dir.exists()
        && !dir.is_dir()
    {
        return Err(Failure(format!("--checkpoint {}: exists and is not a folder", dir.display())));
    }
    let out = train(data, &cfg, |e| progress.event(e));
    progress.finish();
    let out = out?;
    let secs = started.elapsed().as_secs_f64();
    // A mini-batch run whose objective over all training rows ended far above its first
    // step's has not fit anything (while staying finite it is not caught as diverged): say
    // so. (The last step's own objective may be small in an oscillating run.)
    if let Some(first) = out.step_objectives.first()
        && a.optimizer != "lbfgs"
        && out.objective > 10.0 * first.max(1e-3)
    {
        eprintln!(
            "warning: the objective grew from {first:.4} to {:.4e}: the run diverged; lower --lr (or --weight-decay)",
            out.objective
        );
    }
    out.model.save_with_metadata(&a.output, metadata)?;
    write_atomic(&plot, plot_history(&out, &format!("softmax-layer train ({})", a.optimizer), &[]).as_bytes())?;
    let held = out.heldout.map_or("null".to_string(), |m| {
        format!("{{\"loss\": {}, \"accuracy\": {}, \"perplexity\": {}}}", m.loss, m.accuracy, m.perplexity)
    });
    if a.json {
        println!(
            "{{\"objective\": {}, \"train_loss\": {}, \"train_accuracy\": {}, \"heldout\": {held}, \"steps\": {}, \"seconds\": {secs}, \"model\": \"{}\", \"plot\": \"{}\"}}",
            out.objective,
            out.train.loss,
            out.train.accuracy,
            out.step_objectives.len(),
            a.output.display(),
            plot.display()
        );
    } else {
        println!(
            "objective {:.6}  training loss {:.6}  accuracy {:.4}  ({} steps, {secs:.2} s)",
            out.objective,
            out.train.loss,
            out.train.accuracy,
            out.step_objectives.len()
        );
        if let Some(m) = out.heldout {
            println!("held-out loss {:.6}  accuracy {:.4}  perplexity {:.3}", m.loss, m.accuracy, m.perplexity);
        }
        println!("model: {}\nloss curve: {}", a.output.display(), plot.display());
    }
    Ok(())
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    p.with_file_name(format!("{stem}{suffix}"))
}

pub fn run_predict(a: &PredictArgs) -> Result<(), Failure> {
    let precision = parse_precision(&a.precision)?;
    let model = Model::load(&a.model)?;
    let mut data = load_data(&a.data, None, false)?;
    // A model trained on CSV columns reads a CSV's columns by name, in any order.
    let trained_on =
        softmax_layer::io::read_safetensors_metadata(&a.model)?.get(FEATURE_NAMES).and_then(|r| record_to_names(r));
    if let (Some(want), Some(path)) = (trained_on, &a.data.data) {
        match_columns(&mut data, &want, path, &a.model)?;
    }
    if data.d != model.dim {
        return Err(Failure(format!(
            "the data has {} feature columns, but the model {} expects d = {}",
            data.d,
            a.model.display(),
            model.dim
        )));
    }
    let features = a.data.features.clone().unwrap_or_default();
    let probs = model.predict_proba_in(MatRef::new(data.x.as_slice(), data.n, data.d)?, precision).map_err(|e| {
        // Name the file that holds the bad value, and the tensor as this command calls it.
        match e {
            Error::NonFinite { tensor, row, col, value } => {
                let (file, name) = if tensor == "hidden" {
                    (features.clone(), "features".to_string())
                } else {
                    (a.model.display().to_string(), tensor)
                };
                Failure(format!("{file}: {name}[{row}, {col}] is {value}; only finite values are allowed"))
            }
            e => Failure(e.to_string()),
        }
    })?;
    write_npy_f32(&a.output, &[data.n, model.classes], &probs)?;
    Ok(())
}
