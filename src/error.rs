//! The crate's one error type. Every variant names the offending tensor, index or value.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong on user input.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A temperature that is not finite or not `> 0`.
    InvalidTemperature(f32),
    /// A NaN or infinity where it is not allowed: `tensor[row, col]` holds `value`.
    NonFinite { tensor: String, row: usize, col: usize, value: f32 },
    /// A NaN or infinity in a vector (a bias, scores, one row of logits): `tensor[index]`
    /// holds `value`.
    NonFiniteEntry { tensor: String, index: usize, value: f32 },
    /// Every entry of a row is `-inf` after masking, so it has no distribution.
    AllMasked { row: usize },
    /// A target class id outside `[0, vocab)`: `targets[index] = value`.
    TargetOutOfRange { index: usize, value: i64, vocab: usize },
    /// Finite inputs whose logits overflow `f32` (|H·Wᵀ + b| > 3.4e38) in this row.
    LogitsOverflow { row: usize },
    /// A shape or length that does not fit: `what` explains, naming the tensors.
    Shape(String),
    /// An invalid argument value: `what` names the argument and the value.
    InvalidArgument(String),
    /// The requested instruction set is not supported by this CPU.
    UnsupportedIsa(crate::kernels::Isa),
    /// A file that cannot be read or written.
    Io { path: PathBuf, source: std::io::Error },
    /// A file that was read but is not a valid tensor file of the expected kind.
    Format { path: PathBuf, what: String },
}

/// `Result<T, Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidTemperature(t) if *t > 0.0 && t.is_finite() => write!(
                f,
                "temperature {t:e} is too small: 2/T overflows f32 (the least allowed is {:e})",
                crate::rows::MIN_TEMPERATURE
            ),
            Error::InvalidTemperature(t) => write!(f, "temperature must be finite and > 0, got {t}"),
            Error::NonFinite { tensor, row, col, value } => {
                write!(f, "{tensor}[{row}, {col}] is {value}; only finite values are allowed")
            }
            Error::NonFiniteEntry { tensor, index, value } => {
                write!(f, "{tensor}[{index}] is {value}; only finite values are allowed")
            }
            Error::AllMasked { row } => write!(f, "row {row} is entirely -inf (all masked); it has no distribution"),
            Error::TargetOutOfRange { index, value, vocab } => {
                write!(f, "targets[{index}] = {value} is out of range [0, {vocab})")
            }
            Error::LogitsOverflow { row } => {
                write!(
                    f,
                    "the logits of row {row} overflow f32 (|H·Wᵀ + b| / T, or their logsumexp, beyond 3.4e38); \
                     rescale the inputs or raise the temperature"
                )
            }
            Error::Shape(what) => write!(f, "shape mismatch: {what}"),
            Error::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
            Error::UnsupportedIsa(isa) => write!(f, "instruction set {isa} is not supported by this CPU"),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Format { path, what } => write!(f, "{}: {what}", path.display()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
