//! The one configuration of every instructd process: a TOML file
//! (`configs/default.toml` unless `--config` or `INSTRUCTD_CONFIG` names
//! another) with environment overrides on top.
//!
//! Overrides: the documented shortcuts (`INSTRUCTD_ADDR`, `INSTRUCTD_REDIS_URL`,
//! `INSTRUCTD_ADMIN_KEY`, `INSTRUCTD_MODEL`, `INSTRUCTD_REDIS_PASSWORD`, `INSTRUCTD_LOG_FORMAT`) and, for any field,
//! `INSTRUCTD__SECTION__FIELD=value` (the value is read as TOML, else as a string).
//! Each crate owns the typed struct of its section; this file only composes them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "configs/default.toml";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub redis: RedisConfig,
    pub model: ModelConfig,
    pub engine: inference::engine::EngineConfig,
    pub gateway: gateway::GatewayConfig,
    pub trainer: trainer::TrainerConfig,
    pub log: LogConfig,
}

/// `[log]`: how every process writes its log lines.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (coloured only on a terminal) or `json` (one object per line, with request and trace ids).
    pub format: crate::log_format::LogFormat,
}

/// The log format before logging starts: the configuration's (file and environment), or only
/// `INSTRUCTD_LOG_FORMAT` when the file cannot be read (the command reports that itself).
pub fn log_format(path: Option<&Path>) -> crate::log_format::LogFormat {
    Config::load(path).map(|c| c.log.format).unwrap_or_else(|_| {
        let env = std::env::var("INSTRUCTD_LOG_FORMAT").unwrap_or_default();
        if env.eq_ignore_ascii_case("json") { crate::log_format::LogFormat::Json } else { Default::default() }
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`, or `rediss://` for TLS; a password may be part of it.
    pub url: String,
    /// The password (`INSTRUCTD_REDIS_PASSWORD`, e.g. from a Secret), kept out of the URL in files; after loading,
    /// `url` carries it.
    pub password: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { url: "redis://127.0.0.1:6379".into(), password: String::new() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// The serving model directory (Hugging Face layout).
    pub dir: PathBuf,
    pub dtype: String,
    /// The format the projection weights are served in on the CPU (`f32`, `bf16`, `q8_0` or `q4_0`), converted at load
    /// from the checkpoint's F32 or BF16; hot-swapped checkpoints are converted the same way.
    pub serve_dtype: inference::quant::ServeDtype,
    /// The model id clients send; the directory name when absent.
    pub name: Option<String>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dir: "models/smollm2-135m-instruct".into(),
            dtype: "f32".into(),
            serve_dtype: Default::default(),
            name: None,
        }
    }
}

/// Environment shortcuts and the config path each one sets.
const SHORTCUTS: &[(&str, &[&str])] = &[
    ("INSTRUCTD_ADDR", &["gateway", "addr"]),
    ("INSTRUCTD_REDIS_URL", &["redis", "url"]),
    ("INSTRUCTD_REDIS_PASSWORD", &["redis", "password"]),
    ("INSTRUCTD_ADMIN_KEY", &["gateway", "admin_key"]),
    ("INSTRUCTD_MODEL", &["model", "dir"]),
    ("INSTRUCTD_LOG_FORMAT", &["log", "format"]),
];

impl Config {
    /// Reads `path` (or the default file when it exists), then the environment.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let env_path = std::env::var_os("INSTRUCTD_CONFIG").map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(env_path);
        let mut table = match &path {
            Some(path) => read_table(path)?,
            None if Path::new(DEFAULT_CONFIG).exists() => read_table(Path::new(DEFAULT_CONFIG))?,
            None => toml::Table::new(),
        };
        apply_env(&mut table, std::env::vars())?;
        let source = path.as_deref().unwrap_or(Path::new(DEFAULT_CONFIG)).display().to_string();
        let mut config = Config::deserialize(toml::Value::Table(table))
            .with_context(|| format!("invalid configuration ({source})"))?;
        config.redis.url = feedback::redis_link::with_password(&config.redis.url, &config.redis.password);
        Ok(config)
    }
}

fn read_table(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.parse::<toml::Table>().with_context(|| format!("parsing {}", path.display()))
}

fn apply_env(table: &mut toml::Table, vars: impl Iterator<Item = (String, String)>) -> anyhow::Result<()> {
    for (name, value) in vars {
        let path: Vec<String> = if let Some((_, path)) = SHORTCUTS.iter().find(|(n, _)| *n == name) {
            path.iter().map(|s| s.to_string()).collect()
        } else if let Some(rest) = name.strip_prefix("INSTRUCTD__") {
            rest.split("__").map(|s| s.to_ascii_lowercase()).collect()
        } else {
            continue;
        };
        set(table, &path, parse_value(&value)).with_context(|| format!("applying {name}"))?;
    }
    Ok(())
}

