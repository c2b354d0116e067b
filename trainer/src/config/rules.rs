//! The rules every section's validation is made of, the bounds on sizes, and the error that marks a configuration as invalid.
use anyhow::{bail, Result};

/// The most parameters a model may have: 2^48, far above any model that fits a cluster, and
/// far enough below i64's range that products of it (bytes, FLOPs per token) cannot overflow.
pub const MAX_PARAMS: i128 = 1 << 48;

/// The longest sequence a model may be configured for (16 Mi tokens).
pub const MAX_SEQ_LEN: i64 = 1 << 24;

/// The longest duration a setting may ask for (seconds); `Duration` cannot hold arbitrary f64s.
pub const MAX_SECONDS: f64 = 1e9;

/// An error that a restart cannot fix: the configuration is invalid (for this model, layout,
/// machine or run directory). The process exits with `launcher::protocol::INVALID_CONFIG`, so
/// the launcher and the Slurm script do not retry it; any other error may be transient.
/// Attached as the context of the error (`anyhow` finds it with `downcast_ref` at any depth).
#[derive(Debug)]
pub struct InvalidConfig(pub String);

impl std::fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid config {}", self.0)
    }
}

impl std::error::Error for InvalidConfig {}

impl InvalidConfig {
    /// Whether `error` (or any error it wraps) says the configuration is invalid.
    pub fn is_cause_of(error: &anyhow::Error) -> bool {
        error.downcast_ref::<InvalidConfig>().is_some()
    }
}

/// An invalid-config error with this message (it reads `invalid config MESSAGE`).
pub fn invalid_config(message: impl Into<String>) -> anyhow::Error {
    InvalidConfig(message.into()).into()
}

pub fn positive(key: &str, value: i64) -> Result<()> {
    if value <= 0 {
        bail!("{key} = {value} must be > 0");
    }
    Ok(())
}

pub fn non_negative(key: &str, value: i64) -> Result<()> {
    if value < 0 {
        bail!("{key} = {value} must be >= 0");
    }
    Ok(())
}

pub fn positive_f(key: &str, value: f64) -> Result<()> {
    if !(value > 0.0 && value.is_finite()) {
        bail!("{key} = {value} must be a positive number");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn an_invalid_config_is_found_under_any_context() {
        let error = invalid_config("train.steps = 2: too few").context("step 3").context("rank 1");
        assert!(InvalidConfig::is_cause_of(&error));
        assert!(format!("{error:#}").contains("invalid config train.steps = 2: too few"), "{error:#}");
        let wrapped = Err::<(), _>(std::io::Error::other("disk")).context(InvalidConfig("data.path".into()));
        assert!(InvalidConfig::is_cause_of(&wrapped.unwrap_err().context("outer")));
        assert!(!InvalidConfig::is_cause_of(&anyhow::anyhow!("invalid config in the text only")));
    }
}
