//! The IDX file format (LeCun's MNIST format), plain or gzip'd.
//!
//! Header: two zero bytes, a type byte (only `0x08`, unsigned byte, is supported), the number of
//! dimensions, then each dimension as a big-endian `u32`; then the values, row-major. Sizes are
//! checked against a cap, the buffer grows with the bytes that arrive (never allocated to the
//! announced size up front), and trailing bytes are an error.

use std::io::Read;
use std::path::Path;

use super::DatasetError;

/// Largest array accepted: 1 GiB of pixels, far above any dataset we read.
pub const MAX_IDX_BYTES: usize = 1 << 30;

/// An n-dimensional `u8` array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions, outermost first.
    pub dims: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<u8>,
}

/// Reads an IDX file; a name ending in `.gz` is decompressed.
pub fn read_file(path: &Path) -> Result<IdxArray, DatasetError> {
    let file = std::fs::File::open(path).map_err(|cause| DatasetError::Io { path: path.to_path_buf(), cause })?;
    let reader = std::io::BufReader::new(file);
    let gz = path.extension().is_some_and(|e| e == "gz");
    let result = if gz { read(flate2::read::GzDecoder::new(reader)) } else { read(reader) };
    result.map_err(|reason| DatasetError::Format { path: path.to_path_buf(), reason })
}

/// Reads an IDX array from gzip'd bytes (as embedded in the binary).
pub fn read_gz_bytes(bytes: &[u8]) -> Result<IdxArray, String> {
    read(flate2::read::GzDecoder::new(bytes))
}

/// Reads an IDX array from a byte stream. Errors are human-readable reasons.
pub fn read<R: Read>(mut r: R) -> Result<IdxArray, String> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header).map_err(|e| format!("not an IDX file (header: {e})"))?;
    if header[0] != 0 || header[1] != 0 {
        return Err(format!(
            "not an IDX file (magic {:02x}{:02x}{:02x}{:02x})",
            header[0], header[1], header[2], header[3]
        ));
    }
    if header[2] != 0x08 {
        return Err(format!("unsupported IDX element type 0x{:02x} (only u8 is read)", header[2]));
    }
    let ndim = header[3] as usize;
    if ndim == 0 || ndim > 4 {
        return Err(format!("unsupported number of dimensions {ndim}"));
    }
    let mut dims = Vec::with_capacity(ndim);
    let mut total: usize = 1;
    for _ in 0..ndim {
        let mut d = [0u8; 4];
        r.read_exact(&mut d).map_err(|e| format!("truncated header: {e}"))?;
        let d = u32::from_be_bytes(d) as usize;
        total = total
            .checked_mul(d)
            .filter(|&t| t <= MAX_IDX_BYTES)
            .ok_or_else(|| format!("array too large (dims so far {dims:?} x {d})"))?;
        dims.push(d);
    }
    // Grown as the bytes arrive, not allocated to the announced size: a 12-byte header
    // announcing 1 GiB must not cost 1 GiB (found by the `idx` fuzz target).
    let mut data = Vec::with_capacity(total.min(1 << 20));
    let read = r.by_ref().take(total as u64).read_to_end(&mut data).map_err(|e| format!("read error: {e}"))?;
    if read != total {
        return Err(format!("truncated data: expected {total} bytes for {dims:?}, found {read}"));
    }
    let mut extra = [0u8; 1];
    match r.read(&mut extra) {
        Ok(0) => {}
        Ok(_) => return Err(format!("trailing bytes after {total} values")),
        Err(e) => return Err(format!("read error: {e}")),
    }
    Ok(IdxArray { dims, data })
}

/// Writes an IDX array (used to build the embedded subset and in tests).
pub fn write<W: std::io::Write>(mut w: W, a: &IdxArray) -> std::io::Result<()> {
    w.write_all(&[0, 0, 0x08, a.dims.len() as u8])?;
    for &d in &a.dims {
        w.write_all(&(d as u32).to_be_bytes())?;
    }
    w.write_all(&a.data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(a: &IdxArray) -> Vec<u8> {
        let mut v = Vec::new();
        write(&mut v, a).unwrap();
        v
    }

    #[test]
    fn round_trip() {
        let a = IdxArray { dims: vec![2, 2, 3], data: (0..12).collect() };
        assert_eq!(read(&bytes(&a)[..]).unwrap(), a);
    }

    #[test]
    fn malformed_inputs_get_reasons() {
        let a = IdxArray { dims: vec![3], data: vec![1, 2, 3] };
        let good = bytes(&a);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "not an IDX file"),
            (vec![1, 2, 8, 1], "magic"),
            (vec![0, 0, 0x0d, 1, 0, 0, 0, 1], "element type"),
            (vec![0, 0, 8, 0], "dimensions"),
            (good[..good.len() - 1].to_vec(), "truncated data"),
            ([good.clone(), vec![9]].concat(), "trailing"),
            (vec![0, 0, 8, 3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], "too large"),
        ];
        for (input, want) in cases {
            let err = read(&input[..]).unwrap_err();
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }
}
