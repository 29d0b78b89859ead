//! The tile GEMM (src/tile_gemm.rs) against a float64 reference over every edge, layout
//! and instruction set, with NaN canaries in all padding.
use softmax_layer::tile_gemm::{BLayout, Isa, PackedA, Scratch, Variant, gemm_packed, gemm_packed_kc};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Matrix `rows×cols` with row stride `ld`, NaN in the padding columns.
fn mat(rng: &mut Rng, rows: usize, cols: usize, ld: usize) -> Vec<f32> {
    let mut v = vec![f32::NAN; rows * ld];
    for r in 0..rows {
        for c in 0..cols {
            v[r * ld + c] = rng.next();
        }
    }
    v
}

struct Data {
    k: usize,
    a: Vec<f32>,
    lda: usize,
    bv: Vec<f32>, // VocabMajor 513 x k
    ldbv: usize,
    bh: Vec<f32>, // HiddenMajor k x 513
    ldbh: usize,
}

const MMAX: usize = 129;
const NMAX: usize = 513;

fn data(k: usize, seed: u64) -> Data {
    let mut rng = Rng(seed);
    let lda = k + 3;
    let ldbv = k + 5;
    let ldbh = NMAX + 7;
    Data {
        k,
        a: mat(&mut rng, MMAX, k, lda),
        lda,
        bv: mat(&mut rng, NMAX, k, ldbv),
        ldbv,
        bh: mat(&mut rng, k, NMAX, ldbh),
        ldbh,
    }
}

fn bslice(d: &Data, layout: BLayout, n: usize) -> (&[f32], usize) {
    match layout {
        BLayout::VocabMajor => (&d.bv[..(n - 1) * d.ldbv + d.k], d.ldbv),
        BLayout::HiddenMajor => (&d.bh[..(d.k - 1) * d.ldbh + n], d.ldbh),
    }
}

fn bval(d: &Data, layout: BLayout, p: usize, j: usize) -> f32 {
    match layout {
        BLayout::VocabMajor => d.bv[j * d.ldbv + p],
        BLayout::HiddenMajor => d.bh[p * d.ldbh + j],
    }
}

/// Runs one product and checks it against an f64 reference. Returns the C buffer.
#[allow(clippy::too_many_arguments)]
fn check(
    pa: &mut PackedA,
    scratch: &mut Scratch,
    d: &Data,
    m: usize,
    n: usize,
    layout: BLayout,
    accumulate: bool,
    kc: Option<usize>,
) -> Vec<f32> {
    let k = d.k;
    pa.pack(&d.a[..(m - 1) * d.lda + k], m, k, d.lda);
    let ldc = n + 3;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (m * 1000 + n) as u64);
    // C: valid area NaN when not accumulating (must never be read), random otherwise;
    // padding columns hold NaN canaries that must survive.
    let mut c = vec![f32::NAN; m * ldc];
    let mut c0 = vec![0.0f32; m * n];
    if accumulate {
        for i in 0..m {
            for j in 0..n {
                let v = rng.next();
                c[i * ldc + j] = v;
                c0[i * n + j] = v;
            }
        }
    }
    let (b, ldb) = bslice(d, layout, n);
    let clen = (m - 1) * ldc + n;
    match kc {
        None => gemm_packed(pa, b, layout, n, ldb, &mut c[..clen], ldc, accumulate, scratch),
        Some(kc) => gemm_packed_kc(pa, b, layout, n, ldb, &mut c[..clen], ldc, accumulate, scratch, kc),
    }
    let eps = (2.0f64).powi(-24);
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            let mut sa = 0.0f64;
            for p in 0..k {
                let x = d.a[i * d.lda + p] as f64 * bval(d, layout, p, j) as f64;
                s += x;
                sa += x.abs();
            }
            let mut base = 0.0f64;
            if accumulate {
                base = c0[i * n + j] as f64;
            }
            let want = base + s;
            let got = c[i * ldc + j] as f64;
            let tol = (k as f64 + 2.0) * eps * (sa + base.abs()) + 1e-30;
            assert!(
                (got - want).abs() <= tol,
                "isa {:?} m={m} n={n} k={k} {layout:?} acc={accumulate} kc={kc:?}: C[{i}][{j}] = {got}, want {want} (tol {tol})",
                pa.isa()
            );
        }
        for j in n..ldc {
            if i * ldc + j < c.len() {
                assert!(c[i * ldc + j].is_nan(), "padding of C written at ({i},{j})");
            }
        }
    }
    c
}

fn variants() -> Vec<Variant> {
    [
        Variant::Scalar4x8,
        Variant::Avx2x6x16,
        Variant::Avx512x14x32,
        Variant::Avx512x12x32,
        Variant::Avx512x8x48,
        Variant::Avx512x6x64,
    ]
    .into_iter()
    .filter(|v| v.isa().is_available())
    .collect()
}

