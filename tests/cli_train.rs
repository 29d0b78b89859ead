//! `train` and `predict` on the command line: CSV and tensor inputs, bad-input errors, and a
//! run killed with SIGKILL that resumes to the same bits.

mod common;
use common::{Rng, bin, fails, ok, strs};
use softmax_layer::io::{read_npy, read_safetensors, write_npy_f32, write_npy_i64};
use std::fmt::Write;
use std::path::Path;

/// Three separable blobs in 3 dimensions, the label in the middle column.
fn write_csv(path: &Path, n: usize) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng(21);
    let (mut x, mut y) = (vec![], vec![]);
    let mut text = String::from("a,label,b,c\n");
    for i in 0..n {
        let c = i % 3;
        let f = [c as f32 * 2.0 + rng.uniform(-0.8, 0.8), rng.uniform(-1.0, 1.0), -(c as f32) + rng.uniform(-0.8, 0.8)];
        writeln!(text, "{},{c},{},{}", f[0], f[1], f[2]).unwrap();
        x.extend_from_slice(&f);
        y.push(c as i64);
    }
    std::fs::write(path, text).unwrap();
    (x, y)
}

#[test]
fn train_and_predict_from_csv_and_tensors() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let (x, y) = write_csv(Path::new(&p("d.csv")), 300);
    ok(&["train", "--data", &p("d.csv"), "--label-column", "label", "--l2", "0.01", "-o", &p("m.safetensors")]);
    let w = read_safetensors(Path::new(&p("m.safetensors")), "weight").unwrap();
    assert_eq!(w.shape, vec![3, 3]);
    assert_eq!(read_safetensors(Path::new(&p("m.safetensors")), "bias").unwrap().shape, vec![3]);
    let svg = std::fs::read_to_string(p("m.loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"), "a loss-curve plot");
    // predict from the CSV (the label column left out) and from .npy features: same bits.
    ok(&[
        "predict",
        "--model",
        &p("m.safetensors"),
        "--data",
        &p("d.csv"),
        "--label-column",
        "label",
        "-o",
        &p("a.npy"),
    ]);
    write_npy_f32(Path::new(&p("x.npy")), &[300, 3], &x).unwrap();
    ok(&["predict", "--model", &p("m.safetensors"), "--features", &p("x.npy"), "-o", &p("b.npy")]);
    let a = read_npy(Path::new(&p("a.npy"))).unwrap();
    let b = read_npy(Path::new(&p("b.npy"))).unwrap();
    assert_eq!(a.shape, vec![300, 3]);
    let (a, b) = (a.to_f32().unwrap().into_owned(), b.to_f32().unwrap().into_owned());
    assert_eq!(a, b);
    let mut right = 0;
    for (i, row) in a.chunks(3).enumerate() {
        assert!((row.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-5);
        let best = (0..3).max_by(|&i, &j| row[i].total_cmp(&row[j])).unwrap();
        right += (best as i64 == y[i]) as usize;
    }
    assert!(right >= 290, "training accuracy {right}/300");
    // predict in bf16 (H and W rounded to 8 bits): close to the f32 probabilities; bf16x3
    // closer still.
    for (precision, tol) in [("bf16", 2e-2), ("bf16x3", 1e-4)] {
        let out = p(&format!("{precision}.npy"));
        ok(&[
            "predict",
            "--model",
            &p("m.safetensors"),
            "--features",
            &p("x.npy"),
            "--precision",
            precision,
            "-o",
            &out,
        ]);
        let c = read_npy(Path::new(&out)).unwrap().to_f32().unwrap().into_owned();
        let err = c.iter().zip(&a).map(|(u, v)| (u - v).abs()).fold(0f32, f32::max);
        assert!(err <= tol && (precision == "bf16x3" || err > 0.0), "{precision}: max |Δp| {err}");
    }
    // Tensor inputs with AdamW and a held-out split, JSON summary.
    write_npy_i64(Path::new(&p("y.npy")), &[300], &y).unwrap();
    let out = bin()
        .args(["train", "--features", &p("x.npy"), "--labels", &p("y.npy"), "--optimizer", "adamw", "--epochs", "5"])
        .args(["--holdout", "0.2", "--json", "--lr", "0.05", "--batch", "16", "-o", &p("m2.safetensors")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.contains("\"heldout\": {\"loss\"") && line.contains("\"steps\": 75"), "{line}");
}

/// A model trained on CSV columns keeps their names, and `predict` matches a CSV's columns
/// by name: reordered, the same probabilities; a missing or unknown column, an error.
#[test]
fn predict_matches_csv_columns_by_name() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    write_csv(Path::new(&p("d.csv")), 60);
    ok(&["train", "--data", &p("d.csv"), "--label-column", "label", "-o", &p("m.safetensors")]);
    let meta = softmax_layer::io::read_safetensors_metadata(Path::new(&p("m.safetensors"))).unwrap();
    assert_eq!(meta.get("feature_names").map(String::as_str), Some("a,b,c"));
    // The same rows with the columns in another order (and the label first).
    let text = std::fs::read_to_string(p("d.csv")).unwrap();
    let mut moved = String::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        writeln!(moved, "{},{},{},{}", f[1], f[3], f[0], f[2]).unwrap();
    }
    std::fs::write(p("moved.csv"), moved).unwrap();
    let predict = |csv: &str, out: &str| {
        ok(&["predict", "--model", &p("m.safetensors"), "--data", &p(csv), "--label-column", "label", "-o", &p(out)]);
        read_npy(Path::new(&p(out))).unwrap().to_f32().unwrap().into_owned()
    };
    let (a, b) = (predict("d.csv", "a.npy"), predict("moved.csv", "b.npy"));
    assert_eq!(a, b);
    std::fs::write(p("renamed.csv"), text.replacen("a,label,b,c", "a,label,b,z", 1)).unwrap();
    fails(
        &[
            "predict",
            "--model",
            &p("m.safetensors"),
            "--data",
            &p("renamed.csv"),
            "--label-column",
            "label",
            "-o",
            &p("c.npy"),
        ],
        &["renamed.csv", "no column 'c'", "m.safetensors"],
    );
    fails(
        &["predict", "--model", &p("m.safetensors"), "--data", &p("d.csv"), "-o", &p("c.npy")],
        &["d.csv", "column 'label' is not a feature"],
    );
    assert!(!Path::new(&p("c.npy")).exists());
}

