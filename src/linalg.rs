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

/// A zeroed `f32` buffer whose start is 64-byte aligned (it is a vector of cache lines):
/// rows whose stride is a multiple of 16 values are then whole cache lines, which the AMX
/// kernel updates in place, and packed panels start on a line.
#[derive(Default)]
pub(crate) struct AlignedF32 {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedF32 {
    pub fn zeroed(len: usize) -> AlignedF32 {
        AlignedF32 { lines: vec![Line([0.0; 16]); len.div_ceil(16)], len }
    }

    /// Grows to hold at least `len` values, reusing the allocation; afterwards the buffer
    /// is its whole capacity (whole lines), whose values are unspecified (zero when new).
    pub fn ensure(&mut self, len: usize) {
        let lines = len.div_ceil(16);
        if self.lines.len() < lines {
            self.lines.resize(lines, Line([0.0; 16]));
        }
        self.len = self.lines.len() * 16;
    }
}

impl std::ops::Deref for AlignedF32 {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` around `[f32; 16]` with alignment 64 == size 64, so the
        // lines are `16 · lines.len()` contiguous, initialized f32 values, and len ≤ that.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedF32 {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as above; the mutable borrow of `self` gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}
