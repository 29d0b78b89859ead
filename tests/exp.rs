//! The vectorized exp against f64 `exp`, over a dense sweep of the whole f32 range, for
//! every instruction set this CPU supports.

use softmax_layer::kernels::{Isa, Kernels};

/// Error of `got` in units of the f32 spacing at the true value `want`.
fn ulp_error(got: f32, want: f64) -> f64 {
    if want > f32::MAX as f64 {
        // The correctly rounded result is +inf once want >= MAX + ulp/2.
        let limit = f32::MAX as f64 + 2f64.powi(103);
        return if got == f32::INFINITY {
            0.0
        } else if want < limit {
            ((got as f64 - want) / 2f64.powi(104)).abs()
        } else {
            f64::INFINITY
        };
    }
    if got.is_infinite() || got.is_nan() {
        return f64::INFINITY;
    }
    let w = want as f32;
    // Spacing of f32 at `w` (2^-149 for subnormals).
    let ulp = if w.abs() < f32::MIN_POSITIVE { 2f64.powi(-149) } else { (f32::from_bits(w.to_bits() + 1) - w) as f64 };
    (got as f64 - want).abs() / ulp
}

fn sweep(isa: Isa, stride: u32) -> (f64, f32, usize) {
    let k = Kernels::for_isa(isa).unwrap();
    // All f32 from -inf up through +inf, every `stride`-th bit pattern, plus specials.
    let mut xs: Vec<f32> = Vec::new();
    let hi = f32::INFINITY.to_bits();
    let mut b = 0u32;
    while b <= hi {
        xs.push(f32::from_bits(b));
        xs.push(-f32::from_bits(b));
        b = match b.checked_add(stride) {
            Some(n) => n,
            None => break,
        };
    }
    for x in [
        0.0f32,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
        88.72283,
        88.72284,
        -87.33655,
        -103.27893,
        -103.97208,
        -104.0,
        89.0,
        1e-45,
        -1e-45,
    ] {
        xs.push(x);
    }
    let mut ys = vec![0f32; xs.len()];
    let (mut worst, mut at) = (0f64, 0f32);
    for (xc, yc) in xs.chunks(4099).zip(ys.chunks_mut(4099)) {
        k.exp(xc, yc);
    }
    for (&x, &y) in xs.iter().zip(&ys) {
        let want = (x as f64).exp();
        let e = ulp_error(y, want);
        if e > worst {
            worst = e;
            at = x;
        }
    }
    (worst, at, xs.len())
}

#[test]
fn exp_is_within_2_ulp_over_the_whole_range() {
    for isa in Isa::available() {
        let (worst, at, n) = sweep(isa, 61);
        println!("exp[{isa}]: worst error {worst:.3} ulp at x = {at:e} over {n} inputs");
        assert!(worst <= 2.0, "exp[{isa}]: {worst} ulp at {at:e}");
    }
}

#[test]
fn exp_special_values() {
    for isa in Isa::available() {
        let k = Kernels::for_isa(isa).unwrap();
        let x = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 200.0, -200.0];
        let mut y = [0f32; 7];
        k.exp(&x, &mut y);
        assert!(y[0].is_nan(), "{isa}");
        assert_eq!(&y[1..], &[f32::INFINITY, 0.0, 1.0, 1.0, f32::INFINITY, 0.0], "{isa}");
    }
}

#[test]
fn exp_simd_matches_scalar_within_1_ulp_every_tail() {
    let scalar = Kernels::for_isa(Isa::Scalar).unwrap();
    for isa in Isa::available() {
        let k = Kernels::for_isa(isa).unwrap();
        for len in 0..=70 {
            for offset in 0..3 {
                let buf: Vec<f32> =
                    (0..len + offset).map(|i| -100.0 + 187.0 * ((i * 7919) % 1000) as f32 / 1000.0).collect();
                let x = &buf[offset..];
                // NaN canaries around the output prove nothing outside it is written.
                let mut out = vec![f32::NAN; len + 2];
                let mut want = vec![0f32; len];
                k.exp(x, &mut out[1..len + 1]);
                scalar.exp(x, &mut want);
                assert!(out[0].is_nan() && out[len + 1].is_nan(), "{isa}: wrote outside the output");
                for j in 0..len {
                    let (a, b) = (out[j + 1], want[j]);
                    assert!((a.to_bits() as i64 - b.to_bits() as i64).abs() <= 1, "{isa} len {len}: {a:e} vs {b:e}");
                }
            }
        }
    }
}

