//! bf16 benchmarks, one JSON line per figure, medians of REPEATS timed calls after one
//! warm-up:
//!
//! ```text
//! cargo run --release --example bench_bf16 -- [REPEATS] [WHAT...]
//! ```
//!
//! WHAT (default: all) — each on a rayon pool of 2 threads (this machine's cores):
//! - `peak`: the register-only loop of the path's product instruction, no memory, 1 and 2
//!   threads: `tdpbf16ps` on tiles (the tile-only AMX peak) or, without AMX, `vdpbf16ps` on
//!   zmm registers.
//! - `gemm`: the bf16 product at n=2048, d=768, V=50257, through the engine with a consumer
//!   that discards each tile (the product alone), and `logits` (written out as f32).
//! - `bf16x3`: the same product in bf16x3.
//! - `kchunk`: the AMX kernel's k-chunking (a tuning knob) against none, alternated.
//! - `tiling`, `prefetch`: engine tilings and the AMX kernel's W prefetch modes against
//!   the defaults, alternated.
//! - `target`: fused target log-probs in bf16 at the same shape (and f32 for reference).
//! - `loss`: fused cross-entropy forward + backward in bf16, bf16x3 and f32.
//! - `decode`: n=1, d=4096, V=128256 with bf16 weights kept as bf16 (target log-prob),
//!   against a read of the same number of bytes.
//! - `decode_paths`: the decode step on AMX against AVX512-BF16, alternated.
//! - `dh_chunks`: the bf16 loss's `dH = G·W[seg]` product for one block of 320 rows over
//!   four segments of 2048 classes (d = 768, two threads over the segments), in chunks of
//!   128 rows against the chunks the loss takes (`loss::dh_chunk_rows`: 320 rows in bf16,
//!   128 in bf16x3), alternated.
//!
//! `SOFTMAX_LAYER_BF16_PATH=amx|avx512bf16|portable` forces a path.
#[path = "../benches/support/data.rs"]
mod data;
#[path = "../benches/support/read.rs"]
mod read;

use softmax_layer::engine::{self, Consumer};
use softmax_layer::{BfPath, LayerOptions, MatMut, MatRef, PackedBf16Weights, Precision, SoftmaxLayer, WeightLayout};
use std::ops::Range;
use std::time::Instant;

/// Discards every tile: the engine's product alone.
struct Discard;
impl Consumer for Discard {
    type State = f32;
    fn init(&self, _rows: Range<usize>) -> f32 {
        0.0
    }
    fn visit(&self, st: &mut f32, tile: &[f32], _rows: Range<usize>, _cols: Range<usize>) {
        // One element per tile keeps the product from being optimized away.
        *st += tile[0];
    }
    fn merge(&self, a: f32, b: f32) -> f32 {
        a + b
    }
}

fn line(what: &str, n: usize, d: usize, v: usize, med: f64, extra: &str) {
    let gflops = 2.0 * (n * d * v) as f64 / med / 1e9;
    println!(
        "{{\"what\": \"{what}\", \"n\": {n}, \"d\": {d}, \"v\": {v}, \"median_s\": {med:.6}, \"gflops\": {gflops:.1}{extra}}}"
    );
}

/// `gflops / peak` with three decimals, or `null` where the path has no peak loop.
fn fraction(gflops: f64, peak: f64) -> String {
    if peak > 0.0 { format!("{:.3}", gflops / peak) } else { "null".into() }
}

fn timed(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    data::median_secs(reps, f)
}

/// Medians of `f` and `g` timed alternately, so that both see the same machine load (it is
/// shared): their ratio is meaningful even when the absolute times drift.
fn timed_pair(reps: usize, mut f: impl FnMut(), mut g: impl FnMut()) -> (f64, f64) {
    f();
    g();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        f();
        a.push(s.elapsed().as_secs_f64());
        let s = Instant::now();
        g();
        b.push(s.elapsed().as_secs_f64());
    }
    a.sort_by(|x, y| x.total_cmp(y));
    b.sort_by(|x, y| x.total_cmp(y));
    (a[a.len() / 2], b[b.len() / 2])
}

