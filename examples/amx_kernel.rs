//! The AMX kernel on one thread, without the engine: where its time goes.
//!
//! `cargo run --release --example amx_kernel -- [ROUNDS] [M C D]...`
//!
//! - **Load patterns**: in each round, the tile-only loop (the peak), the 2×2 kernel's step
//!   with its 4 tile loads, the loads alone, 2 loads per 4 products, and the kernel's step
//!   with its loads from 4 streams 24 KiB apart (as A and B lie at d = 768), over a 4 KiB
//!   ring (L1) and a 512 KiB ring (L2). Prints each pattern's rate per round as a fraction of
//!   the same round's peak, so that a change of the machine's state during the run shows.
//! - **Blocks** (default 256 512 768 and 256 512 4096, the engine's tile): per round, the
//!   kernel's step on L2 data (a gauge of the machine's state), then `tile_product` on one
//!   block of m rows × c classes × d: a fresh W block of a V = 50257 vocabulary per call
//!   written over a 64-byte-aligned output (as in the engine for a layer without bias), the
//!   same adding to the output, the same W block each call, and the same into an output one
//!   float off alignment. `BLOCKS_ONLY=1` skips the load patterns.
use softmax_layer::bf16::amx::{self, LoadPattern};
use softmax_layer::bf16::{self, Output, PackedRows};
use softmax_layer::{BfPath, PackedBf16Weights, Precision};
use std::time::Instant;

/// GFLOP/s of one call of `f`, which returns its flops.
fn rate(f: impl FnOnce() -> u64) -> f64 {
    let t = Instant::now();
    let flops = f();
    flops as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|s| s.parse().ok()).collect();
    if !BfPath::Amx.is_available() {
        eprintln!("AMX is not available here");
        return;
    }
    let rounds = args.first().copied().unwrap_or(7).max(1);
    let mut shapes: Vec<[usize; 3]> = args[1.min(args.len())..].chunks_exact(3).map(|s| [s[0], s[1], s[2]]).collect();
    if shapes.is_empty() {
        shapes = vec![[256, 512, 768], [256, 512, 4096]];
    }
    let patterns = [LoadPattern::Kernel, LoadPattern::LoadsOnly, LoadPattern::HalfLoads, LoadPattern::Streams];
    let iters = 300_000u64;
    for kib in [4usize, 512] {
        let buf = vec![0u16; kib * 512 + 32];
        if std::env::var("BLOCKS_ONLY").is_ok() {
            break;
        }
        println!("ring of {kib} KiB, per round (fraction of the round's tile-only peak):");
        let mut all = vec![Vec::new(); patterns.len()];
        for _ in 0..rounds {
            let peak = rate(|| amx::peak_loop(iters));
            let mut line = format!("  peak {peak:5.0} GFLOP/s");
            for (p, acc) in patterns.iter().zip(&mut all) {
                // The streams pattern needs 96 KiB: not in the L1 ring.
                if *p == LoadPattern::Streams && kib < 96 {
                    continue;
                }
                let r = rate(|| amx::load_loop(iters, &buf, *p)) / peak;
                line += &format!("  {p:?} {r:.2}");
                acc.push(r);
            }
            println!("{line}");
        }
        let meds: Vec<String> = patterns
            .iter()
            .zip(&mut all)
            .filter(|(_, v)| !v.is_empty())
            .map(|(p, v)| format!("{p:?} {:.2}", median(v)))
            .collect();
        println!("  medians: {}", meds.join(", "));
    }
    for [m, c, d] in shapes {
        let v = 50257usize;
        let rows = PackedRows::from_fn(m, d, Precision::Bf16, |i, k| ((i * 31 + k * 7) % 97) as f32 / 97.0 - 0.5);
        let w = PackedBf16Weights::from_fn(v, d, Precision::Bf16, |j, k| ((j * 13 + k * 5) % 89) as f32 / 89.0 - 0.5);
        let mut buf = vec![0f32; m * c + 32];
        let at = buf.as_ptr().align_offset(64);
        let blocks = v / c;
        let calls = ((4e9 / (2.0 * (m * c * d) as f64)) as usize).max(4);
        let ring = vec![0u16; 512 * 512 + 32];
        let cases =
            ["kernel step", "engine-like block", "same, adding to out", "same W block", "same W, out misaligned"];
        let mut ratios = vec![Vec::new(); cases.len()];
        println!("m={m} c={c} d={d}, per round (fraction of the round's tile-only peak): {}", cases.join(", "));
        for _ in 0..rounds {
            let peak = rate(|| amx::peak_loop(iters));
            // The kernel's step on L2 data: a gauge of the machine's state this round.
            ratios[0].push(rate(|| amx::load_loop(iters, &ring, LoadPattern::Kernel)) / peak);
            for (case, acc) in ratios.iter_mut().enumerate().skip(1) {
                // The engine's tiles are 64-byte aligned; one float off is not.
                let o = if case == 4 { at + 1 } else { at };
                // The engine writes over its tile when the layer has no bias.
                let output = if case == 1 { Output::Overwrite } else { Output::Add };
                let out = &mut buf[o..o + m * c];
                let got = rate(|| {
                    for call in 0..calls {
                        let b = if case <= 2 { call % blocks } else { 0 };
                        bf16::tile_product(BfPath::Amx, &rows, &w, b * c..(b + 1) * c, out, c, output);
                    }
                    (2 * m * c * d * calls) as u64
                });
                acc.push(got / peak);
            }
            let line: Vec<String> = ratios.iter().map(|r| format!("{:.2}", r.last().unwrap())).collect();
            println!("  {}", line.join("  "));
        }
        let meds: Vec<String> = cases.iter().zip(&mut ratios).map(|(c, r)| format!("{c} {:.2}", median(r))).collect();
        println!("  medians: {}", meds.join(", "));
    }
}
