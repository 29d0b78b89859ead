//! The portable fallback: one lane, plain `f32` arithmetic. Also the reference that the
//! SIMD paths are tested against.

use super::generic::Vector;

#[derive(Clone, Copy)]
pub(crate) struct F32x1(f32);

impl Vector for F32x1 {
    const LANES: usize = 1;

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        F32x1(x)
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        // SAFETY: the caller guarantees `ptr` is valid for one read.
        F32x1(unsafe { ptr.read_unaligned() })
    }
    #[inline(always)]
    unsafe fn load_partial(_ptr: *const f32, _len: usize, fill: f32) -> Self {
        // With one lane, a partial load has len == 0 and reads nothing.
        F32x1(fill)
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        // SAFETY: the caller guarantees `ptr` is valid for one write.
        unsafe { ptr.write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn store_partial(self, _ptr: *mut f32, _len: usize) {}
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        F32x1(self.0 + b.0)
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        F32x1(self.0 - b.0)
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        F32x1(self.0 * b.0)
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        F32x1(self.0 / b.0)
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        F32x1(self.0.mul_add(b.0, c.0))
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        F32x1(if self.0 > b.0 { self.0 } else { b.0 })
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        F32x1(if self.0 < b.0 { self.0 } else { b.0 })
    }
    #[inline(always)]
    unsafe fn round(self) -> Self {
        F32x1(self.0.round_ties_even())
    }
    #[inline(always)]
    unsafe fn pow2i(self) -> Self {
        F32x1(f32::from_bits(((self.0 as i32 + 127) as u32) << 23))
    }
    #[inline(always)]
    unsafe fn zero_below(self, x: Self, lim: Self) -> Self {
        if x.0 < lim.0 { F32x1(0.0) } else { self }
    }
    #[inline(always)]
    unsafe fn count_gt(self, t: Self) -> usize {
        (self.0 > t.0) as usize
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        self.0
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f32 {
        self.0
    }
}

super::generic::instantiate!(F32x1);
