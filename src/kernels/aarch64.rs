//! aarch64 instantiation: NEON (4 lanes). NEON is part of the aarch64 baseline.

// The `Vector` methods below are `unsafe fn`s whose contract (the instruction set is
// available, pointers are valid) is exactly what the intrinsics require; each impl's
// SAFETY comment states it once instead of on every one-instruction body.
#![allow(unsafe_op_in_unsafe_fn)]

use super::generic::{Vector, instantiate};
use std::arch::aarch64::*;

#[derive(Clone, Copy)]
pub(crate) struct F32x4(float32x4_t);

// SAFETY (all methods): NEON is always available on aarch64; the `Vector` contract
// guarantees pointers are valid for the lanes read or written. Partial accesses go
// through a stack buffer and copy exactly `len` elements.
impl Vector for F32x4 {
    const LANES: usize = 4;

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        F32x4(vdupq_n_f32(x))
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        // SAFETY: see the impl comment.
        F32x4(unsafe { vld1q_f32(ptr) })
    }
    #[inline(always)]
    unsafe fn load_partial(ptr: *const f32, len: usize, fill: f32) -> Self {
        let mut buf = [fill; 4];
        // SAFETY: `ptr` is valid for `len < 4` reads; `buf` holds 4.
        unsafe {
            std::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), len);
            F32x4(vld1q_f32(buf.as_ptr()))
        }
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        // SAFETY: see the impl comment.
        unsafe { vst1q_f32(ptr, self.0) }
    }
    #[inline(always)]
    unsafe fn store_partial(self, ptr: *mut f32, len: usize) {
        let mut buf = [0f32; 4];
        // SAFETY: `buf` holds 4; `ptr` is valid for `len < 4` writes.
        unsafe {
            vst1q_f32(buf.as_mut_ptr(), self.0);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), ptr, len);
        }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        F32x4(vaddq_f32(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        F32x4(vsubq_f32(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        F32x4(vmulq_f32(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        F32x4(vdivq_f32(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        F32x4(vfmaq_f32(c.0, self.0, b.0))
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        // Compare and select, to keep the x86 NaN semantics of the trait.
        F32x4(vbslq_f32(vcgtq_f32(self.0, b.0), self.0, b.0))
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        F32x4(vbslq_f32(vcltq_f32(self.0, b.0), self.0, b.0))
    }
    #[inline(always)]
    unsafe fn round(self) -> Self {
        F32x4(vrndnq_f32(self.0))
    }
    #[inline(always)]
    unsafe fn pow2i(self) -> Self {
        let n = vcvtnq_s32_f32(self.0);
        F32x4(vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(n, vdupq_n_s32(127)))))
    }
    #[inline(always)]
    unsafe fn zero_below(self, x: Self, lim: Self) -> Self {
        // `x < lim` is false for NaN, so those lanes keep `self`.
        F32x4(vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(self.0), vcltq_f32(x.0, lim.0))))
    }
    #[inline(always)]
    unsafe fn count_gt(self, t: Self) -> usize {
        // Each true lane is all ones; shift to 1 and add across.
        vaddvq_u32(vshrq_n_u32::<31>(vcgtq_f32(self.0, t.0))) as usize
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        vmaxvq_f32(self.0)
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f32 {
        vaddvq_f32(self.0)
    }
}

pub(crate) mod neon {
    use super::*;
    instantiate!(F32x4, "neon");
}
