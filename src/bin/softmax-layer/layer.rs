//! The layer commands: `logits`, `probs`, `log-probs`, `logsumexp` (with --hidden),
//! `argmax` and `top-k`, over hidden states and weights.

use crate::Failure;
use softmax_layer::io::{OutTensor, Tensor, TensorSpec, write_npy_f32, write_npy_i64, write_safetensors};
use softmax_layer::{Error, LayerOptions, MatMut, MatRef, PackedBf16Weights, Precision, SoftmaxLayer, WeightLayout};
use std::borrow::Cow;
use std::path::PathBuf;

/// Where the layer comes from: hidden states, weights, bias and layout.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Hidden states H, [n, d] (or [d], one row): FILE.npy or FILE.safetensors:NAME.
    #[arg(long, value_name = "H")]
    pub hidden: String,
    /// Weights W: [V, d] with --weight-layout vd (PyTorch, the default) or [d, V] with dv.
    #[arg(long, value_name = "W")]
    pub weight: String,
    /// Bias b, [V].
    #[arg(long, value_name = "B")]
    pub bias: Option<String>,
    /// `vd`: W is [V, d] (nn.Linear, lm_head.weight); `dv`: W is [d, V].
    #[arg(long, value_name = "vd|dv", default_value = "vd")]
    pub weight_layout: String,
    /// Product precision: `f32`; `bf16` (H and W rounded to bf16, f32 accumulation; a bf16
    /// W is used as is, not widened, except by `loss --grad`, whose dW is f32);
    /// `bf16x3` (hi·hi + hi·lo + lo·hi, about 16 bits).
    /// SOFTMAX_LAYER_BF16_PATH=amx|avx512bf16|portable forces the bf16 code path.
    #[arg(long, value_name = "f32|bf16|bf16x3", default_value = "f32")]
    pub precision: String,
}

#[derive(clap::Args)]
pub struct LayerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Divide the logits by T (finite, > 0) before the softmax (not for `logits`).
    #[arg(long, value_name = "T", default_value_t = 1.0, allow_hyphen_values = true, value_parser = crate::temperature_arg)]
    pub temperature: f32,
    /// Output file.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: PathBuf,
}

#[derive(Clone, Copy, PartialEq)]
pub enum LayerOp {
    Logits,
    Probs,
    LogProbs,
    Logsumexp,
    Argmax,
    TopK,
}

fn load(spec: &str) -> Result<Tensor, Failure> {
    Ok(Tensor::load(&TensorSpec::parse(spec)?)?)
}