#[test]
fn bad_training_input_exits_2_with_one_line() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let o = p("m.safetensors");
    write_csv(Path::new(&p("d.csv")), 30);
    fails(
        &["train", "--data", &p("d.csv"), "--label-column", "y", "-o", &o],
        &["d.csv", "no column named 'y'", "label"],
    );
    std::fs::write(p("ragged.csv"), "a,b,label\n1,2,0\n3,4\n").unwrap();
    fails(
        &["train", "--data", &p("ragged.csv"), "--label-column", "label", "-o", &o],
        &["ragged.csv", "line 3", "2 fields"],
    );
    std::fs::write(p("text.csv"), "a,b,label\n1,2,0\n3,x4,1\n").unwrap();
    fails(
        &["train", "--data", &p("text.csv"), "--label-column", "label", "-o", &o],
        &["text.csv", "line 3", "column 'b'", "'x4' is not a finite number"],
    );
    std::fs::write(p("neg.csv"), "a,label\n1,0\n2,-1\n").unwrap();
    fails(&["train", "--data", &p("neg.csv"), "--label-column", "label", "-o", &o], &["neg.csv", "line 3", "'-1'"]);
    std::fs::write(p("cat.csv"), "a,label\n1,0\n2,cat\n").unwrap();
    fails(
        &["train", "--data", &p("cat.csv"), "--label-column", "label", "-o", &o],
        &["line 3, label column 'label'", "'cat' is not a non-negative integer class id"],
    );
    std::fs::write(p("frac.csv"), "a,label\n1,0\n2,1.5\n").unwrap();
    fails(&["train", "--data", &p("frac.csv"), "--label-column", "label", "-o", &o], &["line 3", "'1.5'", "integer"]);
    write_npy_f32(Path::new(&p("x.npy")), &[4, 2], &[0.0; 8]).unwrap();
    write_npy_i64(Path::new(&p("y3.npy")), &[3], &[0, 1, 0]).unwrap();
    fails(
        &["train", "--features", &p("x.npy"), "--labels", &p("y3.npy"), "-o", &o],
        &["y3.npy", "labels have length 3", "n = 4"],
    );
    write_npy_i64(Path::new(&p("yn.npy")), &[4], &[0, 1, -2, 0]).unwrap();
    fails(
        &["train", "--features", &p("x.npy"), "--labels", &p("yn.npy"), "-o", &o],
        &["yn.npy", "[2] = -2", "negative"],
    );
    write_npy_f32(Path::new(&p("yf.npy")), &[4], &[0.0, 1.0, 0.5, 0.0]).unwrap();
    fails(&["train", "--features", &p("x.npy"), "--labels", &p("yf.npy"), "-o", &o], &["yf.npy", "0.5", "integer"]);
    fails(&["train", "--features", &p("x.npy"), "--labels", &p("y3.npy"), "--optimizer", "adam", "-o", &o], &["adam"]);
    fails(
        &["train", "--features", &p("x.npy"), "--labels", &p("y3.npy"), "--precision", "fp8", "-o", &o],
        &["--precision", "'fp8'"],
    );
    let mut bad = vec![0f32; 8];
    bad[5] = f32::NAN;
    write_npy_f32(Path::new(&p("xnan.npy")), &[4, 2], &bad).unwrap();
    write_npy_i64(Path::new(&p("y4.npy")), &[4], &[0, 1, 0, 1]).unwrap();
    fails(
        &["train", "--features", &p("xnan.npy"), "--labels", &p("y4.npy"), "-o", &o],
        &["xnan.npy", "features[2, 1]", "NaN"],
    );
    fails(
        &["train", "--features", &p("x.npy"), "--labels", &p("y4.npy"), "-o", &p("no/such/dir/m.safetensors")],
        &["no/such/dir", "does not exist"],
    );
    // Outputs checked before training: the plot's folder, the plot or the model over an
    // input or each other, a checkpoint "folder" that is a file.
    let (x, y4) = (p("x.npy"), p("y4.npy"));
    let with = |extra: &[&str]| -> Vec<String> {
        ["train", "--features", &x, "--labels", &y4].iter().chain(extra).map(|s| s.to_string()).collect()
    };
    fails(&strs(&with(&["-o", &o, "--plot", &p("nodir/p.svg")])), &["nodir", "does not exist"]);
    fails(&strs(&with(&["-o", &o, "--plot", &o])), &["--plot", "the model's own path"]);
    fails(&strs(&with(&["-o", &p("x.npy")])), &["would overwrite the input", "x.npy"]);
    fails(&strs(&with(&["-o", &o, "--checkpoint", &p("d.csv")])), &["--checkpoint", "not a folder"]);
    // Options of the other input form, and a label that would make 1e11 classes.
    fails(&strs(&with(&["--label-column", "label", "-o", &o])), &["--label-column goes with --data"]);
    fails(
        &["train", "--data", &p("d.csv"), "--label-column", "label", "--labels", &p("y4.npy"), "-o", &o],
        &["--labels goes with --features"],
    );
    write_npy_i64(Path::new(&p("yhuge.npy")), &[4], &[0, 99_999_999_999, 1, 0]).unwrap();
    fails(
        &["train", "--features", &p("x.npy"), "--labels", &p("yhuge.npy"), "-o", &o],
        &["labels[1] = 99999999999", "--classes"],
    );
    std::fs::write(p("lonly.csv"), "label\n0\n1\n").unwrap();
    fails(
        &["train", "--data", &p("lonly.csv"), "--label-column", "label", "-o", &o],
        &["lonly.csv", "no feature columns"],
    );
    std::fs::write(p("big.csv"), "a,label\n1,0\n1e39,1\n").unwrap();
    fails(
        &["train", "--data", &p("big.csv"), "--label-column", "label", "-o", &o],
        &["big.csv", "line 3, column 'a'", "'1e39' is beyond the f32 range"],
    );
    write_npy_f32(Path::new(&p("xr.npy")), &[4, 2], &[1.0, 2.0, -3.0, 4.0, 5.0, -6.0, 7.0, 8.0]).unwrap();
    // (After some epochs' progress lines: the error is the last line.)
    let (code, err) = common::run(
        &["train", "--features", &p("xr.npy"), "--labels", &p("y4.npy"), "--optimizer", "adamw"]
            .into_iter()
            .chain(["--weight-decay", "1e30", "-o", &o])
            .collect::<Vec<_>>(),
    );
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(code == 2 && last.contains("diverged") && last.contains("learning rate"), "{code}: {err}");
    // Finite but far worse than where it started (identical rows, two labels, a huge step):
    // a warning, the model still written.
    write_npy_f32(Path::new(&p("xsame.npy")), &[4, 2], &[1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0]).unwrap();
    let (code, err) = common::run(
        &["train", "--features", &p("xsame.npy"), "--labels", &p("y4.npy"), "--optimizer", "sgd", "--lr", "1000"]
            .into_iter()
            .chain(["--epochs", "20", "--batch", "1", "-o", &p("diverged.safetensors")])
            .collect::<Vec<_>>(),
    );
    assert!(code == 0 && err.contains("warning: the objective grew from") && err.contains("diverged"), "{code}: {err}");
    fails(&strs(&with(&["--tol", "0", "-o", &o])), &["tolerance must be > 0, got 0"]);
    // A negative number reaches the range check (not clap's "unexpected argument '-1'").
    fails(&strs(&with(&["--l2", "-1", "-o", &o])), &["l2 must be finite and >= 0, got -1"]);
    fails(&strs(&with(&["--l2", "-1e-3", "-o", &o])), &["l2 must be finite and >= 0, got -0.001"]);
    fails(&strs(&with(&["--epochs", "-3", "-o", &o])), &["invalid value '-3' for '--epochs"]);
    fails(&strs(&with(&["--min-lr-ratio", "1.5", "-o", &o])), &["--min-lr-ratio must be in [0, 1], got 1.5"]);
    // The ratio reaches the schedule: a constant rate after warmup (1) trains another model
    // than a decay to 0.
    let model = |ratio: &str, out: &str| {
        let args = with(&["--optimizer", "sgd", "--epochs", "3", "--batch", "2", "--min-lr-ratio", ratio, "-o", out]);
        let (code, err) = common::run(&strs(&args));
        assert_eq!(code, 0, "{err}");
        std::fs::read(out).unwrap()
    };
    assert_ne!(model("0", &p("m0.safetensors")), model("1", &p("m1.safetensors")));
    fails(&strs(&with(&["--lr", "0.1", "-o", &o])), &["--lr applies to adamw and sgd"]);
    fails(&strs(&with(&["--optimizer", "sgd", "--lr", "-1", "-o", &o])), &["learning rate", "got -1"]);
    fails(&strs(&with(&["--checkpoint", &p("ck"), "--checkpoint-every", "0", "-o", &o])), &["--checkpoint-every"]);
    fails(
        &strs(&with(&["--classes", "9007199254740994", "-o", &o])),
        &["9007199254740994 classes", "more than can be allocated"],
    );
    std::fs::write(p("twice.csv"), "a,b,a,label\n1,2,3,0\n").unwrap();
    fails(&["train", "--data", &p("twice.csv"), "--label-column", "label", "-o", &o], &["twice.csv", "'a' twice"]);
    assert!(!Path::new(&o).exists(), "nothing written on failure");
}

