//! The layer commands against PyTorch fixtures (tests/fixtures/layer_forward.safetensors,
//! written by scripts/make_fixtures.py), and their bad-input errors.

mod common;
use common::{fails, ok, transpose};
use softmax_layer::io::{OutTensor, Tensor, TensorSpec, write_npy_f32, write_safetensors};
use std::path::Path;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/layer_forward.safetensors");

fn fx(name: &str) -> String {
    format!("{FIX}:{name}")
}

fn load(spec: &str) -> Tensor {
    Tensor::load(&TensorSpec::parse(spec).unwrap()).unwrap()
}

fn close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn layer_commands_match_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let o = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let t = "0.7";
    let common = ["--hidden", &fx("hidden"), "--weight", &fx("weight"), "--bias", &fx("bias")];
    let with = |cmd: &str, extra: &[&str], out: &str| {
        let mut a = vec![cmd];
        a.extend_from_slice(&common);
        a.extend_from_slice(extra);
        a.extend_from_slice(&["-o", out]);
        ok(&a.iter().map(|s| &**s).collect::<Vec<_>>());
    };
    // Logits: f32 dot products of length 24, so agreement to ~1e-6.
    with("logits", &[], &o("logits.npy"));
    close(&load(&o("logits.npy")).to_f64().unwrap(), &load(&fx("logits")).to_f64().unwrap(), 2e-6, "logits");
    with("log-probs", &["--temperature", t], &o("lp.npy"));
    close(&load(&o("lp.npy")).to_f64().unwrap(), &load(&fx("log_probs")).to_f64().unwrap(), 5e-6, "log_probs");
    with("probs", &["--temperature", t], &o("p.npy"));
    let want: Vec<f64> = load(&fx("log_probs")).to_f64().unwrap().iter().map(|x| x.exp()).collect();
    close(&load(&o("p.npy")).to_f64().unwrap(), &want, 5e-6, "probs");
    with("logsumexp", &["--temperature", t], &o("lse.npy"));
    close(&load(&o("lse.npy")).to_f64().unwrap(), &load(&fx("logsumexp")).to_f64().unwrap(), 5e-6, "logsumexp");
    with("log-probs", &["--temperature", t, "--targets", &fx("targets")], &o("tlp.npy"));
    close(&load(&o("tlp.npy")).to_f64().unwrap(), &load(&fx("target_log_probs")).to_f64().unwrap(), 5e-6, "target");
    with("argmax", &[], &o("am.npy"));
    assert_eq!(load(&o("am.npy")).to_i64().unwrap(), load(&fx("argmax")).to_i64().unwrap());
    with("top-k", &["--temperature", t, "--k", "5"], &o("top.safetensors"));
    let top = format!("{}:", o("top.safetensors"));
    assert_eq!(load(&(top.clone() + "indices")).to_i64().unwrap(), load(&fx("topk_indices")).to_i64().unwrap());
    assert_eq!(load(&(top.clone() + "values")).shape, vec![7, 5]);
    close(&load(&(top + "values")).to_f64().unwrap(), &load(&fx("topk_values")).to_f64().unwrap(), 5e-6, "top-k");
}

#[test]
fn hidden_major_layout_gives_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let w = load(&fx("weight"));
    let (v, d) = (w.shape[0], w.shape[1]);
    let w = w.to_f32().unwrap();
    let wt = transpose(&w, v, d);
    let wt_path = dir.path().join("wt.npy");
    write_npy_f32(&wt_path, &[d, v], &wt).unwrap();
    let out = dir.path().join("lse.npy");
    ok(&[
        "logsumexp",
        "--hidden",
        &fx("hidden"),
        "--weight",
        wt_path.to_str().unwrap(),
        "--weight-layout",
        "dv",
        "--bias",
        &fx("bias"),
        "--temperature",
        "0.7",
        "-o",
        out.to_str().unwrap(),
    ]);
    close(
        &load(out.to_str().unwrap()).to_f64().unwrap(),
        &load(&fx("logsumexp")).to_f64().unwrap(),
        5e-6,
        "dv logsumexp",
    );
}

