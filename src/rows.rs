//! Softmax, log-softmax and logsumexp over the rows of a matrix.
//!
//! For logits `x: [n, V]`, an optional additive mask `m: [n, V]` or `[1, V]` (broadcast
//! to every row; `-inf` allowed) and a temperature `T > 0`, with `z = x + m`:
//!
//! ```text
//! softmax(z / T)_ij     = exp((z_ij - M_i) / T) / S_i
//! log_softmax(z / T)_ij = (z_ij - M_i) / T - ln S_i
//! logsumexp(z / T)_i    = M_i / T + ln S_i
//! M_i = max_j z_ij,  S_i = Σ_j exp((z_ij - M_i) / T)
//! ```
//!
//! Each row is read once to get `(M_i, S_i)` (the online pass of
//! [`Kernels::max_sum`](crate::kernels::Kernels::max_sum)) and, for softmax and
//! log-softmax, once more to write the output while it is still in cache.
//!
//! # Parallelism and reproducibility
//!
//! Rows run in parallel on rayon's pool when the work is large enough; a row longer than
//! [`CHUNK`] elements is cut into fixed chunks whose `(max, sum)` states are merged in
//! order, in parallel when there are fewer rows than threads. The cut does not depend on
//! the thread count, so results are bit-identical for any number of threads.
//!
//! # Errors
//!
//! NaN or `+inf` in the logits or the mask, and rows that are entirely `-inf`, are
//! reported with their row and column, as is a finite logit plus a finite mask entry whose
//! sum overflows to `+inf` (`logits + mask`: the masked logit itself is out of range). They are detected as a by-product of the online pass
//! (a NaN or `+inf` makes the row's sum NaN; an all-`-inf` row has sum 0), so checking
//! costs nothing. The lowest offending row is the one reported. When an error is
//! returned, the contents of the output are unspecified; the in-place functions leave the
//! offending row untouched, though other rows may already hold their results.
//!
//! # Algorithms
//!
//! Out-of-place softmax computes each exponential once: the online pass writes
//! `exp((z - m_b) / T)` against the running maximum `m_b` of its block, then the output
//! row, still in cache, is scaled per block by `exp((m_b - M) / T) / S`. In-place softmax
//! and log-softmax use the classic two reads: the online pass, then a pass that writes
//! the result, so that a row with an error is never modified.

use crate::error::{Error, Result};
use crate::kernels::{Isa, Kernels, MaxSum, PrevLogRow, PrevRow};
use crate::matrix::{MatMut, MatRef};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Rows longer than this are reduced in chunks of this many elements (256 KiB of `f32`).
pub const CHUNK: usize = 1 << 16;
/// Below this many elements in all, work runs on the calling thread.
const PAR_MIN: usize = 1 << 15;
/// The default of [`set_stream_min_bytes`]: 16 MiB. At 32 MiB outputs ([8, 1000003],
/// [256, 32768], [64, 131072]) streaming made log-softmax 0.70–0.97 and softmax 0.74–1.0
/// as long, at 16 MiB ([2048, 2048]) it was neutral (`BENCH_STREAM_MIN` in `bench_rows`,
/// alternated).
pub const DEFAULT_STREAM_MIN_BYTES: usize = 16 << 20;

/// Outputs of at least this many bytes are written with non-temporal stores: they are not
/// re-read from the core's caches, and streaming saves reading each output line before
/// writing it.
static STREAM_MIN_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_STREAM_MIN_BYTES);

/// Sets the output size from which streaming stores are used (default
/// [`DEFAULT_STREAM_MIN_BYTES`]). The results are the same either way; tests use this to
/// cover both paths.
#[doc(hidden)]
pub fn set_stream_min_bytes(bytes: usize) {
    STREAM_MIN_BYTES.store(bytes, Ordering::Relaxed);
}
/// Rows up to this length keep the fused softmax's terms in a per-thread scratch row (in
/// L2) when streaming, so the output is written once, with streaming stores.
const SCRATCH_MAX: usize = 1 << 18;
/// Rows of this many elements or more are prefetched towards L2 while they are read,
/// [`crate::kernels::DEFAULT_PREFETCH_DISTANCE`] elements ahead of the pass (into the next row near a
/// row's end), so reading memory overlaps with computing: one thread's demand reads alone
/// leave the memory idle during the compute of a row held in cache, and the hardware
/// prefetchers stop at every 4 KiB page. Shorter rows are left to those.
const AHEAD_MIN: usize = 1 << 12;
/// The fused softmax of rows longer than this (not pipelined) does not prefetch: its
/// rescale reads back the terms that the prefetched lines would evict (at [8, 1000003],
/// 2.37 ms without against 2.72 ms with the row's next chunk, 256 KiB ahead, prefetched:
/// session 13, a build of `b00e554` with and without; the log has the runs).
const AHEAD_MAX: usize = 1 << 17;
static PREFETCH_AHEAD: AtomicBool = AtomicBool::new(true);

