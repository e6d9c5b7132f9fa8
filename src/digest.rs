//! SHA-256 fingerprints of weights and programs (cache keys, checkpoint checks, IR text).

use sha2::{Digest, Sha256};

/// Lower-case hexadecimal SHA-256 of a sequence of byte chunks.
pub fn sha256_hex<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for chunk in chunks {
        h.update(chunk);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
