//! The matrix products behind the engine and the gradients, in one place.
//!
//! `C ← [C +] A·B` for strided `f32` matrices, single-threaded (callers parallelize over
//! tiles, so results never depend on the thread count). Backed by the `gemm` crate, chosen
//! by measurement (see the notes of the layer issue).

/// A strided operand: element `(i, j)` at `ptr + i * rs + j * cs` (in elements).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// `C (m x n) ← [C +] A (m x k) · B (k x n)`.
///
/// # Safety
/// For all `i < m`, `j < n`, `p < k`: `c.ptr + i*rs + j*cs` is valid for reads (if
/// `accumulate`) and writes, `a` at `(i, p)` and `b` at `(p, j)` are valid for reads; no
/// other thread writes any of these elements during the call, and `C` does not overlap `A`
/// or `B`.
pub(crate) unsafe fn gemm(m: usize, n: usize, k: usize, c: Operand, accumulate: bool, a: Operand, b: Operand) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m as isize {
                for j in 0..n as isize {
                    // SAFETY: in bounds by the contract.
                    unsafe { *(c.ptr as *mut f32).offset(i * c.rs + j * c.cs) = 0.0 };
                }
            }
        }
        return;
    }
    // SAFETY: forwarded from this function's contract; `gemm::gemm` computes
    // dst = alpha·dst + beta·lhs·rhs and reads dst only when `read_dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.ptr as *mut f32,
            c.cs,
            c.rs,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `dst[i·ldd + j] = src[j·lds + i] (+ add[j])` for `i < m`, `j < n`: a column-major
/// `m × n` matrix written out row-major, with an optional row vector added to every row.
/// (The loss computes its logits column-major, so that the `gemm` crate reads `W` where it
/// lies instead of packing it, then writes them row by row with this.)
///
/// # Panics
/// If a slice is too short for the shapes and strides, or `add` is shorter than `n`.
pub(crate) fn transpose_into(
    src: &[f32],
    lds: usize,
    dst: &mut [f32],
    ldd: usize,
    m: usize,
    n: usize,
    add: Option<&[f32]>,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(lds >= m && ldd >= n, "transpose_into: strides {lds}, {ldd} for [{m}, {n}]");
    assert!(src.len() >= (n - 1) * lds + m && dst.len() >= (m - 1) * ldd + n, "transpose_into: slices too short");
    assert!(add.is_none_or(|a| a.len() >= n), "transpose_into: the added row is shorter than {n}");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is available; the bounds were asserted above.
        unsafe { transpose_into_avx512(src, lds, dst, ldd, m, n, add) };
        return;
    }
    transpose_into_scalar(src, lds, dst, ldd, m, n, add);
}

/// The portable build of [`transpose_into`] (also the tests' reference).
fn transpose_into_scalar(
    src: &[f32],
    lds: usize,
    dst: &mut [f32],
    ldd: usize,
    m: usize,
    n: usize,
    add: Option<&[f32]>,
) {
    // 16 × 16 blocks, so that both sides are read and written a cache line at a time.
    for i0 in (0..m).step_by(16) {
        for j0 in (0..n).step_by(16) {
            for i in i0..(i0 + 16).min(m) {
                for j in j0..(j0 + 16).min(n) {
                    dst[i * ldd + j] = src[j * lds + i] + add.map_or(0.0, |a| a[j]);
                }
            }
        }
    }
}

/// [`transpose_into`] by 16 × 16 in-register transposes (masked at the edges).
///
/// # Safety
/// AVX-512F is available, and the slices hold the elements that [`transpose_into`] asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_into_avx512(
    src: &[f32],
    lds: usize,
    dst: &mut [f32],
    ldd: usize,
    m: usize,
    n: usize,
    add: Option<&[f32]>,
) {
    use std::arch::x86_64::*;
    // A strip of 16 rows of `dst` at a time, left to right: the stores then sweep whole
    // rows (as the row kernels will read them) rather than columns of cache lines.
    for i0 in (0..m).step_by(16) {
        let mi = 16.min(m - i0);
        let row_mask: __mmask16 = if mi == 16 { !0 } else { (1u16 << mi) - 1 };
        for j0 in (0..n).step_by(16) {
            let nj = 16.min(n - j0);
            let col_mask: __mmask16 = if nj == 16 { !0 } else { (1u16 << nj) - 1 };
            // SAFETY: add[j0..j0 + nj] is in bounds (add.len() ≥ n); masked lanes are not read.
            let bias = add.map(|a| unsafe { _mm512_maskz_loadu_ps(col_mask, a.as_ptr().add(j0)) });
            let mut r = [_mm512_setzero_ps(); 16];
            for (jj, x) in r.iter_mut().enumerate().take(nj) {
                // SAFETY: column j0 + jj < n, rows i0..i0 + mi ≤ m: src[(j0+jj)·lds + i0 + lane]
                // is in bounds for the unmasked lanes (src.len() ≥ (n−1)·lds + m).
                *x = unsafe { _mm512_maskz_loadu_ps(row_mask, src.as_ptr().add((j0 + jj) * lds + i0)) };
            }
            crate::tile_gemm::x86::transpose16(&mut r);
            for (ii, &x) in r.iter().enumerate().take(mi) {
                let x = bias.map_or(x, |b| _mm512_add_ps(x, b));
                // SAFETY: row i0 + ii < m, columns j0..j0 + nj ≤ n: inside dst
                // (dst.len() ≥ (m−1)·ldd + n) for the unmasked lanes.
                unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr().add((i0 + ii) * ldd + j0), col_mask, x) };
            }
        }
    }
}