/// Turns the look-ahead prefetch of the rows off or on (default on). The results are the
/// same either way; benchmarks use this to measure what it brings.
#[doc(hidden)]
pub fn set_prefetch_ahead(on: bool) {
    PREFETCH_AHEAD.store(on, Ordering::Relaxed);
}

/// Whether the passes over rows of `v` elements prefetch ahead (see [`AHEAD_MIN`]).
fn prefetches(v: usize) -> bool {
    v >= AHEAD_MIN && PREFETCH_AHEAD.load(Ordering::Relaxed)
}

/// Options shared by the row functions.
#[derive(Clone, Copy, Debug)]
pub struct RowOptions<'a> {
    /// Divides the (masked) logits. Finite and `> 0`; default 1.
    pub temperature: f32,
    /// Added to the logits before the temperature: `[n, V]`, or `[1, V]` for all rows.
    /// `-inf` removes an entry (probability 0).
    pub mask: Option<MatRef<'a>>,
    /// Forces an instruction set; `None` uses [`Kernels::best`].
    pub isa: Option<Isa>,
}

impl Default for RowOptions<'_> {
    fn default() -> Self {
        RowOptions { temperature: 1.0, mask: None, isa: None }
    }
}

impl<'a> RowOptions<'a> {
    /// Options with the given temperature and nothing else.
    pub fn with_temperature(temperature: f32) -> Self {
        RowOptions { temperature, ..Default::default() }
    }
}

/// Checks that a temperature is finite and `> 0`, and that `2 / T` is finite too (`T` at
/// least [`MIN_TEMPERATURE`], about 5.9e-39: the kernels multiply by `1 / T`, and
/// log-softmax by `2 / T`).
pub fn check_temperature(t: f32) -> Result<()> {
    if t.is_finite() && t > 0.0 && (2.0 / t).is_finite() { Ok(()) } else { Err(Error::InvalidTemperature(t)) }
}

/// The smallest temperature accepted: the least `f32` whose double reciprocal `2 / T` is
/// finite (a subnormal; the test `min_temperature_is_the_least_accepted` checks it).
pub const MIN_TEMPERATURE: f32 = 5.877_473e-39;

/// The resolved form of [`RowOptions`] for an `[n, V]` input.
struct Plan<'a> {
    k: &'static Kernels,
    t: f32,
    mask: Option<MatRef<'a>>,
}

impl<'a> Plan<'a> {
    fn new(opts: &RowOptions<'a>, n: usize, v: usize) -> Result<Self> {
        check_temperature(opts.temperature)?;
        let k = match opts.isa {
            Some(isa) => Kernels::for_isa(isa).ok_or(Error::UnsupportedIsa(isa))?,
            None => Kernels::best(),
        };
        if n > 0 && v == 0 {
            return Err(Error::Shape(format!("logits are [{n}, 0]: a softmax over no classes is undefined")));
        }
        if let Some(m) = opts.mask
            && (m.cols() != v || (m.rows() != n && m.rows() != 1))
        {
            return Err(Error::Shape(format!(
                "mask is [{}, {}], expected [{n}, {v}] or [1, {v}] for logits [{n}, {v}]",
                m.rows(),
                m.cols()
            )));
        }
        Ok(Plan { k, t: opts.temperature, mask: opts.mask })
    }

