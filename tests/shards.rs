//! A vocabulary split across workers (as a vocabulary-parallel run over MPI would split
//! it): each worker holds a layer over its own rows of `W` (`[V, d]`) and of the bias, and
//! exchanges only `O(n)` or `O(n·k)` numbers per row block. What each shard's fused
//! operations return must merge back into the whole layer's results.

mod common;
use common::Rng;
use softmax_layer::{LayerOptions, MatRef, SoftmaxLayer, WeightLayout};

/// `ln Σ exp(lse_i)` over the shards, in f64.
fn merge_lse(parts: &[f32]) -> f64 {
    let m = parts.iter().map(|&x| x as f64).fold(f64::NEG_INFINITY, f64::max);
    m + parts.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

#[test]
fn vocabulary_shards_merge_to_the_whole_layer() {
    let mut rng = Rng(41);
    let (n, d, v) = (37, 24, 1000);
    // Uneven shards, one of them narrower than a tile.
    let bounds = [0usize, 300, 317, 800, 1000];
    let h = rng.vec(n * d, -1.0, 1.0);
    let w = rng.vec(v * d, -0.5, 0.5);
    let b = rng.vec(v, -2.0, 2.0);
    let targets: Vec<i64> = (0..n).map(|_| rng.below(v) as i64).collect();
    let hv = MatRef::new(&h, n, d).unwrap();
    let opts = LayerOptions::default();
    let whole = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, v, d, Some(&b[..])).unwrap();
    let shards: Vec<SoftmaxLayer> = bounds
        .windows(2)
        .map(|s| {
            let (v0, v1) = (s[0], s[1]);
            SoftmaxLayer::new(&w[v0 * d..v1 * d], WeightLayout::VocabMajor, v1 - v0, d, Some(&b[v0..v1])).unwrap()
        })
        .collect();

    // 1. logsumexp: each worker's [n], merged by log-add-exp.
    let mut lse_whole = vec![0f32; n];
    whole.logsumexp(hv, &mut lse_whole, &opts).unwrap();
    let lse_parts: Vec<Vec<f32>> = shards
        .iter()
        .map(|s| {
            let mut out = vec![0f32; n];
            s.logsumexp(hv, &mut out, &opts).unwrap();
            out
        })
        .collect();
    let lse: Vec<f64> = (0..n).map(|i| merge_lse(&lse_parts.iter().map(|p| p[i]).collect::<Vec<_>>())).collect();
    for i in 0..n {
        let tol = 2e-6 * lse[i].abs().max(1.0);
        assert!((lse[i] - lse_whole[i] as f64).abs() <= tol, "row {i}: merged {} vs whole {}", lse[i], lse_whole[i]);
    }

    // 2. Target log-probabilities: the shard holding the target gives log p within the
    // shard; adding its lse and subtracting the merged one gives log p over V.
    let mut lp_whole = vec![0f32; n];
    whole.target_log_probs(hv, &targets, &mut lp_whole, &opts).unwrap();
    for i in 0..n {
        let t = targets[i] as usize;
        let s = bounds.windows(2).position(|s| (s[0]..s[1]).contains(&t)).unwrap();
        let local = [(t - bounds[s]) as i64];
        let mut lp = [0f32];
        shards[s].target_log_probs(hv.sub_rows(i..i + 1), &local, &mut lp, &opts).unwrap();
        let merged = lp[0] as f64 + lse_parts[s][i] as f64 - lse[i];
        assert!((merged - lp_whole[i] as f64).abs() <= 4e-6, "row {i}: merged {merged} vs whole {}", lp_whole[i]);
    }

    // 3. Top-k: each worker's k best, shifted by its lse and its first class id, merged.
    let k = 7;
    let top_whole = whole.top_k(hv, k, &opts).unwrap();
    let tops: Vec<_> = shards.iter().map(|s| s.top_k(hv, k.min(s.vocab()), &opts).unwrap()).collect();
    for i in 0..n {
        let mut cand: Vec<(f64, usize)> = Vec::new();
        for (s, t) in tops.iter().enumerate() {
            for j in 0..t.k {
                let lp = t.log_probs[i * t.k + j] as f64 + lse_parts[s][i] as f64 - lse[i];
                cand.push((lp, bounds[s] + t.indices[i * t.k + j]));
            }
        }
        cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (j, &(lp, id)) in cand.iter().take(k).enumerate() {
            assert_eq!(id, top_whole.indices[i * k + j], "row {i}, rank {j}");
            assert!((lp - top_whole.log_probs[i * k + j] as f64).abs() <= 4e-6, "row {i}, rank {j}: {lp}");
        }
    }
}
