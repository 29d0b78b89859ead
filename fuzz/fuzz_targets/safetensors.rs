//! `cargo fuzz run safetensors`: the .safetensors reader on arbitrary bytes never panics.
//! The first byte picks the tensor name to look up.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let name = ["a", "b", "weight", ""][sel as usize % 4];
    if let Ok(t) = softmax_layer::io::safetensors_from_bytes(rest.to_vec(), Path::new("fuzz.safetensors"), name) {
        let n = t.numel();
        if let Ok(v) = t.to_f32() {
            assert_eq!(v.len(), n);
        }
        if let Ok(v) = t.to_f64() {
            assert_eq!(v.len(), n);
        }
    }
});
