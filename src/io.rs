//! Reading and writing tensors: NumPy `.npy` and Hugging Face `.safetensors`.
//!
//! A tensor is named on the command line as `FILE.npy` or `FILE.safetensors:NAME`
//! (see [`TensorSpec`]). Files are memory-mapped, never read whole into a growing buffer,
//! and every header field is checked against the file size before any allocation, so a
//! corrupt or truncated file is an [`Error::Format`], never a crash or a huge allocation.
//!
//! Outputs are written to a temporary file in the target directory, flushed, and renamed
//! over the target: a reader never sees a half-written file.

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::borrow::Cow;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Element types the readers accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I32,
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }
    /// The name used in messages (`f32`, `bf16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }
    fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
}

/// Where a tensor lives: a `.npy` file, or a named tensor in a `.safetensors` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorSpec {
    Npy(PathBuf),
    SafeTensors(PathBuf, String),
}

impl TensorSpec {
    /// Parses `FILE.npy` or `FILE.safetensors:NAME`.
    pub fn parse(s: &str) -> Result<TensorSpec> {
        if let Some(pos) = s.rfind(".safetensors:") {
            let (file, name) = s.split_at(pos + ".safetensors".len());
            let name = &name[1..];
            if name.is_empty() {
                return Err(Error::InvalidArgument(format!("{s}: missing tensor name after ':'")));
            }
            return Ok(TensorSpec::SafeTensors(file.into(), name.into()));
        }
        if s.ends_with(".safetensors") {
            return Err(Error::InvalidArgument(format!("{s}: name the tensor inside the file, as {s}:NAME")));
        }
        Ok(TensorSpec::Npy(s.into()))
    }

    /// The file this spec reads.
    pub fn path(&self) -> &Path {
        match self {
            TensorSpec::Npy(p) | TensorSpec::SafeTensors(p, _) => p,
        }
    }
}

impl std::fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TensorSpec::Npy(p) => write!(f, "{}", p.display()),
            TensorSpec::SafeTensors(p, n) => write!(f, "{}:{n}", p.display()),
        }
    }
}

enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A tensor read from a file: its dtype, shape and raw little-endian bytes, kept in the
/// file's memory map (no copy) until converted.
pub struct Tensor {
    /// What was read, for messages (`file.npy` or `file.safetensors:NAME`).
    pub source: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    storage: Storage,
    offset: usize,
    len: usize,
    /// `.npy` with `fortran_order: True`: the bytes hold the transpose.
    fortran: bool,
    big_endian: bool,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("source", &self.source)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

fn fmt_err(path: &Path, what: impl Into<String>) -> Error {
    Error::Format { path: path.to_path_buf(), what: what.into() }
}

fn map_file(path: &Path) -> Result<Storage> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let meta = file.metadata().map_err(|e| io_err(path, e))?;
    if meta.is_dir() {
        return Err(fmt_err(path, "is a directory, not a tensor file"));
    }
    if meta.len() == 0 {
        return Ok(Storage::Owned(Vec::new()));
    }
    // SAFETY: the map is read-only. Another process truncating or rewriting the file while
    // we read it is outside what we can guard against (as for any mmap-based reader);
    // every length we use was checked against the map's size.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
    Ok(Storage::Mapped(map))
}

