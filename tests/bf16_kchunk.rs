//! The AMX kernel's optional k-chunking (a process-wide tuning knob, so in its own test
//! binary): same numbers as the portable path up to f32 summation order, and written over
//! the output, the bits of adding onto zeros.

mod common;
use common::{aligned_offset, assert_tile_matches};
use softmax_layer::bf16::{self, BfPath, Output, PackedBf16Weights, PackedRows, Precision};
use softmax_layer::{MatRef, WeightLayout};

#[test]
fn chunked_in_place_blocks_match_the_portable_path() {
    if !BfPath::Amx.is_available() {
        eprintln!("no AMX here: nothing to test");
        return;
    }
    bf16::amx::set_k_chunk(5);
    let (n, d, v) = (70, 800, 300);
    let h: Vec<f32> = (0..n * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let w: Vec<f32> = (0..v * d).map(|i| ((i * 53 % 97) as f32 - 48.0) / 97.0).collect();
    for precision in [Precision::Bf16, Precision::Bf16x3] {
        let packed = PackedBf16Weights::from_f32(&w, WeightLayout::VocabMajor, v, d, precision).unwrap();
        let rows = PackedRows::pack(MatRef::new(&h, n, d).unwrap(), precision);
        // Output rows whole cache lines, so that blocks accumulate in place (and in chunks).
        let (cols, ldo) = (32..200, 176);
        let mut buf = vec![0f32; n * ldo + 16];
        let off = aligned_offset(&buf);
        let mut want = vec![0.25f32; n * ldo];
        bf16::tile_product(BfPath::Portable, &rows, &packed, cols.clone(), &mut want, ldo, Output::Add);
        let out = &mut buf[off..off + n * ldo];
        out.fill(0.25);
        bf16::tile_product(BfPath::Amx, &rows, &packed, cols.clone(), out, ldo, Output::Add);
        assert_tile_matches(out, &want, ldo, cols.len(), 0.25, 1e-3, &precision.to_string());
        // Written over the output (never read: NaN), chunked blocks give the bits of adding
        // onto zeros.
        out.fill(0.0);
        bf16::tile_product(BfPath::Amx, &rows, &packed, cols.clone(), out, ldo, Output::Add);
        let zeros_plus: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
        out.fill(f32::NAN);
        bf16::tile_product(BfPath::Amx, &rows, &packed, cols.clone(), out, ldo, Output::Overwrite);
        for (i, (x, &b)) in out.iter().zip(&zeros_plus).enumerate() {
            if i % ldo < cols.len() {
                assert_eq!(x.to_bits(), b, "{precision} at {i}: {x}");
            }
        }
    }
}