fn shape_str(s: &[usize]) -> String {
    format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

/// The loaded inputs: tensors stay memory-mapped; `f32` weights are used without a copy.
struct Inputs {
    hidden: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
    layout: WeightLayout,
    precision: Precision,
    n: usize,
    d: usize,
    v: usize,
    one_row: bool,
}

/// Target ids `[n]` and where they came from, one per row of hidden (a scalar too when `scalar_ok`: one row given
/// as `[d]`).
fn load_targets(spec: &str, inp: &Inputs, scalar_ok: bool) -> Result<(Vec<i64>, String), Failure> {
    let t = load(spec)?;
    if t.shape != [inp.n] && !(scalar_ok && t.shape.is_empty()) {
        return Err(Failure(format!(
            "shape mismatch: targets {} is {}, expected [{}] (one per row of hidden {})",
            t.source,
            shape_str(&t.shape),
            inp.n,
            inp.hidden.source
        )));
    }
    Ok((t.to_i64()?, t.source))
}

/// `--precision`'s word, or the one-line error every command gives for another.
pub fn parse_precision(s: &str) -> Result<Precision, Failure> {
    Precision::parse(s).ok_or_else(|| Failure(format!("--precision must be f32, bf16 or bf16x3, got '{s}'")))
}

fn inputs(a: &ModelArgs) -> Result<Inputs, Failure> {
    let layout = WeightLayout::parse(&a.weight_layout).ok_or_else(|| {
        Failure(format!("--weight-layout must be 'vd' ([V, d]) or 'dv' ([d, V]), got '{}'", a.weight_layout))
    })?;
    let precision = parse_precision(&a.precision)?;
    let hidden = load(&a.hidden)?;
    let weight = load(&a.weight)?;
    let (n, d, one_row) = match hidden.shape[..] {
        [d] => (1, d, true),
        [n, d] => (n, d, false),
        _ => {
            return Err(Failure(format!(
                "{}: hidden must be [n, d] or [d], got {}",
                hidden.source,
                shape_str(&hidden.shape)
            )));
        }
    };
    let (v, wd) = match (&weight.shape[..], layout) {
        (&[v, wd], WeightLayout::VocabMajor) => (v, wd),
        (&[wd, v], WeightLayout::HiddenMajor) => (v, wd),
        _ => return Err(Failure(format!("{}: weight must be 2-D, got {}", weight.source, shape_str(&weight.shape)))),
    };
    if wd != d {
        let want = if layout == WeightLayout::VocabMajor { "[V, d]" } else { "[d, V]" };
        return Err(Failure(format!(
            "shape mismatch: hidden {} is {} (d = {d}) but weight {} is {} as {want} (d = {wd})",
            hidden.source,
            shape_str(&hidden.shape),
            weight.source,
            shape_str(&weight.shape)
        )));
    }
    let bias = a.bias.as_deref().map(load).transpose()?;
    if let Some(b) = &bias
        && b.shape != [v]
    {
        return Err(Failure(format!(
            "shape mismatch: bias {} is {}, expected [{v}] (V of weight {})",
            b.source,
            shape_str(&b.shape),
            weight.source
        )));
    }
    Ok(Inputs { hidden, weight, bias, layout, precision, n, d, v, one_row })
}

impl Inputs {
    /// The weight as `f32`, unless the product is bf16 and the file holds bf16: then `None`,
    /// and [`Inputs::layer`] packs the bf16 bits as they are. `need_f32` (the loss's
    /// gradients, which need `f32` weights) always widens.
    fn weight_f32(&self, need_f32: bool) -> Result<Option<Cow<'_, [f32]>>, Failure> {
        if !need_f32 && self.precision == Precision::Bf16 && self.weight.as_bf16_bits().is_some() {
            return Ok(None);
        }
        Ok(Some(self.weight.to_f32()?))
    }

    /// The layer over `w` (from [`Inputs::weight_f32`]) and `b`, in the precision asked for.
    fn layer<'a>(&self, w: Option<&'a [f32]>, b: Option<&'a [f32]>) -> Result<SoftmaxLayer<'a>, Failure> {
        let (v, d) = (self.v, self.d);
        let layer = match w {
            Some(w) => SoftmaxLayer::new(w, self.layout, v, d, b).and_then(|l| l.with_precision(self.precision)),
            None => {
                let bits =
                    self.weight.as_bf16_bits().ok_or_else(|| Failure("internal: bf16 weight expected".into()))?;
                PackedBf16Weights::from_bf16_bits(&bits, self.layout, v, d)
                    .and_then(|p| SoftmaxLayer::from_packed_bf16(p, b))
            }
        };
        layer.map_err(|e| named(e, self, None))
    }
}

/// Prefixes a library error with the file that holds the offending tensor.
fn named(e: Error, inp: &Inputs, targets: Option<&str>) -> Failure {
    let source = match &e {
        Error::NonFinite { tensor, .. } if tensor == "hidden" => Some(inp.hidden.source.as_str()),
        Error::NonFinite { tensor, .. } if tensor == "weight" => Some(inp.weight.source.as_str()),
        Error::NonFiniteEntry { tensor, .. } if tensor == "bias" => inp.bias.as_ref().map(|b| b.source.as_str()),
        Error::TargetOutOfRange { .. } => targets,
        _ => None,
    };
    match source {
        Some(s) => Failure(format!("{s}: {e}")),
        None => Failure(e.to_string()),
    }
}