    fn mask_row(&self, i: usize) -> Option<&'a [f32]> {
        self.mask.map(|m| if m.rows() == 1 { m.row(0) } else { m.row(i) })
    }

    /// `(M, S)` of a row, chunk by chunk, merged in order; chunks in parallel if asked.
    /// With `ahead`, the memory ahead of each chunk is prefetched meanwhile.
    fn stats(&self, row: &[f32], mask: Option<&[f32]>, parallel: bool, ahead: bool) -> MaxSum {
        let chunk_stats = |(c, chunk): (usize, &[f32])| {
            let m = mask.map(|m| &m[c * CHUNK..c * CHUNK + chunk.len()]);
            self.k.max_sum_ahead(chunk, m, self.t, ahead)
        };
        if parallel && row.len() > CHUNK {
            let parts: Vec<MaxSum> = row.par_chunks(CHUNK).enumerate().map(chunk_stats).collect();
            parts.into_iter().fold(MaxSum::EMPTY, |a, b| a.merge(b, self.t))
        } else {
            row.chunks(CHUNK).enumerate().map(chunk_stats).fold(MaxSum::EMPTY, |a, b| a.merge(b, self.t))
        }
    }
}

/// Turns a row's `(M, S)` into an error when the row is invalid.
fn check_row(stats: MaxSum, row: &[f32], mask: Option<&[f32]>, i: usize) -> Result<()> {
    if stats.sum.is_nan() {
        for (j, &x) in row.iter().enumerate() {
            let bad = |v: f32| v.is_nan() || v == f32::INFINITY;
            if bad(x) {
                return Err(Error::NonFinite { tensor: "logits".into(), row: i, col: j, value: x });
            }
            if let Some(m) = mask {
                if bad(m[j]) {
                    return Err(Error::NonFinite { tensor: "mask".into(), row: i, col: j, value: m[j] });
                }
                if bad(x + m[j]) {
                    return Err(Error::NonFinite { tensor: "logits + mask".into(), row: i, col: j, value: x + m[j] });
                }
            }
        }
        unreachable!("a NaN row sum without a NaN or +inf input");
    }
    if stats.sum == 0.0 {
        return Err(Error::AllMasked { row: i });
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Softmax,
    LogSoftmax,
}

/// Pass 2 of one row (or chunk): `src` is `None` for in-place.
fn write_row(k: &Kernels, op: Op, src: Option<&[f32]>, mask: Option<&[f32]>, t: f32, stats: MaxSum, out: &mut [f32]) {
    match (op, src) {
        (Op::Softmax, Some(s)) => k.softmax_into(s, mask, t, stats, out),
        (Op::Softmax, None) => k.softmax_in_place(out, mask, t, stats),
        (Op::LogSoftmax, Some(s)) => k.log_softmax_into(s, mask, t, stats, out),
        (Op::LogSoftmax, None) => k.log_softmax_in_place(out, mask, t, stats),
    }
}

/// Out-of-place softmax of one row in two steps: the online pass writes each
/// `exp((z - m_b) / T)` once, relative to its block's running maximum, then a rescale of
/// the (cache-resident) output row by `exp((m_b - M) / T) / S` per block. Each exponential
/// is computed once. `Err(())` marks an invalid row; the error is rebuilt from `src`.
#[allow(clippy::too_many_arguments)]
fn fused_softmax_row(
    plan: &Plan<'_>,
    src: &[f32],
    mask: Option<&[f32]>,
    out: &mut [f32],
    i: usize,
    parallel: bool,
    scratch: Option<&mut Vec<f32>>,
    ahead: bool,
) -> std::result::Result<(), ()> {
    const STACK_BLOCKS: usize = 256;
    let nb = src.len().div_ceil(Kernels::BLOCK);
    let mut stack = [0f32; STACK_BLOCKS];
    let mut heap = Vec::new();
    let block_max: &mut [f32] = if nb <= STACK_BLOCKS {
        &mut stack[..nb]
    } else {
        heap.resize(nb, 0f32);
        &mut heap
    };
    let per_chunk = CHUNK / Kernels::BLOCK;
    let (k, t) = (plan.k, plan.t);
    // Chunk `c` of pass 1: its terms into `o` (of the output row or the scratch row).
    let pass1 = |(c, (o, b)): (usize, (&mut [f32], &mut [f32]))| {
        let range = c * CHUNK..c * CHUNK + o.len();
        let pf = ahead && src.len() <= AHEAD_MAX;
        k.softmax_pass1_ahead(o, Some(&src[range.clone()]), mask.map(|m| &m[range]), t, b, pf)
    };
    if let Some(scratch) = scratch.filter(|_| !parallel && src.len() <= SCRATCH_MAX) {
        // Streaming: terms into the cache-resident scratch row, then one streamed write.
        scratch.resize(src.len(), 0.0);
        let stats = scratch
            .chunks_mut(CHUNK)
            .zip(block_max.chunks_mut(per_chunk))
            .enumerate()
            .map(pass1)
            .fold(MaxSum::EMPTY, |a, b| a.merge(b, t));
        check_row(stats, src, mask, i).map_err(|_| ())?;
        k.rescale_into(scratch, block_max, t, stats, out, true);
        return Ok(());
    }
    let stats = if parallel && src.len() > CHUNK {
        let parts: Vec<MaxSum> =
            out.par_chunks_mut(CHUNK).zip(block_max.par_chunks_mut(per_chunk)).enumerate().map(pass1).collect();
        parts.into_iter().fold(MaxSum::EMPTY, |a, b| a.merge(b, t))
    } else {
        out.chunks_mut(CHUNK)
            .zip(block_max.chunks_mut(per_chunk))
            .enumerate()
            .map(pass1)
            .fold(MaxSum::EMPTY, |a, b| a.merge(b, t))
    };
    check_row(stats, src, mask, i).map_err(|_| ())?;
    if parallel && src.len() > CHUNK {
        out.par_chunks_mut(CHUNK).zip(block_max.par_chunks(per_chunk)).for_each(|(o, b)| k.rescale(o, b, t, stats));
    } else {
        // Last chunk first: the end of a row longer than L2 is still there from pass 1.
        for (o, b) in out.chunks_mut(CHUNK).zip(block_max.chunks(per_chunk)).rev() {
            k.rescale(o, b, t, stats);
        }
    }
    Ok(())
}

/// Rows up to this length run the out-of-place softmax as a pipeline over two scratch rows
/// (512 KiB each at most, so both stay in L2): see [`softmax_rows_pipelined`].
const PIPELINE_MAX: usize = 1 << 17;

/// Rows up to this length run the out-of-place log-softmax as a pipeline
/// ([`log_softmax_rows_pipelined`]), which re-reads the previous row's logits: they must
/// still be in cache, L3 for rows this long. Groups of `n / threads` rows, alternated with
/// the two passes row by row (session 14, Zen 5 with 32 MiB of L3, 2 threads): `[16,
/// 262145]` 0.34–0.38 against 0.41–0.45 ms, `[8, 1000003]` 0.76–0.84 against 0.85–1.11 ms
/// (ten pairs), `[4, 1500000]` 0.52–0.61 against 0.63–0.67 ms; but `[8, 2000000]`
/// 2.42–2.65 against 2.20–2.42 ms and `[4, 4000000]` 2.47–2.67 against 2.16–2.27 ms, where
/// two rows per thread no longer fit in L3.
const LOG_PIPELINE_MAX: usize = 1 << 20;

/// The two scratch rows (terms and block maxima) of [`softmax_rows_pipelined`].
#[derive(Default)]
struct PipelineRows {
    terms: [Vec<f32>; 2],
    block_max: [Vec<f32>; 2],
}

/// Out-of-place softmax of consecutive rows on this thread, software-pipelined: the online
/// pass over row `i` stores its terms in a scratch row and, in the same loop, rescales row
/// `i − 1`'s terms into its output. Each row's stores then overlap the next row's
/// exponentials instead of following them. The values are those of [`fused_softmax_row`]
/// bit for bit (same chunks, same blocks, same factors). `out` holds the rows
/// `first..first + out.rows()`; a row that is invalid is marked in `first_bad`.
fn softmax_rows_pipelined(
    plan: &Plan<'_>,
    src: MatRef<'_>,
    first: usize,
    mut out: MatMut<'_>,
    bufs: &mut PipelineRows,
    stream: bool,
    first_bad: &AtomicUsize,
) {
    let v = src.cols();
    let blocks = v.div_ceil(Kernels::BLOCK);
    let per_chunk = CHUNK / Kernels::BLOCK;
    let (k, t, ahead) = (plan.k, plan.t, prefetches(v));
    for b in 0..2 {
        bufs.terms[b].resize(v, 0.0);
        bufs.block_max[b].resize(blocks, 0.0);
    }
    let [t0, t1] = &mut bufs.terms;
    let [b0, b1] = &mut bufs.block_max;
    let (mut cur_terms, mut prev_terms) = (t0.as_mut_slice(), t1.as_mut_slice());
    let (mut cur_max, mut prev_max) = (b0.as_mut_slice(), b1.as_mut_slice());
    // The previous row (in `out`) and its final state, its terms in `prev_terms`, when valid.
    let mut pending: Option<(usize, MaxSum)> = None;
    for r in 0..out.rows() {
        let i = first + r;
        let (srow, mask) = (src.row(i), plan.mask_row(i));
        let mut prev = pending.take().map(|(q, st)| (out.row_mut(q), st));
        let mut stats = MaxSum::EMPTY;
        for c in 0..v.div_ceil(CHUNK) {
            let cols = c * CHUNK..((c + 1) * CHUNK).min(v);
            let bl = c * per_chunk..c * per_chunk + cols.len().div_ceil(Kernels::BLOCK);
            let finish = prev.as_mut().map(|(o, st)| PrevRow {
                terms: &prev_terms[cols.start..],
                block_max: &prev_max[bl.start..],
                stats: *st,
                out: &mut o[cols.start..],
                head: c == 0,
            });
            let part = k.softmax_pass1_pipelined(
                &mut cur_terms[cols.clone()],
                &srow[cols.clone()],
                mask.map(|m| &m[cols.clone()]),
                t,
                &mut cur_max[bl],
                ahead,
                finish,
                stream,
            );
            stats = stats.merge(part, t);
        }
        if check_row(stats, srow, mask, i).is_err() {
            first_bad.fetch_min(i, Ordering::Relaxed);
        } else {
            pending = Some((r, stats));
        }
        std::mem::swap(&mut cur_terms, &mut prev_terms);
        std::mem::swap(&mut cur_max, &mut prev_max);
    }
    if let Some((q, st)) = pending {
        k.rescale_into(prev_terms, prev_max, t, st, out.row_mut(q), stream);
    }
}

/// Out-of-place log-softmax of consecutive rows on this thread, software-pipelined as
/// [`softmax_rows_pipelined`] is: the online pass over row `i` writes row `i − 1`'s
/// log-probabilities in the same loop, reading its logits again from cache (L2, or L3 for
/// rows past [`PIPELINE_MAX`]). The stores then
/// overlap the exponentials instead of following them. The values are those of the
/// two-pass row bit for bit (same chunks, same statistics, same formula).
fn log_softmax_rows_pipelined(
    plan: &Plan<'_>,
    src: MatRef<'_>,
    first: usize,
    mut out: MatMut<'_>,
    stream: bool,
    first_bad: &AtomicUsize,
) {
    let v = src.cols();
    let (k, t, ahead) = (plan.k, plan.t, prefetches(v));
    // The previous row (in `out`) and its final state, when valid.
    let mut pending: Option<(usize, MaxSum)> = None;
    for r in 0..out.rows() {
        let i = first + r;
        let (srow, mask) = (src.row(i), plan.mask_row(i));
        let prev = pending.take();
        let mut stats = MaxSum::EMPTY;
        for c in 0..v.div_ceil(CHUNK) {
            let cols = c * CHUNK..((c + 1) * CHUNK).min(v);
            let finish = prev.map(|(q, st)| PrevLogRow {
                src: &src.row(first + q)[cols.start..],
                mask: plan.mask_row(first + q).map(|m| &m[cols.start..]),
                stats: st,
                out: &mut out.row_mut(q)[cols.start..],
                head: c == 0,
            });
            let part =
                k.max_sum_pipelined(&srow[cols.clone()], mask.map(|m| &m[cols.clone()]), t, ahead, finish, stream);
            stats = stats.merge(part, t);
        }
        if check_row(stats, srow, mask, i).is_err() {
            first_bad.fetch_min(i, Ordering::Relaxed);
        } else {
            pending = Some((r, stats));
        }
    }
    if let Some((q, st)) = pending {
        let i = first + q;
        k.log_softmax_into_mode(src.row(i), plan.mask_row(i), t, st, out.row_mut(q), stream);
    }
}

/// Softmax or log-softmax of every row; `src = None` means in place in `out`.
fn apply(op: Op, src: Option<MatRef<'_>>, mut out: MatMut<'_>, opts: &RowOptions<'_>) -> Result<()> {
    let (n, v) = (out.rows(), out.cols());
    if let Some(s) = src
        && (s.rows(), s.cols()) != (n, v)
    {
        return Err(Error::Shape(format!("logits are [{}, {}] but the output is [{n}, {v}]", s.rows(), s.cols())));
    }
    let plan = Plan::new(opts, n, v)?;
    if n == 0 {
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let big = n * v >= PAR_MIN && threads > 1;
    let first_bad = AtomicUsize::new(usize::MAX);
    let stride = out.row_stride();

    // One row, entirely on this thread.
    let stream = src.is_some() && n * v * 4 >= STREAM_MIN_BYTES.load(Ordering::Relaxed);
    let ahead = prefetches(v);
    let do_row = |i: usize, orow: &mut [f32], scratch: &mut Vec<f32>| {
        let srow = src.map(|s| s.row(i));
        let mask = plan.mask_row(i);
        if let (Op::Softmax, Some(srow)) = (op, srow) {
            if fused_softmax_row(&plan, srow, mask, orow, i, false, stream.then_some(scratch), ahead).is_err() {
                first_bad.fetch_min(i, Ordering::Relaxed);
            }
            return;
        }
        let stats = plan.stats(srow.unwrap_or(orow), mask, false, ahead);
        if check_row(stats, srow.unwrap_or(orow), mask, i).is_err() {
            first_bad.fetch_min(i, Ordering::Relaxed);
            return;
        }
        match (op, srow) {
            (Op::LogSoftmax, Some(s)) => plan.k.log_softmax_into_mode(s, mask, plan.t, stats, orow, stream),
            _ => write_row(plan.k, op, srow, mask, plan.t, stats, orow),
        }
    };

    let pipelined = match op {
        Op::Softmax => v <= PIPELINE_MAX,
        Op::LogSoftmax => v <= LOG_PIPELINE_MAX,
    };
    if let (true, Some(s)) = (big && n >= threads && pipelined, src) {
        // Groups of consecutive rows, each pipelined on one thread: at most 64 rows, unless
        // that many short rows are fewer than a task's minimum of elements. Long rows are
        // few: one group per thread, or each row would be a group of its own and not
        // pipelined at all.
        let group = if v > PIPELINE_MAX {
            n.div_ceil(threads).min(64)
        } else {
            n.div_ceil(threads * 4).min(64).max((PAR_MIN / v).max(1))
        };
        out.data_mut().par_chunks_mut(stride * group).take(n.div_ceil(group)).enumerate().for_each_init(
            PipelineRows::default,
            |bufs, (g, rows)| {
                let first = g * group;
                let k = group.min(n - first);
                // (The group's rows lie inside `out`, whose shape was checked.)
                let rows = MatMut::with_stride(&mut rows[..((k - 1) * stride + v)], k, v, stride)
                    .expect("a group of output rows");
                match op {
                    Op::Softmax => softmax_rows_pipelined(&plan, s, first, rows, bufs, stream, &first_bad),
                    Op::LogSoftmax => log_softmax_rows_pipelined(&plan, s, first, rows, stream, &first_bad),
                }
            },
        );
    } else if big && n >= threads {
        let min_rows = (PAR_MIN / v).max(1);
        out.data_mut()
            .par_chunks_mut(stride)
            .take(n)
            .enumerate()
            .with_min_len(min_rows)
            .for_each_init(Vec::new, |scratch, (i, r)| do_row(i, &mut r[..v], scratch));
    } else if big && v > CHUNK {
        // Few long rows: split each across threads.
        for i in 0..n {
            let orow = out.row_mut(i);
            let srow = src.map(|s| s.row(i));
            let mask = plan.mask_row(i);
            if let (Op::Softmax, Some(srow)) = (op, srow) {
                if fused_softmax_row(&plan, srow, mask, orow, i, true, None, ahead).is_err() {
                    first_bad.fetch_min(i, Ordering::Relaxed);
                    break;
                }
                continue;
            }
            let stats = plan.stats(srow.unwrap_or(orow), mask, true, ahead);
            if check_row(stats, srow.unwrap_or(orow), mask, i).is_err() {
                first_bad.fetch_min(i, Ordering::Relaxed);
                break;
            }
            orow.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
                let range = c * CHUNK..c * CHUNK + o.len();
                let s = srow.map(|s| &s[range.clone()]);
                let m = mask.map(|m| &m[range]);
                write_row(plan.k, op, s, m, plan.t, stats, o);
            });
        }
    } else {
        let mut scratch = Vec::new();
        for i in 0..n {
            do_row(i, out.row_mut(i), &mut scratch);
            if first_bad.load(Ordering::Relaxed) != usize::MAX {
                break;
            }
        }
    }

    match first_bad.into_inner() {
        usize::MAX => Ok(()),
        i => {
            // Rebuild the error of the lowest bad row; it was left untouched.
            let row = match src {
                Some(s) => s.row(i),
                None => out.as_ref().row(i),
            };
            let mask = plan.mask_row(i);
            check_row(plan.stats(row, mask, false, false), row, mask, i)
        }
    }
}

