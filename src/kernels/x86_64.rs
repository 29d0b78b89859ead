//! x86_64 instantiations: AVX-512F (16 lanes) and AVX2 + FMA (8 lanes).

// The `Vector` methods below are `unsafe fn`s whose contract (the instruction set is
// available, pointers are valid) is exactly what the intrinsics require; each impl's
// SAFETY comment states it once instead of on every one-instruction body.
#![allow(unsafe_op_in_unsafe_fn)]

use super::generic::{Vector, instantiate};
use std::arch::x86_64::*;

#[derive(Clone, Copy)]
pub(crate) struct F32x16(__m512);

/// Mask of the first `len` (< 16) lanes.
#[inline(always)]
fn lanes16(len: usize) -> __mmask16 {
    ((1u32 << len) - 1) as __mmask16
}

// SAFETY (all methods): the `Vector` contract guarantees AVX-512F is available and that
// pointers are valid for the lanes read or written; masked loads and stores touch only
// the enabled lanes, so partial accesses stay within `len` elements.
impl Vector for F32x16 {
    const LANES: usize = 16;

    #[inline(always)]
    unsafe fn store_stream(self, ptr: *mut f32) {
        // SAFETY: the caller guarantees `ptr` is aligned to 64 bytes and valid.
        unsafe { _mm512_stream_ps(ptr, self.0) }
    }
    #[inline(always)]
    unsafe fn stream_fence() {
        _mm_sfence()
    }
    #[inline(always)]
    unsafe fn prefetch(ptr: *const f32) {
        // SAFETY: prefetching is a hint and never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr as *const i8) }
    }
    #[inline(always)]
    unsafe fn prefetch_l2(ptr: *const f32) {
        // SAFETY: prefetching is a hint and never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(ptr as *const i8) }
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        F32x16(_mm512_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        // SAFETY: see the impl comment.
        F32x16(unsafe { _mm512_loadu_ps(ptr) })
    }
    #[inline(always)]
    unsafe fn load_partial(ptr: *const f32, len: usize, fill: f32) -> Self {
        // SAFETY: see the impl comment; masked-off lanes are not accessed.
        F32x16(unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(fill), lanes16(len), ptr) })
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        // SAFETY: see the impl comment.
        unsafe { _mm512_storeu_ps(ptr, self.0) }
    }
    #[inline(always)]
    unsafe fn store_partial(self, ptr: *mut f32, len: usize) {
        // SAFETY: see the impl comment; masked-off lanes are not written.
        unsafe { _mm512_mask_storeu_ps(ptr, lanes16(len), self.0) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        F32x16(_mm512_add_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        F32x16(_mm512_sub_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        F32x16(_mm512_mul_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        F32x16(_mm512_div_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        F32x16(_mm512_fmadd_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        F32x16(_mm512_max_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        F32x16(_mm512_min_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn round(self) -> Self {
        F32x16(_mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0))
    }
    #[inline(always)]
    unsafe fn pow2i(self) -> Self {
        let n = _mm512_cvtps_epi32(self.0);
        F32x16(_mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n, _mm512_set1_epi32(127)))))
    }
    #[inline(always)]
    unsafe fn scale_pow2(self, n: Self) -> Self {
        // One instruction, with a single rounding into the subnormal range or to infinity.
        F32x16(_mm512_scalef_ps(self.0, n.0))
    }
    #[inline(always)]
    unsafe fn zero_below(self, x: Self, lim: Self) -> Self {
        F32x16(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x.0, lim.0), self.0))
    }
    #[inline(always)]
    unsafe fn mul_unless_below(self, f: Self, lim: Self) -> Self {
        // One masked multiply: the lanes below `lim` are zeroed and never computed.
        F32x16(_mm512_maskz_mul_ps(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(self.0, lim.0), self.0, f.0))
    }
    const MASKED_SCALE: bool = true;
    #[inline(always)]
    unsafe fn scale_pow2_unless_below(self, n: Self, x: Self, lim: Self) -> Self {
        // One masked instruction: lanes with x < lim are zeroed and never computed.
        F32x16(_mm512_maskz_scalef_ps(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x.0, lim.0), self.0, n.0))
    }
    #[inline(always)]
    unsafe fn count_gt(self, t: Self) -> usize {
        (_mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, t.0) as u32).count_ones() as usize
    }
    #[inline(always)]
    unsafe fn in_range_mask(self, lo: Self, hi: Self) -> u32 {
        let ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(self.0, lo.0);
        _mm512_mask_cmp_ps_mask::<_CMP_LE_OQ>(ge, self.0, hi.0) as u32
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        _mm512_reduce_max_ps(self.0)
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f32 {
        _mm512_reduce_add_ps(self.0)
    }
    #[inline(always)]
    unsafe fn sum4_f64(a: Self, b: Self, c: Self, d: Self) -> f64 {
        // Both halves of each vector widened to f64 (exact), then added as vectors.
        #[inline(always)]
        unsafe fn widen(v: __m512) -> __m512d {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), _mm512_cvtps_pd(hi))
        }
        _mm512_reduce_add_pd(_mm512_add_pd(
            _mm512_add_pd(widen(a.0), widen(b.0)),
            _mm512_add_pd(widen(c.0), widen(d.0)),
        ))
    }
}