#[test]
fn dot_dot4_axpy_match_scalar_over_every_tail_length() {
    let scalar = Kernels::for_isa(Isa::Scalar).unwrap();
    let val = |i: usize, s: usize| ((i * 7919 + s * 104729) % 2001) as f32 / 1000.0 - 1.0;
    for isa in Isa::available() {
        let k = Kernels::for_isa(isa).unwrap();
        for len in 0..=300 {
            let a: Vec<f32> = (0..len).map(|i| val(i, 1)).collect();
            let b: Vec<Vec<f32>> = (0..4).map(|r| (0..len).map(|i| val(i, r + 2)).collect()).collect();
            let exact = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum::<f64>();
            let mag = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum::<f64>();
            let tol = |x: &[f32], y: &[f32]| (len as f64 + 2.0) * 6e-8 * mag(x, y) + 1e-30;
            let d = k.dot(&a, &b[0]);
            assert!((d as f64 - exact(&a, &b[0])).abs() <= tol(&a, &b[0]), "{isa} dot len {len}");
            assert!((d - scalar.dot(&a, &b[0])).abs() as f64 <= 2.0 * tol(&a, &b[0]), "{isa} dot vs scalar len {len}");
            let q = k.dot4(&a, [&b[0], &b[1], &b[2], &b[3]]);
            for r in 0..4 {
                assert!((q[r] as f64 - exact(&a, &b[r])).abs() <= tol(&a, &b[r]), "{isa} dot4[{r}] len {len}");
            }
            let mut y = vec![f32::NAN; len + 2];
            y[1..len + 1].copy_from_slice(&b[1]);
            k.axpy(&mut y[1..len + 1], 0.5, &a);
            assert!(y[0].is_nan() && y[len + 1].is_nan(), "{isa}: axpy wrote outside");
            for i in 0..len {
                assert_eq!(y[i + 1], 0.5f32.mul_add(a[i], b[1][i]), "{isa} axpy len {len}");
            }
        }
    }
}

#[test]
fn softcap_is_within_a_few_ulps_of_its_value_at_any_cap() {
    // Relative to the value itself, not to the cap: a logit far below a large cap keeps its
    // own precision (z ≈ x). Each cap sweeps x/s over [-8, 8] densely (both branches of tanh
    // and the switch at |x/s| = 0.625), plus logits far below and far beyond it.
    let caps = [3e-3f32, 1.0, 30.0, 50.0, 1e3, 1e6, 1e8, 1e30];
    for isa in Isa::available() {
        let k = Kernels::for_isa(isa).unwrap();
        for cap in caps {
            let mut xs: Vec<f32> = (-20000..=20000).map(|i| (i as f64 * 4e-4 * cap as f64) as f32).collect();
            xs.extend([0.0f32, -0.0, 1.0, -1.0, 0.37, 1e-30, -1e-30, 1e-45, 3e38, -3e38, f32::MAX, f32::MIN]);
            xs.extend([0.625f32, 0.625f32.next_up(), 0.625f32.next_down()].map(|t| t * cap));
            let mut z = xs.clone();
            k.softcap_in_place(&mut z, cap);
            let mut worst = 0f64;
            for (&x, &zv) in xs.iter().zip(&z) {
                let want = cap as f64 * (x as f64 / cap as f64).tanh();
                let w = want.abs() as f32;
                let ulp = w.next_up() as f64 - w as f64;
                let err = (zv as f64 - want).abs();
                if want.abs() > 1e-37 {
                    worst = worst.max(err / ulp);
                }
                assert!(err <= 4.0 * ulp + 1e-44, "{isa} cap {cap}: softcap({x}) = {zv}, want {want}");
                assert!(zv.abs() <= cap, "{isa}: |softcap({x})| = {zv} exceeds the cap");
                assert_eq!(
                    zv.signum(),
                    if want == 0.0 { zv.signum() } else { want.signum() as f32 },
                    "{isa}: sign of softcap({x})"
                );
            }
            println!("softcap[{isa}] cap {cap:e}: worst error {worst:.2} ulp of the value");
        }
    }
}