fn shape_str(shape: &[usize]) -> String {
    format!("[{}]", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

impl Tensor {
    /// Reads the tensor a spec names.
    pub fn load(spec: &TensorSpec) -> Result<Tensor> {
        match spec {
            TensorSpec::Npy(p) => read_npy(p),
            TensorSpec::SafeTensors(p, name) => read_safetensors(p, name),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn raw(&self) -> &[u8] {
        &self.storage.bytes()[self.offset..self.offset + self.len]
    }

    /// A zero-copy `f32` view, when the data are little-endian f32, C-ordered and aligned.
    pub fn as_f32(&self) -> Option<&[f32]> {
        if self.dtype != DType::F32 || self.fortran || self.big_endian {
            return None;
        }
        // SAFETY: f32 has no invalid bit patterns; `align_to` only yields the aligned middle.
        let (pre, mid, post) = unsafe { self.raw().align_to::<f32>() };
        (pre.is_empty() && post.is_empty()).then_some(mid)
    }

    /// The bits of a bf16 tensor in C (row-major) order, borrowed from the file when they
    /// are little-endian, C-ordered and aligned; `None` for any other dtype. Never widened
    /// to `f32`.
    pub fn as_bf16_bits(&self) -> Option<Cow<'_, [u16]>> {
        if self.dtype != DType::BF16 {
            return None;
        }
        if !self.fortran && !self.big_endian {
            // SAFETY: u16 has no invalid bit patterns; `align_to` only yields the aligned middle.
            let (pre, mid, post) = unsafe { self.raw().align_to::<u16>() };
            if pre.is_empty() && post.is_empty() {
                return Some(Cow::Borrowed(mid));
            }
        }
        let be = self.big_endian;
        let bits: Vec<u16> = self.raw().chunks_exact(2).map(|c| word16(c, be)).collect();
        Some(Cow::Owned(self.c_order(bits)))
    }

    /// The elements as `f32` in C (row-major) order, converting f64, f16 and bf16.
    /// Integer tensors are an error.
    pub fn to_f32(&self) -> Result<Cow<'_, [f32]>> {
        if !self.dtype.is_float() {
            return Err(Error::InvalidArgument(format!(
                "{}: expected a floating-point tensor (f32, f64, f16, bf16), got {}",
                self.source,
                self.dtype.name()
            )));
        }
        if let Some(s) = self.as_f32() {
            return Ok(Cow::Borrowed(s));
        }
        let raw = self.raw();
        let sz = self.dtype.size();
        let mut out: Vec<f32> = Vec::with_capacity(self.numel());
        let be = self.big_endian;
        for (i, c) in raw.chunks_exact(sz).enumerate() {
            let v = match self.dtype {
                DType::F32 => f32::from_bits(word32(c, be)),
                DType::F64 => {
                    let x = f64::from_bits(word64(c, be));
                    let v = x as f32;
                    if x.is_finite() && v.is_infinite() {
                        return Err(Error::InvalidArgument(format!(
                            "{}: {} is {x:e}, beyond the f32 range (±3.4e38) these values are computed in",
                            self.source,
                            self.storage_index(i)
                        )));
                    }
                    v
                }
                DType::F16 => f16::from_bits(word16(c, be)).to_f32(),
                DType::BF16 => bf16::from_bits(word16(c, be)).to_f32(),
                DType::I32 | DType::I64 => unreachable!(),
            };
            out.push(v);
        }
        Ok(Cow::Owned(self.c_order(out)))
    }

    /// The elements as `f64` in C order (any float dtype; integers convert exactly up to 2^53).
    pub fn to_f64(&self) -> Result<Vec<f64>> {
        let be = self.big_endian;
        let raw = self.raw();
        // (The integer and narrower float conversions return C order already.)
        let v: Vec<f64> = match self.dtype {
            DType::F64 => raw.chunks_exact(8).map(|c| f64::from_bits(word64(c, be))).collect(),
            DType::I32 | DType::I64 => return Ok(self.to_i64()?.into_iter().map(|x| x as f64).collect()),
            _ => return Ok(self.to_f32()?.iter().map(|&x| x as f64).collect()),
        };
        Ok(self.c_order(v))
    }

    /// The elements as `i64` in C order. Float tensors are an error.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let be = self.big_endian;
        let out: Vec<i64> = match self.dtype {
            DType::I32 => self.raw().chunks_exact(4).map(|c| word32(c, be) as i32 as i64).collect(),
            DType::I64 => self.raw().chunks_exact(8).map(|c| word64(c, be) as i64).collect(),
            d => {
                return Err(Error::InvalidArgument(format!(
                    "{}: expected an integer tensor (int32 or int64), got {}",
                    self.source,
                    d.name()
                )));
            }
        };
        Ok(self.c_order(out))
    }

    /// Reorders Fortran-ordered elements into C order.
    /// The index of the `i`-th stored element, as `[i0, i1, …]`.
    fn storage_index(&self, mut i: usize) -> String {
        let mut idx = vec![0usize; self.shape.len()];
        // The last axis varies fastest in C order, the first in Fortran order.
        let axes: Vec<usize> =
            if self.fortran { (0..self.shape.len()).collect() } else { (0..self.shape.len()).rev().collect() };
        for k in axes {
            let s = self.shape[k].max(1);
            idx[k] = i % s;
            i /= s;
        }
        format!("[{}]", idx.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "))
    }

    fn c_order<T: Copy>(&self, v: Vec<T>) -> Vec<T> {
        if !self.fortran || self.shape.len() < 2 {
            return v;
        }
        let shape = &self.shape;
        let mut out = Vec::with_capacity(v.len());
        let mut idx = vec![0usize; shape.len()];
        // Fortran strides: stride[0] = 1, stride[k] = stride[k-1] * shape[k-1].
        let mut fstride = vec![1usize; shape.len()];
        for k in 1..shape.len() {
            fstride[k] = fstride[k - 1] * shape[k - 1];
        }
        for _ in 0..v.len() {
            out.push(v[idx.iter().zip(&fstride).map(|(i, s)| i * s).sum::<usize>()]);
            for k in (0..shape.len()).rev() {
                idx[k] += 1;
                if idx[k] < shape[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
        out
    }

    /// The shape as `(rows, cols)` for a 1-D (one row) or 2-D tensor.
    pub fn as_matrix_shape(&self) -> Result<(usize, usize)> {
        match self.shape[..] {
            [v] => Ok((1, v)),
            [n, v] => Ok((n, v)),
            _ => Err(Error::Shape(format!(
                "{}: expected a 1-D or 2-D tensor, got shape {}",
                self.source,
                shape_str(&self.shape)
            ))),
        }
    }
}

fn word16(c: &[u8], be: bool) -> u16 {
    let a = [c[0], c[1]];
    if be { u16::from_be_bytes(a) } else { u16::from_le_bytes(a) }
}
fn word32(c: &[u8], be: bool) -> u32 {
    let a = [c[0], c[1], c[2], c[3]];
    if be { u32::from_be_bytes(a) } else { u32::from_le_bytes(a) }
}
fn word64(c: &[u8], be: bool) -> u64 {
    let a: [u8; 8] = c[..8].try_into().expect("8 bytes");
    if be { u64::from_be_bytes(a) } else { u64::from_le_bytes(a) }
}

/// Element count of `shape` times `size`, or an error on overflow.
fn byte_len(path: &Path, shape: &[usize], size: usize) -> Result<usize> {
    shape
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| fmt_err(path, format!("shape {} is too large", shape_str(shape))))
}

/// Parses a `.npy` header and maps the data.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    npy_from_storage(map_file(path)?, path)
}

/// Parses a whole `.npy` file held in memory; `path` only names it in messages.
/// (The entry point of the fuzz target.)
pub fn npy_from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Tensor> {
    npy_from_storage(Storage::Owned(bytes), path)
}

fn npy_from_storage(storage: Storage, path: &Path) -> Result<Tensor> {
    let (dtype, big_endian, fortran, shape, offset) =
        parse_npy_header(storage.bytes()).map_err(|w| fmt_err(path, w))?;
    let len = byte_len(path, &shape, dtype.size())?;
    let have = storage.bytes().len() - offset;
    if have < len {
        return Err(fmt_err(
            path,
            format!(
                "truncated: shape {} of {} needs {len} data bytes, the file has {have}",
                shape_str(&shape),
                dtype.name()
            ),
        ));
    }
    Ok(Tensor { source: path.display().to_string(), dtype, shape, storage, offset, len, fortran, big_endian })
}

/// Parses the header of a `.npy` file: `(dtype, big_endian, fortran_order, shape, data offset)`.
///
/// Public so that the fuzz target can drive it directly.
pub fn parse_npy_header(b: &[u8]) -> std::result::Result<(DType, bool, bool, Vec<usize>, usize), String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if b.len() < 10 || &b[..6] != MAGIC {
        return Err("not a .npy file (bad magic or shorter than a header)".into());
    }
    let (hlen, start): (usize, usize) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            if b.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let end = start.checked_add(hlen).filter(|&e| e <= b.len()).ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(&b[start..end]).map_err(|_| "the .npy header is not text")?;
    let descr = dict_value(header, "descr").ok_or("the .npy header has no 'descr'")?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let (big_endian, code) = match descr.as_bytes().first() {
        Some(b'<') | Some(b'|') | Some(b'=') => (false, &descr[1..]),
        Some(b'>') => (true, &descr[1..]),
        _ => (false, descr),
    };
    let dtype = match code {
        "f4" => DType::F32,
        "f8" => DType::F64,
        "f2" => DType::F16,
        "i4" => DType::I32,
        "i8" => DType::I64,
        other => return Err(format!("unsupported dtype '{other}' (expected f4, f8, f2, i4 or i8)")),
    };
    let fortran = match dict_value(header, "fortran_order").map(str::trim) {
        Some("True") => true,
        Some("False") => false,
        _ => return Err("the .npy header has no valid 'fortran_order'".into()),
    };
    let shape_txt = dict_value(header, "shape").ok_or("the .npy header has no 'shape'")?.trim();
    let inner = shape_txt
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("bad shape '{shape_txt}' in the .npy header"))?;
    let mut shape = Vec::new();
    for part in inner.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        shape.push(
            part.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("bad dimension '{part}' in the .npy shape"))?,
        );
    }
    Ok((dtype, big_endian, fortran, shape, end))
}

