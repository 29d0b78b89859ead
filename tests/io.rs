//! The parsers never panic on corrupt input: every truncation and many byte flips of valid
//! files are either parsed consistently or rejected with an error. (The fuzz targets in
//! fuzz/ go further; this is the quick version that runs in CI.)

mod common;
use common::Rng;
use softmax_layer::io::{OutTensor, Tensor, npy_from_bytes, safetensors_from_bytes, write_npy_f32, write_safetensors};
use std::path::Path;

fn exercise(t: &Tensor) {
    // Conversions must agree with the shape, whatever the header said.
    let n = t.numel();
    if let Ok(v) = t.to_f32() {
        assert_eq!(v.len(), n);
    }
    if let Ok(v) = t.to_i64() {
        assert_eq!(v.len(), n);
    }
    if let Ok(v) = t.to_f64() {
        assert_eq!(v.len(), n);
    }
}

#[test]
fn corrupt_npy_is_an_error_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.npy");
    write_npy_f32(&path, &[3, 5], &[1.5; 15]).unwrap();
    let good = std::fs::read(&path).unwrap();
    let t = npy_from_bytes(good.clone(), Path::new("x.npy")).unwrap();
    assert_eq!(t.shape, vec![3, 5]);
    assert_eq!(&t.to_f32().unwrap()[..], &[1.5; 15][..]);
    for len in 0..good.len() {
        let r = npy_from_bytes(good[..len].to_vec(), Path::new("x.npy"));
        assert!(r.is_err(), "a file cut to {len} bytes was accepted");
    }
    let mut rng = Rng(99);
    for _ in 0..20_000 {
        let mut b = good.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len().min(128));
            b[i] = rng.next_u64() as u8;
        }
        if let Ok(t) = npy_from_bytes(b, Path::new("x.npy")) {
            exercise(&t);
        }
    }
    // A header claiming an enormous shape is rejected before any allocation.
    let huge =
        b"\x93NUMPY\x01\x00\x46\x00{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }\n"
            .to_vec();
    assert!(npy_from_bytes(huge, Path::new("huge.npy")).is_err());
}

#[test]
fn corrupt_safetensors_is_an_error_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    write_safetensors(
        &path,
        &[("a", vec![2, 3], OutTensor::F32(&[1.0; 6])), ("b", vec![4], OutTensor::I64(&[1, 2, 3, 4]))],
    )
    .unwrap();
    let good = std::fs::read(&path).unwrap();
    assert_eq!(safetensors_from_bytes(good.clone(), &path, "b").unwrap().to_i64().unwrap(), vec![1, 2, 3, 4]);
    for len in 0..good.len() {
        for name in ["a", "b"] {
            if let Ok(t) = safetensors_from_bytes(good[..len].to_vec(), &path, name) {
                // Only the tensors wholly inside the kept bytes can load.
                exercise(&t);
            }
        }
    }
    let mut rng = Rng(7);
    for _ in 0..20_000 {
        let mut b = good.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len());
            b[i] = rng.next_u64() as u8;
        }
        for name in ["a", "b"] {
            if let Ok(t) = safetensors_from_bytes(b.clone(), &path, name) {
                exercise(&t);
            }
        }
    }
}

#[test]
fn an_optional_tensor_is_none_only_when_absent() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.safetensors");
    write_safetensors(&p, &[("w", vec![2], OutTensor::F32(&[1.5, -2.0]))]).unwrap();
    let w = softmax_layer::io::read_safetensors_optional(&p, "w").unwrap().expect("present");
    assert_eq!(w.to_f32().unwrap().into_owned(), vec![1.5, -2.0]);
    assert!(softmax_layer::io::read_safetensors_optional(&p, "bias").unwrap().is_none());
    // Absent from read_safetensors is an error listing what the file holds.
    let e = softmax_layer::io::read_safetensors(&p, "bias").unwrap_err().to_string();
    assert!(e.contains("no tensor named 'bias'") && e.contains("holds: w"), "{e}");
    // A file that is not a .safetensors is an error, never a quiet None.
    let q = d.path().join("junk.safetensors");
    std::fs::write(&q, b"not a tensor file at all").unwrap();
    assert!(softmax_layer::io::read_safetensors_optional(&q, "bias").is_err());
}

/// Outputs: a missing folder is named (not the temporary file's name); a new file gets the
/// usual mode (0666 less the umask), a replaced one keeps its own.
#[test]
fn written_files_have_the_usual_mode_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nodir").join("o.npy");
    let err = write_npy_f32(&missing, &[1], &[1.0]).unwrap_err().to_string();
    assert!(err.contains("the folder") && err.contains("nodir") && !err.contains(".softmax-layer-"), "{err}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join("o.npy");
        write_npy_f32(&p, &[1], &[1.0]).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        // The reference: a file created the plain way, which gets 0666 less the umask.
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        let want = std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "mode {mode:o}, a plain file's {want:o}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_npy_f32(&p, &[1], &[2.0]).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o640);
    }
}

