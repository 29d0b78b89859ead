//! Shared test helpers: a seeded generator and naive float64 references.
#![allow(dead_code)]

/// The transpose of a row-major `[rows, cols]` matrix (a `[V, d]` weight as `[d, V]`).
pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|x| a[(x % rows) * cols + x / rows]).collect()
}

/// The crate's SplitMix64 (tested against the reference sequence) with test conveniences.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut g = softmax_layer::rng::SplitMix64::new(self.0);
        let x = g.next_u64();
        self.0 = g.state();
        x
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f32 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (lo + (hi - lo) * u) as f32
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// Float64 reference of one row: `(log_softmax, logsumexp)`, with `z = x + mask` rounded to
/// f32 first (the input the kernels define), then everything in f64.
pub fn reference(x: &[f32], mask: Option<&[f32]>, t: f32) -> (Vec<f64>, f64) {
    let z: Vec<f64> = x.iter().enumerate().map(|(j, &v)| (mask.map_or(v, |m| v + m[j])) as f64 / t as f64).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = z.iter().map(|&v| (v - m).exp()).sum();
    // (v - m) - ln s, not v - lse: near ±3e38 the f64 sum m + ln s drops ln s entirely.
    let ln_s = s.ln();
    (z.iter().map(|&v| (v - m) - ln_s).collect(), m + ln_s)
}

/// Asserts `got` matches a float64 value within `|err| <= tol * max(1, |want|)`, where values
/// beyond the f32 range must be the infinity of their sign.
pub fn assert_log_close(got: f32, want: f64, tol: f64, what: &str) {
    if want < -(f32::MAX as f64) {
        assert_eq!(got, f32::NEG_INFINITY, "{what}: want {want:e} (below f32 range), got {got:e}");
    } else if want > f32::MAX as f64 {
        assert_eq!(got, f32::INFINITY, "{what}: want {want:e} (above f32 range), got {got:e}");
    } else {
        let err = (got as f64 - want).abs();
        assert!(err <= tol * want.abs().max(1.0), "{what}: got {got:e}, want {want:e}, err {err:e}");
    }
}

/// Asserts a probability: relative error <= 1e-6 when want >= 1e-30, else absolute <= 1e-36.
pub fn assert_prob_close(got: f32, want: f64, what: &str) {
    let err = (got as f64 - want).abs();
    if want >= 1e-30 {
        assert!(err <= 1e-6 * want, "{what}: got {got:e}, want {want:e}, rel err {:e}", err / want);
    } else {
        assert!(err <= 1e-36, "{what}: got {got:e}, want {want:e}");
    }
}

/// The command-line binary under test.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_softmax-layer"))
}

/// Borrows built argument lists as `&str`s, for [`run`] and [`fails`].
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Runs the binary: `(exit status, stderr)`.
pub fn run(args: &[&str]) -> (i32, String) {
    let out = bin().args(args).output().expect("run the binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs and expects failure: status 2, exactly one line on stderr containing every `needle`.
pub fn fails(args: &[&str], needles: &[&str]) {
    let (code, err) = run(args);
    assert_eq!(code, 2, "args {args:?}: stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected: {err:?}");
    for n in needles {
        assert!(err.contains(n), "stderr {err:?} should contain {n:?}");
    }
}

/// Runs and expects success.
pub fn ok(args: &[&str]) {
    let (code, err) = run(args);
    assert_eq!(code, 0, "{args:?}: {err}");
}

/// Index of the first `f32` of `buf` on a 64-byte boundary (for outputs the AMX kernel
/// accumulates into in place).
pub fn aligned_offset(buf: &[f32]) -> usize {
    (64 - (buf.as_ptr() as usize % 64)) % 64 / 4
}

/// Checks a tile product written into `out` (`ldo` per row) against `want`: columns below
/// `cols` agree within `tol · (1 + |want|)`, and the rest still hold `canary`.
pub fn assert_tile_matches(out: &[f32], want: &[f32], ldo: usize, cols: usize, canary: f32, tol: f32, what: &str) {
    for (i, (o, w)) in out.chunks_exact(ldo).zip(want.chunks_exact(ldo)).enumerate() {
        for j in 0..ldo {
            let (a, b) = (o[j], w[j]);
            if j >= cols {
                assert_eq!(a, canary, "{what}: wrote outside at [{i},{j}]");
            } else {
                assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what} [{i},{j}]: {a} vs {b}");
            }
        }
    }
}
