//! The tiled engine: every operation of the layer is one loop with a different consumer.
//!
//! ```text
//! for each block of rows R (parallel)                 hidden[R] : r x d
//!   for each segment of classes G, in order           (parallel too when rows are few)
//!     for each tile of classes C in G, in order
//!       tile = hidden[R] · W[C]ᵀ + b[C]               r x c, stays in cache
//!       consumer.visit(state, tile, R, C)              online (max, sum) | gather | top-k | write-out
//!   state[R] = merge(state[R, G0], state[R, G1], ...)  left to right
//! ```
//!
//! Memory is `O(threads × r × c)` whatever `n` and `V` are: the `n × V` logits are never
//! held unless a consumer writes them out.
//!
//! The split into row blocks, segments and tiles is fixed by [`Tiling`], never by the
//! number of threads, and states merge in class order; so results are bit-identical for
//! any thread count. Where `W` lives and what type it has is the [`LogitSource`]'s concern:
//! an `f32` or bf16 layer in memory (one source, its precision its own), a vocabulary shard
//! tomorrow.

use crate::linalg::AlignedF32;
use crate::matrix::MatRef;
use rayon::prelude::*;
use std::ops::Range;

/// Computes tiles of logits: the engine's only view of the weights.
pub trait LogitSource: Sync {
    /// Per-task state for one block of hidden rows: for example the rows packed once for
    /// the matrix product, and scratch space, reused by every tile of the task.
    type Rows;
    /// Number of classes `V`.
    fn vocab(&self) -> usize;
    /// Hidden size `d`.
    fn hidden_dim(&self) -> usize;
    /// Prepares a block of hidden rows for [`LogitSource::logits_tile`].
    fn prepare_rows(&self, hidden: MatRef<'_>) -> Self::Rows;
    /// Writes `tile[i * cols.len() + j] = hidden[i] · W[cols.start + j] + b[cols.start + j]`
    /// for the `hidden.rows()` rows given (those `rows` was prepared from). `tile` has
    /// exactly `hidden.rows() * cols.len()` elements. Must be deterministic and must not
    /// use other threads.
    fn logits_tile(&self, rows: &mut Self::Rows, hidden: MatRef<'_>, cols: Range<usize>, tile: &mut [f32]);
}

/// What the engine does with each tile of logits.
pub trait Consumer: Sync {
    /// Partial state for a block of rows over a range of classes.
    type State: Send;
    /// The state of `rows` before any class was seen.
    fn init(&self, rows: Range<usize>) -> Self::State;
    /// The state of `rows` before the classes of a segment, when `left` is the state of the
    /// same rows over every class to its left (the engine passes it when it has it; a
    /// consumer may use it to skip work, never to change its result). Defaults to
    /// [`Consumer::init`].
    fn init_after(&self, rows: Range<usize>, left: &Self::State) -> Self::State {
        let _ = left;
        self.init(rows)
    }
    /// Folds one tile, `rows.len() x cols.len()`, row-major, into the state.
    fn visit(&self, state: &mut Self::State, tile: &[f32], rows: Range<usize>, cols: Range<usize>);
    /// Combines the states of the same rows over two adjacent class ranges, `left` first.
    fn merge(&self, left: Self::State, right: Self::State) -> Self::State;
}

/// The fixed decomposition of the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// Rows per block.
    pub row_block: usize,
    /// Classes per tile.
    pub col_tile: usize,
    /// Classes per segment (a multiple of `col_tile`): the unit of parallel work over `V`.
    pub segment: usize,
}

impl Tiling {
    /// The same tiling made usable: at least one row per block and one class per tile, and
    /// a segment that is a whole number of tiles (rounded up, saturating). The engine and
    /// [`crate::SoftmaxLayer::with_tiling`] apply it, so any values are safe.
    pub fn normalized(self) -> Tiling {
        let col_tile = self.col_tile.max(1);
        let tiles = self.segment.max(col_tile).div_ceil(col_tile);
        let segment = tiles.saturating_mul(col_tile);
        let segment = segment - segment % col_tile;
        Tiling { row_block: self.row_block.max(1), col_tile, segment }
    }
}

impl Default for Tiling {
    fn default() -> Self {
        Tiling { row_block: 256, col_tile: 512, segment: 8192 }
    }
}

fn ranges(len: usize, step: usize) -> Vec<Range<usize>> {
    let step = step.max(1);
    (0..len).step_by(step).map(|s| s..s.saturating_add(step).min(len)).collect()
}

/// Runs `consumer` over all of `hidden · Wᵀ + b` and returns one state per block of rows,
/// in row order, with its row range.
pub fn run<S: LogitSource + ?Sized, C: Consumer>(
    source: &S,
    hidden: MatRef<'_>,
    consumer: &C,
    tiling: Tiling,
) -> Vec<(Range<usize>, C::State)> {
    let (n, v) = (hidden.rows(), source.vocab());
    assert_eq!(hidden.cols(), source.hidden_dim(), "engine: hidden size mismatch");
    let tiling = tiling.normalized();
    let segment = tiling.segment;
    let row_blocks = ranges(n, tiling.row_block);
    let segments = ranges(v, segment);
    // One segment of one row block, with the rows prepared by the caller (once per task)
    // and a tile buffer whose start is 64-byte aligned (whole cache lines for the kernels).
    let work = |rows: &Range<usize>, seg: &Range<usize>, prepared: &mut S::Rows, left: Option<&C::State>| -> C::State {
        let mut state = match left {
            Some(l) => consumer.init_after(rows.clone(), l),
            None => consumer.init(rows.clone()),
        };
        let h = hidden.sub_rows(rows.clone());
        let len = rows.len() * tiling.col_tile.min(seg.len());
        let mut tile = AlignedF32::zeroed(len);
        for s in (seg.start..seg.end).step_by(tiling.col_tile) {
            let cols = s..(s + tiling.col_tile).min(seg.end);
            let t = &mut tile[..rows.len() * cols.len()];
            source.logits_tile(prepared, h, cols.clone(), t);
            consumer.visit(&mut state, t, rows.clone(), cols);
        }
        state
    };
    let threads = rayon::current_num_threads();
    if row_blocks.len() >= 2 * threads {
        // Many rows: a task per row block, merging segment states as they come, so live
        // states stay O(threads).
        return row_blocks
            .into_par_iter()
            .map(|rows| {
                let mut prepared = source.prepare_rows(hidden.sub_rows(rows.clone()));
                // Segments in order, each told what the ones to its left found.
                let mut st: Option<C::State> = None;
                for seg in &segments {
                    let right = work(&rows, seg, &mut prepared, st.as_ref());
                    st = Some(match st {
                        Some(left) => consumer.merge(left, right),
                        None => right,
                    });
                }
                let st = st.unwrap_or_else(|| consumer.init(rows.clone()));
                (rows, st)
            })
            .collect();
    }
    // Few rows (decoding, small batches): a task per (row block, segment) pair, merged in
    // the same left-to-right order afterwards.
    let pairs: Vec<(usize, usize)> =
        (0..row_blocks.len()).flat_map(|r| (0..segments.len()).map(move |g| (r, g))).collect();
    let mut states: Vec<C::State> = pairs
        .par_iter()
        .map(|&(r, g)| {
            let rows = &row_blocks[r];
            work(rows, &segments[g], &mut source.prepare_rows(hidden.sub_rows(rows.clone())), None)
        })
        .collect();
    let mut out = Vec::with_capacity(row_blocks.len());
    for rows in row_blocks.into_iter().rev() {
        let tail = states.split_off(states.len() - segments.len());
        let st = tail.into_iter().reduce(|a, b| consumer.merge(a, b)).unwrap_or_else(|| consumer.init(rows.clone()));
        out.push((rows, st));
    }
    out.reverse();
    out
}