/// The bytes of a `[2, 3]` `.npy` of 8-byte elements (`descr` `<f8` or `<i8`), stored in
/// C or Fortran order as given: written here, independently of the library's writer.
fn npy_2x3(descr: &str, fortran: bool, data: [[u8; 8]; 6]) -> Vec<u8> {
    let order = if fortran { "True" } else { "False" };
    npy_bytes(&format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': (2, 3), }}"), &data.concat())
}

/// A version 1.0 `.npy`: the header dict as given, padded to 64 bytes, then the payload.
fn npy_bytes(dict: &str, payload: &[u8]) -> Vec<u8> {
    let mut h = dict.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(h.len() as u16).to_le_bytes());
    b.extend_from_slice(h.as_bytes());
    b.extend_from_slice(payload);
    b
}

/// `f64` inputs are computed in `f32`: a finite value beyond its range is an error naming
/// the element (C or Fortran order alike), not a silent infinity.
#[test]
fn f64_values_beyond_f32_are_named() {
    let npy = |fortran: bool, data: &[f64; 6]| npy_2x3("<f8", fortran, data.map(f64::to_le_bytes));
    let c = [1.0, 2.0, 3.0, 4.0, 5.0, 1e300];
    let err = npy_from_bytes(npy(false, &c), Path::new("c.npy")).unwrap().to_f32().unwrap_err().to_string();
    assert!(err.contains("c.npy: [1, 2] is 1e300, beyond the f32 range"), "{err}");
    // The same matrix stored column by column.
    let f = [1.0, 4.0, 2.0, 5.0, 3.0, 1e300];
    let err = npy_from_bytes(npy(true, &f), Path::new("f.npy")).unwrap().to_f32().unwrap_err().to_string();
    assert!(err.contains("f.npy: [1, 2] is 1e300"), "{err}");
    // In range (rounded to f32): fine.
    let ok = npy_from_bytes(npy(false, &[1.0, 2.0, 3.0, 4.0, 5.0, 3e38]), Path::new("ok.npy")).unwrap();
    assert_eq!(ok.to_f32().unwrap()[5], 3e38f32);
}

/// A Fortran-ordered integer `.npy` reads back in C order through every conversion.
#[test]
fn fortran_order_integers_convert_once() {
    // [[1, 2, 3], [4, 5, 6]] stored column by column.
    let b = npy_2x3("<i8", true, [1i64, 4, 2, 5, 3, 6].map(i64::to_le_bytes));
    let t = npy_from_bytes(b, Path::new("i.npy")).unwrap();
    assert_eq!(t.to_i64().unwrap(), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(t.to_f64().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
}

/// CSV labels are read as written: whole numbers above 2^53 are not rounded through f64.
#[test]
fn csv_labels_are_exact_integers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.csv");
    std::fs::write(&p, "a,label\n1,9007199254740993\n2,3.0\n").unwrap();
    let t = softmax_layer::io::read_csv(&p, Some("label")).unwrap();
    assert_eq!(t.labels, Some(vec![9_007_199_254_740_993, 3]));
}

/// A `.npy` header in any spacing Python's dict syntax allows (numpy reads them all).
#[test]
fn npy_headers_with_spaces_before_colons_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.npy");
    let payload: Vec<u8> = [1f32, 2., 3., 4., 5., 6.].iter().flat_map(|v| v.to_le_bytes()).collect();
    let dict = "{ 'descr' : '<f4' , \"fortran_order\"  :  True , 'shape' : ( 2 , 3 ) }";
    std::fs::write(&p, npy_bytes(dict, &payload)).unwrap();
    let t = softmax_layer::io::read_npy(&p).unwrap();
    assert_eq!(t.shape, vec![2, 3]);
    // Fortran order: the columns are stored one after another.
    assert_eq!(t.to_f32().unwrap().into_owned(), vec![1., 3., 5., 2., 4., 6.]);
}