#[test]
fn layer_bad_inputs_exit_2_naming_tensor_shape_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |name: &str| d.join(name).to_str().unwrap().to_string();
    let out = p("out.npy");
    let (h, w) = (fx("hidden"), fx("weight"));
    // Shape mismatches between H, W, b and Y.
    write_npy_f32(Path::new(&p("h5.npy")), &[7, 5], &[0.0; 35]).unwrap();
    fails(
        &["logits", "--hidden", &p("h5.npy"), "--weight", &w, "-o", &out],
        &["h5.npy", "[7, 5]", "[301, 24]", "d = 24"],
    );
    write_npy_f32(Path::new(&p("b3.npy")), &[3], &[0.0; 3]).unwrap();
    fails(
        &["probs", "--hidden", &h, "--weight", &w, "--bias", &p("b3.npy"), "-o", &out],
        &["b3.npy", "[3]", "expected [301]"],
    );
    write_safetensors(
        Path::new(&p("y.safetensors")),
        &[("short", vec![2], OutTensor::I64(&[0, 1])), ("bad", vec![7], OutTensor::I64(&[0, 1, 2, 3, 301, 5, 6]))],
    )
    .unwrap();
    fails(
        &[
            "log-probs",
            "--hidden",
            &h,
            "--weight",
            &w,
            "--targets",
            &format!("{}:short", p("y.safetensors")),
            "-o",
            &out,
        ],
        &["targets", "[2]", "expected [7]"],
    );
    // A target id out of [0, V).
    fails(
        &["log-probs", "--hidden", &h, "--weight", &w, "--targets", &format!("{}:bad", p("y.safetensors")), "-o", &out],
        &["y.safetensors:bad", "targets[4] = 301 is out of range [0, 301)"],
    );
    // Float targets are not ids.
    write_npy_f32(Path::new(&p("yf.npy")), &[7], &[0.0; 7]).unwrap();
    fails(
        &["log-probs", "--hidden", &h, "--weight", &w, "--targets", &p("yf.npy"), "-o", &out],
        &["yf.npy", "integer", "f32"],
    );
    // k = 0 and k > V.
    fails(
        &["top-k", "--hidden", &h, "--weight", &w, "--k", "0", "-o", &p("t.safetensors")],
        &["--k must be in [1, V = 301]", "got 0"],
    );
    fails(&["top-k", "--hidden", &h, "--weight", &w, "--k", "302", "-o", &p("t.safetensors")], &["got 302"]);
    // NaN or inf in H, W or b.
    let mut hv = load(&h).to_f32().unwrap().into_owned();
    hv[2 * 24 + 5] = f32::NAN;
    write_npy_f32(Path::new(&p("hnan.npy")), &[7, 24], &hv).unwrap();
    fails(&["logsumexp", "--hidden", &p("hnan.npy"), "--weight", &w, "-o", &out], &["hnan.npy", "hidden[2, 5] is NaN"]);
    let mut wv = load(&w).to_f32().unwrap().into_owned();
    wv[300 * 24 + 1] = f32::INFINITY;
    write_npy_f32(Path::new(&p("winf.npy")), &[301, 24], &wv).unwrap();
    fails(&["argmax", "--hidden", &h, "--weight", &p("winf.npy"), "-o", &out], &["winf.npy", "weight[300, 1] is inf"]);
    let mut bv = vec![0f32; 301];
    bv[17] = f32::NEG_INFINITY;
    write_npy_f32(Path::new(&p("binf.npy")), &[301], &bv).unwrap();
    fails(
        &["logits", "--hidden", &h, "--weight", &w, "--bias", &p("binf.npy"), "-o", &out],
        &["binf.npy", "bias", "17", "-inf"],
    );
    // An unknown layout word.
    fails(
        &["logits", "--hidden", &h, "--weight", &w, "--weight-layout", "vdx", "-o", &out],
        &["--weight-layout", "'vdx'"],
    );
    // The dv layout checks the other dimension.
    fails(&["logits", "--hidden", &h, "--weight", &w, "--weight-layout", "dv", "-o", &out], &["[301, 24]", "[d, V]"]);
    // Temperatures: logits take none; too small for 1/T quoted as typed (1e-46 is 0 in f32).
    fails(
        &["logits", "--hidden", &h, "--weight", &w, "--temperature", "0.5", "-o", &out],
        &["does not apply to logits"],
    );
    for t in ["5e-39", "1e-46"] {
        fails(
            &["probs", "--hidden", &h, "--weight", &w, "--temperature", t, "-o", &out],
            &[&format!("temperature {t} is too small"), "5.877473e-39"],
        );
    }
    fails(&["probs", "--hidden", &h, "--weight", &w, "--temperature", "1e39", "-o", &out], &["beyond the f32 range"]);
    // Finite inputs whose products overflow f32: logits and argmax say so, like the others.
    write_npy_f32(Path::new(&p("hbig.npy")), &[2, 2], &[1.0, 1.0, 3e38, -3e38]).unwrap();
    write_npy_f32(Path::new(&p("wbig.npy")), &[3, 2], &[1.0, 0.0, 0.0, 1.0, 2.0, -2.0]).unwrap();
    for cmd in ["logits", "argmax", "probs", "logsumexp"] {
        fails(&[cmd, "--hidden", &p("hbig.npy"), "--weight", &p("wbig.npy"), "-o", &out], &["row 1 overflow f32"]);
    }
    assert!(!Path::new(&out).exists());
}

