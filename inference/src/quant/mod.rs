//! The formats projection weights are served in on the CPU, and the packing
//! from F32 into them.
//!
//! * `f32`: as trained; [`crate::cpu_linear`]'s kernel.
//! * `bf16`: weights rounded to bfloat16 (half the bytes per token), dotted
//!   with activations rounded to bfloat16 by AVX-512 BF16's `vdpbf16ps`
//!   (F32 accumulation), or, where AVX-512 BF16 is missing, by AVX2 FMA on
//!   the values widened to F32; see [`bf16`].
//! * `q8_0`: llama.cpp's Q8_0 scheme, int8 weights with one F32 scale per 32
//!   (a quarter of the bytes plus 1/8 for scales), dotted with activations
//!   quantized the same way per 32-block by AVX-512 VNNI's `vpdpbusd`, or
//!   AVX2's `vpmaddubsw` + `vpmaddwd` on CPUs without it; see [`q8_0`].
//! * `q4_0`: llama.cpp's Q4_0, 4-bit weights with one F16 scale per 32
//!   (4.5 bits per weight), dotted with int8 activations as Q8_0's are
//!   (VNNI, else AVX2); see [`q4_0`].
//!
//! All three interleave their weight rows 16 at a time (`panel`).
//!
//! A packed matrix travels in a candle [`Tensor`] so it can sit wherever a
//! weight does (`candle_nn::Linear`), as a `U8` tensor `[n, row_bytes(k)]`
//! of its format (BF16 `2 k` rounded up to whole words, Q8_0 `1.125 k`,
//! Q4_0 `0.5625 k`: different for every `k`), rows interleaved 16 at a
//! time ([`view_rows`]).
//! Only [`crate::cpu_linear`] reads them; candle's own ops refuse the U8
//! carrier (a dtype mismatch), so a packed weight cannot be misused silently.
//!
//! Checkpoints stay F32 or BF16 on disk; packing happens at load
//! ([`crate::llama::Llama::with_serve_dtype`]).

pub mod bf16;
mod int8;
mod panel;
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

/// The instruction set a format's product runs on. Each format picks the
/// best its CPU has ([`bf16::kernel`], [`q8_0::kernel`], [`q4_0::kernel`]);
/// tests run every one the CPU has against the portable loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust, the reference arithmetic; orders of magnitude slower.
    Portable,
    /// AVX2 + FMA + F16C (x86-64 from Haswell / Zen 1 on).
    Avx2,
    /// The format's AVX-512 kernel (BF16 or VNNI dot-product instructions).
    Avx512,
}

impl Kernel {
    /// Whether this CPU has AVX2, FMA and F16C (every AVX2 CPU has the other two).
    pub fn has_avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The kernels this CPU runs, given whether it has the format's AVX-512 one.
    pub fn available(avx512: bool) -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        if Self::has_avx2() {
            kernels.push(Kernel::Avx2);
        }
        if avx512 {
            kernels.push(Kernel::Avx512);
        }
        kernels
    }

    /// `self` if this CPU runs it (`avx512`: whether it has the format's
    /// AVX-512 kernel), else the best one below it that it does: products
    /// call `target_feature` functions only on what this returns.
    pub fn supported(self, avx512: bool) -> Kernel {
        let available = Self::available(avx512);
        let wanted: &[Kernel] = match self {
            Kernel::Avx512 => &[Kernel::Avx512, Kernel::Avx2],
            Kernel::Avx2 => &[Kernel::Avx2],
            Kernel::Portable => &[],
        };
        wanted.iter().copied().find(|k| available.contains(k)).unwrap_or(Kernel::Portable)
    }

    /// The fastest of [`Kernel::available`].
    pub fn best(avx512: bool) -> Kernel {
        if avx512 {
            Kernel::Avx512
        } else if Self::has_avx2() {
            Kernel::Avx2
        } else {
            Kernel::Portable
        }
    }
}

/// The kernel `dtype`'s products run on on this CPU (F32's own dispatch is
/// [`crate::simd`]'s; reported as AVX2 or better where the CPU has it).
pub fn kernel(dtype: ServeDtype) -> Kernel {
    match dtype {
        ServeDtype::F32 => Kernel::best(false),
        ServeDtype::Bf16 => bf16::kernel(),
        ServeDtype::Q8_0 => q8_0::kernel(),
        ServeDtype::Q4_0 => q4_0::kernel(),
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
    let values = || -> Result<Vec<f32>> { Ok(weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    let (bytes, row_bytes) = match dtype {
        ServeDtype::F32 => return Ok(weight.clone()),
        ServeDtype::Bf16 => (bf16::pack(&values()?, n, k), bf16::row_bytes(k)),
        ServeDtype::Q8_0 => (q8_0::pack(&values()?, n, k)?, q8_0::row_bytes(k)),
        ServeDtype::Q4_0 => (q4_0::pack(&values()?, n, k)?, q4_0::row_bytes(k)),
    };
    Ok(Tensor::from_vec(bytes, (n, row_bytes), &Device::Cpu)?)
}

/// The row ranges of a packed matrix that are packed matrices themselves
/// start and end on multiples of this (the packed formats interleave rows
/// in panels).
pub fn view_rows(dtype: ServeDtype) -> usize {
    match dtype {
        ServeDtype::Bf16 | ServeDtype::Q8_0 | ServeDtype::Q4_0 => panel::PANEL,
        ServeDtype::F32 => 1,
    }
}

/// The format a weight tensor carries for rows `k` long, when it is one of
/// the packed ones.
pub fn packed_dtype(weight: &Tensor, k: usize) -> Option<ServeDtype> {
    match (weight.dtype(), weight.dims2().ok()?) {
        (DType::U8, (_, cols)) if k > 0 && cols == bf16::row_bytes(k) => Some(ServeDtype::Bf16),
        (DType::U8, (_, cols)) if k.is_multiple_of(q8_0::BLOCK) && cols == q8_0::row_bytes(k) => Some(ServeDtype::Q8_0),
        (DType::U8, (_, cols)) if k.is_multiple_of(q8_0::BLOCK) && cols == q4_0::row_bytes(k) => Some(ServeDtype::Q4_0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever kernel is asked for, a product runs on one this CPU has (the
    /// `target_feature` calls stay sound), the asked one when it is there;
    /// each format runs on the best it has.
    #[test]
    fn a_kernel_the_cpu_lacks_falls_back_to_one_it_has() {
        let formats = [
            (ServeDtype::Bf16, bf16::has_simd()),
            (ServeDtype::Q8_0, q8_0::has_simd()),
            (ServeDtype::Q4_0, q4_0::has_simd()),
        ];
        for (dtype, avx512) in formats {
            let available = Kernel::available(avx512);
            for wanted in [Kernel::Portable, Kernel::Avx2, Kernel::Avx512] {
                let chosen = wanted.supported(avx512);
                assert!(available.contains(&chosen), "{dtype}: {wanted:?} ran as {chosen:?}, not in {available:?}");
                if available.contains(&wanted) {
                    assert_eq!(chosen, wanted, "{dtype}");
                }
            }
            assert_eq!(kernel(dtype), *available.last().expect("portable is always there"), "{dtype}");
        }
    }
}
