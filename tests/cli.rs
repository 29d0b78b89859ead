//! The command line: round trips through .npy and .safetensors, and every bad input
//! giving exit status 2 with one line naming the file and the problem.

mod common;
use common::{assert_log_close, assert_prob_close, bin, fails, reference, run};
use softmax_layer::io::{DType, OutTensor, read_npy, write_npy_f32, write_safetensors};
use std::path::{Path, PathBuf};

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

fn logits_3x5() -> Vec<f32> {
    vec![2.0, 1.0, 0.1, -1.0, 3.5, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0, -100.0, 50.0, 49.5, 7.0]
}

#[test]
fn softmax_round_trip_through_npy() {
    let dir = tempfile::tempdir().unwrap();
    let x = logits_3x5();
    write_npy_f32(&dir.path().join("x.npy"), &[3, 5], &x).unwrap();
    for (cmd, t) in [("softmax", "1"), ("log-softmax", "0.5"), ("logsumexp", "2")] {
        let out = p(dir.path(), &format!("{cmd}.npy"));
        let (code, stderr) = run(&[cmd, "--logits", &p(dir.path(), "x.npy"), "--temperature", t, "-o", &out]);
        assert_eq!(code, 0, "{cmd}: {}", stderr);
        let y = read_npy(Path::new(&out)).unwrap();
        assert_eq!(y.dtype, DType::F32);
        let y = y.to_f32().unwrap().into_owned();
        let tf: f32 = t.parse().unwrap();
        for i in 0..3 {
            let (lp, lse) = reference(&x[i * 5..(i + 1) * 5], None, tf);
            match cmd {
                "softmax" => (0..5).for_each(|j| assert_prob_close(y[i * 5 + j], lp[j].exp(), cmd)),
                "log-softmax" => (0..5).for_each(|j| assert_log_close(y[i * 5 + j], lp[j], 2e-6, cmd)),
                _ => assert_log_close(y[i], lse, 2e-6, cmd),
            }
        }
        let shape = read_npy(Path::new(&out)).unwrap().shape;
        assert_eq!(shape, if cmd == "logsumexp" { vec![3] } else { vec![3, 5] });
    }
}

#[test]
fn bf16_safetensors_with_mask_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let x = logits_3x5();
    // bf16 logits and an f32 mask that is broadcast over rows.
    let bf: Vec<u8> = x.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect();
    let mask = [0.0f32, f32::NEG_INFINITY, 0.0, 0.0, f32::NEG_INFINITY];
    let views = vec![(
        "logits".to_string(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![3, 5], &bf).unwrap(),
    )];
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.path().join("in.safetensors"), bytes).unwrap();
    write_safetensors(&dir.path().join("mask.safetensors"), &[("m", vec![5], OutTensor::F32(&mask))]).unwrap();
    let out = p(dir.path(), "lp.npy");
    let (code, stderr) = run(&[
        "log-softmax",
        "--logits",
        &format!("{}:logits", p(dir.path(), "in.safetensors")),
        "--mask",
        &format!("{}:m", p(dir.path(), "mask.safetensors")),
        "-o",
        &out,
    ]);
    assert_eq!(code, 0, "{}", stderr);
    let y = read_npy(Path::new(&out)).unwrap().to_f32().unwrap().into_owned();
    let xr: Vec<f32> = x.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
    for i in 0..3 {
        let (lp, _) = reference(&xr[i * 5..(i + 1) * 5], Some(&mask), 1.0);
        for j in 0..5 {
            if mask[j] == f32::NEG_INFINITY {
                assert_eq!(y[i * 5 + j], f32::NEG_INFINITY);
            } else {
                assert_log_close(y[i * 5 + j], lp[j], 2e-6, "bf16 log-softmax");
            }
        }
    }
}

/// Writes a .npy by hand, for dtypes the library does not write.
fn write_raw_npy(path: &Path, descr: &str, shape: &str, data: &[u8]) {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

#[test]
fn f64_and_f16_npy_and_1d_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let x = [0.5f64, -1.25, 3.0, 2.0];
    write_raw_npy(
        &dir.path().join("x64.npy"),
        "<f8",
        "(4,)",
        &x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
    );
    write_raw_npy(
        &dir.path().join("x16.npy"),
        "<f2",
        "(4,)",
        &x.iter().flat_map(|v| half::f16::from_f64(*v).to_bits().to_le_bytes()).collect::<Vec<_>>(),
    );
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let (lp, lse) = reference(&xf, None, 1.0);
    for f in ["x64.npy", "x16.npy"] {
        let out = p(dir.path(), "p.npy");
        assert_eq!(run(&["softmax", "--logits", &p(dir.path(), f), "-o", &out]).0, 0);
        let y = read_npy(Path::new(&out)).unwrap();
        assert_eq!(y.shape, vec![4], "a 1-D input gives a 1-D output");
        let y = y.to_f32().unwrap();
        (0..4).for_each(|j| assert_prob_close(y[j], lp[j].exp(), f));
        let out = p(dir.path(), "lse.npy");
        assert_eq!(run(&["logsumexp", "--logits", &p(dir.path(), f), "-o", &out]).0, 0);
        let y = read_npy(Path::new(&out)).unwrap();
        assert_eq!(y.shape, vec![1], "a 1-D input is one row");
        assert_log_close(y.to_f32().unwrap()[0], lse, 2e-6, f);
    }
}

