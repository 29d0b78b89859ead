//! One sampling step over V = 128256 with top-p, one thread: `bench_sample [SIGMA]` prints
//! the median time beyond the logits. Logits are Gaussian with standard deviation SIGMA
//! (default 3, about what language models produce), from a fixed seed.
#[path = "../benches/support/data.rs"]
mod data;

use softmax_layer::sample::{Sampler, SamplerConfig};

fn main() {
    let sigma: f32 = std::env::args().nth(1).map_or(3.0, |s| s.parse().unwrap());
    let v = 128_256;
    // Box–Muller over uniform pairs.
    let u = data::fill(2 * v, 9, 1e-7, 1.0);
    let z: Vec<f32> =
        (0..v).map(|i| sigma * (-2.0 * u[2 * i].ln()).sqrt() * (std::f32::consts::TAU * u[2 * i + 1]).cos()).collect();
    for (name, cfg) in [
        ("top_p=0.9", SamplerConfig { top_p: Some(0.9), ..Default::default() }),
        ("top_k=50 top_p=0.9", SamplerConfig { top_k: Some(50), top_p: Some(0.9), ..Default::default() }),
        ("min_p=0.05", SamplerConfig { min_p: Some(0.05), ..Default::default() }),
        ("plain", SamplerConfig::default()),
    ] {
        let mut seed = 0;
        // A decoding loop keeps one sampler (its buffers) across steps.
        let mut sampler = Sampler::default();
        let t = data::median_secs(41, || {
            seed += 1;
            let c = SamplerConfig { seed, ..cfg.clone() };
            std::hint::black_box(sampler.sample(&z, &[], &c, 1).unwrap());
        });
        println!("{{\"config\": \"{name}\", \"sigma\": {sigma}, \"v\": {v}, \"median_ms\": {:.3}}}", t * 1e3);
    }
}