#[test]
fn a_run_killed_with_sigkill_resumes_to_the_same_bits() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let (n, dim, k) = (20000, 24, 6);
    let mut rng = Rng(5);
    let x = rng.vec(n * dim, -1.0, 1.0);
    let y: Vec<i64> = (0..n).map(|i| ((x[i * dim] + x[i * dim + 1] + 2.0) * 1.4) as i64 % k as i64).collect();
    write_npy_f32(Path::new(&p("x.npy")), &[n, dim], &x).unwrap();
    write_npy_i64(Path::new(&p("y.npy")), &[n], &y).unwrap();
    let args = |out: &str, ck: &str| -> Vec<String> {
        let mut v: Vec<String> = ["train", "--features", &p("x.npy"), "--labels", &p("y.npy"), "--optimizer", "adamw"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // 300 epochs: the whole run took 45 ms at 30 on a Zen 5 core, too short to be
        // killed 37 ms after its second checkpoint.
        v.extend(["--epochs", "300", "--batch", "32", "--seed", "3", "-o", out, "--checkpoint", ck].map(String::from));
        v
    };
    ok(&args(&p("whole.safetensors"), &p("ck-whole")).iter().map(String::as_str).collect::<Vec<_>>());
    let ck = p("ck");
    let mut child = bin().args(args(&p("m.safetensors"), &ck)).spawn().unwrap();
    // Kill it once a few checkpoints exist (or let it finish if the machine is that fast).
    let started = std::time::Instant::now();
    while started.elapsed().as_secs() < 60 {
        let n = std::fs::read_dir(&ck).map(|r| r.count()).unwrap_or(0);
        if n >= 2 || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    std::thread::sleep(std::time::Duration::from_millis(37));
    let _ = child.kill(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run finished before it could be killed; the test needs a longer run");
    // Whatever moment it died at, every checkpoint left loads.
    for e in std::fs::read_dir(&ck).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("checkpoint-") {
            read_safetensors(&path, "weight").unwrap();
            read_safetensors(&path, "opt.m").unwrap();
        }
    }
    let mut resume = args(&p("m.safetensors"), &ck);
    resume.push("--resume".into());
    ok(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    let a = std::fs::read(p("whole.safetensors")).unwrap();
    let b = std::fs::read(p("m.safetensors")).unwrap();
    assert!(a == b, "the resumed model differs from the uninterrupted run's");
}

#[test]
fn demo_runs_end_to_end_on_built_in_data() {
    let d = tempfile::tempdir().unwrap();
    let plot = d.path().join("loss.svg");
    let out = bin()
        .args(["demo", "--train-chars", "30000", "--epochs", "3", "--plot", plot.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let num = |key: &str| -> f64 {
        let at = text.find(key).unwrap_or_else(|| panic!("no '{key}' in:\n{text}")) + key.len();
        text[at..].split_whitespace().next().unwrap().parse().unwrap()
    };
    let (model, rate) = (num("model:  cross-entropy"), num("source: entropy rate"));
    // The model cannot beat the source on average, and a few epochs get it within 0.5 bit.
    assert!(model > rate - 0.05 && model < rate + 0.5, "model {model} vs entropy rate {rate} bits/char");
    assert!(text.contains("T = 0.5") && text.contains("T = 1.5"), "{text}");
    assert!(text.contains("by mean: the true"), "{text}");
    assert!(std::fs::read_to_string(&plot).unwrap().contains("source entropy rate"));
}

#[test]
fn demo_trains_on_a_users_text_file() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(60);
    std::fs::write(p("t.txt"), &text).unwrap();
    let out = bin().args(["demo", "--text", &p("t.txt"), "--epochs", "4", "--plot", &p("l.svg")]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("entropy rate of your text is unknown"), "{s}");
    // A repeated sentence is easy: the held-out cross-entropy falls far below uniform.
    let at = s.find("cross-entropy ").unwrap() + "cross-entropy ".len();
    let bits: f64 = s[at..].split_whitespace().next().unwrap().parse().unwrap();
    assert!(bits < 2.0, "{bits} bits/char on a repeated sentence (uniform over 28 symbols is 4.8)");
    assert!(Path::new(&p("l.svg")).exists());
    std::fs::write(p("short.txt"), "too short").unwrap();
    fails(&["demo", "--text", &p("short.txt")], &["short.txt", "at least 1000 characters"]);
    fails(&["demo", "--text", &p("missing.txt")], &["missing.txt"]);
    // Options checked before any work: no panic on a zero or huge bucket count.
    fails(&["demo", "--buckets", "0"], &["--buckets must be in [1, 1048576], got 0"]);
    fails(&["demo", "--buckets", "18446744073709551615"], &["--buckets"]);
    fails(&["demo", "--train-chars", "18446744073709551615"], &["--train-chars"]);
    fails(&["demo", "--plot", &p("nodir/d.svg")], &["nodir", "does not exist"]);
}

#[test]
fn adamw_weight_decay_defaults_to_the_librarys() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    write_csv(Path::new(&p("d.csv")), 60);
    let weight = |name: &str, extra: &[&str]| {
        let out = p(name);
        let base = ["train", "--data", &p("d.csv"), "--label-column", "label", "--optimizer", "adamw"];
        let tail = ["--epochs", "3", "--lr", "0.1", "-o", &out];
        ok(&base.iter().chain(extra).chain(&tail).copied().collect::<Vec<_>>());
        read_safetensors(Path::new(&out), "weight").unwrap().to_f32().unwrap().into_owned()
    };
    let default = weight("a.safetensors", &[]);
    let softmax_layer::train::Optimizer::AdamW { weight_decay, .. } = softmax_layer::train::Optimizer::adamw() else {
        panic!("adamw() is AdamW")
    };
    assert_eq!(default, weight("b.safetensors", &["--weight-decay", &weight_decay.to_string()]));
    assert_ne!(default, weight("c.safetensors", &["--weight-decay", "0"]));
}

#[test]
fn whole_number_float_labels_train_as_integers() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let (x, y) = write_csv(Path::new(&p("d.csv")), 60);
    write_npy_f32(Path::new(&p("x.npy")), &[60, 3], &x).unwrap();
    write_npy_i64(Path::new(&p("y.npy")), &[60], &y).unwrap();
    let yf: Vec<f32> = y.iter().map(|&c| c as f32).collect();
    write_npy_f32(Path::new(&p("yf.npy")), &[60], &yf).unwrap();
    let model = |labels: &str, out: &str| {
        ok(&["train", "--features", &p("x.npy"), "--labels", &p(labels), "-o", &p(out)]);
        read_safetensors(Path::new(&p(out)), "weight").unwrap().to_f32().unwrap().into_owned()
    };
    assert_eq!(model("y.npy", "a.safetensors"), model("yf.npy", "b.safetensors"));
    let mut half = yf.clone();
    half[7] = 1.5;
    write_npy_f32(Path::new(&p("yh.npy")), &[60], &half).unwrap();
    fails(
        &["train", "--features", &p("x.npy"), "--labels", &p("yh.npy"), "-o", &p("c.safetensors")],
        &["yh.npy", "label [7] = 1.5 is not an integer class id"],
    );
}