/// The text of `'key': VALUE` in a Python dict literal, up to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    // The key in either quotes, then `:` after any spaces (numpy writes none; Python's
    // dict syntax allows them).
    let rest = ['\'', '"'].iter().find_map(|q| {
        let quoted = format!("{q}{key}{q}");
        header.match_indices(&quoted).find_map(|(p, _)| header[p + quoted.len()..].trim_start().strip_prefix(':'))
    })?;
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    None
}

/// Reads the tensor `name` of a `.safetensors` file.
pub fn read_safetensors(path: &Path, name: &str) -> Result<Tensor> {
    safetensors_from_storage(map_file(path)?, path, name)
}

/// The `__metadata__` string map of a `.safetensors` file (empty when it has none).
pub fn read_safetensors_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    let storage = map_file(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(storage.bytes())
        .map_err(|e| fmt_err(path, format!("not a valid .safetensors file: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// The 1-based line on which the CSV record whose position is byte `at` of `path` starts,
/// counting `\n`, `\r\n` and a lone `\r` as one line break each. The csv crate places a
/// record right after the one before it ended, so the rest of that line end and any blank
/// lines are skipped first; its own line count is off after `\r\n` and blank lines. Reads
/// the file again: for error messages only.
fn line_at(path: &Path, at: u64) -> Option<usize> {
    use std::io::Read;
    let mut r = std::io::BufReader::new(std::fs::File::open(path).ok()?);
    let (mut line, mut pos, mut prev_cr) = (1usize, 0u64, false);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let k = r.read(&mut buf).ok()?;
        if k == 0 {
            return Some(line);
        }
        for &b in &buf[..k] {
            let brk = b == b'\n' || b == b'\r';
            if pos >= at && !brk {
                return Some(line);
            }
            // A `\n` right after a `\r` ends the same line.
            if brk && !(b == b'\n' && prev_cr) {
                line += 1;
            }
            prev_cr = b == b'\r';
            pos += 1;
        }
    }
}

/// A numeric CSV table: every column a feature but the optional label column.
#[derive(Clone, Debug, PartialEq)]
pub struct CsvTable {
    /// `[rows, cols]`, row-major.
    pub features: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    /// The header's names of the feature columns, in order.
    pub feature_names: Vec<String>,
    /// The label column as class ids, when one was named.
    pub labels: Option<Vec<i64>>,
}

/// Reads a CSV file with a header row. Every field must be a finite number; the label
/// column's must be non-negative integers (written `3` or `3.0`).
///
/// Errors name the file, the line number and the column: an unknown `label_column`, a row
/// with a different number of fields than the header, a field that is not a number.
pub fn read_csv(path: &Path, label_column: Option<&str>) -> Result<CsvTable> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut rdr = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(std::io::BufReader::new(file));
    let csv_err = |e: csv::Error| match e.kind() {
        csv::ErrorKind::Io(_) => match e.into_kind() {
            csv::ErrorKind::Io(io) => io_err(path, io),
            _ => unreachable!(),
        },
        _ => fmt_err(path, e.to_string()),
    };
    let header: Vec<String> = rdr.headers().map_err(csv_err)?.iter().map(|h| h.trim().to_string()).collect();
    if header.is_empty() || header.iter().all(|h| h.is_empty()) {
        return Err(fmt_err(path, "the CSV file has no header row"));
    }
    for (j, h) in header.iter().enumerate() {
        if let Some(first) = header[..j].iter().position(|g| g == h) {
            return Err(fmt_err(
                path,
                format!(
                    "the header names column '{h}' twice (columns {} and {}); names must be unique",
                    first + 1,
                    j + 1
                ),
            ));
        }
    }
    let label_idx = match label_column {
        None => None,
        Some(name) => Some(header.iter().position(|h| h == name).ok_or_else(|| {
            fmt_err(path, format!("no column named '{name}' (the header has: {})", header.join(", ")))
        })?),
    };
    let feature_names: Vec<String> =
        header.iter().enumerate().filter(|(j, _)| Some(*j) != label_idx).map(|(_, h)| h.clone()).collect();
    let cols = feature_names.len();
    let (mut features, mut labels, mut rows) = (Vec::new(), label_idx.map(|_| Vec::new()), 0usize);
    let mut record = csv::StringRecord::new();
    loop {
        let more = rdr.read_record(&mut record).map_err(csv_err)?;
        if !more {
            break;
        }
        // (Only for messages: counted from the record's byte offset, on an error.)
        let at = record.position().map(csv::Position::byte);
        let line = || at.and_then(|b| line_at(path, b)).unwrap_or(rows + 2);
        if record.len() == 1 && record[0].trim().is_empty() && header.len() > 1 {
            continue; // a blank line
        }
        if record.len() != header.len() {
            return Err(fmt_err(
                path,
                format!("line {} has {} fields, but the header has {}", line(), record.len(), header.len()),
            ));
        }
        for (j, field) in record.iter().enumerate() {
            let f = field.trim();
            let value: f64 = f.parse().ok().filter(|v: &f64| v.is_finite()).ok_or_else(|| {
                let what = if Some(j) == label_idx { "a non-negative integer class id" } else { "a finite number" };
                let kind = if Some(j) == label_idx { "label column" } else { "column" };
                fmt_err(path, format!("line {}, {kind} '{}': '{f}' is not {what}", line(), header[j]))
            })?;
            if Some(j) == label_idx {
                // Whole numbers exactly as written (an f64 would round those above 2^53).
                if let Ok(id) = f.parse::<i64>()
                    && id >= 0
                {
                    labels.as_mut().expect("label column").push(id);
                    continue;
                }
                // (i64::MAX as f64 is 2^63, itself out of range.)
                if value < 0.0 || value.fract() != 0.0 || value >= i64::MAX as f64 {
                    let why = if value >= i64::MAX as f64 {
                        "too large for a class id"
                    } else {
                        "not a non-negative integer class id"
                    };
                    return Err(fmt_err(
                        path,
                        format!("line {}, label column '{}': '{f}' is {why}", line(), header[j]),
                    ));
                }
                labels.as_mut().expect("label column").push(value as i64);
            } else {
                let v = value as f32;
                if v.is_infinite() {
                    return Err(fmt_err(
                        path,
                        format!("line {}, column '{}': '{f}' is beyond the f32 range (±3.4e38)", line(), header[j]),
                    ));
                }
                features.push(v);
            }
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(fmt_err(path, "the CSV file has a header but no data rows"));
    }
    if cols == 0 {
        return Err(fmt_err(path, "the CSV file has no feature columns, only the label column"));
    }
    Ok(CsvTable { features, rows, cols, feature_names, labels })
}

/// Parses a whole `.safetensors` file held in memory and takes tensor `name`; `path` only
/// names it in messages. (The entry point of the fuzz target.)
pub fn safetensors_from_bytes(bytes: Vec<u8>, path: &Path, name: &str) -> Result<Tensor> {
    safetensors_from_storage(Storage::Owned(bytes), path, name)
}

/// Tensor `name` of a `.safetensors` file, or `None` when the file has no tensor of that
/// name (for optional tensors: a bias, a checkpoint's optional state). Any other problem
/// is an error.
pub fn read_safetensors_optional(path: &Path, name: &str) -> Result<Option<Tensor>> {
    safetensors_lookup(map_file(path)?, path, name).map(|r| r.ok())
}

fn safetensors_from_storage(storage: Storage, path: &Path, name: &str) -> Result<Tensor> {
    safetensors_lookup(storage, path, name)?.map_err(|mut names| {
        names.sort();
        fmt_err(path, format!("no tensor named '{name}' (it holds: {})", names.join(", ")))
    })
}

/// The tensor, or (inner `Err`) the names the file does hold when it has none called `name`.
fn safetensors_lookup(storage: Storage, path: &Path, name: &str) -> Result<std::result::Result<Tensor, Vec<String>>> {
    let bytes = storage.bytes();
    let (n, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| fmt_err(path, format!("not a valid .safetensors file: {e}")))?;
    let Some(info) = meta.info(name) else {
        return Ok(Err(meta.tensors().keys().cloned().collect()));
    };
    use safetensors::Dtype as D;
    let dtype = match info.dtype {
        D::F32 => DType::F32,
        D::F64 => DType::F64,
        D::F16 => DType::F16,
        D::BF16 => DType::BF16,
        D::I32 => DType::I32,
        D::I64 => DType::I64,
        other => return Err(fmt_err(path, format!("tensor '{name}' has unsupported dtype {other:?}"))),
    };
    let (start, end) = info.data_offsets;
    let len = byte_len(path, &info.shape, dtype.size())?;
    let offset = 8 + n;
    if end - start != len || offset + end > bytes.len() {
        return Err(fmt_err(path, format!("tensor '{name}': data offsets do not match its shape or the file size")));
    }
    let shape = info.shape.clone();
    Ok(Ok(Tensor {
        source: format!("{}:{name}", path.display()),
        dtype,
        shape,
        storage,
        offset: offset + start,
        len,
        fortran: false,
        big_endian: false,
    }))
}

/// The folder a file `path` would go in (`.` for a bare name).
fn folder_of(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Checks that the folder an output `path` would go in exists: callers with long work ahead
/// call it first, so that a typo fails before the work rather than after it.
pub fn check_output_folder(path: &Path) -> Result<()> {
    let dir = folder_of(path);
    if !dir.is_dir() {
        let what = format!("the folder {} does not exist", dir.display());
        return Err(io_err(path, std::io::Error::new(std::io::ErrorKind::NotFound, what)));
    }
    Ok(())
}

/// The name prefix of [`write_atomic`]'s temporary files (hidden; a process killed between
/// creating and renaming one leaves it behind).
pub(crate) const TEMP_PREFIX: &str = ".softmax-layer-";

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, synced,
/// then renamed over `path`. A new file gets the usual mode (`0666` less the umask); a
/// replaced one keeps its own. A symbolic link is written through (its target is replaced
/// the same way), and what is not a regular file (a pipe, a device such as `/dev/stdout`)
/// is written to directly, never renamed over.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    let resolved = match std::fs::metadata(path) {
        // A pipe, a socket or a device (through links too, /proc's included): write into it.
        Ok(m) if !m.is_file() && !m.is_dir() => {
            let mut f = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| io_err(path, e))?;
            f.write_all(bytes).map_err(|e| io_err(path, e))?;
            return Ok(());
        }
        // A link to a regular file: replace the file it names, not the link.
        Ok(_) if link => std::fs::canonicalize(path).map_err(|e| io_err(path, e))?,
        // A dangling link (or a chain of them): create what the last one names. A loop is
        // the OS's "too many levels of symbolic links", reported, not written over.
        Err(e) if link => {
            if e.raw_os_error() == Some(40) {
                return Err(io_err(path, e));
            }
            let mut at = path.to_path_buf();
            for _ in 0..40 {
                match std::fs::symlink_metadata(&at) {
                    Ok(m) if m.file_type().is_symlink() => {
                        let target = std::fs::read_link(&at).map_err(|e| io_err(path, e))?;
                        at = at.parent().unwrap_or(Path::new(".")).join(target);
                    }
                    _ => break,
                }
            }
            if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                let what = "too many levels of symbolic links";
                return Err(io_err(path, std::io::Error::other(what)));
            }
            at
        }
        _ => path.to_path_buf(),
    };
    let path: &Path = &resolved;
    check_output_folder(path)?;
    let dir = folder_of(path);
    let mut builder = tempfile::Builder::new();
    builder.prefix(TEMP_PREFIX);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    // (The temporary file's own name stays out of the message: only `path` is the user's.)
    let mut tmp = builder.tempfile_in(dir).map_err(|e| {
        let why =
            e.raw_os_error().map_or_else(|| e.kind().to_string(), |c| std::io::Error::from_raw_os_error(c).to_string());
        io_err(path, std::io::Error::new(e.kind(), format!("cannot create a file in {}: {why}", dir.display())))
    })?;
    if let Ok(meta) = std::fs::metadata(path) {
        tmp.as_file().set_permissions(meta.permissions()).map_err(|e| io_err(path, e))?;
    }
    tmp.write_all(bytes).map_err(|e| io_err(path, e))?;
    tmp.as_file().sync_all().map_err(|e| io_err(path, e))?;
    tmp.persist(path).map_err(|e| io_err(path, e.error))?;
    Ok(())
}