/// `out = softmax((logits + mask) / T)` row by row. `logits` and `out` are `[n, V]`.
///
/// ```
/// use softmax_layer::{softmax, MatMut, MatRef, RowOptions};
/// let logits = [2.0f32, 1.0, 0.1];
/// let mut p = [0f32; 3];
/// softmax(MatRef::new(&logits, 1, 3)?, MatMut::new(&mut p, 1, 3)?, &RowOptions::default())?;
/// assert!((p[0] - 0.659).abs() < 5e-4 && (p[1] - 0.242).abs() < 5e-4 && (p[2] - 0.099).abs() < 5e-4);
/// # Ok::<(), softmax_layer::Error>(())
/// ```
pub fn softmax(logits: MatRef<'_>, out: MatMut<'_>, opts: &RowOptions<'_>) -> Result<()> {
    apply(Op::Softmax, Some(logits), out, opts)
}

/// [`softmax`] in place: `logits` is overwritten with the probabilities.
pub fn softmax_inplace(logits: MatMut<'_>, opts: &RowOptions<'_>) -> Result<()> {
    apply(Op::Softmax, None, logits, opts)
}

/// `out = log_softmax((logits + mask) / T)` row by row. `logits` and `out` are `[n, V]`.
///
/// Entries whose true value is below `-f32::MAX` (a masked entry, or a gap of more than
/// `f32::MAX` between logits) are `-inf`.
pub fn log_softmax(logits: MatRef<'_>, out: MatMut<'_>, opts: &RowOptions<'_>) -> Result<()> {
    apply(Op::LogSoftmax, Some(logits), out, opts)
}