/// CSV errors give the physical line of the bad record, whatever the line ends (`\n`,
/// `\r\n`, `\r`), blank lines, or quoted line breaks before it.
#[test]
fn csv_errors_name_the_physical_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.csv");
    let cases: [(&str, usize); 9] = [
        ("a,b,y\n1,2,0\n3,x,1\n", 3),
        ("a,b,y\r\n1,2,0\r\n3,x,1\r\n", 3),
        ("a,b,y\r1,2,0\r3,x,1\r", 3),
        ("a,b,y\n1,2,0\n\n\n3,x,1\n", 5),
        ("a,b,y\r\n1,2,0\r\n\r\n3,x,1\r\n", 4),
        ("a,b,y\n\n3,x,1\n", 3),
        ("a,b,y\n\n\n1,2\n", 4),
        ("\u{feff}a,b,y\r\n\"1\n\",2,0\r\n3,x,1\r\n", 4),
        ("a,b,y\n1,2,0\n  \n3,x,1", 4),
    ];
    for (text, line) in cases {
        std::fs::write(&p, text).unwrap();
        let err = softmax_layer::io::read_csv(&p, Some("y")).unwrap_err().to_string();
        assert!(err.contains(&format!("line {line} ")) || err.contains(&format!("line {line},")), "{text:?}: {err}");
    }
    // 2^63 is beyond i64 (it was clamped to i64::MAX and then reported as that).
    std::fs::write(&p, "a,y\n1,9223372036854775808\n").unwrap();
    let err = softmax_layer::io::read_csv(&p, Some("y")).unwrap_err().to_string();
    assert!(err.contains("line 2") && err.contains("'9223372036854775808' is too large for a class id"), "{err}");
}

/// An output that is a link is written through (the link stays a link); a pipe is written
/// into, never renamed over.
#[cfg(unix)]
#[test]
fn outputs_write_through_links_and_pipes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("real")).unwrap();
    for (link, target) in [("link.npy", "real/a.npy"), ("dangling.npy", "real/b.npy")] {
        if link == "link.npy" {
            write_npy_f32(&d.join(target), &[1], &[0.0]).unwrap();
        }
        std::os::unix::fs::symlink(target, d.join(link)).unwrap();
        write_npy_f32(&d.join(link), &[2], &[1.0, 2.0]).unwrap();
        assert!(std::fs::symlink_metadata(d.join(link)).unwrap().file_type().is_symlink(), "{link}");
        let t = softmax_layer::io::read_npy(&d.join(target)).unwrap();
        assert_eq!(&t.to_f32().unwrap()[..], &[1.0, 2.0], "{link}");
    }
    // A chain of two dangling links: the file at its end is created, both links stay.
    std::os::unix::fs::symlink("real/c.npy", d.join("mid")).unwrap();
    std::os::unix::fs::symlink("mid", d.join("top")).unwrap();
    write_npy_f32(&d.join("top"), &[1], &[5.0]).unwrap();
    assert!(std::fs::symlink_metadata(d.join("mid")).unwrap().file_type().is_symlink());
    assert_eq!(&softmax_layer::io::read_npy(&d.join("real/c.npy")).unwrap().to_f32().unwrap()[..], &[5.0]);
    // A loop is an error, and both links survive it.
    std::os::unix::fs::symlink("loop_b", d.join("loop_a")).unwrap();
    std::os::unix::fs::symlink("loop_a", d.join("loop_b")).unwrap();
    assert!(write_npy_f32(&d.join("loop_a"), &[1], &[1.0]).is_err());
    for l in ["loop_a", "loop_b"] {
        assert!(std::fs::symlink_metadata(d.join(l)).unwrap().file_type().is_symlink(), "{l}");
    }
    let fifo = d.join("fifo");
    if std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()) {
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        write_npy_f32(&fifo, &[2], &[3.0, 4.0]).unwrap();
        let bytes = reader.join().unwrap();
        let t = npy_from_bytes(bytes, Path::new("fifo")).unwrap();
        assert_eq!(&t.to_f32().unwrap()[..], &[3.0, 4.0]);
        assert!(!std::fs::metadata(&fifo).unwrap().is_file(), "the pipe is still a pipe");
    }
}

/// Writers check what they are given: a shape that does not hold the data, a duplicate or
/// reserved tensor name, are errors (they asserted, or panicked inside `safetensors`).
#[test]
fn writers_refuse_inconsistent_input() {
    use softmax_layer::io::write_npy_i64;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.npy");
    assert!(write_npy_f32(&p, &[2], &[1.0]).unwrap_err().to_string().contains("does not hold"));
    assert!(write_npy_i64(&p, &[1 << 32, 1 << 32], &[]).is_err(), "a product that wraps");
    let s = dir.path().join("o.safetensors");
    let one = || OutTensor::F32(&[1.0]);
    let e = write_safetensors(&s, &[("w", vec![1], one()), ("w", vec![1], one())]).unwrap_err().to_string();
    assert!(e.contains("'w' appears twice"), "{e}");
    let e = write_safetensors(&s, &[("__metadata__", vec![1], one())]).unwrap_err().to_string();
    assert!(e.contains("reserved"), "{e}");
    assert!(!p.exists() && !s.exists());
}
