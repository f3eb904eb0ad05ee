//! The formats projection weights are served in on the CPU, and the packing
//! from F32 into them.
//!
//! * `f32`: as trained; [`crate::cpu_linear`]'s kernel.
//! * `bf16`: weights rounded to bfloat16 (half the bytes per token), dotted
//!   with activations rounded to bfloat16 by AVX-512 BF16's `vdpbf16ps`
//!   (F32 accumulation); see [`bf16`].
//! * `q8_0`: llama.cpp's Q8_0 scheme, int8 weights with one F32 scale per 32
//!   (a quarter of the bytes plus 1/8 for scales), dotted with activations
//!   quantized the same way per 32-block by AVX-512 VNNI's `vpdpbusd`; see
//!   [`q8_0`].
//! * `q4_0`: llama.cpp's Q4_0, 4-bit weights with one F16 scale per 32
//!   (4.5 bits per weight), dotted with int8 activations as Q8_0's are; see
//!   [`q4_0`]. Both integer formats lay their blocks out across the
//!   vector lanes as `lanes` describes.
//!
//! A packed matrix travels in a candle [`Tensor`] so it can sit wherever a
//! weight does (`candle_nn::Linear`): BF16 as a `BF16` tensor `[n, k]`,
//! Q8_0 as a `U8` tensor `[n, q8_0::row_bytes(k)]` in [`q8_0`]'s layout,
//! Q4_0 as a `U8` tensor `[n, q4_0::row_bytes(k)]` (the widths differ for
//! every `k`: `1.25 k` against `0.5625 k`).
//! Only [`crate::cpu_linear`] reads them; candle's own ops refuse the U8
//! carrier (a dtype mismatch), so a packed weight cannot be misused silently.
//!
//! Checkpoints stay F32 or BF16 on disk; packing happens at load
//! ([`crate::llama::Llama::with_serve_dtype`]).

pub mod bf16;
mod lanes;
pub mod q4_0;
pub mod q8_0;
#[cfg(test)]
mod test_data;

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `[model] serve_dtype`: the format of the projection weights while serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ServeDtype {
    #[default]
    #[serde(rename = "f32")]
    F32,
    #[serde(rename = "bf16")]
    Bf16,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl ServeDtype {
    pub const ALL: [ServeDtype; 4] = [ServeDtype::F32, ServeDtype::Bf16, ServeDtype::Q8_0, ServeDtype::Q4_0];

    pub fn as_str(self) -> &'static str {
        match self {
            ServeDtype::F32 => "f32",
            ServeDtype::Bf16 => "bf16",
            ServeDtype::Q8_0 => "q8_0",
            ServeDtype::Q4_0 => "q4_0",
        }
    }
}

impl fmt::Display for ServeDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServeDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown serve dtype {s:?}: expected f32, bf16, q8_0 or q4_0"))
    }
}

/// `weight` `[n, k]` (F32, on the CPU) in `dtype`'s carrier (see the module
/// docs); F32 gives the weight back as it is.
pub fn pack(weight: &Tensor, dtype: ServeDtype) -> Result<Tensor> {
    if !matches!(weight.device(), Device::Cpu) {
        return Err(Error::ServeDtype {
            dtype: dtype.as_str(),
            message: "weights are packed in CPU memory only".into(),
        });
    }
    let (n, k) = weight.dims2()?;
    match dtype {
        ServeDtype::F32 => Ok(weight.clone()),
        ServeDtype::Bf16 => Ok(weight.to_dtype(DType::BF16)?.contiguous()?),
        ServeDtype::Q8_0 => {
            let values = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let bytes = q8_0::pack(&values, n, k)?;
            Ok(Tensor::from_vec(bytes, (n, q8_0::row_bytes(k)), &Device::Cpu)?)
        }
        ServeDtype::Q4_0 => {
            let values = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let bytes = q4_0::pack(&values, n, k)?;
            Ok(Tensor::from_vec(bytes, (n, q4_0::row_bytes(k)), &Device::Cpu)?)
        }
    }
}

/// The format a weight tensor carries for rows `k` long, when it is one of
/// the packed ones.
pub fn packed_dtype(weight: &Tensor, k: usize) -> Option<ServeDtype> {
    match (weight.dtype(), weight.dims2().ok()?) {
        (DType::BF16, (_, cols)) if cols == k => Some(ServeDtype::Bf16),
        (DType::U8, (_, cols)) if k.is_multiple_of(q8_0::BLOCK) && cols == q8_0::row_bytes(k) => Some(ServeDtype::Q8_0),
        (DType::U8, (_, cols)) if k.is_multiple_of(q8_0::BLOCK) && cols == q4_0::row_bytes(k) => Some(ServeDtype::Q4_0),
        _ => None,
    }
}
