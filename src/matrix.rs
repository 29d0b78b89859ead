//! Borrowed row-major matrix views with a row stride.
//!
//! A view of `rows x cols` with stride `s >= cols` addresses element `(i, j)` at
//! `data[i * s + j]`; it needs `data.len() >= (rows - 1) * s + cols` (or 0 when
//! `rows == 0`). Elements between `cols` and `s` in each row are never read or written.

use crate::error::{Error, Result};
use rayon::prelude::*;

fn required_len(rows: usize, cols: usize, stride: usize) -> Option<usize> {
    if rows == 0 { Some(0) } else { (rows - 1).checked_mul(stride)?.checked_add(cols) }
}

fn check(len: usize, rows: usize, cols: usize, stride: usize, name: &str) -> Result<()> {
    if stride < cols {
        return Err(Error::Shape(format!("{name}: row stride {stride} is less than the {cols} columns")));
    }
    match required_len(rows, cols, stride) {
        Some(need) if need <= len => Ok(()),
        _ => Err(Error::Shape(format!(
            "{name}: a [{rows}, {cols}] view with row stride {stride} needs more than the {len} elements given"
        ))),
    }
}

/// An immutable `[rows, cols]` view.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous `[rows, cols]` view of `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::with_stride(data, rows, cols, cols)
    }

    /// A `[rows, cols]` view whose rows start `stride` elements apart.
    pub fn with_stride(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Result<Self> {
        check(data.len(), rows, cols, stride, "matrix")?;
        Ok(MatRef { data, rows, cols, stride })
    }

    /// One row of length `cols` viewed as a `[1, cols]` matrix.
    pub fn from_row(row: &'a [f32]) -> Self {
        MatRef { data: row, rows: 1, cols: row.len(), stride: row.len() }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn row_stride(&self) -> usize {
        self.stride
    }

    /// The rows in `range`, as a view.
    ///
    /// # Panics
    /// If the range is out of bounds.
    pub fn sub_rows(&self, range: std::ops::Range<usize>) -> MatRef<'a> {
        assert!(range.start <= range.end && range.end <= self.rows, "rows {range:?} out of bounds for {}", self.rows);
        let start = (range.start * self.stride).min(self.data.len());
        MatRef { data: &self.data[start..], rows: range.len(), cols: self.cols, stride: self.stride }
    }

    /// The backing slice from the first element of the view to its last.
    pub(crate) fn as_slice(&self) -> &'a [f32] {
        &self.data[..required_len(self.rows, self.cols, self.stride).unwrap_or(0)]
    }

    /// Finds the first NaN or infinity, as `(row, col, value)`.
    pub fn find_non_finite(&self) -> Option<(usize, usize, f32)> {
        // A branch-free scan over blocks (it vectorizes); the position only on failure. Large
        // matrices are scanned by all threads, the first bad element in row order reported.
        let clean = all_finite;
        let check_row = |i: usize| {
            let row = self.row(i);
            if row.chunks(64).all(clean) {
                return None;
            }
            row.iter().position(|v| !v.is_finite()).map(|j| (i, j, row[j]))
        };
        if self.rows * self.cols < 1 << 18 {
            return (0..self.rows).find_map(check_row);
        }
        let min_rows = ((1usize << 16) / self.cols.max(1)).max(1);
        (0..self.rows).into_par_iter().with_min_len(min_rows).find_map_first(check_row)
    }

    /// Row `i`, of length `cols`.
    ///
    /// # Panics
    /// If `i >= rows`.
    pub fn row(&self, i: usize) -> &'a [f32] {
        assert!(i < self.rows, "row {i} out of bounds for {} rows", self.rows);
        &self.data[i * self.stride..i * self.stride + self.cols]
    }
}

