//! The run configuration: one typed tree read from TOML with defaults, dotted overrides, and validation with errors that name key, value and rule.
mod from_hf;
mod model;
mod rules;
mod sections;
mod train;

pub use from_hf::{check_model_config, read_model_config};
pub use model::ModelConfig;
pub use rules::{invalid_config, InvalidConfig};
pub use sections::{CheckpointConfig, DataConfig, DataFormat, EvalConfig, MetricsConfig, OptimConfig, ParallelConfig};
pub use train::{Dtype, PreemptSignal, TrainConfig, TrainDevice};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A run's whole configuration. Only `[model]` and `data.path` are required; every other key
/// has a default (`trainer train --print-config` shows them all).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    #[serde(default)]
    pub parallel: ParallelConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub eval: EvalConfig,
}

impl Config {
    /// Reads a TOML file, applies `key.path=value` overrides, fills the defaults and validates
    /// the result. Every error is an [`InvalidConfig`]: running again cannot fix it.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))
            .context(InvalidConfig(format!("{}: cannot read it", path.display())))?;
        let name = path.file_stem().map(|stem| stem.to_string_lossy().into_owned());
        Self::parse_named(&text, overrides, name.as_deref()).context(InvalidConfig(path.display().to_string()))
    }

    /// Parses a configuration's text (the run directory defaults to `runs/run`).
    pub fn parse(text: &str, overrides: &[String]) -> Result<Config> {
        Self::parse_named(text, overrides, None)
    }

    /// Parses; `name` (the config file's stem) names the default run directory `runs/NAME`.
    fn parse_named(text: &str, overrides: &[String], name: Option<&str>) -> Result<Config> {
        let mut tree: toml::Table = toml::from_str(text).context("not valid TOML")?;
        for item in overrides {
            apply_override(&mut tree, item)?;
        }
        fill_model_from_hf(&mut tree)?;
        fill_derived_defaults(&mut tree, name);
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|e| anyhow::anyhow!("key `{}`: {}", e.path(), e.inner()))?;
        config.resolve_global_batch_tokens()?;
        config.validate()?;
        Ok(config)
    }

    /// Turns `train.global_batch_tokens` into `train.global_batch` (sequences).
    fn resolve_global_batch_tokens(&mut self) -> Result<()> {
        let t = &mut self.train;
        match t.global_batch_tokens.take() {
            Some(_) if t.global_batch != 0 => {
                bail!("set train.global_batch (sequences) or train.global_batch_tokens, not both")
            }
            Some(tokens) if t.seq_len <= 0 || tokens <= 0 || tokens % t.seq_len != 0 => {
                bail!(
                    "train.global_batch_tokens = {tokens} must be a positive multiple of train.seq_len = {}",
                    t.seq_len
                )
            }
            Some(tokens) => t.global_batch = tokens / t.seq_len,
            None => {}
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serializes")
    }

    /// Where checkpoints go.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoint.dir.clone().unwrap_or_else(|| self.train.run_dir.join("checkpoints"))
    }

    /// Data-parallel degree for a world of `world` ranks.
    pub fn data_parallel(&self, world: i64) -> i64 {
        world / self.parallel.tensor
    }

    /// Micro-batches accumulated per step on each rank.
    pub fn accumulation_steps(&self, world: i64) -> i64 {
        self.train.global_batch / (self.train.micro_batch * self.data_parallel(world))
    }

    /// Checks every rule that does not depend on the data or the world size.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.parallel.validate()?;
        self.train.validate(self.model.max_seq_len)?;
        self.checkpoint.validate()?;
        self.metrics.validate()?;
        self.eval.validate(self.train.eval_every)?;
        self.optim.validate()
    }

    /// This configuration for a world of `world` ranks: an absent global batch becomes one
    /// micro-batch per data-parallel rank, and the rules that need the world size are checked.
    pub fn for_world(&self, world: i64) -> Result<Config> {
        let mut config = self.clone();
        let tp = config.parallel.tensor;
        if world % tp != 0 {
            bail!("world size {world} is not divisible by parallel.tensor = {tp}");
        }
        config.model.check_tensor_split(tp)?;
        let dp = config.data_parallel(world);
        let t = &mut config.train;
        if t.global_batch == 0 {
            t.global_batch = t.micro_batch * dp;
        }
        if t.eval_every > 0 && t.eval_sequences % dp != 0 {
            bail!("train.eval_sequences = {} must be a multiple of the {dp} data-parallel ranks", t.eval_sequences);
        }
        let per_step = t.micro_batch * dp;
        if t.global_batch % per_step != 0 {
            bail!(
                "train.global_batch = {} must be a multiple of train.micro_batch x data-parallel ranks = {} x {dp}",
                t.global_batch,
                t.micro_batch
            );
        }
        Ok(config)
    }
}