/// The register-only loop of `path`'s product instruction (AMX's `tdpbf16ps` on tiles, or
/// `vdpbf16ps` on zmm registers) on `threads` of the pool at once, about `flops` of work
/// per thread; returns the flops done (0 if the path has no such loop).
fn peak(path: BfPath, threads: usize, flops: u64) -> f64 {
    // Flops per iteration: 4 tile products of 16·16·32·2, or 24 zmm products of 16·2·2.
    let per_iter = if path == BfPath::Amx { 4 * 16 * 16 * 32 * 2 } else { 24 * 16 * 2 * 2 };
    let iters = (flops / per_iter).max(1);
    rayon::broadcast(|ctx| if ctx.index() < threads { softmax_layer::bf16::peak_loop(path, iters) } else { 0 })
        .iter()
        .sum::<u64>() as f64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    let want: Vec<&str> = args.iter().skip(1).map(|s| s.as_str()).collect();
    let on = |w: &str| want.is_empty() || want.contains(&w);
    // BENCH_THREADS (default 2) and BENCH_TILING=rows,cols,segment are for tuning.
    let threads: usize = std::env::var("BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("rayon pool");
    let tiling_env = std::env::var("BENCH_TILING").ok().map(|t| {
        let p: Vec<usize> = t.split(',').map(|x| x.parse().expect("BENCH_TILING=rows,cols,segment")).collect();
        softmax_layer::engine::Tiling { row_block: p[0], col_tile: p[1], segment: p[2] }
    });
    let path = BfPath::best();
    eprintln!("bf16 path: {path}");

    if on("peak") {
        if peak(path, 1, 1) == 0.0 {
            eprintln!("peak: the {path} path has no product instruction to time");
        }
        for threads in [1usize, 2].into_iter().filter(|&t| t <= threads) {
            let mut flops = 0.0;
            let med = timed(reps, || flops = peak(path, threads, 131_072_000_000));
            if flops > 0.0 {
                println!(
                    "{{\"what\": \"{path}_peak\", \"threads\": {threads}, \"median_s\": {med:.6}, \"gflops\": {:.1}}}",
                    flops / med / 1e9
                );
            }
        }
    }

    let (n, d, v) = (2048, 768, 50257);
    if on("gemm") || on("target") || on("bf16x3") || on("kchunk") || on("tiling") || on("prefetch") {
        let t0 = Instant::now();
        let h = data::fill(n * d, 1, -1.0, 1.0);
        let ws = (3.0 / d as f32).sqrt();
        let w = data::fill(v * d, 2, -ws, ws);
        let targets: Vec<i64> = (0..n as i64).map(|i| (i * 7919) % v as i64).collect();
        let hv = MatRef::new(&h, n, d).unwrap();
        let mut f32_layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>).unwrap();
        if let Some(t) = tiling_env {
            f32_layer = f32_layer.with_tiling(t);
        }
        let t1 = Instant::now();
        let bf = f32_layer.clone().with_precision(Precision::Bf16).unwrap();
        eprintln!("data {:.2} s, packing W in bf16 {:.3} s", (t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64());
        let tiling = bf.tiling();
        if on("gemm") {
            // The product, alternated with the peak loop on as many threads.
            let mut flops = 0.0;
            let (med, med_peak) = timed_pair(
                reps,
                || {
                    std::hint::black_box(engine::run(&bf, hv, &Discard, tiling));
                },
                || flops = peak(path, rayon::current_num_threads(), 13_107_200_000),
            );
            let peak_gflops = flops / med_peak / 1e9;
            let gflops = 2.0 * (n * d * v) as f64 / med / 1e9;
            line(
                "bf16_product",
                n,
                d,
                v,
                med,
                &format!(
                    ", \"peak_gflops_same_run\": {peak_gflops:.1}, \"fraction_of_peak\": {}",
                    fraction(gflops, peak_gflops)
                ),
            );
            // The product again, on its own: right after the tile-only loop, the cores may
            // still run at the lower clock that heavy AMX work brings.
            let med = timed(reps, || {
                std::hint::black_box(engine::run(&bf, hv, &Discard, tiling));
            });
            line(
                "bf16_product_alone",
                n,
                d,
                v,
                med,
                &format!(", \"fraction_of_peak\": {}", fraction(2.0 * (n * d * v) as f64 / med / 1e9, peak_gflops)),
            );
            let mut out = vec![0f32; n * v];
            let med = timed(reps, || bf.logits(hv, MatMut::new(&mut out, n, v).unwrap()).unwrap());
            line("bf16_logits_written", n, d, v, med, "");
            let med = timed(reps, || {
                std::hint::black_box(engine::run(&f32_layer, hv, &Discard, f32_layer.tiling()));
            });
            line("f32_product", n, d, v, med, "");
        }
        let amx = path == BfPath::Amx;
        if (on("kchunk") || on("prefetch")) && !amx {
            eprintln!("kchunk, prefetch: AMX knobs; this run's path is {path}");
        }
        if on("kchunk") && amx {
            // The AMX kernel's k-chunk: none (24 steps = all of d = 768) against 8 and 12,
            // alternated.
            let run = |k: usize| {
                softmax_layer::bf16::amx::set_k_chunk(k);
                std::hint::black_box(engine::run(&bf, hv, &Discard, tiling));
            };
            for k in [8usize, 12] {
                let (a, b) = timed_pair(reps, || run(24), || run(k));
                println!(
                    "{{\"what\": \"amx_kchunk\", \"kchunk_24_s\": {a:.6}, \"kchunk_{k}_s\": {b:.6}, \"ratio\": {:.3}}}",
                    a / b
                );
            }
            softmax_layer::bf16::amx::set_k_chunk(usize::MAX);
        }
        if on("prefetch") && amx {
            // The AMX kernel's prefetch of the next W blocks: default against the others.
            let run = |mode: usize| {
                softmax_layer::bf16::amx::set_prefetch_mode(mode);
                std::hint::black_box(engine::run(&bf, hv, &Discard, tiling));
            };
            for mode in [1usize, 2, 3] {
                let (a, b) = timed_pair(reps, || run(0), || run(mode));
                println!(
                    "{{\"what\": \"amx_prefetch\", \"default_s\": {a:.6}, \"mode_{mode}_s\": {b:.6}, \"ratio\": {:.3}}}",
                    a / b
                );
            }
            softmax_layer::bf16::amx::set_prefetch_mode(0);
        }
        if on("tiling") {
            // Engine tilings for the bf16 product, each alternated with the default.
            use softmax_layer::engine::Tiling;
            for (r, c) in [(128usize, 512usize), (256, 256), (128, 256), (512, 256)] {
                let t = Tiling { row_block: r, col_tile: c, segment: 8192 };
                let other = bf.clone().with_tiling(t);
                let (a, b) = timed_pair(
                    reps,
                    || {
                        std::hint::black_box(engine::run(&bf, hv, &Discard, tiling));
                    },
                    || {
                        std::hint::black_box(engine::run(&other, hv, &Discard, t));
                    },
                );
                println!(
                    "{{\"what\": \"tiling\", \"default_s\": {a:.6}, \"rows_{r}_cols_{c}_s\": {b:.6}, \"ratio\": {:.3}}}",
                    a / b
                );
            }
        }
        if on("bf16x3") {
            let x3 = f32_layer.clone().with_precision(Precision::Bf16x3).unwrap();
            let run = |fuse: bool| {
                softmax_layer::bf16::amx::set_fuse3(fuse);
                std::hint::black_box(engine::run(&x3, hv, &Discard, tiling));
            };
            let (a, b) = timed_pair(reps, || run(true), || run(false));
            println!(
                "{{\"what\": \"bf16x3_fused_terms\", \"fused_s\": {a:.6}, \"term_by_term_s\": {b:.6}, \"ratio\": {:.3}}}",
                b / a
            );
            softmax_layer::bf16::amx::set_fuse3(true);
            let med = timed(reps, || {
                std::hint::black_box(engine::run(&x3, hv, &Discard, tiling));
            });
            line("bf16x3_product", n, d, v, med, "");
            let mut small = vec![0f32; n];
            let med = timed(reps, || x3.target_log_probs(hv, &targets, &mut small, &LayerOptions::default()).unwrap());
            line("bf16x3_target_log_probs", n, d, v, med, "");
        }
        if on("target") {
            let mut small = vec![0f32; n];
            let opts = LayerOptions::default();
            let med = timed(reps, || bf.target_log_probs(hv, &targets, &mut small, &opts).unwrap());
            line("bf16_target_log_probs", n, d, v, med, "");
            let med = timed(reps, || f32_layer.target_log_probs(hv, &targets, &mut small, &opts).unwrap());
            line("f32_target_log_probs", n, d, v, med, "");
        }
    }

    if want.contains(&"dh_chunks") {
        dh_chunks(reps, path);
    }

    if on("loss") {
        // Fused cross-entropy forward + backward (dH, dW) in each precision.
        let h = data::fill(n * d, 1, -1.0, 1.0);
        let ws = (3.0 / d as f32).sqrt();
        let w = data::fill(v * d, 2, -ws, ws);
        let targets: Vec<i64> = (0..n as i64).map(|i| (i * 7919) % v as i64).collect();
        let hv = MatRef::new(&h, n, d).unwrap();
        let f32_layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, None::<&[f32]>).unwrap();
        let (mut gh, mut gw) = (vec![0f32; n * d], vec![0f32; v * d]);
        for precision in [Precision::Bf16, Precision::Bf16x3, Precision::F32] {
            let layer = f32_layer.clone().with_precision(precision).unwrap();
            let med = timed(reps, || {
                let o = softmax_layer::loss::CrossEntropyOptions::default();
                let up = softmax_layer::loss::Upstream::Scalar(1.0);
                let g = softmax_layer::loss::GradientsMut { hidden: Some(&mut gh), weight: &mut gw, bias: None };
                std::hint::black_box(
                    softmax_layer::loss::cross_entropy_with_grad_into(&layer, hv, &targets, &o, up, g).unwrap(),
                );
            });
            line(&format!("{precision}_loss_forward_backward"), n, d, v, med, "");
        }
    }

    if on("decode") || on("decode_paths") {
        let (n, d, v) = (1, 4096, 128256);
        // bf16 bits straight away: the f32 weight (2 GiB) is never made.
        let bits: Vec<u16> = {
            let mut s = 0x2545_F491_4F6C_DD1Du64;
            (0..v * d)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    softmax_layer::bf16::to_bf16(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05)
                })
                .collect()
        };
        let t = Instant::now();
        let packed = PackedBf16Weights::from_bf16_bits(&bits, WeightLayout::VocabMajor, v, d).unwrap();
        eprintln!("packing the bf16 weight ({v} × {d}) {:.3} s", t.elapsed().as_secs_f64());
        drop(bits);
        let bytes = packed.bytes();
        let t = Instant::now();
        let layer = SoftmaxLayer::from_packed_bf16(packed, None::<&[f32]>).unwrap();
        eprintln!("layer from packed bf16 weights (finite check) {:.3} s", t.elapsed().as_secs_f64());
        let h = data::fill(n * d, 3, -1.0, 1.0);
        let hv = MatRef::new(&h, n, d).unwrap();
        let mut small = vec![0f32; n];
        let opts = LayerOptions::default();
        if on("decode_paths") && !BfPath::Amx.is_available() {
            eprintln!("decode_paths: AMX against AVX512-BF16; AMX is not available here");
        }
        if on("decode_paths") && BfPath::Amx.is_available() {
            // The AMX 1x4 kernel against AVX512-BF16 for the decode step, alternated.
            let amx = layer.clone().with_bf16_path(BfPath::Amx).expect("AMX is available");
            if let Ok(avx) = layer.clone().with_bf16_path(BfPath::Avx512Bf16) {
                let mut s2 = vec![0f32; n];
                let (a, b) = timed_pair(
                    reps,
                    || amx.target_log_probs(hv, &[17], &mut small, &opts).unwrap(),
                    || avx.target_log_probs(hv, &[17], &mut s2, &opts).unwrap(),
                );
                println!("{{\"what\": \"decode_paths\", \"amx_s\": {a:.6}, \"avx512bf16_s\": {b:.6}}}");
            }
        }
        // Alternated with a read of as many bytes, as fast as we can.
        let buf = data::fill(bytes / 4, 4, -1.0, 1.0);
        let (med, med_r) = timed_pair(
            reps,
            || layer.target_log_probs(hv, &[17], &mut small, &opts).unwrap(),
            || {
                std::hint::black_box(read::read_all(&buf));
            },
        );
        let gbs = bytes as f64 / med / 1e9;
        line("bf16_decode_target_log_prob", n, d, v, med, &format!(", \"w_bytes\": {bytes}, \"gb_per_s\": {gbs:.2}"));
        let gbs_r = bytes as f64 / med_r / 1e9;
        println!(
            "{{\"what\": \"read_same_bytes\", \"bytes\": {bytes}, \"median_s\": {med_r:.6}, \"gb_per_s\": {gbs_r:.2}, \"decode_fraction_of_read\": {:.3}}}",
            med_r / med
        );
    }
}