/// [`log_softmax`] in place.
pub fn log_softmax_inplace(logits: MatMut<'_>, opts: &RowOptions<'_>) -> Result<()> {
    apply(Op::LogSoftmax, None, logits, opts)
}

/// `out[i] = logsumexp((logits[i] + mask[i]) / T)`, for `logits: [n, V]` and `out: [n]`.
/// Reads each element once. The result is `+inf` only when the true value exceeds
/// `f32::MAX` (possible for `T < 1`).
pub fn logsumexp(logits: MatRef<'_>, out: &mut [f32], opts: &RowOptions<'_>) -> Result<()> {
    let (n, v) = (logits.rows(), logits.cols());
    let plan = Plan::new(opts, n, v)?;
    if out.len() != n {
        return Err(Error::Shape(format!("logits are [{n}, {v}] but the logsumexp output has length {}", out.len())));
    }
    let threads = rayon::current_num_threads();
    let big = n * v >= PAR_MIN && threads > 1;
    let first_bad = AtomicUsize::new(usize::MAX);
    let ahead = prefetches(v);
    let do_row = |i: usize, o: &mut f32, parallel: bool| {
        let (row, mask) = (logits.row(i), plan.mask_row(i));
        let stats = plan.stats(row, mask, parallel, ahead);
        match check_row(stats, row, mask, i) {
            Ok(()) => *o = stats.logsumexp(plan.t) as f32,
            Err(_) => {
                first_bad.fetch_min(i, Ordering::Relaxed);
            }
        }
    };
    if big && n >= threads {
        let min_rows = (PAR_MIN / v.max(1)).max(1);
        out.par_iter_mut().enumerate().with_min_len(min_rows).for_each(|(i, o)| do_row(i, o, false));
    } else {
        for (i, o) in out.iter_mut().enumerate() {
            do_row(i, o, big);
        }
    }
    match first_bad.into_inner() {
        usize::MAX => Ok(()),
        i => {
            let (row, mask) = (logits.row(i), plan.mask_row(i));
            check_row(plan.stats(row, mask, false, false), row, mask, i)
        }
    }
}