fn run_isa(isa: Isa) {
    if !isa.is_available() {
        eprintln!("skipping {isa:?}: not available on this CPU");
        return;
    }
    let mut pa = PackedA::with_isa(isa);
    assert_eq!(pa.isa(), isa);
    let mut scratch = Scratch::new();
    let layouts = [BLayout::VocabMajor, BLayout::HiddenMajor];
    // Every m in 1..=30 and n in 1..=70 for small k.
    for (ki, &k) in [1usize, 7, 64].iter().enumerate() {
        let d = data(k, 1 + ki as u64);
        for m in (1..=30).chain([MMAX]) {
            for n in (1..=70).chain([NMAX]) {
                if m == MMAX && n == NMAX && k > 7 {
                    continue;
                }
                let layout = layouts[(m + n) % 2];
                let acc = (m * 7 + n) % 3 == 0;
                check(&mut pa, &mut scratch, &d, m, n, layout, acc, None);
            }
        }
    }
    // Larger k (several k blocks for 768): edge-heavy subset, both layouts, both modes.
    let ms = [1usize, 2, 5, 8, 12, 13, 14, 15, 28, 29, 30, MMAX];
    let ns = [1usize, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 70, NMAX];
    for (ki, &k) in [257usize, 768].iter().enumerate() {
        let d = data(k, 10 + ki as u64);
        for &m in &ms {
            for &n in &ns {
                if m == MMAX && n == NMAX {
                    continue;
                }
                for layout in layouts {
                    for acc in [false, true] {
                        if (m * n) % 4 != 0 && layout == BLayout::HiddenMajor && acc {
                            continue;
                        }
                        check(&mut pa, &mut scratch, &d, m, n, layout, acc, None);
                    }
                }
            }
        }
    }
    // The full big shapes once each.
    for (ki, &k) in [64usize, 257, 768].iter().enumerate() {
        let d = data(k, 20 + ki as u64);
        for layout in layouts {
            check(&mut pa, &mut scratch, &d, MMAX, NMAX, layout, ki % 2 == 1, None);
        }
    }
}

#[test]
fn scalar_matches_reference() {
    run_isa(Isa::Scalar);
}

#[test]
fn avx2_matches_reference() {
    run_isa(Isa::Avx2);
}

#[test]
fn avx512_matches_reference() {
    run_isa(Isa::Avx512);
}

#[test]
fn detected_isa_is_available() {
    assert!(Isa::detect().is_available());
    assert_eq!(PackedA::new().isa(), Isa::detect());
}

#[test]
fn all_kernel_shapes_and_small_k_blocks() {
    let layouts = [BLayout::VocabMajor, BLayout::HiddenMajor];
    for v in variants() {
        let mut pa = PackedA::with_variant(v);
        let mut scratch = Scratch::new();
        for &k in &[1usize, 7, 64, 257] {
            let d = data(k, 77 + k as u64);
            for &(m, n) in &[(1usize, 1usize), (13, 47), (29, 65), (30, 70), (MMAX, 97)] {
                for layout in layouts {
                    for acc in [false, true] {
                        for kc in [None, Some(5), Some(16), Some(100)] {
                            check(&mut pa, &mut scratch, &d, m, n, layout, acc, kc);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn deterministic_and_position_independent() {
    let k = 768;
    let d = data(k, 5);
    for v in variants() {
        for layout in [BLayout::VocabMajor, BLayout::HiddenMajor] {
            let mut pa = PackedA::with_variant(v);
            let mut scratch = Scratch::new();
            let big = check(&mut pa, &mut scratch, &d, MMAX, 200, layout, false, None);
            let again = check(&mut pa, &mut scratch, &d, MMAX, 200, layout, false, None);
            assert!(big.iter().zip(&again).all(|(x, y)| x.to_bits() == y.to_bits()), "{v:?}: not deterministic");
            // A sub-problem (prefix rows/cols, different tile edges) gives identical bits.
            let small = check(&mut pa, &mut scratch, &d, 17, 37, layout, false, None);
            for i in 0..17 {
                for j in 0..37 {
                    assert_eq!(big[i * 203 + j].to_bits(), small[i * 40 + j].to_bits(), "{v:?} {layout:?} ({i},{j})");
                }
            }
            // Misaligned copies of A and B give identical bits.
            let mut a2 = vec![0.0f32; 1];
            a2.extend_from_slice(&d.a[..(MMAX - 1) * d.lda + k]);
            pa.pack(&a2[1..], MMAX, k, d.lda);
            let (b, ldb) = bslice(&d, layout, 200);
            let mut b2 = vec![0.0f32; 3];
            b2.extend_from_slice(b);
            let mut c2 = vec![0.0f32; MMAX * 203 + 1];
            gemm_packed(&pa, &b2[3..], layout, 200, ldb, &mut c2[1..], 203, false, &mut scratch);
            for i in 0..MMAX {
                for j in 0..200 {
                    assert_eq!(big[i * 203 + j].to_bits(), c2[1 + i * 203 + j].to_bits(), "{v:?} misaligned ({i},{j})");
                }
            }
        }
    }
}

#[test]
fn k_zero_and_empty() {
    let mut pa = PackedA::new();
    let mut s = Scratch::new();
    pa.pack(&[], 3, 0, 0);
    let mut c = vec![5.0f32; 6];
    gemm_packed(&pa, &[], BLayout::VocabMajor, 2, 0, &mut c, 2, true, &mut s);
    assert_eq!(c, vec![5.0; 6]);
    gemm_packed(&pa, &[], BLayout::VocabMajor, 2, 0, &mut c, 2, false, &mut s);
    assert_eq!(c, vec![0.0; 6]);
    gemm_packed(&pa, &[], BLayout::HiddenMajor, 0, 0, &mut [], 0, false, &mut s);
}

#[test]
#[should_panic(expected = "B slice too short")]
fn short_b_panics() {
    let mut pa = PackedA::new();
    pa.pack(&[1.0; 8], 2, 4, 4);
    let mut c = vec![0.0f32; 6];
    gemm_packed(&pa, &[1.0; 11], BLayout::VocabMajor, 3, 4, &mut c, 3, false, &mut Scratch::new());
}

#[test]
#[should_panic(expected = "C slice too short")]
fn short_c_panics() {
    let mut pa = PackedA::new();
    pa.pack(&[1.0; 8], 2, 4, 4);
    let mut c = vec![0.0f32; 5];
    gemm_packed(&pa, &[1.0; 12], BLayout::VocabMajor, 3, 4, &mut c, 3, false, &mut Scratch::new());
}