/// See `dh_chunks` in the module docs. Each segment's `W[seg]` (3 MB in bf16) lies beyond
/// L2, as in the loss; a chunk of `G`'s rows is packed, then multiplied into its rows of the
/// segment's `dH` part.
fn dh_chunks(reps: usize, path: BfPath) {
    use rayon::prelude::*;
    use softmax_layer::bf16::{Output, PackedRows, tile_product};
    let (m, c, d, segs) = (320usize, 2048usize, 768usize, 25usize);
    let g = data::fill(m * c, 5, -1e-3, 1e-3);
    for precision in [Precision::Bf16, Precision::Bf16x3] {
        // W[seg] as the product's right operand: d units, K = c classes.
        let w: Vec<PackedBf16Weights> = (0..segs)
            .map(|s| {
                let wt = data::fill(d * c, 10 + s as u64, -0.06, 0.06);
                PackedBf16Weights::from_f32(&wt, WeightLayout::VocabMajor, d, c, precision).unwrap()
            })
            .collect();
        let mut outs = vec![vec![0f32; m * d]; segs];
        let mut run = |rows: usize| {
            outs.par_iter_mut().zip(&w).for_each(|(out, w_seg)| {
                for i0 in (0..m).step_by(rows) {
                    let mi = rows.min(m - i0);
                    let packed = PackedRows::pack(MatRef::new(&g[i0 * c..(i0 + mi) * c], mi, c).unwrap(), precision);
                    tile_product(path, &packed, w_seg, 0..d, &mut out[i0 * d..(i0 + mi) * d], d, Output::Overwrite);
                }
            });
        };
        let chosen = softmax_layer::loss::dh_chunk_rows(c, precision);
        let run = std::cell::RefCell::new(&mut run);
        let (a, b) = timed_pair(reps, || (run.borrow_mut())(128), || (run.borrow_mut())(chosen));
        println!(
            "{{\"what\": \"dh_chunks\", \"precision\": \"{precision}\", \"rows_128_s\": {a:.6}, \"rows_{chosen}_s\": {b:.6}, \"ratio\": {:.3}}}",
            b / a
        );
    }
}
