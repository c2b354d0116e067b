//! The held-out evaluations a training run repeats (`[eval]`, at every `train.eval_every` steps): its tasks read once at the start, scored on the current weights as `trainer eval` scores them.
use crate::config::{invalid_config, Config, EvalConfig};
use crate::engine::Engine;
use crate::runlog::EvalScores;
use crate::scoring::{choice_report, loss_report, read_choice_items, read_texts, text_documents, ChoiceItem, Document};
use anyhow::{Context, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// What one task scores.
enum Task {
    Choices(Vec<ChoiceItem>),
    Text(Vec<Document>),
}

/// The run's evaluation tasks with what scoring them needs.
pub struct HeldOut {
    tasks: Vec<(String, Task)>,
    tokenizer: Tokenizer,
    /// The token a document follows in the training data (its first token's context).
    prefix: i64,
    seq_len: usize,
}

impl HeldOut {
    /// Reads the tasks of `config.eval` (none: `None`) with the training data's tokenizer, so a
    /// bad task file fails the run before its first step.
    pub fn open(config: &Config, tokenizer_path: Option<&Path>) -> Result<Option<HeldOut>> {
        let e = &config.eval;
        if e.choices.is_empty() && e.texts.is_empty() {
            return Ok(None);
        }
        let tokenizer_path = tokenizer_path.ok_or_else(|| {
            invalid_config("eval: the dataset names no tokenizer, so the evaluation tasks cannot be tokenized")
        })?;
        let tokenizer = data_shards::load_tokenizer(tokenizer_path)?;
        let eos = data_shards::tokenize::DEFAULT_EOS;
        let prefix = tokenizer.token_to_id(eos).map(i64::from).ok_or_else(|| {
            invalid_config(format!(
                "eval: the tokenizer {} has no {eos:?} token to start documents with",
                tokenizer_path.display()
            ))
        })?;
        let mut tasks = Vec::new();
        for path in &e.choices {
            let items = read_choice_items(path).map_err(|e| invalid_config(format!("eval.choices: {e:#}")))?;
            tasks.push((EvalConfig::task_name(path), Task::Choices(items)));
        }
        for path in &e.texts {
            let documents = text_documents(&read_texts(path)?, &tokenizer, prefix)?;
            tasks.push((EvalConfig::task_name(path), Task::Text(documents)));
        }
        Ok(Some(HeldOut { tasks, tokenizer, prefix, seq_len: config.train.seq_len as usize }))
    }

    /// Every task's scores on the engine's current weights (on every rank; the data-parallel
    /// ranks share the sequences).
    pub fn evaluate(&self, engine: &Engine) -> Result<EvalScores> {
        self.tasks
            .iter()
            .map(|(name, task)| {
                let scores = match task {
                    Task::Choices(items) => {
                        choice_report(engine, items, &self.tokenizer, self.prefix, self.seq_len)?.scores()
                    }
                    Task::Text(documents) => loss_report(engine, documents, self.seq_len)?.scores(),
                };
                Ok((name.clone(), scores))
            })
            .collect::<Result<_>>()
            .context("evaluation ([eval]) failed")
    }
}
