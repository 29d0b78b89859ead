//! `rank-prob` and `fit-pl` on the command line, with their bad-input errors.

mod common;
use common::{fails, run, strs};
use softmax_layer::io::{read_npy, write_npy_f32, write_npy_i64};
use std::path::Path;

#[test]
fn rank_prob_writes_the_log_probability() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    write_npy_f32(Path::new(&p("s.npy")), &[3], &[0.0, 1.0, 2.0]).unwrap();
    write_npy_i64(Path::new(&p("r.npy")), &[2], &[2, 0]).unwrap();
    let (code, err) = run(&["rank-prob", "--scores", &p("s.npy"), "--ranking", &p("r.npy"), "-o", &p("o.json")]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(p("o.json")).unwrap();
    let x: f64 = text.trim().trim_start_matches("{\"logprob\": ").trim_end_matches('}').parse().unwrap();
    let z = 1f64.exp() + 2f64.exp() + 1.0;
    let want = (2.0 - z.ln()) + (0.0 - (1.0 + 1f64.exp()).ln());
    assert!((x - want).abs() < 1e-12, "{x} vs {want}");
    write_npy_i64(Path::new(&p("dup.npy")), &[2], &[1, 1]).unwrap();
    fails(
        &["rank-prob", "--scores", &p("s.npy"), "--ranking", &p("dup.npy"), "-o", &p("o2.json")],
        &["dup.npy", "repeats"],
    );
    write_npy_i64(Path::new(&p("unk.npy")), &[1], &[7]).unwrap();
    fails(
        &["rank-prob", "--scores", &p("s.npy"), "--ranking", &p("unk.npy"), "-o", &p("o2.json")],
        &["ranking[0] = 7 is not an item"],
    );
    write_npy_i64(Path::new(&p("neg.npy")), &[1], &[-1]).unwrap();
    fails(
        &["rank-prob", "--scores", &p("s.npy"), "--ranking", &p("neg.npy"), "-o", &p("o2.json")],
        &["ranking[0] = -1"],
    );
    // A bad score is named in its own file, by its 1-D index.
    write_npy_f32(Path::new(&p("snan.npy")), &[3], &[0.0, f32::NAN, 2.0]).unwrap();
    fails(
        &["rank-prob", "--scores", &p("snan.npy"), "--ranking", &p("r.npy"), "-o", &p("o2.json")],
        &["snan.npy: scores[1] is NaN"],
    );
}

#[test]
fn fit_pl_fits_and_reports_bad_files() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    // Item 0 beats 1 beats 2 most of the time.
    let mut text = String::new();
    for _ in 0..6 {
        text.push_str("0 1 2\n");
    }
    text.push_str("1 0 2\n2 1 0\n\n1 2\n");
    std::fs::write(p("r.txt"), &text).unwrap();
    let (code, err) = run(&["fit-pl", "--rankings", &p("r.txt"), "-o", &p("t.npy")]);
    assert_eq!(code, 0, "{err}");
    let t = read_npy(Path::new(&p("t.npy"))).unwrap();
    assert_eq!(t.shape, vec![3]);
    let t = t.to_f32().unwrap();
    assert!(t[0] > t[1] && t[1] > t[2], "{t:?}");
    assert!(t.iter().sum::<f32>().abs() < 1e-5, "centred: {t:?}");
    std::fs::write(p("bad.txt"), "0 1\n0 x 2\n").unwrap();
    fails(&["fit-pl", "--rankings", &p("bad.txt"), "-o", &p("t2.npy")], &["bad.txt:2", "'x' is not an item id"]);
    std::fs::write(p("dup.txt"), "0 1\n2 0 2\n").unwrap();
    fails(&["fit-pl", "--rankings", &p("dup.txt"), "-o", &p("t2.npy")], &["dup.txt:2", "item 2 appears twice"]);
    std::fs::write(p("empty.txt"), "\n\n").unwrap();
    fails(&["fit-pl", "--rankings", &p("empty.txt"), "-o", &p("t2.npy")], &["empty.txt", "no rankings"]);
    // Every item wins once, but {0, 1} and {2, 3} are never compared: no maximum likelihood.
    std::fs::write(p("groups.txt"), "0 1\n1 0\n0 1\n2 3\n3 2\n").unwrap();
    fails(&["fit-pl", "--rankings", &p("groups.txt"), "-o", &p("t2.npy")], &["not connected", "item 2", "--l2"]);
    std::fs::write(p("disc.txt"), "0 1\n2 3\n").unwrap();
    fails(&["fit-pl", "--rankings", &p("disc.txt"), "-o", &p("t2.npy")], &["never ranked above", "--l2"]);
    fails(
        &["fit-pl", "--rankings", &p("disc.txt"), "--l2", "-1", "-o", &p("t2.npy")],
        &["--l2 must be finite and >= 0"],
    );
    let (code, err) = run(&["fit-pl", "--rankings", &p("disc.txt"), "--l2", "0.1", "-o", &p("t3.npy")]);
    assert_eq!(code, 0, "{err}");
    // A stray huge id: a missing item is found without allocating for every id up to it,
    // and under a prior (which allows unseen items) memory for 1e11 items is refused.
    std::fs::write(p("huge.txt"), "0 99999999999\n1 0\n").unwrap();
    fails(&["fit-pl", "--rankings", &p("huge.txt"), "-o", &p("t2.npy")], &["item 2 appears in no ranking"]);
    fails(&["fit-pl", "--rankings", &p("huge.txt"), "--l2", "1", "-o", &p("t2.npy")], &["100000000000 items"]);
    std::fs::write(p("max.txt"), "0 18446744073709551615\n").unwrap();
    fails(
        &["fit-pl", "--rankings", &p("max.txt"), "--l2", "1", "-o", &p("t2.npy")],
        &["18446744073709551615 is too large"],
    );
    assert!(!Path::new(&p("t2.npy")).exists());
}

