//! bf16 products: every available path against a float64 reference of the bf16-rounded
//! (or split) operands, the paths against each other, and every tail (n, d, V not multiples
//! of 16 or 32, n = 1, class ranges that start and end inside a 16-class block).

mod common;
use common::{aligned_offset, assert_tile_matches, transpose};
use softmax_layer::bf16::{self, BfPath, Output, PackedBf16Weights, PackedRows, Precision, from_bf16, split, to_bf16};
use softmax_layer::{MatRef, WeightLayout};

/// A small deterministic generator of values in [-1, 1) times a scale.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.next() * scale).collect()
    }
}

fn paths() -> Vec<BfPath> {
    let p: Vec<BfPath> = BfPath::ALL.into_iter().filter(|p| p.is_available()).collect();
    eprintln!("bf16 paths available here: {p:?}");
    p
}

/// The value of `x` as the precision sees it, by parts: (hi, lo).
fn parts(x: f32, precision: Precision) -> (f64, f64) {
    match precision {
        Precision::Bf16 => (from_bf16(to_bf16(x)) as f64, 0.0),
        _ => {
            let (hi, lo) = split(x);
            (from_bf16(hi) as f64, from_bf16(lo) as f64)
        }
    }
}

/// `(z, Σ|terms|)` in float64 of the products the precision sums.
fn reference(h: &[f32], w: &[f32], precision: Precision) -> (f64, f64) {
    let (mut z, mut mag) = (0f64, 0f64);
    for (&a, &b) in h.iter().zip(w) {
        let ((ah, al), (bh, bl)) = (parts(a, precision), parts(b, precision));
        for t in [ah * bh, ah * bl, al * bh] {
            z += t;
            mag += t.abs();
        }
    }
    (z, mag)
}

/// Bound on f32 accumulation of `terms` products in any order: γ_m·Σ|terms|, doubled.
fn bound(terms: usize, mag: f64) -> f64 {
    let mu = (terms as f64 + 2.0) * 2f64.powi(-24);
    2.0 * mu / (1.0 - mu) * mag + 1e-30
}

/// Runs `path` on `[n, d] x [V, d]ᵀ` for classes `cols`, output with a NaN-filled margin
/// (row stride `cols.len() + 3`) that must stay NaN.
fn product(path: BfPath, h: &[f32], n: usize, w: &PackedBf16Weights, cols: std::ops::Range<usize>) -> Vec<f32> {
    let d = w.hidden_dim();
    let rows = PackedRows::pack(MatRef::new(h, n, d).unwrap(), w.precision());
    let c = cols.len();
    let ldo = c + 3;
    let mut out = vec![f32::NAN; n * ldo];
    for i in 0..n {
        out[i * ldo..i * ldo + c].fill(0.0);
    }
    bf16::tile_product(path, &rows, w, cols, &mut out, ldo, Output::Add);
    for i in 0..n {
        assert!(out[i * ldo + c..(i + 1) * ldo].iter().all(|x| x.is_nan()), "{path}: wrote outside the tile");
    }
    (0..n).flat_map(|i| out[i * ldo..i * ldo + c].to_vec()).collect()
}

const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 5, 3),
    (1, 33, 17),
    (2, 64, 50),
    (7, 31, 70),
    (16, 32, 16),
    (17, 100, 33),
    (33, 771, 129),
    (40, 96, 200),
    (64, 64, 64),
    // W in several of the AVX512-BF16 kernel's chunks of classes (240 classes a chunk in
    // bf16 at this d, 144 in bf16x3), the ranges starting and ending inside them.
    (9, 771, 700),
];