/// The bytes of a version 1.0 `.npy` file holding `data` with `shape`.
fn npy_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape_txt = match shape {
        [d] => format!("({d},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Pad with spaces so that the data start is 64-byte aligned, ending in '\n'.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// That `shape` holds exactly `len` elements (its product checked, not wrapped).
fn check_npy_shape(path: &Path, shape: &[usize], len: usize) -> Result<()> {
    if shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d)) != Some(len) {
        return Err(Error::Shape(format!("{}: shape {shape:?} does not hold the {len} values given", path.display())));
    }
    Ok(())
}

/// Writes an `f32` `.npy` file atomically.
pub fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    check_npy_shape(path, shape, data.len())?;
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_atomic(path, &npy_bytes("<f4", shape, &bytes))
}

/// Writes an `i64` `.npy` file atomically.
pub fn write_npy_i64(path: &Path, shape: &[usize], data: &[i64]) -> Result<()> {
    check_npy_shape(path, shape, data.len())?;
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_atomic(path, &npy_bytes("<i8", shape, &bytes))
}

/// A tensor to write into a `.safetensors` file.
pub enum OutTensor<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    I64(&'a [i64]),
    /// bf16, as bits.
    Bf16Bits(&'a [u16]),
}

/// Writes named tensors into one `.safetensors` file atomically.
pub fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, OutTensor<'_>)]) -> Result<()> {
    write_safetensors_with_metadata(path, tensors, None)
}

