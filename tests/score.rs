//! Sequence scoring: alignment (tests that fail under an off-by-one), masks, lengths,
//! per-sequence statistics and candidate ranking.

use softmax_layer::score::{Alignment, ScoreOptions, rank_candidates, score_sequences};
use softmax_layer::{MatRef, SoftmaxLayer, WeightLayout};

/// V = d = 5, W = I: row t's logits are its hidden state, 8 on class `pred[t]`, 0 elsewhere.
fn setup(pred: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let w: Vec<f32> = (0..25).map(|i| if i % 6 == 0 { 1.0 } else { 0.0 }).collect();
    let h: Vec<f32> = pred.iter().flat_map(|&c| (0..5).map(move |j| if j == c { 8.0 } else { 0.0 })).collect();
    (w, h)
}

fn lp_of(hit: bool) -> f64 {
    // log softmax of [8, 0, 0, 0, 0] at the 8, or at a 0.
    let z = 8f64.exp() + 4.0;
    if hit { 8.0 - z.ln() } else { -z.ln() }
}

#[test]
fn shifted_scores_row_t_against_the_next_token() {
    // The model predicts the next token exactly: pred[t] = y[t + 1].
    let y = [4i64, 2, 0, 3, 1];
    let pred = [2usize, 0, 3, 1, 4];
    let (w, h) = setup(&pred);
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 5, 5, None::<&[f32]>).unwrap();
    let hv = MatRef::new(&h, 5, 5).unwrap();
    let shifted =
        score_sequences(&layer, hv, &y, &ScoreOptions { alignment: Alignment::Shifted, ..Default::default() }).unwrap();
    let s = &shifted[0];
    assert_eq!(s.num_scored, 4, "the last row scores nothing");
    assert!(s.is_greedy);
    assert_eq!(
        s.tokens.iter().map(|t| (t.position, t.target, t.rank)).collect::<Vec<_>>(),
        vec![(1, 2, 1), (2, 0, 1), (3, 3, 1), (4, 1, 1)]
    );
    assert!((s.sum_logprob - 4.0 * lp_of(true)).abs() < 1e-5);
    // Aligned, the same data is scored against the current token: every one a miss.
    let aligned = score_sequences(&layer, hv, &y, &ScoreOptions::default()).unwrap();
    assert_eq!(aligned[0].num_scored, 5);
    assert!(!aligned[0].is_greedy);
    assert!((aligned[0].sum_logprob - 5.0 * lp_of(false)).abs() < 1e-4);
    // Each target ties with the other zeros: it ranks after the prediction and after the
    // tied classes with lower ids (row 0: target 4 after 2, then 0, 1 and 3).
    assert_eq!(aligned[0].tokens.iter().map(|t| t.rank).collect::<Vec<_>>(), vec![5, 3, 2, 4, 3]);
}

#[test]
fn sequences_masks_and_statistics() {
    // Two sequences [3, 2]; the first token of each is a prompt (mask 0).
    let y = [1i64, 1, 2, 3, 3];
    let pred = [1usize, 2, 0, 3, 0];
    let (w, h) = setup(&pred);
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 5, 5, None::<&[f32]>).unwrap();
    let hv = MatRef::new(&h, 5, 5).unwrap();
    let mask = [false, true, true, false, true];
    let opts = ScoreOptions {
        lengths: Some(&[3, 2]),
        mask: Some(&mask),
        alignment: Alignment::Shifted,
        bytes: Some(&[10, 4]),
        chars: Some(&[5, 2]),
        top_logprobs: 1,
        ..Default::default()
    };
    let out = score_sequences(&layer, hv, &y, &opts).unwrap();
    // Sequence 0: rows 0→y1 (hit), 1→y2 (hit); row 2 is last. Sequence 1: row 3→y4 (hit).
    assert_eq!(out[0].num_scored, 2);
    assert_eq!(out[1].num_scored, 1);
    assert!(out[0].is_greedy && out[1].is_greedy);
    let sum0 = 2.0 * lp_of(true);
    assert!((out[0].sum_logprob - sum0).abs() < 1e-5);
    assert!((out[0].mean_logprob.unwrap() - sum0 / 2.0).abs() < 1e-5);
    assert!((out[0].perplexity.unwrap() - (-sum0 / 2.0).exp()).abs() < 1e-5);
    assert!((out[0].bits_per_byte.unwrap() - (-sum0 / 10.0 / std::f64::consts::LN_2)).abs() < 1e-6);
    assert!((out[0].logprob_per_char.unwrap() - sum0 / 5.0).abs() < 1e-6);
    // Nothing scored: no mean, no perplexity (never NaN).
    let none =
        score_sequences(&layer, hv, &y, &ScoreOptions { mask: Some(&[false; 5]), ..Default::default() }).unwrap();
    assert_eq!(none[0].num_scored, 0);
    assert_eq!((none[0].mean_logprob, none[0].perplexity), (None, None));
    // top_logprobs adds the target when it is not among the top K.
    let miss = score_sequences(&layer, hv, &y, &ScoreOptions { top_logprobs: 1, ..Default::default() }).unwrap();
    let t0 = &miss[0].tokens[0]; // row 0 predicts 1 and the target is y0 = 1: a hit
    assert_eq!(t0.top_logprobs.len(), 1);
    let t2 = &miss[0].tokens[2]; // row 2 predicts 0, the target is y2 = 2: a miss
    assert_eq!(t2.top_logprobs.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 2]);
}

