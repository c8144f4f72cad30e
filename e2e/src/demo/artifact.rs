//! The check of the nodes' copies against the origin's digest.

use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Bytes hashed at a time.
const CHUNK: usize = 1 << 20;

/// The digest `blake3:<hex>` of the file at `path`, read from disk (not
/// taken from any status), so the summary's "verified" is the demo's own
/// check.
pub fn digest_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("blake3:{}", hasher.finalize().to_hex()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_digest_is_blake3_of_the_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a");
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        assert_eq!(
            digest_file(&path).expect("hash"),
            format!("blake3:{}", blake3::hash(&data).to_hex())
        );
        assert!(digest_file(&dir.path().join("missing")).is_err());
    }
}
