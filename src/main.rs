//! `instructd`: the operator CLI.
//!
//! Each subcommand lives in its own file under `cmd/`. This issue brings
//! `model` (fetch, import, create model directories), `generate` and `bench`;
//! the gateway and trainer add `serve` and `train`.

mod cmd;

use clap::{Parser, Subcommand};

// glibc malloc dominates small-tensor workloads; mimalloc was measured to
// matter here (see the README's figures).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "instructd",
    version,
    about = "Serve, collect feedback for, and continuously retrain an instruction-following model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Obtain, import and create model directories.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// Generate text from a prompt (or interactively from stdin).
    Generate(cmd::generate::GenerateArgs),
    /// Measure prefill, decode and latency of the engine on a model.
    Bench(cmd::bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("INSTRUCTD_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Model(command) => cmd::model::run(command),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Bench(args) => cmd::bench::run(args),
    }
}