#[test]
fn bad_inputs_are_errors() {
    let (w, h) = setup(&[0, 1, 2]);
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 5, 5, None::<&[f32]>).unwrap();
    let hv = MatRef::new(&h, 3, 5).unwrap();
    let e = |y: &[i64], o: ScoreOptions| score_sequences(&layer, hv, y, &o).unwrap_err().to_string();
    assert!(e(&[0, 1, 2], ScoreOptions { lengths: Some(&[2, 2]), ..Default::default() }).contains("lengths sum to 4"));
    assert!(e(&[0, 1, 2], ScoreOptions { mask: Some(&[true]), ..Default::default() }).contains("mask has length 1"));
    assert!(e(&[0, 9, 2], ScoreOptions::default()).contains("targets[1] = 9 is out of range"));
    assert!(e(&[0, 1, 2], ScoreOptions { bytes: Some(&[1, 2]), ..Default::default() }).contains("bytes has length 2"));
}

#[test]
fn candidates_rank_by_sum_mean_and_per_char() {
    let (w, h) = setup(&[0, 1, 2, 3, 4, 0]);
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 5, 5, None::<&[f32]>).unwrap();
    let hv = MatRef::new(&h, 6, 5).unwrap();
    // Three candidates: [hit], [hit, hit, miss], [miss, miss].
    let y = [0i64, 1, 2, 0, 1, 1];
    let opts = ScoreOptions { lengths: Some(&[1, 3, 2]), chars: Some(&[1, 30, 2]), ..Default::default() };
    let scores = score_sequences(&layer, hv, &y, &opts).unwrap();
    let r = rank_candidates(&scores);
    assert_eq!(r.by_sum, vec![0, 1, 2]);
    assert_eq!(r.by_mean, vec![0, 1, 2]);
    assert_eq!(r.by_char.unwrap(), vec![0, 1, 2]);
    assert!((r.softmax_of_sums.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    assert!(r.softmax_of_sums[0] > r.softmax_of_sums[1]);
}

#[test]
fn impossible_candidates_tie_in_the_softmax_of_sums() {
    let score = |sum: f64| softmax_layer::score::SequenceScore {
        tokens: vec![],
        sum_logprob: sum,
        num_scored: 1,
        mean_logprob: Some(sum),
        perplexity: None,
        is_greedy: false,
        bits_per_byte: None,
        logprob_per_char: None,
    };
    let all_impossible = [score(f64::NEG_INFINITY), score(f64::NEG_INFINITY)];
    assert_eq!(rank_candidates(&all_impossible).softmax_of_sums, vec![0.5, 0.5]);
    let one_possible = [score(f64::NEG_INFINITY), score(-3.0)];
    assert_eq!(rank_candidates(&one_possible).softmax_of_sums, vec![0.0, 1.0]);
}

/// Lengths that wrap around to n in a plain sum are refused (they passed, then allocated
/// without bound), as is a hidden of another width.
#[test]
fn lengths_and_widths_are_checked() {
    let (w, h) = setup(&[0, 1, 2]);
    let layer = SoftmaxLayer::new(&w[..], WeightLayout::VocabMajor, 5, 5, None::<&[f32]>).unwrap();
    let hv = MatRef::new(&h, 3, 5).unwrap();
    let opts = ScoreOptions { lengths: Some(&[usize::MAX, 4]), ..Default::default() };
    let e = score_sequences(&layer, hv, &[0, 1, 2], &opts).unwrap_err().to_string();
    assert!(e.contains("lengths sum to"), "{e}");
    let wide = vec![0.5f32; 3 * 7];
    let e = score_sequences(&layer, MatRef::new(&wide, 3, 7).unwrap(), &[0, 1, 2], &ScoreOptions::default());
    assert!(e.is_err());
}