fn parse_value(text: &str) -> toml::Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn set(table: &mut toml::Table, path: &[String], value: toml::Value) -> anyhow::Result<()> {
    let (last, parents) = path.split_last().context("empty override path")?;
    let mut current = table;
    for part in parents {
        let entry = current.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().with_context(|| format!("{part} is not a section"))?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        let mut table = text.parse::<toml::Table>()?;
        apply_env(&mut table, vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))?;
        Ok(Config::deserialize(toml::Value::Table(table))?)
    }

    #[test]
    fn shipped_default_config_parses() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/default.toml")).unwrap();
        load(&text, &[]).unwrap();
    }

    #[test]
    fn env_overrides_file() {
        let config = load(
            "[gateway]\naddr = \"0.0.0.0:1\"\n[gateway.default_limits]\nrequests_per_minute = 1\ntokens_per_minute = 2\nmax_concurrent = 3\n",
            &[
                ("INSTRUCTD_ADDR", "127.0.0.1:9999"),
                ("INSTRUCTD__ENGINE__MAX_RUNNING", "7"),
                ("INSTRUCTD__GATEWAY__DEFAULT_LIMITS__REQUESTS_PER_MINUTE", "5"),
                ("INSTRUCTD_REDIS_URL", "redis://127.0.0.1:7000"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(config.gateway.addr, "127.0.0.1:9999");
        assert_eq!(config.engine.max_running, 7);
        assert_eq!(config.gateway.default_limits.requests_per_minute, 5);
        assert_eq!(config.redis.url, "redis://127.0.0.1:7000");
    }

    #[test]
    fn serve_dtype_comes_from_file_or_environment() {
        use inference::quant::ServeDtype;
        assert_eq!(load("", &[]).unwrap().model.serve_dtype, ServeDtype::F32);
        assert_eq!(load("[model]\nserve_dtype = \"bf16\"\n", &[]).unwrap().model.serve_dtype, ServeDtype::Bf16);
        let env = load("[model]\nserve_dtype = \"bf16\"\n", &[("INSTRUCTD__MODEL__SERVE_DTYPE", "q8_0")]).unwrap();
        assert_eq!(env.model.serve_dtype, ServeDtype::Q8_0);
        let env = load("", &[("INSTRUCTD__MODEL__SERVE_DTYPE", "q4_0")]).unwrap();
        assert_eq!(env.model.serve_dtype, ServeDtype::Q4_0);
        assert_eq!(load("[model]\nserve_dtype = \"q4_0\"\n", &[]).unwrap().model.serve_dtype, ServeDtype::Q4_0);
        assert!(load("[model]\nserve_dtype = \"q4\"\n", &[]).is_err());
    }

    #[test]
    fn kv_dtype_comes_from_file_or_environment() {
        use inference::kv_pool::KvDtype;
        assert_eq!(load("", &[]).unwrap().engine.kv_dtype, KvDtype::F32);
        assert_eq!(load("[engine]\nkv_dtype = \"f16\"\n", &[]).unwrap().engine.kv_dtype, KvDtype::F16);
        let env = load("[engine]\nkv_dtype = \"f16\"\n", &[("INSTRUCTD__ENGINE__KV_DTYPE", "f32")]).unwrap();
        assert_eq!(env.engine.kv_dtype, KvDtype::F32);
        assert_eq!(load("", &[("INSTRUCTD__ENGINE__KV_DTYPE", "f16")]).unwrap().engine.kv_dtype, KvDtype::F16);
        assert!(load("[engine]\nkv_dtype = \"bf16\"\n", &[]).is_err());
    }

    #[test]
    fn reward_model_margin_comes_from_file_or_environment() {
        assert_eq!(load("", &[]).unwrap().trainer.reward_model.margin_per_rank, 0.0);
        let text = "[trainer.reward_model]\nmargin_per_rank = 0.25\n";
        assert_eq!(load(text, &[]).unwrap().trainer.reward_model.margin_per_rank, 0.25);
        for (value, want) in [("0.5", 0.5), ("1", 1.0)] {
            let env = load(text, &[("INSTRUCTD__TRAINER__REWARD_MODEL__MARGIN_PER_RANK", value)]).unwrap();
            assert_eq!(env.trainer.reward_model.margin_per_rank, want);
        }
    }

    #[test]
    fn unknown_fields_are_errors() {
        assert!(load("[gateway]\nadress = \"x\"\n", &[]).is_err());
        assert!(load("", &[("INSTRUCTD__GATEWAY__NOPE", "1")]).is_err());
    }
}
