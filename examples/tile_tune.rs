//! Tuning sweep for the engine's f32 tile product on AVX-512 (x86_64 only):
//! `cargo run --release --example tile_tune [REPS [VARIANT | l1]]`.
//!
//! Times one block of 256 hidden rows (d = 768) against all of a [50257, 768] weight, tile
//! by tile as the engine does, on 2 threads, for each AVX-512 micro-kernel shape (or only
//! those whose name contains VARIANT, e.g. `12x32`) and each k-block of 768, 384, 256 and
//! 192. `l1` instead times the kernels on L1-resident operands and measures the FMA peak
//! (registers only) on 1 and 2 threads.
#[cfg(target_arch = "x86_64")]
use softmax_layer::tile_gemm::{BLayout, PackedA, Scratch, Variant, gemm_packed_kc};
#[cfg(target_arch = "x86_64")]
use std::time::Instant;

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("tile_tune: AVX-512 only");
}

#[cfg(target_arch = "x86_64")]
fn main() {
    if !is_x86_feature_detected!("avx512f") {
        eprintln!("tile_tune: this CPU has no AVX-512");
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    if args.get(2).map(String::as_str) == Some("l1") {
        l1_case();
        fma_peak();
        return;
    }
    let (r, d, v, ct) = (256usize, 768usize, 50257usize, 512usize);
    let mut s = 1u64;
    let mut rnd = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let h: Vec<f32> = (0..r * d).map(|_| rnd()).collect();
    let w: Vec<f32> = (0..v * d).map(|_| rnd()).collect();
    let variants = [Variant::Avx512x12x32, Variant::Avx512x14x32, Variant::Avx512x8x48, Variant::Avx512x6x64];
    let kcs = [768usize, 384, 256, 192];
    for rep in 0..reps {
        for &var in &variants {
            if let Some(f) = args.get(2).filter(|f| f.as_str() != "l1")
                && !format!("{var:?}").contains(f.as_str())
            {
                continue;
            }
            for &kc in &kcs {
                let t = Instant::now();
                std::thread::scope(|sc| {
                    for th in 0..2 {
                        let (h, w) = (&h, &w);
                        sc.spawn(move || {
                            let mut a = PackedA::with_variant(var);
                            a.pack(h, r, d, d);
                            let mut scr = Scratch::new();
                            let mut tile = vec![0f32; r * ct];
                            let half = v / 2;
                            let (lo, hi) = if th == 0 { (0, half) } else { (half, v) };
                            let mut c0 = lo;
                            while c0 < hi {
                                let n = ct.min(hi - c0);
                                gemm_packed_kc(
                                    &a,
                                    &w[c0 * d..],
                                    BLayout::VocabMajor,
                                    n,
                                    d,
                                    &mut tile,
                                    n,
                                    false,
                                    &mut scr,
                                    kc,
                                );
                                c0 += n;
                            }
                            std::hint::black_box(&tile);
                        });
                    }
                });
                let s = t.elapsed().as_secs_f64();
                let gf = 2.0 * (r * d * v) as f64 / s / 1e9;
                println!("rep {rep} {var:?} kc {kc}: {:.1} ms  {gf:.0} GFLOP/s (2 threads)", s * 1e3);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn l1_case() {
    // Everything in L1: A 12 x 256 (one panel), B 32 x 256.
    for &(var, m) in &[
        (Variant::Avx512x12x32, 12usize),
        (Variant::Avx512x14x32, 14),
        (Variant::Avx512x8x48, 8),
        (Variant::Avx512x6x64, 6),
    ] {
        let nn = var.shape().1;
        let k = 256;
        let t = Instant::now();
        let iters = 200_000;
        std::thread::scope(|sc| {
            for _ in 0..2 {
                sc.spawn(move || {
                    let h = vec![0.5f32; m * k];
                    let w = vec![0.25f32; nn * k];
                    let mut a = PackedA::with_variant(var);
                    a.pack(&h, m, k, k);
                    let mut scr = Scratch::new();
                    let mut c = vec![0f32; m * nn];
                    for _ in 0..iters {
                        gemm_packed_kc(&a, &w, BLayout::VocabMajor, nn, k, &mut c, nn, false, &mut scr, k);
                    }
                    std::hint::black_box(&c);
                });
            }
        });
        let s = t.elapsed().as_secs_f64();
        println!(
            "L1 {var:?}: {:.0} GFLOP/s (2 threads, includes packing B each call)",
            2.0 * 2.0 * (m * nn * k * iters) as f64 / s / 1e9
        );
    }
}

#[cfg(target_arch = "x86_64")]
fn fma_peak() {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f")]
    fn run(iters: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); 12];
        let x = _mm512_set1_ps(1.000001);
        let y = _mm512_set1_ps(0.999999);
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, x, y);
            }
        }
        let mut s = 0.0;
        for a in acc {
            s += _mm512_reduce_add_ps(a);
        }
        s
    }
    let iters = 20_000_000;
    for threads in [1usize, 2] {
        let t = Instant::now();
        std::thread::scope(|sc| {
            for _ in 0..threads {
                // SAFETY: `main` returned early unless the CPU has AVX-512F.
                sc.spawn(move || std::hint::black_box(unsafe { run(iters) }));
            }
        });
        let s = t.elapsed().as_secs_f64();
        println!("FMA peak {threads} threads: {:.0} GFLOP/s", (threads * iters * 12 * 32) as f64 / s / 1e9);
    }
}