/// [`write_safetensors`] with a `__metadata__` string map in the header.
pub fn write_safetensors_with_metadata(
    path: &Path,
    tensors: &[(&str, Vec<usize>, OutTensor<'_>)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    use safetensors::tensor::TensorView;
    for (i, (name, _, _)) in tensors.iter().enumerate() {
        if *name == "__metadata__" || tensors[..i].iter().any(|(n, _, _)| n == name) {
            let why = if *name == "__metadata__" { "is reserved for the header's metadata" } else { "appears twice" };
            return Err(fmt_err(path, format!("tensor name '{name}' {why}")));
        }
    }
    let bufs: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, t)| match t {
            OutTensor::F32(d) => (
                name.to_string(),
                safetensors::Dtype::F32,
                shape.clone(),
                d.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            OutTensor::F64(d) => (
                name.to_string(),
                safetensors::Dtype::F64,
                shape.clone(),
                d.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            OutTensor::I64(d) => (
                name.to_string(),
                safetensors::Dtype::I64,
                shape.clone(),
                d.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            OutTensor::Bf16Bits(d) => (
                name.to_string(),
                safetensors::Dtype::BF16,
                shape.clone(),
                d.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(n, dt, s, b)| {
            TensorView::new(*dt, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| fmt_err(path, format!("tensor '{n}': {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| fmt_err(path, e.to_string()))?;
    write_atomic(path, &bytes)
}
