//! `instructd`: the operator CLI.
//!
//! Each subcommand lives in its own file under `cmd/`. This issue brings
//! `model` (fetch, import, create model directories), `generate` and `bench`;
//! the gateway and trainer add `serve` and `train`.

mod checkpoint_files;
mod cmd;
mod config;
mod log_format;
mod simulation;
mod telemetry;

use clap::{Parser, Subcommand};

// glibc malloc dominates small-tensor workloads; mimalloc was measured to
// matter here (see the README's figures).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// candle parallelises element-wise ops on a second pool of spinning threads,
/// which on a small machine fights the engine's compute pool (where the
/// matmuls and attention run) for the same cores: measured on 2 cores, decode
/// ran ~1.4x faster with that pool off. An explicit `CANDLE_NUM_THREADS` wins.
fn limit_candle_elementwise_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// A training step allocates and frees gigabytes of activations and gradients. By default mimalloc returns freed
/// memory to the OS after 10 ms, and every step then faults it back in, page by page, zeroed by the kernel: a
/// third of a SmolLM2 step's time went to `clear_page` (perf). The training commands keep it instead (their
/// resident size is their peak either way).
fn keep_freed_memory() {
    // Indices into mimalloc's `mi_option_e` (v3, pinned by Cargo.lock); the crate has no constants for these.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: plain setters of global options, called before the work starts.
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 1);
    }
}

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
    /// Quality of the BF16, Q8_0 and Q4_0 serving formats against F32: held-out NLL and greedy agreement.
    BenchQuality(cmd::bench_quality::BenchQualityArgs),
    /// Time the trainer's SFT step, reward-model step and PPO-ptx iteration on a model.
    BenchTrain(cmd::bench_train::BenchTrainArgs),
    /// Run the OpenAI-compatible gateway.
    Serve(cmd::serve::ServeArgs),
    /// Run the continuous trainer (ingestion, snapshots, SFT / RM / PPO-ptx refreshes, evaluation gate).
    Train(cmd::train::TrainArgs),
    /// Drive simulated playground users and labelers through the HTTP API, judging by a hidden preference.
    SimulateLabelers(cmd::simulate_labelers::SimulateLabelersArgs),
    /// Win rate of one checkpoint over another under a hidden preference, on held-out prompts, through the API.
    WinRate(cmd::win_rate::WinRateArgs),
}

impl Command {
    /// The configuration file named on the command line, for the commands that take one.
    fn config_path(&self) -> Option<&std::path::Path> {
        match self {
            Command::Serve(args) => args.config.as_deref(),
            Command::Train(args) => args.config.as_deref(),
            _ => None,
        }
    }
}

fn main() -> anyhow::Result<()> {
    limit_candle_elementwise_threads();
    let cli = Cli::parse();
    let _telemetry = telemetry::init(config::log_format(cli.command.config_path()))?;
    match cli.command {
        Command::Model(command) => cmd::model::run(command),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::BenchQuality(args) => cmd::bench_quality::run(args),
        Command::BenchTrain(args) => {
            keep_freed_memory();
            cmd::bench_train::run(args)
        }
        Command::Serve(args) => cmd::serve::run(args),
        Command::Train(args) => {
            keep_freed_memory();
            cmd::train::run(args)
        }
        Command::SimulateLabelers(args) => cmd::simulate_labelers::run(args),
        Command::WinRate(args) => cmd::win_rate::run(args),
    }
}