pub fn run(op: LayerOp, a: &LayerArgs, targets: Option<&str>, k: Option<usize>) -> Result<(), Failure> {
    softmax_layer::check_temperature(a.temperature)?;
    if op == LayerOp::Logits && a.temperature != 1.0 {
        return Err(Failure(
            "--temperature does not apply to logits (they are H·Wᵀ + b); probs and log-probs take it".into(),
        ));
    }
    let inp = inputs(&a.model)?;
    let (n, d, v) = (inp.n, inp.d, inp.v);
    let h = inp.hidden.to_f32()?;
    let w = inp.weight_f32(false)?;
    let b = inp.bias.as_ref().map(|b| b.to_f32()).transpose()?;
    let layer = inp.layer(w.as_deref(), b.as_deref())?;
    let hv = MatRef::new(&h, n, d)?;
    let opts = LayerOptions { temperature: a.temperature };
    let row_shape = |cols: usize| if inp.one_row { vec![cols] } else { vec![n, cols] };
    let out = &a.output;
    match op {
        LayerOp::Logits | LayerOp::Probs | LayerOp::LogProbs if targets.is_none() => {
            let mut buf = crate::output_buffer(n, v, "output")?;
            let m = MatMut::new(&mut buf, n, v)?;
            match op {
                LayerOp::Logits => layer.logits(hv, m),
                LayerOp::Probs => layer.probs(hv, m, &opts),
                _ => layer.log_probs(hv, m, &opts),
            }
            .map_err(|e| named(e, &inp, None))?;
            write_npy_f32(out, &row_shape(v), &buf)?;
        }
        LayerOp::Logits | LayerOp::Probs | LayerOp::LogProbs => {
            let spec = targets.expect("only log-probs takes targets");
            let (y, y_source) = load_targets(spec, &inp, inp.one_row)?;
            let mut lp = vec![0f32; n];
            layer.target_log_probs(hv, &y, &mut lp, &opts).map_err(|e| named(e, &inp, Some(&y_source)))?;
            write_npy_f32(out, &[n], &lp)?;
        }
        LayerOp::Logsumexp => {
            let mut lse = vec![0f32; n];
            layer.logsumexp(hv, &mut lse, &opts).map_err(|e| named(e, &inp, None))?;
            write_npy_f32(out, &[n], &lse)?;
        }
        LayerOp::Argmax => {
            let mut idx = vec![0usize; n];
            layer.argmax(hv, &mut idx).map_err(|e| named(e, &inp, None))?;
            let idx: Vec<i64> = idx.into_iter().map(|j| j as i64).collect();
            write_npy_i64(out, &[n], &idx)?;
        }
        LayerOp::TopK => {
            let k = k.ok_or_else(|| Failure("top-k needs --k K".into()))?;
            if k == 0 || k > v {
                return Err(Failure(format!(
                    "--k must be in [1, V = {v}] (V from weight {}), got {k}",
                    inp.weight.source
                )));
            }
            let top = layer.top_k(hv, k, &opts).map_err(|e| named(e, &inp, None))?;
            let idx: Vec<i64> = top.indices.iter().map(|&j| j as i64).collect();
            write_safetensors(
                out,
                &[
                    ("values", row_shape(k), OutTensor::F32(&top.log_probs)),
                    ("indices", row_shape(k), OutTensor::I64(&idx)),
                ],
            )?;
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct LossArgs {
    #[command(flatten)]
    pub layer: LayerArgs,
    /// Target class ids, int32 or int64 [n].
    #[arg(long, value_name = "Y")]
    pub targets: String,
    /// Rows with this target add nothing.
    #[arg(long, value_name = "I", default_value_t = -100, allow_hyphen_values = true)]
    pub ignore_index: i64,
    /// mean, sum or none.
    #[arg(long, value_name = "mean|sum|none", default_value = "mean")]
    pub reduction: String,
    /// Label smoothing ε in [0, 1].
    #[arg(long, value_name = "E", default_value_t = 0.0, allow_hyphen_values = true)]
    pub label_smoothing: f32,
    /// Class weights [V], finite and >= 0.
    #[arg(long, value_name = "CW")]
    pub class_weights: Option<String>,
    /// z-loss coefficient: adds z·lse² per non-ignored row.
    #[arg(long, value_name = "Z", default_value_t = 0.0, allow_hyphen_values = true)]
    pub z_loss: f32,
    /// Logit softcap s > 0: logits ← s·tanh(logits/s), before the temperature.
    #[arg(long, value_name = "S", allow_hyphen_values = true)]
    pub softcap: Option<f32>,
    /// Also write grad_hidden, grad_weight and (with --bias) grad_bias (upstream gradient 1).
    #[arg(long)]
    pub grad: bool,
}

pub fn loss(a: &LossArgs) -> Result<(), Failure> {
    use softmax_layer::loss::{CrossEntropyOptions, Reduction, Upstream, cross_entropy, cross_entropy_with_grad};
    let reduction = Reduction::parse(&a.reduction)
        .ok_or_else(|| Failure(format!("--reduction must be mean, sum or none, got '{}'", a.reduction)))?;
    let inp = inputs(&a.layer.model)?;
    let (n, d, v) = (inp.n, inp.d, inp.v);
    let (y, y_source) = load_targets(&a.targets, &inp, false)?;
    let cw_t = a.class_weights.as_deref().map(load).transpose()?;
    if let Some(c) = &cw_t
        && c.shape != [v]
    {
        return Err(Failure(format!(
            "shape mismatch: class weights {} is {}, expected [{v}]",
            c.source,
            shape_str(&c.shape)
        )));
    }
    let cw = cw_t.as_ref().map(|c| c.to_f32()).transpose()?;
    let h = inp.hidden.to_f32()?;
    let w = inp.weight_f32(a.grad)?;
    let b = inp.bias.as_ref().map(|b| b.to_f32()).transpose()?;
    let layer = inp.layer(w.as_deref(), b.as_deref())?;
    let hv = MatRef::new(&h, n, d)?;
    let opts = CrossEntropyOptions {
        ignore_index: a.ignore_index,
        reduction,
        label_smoothing: a.label_smoothing,
        class_weights: cw.as_deref(),
        z_loss: a.z_loss,
        softcap: a.softcap,
        temperature: a.layer.temperature,
    };
    let name_err = |e: Error| match &e {
        Error::InvalidArgument(m) if m.starts_with("class_weights") => {
            Failure(format!("{}: {e}", cw_t.as_ref().map_or("class weights", |c| c.source.as_str())))
        }
        _ => named(e, &inp, Some(&y_source)),
    };
    let loss_shape = if reduction == Reduction::None { vec![n] } else { vec![] };
    if a.grad {
        let (out, g) = cross_entropy_with_grad(&layer, hv, &y, &opts, Upstream::Scalar(1.0)).map_err(name_err)?;
        let wshape = inp.layout.shape(v, d).to_vec();
        let mut t = vec![
            ("loss", loss_shape, OutTensor::F32(&out.loss)),
            ("lse", vec![n], OutTensor::F32(&out.lse)),
            // (The shape of hidden: [d] for one row given as a vector.)
            ("grad_hidden", inp.hidden.shape.clone(), OutTensor::F32(&g.hidden)),
            ("grad_weight", wshape, OutTensor::F32(&g.weight)),
        ];
        if let Some(gb) = &g.bias {
            t.push(("grad_bias", vec![v], OutTensor::F32(gb)));
        }
        write_safetensors(&a.layer.output, &t)?;
    } else {
        let out = cross_entropy(&layer, hv, &y, &opts).map_err(name_err)?;
        write_safetensors(
            &a.layer.output,
            &[("loss", loss_shape, OutTensor::F32(&out.loss)), ("lse", vec![n], OutTensor::F32(&out.lse))],
        )?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub layer: LayerArgs,
    /// Token ids Y [n], int32 or int64.
    #[arg(long, value_name = "Y")]
    pub targets: String,
    /// Rows per sequence [k], summing to n (default: one sequence).
    #[arg(long, value_name = "L")]
    pub lengths: Option<String>,
    /// 0/1 [n]: which target positions are scored (default: all).
    #[arg(long, value_name = "M")]
    pub mask: Option<String>,
    /// Causal-LM alignment: row t scores Y[t+1] of the same sequence.
    #[arg(long)]
    pub shifted: bool,
    /// Report the K most probable alternatives per token (plus the target).
    #[arg(long, value_name = "K", default_value_t = 0, allow_hyphen_values = true)]
    pub top_logprobs: usize,
    /// UTF-8 bytes per sequence [k], for bits_per_byte.
    #[arg(long, value_name = "BYTES")]
    pub bytes: Option<String>,
    /// Characters per sequence [k], for logprob_per_char.
    #[arg(long, value_name = "CHARS")]
    pub chars: Option<String>,
}

/// A non-negative integer vector from a tensor file.
fn counts(spec: &str, what: &str) -> Result<Vec<usize>, Failure> {
    let t = load(spec)?;
    if t.shape.len() != 1 {
        return Err(Failure(format!("{}: {what} must be 1-D, got shape {}", t.source, shape_str(&t.shape))));
    }
    t.to_i64()?
        .into_iter()
        .enumerate()
        .map(|(i, x)| usize::try_from(x).map_err(|_| Failure(format!("{}: {what}[{i}] = {x} is negative", t.source))))
        .collect()
}

fn json_num(x: f64) -> String {
    // (`+ 0.0` turns -0 into 0: a sum of no log-probabilities prints as 0, not -0.)
    if x.is_finite() { format!("{}", x + 0.0) } else { "null".into() }
}

pub fn score(a: &ScoreArgs) -> Result<(), Failure> {
    use softmax_layer::score::{Alignment, ScoreOptions, score_sequences};
    let inp = inputs(&a.layer.model)?;
    let (n, d) = (inp.n, inp.d);
    let (y, y_source) = load_targets(&a.targets, &inp, false)?;
    let lengths = a.lengths.as_deref().map(|s| counts(s, "lengths")).transpose()?;
    let mask = match a.mask.as_deref() {
        Some(s) => {
            let m = counts(s, "mask")?;
            if let Some(i) = m.iter().position(|&x| x > 1) {
                return Err(Failure(format!("{s}: mask[{i}] = {} is not 0 or 1", m[i])));
            }
            Some(m.into_iter().map(|x| x == 1).collect::<Vec<bool>>())
        }
        None => None,
    };
    if a.top_logprobs > inp.v {
        return Err(Failure(format!(
            "--top-logprobs {} is more than the V = {} classes of weight {}",
            a.top_logprobs, inp.v, inp.weight.source
        )));
    }
    let bytes = a.bytes.as_deref().map(|s| counts(s, "bytes")).transpose()?;
    let chars = a.chars.as_deref().map(|s| counts(s, "chars")).transpose()?;
    let h = inp.hidden.to_f32()?;
    let w = inp.weight_f32(false)?;
    let b = inp.bias.as_ref().map(|b| b.to_f32()).transpose()?;
    let layer = inp.layer(w.as_deref(), b.as_deref())?;
    let opts = ScoreOptions {
        lengths: lengths.as_deref(),
        mask: mask.as_deref(),
        alignment: if a.shifted { Alignment::Shifted } else { Alignment::Aligned },
        top_logprobs: a.top_logprobs,
        temperature: a.layer.temperature,
        bytes: bytes.as_deref(),
        chars: chars.as_deref(),
    };
    let scores =
        score_sequences(&layer, MatRef::new(&h, n, d)?, &y, &opts).map_err(|e| named(e, &inp, Some(&y_source)))?;
    let mut out = String::new();
    for s in &scores {
        let tokens: Vec<String> = s
            .tokens
            .iter()
            .map(|t| {
                let top = if a.top_logprobs > 0 {
                    let alts: Vec<String> = t
                        .top_logprobs
                        .iter()
                        .map(|&(j, lp)| format!("{{\"token\": {j}, \"logprob\": {}}}", json_num(lp as f64)))
                        .collect();
                    format!(", \"top_logprobs\": [{}]", alts.join(", "))
                } else {
                    String::new()
                };
                format!(
                    "{{\"target\": {}, \"logprob\": {}, \"rank\": {}{top}}}",
                    t.target,
                    json_num(t.logprob as f64),
                    t.rank
                )
            })
            .collect();
        let opt = |x: Option<f64>| x.map_or("null".to_string(), json_num);
        out.push_str(&format!(
            "{{\"sum_logprob\": {}, \"num_scored\": {}, \"mean_logprob\": {}, \"perplexity\": {}, \"is_greedy\": {}, \"bits_per_byte\": {}, \"logprob_per_char\": {}, \"tokens\": [{}]}}\n",
            json_num(s.sum_logprob),
            s.num_scored,
            opt(s.mean_logprob),
            opt(s.perplexity),
            s.is_greedy,
            opt(s.bits_per_byte),
            opt(s.logprob_per_char),
            tokens.join(", ")
        ));
    }
    softmax_layer::io::write_atomic(&a.layer.output, out.as_bytes())?;
    Ok(())
}

#[derive(clap::Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Temperature >= 0; 0 is greedy (ties to the lowest id).
    #[arg(long, value_name = "T", default_value_t = 1.0, allow_hyphen_values = true)]
    pub temperature: f32,
    #[arg(long, value_name = "K", allow_hyphen_values = true)]
    pub top_k: Option<usize>,
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    pub top_p: Option<f32>,
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    pub min_p: Option<f32>,
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    pub typical_p: Option<f32>,
    #[arg(long, value_name = "R", default_value_t = 1.0, allow_hyphen_values = true)]
    pub repetition_penalty: f32,
    #[arg(long, value_name = "F", default_value_t = 0.0, allow_hyphen_values = true)]
    pub frequency_penalty: f32,
    #[arg(long, value_name = "P", default_value_t = 0.0, allow_hyphen_values = true)]
    pub presence_penalty: f32,
    /// Token history [h] (int .npy) for the penalties, shared by every row.
    #[arg(long, value_name = "IDS")]
    pub history: Option<String>,
    /// Row i uses seed S + i.
    #[arg(long, value_name = "S", default_value_t = 0, allow_hyphen_values = true)]
    pub seed: u64,
    /// Independent draws per row from its processed distribution.
    #[arg(long, value_name = "N", default_value_t = 1, allow_hyphen_values = true)]
    pub num_samples: usize,
    /// Output .jsonl: {"row": i, "samples": [{"token", "logprob", "logprob_raw"}, ...]} per row.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: PathBuf,
}

pub fn sample(a: &SampleArgs) -> Result<(), Failure> {
    use softmax_layer::sample::{Sampler, SamplerConfig};
    if !(1..=1_000_000).contains(&a.num_samples) {
        return Err(Failure(format!("--num-samples must be in [1, 1000000], got {}", a.num_samples)));
    }
    let inp = inputs(&a.model)?;
    let (n, d, v) = (inp.n, inp.d, inp.v);
    let history = a.history.as_deref().map(|s| counts(s, "history")).transpose()?.unwrap_or_default();
    let h = inp.hidden.to_f32()?;
    let w = inp.weight_f32(false)?;
    let b = inp.bias.as_ref().map(|b| b.to_f32()).transpose()?;
    let layer = inp.layer(w.as_deref(), b.as_deref())?;
    let mut logits = crate::output_buffer(n, v, "logits")?;
    layer.logits(MatRef::new(&h, n, d)?, MatMut::new(&mut logits, n, v)?).map_err(|e| named(e, &inp, None))?;
    let mut out = String::new();
    let mut sampler = Sampler::default();
    for i in 0..n {
        let cfg = SamplerConfig {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            typical_p: a.typical_p,
            repetition_penalty: a.repetition_penalty,
            frequency_penalty: a.frequency_penalty,
            presence_penalty: a.presence_penalty,
            seed: a.seed.wrapping_add(i as u64),
            ..Default::default()
        };
        let draws = sampler.sample(&logits[i * v..(i + 1) * v], &history, &cfg, a.num_samples)?;
        let items: Vec<String> = draws
            .iter()
            .map(|d| {
                format!(
                    "{{\"token\": {}, \"logprob\": {}, \"logprob_raw\": {}}}",
                    d.token,
                    json_num(d.logprob as f64),
                    json_num(d.logprob_raw as f64)
                )
            })
            .collect();
        out.push_str(&format!("{{\"row\": {i}, \"samples\": [{}]}}\n", items.join(", ")));
    }
    softmax_layer::io::write_atomic(&a.output, out.as_bytes())?;
    Ok(())
}