/// A run that starts from a Hugging Face model (`checkpoint.init_from_hf`) takes the keys of
/// `[model]` it does not set from the model's `config.json` (only read when a shape key is
/// missing: a resolved config never reads it again); the keys it does set are checked against
/// `config.json` when the weights are loaded.
fn fill_model_from_hf(tree: &mut toml::Table) -> Result<()> {
    const SHAPE: [&str; 6] = ["dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_seq_len"];
    let source = tree.get("checkpoint").and_then(|c| c.get("init_from_hf")).and_then(toml::Value::as_str);
    let Some(dir) = source.map(PathBuf::from) else { return Ok(()) };
    let model = tree.entry("model").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(model) = model.as_table_mut().filter(|m| SHAPE.iter().any(|key| !m.contains_key(*key))) else {
        return Ok(());
    };
    let from_hf = read_model_config(&dir).context("checkpoint.init_from_hf")?;
    let toml::Value::Table(from_hf) = toml::Value::try_from(from_hf).context("a model section serializes")? else {
        bail!("a model section serializes to a table");
    };
    for (key, value) in from_hf {
        model.entry(key).or_insert(value);
    }
    Ok(())
}

/// Fills the defaults that follow from other keys into the TOML tree, before it is typed:
/// `train.seq_len` from `model.max_seq_len`, `optim.min_lr` from `optim.lr` (a tenth) and
/// `train.run_dir` from the config file's name.
fn fill_derived_defaults(tree: &mut toml::Table, name: Option<&str>) {
    let max_seq_len = tree.get("model").and_then(|m| m.get("max_seq_len")).cloned();
    let lr = tree.get("optim").and_then(|o| o.get("lr")).and_then(toml::Value::as_float);
    let run_dir = format!("runs/{}", name.unwrap_or("run"));
    let train = tree.entry("train").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let Some(train) = train.as_table_mut() {
        if let Some(max_seq_len) = max_seq_len {
            train.entry("seq_len").or_insert(max_seq_len);
        }
        train.entry("run_dir").or_insert(toml::Value::String(run_dir));
    }
    if let Some(lr) = lr {
        if let Some(optim) = tree.get_mut("optim").and_then(toml::Value::as_table_mut) {
            optim.entry("min_lr").or_insert(toml::Value::Float(lr / 10.0));
        }
    }
}