/// A mutable `[rows, cols]` view.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<'a> MatMut<'a> {
    /// A contiguous `[rows, cols]` view of `data`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::with_stride(data, rows, cols, cols)
    }

    /// A `[rows, cols]` view whose rows start `stride` elements apart.
    pub fn with_stride(data: &'a mut [f32], rows: usize, cols: usize, stride: usize) -> Result<Self> {
        check(data.len(), rows, cols, stride, "matrix")?;
        Ok(MatMut { data, rows, cols, stride })
    }

    /// One row viewed as a `[1, cols]` matrix.
    pub fn from_row(row: &'a mut [f32]) -> Self {
        let cols = row.len();
        MatMut { data: row, rows: 1, cols, stride: cols }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn row_stride(&self) -> usize {
        self.stride
    }

    /// An immutable view of the same elements.
    pub fn as_ref(&self) -> MatRef<'_> {
        MatRef { data: self.data, rows: self.rows, cols: self.cols, stride: self.stride }
    }

    /// Row `i`, mutably.
    ///
    /// # Panics
    /// If `i >= rows`.
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows, "row {i} out of bounds for {} rows", self.rows);
        &mut self.data[i * self.stride..i * self.stride + self.cols]
    }

    /// The backing slice, trimmed to the last element of the view.
    pub(crate) fn data_mut(&mut self) -> &mut [f32] {
        let n = required_len(self.rows, self.cols, self.stride).unwrap_or(0);
        &mut self.data[..n]
    }
}

/// How a weight matrix `W` of a layer with `V` classes and hidden size `d` is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum WeightLayout {
    /// `[V, d]`, row-major: PyTorch's `nn.Linear.weight` and Hugging Face's `lm_head.weight`.
    /// Logits are `H · Wᵀ`.
    #[default]
    VocabMajor,
    /// `[d, V]`, row-major: the textbook `H · W`.
    HiddenMajor,
}

impl WeightLayout {
    /// Parses the command-line words `vd` (VocabMajor) and `dv` (HiddenMajor).
    pub fn parse(s: &str) -> Option<WeightLayout> {
        match s {
            "vd" => Some(WeightLayout::VocabMajor),
            "dv" => Some(WeightLayout::HiddenMajor),
            _ => None,
        }
    }

    /// The shape `[rows, cols]` of a weight with `vocab` classes and `hidden` size.
    pub fn shape(self, vocab: usize, hidden: usize) -> [usize; 2] {
        match self {
            WeightLayout::VocabMajor => [vocab, hidden],
            WeightLayout::HiddenMajor => [hidden, vocab],
        }
    }
}

/// Whether every value is finite: a branch-free fold (no early exit), so that it vectorizes.
pub(crate) fn all_finite(x: &[f32]) -> bool {
    x.iter().fold(true, |ok, v| ok & v.is_finite())
}

/// `len` copies of `value`, or an error naming `what` when the memory cannot be had (instead
/// of the abort a plain `vec!` gives on a huge length).
pub(crate) fn try_filled<T: Clone>(len: usize, value: T, what: impl FnOnce() -> String) -> crate::Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| crate::Error::InvalidArgument(format!("cannot allocate {}", what())))?;
    v.resize(len, value);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_non_finite_element_in_row_order_is_found_small_or_large() {
        // Small (one thread) and large (all threads, above 2^18 elements) matrices, with a
        // row stride past the columns whose padding holds NaN that must not count.
        for (rows, cols) in [(7usize, 9usize), (1000, 300)] {
            let stride = cols + 3;
            let mut data = vec![1.5f32; rows * stride];
            for i in 0..rows {
                data[i * stride + cols..(i + 1) * stride].fill(f32::NAN);
            }
            let view = |d: &[f32]| MatRef::with_stride(d, rows, cols, stride).unwrap().find_non_finite();
            assert_eq!(view(&data), None);
            data[(rows - 1) * stride + 2] = f32::NAN;
            data[(rows / 3) * stride + cols - 1] = f32::INFINITY;
            let got = view(&data).unwrap();
            assert_eq!((got.0, got.1), (rows / 3, cols - 1));
            assert_eq!(got.2, f32::INFINITY);
            data[(rows / 3) * stride + cols - 1] = 2.0;
            let got = view(&data).unwrap();
            assert_eq!((got.0, got.1), (rows - 1, 2));
            assert!(got.2.is_nan());
        }
    }

    #[test]
    fn a_view_without_columns_has_no_non_finite_element() {
        // The stride's padding holds NaN, which a zero-width view does not see; many rows take
        // the parallel path's row-count arithmetic too.
        let data = vec![f32::NAN; 8];
        for (rows, stride) in [(0, 2), (1, 2), (3, 2), (1 << 20, 0)] {
            assert_eq!(MatRef::with_stride(&data, rows, 0, stride).unwrap().find_non_finite(), None, "{rows} rows");
        }
    }
}
