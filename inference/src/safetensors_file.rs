//! Reads a `.safetensors` file one tensor at a time.
//!
//! candle's `safetensors::load` reads the whole file into memory and then
//! copies every tensor out of it, so loading briefly holds the weights twice
//! (1.08 GB peak RSS for SmolLM2's 538 MB of F32). Here the header is parsed,
//! checked against the file's length, and each tensor is read from its own
//! offset into its own buffer: the peak is the weights plus one tensor.
//!
//! The format: an 8-byte little-endian header length, a JSON object mapping
//! tensor names to `{dtype, shape, data_offsets: [begin, end]}` (offsets into
//! the data that follows the header; an optional `__metadata__` entry), then
//! the data.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

/// A header larger than this is not a model's (SmolLM2's is 30 KB); refusing it keeps a corrupt length from
/// allocating gigabytes.
const MAX_HEADER_BYTES: u64 = 100 << 20;

#[derive(Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Every tensor of the file at `path`, on the CPU in the file's dtypes. The error says what is wrong, without the
/// path (the caller names the file).
pub fn read(path: &Path) -> Result<HashMap<String, Tensor>, String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|_| format!("file of {file_len} bytes has no header length"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
        return Err(format!("header length {header_len} does not fit in a file of {file_len} bytes"));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| format!("cannot read the header: {e}"))?;
    let entries = parse_header(&header, file_len - 8 - header_len)?;

    let data_start = 8 + header_len;
    let mut tensors = HashMap::with_capacity(entries.len());
    for (name, (dtype, shape, [begin, end])) in entries {
        let mut bytes = vec![0u8; (end - begin) as usize];
        file.seek(SeekFrom::Start(data_start + begin))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| format!("tensor {name}: cannot read its data: {e}"))?;
        let tensor =
            Tensor::from_raw_buffer(&bytes, dtype, &shape, &Device::Cpu).map_err(|e| format!("tensor {name}: {e}"))?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

type Checked = (DType, Vec<usize>, [u64; 2]);

/// The header's tensors in file order (so reads go forward through the file), each checked: a known dtype, and a
/// byte range inside the data (`data_len` bytes) whose size matches the shape.
fn parse_header(header: &[u8], data_len: u64) -> Result<Vec<(String, Checked)>, String> {
    let mut raw: HashMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("invalid header JSON: {e}"))?;
    raw.remove("__metadata__");
    let mut checked = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        let entry: TensorEntry = serde_json::from_value(value).map_err(|e| format!("tensor {name}: {e}"))?;
        let dtype =
            dtype_of(&entry.dtype).ok_or_else(|| format!("tensor {name}: unsupported dtype {}", entry.dtype))?;
        let [begin, end] = entry.data_offsets;
        let elements = entry.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        let expected = elements.and_then(|n| n.checked_mul(dtype.size_in_bytes() as u64));
        if begin > end || end > data_len {
            return Err(format!("tensor {name}: data offsets [{begin}, {end}] outside the {data_len} data bytes"));
        }
        if expected != Some(end - begin) {
            return Err(format!(
                "tensor {name}: shape {:?} of {} needs {} bytes but its data has {}",
                entry.shape,
                entry.dtype,
                expected.map_or("too many".to_string(), |n| n.to_string()),
                end - begin
            ));
        }
        checked.push((name, (dtype, entry.shape, entry.data_offsets)));
    }
    checked.sort_by_key(|(_, (_, _, [begin, _]))| *begin);
    Ok(checked)
}

fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, tensors: &[(&str, Tensor)]) -> std::path::PathBuf {
        let path = dir.join("model.safetensors");
        let map: HashMap<String, Tensor> = tensors.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    }

    #[test]
    fn reads_what_candle_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((2, 3, 4)).unwrap();
        let b = Tensor::new(&[1.5f32, -2.0], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let c = Tensor::new(&[7u32, 8, 9], &Device::Cpu).unwrap();
        let path = write(tmp.path(), &[("a", a.clone()), ("b", b.clone()), ("c", c.clone())]);
        let read = read(&path).unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!(read["a"].dims(), &[2, 3, 4]);
        assert_eq!(
            read["a"].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..24).map(|i| i as f32).collect::<Vec<_>>()
        );
        assert_eq!(read["b"].dtype(), DType::BF16);
        assert_eq!(read["b"].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), vec![1.5, -2.0]);
        assert_eq!(read["c"].to_vec1::<u32>().unwrap(), vec![7, 8, 9]);
        // The same tensors as candle's whole-file reader.
        let reference = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let diff =
            (&reference["a"] - &read["a"]).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
    }

    /// A file whose header is `header` followed by `data_len` zero bytes.
    fn raw(dir: &Path, header: &str, data_len: usize) -> std::path::PathBuf {
        let path = dir.join("raw.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn damaged_files_are_errors_that_say_what_is_wrong() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let cases = [
            (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 4, "outside"),
            (r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8, "needs 12 bytes"),
            (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, 8, "outside"),
            (r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}}"#, 8, "unsupported dtype Q4"),
            (r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}}"#, 8, "too many"),
            (r#"{"w":{"shape":[2],"data_offsets":[0,8]}}"#, 8, "dtype"),
            ("{garbage", 0, "invalid header JSON"),
        ];
        for (header, data_len, expected) in cases {
            let err = read(&raw(d, header, data_len)).unwrap_err();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
        let short = d.join("short.safetensors");
        std::fs::write(&short, b"\x03\x00").unwrap();
        assert!(read(&short).unwrap_err().contains("no header length"));
        std::fs::write(&short, u64::MAX.to_le_bytes()).unwrap();
        assert!(read(&short).unwrap_err().contains("does not fit"));
    }

    #[test]
    fn metadata_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let path = raw(
            tmp.path(),
            r#"{"__metadata__":{"format":"pt"},"w":{"dtype":"U8","shape":[2,2],"data_offsets":[0,4]}}"#,
            4,
        );
        let read = read(&path).unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read["w"].dims(), &[2, 2]);
    }
}