const CE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cross_entropy.safetensors");

#[test]
fn loss_command_matches_pytorch_with_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("loss.safetensors");
    let out = out.to_str().unwrap();
    let c = |k: &str| format!("{CE}:smooth_weights_ignore.{k}");
    ok(&[
        "loss",
        "--hidden",
        &c("hidden"),
        "--weight",
        &c("weight"),
        "--bias",
        &c("bias"),
        "--targets",
        &c("targets"),
        "--label-smoothing",
        "0.1",
        "--class-weights",
        &c("class_weights"),
        "--grad",
        "-o",
        out,
    ]);
    let got = |k: &str| load(&format!("{out}:{k}")).to_f64().unwrap();
    let want = |k: &str| load(&c(k)).to_f64().unwrap();
    assert_eq!(load(&format!("{out}:loss")).shape, Vec::<usize>::new(), "a scalar loss has shape []");
    close(&got("loss"), &want("loss"), 1e-5, "loss");
    close(&got("lse"), &want("lse"), 2e-6, "lse");
    // The fixture's upstream gradient is 0.75; the command's is 1.
    for k in ["grad_hidden", "grad_weight", "grad_bias"] {
        let w: Vec<f64> = want(k).iter().map(|x| x / 0.75).collect();
        close(&got(k), &w, 1e-4, k);
    }
    assert_eq!(load(&format!("{out}:grad_weight")).shape, vec![37, 11]);
    // One row given as a vector [d]: its gradient has the same shape; a NaN in a 1-D bias is
    // named by its one index.
    let h1 = dir.path().join("h1.npy");
    let b_nan = dir.path().join("b_nan.npy");
    softmax_layer::io::write_npy_f32(&h1, &[11], &load(&c("hidden")).to_f32().unwrap()[..11]).unwrap();
    let mut b = load(&c("bias")).to_f32().unwrap().into_owned();
    b[2] = f32::NAN;
    softmax_layer::io::write_npy_f32(&b_nan, &[37], &b).unwrap();
    let y1 = dir.path().join("y1.npy");
    softmax_layer::io::write_npy_i64(&y1, &[1], &[3]).unwrap();
    let (h1, y1, b_nan) = (h1.to_str().unwrap(), y1.to_str().unwrap(), b_nan.to_str().unwrap());
    let args = |bias: &str| {
        ["loss", "--hidden", h1, "--weight", &c("weight"), "--bias", bias, "--targets", y1, "--grad", "-o", out]
            .map(String::from)
    };
    ok(&args(&c("bias")).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(load(&format!("{out}:grad_hidden")).shape, vec![11]);
    let (code, err) = common::run(&args(b_nan).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(code == 2 && err.contains("bias[2] is NaN"), "{code}: {err}");
}

#[test]
fn loss_bad_inputs_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.safetensors");
    let out = out.to_str().unwrap();
    let c = |k: &str| format!("{CE}:mean_basic.{k}");
    let base = ["loss", "--hidden", &c("hidden"), "--weight", &c("weight"), "--targets", &c("targets")];
    let with = |extra: &[&str], needles: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        a.extend_from_slice(&["-o", out]);
        fails(&a, needles);
    };
    with(&["--label-smoothing", "1.5"], &["label_smoothing must be in [0, 1], got 1.5"]);
    with(&["--reduction", "avg"], &["--reduction", "'avg'"]);
    with(&["--softcap", "-2"], &["softcap must be finite and > 0", "got -2"]);
    let cw = dir.path().join("cw.npy");
    let mut w = vec![1.0f32; 37];
    w[3] = -1.0;
    write_npy_f32(&cw, &[37], &w).unwrap();
    with(&["--class-weights", cw.to_str().unwrap()], &["cw.npy", "class_weights[3] = -1"]);
    write_npy_f32(&cw, &[36], &w[..36]).unwrap();
    with(&["--class-weights", cw.to_str().unwrap()], &["cw.npy", "[36]", "expected [37]"]);
    fails(
        &["loss", "--hidden", &c("hidden"), "--weight", &c("weight"), "--targets", &c("weight"), "-o", out],
        &["targets", "[37, 11]", "expected [13]"],
    );
    assert!(!Path::new(out).exists());
}