#[test]
fn score_command_writes_one_json_line_per_sequence() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    // V = d = 3, W = I; row t puts 8 on class pred[t].
    let pred = [1usize, 2, 0, 2];
    let h: Vec<f32> = pred.iter().flat_map(|&c| (0..3).map(move |j| if j == c { 8.0 } else { 0.0 })).collect();
    let w: Vec<f32> = (0..9).map(|i| if i % 4 == 0 { 1.0 } else { 0.0 }).collect();
    write_npy_f32(Path::new(&p("h.npy")), &[4, 3], &h).unwrap();
    write_npy_f32(Path::new(&p("w.npy")), &[3, 3], &w).unwrap();
    write_npy_i64(Path::new(&p("y.npy")), &[4], &[0, 1, 2, 1]).unwrap();
    write_npy_i64(Path::new(&p("l.npy")), &[2], &[3, 1]).unwrap();
    write_npy_i64(Path::new(&p("b.npy")), &[2], &[7, 0]).unwrap();
    // `score` over H, W and the targets `y`, with more options, into `out`.
    let score = |y: &str, extra: &[&str], out: &str| {
        let mut a: Vec<String> =
            ["score", "--hidden", &p("h.npy"), "--weight", &p("w.npy"), "--targets", &p(y)].map(String::from).into();
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(["-o".to_string(), p(out)]);
        a
    };
    let (code, err) = run(&strs(&score(
        "y.npy",
        &["--lengths", &p("l.npy"), "--shifted", "--top-logprobs", "1", "--bytes", &p("b.npy")],
        "s.jsonl",
    )));
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(p("s.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    // Sequence 0: rows 0→y1 = 1 (hit), 1→y2 = 2 (hit); sequence 1 has one row: nothing scored.
    assert!(lines[0].contains("\"num_scored\": 2") && lines[0].contains("\"is_greedy\": true"), "{}", lines[0]);
    assert!(lines[0].contains("\"target\": 1") && lines[0].contains("\"rank\": 1"), "{}", lines[0]);
    assert!(lines[0].contains("\"top_logprobs\": [{\"token\": 1, "), "{}", lines[0]);
    assert!(lines[1].contains("\"num_scored\": 0") && lines[1].contains("\"mean_logprob\": null"), "{}", lines[1]);
    assert!(lines[1].contains("\"perplexity\": null") && lines[1].contains("\"bits_per_byte\": null"), "{}", lines[1]);
    let want_bpb = -2.0 * (8.0 - (8f64.exp() + 2.0).ln()) / 7.0 / std::f64::consts::LN_2;
    let got: f64 = lines[0].split("\"bits_per_byte\": ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    assert!((got - want_bpb).abs() < 1e-6, "{got} vs {want_bpb}");
    // Bad input: lengths that do not sum to n, a mask of the wrong length, a negative count.
    write_npy_i64(Path::new(&p("l5.npy")), &[2], &[3, 2]).unwrap();
    fails(&strs(&score("y.npy", &["--lengths", &p("l5.npy")], "x.jsonl")), &["lengths sum to 5"]);
    write_npy_i64(Path::new(&p("m.npy")), &[3], &[1, 1, 1]).unwrap();
    fails(&strs(&score("y.npy", &["--mask", &p("m.npy")], "x.jsonl")), &["mask has length 3"]);
    write_npy_i64(Path::new(&p("neg.npy")), &[2], &[-1, 5]).unwrap();
    fails(
        &strs(&score("y.npy", &["--lengths", &p("neg.npy")], "x.jsonl")),
        &["neg.npy", "lengths[0] = -1 is negative"],
    );
    write_npy_i64(Path::new(&p("ybad.npy")), &[4], &[0, 1, 7, 1]).unwrap();
    fails(&strs(&score("ybad.npy", &[], "x.jsonl")), &["ybad.npy", "targets[2] = 7 is out of range [0, 3)"]);
    // A mask is 0/1; alternatives are at most V.
    write_npy_i64(Path::new(&p("m2.npy")), &[4], &[1, 2, 0, 1]).unwrap();
    fails(&strs(&score("y.npy", &["--mask", &p("m2.npy")], "x.jsonl")), &["m2.npy", "mask[1] = 2 is not 0 or 1"]);
    fails(&strs(&score("y.npy", &["--top-logprobs", "4"], "x.jsonl")), &["--top-logprobs 4", "V = 3"]);
    assert!(!Path::new(&p("x.jsonl")).exists());
}

#[test]
fn sample_command_is_seeded_and_validates() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    // V = d = 3, W = I; row 0 strongly prefers class 2, row 1 is flat.
    write_npy_f32(Path::new(&p("h.npy")), &[2, 3], &[0.0, 0.0, 9.0, 0.0, 0.0, 0.0]).unwrap();
    let w: Vec<f32> = (0..9).map(|i| if i % 4 == 0 { 1.0 } else { 0.0 }).collect();
    write_npy_f32(Path::new(&p("w.npy")), &[3, 3], &w).unwrap();
    let args = |out: &str, extra: &[&str]| {
        let mut a = vec!["sample".to_string(), "--hidden".into(), p("h.npy"), "--weight".into(), p("w.npy")];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(["-o".to_string(), p(out)]);
        a
    };
    let go = |a: Vec<String>| run(&strs(&a));
    assert_eq!(go(args("a.jsonl", &["--seed", "7", "--num-samples", "5"])).0, 0);
    assert_eq!(go(args("b.jsonl", &["--seed", "7", "--num-samples", "5"])).0, 0);
    let a = std::fs::read_to_string(p("a.jsonl")).unwrap();
    assert_eq!(a, std::fs::read_to_string(p("b.jsonl")).unwrap(), "same seed, same samples");
    assert!(a.lines().next().unwrap().starts_with("{\"row\": 0, \"samples\": [{\"token\": 2, "), "{a}");
    assert_eq!(a.lines().count(), 2);
    // Greedy with a flat row: the lowest id.
    assert_eq!(go(args("g.jsonl", &["--temperature", "0"])).0, 0);
    let g = std::fs::read_to_string(p("g.jsonl")).unwrap();
    assert!(g.lines().nth(1).unwrap().contains("\"token\": 0, \"logprob\": 0"), "{g}");
    fails(&strs(&args("x.jsonl", &["--top-p", "0"])), &["top_p must be in (0, 1], got 0"]);
    fails(&strs(&args("x.jsonl", &["--top-k", "0"])), &["top_k must be >= 1"]);
    fails(&strs(&args("x.jsonl", &["--num-samples", "0"])), &["--num-samples must be in [1, 1000000], got 0"]);
    fails(&strs(&args("x.jsonl", &["--temperature", "-1"])), &["temperature must be finite and >= 0"]);
    assert!(!Path::new(&p("x.jsonl")).exists());
}