#[derive(Clone, Copy)]
pub(crate) struct F32x8(__m256);

// SAFETY (all methods): the `Vector` contract guarantees AVX2 and FMA are available and
// that pointers are valid for the lanes read or written. Partial accesses go through a
// stack buffer and copy exactly `len` elements.
impl Vector for F32x8 {
    const LANES: usize = 8;

    #[inline(always)]
    unsafe fn store_stream(self, ptr: *mut f32) {
        // SAFETY: the caller guarantees `ptr` is aligned to 32 bytes and valid.
        unsafe { _mm256_stream_ps(ptr, self.0) }
    }
    #[inline(always)]
    unsafe fn stream_fence() {
        _mm_sfence()
    }
    #[inline(always)]
    unsafe fn prefetch(ptr: *const f32) {
        // SAFETY: prefetching is a hint and never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr as *const i8) }
    }
    #[inline(always)]
    unsafe fn prefetch_l2(ptr: *const f32) {
        // SAFETY: prefetching is a hint and never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(ptr as *const i8) }
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        F32x8(_mm256_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        // SAFETY: see the impl comment.
        F32x8(unsafe { _mm256_loadu_ps(ptr) })
    }
    #[inline(always)]
    unsafe fn load_partial(ptr: *const f32, len: usize, fill: f32) -> Self {
        let mut buf = [fill; 8];
        // SAFETY: `ptr` is valid for `len < 8` reads; `buf` holds 8.
        unsafe {
            std::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), len);
            F32x8(_mm256_loadu_ps(buf.as_ptr()))
        }
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        // SAFETY: see the impl comment.
        unsafe { _mm256_storeu_ps(ptr, self.0) }
    }
    #[inline(always)]
    unsafe fn store_partial(self, ptr: *mut f32, len: usize) {
        let mut buf = [0f32; 8];
        // SAFETY: `buf` holds 8; `ptr` is valid for `len < 8` writes.
        unsafe {
            _mm256_storeu_ps(buf.as_mut_ptr(), self.0);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), ptr, len);
        }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        F32x8(_mm256_add_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        F32x8(_mm256_sub_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        F32x8(_mm256_mul_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        F32x8(_mm256_div_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        F32x8(_mm256_fmadd_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        F32x8(_mm256_max_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        F32x8(_mm256_min_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn round(self) -> Self {
        F32x8(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0))
    }
    #[inline(always)]
    unsafe fn pow2i(self) -> Self {
        let n = _mm256_cvtps_epi32(self.0);
        F32x8(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127)))))
    }
    #[inline(always)]
    unsafe fn zero_below(self, x: Self, lim: Self) -> Self {
        F32x8(_mm256_and_ps(self.0, _mm256_cmp_ps::<_CMP_NLT_UQ>(x.0, lim.0)))
    }
    #[inline(always)]
    unsafe fn count_gt(self, t: Self) -> usize {
        (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(self.0, t.0)) as u32).count_ones() as usize
    }
    #[inline(always)]
    unsafe fn in_range_mask(self, lo: Self, hi: Self) -> u32 {
        let ge = _mm256_cmp_ps::<_CMP_GE_OQ>(self.0, lo.0);
        let le = _mm256_cmp_ps::<_CMP_LE_OQ>(self.0, hi.0);
        _mm256_movemask_ps(_mm256_and_ps(ge, le)) as u32
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
        _mm_cvtss_f32(m)
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
    #[inline(always)]
    unsafe fn sum4_f64(a: Self, b: Self, c: Self, d: Self) -> f64 {
        // Both halves of each vector widened to f64 (exact), then added as vectors.
        #[inline(always)]
        unsafe fn widen(v: __m256) -> __m256d {
            _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)))
        }
        let s = _mm256_add_pd(_mm256_add_pd(widen(a.0), widen(b.0)), _mm256_add_pd(widen(c.0), widen(d.0)));
        let s = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd::<1>(s));
        _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
    }
}

pub(crate) mod avx512 {
    use super::*;
    instantiate!(F32x16, "avx512f,popcnt");
}

pub(crate) mod avx2 {
    use super::*;
    instantiate!(F32x8, "avx2,fma,popcnt");
}