#[test]
fn precision_flag_runs_bf16_and_bf16x3_and_keeps_bf16_weights_as_bf16() {
    use softmax_layer::bf16::{from_bf16, to_bf16};
    let dir = tempfile::tempdir().unwrap();
    let o = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    // A mistyped forced path is an error, not silently the default; `portable` runs anywhere.
    for (value, code) in [("amxx", 2), ("portable", 0)] {
        let out = common::bin()
            .env("SOFTMAX_LAYER_BF16_PATH", value)
            .args(["argmax", "--hidden", &fx("hidden"), "--weight", &fx("weight"), "--precision", "bf16"])
            .args(["-o", &o("path.npy")])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{value}: {err}");
        assert!(code == 0 || err.contains("'amxx'"), "{err}");
    }
    let w = load(&fx("weight"));
    let wf = w.to_f32().unwrap();
    // The same weight stored as bf16, and as f32 holding the bf16-rounded values.
    let bits: Vec<u16> = wf.iter().map(|&x| to_bf16(x)).collect();
    let rounded: Vec<f32> = bits.iter().map(|&b| from_bf16(b)).collect();
    let wfile = o("w.safetensors");
    write_safetensors(
        Path::new(&wfile),
        &[
            ("w_bf16", w.shape.clone(), OutTensor::Bf16Bits(&bits)),
            ("w_rounded", w.shape.clone(), OutTensor::F32(&rounded)),
        ],
    )
    .unwrap();
    let logits = |weight: &str, precision: &str, out: &str| {
        let args = ["logits", "--hidden", &fx("hidden"), "--weight", weight, "--precision", precision, "-o", out];
        ok(&args);
        load(out).to_f64().unwrap()
    };
    // The f32 logits without a bias (the fixture's include one).
    let want = logits(&fx("weight"), "f32", &o("f.npy"));
    let kept = logits(&format!("{wfile}:w_bf16"), "bf16", &o("a.npy"));
    let widened = logits(&format!("{wfile}:w_rounded"), "bf16", &o("b.npy"));
    assert_eq!(kept, widened, "a bf16 weight kept as bf16 gives the rounded weight's numbers");
    // bf16: the float64 product of the rounded H and W, up to f32 accumulation.
    let h = load(&fx("hidden"));
    let hf = h.to_f32().unwrap();
    let (n, d) = (h.shape[0], h.shape[1]);
    let v = w.shape[0];
    let r = |x: f32| from_bf16(to_bf16(x)) as f64;
    let exact: Vec<f64> =
        (0..n * v).map(|x| (0..d).map(|k| r(hf[(x / v) * d + k]) * r(wf[(x % v) * d + k])).sum()).collect();
    close(&kept, &exact, 1e-5, "bf16 logits");
    // bf16x3 is within a few units of 2^-16 of f32.
    let x3 = logits(&fx("weight"), "bf16x3", &o("c.npy"));
    close(&x3, &want, 2e-4, "bf16x3 logits");
    let (hf, wf) = (fx("hidden"), fx("weight"));
    let a = ["log-probs", "--hidden", &hf, "--weight", &wf, "--precision", "fp8", "-o", "/nonexistent/x.npy"];
    fails(&a, &["--precision", "fp8"]);
}

#[test]
fn loss_with_gradients_widens_a_bf16_weight() {
    use softmax_layer::bf16::to_bf16;
    let dir = tempfile::tempdir().unwrap();
    let o = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let w = load(&fx("weight"));
    let bits: Vec<u16> = w.to_f32().unwrap().iter().map(|&x| to_bf16(x)).collect();
    let wfile = o("w.safetensors");
    write_safetensors(Path::new(&wfile), &[("w", w.shape.clone(), OutTensor::Bf16Bits(&bits))]).unwrap();
    let ws = format!("{wfile}:w");
    let (hf, yf, out) = (fx("hidden"), fx("targets"), o("loss.safetensors"));
    ok(&["loss", "--hidden", &hf, "--weight", &ws, "--targets", &yf, "--precision", "bf16", "--grad", "-o", &out]);
    let gw = load(&format!("{out}:grad_weight"));
    assert_eq!(gw.shape, w.shape);
    assert!(gw.to_f64().unwrap().iter().any(|&x| x != 0.0));
}
