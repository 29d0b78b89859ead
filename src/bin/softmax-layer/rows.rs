//! `softmax`, `log-softmax` and `logsumexp` over a logits file.

use crate::Failure;
use softmax_layer::io::{Tensor, TensorSpec, write_npy_f32};
use softmax_layer::{Error, MatMut, MatRef, RowOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct RowArgs {
    /// Logits [n, V] (or [V], one row): FILE.npy or FILE.safetensors:NAME; f32, f64, f16 or bf16.
    #[arg(long, value_name = "L")]
    pub logits: String,
    /// Divide the (masked) logits by T, finite and > 0.
    #[arg(long, value_name = "T", default_value_t = 1.0, allow_hyphen_values = true, value_parser = crate::temperature_arg)]
    pub temperature: f32,
    /// Additive mask, [n, V] or [V] (broadcast to every row); -inf removes an entry.
    #[arg(long, value_name = "M")]
    pub mask: Option<String>,
    /// Output .npy file (f32).
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: PathBuf,
}

#[derive(Clone, Copy)]
pub enum Op {
    Softmax,
    LogSoftmax,
    Logsumexp,
}

fn load(spec: &str) -> Result<Tensor, Failure> {
    Ok(Tensor::load(&TensorSpec::parse(spec)?)?)
}

pub fn run(op: Op, a: &RowArgs) -> Result<(), Failure> {
    softmax_layer::check_temperature(a.temperature)?;
    let logits = load(&a.logits)?;
    let (n, v) = logits.as_matrix_shape()?;
    let x = logits.to_f32()?;
    let mask_t = a.mask.as_deref().map(load).transpose()?;
    let mask_data = mask_t.as_ref().map(|m| m.to_f32()).transpose()?;
    let mask = match (&mask_t, &mask_data) {
        (Some(mt), Some(md)) => {
            let (mn, mv) = mt.as_matrix_shape()?;
            if mv != v || (mn != n && mn != 1) {
                return Err(Failure(format!(
                    "{}: mask shape {:?} does not fit logits {} of shape {:?}; expected [{n}, {v}] or [{v}]",
                    mt.source, mt.shape, logits.source, logits.shape
                )));
            }
            Some(MatRef::new(md, mn, mv)?)
        }
        _ => None,
    };
    let opts = RowOptions { temperature: a.temperature, mask, isa: None };
    let xv = MatRef::new(&x, n, v)?;
    // Name the file that holds the offending value.
    let name = |e: Error| -> Failure {
        let source = match &e {
            Error::NonFinite { tensor, .. } if tensor == "mask" => {
                mask_t.as_ref().map_or(&logits.source, |m| &m.source)
            }
            _ => &logits.source,
        };
        Failure(format!("{source}: {e}"))
    };
    match op {
        Op::Logsumexp => {
            // (With V = 0 the library reports the shape, before any allocation: the file
            // may claim any n for no bytes.)
            let mut out = if v == 0 { Vec::new() } else { crate::output_buffer(n, 1, "output")? };
            softmax_layer::logsumexp(xv, &mut out, &opts).map_err(name)?;
            write_npy_f32(&a.output, &[n], &out)?;
        }
        Op::Softmax | Op::LogSoftmax => {
            let mut out = crate::output_buffer(n, v, "output")?;
            let ov = MatMut::new(&mut out, n, v)?;
            match op {
                Op::Softmax => softmax_layer::softmax(xv, ov, &opts),
                _ => softmax_layer::log_softmax(xv, ov, &opts),
            }
            .map_err(name)?;
            write_npy_f32(&a.output, &logits.shape, &out)?;
        }
    }
    Ok(())
}