#[test]
fn softcap_simd_equals_scalar_over_every_tail_length() {
    let scalar = Kernels::for_isa(Isa::available()[0]).unwrap();
    assert_eq!(Isa::available()[0].to_string(), "scalar");
    for isa in Isa::available() {
        let k = Kernels::for_isa(isa).unwrap();
        for len in 0..=70usize {
            // Values on both sides of the polynomial's bound |x/s| = 0.625 (cap 2: x = 1.25).
            let xs: Vec<f32> = (0..len).map(|i| (i as f32 - 35.0) * 0.09).collect();
            let mut want = xs.clone();
            scalar.softcap_in_place(&mut want, 2.0);
            let mut buf = vec![f32::NAN; len + 2];
            buf[1..=len].copy_from_slice(&xs);
            k.softcap_in_place(&mut buf[1..=len], 2.0);
            assert!(buf[0].is_nan() && buf[len + 1].is_nan(), "{isa}: softcap wrote outside, len {len}");
            assert_eq!(&buf[1..=len], &want[..], "{isa}: len {len}");
        }
    }
}

#[test]
fn count_window_matches_a_plain_scan_over_every_tail() {
    // Values on a grid of 101 with repeats, so that windows hold none, a few, or more than
    // the kernel's buffer of 64 (the fallback scan); bounds on and between grid points,
    // infinite ones, and the class to skip inside and outside the window.
    for isa in Isa::available() {
        let k = Kernels::for_isa(isa).unwrap();
        for len in 0..=200 {
            let mut x: Vec<f32> = (0..len).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
            if len > 3 {
                x[len / 2] = f32::NAN;
                x[len - 1] = f32::NEG_INFINITY;
            }
            for (lo, hi) in
                [(-100.0f32, 100.0), (-10.5, -10.5), (0.0, 3.0), (3.0, 3.0), (2.5, 2.75), (f32::NEG_INFINITY, -49.0)]
            {
                for skip in [u32::MAX, 1000 + len as u32 / 3] {
                    let want_above = x.iter().filter(|&&v| v > hi).count();
                    let mut want = vec![(7.0f32, 7u32)];
                    for (j, &z) in x.iter().enumerate() {
                        if z >= lo && z <= hi && 1000 + j as u32 != skip {
                            want.push((z, 1000 + j as u32));
                        }
                    }
                    // Appends after what the window already holds.
                    let mut got = vec![(7.0f32, 7u32)];
                    let above = k.count_window(&x, lo, hi, 1000, skip, &mut got);
                    assert_eq!(above, want_above, "{isa} len {len} [{lo}, {hi}]");
                    assert_eq!(got, want, "{isa} len {len} [{lo}, {hi}] skip {skip}");
                }
            }
        }
    }
}

#[test]
fn count_greater_matches_a_plain_count_over_every_tail() {
    for isa in Isa::available() {
        let k = Kernels::for_isa(isa).unwrap();
        for len in 0..=200 {
            let x: Vec<f32> = (0..len).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
            for t in [-100.0f32, -10.5, 0.0, 3.0, 50.0, f32::NEG_INFINITY] {
                let want = x.iter().filter(|&&v| v > t).count();
                assert_eq!(k.count_greater(&x, t), want, "{isa} len {len} t {t}");
            }
        }
    }
}