/// Sets `a.b.c = value` in the TOML tree; the value is read as TOML (so `3`, `1e-3`,
/// `true`, `"x"`, `[1, 2]` keep their types) or, failing that, as a bare string.
fn apply_override(tree: &mut toml::Table, item: &str) -> Result<()> {
    let (key, raw) =
        item.split_once('=').with_context(|| format!("override {item:?} must look like section.key=value"))?;
    let key = key.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts: Vec<&str> = key.split('.').collect();
    let leaf = parts.pop().filter(|l| !l.is_empty()).with_context(|| format!("override {item:?} has an empty key"))?;
    let mut table = tree;
    for part in parts {
        table = table
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("override {item:?}: `{part}` is not a section"))?;
    }
    table.insert(leaf.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA_7B: &str = include_str!("../../../configs/llama-7b.toml");
    const TINY: &str = include_str!("../../../configs/tiny.toml");

    fn error_of(text: &str, overrides: &[&str]) -> String {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        format!("{:#}", Config::parse(text, &overrides).unwrap_err())
    }

    #[test]
    fn llama_7b_has_llama2_parameter_count() {
        let config = Config::parse(LLAMA_7B, &[]).unwrap();
        assert_eq!(config.model.num_params(), 6_738_415_616);
    }

    #[test]
    fn overrides_keep_types_and_reach_nested_keys() {
        let overrides = ["train.steps=7".to_string(), "optim.lr=1e-3".to_string(), "data.path=/x y".to_string()];
        let config = Config::parse(TINY, &overrides).unwrap();
        assert_eq!(config.train.steps, 7);
        assert_eq!(config.optim.lr, 1e-3);
        assert_eq!(config.data.path, PathBuf::from("/x y"));
    }

    #[test]
    fn the_global_batch_can_be_given_in_tokens() {
        let overrides = ["train.global_batch=0".to_string(), "train.global_batch_tokens=4096".to_string()];
        let config = Config::parse(TINY, &overrides).unwrap();
        assert_eq!(config.train.global_batch, 4096 / config.train.seq_len);
        let error = error_of(TINY, &["train.global_batch_tokens=4096"]);
        assert!(error.contains("not both"), "{error}");
        let error = error_of(TINY, &["train.global_batch=0", "train.global_batch_tokens=100"]);
        assert!(error.contains("train.global_batch_tokens = 100 must be a positive multiple of train.seq_len = 128"));
    }

    #[test]
    fn resolved_config_round_trips() {
        let config = Config::parse(TINY, &[]).unwrap();
        assert_eq!(Config::parse(&config.to_toml(), &[]).unwrap(), config);
    }

    #[test]
    fn bad_configs_name_key_value_and_rule() {
        let cases: &[(&[&str], &str)] = &[
            (&["train.bogus=1"], "unknown field `bogus`"),
            (&["train.steps=\"many\""], "key `train.steps`: invalid type: string \"many\""),
            (&["model.n_heads=7"], "model.n_heads = 7 must divide model.dim = 256"),
            (&["optim.lr=-0.1"], "optim.lr = -0.1 must be a positive number"),
            (&["train.steps=0"], "train.steps = 0 must be > 0"),
            (&["model.n_kv_heads=3"], "model.n_kv_heads = 3 must divide model.n_heads = 8"),
            (&["train.seq_len=4096"], "train.seq_len = 4096 exceeds model.max_seq_len"),
            (&["train.global_batch=10", "train.micro_batch=4"], "must be a multiple of train.micro_batch = 4"),
            (&["optim.min_lr=1.0"], "optim.min_lr = 1 must be between 0 and optim.lr"),
        ];
        for (overrides, expected) in cases {
            let error = error_of(TINY, overrides);
            assert!(error.contains(expected), "{overrides:?}: got {error:?}, want {expected:?}");
        }
        assert!(error_of("model = [", &[]).contains("not valid TOML"));
    }

    #[test]
    fn layouts_are_checked_against_the_shape() {
        let config = Config::parse(TINY, &["parallel.tensor=3".into()]).unwrap();
        let error = format!("{:#}", config.for_world(6).unwrap_err());
        assert!(error.contains("parallel.tensor = 3 must divide model.n_heads = 8"), "{error}");
        let config = Config::parse(TINY, &["parallel.tensor=4".into()]).unwrap();
        let error = format!("{:#}", config.for_world(6).unwrap_err());
        assert!(error.contains("world size 6 is not divisible by parallel.tensor = 4"), "{error}");
    }

    #[test]
    fn a_model_and_a_data_path_are_enough() {
        let text = "[model]\ndim = 64\nn_layers = 2\nn_heads = 4\nffn_dim = 128\nvocab_size = 256\n\
                    max_seq_len = 32\n[data]\npath = \"d\"\n[optim]\nlr = 1e-3\n";
        let config = Config::parse_named(text, &[], Some("small")).unwrap();
        assert_eq!(config.train.seq_len, 32, "train.seq_len defaults to model.max_seq_len");
        assert_eq!(config.optim.min_lr, 1e-4, "optim.min_lr defaults to a tenth of optim.lr");
        assert_eq!(config.train.run_dir, PathBuf::from("runs/small"), "named after the config file");
        assert_eq!(config.train.device, TrainDevice::Cpu);
        assert_eq!(config.train.global_batch, 0, "unset until the world is known");
        let four_ranks = config.for_world(4).unwrap();
        assert_eq!(four_ranks.train.global_batch, 4, "one micro-batch per data-parallel rank");
        assert_eq!(Config::parse(&four_ranks.to_toml(), &[]).unwrap(), four_ranks, "the resolved form reads back");
        let error = format!("{:#}", Config::parse(text, &["train.device=\"gpu\"".into()]).unwrap_err());
        assert!(error.contains("train.device = \"gpu\" must be \"cpu\", \"cuda\" or \"cuda:N\""), "{error}");
        let error = format!("{:#}", Config::parse(text, &["train.preempt_signals=[\"SIGKILL\"]".into()]).unwrap_err());
        assert!(error.contains("unknown variant `SIGKILL`, expected one of `SIGTERM`"), "{error}");
        let error = format!("{:#}", Config::parse("[model]\ndim = 64\n", &[]).unwrap_err());
        assert!(error.contains("missing field"), "{error}");
    }

    #[test]
    fn a_config_file_that_cannot_be_read_or_parsed_is_an_invalid_config() {
        let missing = Config::load(Path::new("/nonexistent/a.toml"), &[]).unwrap_err();
        assert!(InvalidConfig::is_cause_of(&missing), "{missing:#}");
        assert!(format!("{missing:#}").contains("cannot read config file /nonexistent/a.toml"), "{missing:#}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, TINY).unwrap();
        let bad = Config::load(&path, &["model.n_heads=7".into()]).unwrap_err();
        assert!(InvalidConfig::is_cause_of(&bad));
        assert!(format!("{bad:#}").contains("model.n_heads = 7 must divide model.dim = 256"), "{bad:#}");
    }
}
