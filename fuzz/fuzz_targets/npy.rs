//! `cargo fuzz run npy`: the .npy parser on arbitrary bytes never panics, and what it
//! accepts converts consistently with its shape.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = softmax_layer::io::npy_from_bytes(data.to_vec(), Path::new("fuzz.npy")) {
        let n = t.numel();
        if let Ok(v) = t.to_f32() {
            assert_eq!(v.len(), n);
        }
        if let Ok(v) = t.to_i64() {
            assert_eq!(v.len(), n);
        }
    }
});