/// A raw pointer that may cross threads: tasks write disjoint parts of one buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SharedMut(pub *mut f32);
impl SharedMut {
    /// The pointer. (A method, so that closures capture the `Sync` wrapper, not the field.)
    pub fn ptr(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: every user documents why the tasks' writes are disjoint and joined before reuse.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

/// One 64-byte aligned cache line of f32.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub [f32; 16]);

/// A zeroed `f32` buffer whose start is 64-byte aligned: rows whose stride is a multiple of
/// 16 values are then whole cache lines, which the AMX kernel updates in place, and packed
/// panels start on a line. A plain `f32` vector with up to 15 values skipped at the front:
/// so it comes zeroed from `calloc`, which hands large buffers over as fresh pages without
/// writing them (a vector of 64-byte-aligned lines would be zeroed by a pass over it, 1.7%
/// of the bf16 loss's samples for its block buffers).
#[derive(Default)]
pub(crate) struct AlignedF32 {
    buf: Vec<f32>,
    /// Values skipped so that the buffer starts on 64 bytes.
    off: usize,
    len: usize,
}

impl AlignedF32 {
    pub fn zeroed(len: usize) -> AlignedF32 {
        let mut a = AlignedF32::default();
        a.ensure(len);
        a.len = len;
        a
    }

    /// Holds at least `len` values afterwards: the allocation is kept when it is large
    /// enough, else replaced by a larger zeroed one. The buffer is then its whole capacity
    /// (whole lines), whose values are unspecified (zero when new).
    pub fn ensure(&mut self, len: usize) {
        let lines = len.div_ceil(16);
        if self.buf.len() < lines * 16 + 15 {
            // Replaced, not resized: the old values need not survive, and a fresh zeroed
            // vector is not written here.
            self.buf = vec![0f32; lines * 16 + 15];
        }
        self.off = self.buf.as_ptr().align_offset(64);
        // ≥ lines·16, since off ≤ 15 (an f32 vector is 4-byte aligned).
        self.len = (self.buf.len() - self.off) / 16 * 16;
    }

    /// The first `len` values, the buffer grown first if it is shorter (values unspecified).
    pub fn prefix_mut(&mut self, len: usize) -> &mut [f32] {
        self.ensure(len);
        &mut self[..len]
    }
}

impl std::ops::Deref for AlignedF32 {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for AlignedF32 {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorized transpose against the scalar one, over every tail length of both
    /// dimensions (1..=40 covers two full blocks and every remainder), with strides wider
    /// than the shapes and with and without an added row.
    #[test]
    fn transpose_into_matches_scalar_over_every_tail() {
        for m in 1..=40 {
            for n in 1..=40 {
                let (lds, ldd) = (m + 3, n + 5);
                let src: Vec<f32> = (0..n * lds).map(|i| (i as f32 * 0.37).sin()).collect();
                let add: Vec<f32> = (0..n).map(|j| j as f32 * 0.5 - 3.0).collect();
                for a in [None, Some(&add[..])] {
                    let mut want = vec![f32::NAN; m * ldd];
                    transpose_into_scalar(&src, lds, &mut want, ldd, m, n, a);
                    let mut got = vec![f32::NAN; m * ldd];
                    transpose_into(&src, lds, &mut got, ldd, m, n, a);
                    for i in 0..m {
                        for j in 0..ldd {
                            let (w, g) = (want[i * ldd + j], got[i * ldd + j]);
                            if j < n {
                                // Also the definition, independently of the scalar build.
                                let exact = src[j * lds + i] + a.map_or(0.0, |a| a[j]);
                                assert_eq!(w.to_bits(), exact.to_bits(), "scalar m={m} n={n} ({i}, {j})");
                                assert_eq!(g.to_bits(), w.to_bits(), "m={m} n={n} ({i}, {j})");
                            } else {
                                // The stride's padding is never written.
                                assert!(g.is_nan(), "m={m} n={n}: wrote padding ({i}, {j})");
                            }
                        }
                    }
                }
            }
        }
    }
}