#[test]
fn bad_inputs_exit_2_with_one_line_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = p(d, "out.npy");
    let good = p(d, "good.npy");
    write_npy_f32(Path::new(&good), &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();

    // Missing file.
    fails(&["softmax", "--logits", &p(d, "nope.npy"), "-o", &out], &["nope.npy", "No such file"]);
    // Bad header.
    std::fs::write(d.join("garbage.npy"), b"this is not numpy at all").unwrap();
    fails(&["softmax", "--logits", &p(d, "garbage.npy"), "-o", &out], &["garbage.npy", "not a .npy file"]);
    // Truncated header and truncated data.
    let full = std::fs::read(&good).unwrap();
    std::fs::write(d.join("trunc_header.npy"), &full[..20]).unwrap();
    fails(&["softmax", "--logits", &p(d, "trunc_header.npy"), "-o", &out], &["trunc_header.npy", "truncated"]);
    std::fs::write(d.join("trunc_data.npy"), &full[..full.len() - 5]).unwrap();
    fails(
        &["softmax", "--logits", &p(d, "trunc_data.npy"), "-o", &out],
        &["trunc_data.npy", "truncated", "needs 24 data bytes"],
    );
    // Wrong dtype and rank.
    write_raw_npy(&d.join("ints.npy"), "<i4", "(2,)", &[1, 0, 0, 0, 2, 0, 0, 0]);
    fails(&["softmax", "--logits", &p(d, "ints.npy"), "-o", &out], &["ints.npy", "floating-point", "i32"]);
    write_raw_npy(&d.join("u8.npy"), "|u1", "(2,)", &[1, 2]);
    fails(&["softmax", "--logits", &p(d, "u8.npy"), "-o", &out], &["u8.npy", "unsupported dtype"]);
    write_raw_npy(&d.join("rank3.npy"), "<f4", "(1, 1, 2)", &[0; 8]);
    fails(&["softmax", "--logits", &p(d, "rank3.npy"), "-o", &out], &["rank3.npy", "1-D or 2-D", "[1, 1, 2]"]);
    // NaN, with row and column.
    write_npy_f32(&d.join("nan.npy"), &[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, f32::NAN]).unwrap();
    fails(&["log-softmax", "--logits", &p(d, "nan.npy"), "-o", &out], &["nan.npy", "logits[1, 2] is NaN"]);
    // An all-masked row.
    write_npy_f32(
        &d.join("mask.npy"),
        &[2, 3],
        &[0.0, 0.0, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY],
    )
    .unwrap();
    fails(
        &["softmax", "--logits", &good, "--mask", &p(d, "mask.npy"), "-o", &out],
        &["good.npy", "row 1", "all masked"],
    );
    // A mask of the wrong shape.
    write_npy_f32(&d.join("mask4.npy"), &[4], &[0.0; 4]).unwrap();
    fails(&["softmax", "--logits", &good, "--mask", &p(d, "mask4.npy"), "-o", &out], &["mask4.npy", "does not fit"]);
    // An output over one of the inputs is refused before any work; the input is intact.
    let before = std::fs::read(&good).unwrap();
    fails(&["softmax", "--logits", &good, "-o", &good], &["-o", "would overwrite the input", "good.npy"]);
    fails(&["log-softmax", "--logits", &good, &format!("--output={good}")], &["would overwrite the input"]);
    // (clap's attached forms of -o too.)
    fails(&["softmax", "--logits", &good, &format!("-o{good}")], &["would overwrite the input"]);
    fails(&["softmax", "--logits", &good, &format!("-o={good}")], &["would overwrite the input"]);
    assert_eq!(std::fs::read(&good).unwrap(), before);
    // A default output counts too: demo's --plot (demo-loss.svg, in the working folder) over
    // its --text input. Reading the command line by hand missed outputs nobody typed.
    std::fs::write(d.join("demo-loss.svg"), "some text to train on").unwrap();
    let ran = bin().current_dir(d).args(["demo", "--text", "demo-loss.svg"]).output().unwrap();
    let err = String::from_utf8_lossy(&ran.stderr);
    assert_eq!(ran.status.code(), Some(2), "{err}");
    assert!(err.contains("--plot demo-loss.svg would overwrite the input demo-loss.svg"), "{err}");
    assert_eq!(std::fs::read(d.join("demo-loss.svg")).unwrap(), b"some text to train on");
    // A missing required argument is named on the one line (clap puts it on the next).
    fails(&["softmax", "--logits", &good], &["required arguments were not provided", "--output <OUT>"]);
    // An output whose name says the other format.
    fails(&["softmax", "--logits", &good, "-o", &p(d, "o.safetensors")], &["writes a .npy file", "o.safetensors"]);
    // The layer's options have no meaning for given logits.
    fails(&["logsumexp", "--logits", &good, "--precision", "bf16", "-o", &out], &["--logits", "--precision"]);
    // Bad temperatures.
    for t in ["0", "-1", "inf", "NaN"] {
        fails(&["softmax", "--logits", &good, "--temperature", t, "-o", &out], &["temperature must be finite and > 0"]);
    }
    fails(&["softmax", "--logits", &good, "--temperature", "warm", "-o", &out], &["warm"]);
    // safetensors: missing tensor name, unknown name.
    write_safetensors(&d.join("t.safetensors"), &[("a", vec![3], OutTensor::F32(&[1.0, 2.0, 3.0]))]).unwrap();
    fails(&["softmax", "--logits", &p(d, "t.safetensors"), "-o", &out], &["t.safetensors", ":NAME"]);
    fails(
        &["softmax", "--logits", &format!("{}:b", p(d, "t.safetensors")), "-o", &out],
        &["t.safetensors", "no tensor named 'b'", "a"],
    );
    std::fs::write(d.join("bad.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
    fails(
        &["softmax", "--logits", &format!("{}:a", p(d, "bad.safetensors")), "-o", &out],
        &["bad.safetensors", "not a valid .safetensors"],
    );
    // Nothing was written by any failure.
    assert!(!Path::new(&out).exists(), "no output may be written on error");
    // An unwritable output.
    let unwritable = p(d, "no/such/dir/out.npy");
    fails(&["softmax", "--logits", &good, "-o", &unwritable], &["no/such/dir/out.npy"]);
    // No temporary files left behind.
    let leftovers: Vec<PathBuf> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(".softmax-layer-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn an_existing_output_survives_a_failed_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.npy");
    std::fs::write(&out, b"previous result").unwrap();
    write_npy_f32(&dir.path().join("nan.npy"), &[1, 2], &[0.0, f32::NAN]).unwrap();
    fails(&["softmax", "--logits", &p(dir.path(), "nan.npy"), "-o", out.to_str().unwrap()], &["NaN"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"previous result");
}

#[test]
fn an_impossible_allocation_is_an_error_not_an_abort() {
    let (code, stderr) = run(&["selfcheck", "--rows", "2000000000", "--cols", "2000000000"]);
    assert_eq!(code, 2, "{}", stderr);
    assert!(stderr.contains("cannot allocate"), "{}", stderr);
    // A file of no bytes that claims 10^15 rows of no classes: the shape is the error, for
    // every row command (logsumexp allocated its [n] output first, and aborted).
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty.npy");
    write_raw_npy(&empty, "<f4", "(1000000000000000, 0)", &[]);
    let out = d.path().join("o.npy");
    for cmd in ["logsumexp", "softmax", "log-softmax"] {
        fails(
            &[cmd, "--logits", empty.to_str().unwrap(), "-o", out.to_str().unwrap()],
            &["empty.npy", "a softmax over no classes is undefined"],
        );
    }
    // A repeat count of 0 (timings of nothing) or one too large to hold the samples.
    for r in ["0", "18446744073709551615"] {
        fails(&["selfcheck", "--rows", "8", "--cols", "16", "--repeats", r], &["--repeats must be in [1, 10000]"]);
    }
}

#[test]
fn selfcheck_runs_and_checks_against_float64() {
    let out = bin().args(["selfcheck", "--rows", "64", "--cols", "3000", "--repeats", "2"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("accuracy vs float64") && text.contains("softmax"), "{text}");
}

/// Output into a closed pipe (`… | head -0`) ends the run quietly, never with a panic.
#[cfg(unix)]
#[test]
fn a_closed_stdout_is_not_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    // A pipe whose reading end is closed before the child starts: its first write fails,
    // whatever the timing.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = common::bin()
        .args(["selfcheck", "--rows", "8", "--cols", "16", "--repeats", "1"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success() || out.status.signal() == Some(13), "{:?}: {err}", out.status);
}
