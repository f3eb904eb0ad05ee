//! The PyTorch training job of `deploy/trainer-job` for tests: which Python runs it, and the external
//! backend's command for it.

use std::path::PathBuf;

/// The Python with the job's packages (torch, transformers, accelerate): `INSTRUCTD_TRAINER_JOB_PYTHON` (the venv
/// `make test` builds from deploy/trainer-job/requirements.txt), else `python3` when it has them. `None` (the
/// test skips) without one, unless `INSTRUCTD_REQUIRE_TRAINER_JOB` is set (`make test` sets it): then a failure.
pub fn job_python() -> Option<PathBuf> {
    super::gateway::python_importing(
        "INSTRUCTD_TRAINER_JOB_PYTHON",
        std::env::var_os("INSTRUCTD_REQUIRE_TRAINER_JOB").is_some(),
        "torch, transformers, accelerate, safetensors",
        "the training job's packages (deploy/trainer-job/requirements.txt; `make trainer-job-venv`)",
    )
}

/// `deploy/trainer-job/train.py` in this checkout.
pub fn job_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/trainer-job/train.py")
}

/// `[trainer.backend] command` running the job with `python`, with extra `NAME=value` environment first.
pub fn job_command(python: &std::path::Path, env: &[(&str, &str)]) -> Vec<String> {
    let mut command = vec!["env".to_string(), "HF_HUB_OFFLINE=1".into(), "TRANSFORMERS_VERBOSITY=error".into()];
    command.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    command.push(python.display().to_string());
    command.push(job_script().display().to_string());
    command
}