#[test]
fn every_path_matches_the_float64_reference_of_the_rounded_operands() {
    let paths = paths();
    let mut rng = Lcg(7);
    for precision in [Precision::Bf16, Precision::Bf16x3] {
        for &(n, d, v) in SHAPES {
            let h = rng.vec(n * d, 2.0);
            let w_vd = rng.vec(v * d, 0.5);
            // The same W stored [d, V].
            let w_dv = transpose(&w_vd, v, d);
            let packed = PackedBf16Weights::from_f32(&w_vd, WeightLayout::VocabMajor, v, d, precision).unwrap();
            let packed_dv = PackedBf16Weights::from_f32(&w_dv, WeightLayout::HiddenMajor, v, d, precision).unwrap();
            let ranges = [0..v, v / 3..v, 1.min(v)..v.saturating_sub(1).max(1), 0..1];
            for cols in ranges {
                let mut results = Vec::new();
                for &path in &paths {
                    for (wp, name) in [(&packed, "vd"), (&packed_dv, "dv")] {
                        let z = product(path, &h, n, wp, cols.clone());
                        for i in 0..n {
                            for (jj, j) in cols.clone().enumerate() {
                                let (want, mag) =
                                    reference(&h[i * d..(i + 1) * d], &w_vd[j * d..(j + 1) * d], precision);
                                let got = z[i * cols.len() + jj] as f64;
                                let tol = bound(3 * d, mag);
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{precision} {path} {name} n={n} d={d} V={v} cols={cols:?} [{i},{j}]: {got} vs {want} (tol {tol})"
                                );
                            }
                        }
                        results.push((path, z));
                    }
                }
                // Every path gives the same numbers up to summation order: twice the bound.
                for (p, z) in &results[1..] {
                    for (x, (a, b)) in results[0].1.iter().zip(z).enumerate() {
                        let (i, jj) = (x / cols.len(), x % cols.len());
                        let j = cols.start + jj;
                        let (_, mag) = reference(&h[i * d..(i + 1) * d], &w_vd[j * d..(j + 1) * d], precision);
                        assert!(
                            ((a - b) as f64).abs() <= 2.0 * bound(3 * d, mag),
                            "{} vs {p}: {a} vs {b}",
                            results[0].0
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bf16x3_is_close_to_the_float64_product_of_the_f32_operands() {
    // Documented bound: |z − Σ h·w| ≤ (2^-15 + γ_3d)·Σ|h·w|: the split leaves each operand
    // with a relative error ≤ 2^-17 (hi + lo is x to 16 + 1 bits), the dropped lo·lo term is
    // ≤ 2^-16 relative, and f32 accumulation adds γ.
    let mut rng = Lcg(11);
    let (n, d, v) = (9, 257, 45);
    let h = rng.vec(n * d, 3.0);
    let w = rng.vec(v * d, 0.1);
    let packed = PackedBf16Weights::from_f32(&w, WeightLayout::VocabMajor, v, d, Precision::Bf16x3).unwrap();
    for path in paths() {
        let z = product(path, &h, n, &packed, 0..v);
        for i in 0..n {
            for j in 0..v {
                let (mut exact, mut mag) = (0f64, 0f64);
                for k in 0..d {
                    let t = h[i * d + k] as f64 * w[j * d + k] as f64;
                    exact += t;
                    mag += t.abs();
                }
                let err = (z[i * v + j] as f64 - exact).abs();
                assert!(err <= 2f64.powi(-15) * mag + bound(3 * d, mag), "{path} [{i},{j}]: err {err}, Σ|hw| {mag}");
            }
        }
    }
}

#[test]
fn bf16_weights_given_as_bits_pack_like_rounded_f32() {
    let mut rng = Lcg(3);
    let (d, v) = (45, 21);
    let w = rng.vec(v * d, 1.0);
    let bits: Vec<u16> = w.iter().map(|&x| to_bf16(x)).collect();
    let a = PackedBf16Weights::from_f32(&w, WeightLayout::VocabMajor, v, d, Precision::Bf16).unwrap();
    let b = PackedBf16Weights::from_bf16_bits(&bits, WeightLayout::VocabMajor, v, d).unwrap();
    for j in 0..v {
        for k in 0..d {
            assert_eq!(a.parts_at(j, k), b.parts_at(j, k));
        }
    }
    assert!(PackedBf16Weights::from_bf16_bits(&bits[1..], WeightLayout::VocabMajor, v, d).is_err());
    assert!(PackedBf16Weights::from_f32(&w, WeightLayout::VocabMajor, v, d, Precision::F32).is_err());
    assert!(PackedBf16Weights::from_f32(&w, WeightLayout::VocabMajor, 0, d, Precision::Bf16).is_err());
}

#[test]
fn path_names_parse_and_the_portable_path_is_always_there() {
    for p in BfPath::ALL {
        assert_eq!(BfPath::parse(&p.to_string()), Some(p));
    }
    assert!(BfPath::Portable.is_available());
    assert!(BfPath::best().is_available());
    for p in [Precision::F32, Precision::Bf16, Precision::Bf16x3] {
        assert_eq!(Precision::parse(&p.to_string()), Some(p));
    }
    assert_eq!(Precision::parse("fp8"), None);
}

// ---- The layer in bf16 precisions: every forward operation. ----

use softmax_layer::engine::Tiling;
use softmax_layer::{LayerOptions, MatMut, SoftmaxLayer};

/// float64 logits `[n, V]` of the operands as `precision` sees them, plus the bias, and
/// each one's accumulation bound.
fn ref_logits(
    h: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    d: usize,
    v: usize,
    precision: Precision,
) -> (Vec<f64>, Vec<f64>) {
    let mut z = vec![0f64; n * v];
    let mut tol = vec![0f64; n * v];
    for i in 0..n {
        for j in 0..v {
            let (x, mag) = match precision {
                Precision::F32 => {
                    let x: f64 = (0..d).map(|k| h[i * d + k] as f64 * w[j * d + k] as f64).sum();
                    let m: f64 = (0..d).map(|k| (h[i * d + k] as f64 * w[j * d + k] as f64).abs()).sum();
                    (x, m)
                }
                p => reference(&h[i * d..(i + 1) * d], &w[j * d..(j + 1) * d], p),
            };
            z[i * v + j] = x + b[j] as f64;
            tol[i * v + j] = bound(3 * d + 1, mag + (b[j] as f64).abs());
        }
    }
    (z, tol)
}

fn lse64(row: &[f64]) -> f64 {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + row.iter().map(|z| (z - m).exp()).sum::<f64>().ln()
}

#[test]
fn every_forward_operation_runs_in_bf16_on_every_path() {
    let mut rng = Lcg(21);
    let (n, d, v) = (37, 70, 1000);
    let h = rng.vec(n * d, 2.0);
    let w = rng.vec(v * d, 0.5);
    let b = rng.vec(v, 0.3);
    let targets: Vec<i64> = (0..n).map(|i| ((i * 131) % v) as i64).collect();
    let hv = MatRef::new(&h, n, d).unwrap();
    let opts = LayerOptions { temperature: 0.7 };
    let t = opts.temperature as f64;
    for precision in [Precision::Bf16, Precision::Bf16x3] {
        let (z, tol) = ref_logits(&h, &w, &b, n, d, v, precision);
        let max_tol = tol.iter().cloned().fold(0.0, f64::max);
        for path in paths() {
            for tiling in [Tiling::default(), Tiling { row_block: 16, col_tile: 40, segment: 120 }] {
                let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, Some(&b[..]))
                    .unwrap()
                    .with_precision(precision)
                    .unwrap()
                    .with_bf16_path(path)
                    .unwrap()
                    .with_tiling(tiling);
                let ctx = format!("{precision} {path} {tiling:?}");
                let mut logits = vec![0f32; n * v];
                layer.logits(hv, MatMut::new(&mut logits, n, v).unwrap()).unwrap();
                for x in 0..n * v {
                    assert!((logits[x] as f64 - z[x]).abs() <= tol[x], "{ctx}: logit {x}: {} vs {}", logits[x], z[x]);
                }
                // Reductions: within the logits' error (scaled by 1/T) plus f32 rounding.
                let eps = max_tol / t + 1e-5;
                let mut lse = vec![0f32; n];
                layer.logsumexp(hv, &mut lse, &opts).unwrap();
                let mut tlp = vec![0f32; n];
                layer.target_log_probs(hv, &targets, &mut tlp, &opts).unwrap();
                let mut lp = vec![0f32; n * v];
                layer.log_probs(hv, MatMut::new(&mut lp, n, v).unwrap(), &opts).unwrap();
                let mut p = vec![0f32; n * v];
                layer.probs(hv, MatMut::new(&mut p, n, v).unwrap(), &opts).unwrap();
                let mut am = vec![0usize; n];
                layer.argmax(hv, &mut am).unwrap();
                let top = layer.top_k(hv, 5, &opts).unwrap();
                let stats = layer.target_stats(hv, &targets, 3, &opts).unwrap();
                for i in 0..n {
                    let row: Vec<f64> = z[i * v..(i + 1) * v].iter().map(|x| x / t).collect();
                    let l = lse64(&row);
                    assert!((lse[i] as f64 - l).abs() <= 2.0 * eps, "{ctx}: lse {i}: {} vs {l}", lse[i]);
                    let want = row[targets[i] as usize] - l;
                    assert!((tlp[i] as f64 - want).abs() <= 2.0 * eps, "{ctx}: target lp {i}");
                    assert!((stats[i].log_prob - tlp[i]).abs() <= 1e-5, "{ctx}: target_stats lp {i}");
                    for j in 0..v {
                        assert!((lp[i * v + j] as f64 - (row[j] - l)).abs() <= 2.0 * eps, "{ctx}: lp [{i},{j}]");
                        assert!((p[i * v + j] as f64 - (row[j] - l).exp()).abs() <= 2.0 * eps, "{ctx}: p [{i},{j}]");
                    }
                    // Exact with respect to the logits the layer computes.
                    let lrow = &logits[i * v..(i + 1) * v];
                    let best = lrow.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    assert_eq!(am[i], lrow.iter().position(|&x| x == best).unwrap(), "{ctx}: argmax {i}");
                    assert_eq!(top.indices[i * 5], am[i], "{ctx}: top-1 {i}");
                    let zy = lrow[targets[i] as usize];
                    let rank = 1 + lrow.iter().filter(|&&x| x > zy).count();
                    assert_eq!(stats[i].rank, rank, "{ctx}: rank {i}");
                }
            }
        }
    }
}

#[test]
fn a_layer_from_bf16_weights_equals_the_rounded_f32_layer() {
    let mut rng = Lcg(5);
    let (n, d, v) = (19, 67, 300);
    let h = rng.vec(n * d, 1.0);
    let w = rng.vec(v * d, 1.0);
    let bits: Vec<u16> = w.iter().map(|&x| to_bf16(x)).collect();
    let hv = MatRef::new(&h, n, d).unwrap();
    let rounded = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>)
        .unwrap()
        .with_precision(Precision::Bf16)
        .unwrap();
    let packed = PackedBf16Weights::from_bf16_bits(&bits, WeightLayout::VocabMajor, v, d).unwrap();
    let only_bf16 = SoftmaxLayer::from_packed_bf16(packed, None::<&[f32]>).unwrap();
    assert!(only_bf16.weight().is_empty());
    let (mut a, mut b) = (vec![0f32; n * v], vec![0f32; n * v]);
    rounded.logits(hv, MatMut::new(&mut a, n, v).unwrap()).unwrap();
    only_bf16.logits(hv, MatMut::new(&mut b, n, v).unwrap()).unwrap();
    assert_eq!(a, b);
    // No f32 weights: other precisions and the gradients are errors, not panics.
    assert!(only_bf16.clone().with_precision(Precision::F32).is_err());
    // A finite f32 weight beyond bf16's range (f32::MAX rounds to bf16 infinity): an error
    // naming it, in both precisions.
    let mut huge = [0.5f32; 3 * 4];
    huge[7] = f32::MAX;
    let l = SoftmaxLayer::new(&huge[..], WeightLayout::VocabMajor, 3, 4, None::<&[f32]>).unwrap();
    for p in [Precision::Bf16, Precision::Bf16x3] {
        let e = l.clone().with_precision(p).unwrap_err().to_string();
        assert!(e.contains("weight[1, 3]") && e.contains("bf16 range"), "{p}: {e}");
    }
    let targets = vec![0i64; n];
    let r = softmax_layer::loss::cross_entropy_with_grad(
        &only_bf16,
        hv,
        &targets,
        &Default::default(),
        softmax_layer::loss::Upstream::Scalar(1.0),
    );
    assert!(r.is_err());
    // A NaN in bf16 weights is named.
    let mut bad = bits.clone();
    bad[3 * d + 2] = 0x7fc0;
    let packed = PackedBf16Weights::from_bf16_bits(&bad, WeightLayout::VocabMajor, v, d).unwrap();
    let e = SoftmaxLayer::from_packed_bf16(packed, None::<&[f32]>).unwrap_err();
    assert!(matches!(e, softmax_layer::Error::NonFinite { row: 3, col: 2, .. }), "{e}");
}

/// Accuracy of the log-probabilities in each precision against float64 of the `f32`
/// inputs, at a language-model-like scale (d = 768, unit-variance hidden states, weights
/// of standard deviation 1/√d·4 so that logits spread over several units). Prints the
/// figures the README quotes and checks the documented bounds.
#[test]
fn accuracy_of_each_precision_against_float64() {
    let mut rng = Lcg(99);
    let (n, d, v) = (16, 768, 2048);
    let h = rng.vec(n * d, 1.7);
    let w = rng.vec(v * d, 4.0 * 1.7 / (d as f32).sqrt());
    let hv = MatRef::new(&h, n, d).unwrap();
    let (z, _) = ref_logits(&h, &w, &vec![0.0; v], n, d, v, Precision::F32);
    let mut exact = vec![0f64; n * v];
    for i in 0..n {
        let l = lse64(&z[i * v..(i + 1) * v]);
        for j in 0..v {
            exact[i * v + j] = z[i * v + j] - l;
        }
    }
    let spread = z.iter().map(|x| x.abs()).fold(0.0, f64::max);
    let mut errs = Vec::new();
    for precision in [Precision::F32, Precision::Bf16x3, Precision::Bf16] {
        let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>)
            .unwrap()
            .with_precision(precision)
            .unwrap();
        let mut lp = vec![0f32; n * v];
        layer.log_probs(hv, MatMut::new(&mut lp, n, v).unwrap(), &LayerOptions::default()).unwrap();
        let err = lp.iter().zip(&exact).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        eprintln!("max |log p − float64| with {precision}: {err:.3e} (max |logit| {spread:.1})");
        errs.push(err);
    }
    // bf16x3 stays within 8× of f32 and at least 50× better than bf16 here.
    assert!(errs[1] <= 8.0 * errs[0].max(1e-6), "{errs:?}");
    assert!(errs[1] * 50.0 <= errs[2], "{errs:?}");
}

#[test]
fn amx_accumulates_in_place_into_an_aligned_output() {
    // Output rows whole cache lines (stride a multiple of 16 f32, start 64-byte aligned):
    // the AMX kernel loads and stores C there directly. Same numbers as the portable path.
    let mut rng = Lcg(17);
    // d = 800: 25 k-steps (tests/bf16_kchunk.rs runs this in chunks).
    let (n, d, v) = (70, 800, 300);
    let h = rng.vec(n * d, 1.0);
    let w = rng.vec(v * d, 1.0);
    let packed = PackedBf16Weights::from_f32(&w, WeightLayout::VocabMajor, v, d, Precision::Bf16x3).unwrap();
    let rows = PackedRows::pack(MatRef::new(&h, n, d).unwrap(), Precision::Bf16x3);
    let cols = 32..200;
    let ldo = 176;
    let mut buf = vec![f32::NAN; n * ldo + 16];
    let off = aligned_offset(&buf);
    let mut want = vec![0.5f32; n * ldo];
    bf16::tile_product(BfPath::Portable, &rows, &packed, cols.clone(), &mut want, ldo, Output::Add);
    for path in paths() {
        let out = &mut buf[off..off + n * ldo];
        out.fill(0.5);
        bf16::tile_product(path, &rows, &packed, cols.clone(), out, ldo, Output::Add);
        assert_tile_matches(out, &want, ldo, cols.len(), 0.5, 8e-4, &path.to_string());
    }
}

#[test]
fn results_do_not_depend_on_where_the_output_lies_in_memory() {
    // The same product accumulated onto the same values, with the output 64-byte aligned
    // (AMX accumulates in place) and 4 bytes off (through its scratch): the same bits.
    let mut rng = Lcg(23);
    let (n, d, v) = (70, 800, 300);
    let h = rng.vec(n * d, 1.0);
    let w = rng.vec(v * d, 1.0);
    let packed = PackedBf16Weights::from_f32(&w, WeightLayout::VocabMajor, v, d, Precision::Bf16).unwrap();
    let rows = PackedRows::pack(MatRef::new(&h, n, d).unwrap(), Precision::Bf16);
    let (cols, ldo) = (32..200, 176);
    let start = rng.vec(n * ldo, 3.0);
    let mut buf = vec![0f32; n * ldo + 32];
    let aligned = aligned_offset(&buf);
    for path in paths() {
        let mut results = Vec::new();
        for off in [aligned, aligned + 1] {
            let out = &mut buf[off..off + n * ldo];
            out.copy_from_slice(&start);
            bf16::tile_product(path, &rows, &packed, cols.clone(), out, ldo, Output::Add);
            results.push(out.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
        assert!(results[0] == results[1], "{path}: the bits depend on the output's alignment");
    }
}

// ---- The fused loss and its gradients in bf16 precisions. ----

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().map(|x| x.abs() as f64).fold(0.0, f64::max).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

#[test]
fn loss_gradients_use_the_forward_precision() {
    use softmax_layer::loss::{CrossEntropyOptions, Upstream, cross_entropy_with_grad};
    let mut rng = Lcg(31);
    let (n, d, v) = (150, 80, 700);
    let h = rng.vec(n * d, 1.0);
    let w = rng.vec(v * d, 0.3);
    let b = rng.vec(v, 0.1);
    let targets: Vec<i64> = (0..n).map(|i| ((i * 37) % v) as i64).collect();
    let hv = MatRef::new(&h, n, d).unwrap();
    let opts = CrossEntropyOptions { label_smoothing: 0.1, ..Default::default() };
    let grads = |layer: &SoftmaxLayer<'_>, hv: MatRef<'_>| {
        cross_entropy_with_grad(layer, hv, &targets, &opts, Upstream::Scalar(1.0)).unwrap()
    };
    let f32_layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, Some(&b[..])).unwrap();
    let (o32, g32) = grads(&f32_layer, hv);
    // bf16x3: everything within a few 2^-16 of f32.
    for path in paths() {
        let x3 = f32_layer.clone().with_precision(Precision::Bf16x3).unwrap().with_bf16_path(path).unwrap();
        let (o, g) = grads(&x3, hv);
        assert!((o.loss[0] - o32.loss[0]).abs() <= 1e-4 * o32.loss[0].abs(), "{path}: loss");
        assert!(max_rel(&g.hidden, &g32.hidden) <= 2e-4, "{path}: dH {}", max_rel(&g.hidden, &g32.hidden));
        assert!(max_rel(&g.weight, &g32.weight) <= 2e-4, "{path}: dW {}", max_rel(&g.weight, &g32.weight));
        assert!(max_rel(g.bias.as_deref().unwrap(), g32.bias.as_deref().unwrap()) <= 2e-4, "{path}: db");
    }
    // bf16 on bf16-representable H and W: the only rounding left is G's (8 bits).
    let hr: Vec<f32> = h.iter().map(|&x| from_bf16(to_bf16(x))).collect();
    let wr: Vec<f32> = w.iter().map(|&x| from_bf16(to_bf16(x))).collect();
    let hrv = MatRef::new(&hr, n, d).unwrap();
    let exact = SoftmaxLayer::new(&wr[..], WeightLayout::VocabMajor, v, d, Some(&b[..])).unwrap();
    let (_, ge) = grads(&exact, hrv);
    let wr_dv = transpose(&wr, v, d);
    for path in paths() {
        let bf = exact.clone().with_precision(Precision::Bf16).unwrap().with_bf16_path(path).unwrap();
        let (_, g) = grads(&bf, hrv);
        // Without dH (a classifier on fixed features): the same dW and db, bit for bit.
        let (mut gw, mut gb) = (vec![f32::NAN; v * d], vec![f32::NAN; v]);
        let only_w = softmax_layer::loss::GradientsMut { hidden: None, weight: &mut gw, bias: Some(&mut gb) };
        softmax_layer::loss::cross_entropy_with_grad_into(&bf, hrv, &targets, &opts, Upstream::Scalar(1.0), only_w)
            .unwrap();
        let diff = gw.iter().zip(&g.weight).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(diff.is_none(), "{path}: dW without dH differs at {diff:?}: {:?}", diff.map(|i| (gw[i], g.weight[i])));
        assert_eq!(&gb, g.bias.as_ref().unwrap(), "{path}: db without dH");
        let (eh, ew) = (max_rel(&g.hidden, &ge.hidden), max_rel(&g.weight, &ge.weight));
        assert!(eh <= 2f64.powi(-7) && ew <= 2f64.powi(-7), "{path}: dH {eh}, dW {ew}");
        assert!(eh > 0.0, "{path}: G was not rounded");
        // The [d, V] layout gives the same gradients, transposed.
        let dv = SoftmaxLayer::new(&wr_dv[..], WeightLayout::HiddenMajor, v, d, Some(&b[..]))
            .unwrap()
            .with_precision(Precision::Bf16)
            .unwrap()
            .with_bf16_path(path)
            .unwrap();
        let (_, gt) = grads(&dv, hrv);
        assert!(max_rel(&gt.hidden, &g.hidden) <= 1e-5, "{path}: dv dH");
        let gt_vd = transpose(&gt.weight, d, v);
        assert!(max_rel(&gt_vd, &g.weight) <= 1e-5, "{path}: dv dW");
    }
}

/// Over several blocks of rows (the loss reuses its packings of each block's rows), with
/// bf16-representable operands: every precision's gradients stay within G's rounding of the
/// f32 layer's, in both layouts. A packing left stale from the block before would be far off.
#[test]
fn loss_gradients_over_several_blocks_of_rows() {
    use softmax_layer::loss::{CrossEntropyOptions, Upstream, cross_entropy_with_grad};
    let mut rng = Lcg(77);
    // 1100 rows: several blocks of rows (512 each with gradients in bf16), the last one shorter.
    let (n, d, v) = (1100, 48, 700);
    let round = |x: Vec<f32>| x.into_iter().map(|x| from_bf16(to_bf16(x))).collect::<Vec<f32>>();
    let (h, w, b) = (round(rng.vec(n * d, 1.0)), round(rng.vec(v * d, 0.3)), rng.vec(v, 0.1));
    let targets: Vec<i64> = (0..n).map(|i| ((i * 37) % v) as i64).collect();
    let hv = MatRef::new(&h, n, d).unwrap();
    let opts = CrossEntropyOptions::default();
    let wt = transpose(&w, v, d);
    for (weights, layout) in [(&w, WeightLayout::VocabMajor), (&wt, WeightLayout::HiddenMajor)] {
        let f32_layer = SoftmaxLayer::new(&weights[..], layout, v, d, Some(&b[..])).unwrap();
        let (_, g32) = cross_entropy_with_grad(&f32_layer, hv, &targets, &opts, Upstream::Scalar(1.0)).unwrap();
        for precision in [Precision::Bf16, Precision::Bf16x3] {
            for path in paths() {
                let layer = f32_layer.clone().with_precision(precision).unwrap().with_bf16_path(path).unwrap();
                let (_, g) = cross_entropy_with_grad(&layer, hv, &targets, &opts, Upstream::Scalar(1.0)).unwrap();
                let (eh, ew) = (max_rel(&g.hidden, &g32.hidden), max_rel(&g.weight, &g32.weight));
                assert!(eh <= 2f64.powi(-7) && ew <= 2f64.powi(-7), "{layout:?} {precision} {path}: dH {eh}, dW {ew}");
            }
        }
    }
}

/// A vocabulary wide enough for segments of 1024 classes (V/64 rounded up to whole tiles of
/// 512): `dH`'s product then runs in chunks of rows (`loss::dh_chunk_rows`: 320 in bf16x3,
/// whose packings hold two parts; 704 in bf16), so the block of 330 rows takes two chunks
/// in bf16x3.
/// Each chunk must write its own rows of `dH`.
#[test]
fn loss_hidden_gradient_over_chunks_of_rows() {
    use softmax_layer::loss::{CrossEntropyOptions, Upstream, cross_entropy_with_grad};
    let mut rng = Lcg(91);
    let (n, d, v) = (330, 16, 50_000);
    let round = |x: Vec<f32>| x.into_iter().map(|x| from_bf16(to_bf16(x))).collect::<Vec<f32>>();
    let (h, w) = (round(rng.vec(n * d, 1.0)), round(rng.vec(v * d, 0.3)));
    let targets: Vec<i64> = (0..n).map(|i| ((i * 7919) % v) as i64).collect();
    let hv = MatRef::new(&h, n, d).unwrap();
    let opts = CrossEntropyOptions::default();
    let f32_layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>).unwrap();
    let (_, g32) = cross_entropy_with_grad(&f32_layer, hv, &targets, &opts, Upstream::Scalar(1.0)).unwrap();
    assert!(softmax_layer::loss::dh_chunk_rows(1024, Precision::Bf16x3) < n, "one chunk: nothing tested");
    for precision in [Precision::Bf16, Precision::Bf16x3] {
        let layer = f32_layer.clone().with_precision(precision).unwrap();
        let (_, g) = cross_entropy_with_grad(&layer, hv, &targets, &opts, Upstream::Scalar(1.0)).unwrap();
        // Row by row, so that a chunk of rows left unwritten (or written twice) shows.
        for i in 0..n {
            let e = max_rel(&g.hidden[i * d..(i + 1) * d], &g32.hidden[i * d..(i + 1) * d]);
            assert!(e <= 2f64.powi(-7), "{precision}: dH row {i}: {e}");
        }
        assert!(max_rel(&g.weight, &g32.weight) <= 2f64.powi(-7), "{precision}: dW");
    }
}

#[test]
fn overwriting_gives_the_bits_of_adding_onto_zeros_and_never_reads_the_output() {
    // Every path, few rows (AMX's 1×4 kernel) and many (2×2), an output 64-byte aligned
    // (AMX's in-place blocks) and one float off (its scratch), classes not from 0.
    let mut rng = Lcg(29);
    let (d, v) = (100, 300);
    let w = rng.vec(v * d, 1.0);
    for precision in [Precision::Bf16, Precision::Bf16x3] {
        let packed = PackedBf16Weights::from_f32(&w, WeightLayout::VocabMajor, v, d, precision).unwrap();
        for n in [5, 70] {
            let h = rng.vec(n * d, 1.0);
            let rows = PackedRows::pack(MatRef::new(&h, n, d).unwrap(), precision);
            let (cols, ldo) = (32..200, 176);
            let mut buf = vec![0f32; n * ldo + 32];
            let aligned = aligned_offset(&buf);
            for path in paths() {
                for off in [aligned, aligned + 1] {
                    let out = &mut buf[off..off + n * ldo];
                    out.fill(0.0);
                    bf16::tile_product(path, &rows, &packed, cols.clone(), out, ldo, Output::Add);
                    let want: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
                    // NaN where the product writes, 7 in the gaps between rows (kept).
                    for (i, x) in out.iter_mut().enumerate() {
                        *x = if i % ldo < cols.len() { f32::NAN } else { 7.0 };
                    }
                    bf16::tile_product(path, &rows, &packed, cols.clone(), out, ldo, Output::Overwrite);
                    for (i, (x, &b)) in out.iter().zip(&want).enumerate() {
                        let expect = if i % ldo < cols.len() { b } else { 7f32.to_bits() };
                        assert_eq!(x.to_bits(), expect, "{path} {precision} n={n} at {i}: {x}");
                    }
                }
            }
        }
    }
}

#[test]
fn the_kept_gradient_packing_of_w_gives_the_bits_of_a_fresh_one() {
    use softmax_layer::engine::Tiling;
    use softmax_layer::loss::{CrossEntropyOptions, Upstream, cross_entropy_with_grad};
    let mut rng = Lcg(57);
    let (n, d, v) = (70, 48, 530);
    let h = rng.vec(n * d, 1.0);
    let w = rng.vec(v * d, 0.3);
    let targets: Vec<i64> = (0..n).map(|i| ((i * 53) % v) as i64).collect();
    let hv = MatRef::new(&h, n, d).unwrap();
    let opts = CrossEntropyOptions::default();
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let grads = |layer: &SoftmaxLayer<'_>| {
        let (_, g) = cross_entropy_with_grad(layer, hv, &targets, &opts, Upstream::Scalar(1.0)).unwrap();
        (bits(&g.hidden), bits(&g.weight))
    };
    let small = Tiling { row_block: 16, col_tile: 32, segment: 128 };
    for precision in [Precision::Bf16, Precision::Bf16x3] {
        let fresh = || SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>).unwrap();
        let layer = fresh().with_precision(precision).unwrap();
        let first = grads(&layer);
        // The second call and a clone's use the packing the first one kept.
        assert!(first == grads(&layer), "{precision}: second call");
        assert!(first == grads(&layer.clone()), "{precision}: clone");
        // Another tiling gives other segments: the same as a layer built with it.
        let retiled = grads(&layer.clone().with_tiling(small));
        let built = grads(&fresh().with_tiling(small).with_precision(precision).unwrap());
        assert!(retiled == built, "{precision}: retiled");
        // And they are this layer's gradients: within bf16's reach of the f32 layer's.
        let (_, g32) = cross_entropy_with_grad(&fresh(), hv, &targets, &opts, Upstream::Scalar(1.0)).unwrap();
        let gw: Vec<f32> = first.1.iter().map(|&b| f32::from_bits(b)).collect();
        let tol = if precision == Precision::Bf16 { 2f64.powi(-5) } else { 2e-4 };
        assert!(max_rel(&gw, &g32.weight) <= tol, "{precision}: dW {}", max_rel(&gw, &g32.weight));
    }
}

#[test]
fn loss_weight_gradient_does_not_depend_on_where_it_lies() {
    // dW accumulates over three blocks of rows onto the caller's buffer: 64-byte aligned
    // (AMX adds in place) or 4 bytes off (through its scratch), the same bits.
    use softmax_layer::loss::{CrossEntropyOptions, GradientsMut, Upstream, cross_entropy_with_grad_into};
    let mut rng = Lcg(91);
    let (n, d, v) = (1100, 64, 300);
    let (h, w, b) = (rng.vec(n * d, 1.0), rng.vec(v * d, 0.3), rng.vec(v, 0.1));
    let targets: Vec<i64> = (0..n).map(|i| ((i * 53) % v) as i64).collect();
    let hv = MatRef::new(&h, n, d).unwrap();
    let opts = CrossEntropyOptions::default();
    let f32_layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, Some(&b[..])).unwrap();
    let mut buf = vec![0f32; v * d + 32];
    let aligned = aligned_offset(&buf);
    for precision in [Precision::Bf16, Precision::Bf16x3] {
        for path in paths() {
            let layer = f32_layer.clone().with_precision(precision).unwrap().with_bf16_path(path).unwrap();
            let mut results = Vec::new();
            for off in [aligned, aligned + 1] {
                let gw = &mut buf[off..off + v * d];
                gw.fill(f32::NAN);
                let mut gb = vec![0f32; v];
                let g = GradientsMut { hidden: None, weight: gw, bias: Some(&mut gb) };
                cross_entropy_with_grad_into(&layer, hv, &targets, &opts, Upstream::Scalar(1.0), g).unwrap();
                results.push(buf[off..off + v * d].iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            }
            assert!(results[0] == results[1], "{precision:?} {path}: dW depends on its buffer's alignment");
            assert!(results[0].iter().all(|&x| f32::from_bits(x).is_finite()), "{precision:?} {path}: dW not written");
        }
    }
}

/// A packing whose weight is too short for its shape is refused before anything is
/// allocated for the shape (a [2^30, 2^12] claim aborted on an 8 TB allocation).
#[test]
fn packing_checks_the_length_before_allocating() {
    use softmax_layer::PackedBf16Weights;
    let e = PackedBf16Weights::from_f32(&[1.0], WeightLayout::VocabMajor, 1 << 30, 1 << 12, Precision::Bf16);
    assert!(e.unwrap_err().to_string().contains("weight has 1 elements"));
    let e = PackedBf16Weights::from_bf16_bits(&[1], WeightLayout::VocabMajor, 1 << 30, 1 << 12);
    assert!(e.unwrap_err().to_string().contains("weight has 1 elements"));
}

/// A subnormal bf16 operand: AMX and AVX512-BF16 take it as 0, the portable path does not.
/// On every path the target's rank follows that path's own logits (ties to the lower id),
/// as argmax does: h = 1e-39, W = [0, 1e30] gives logits [0, 0] or [0, ~1e-9].
#[test]
fn target_rank_follows_each_paths_logits_when_subnormals_are_flushed() {
    let (h, w) = ([1e-39f32], [0.0f32, 1e30]);
    for precision in [Precision::Bf16, Precision::Bf16x3] {
        for path in paths() {
            let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 2, 1, None::<&[f32]>)
                .unwrap()
                .with_precision(precision)
                .unwrap()
                .with_bf16_path(path)
                .unwrap();
            let hv = MatRef::new(&h, 1, 1).unwrap();
            let mut z = [0f32; 2];
            layer.logits(hv, MatMut::new(&mut z, 1, 2).unwrap()).unwrap();
            let mut best = [0usize];
            layer.argmax(hv, &mut best).unwrap();
            let st = layer.target_stats(hv, &[1], 0, &LayerOptions::default()).unwrap();
            let want = if z[1] > z[0] { 1 } else { 2 };
            assert_eq!(st[0].rank, want, "{precision:?} on {path}: logits {z:?}");
            assert_eq!(best[0] == 1, want == 1, "{precision:?} on {path}: argmax {best:?}");
        }
    }
}
