//! The plan as text: one layout's breakdown side by side with and without recomputation (`trainer plan`), and the search over layouts that fit on given GPUs.
use super::{plan, Layout, Plan, Target, ALLOCATOR_SLACK};
use crate::config::Config;
use crate::params::master_kind;
use anyhow::{bail, Result};
use std::fmt::Write;
use tch::Kind;

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// What the model is and how it is trained, for the head of a report.
fn describe_run(config: &Config, target: Target) -> String {
    let (m, t) = (&config.model, &config.train);
    let kind = t.dtype.kind();
    format!(
        "model: {} parameters (dim {}, {} layers, {} heads / {} KV heads, FFN {}, vocabulary {})\n\
         training: {} weights, {} gradients and optimizer on {}; {} tokens per sequence, {} sequences per step",
        group_thousands(m.num_params() as u64),
        m.dim,
        m.n_layers,
        m.n_heads,
        m.kv_heads(),
        m.ffn_dim,
        m.vocab_size,
        dtype_name(kind),
        dtype_name(master_kind(kind)),
        match target {
            Target::Cpu => "CPU",
            Target::Cuda => "CUDA",
        },
        t.seq_len,
        if t.global_batch > 0 { t.global_batch.to_string() } else { "micro-batch x data-parallel".into() },
    )
}

/// A table with one column per plan: terms in a unit, and words.
struct Table<'a> {
    plans: &'a [Plan; 2],
    unit: f64,
    rows: Vec<(String, [String; 2])>,
}

impl Table<'_> {
    /// A row of bytes, left out when the term is zero in every plan.
    fn term(&mut self, label: impl Into<String>, bytes: fn(&Plan) -> u64) {
        if self.plans.iter().any(|p| bytes(p) > 0) {
            self.sum(label, bytes);
        }
    }

    /// A row of bytes, always shown.
    fn sum(&mut self, label: impl Into<String>, bytes: fn(&Plan) -> u64) {
        let cells = self.plans.each_ref().map(|p| format!("{:.2}", bytes(p) as f64 / self.unit));
        self.rows.push((label.into(), cells));
    }

    fn text(&mut self, label: impl Into<String>, text: fn(&Plan) -> String) {
        self.rows.push((label.into(), self.plans.each_ref().map(text)));
    }

    fn render(&self, out: &mut String, header: [&str; 3]) -> std::fmt::Result {
        let width = self.rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0).max(header[0].len());
        let cells = self.rows.iter().flat_map(|(_, cells)| cells.iter().map(String::as_str));
        let column = cells.chain(header[1..].iter().copied()).map(str::len).max().unwrap_or(0);
        writeln!(out, "{:width$}  {:>column$}  {:>column$}", header[0], header[1], header[2])?;
        for (label, cells) in &self.rows {
            writeln!(out, "{label:width$}  {:>column$}  {:>column$}", cells[0], cells[1])?;
        }
        Ok(())
    }
}

/// The breakdown of one layout, with and without recomputation side by side.
pub fn report(config: &Config, world: i64, target: Target) -> Result<String> {
    let layout = Layout::of(config, world)?;
    let config = &config.for_world(world)?;
    let plans = [false, true].map(|recompute| plan(config, Layout { recompute, ..layout }, target));
    let (unit, unit_name) = if plans[0].total() as f64 >= GIB { (GIB, "GiB") } else { (MIB, "MiB") };
    let kind = config.train.dtype.kind();
    let (compute, master) = (dtype_name(kind), dtype_name(master_kind(kind)));
    let shard = if layout.zero { format!(", ZeRO 1/{}", layout.data) } else { String::new() };
    let groups: Vec<&str> = [("tensor", layout.tensor), ("data", layout.data)]
        .into_iter()
        .filter_map(|(group, size)| (size > 1).then_some(group))
        .collect();
    let plural = if groups.len() > 1 { "s" } else { "" };

    let mut table = Table { plans: &plans, unit, rows: Vec::new() };
    table.term(format!("weights ({compute})"), |p| p.weights);
    table.term(format!("gradients ({master})"), |p| p.gradients);
    table.term(format!("gradient shard ({master}{shard})"), |p| p.gradient_shard);
    table.term(format!("master weights ({master}{shard})"), |p| p.master_weights);
    table.term(format!("AdamW exp_avg, exp_avg_sq ({master}{shard})"), |p| p.optimizer_state);
    table.text("backward pass at its peak:", |p| p.backward.stage.to_string());
    table.sum("  activations kept for backward", |p| p.backward.activations);
    table.sum("  logits and cross-entropy", |p| p.backward.logits);
    table.sum("  backward transient", |p| p.backward.transient);
    table.sum("optimizer step temporaries", |p| p.optimizer_step);
    table.sum("= tensors at peak", Plan::tensors);
    table.text("  during", peak_stage);
    table.term(format!("allocator slack ({:.0}%, estimate)", ALLOCATOR_SLACK * 100.0), Plan::slack);
    table.term(format!("NCCL buffers ({} group{plural}, estimate)", groups.join(" and ")), |p| p.communication);
    table.term("CUDA context and libraries", |p| p.runtime);
    table.sum("= total per rank", Plan::total);

    let mut out = String::new();
    writeln!(out, "{}", describe_run(config, target))?;
    writeln!(
        out,
        "layout: {world} rank{} = tensor {} x data {}, ZeRO-1 {}; micro-batch size {}, {} micro-batches per step; \
         {} elements per rank in the flat buffers",
        if world == 1 { "" } else { "s" },
        layout.tensor,
        layout.data,
        if layout.zero { "on" } else { "off" },
        layout.micro_batch,
        config.accumulation_steps(world),
        group_thousands(plans[0].flat_numel),
    )?;
    writeln!(out)?;
    let [off, on] = [false, true].map(|recompute| if recompute == layout.recompute { "*" } else { " " });
    table.render(&mut out, [unit_name, &format!("recompute off{off}"), &format!("recompute on{on}")])?;
    writeln!(out, "* as configured (train.recompute)")?;
    Ok(out)
}

/// When a plan's tensors peak: in the optimizer step, or in a stage of the backward pass.
fn peak_stage(plan: &Plan) -> String {
    if plan.optimizer_step > plan.backward.total() {
        "optimizer step".into()
    } else {
        format!("{} backward", plan.backward.stage)
    }
}

/// Micro-batch sizes the search tries.
const MICRO_BATCHES: [i64; 6] = [1, 2, 4, 8, 16, 32];

/// The layouts of `gpus` GPUs of `memory_gib` each, one row per tensor-parallel degree the model
/// can be split into and recomputation setting, one column per micro-batch size: the total per
/// rank where it fits.
pub fn search(config: &Config, gpus: i64, memory_gib: f64) -> Result<String> {
    if !(memory_gib > 0.0 && memory_gib.is_finite()) {
        bail!("--gpu-memory-gib = {memory_gib} must be a positive number");
    }
    let capacity = (memory_gib * GIB) as u64;
    let mut out = String::new();
    writeln!(out, "{}", describe_run(config, Target::Cuda))?;
    writeln!(
        out,
        "{gpus} GPUs of {memory_gib} GiB, ZeRO-1 {}: total GiB per rank by micro-batch size \
         ('-': does not fit; 'n/a': train.global_batch is no multiple of micro-batch x data)",
        if config.parallel.zero { "on" } else { "off" }
    )?;
    writeln!(out)?;
    write!(out, "tensor  data  recompute")?;
    for micro_batch in MICRO_BATCHES {
        write!(out, "  {:>7}", format!("mb {micro_batch}"))?;
    }
    writeln!(out)?;
    let (mut fitting, mut valid) = (0, 0);
    for tensor in (1..=gpus).filter(|tp| gpus % tp == 0 && config.model.check_tensor_split(*tp).is_ok()) {
        for recompute in [false, true] {
            write!(out, "{tensor:>6}  {:>4}  {:>9}", gpus / tensor, if recompute { "on" } else { "off" })?;
            for micro_batch in MICRO_BATCHES {
                let total = total_per_rank(config, gpus, tensor, recompute, micro_batch);
                valid += usize::from(total.is_some());
                fitting += usize::from(total.is_some_and(|total| total <= capacity));
                let cell = match total {
                    None => "n/a".to_string(),
                    Some(total) if total > capacity => "-".to_string(),
                    Some(total) => format!("{:.1}", total as f64 / GIB),
                };
                write!(out, "  {cell:>7}")?;
            }
            writeln!(out)?;
        }
    }
    writeln!(out)?;
    writeln!(out, "{fitting} of {valid} layouts fit. The breakdown of one:")?;
    writeln!(
        out,
        "  trainer plan --config CONFIG --world {gpus} --set parallel.tensor=T --set train.micro_batch=M \
         --set train.recompute=true|false"
    )?;
    Ok(out)
}

/// What one rank of `config` needs on a GPU with these settings on `gpus` GPUs, or `None` when
/// training would refuse the layout.
fn total_per_rank(config: &Config, gpus: i64, tensor: i64, recompute: bool, micro_batch: i64) -> Option<u64> {
    let mut candidate = config.clone();
    candidate.parallel.tensor = tensor;
    candidate.train.recompute = recompute;
    candidate.train.micro_batch = micro_batch;
    let layout = Layout::of(&candidate, gpus).ok()?;
    Some(plan(&candidate, layout, Target::Cuda).total())
}

/// 6738415616 -> "6,738,415,616".
pub fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(text: &str, overrides: &[&str]) -> Config {
        Config::parse(text, &overrides.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn a_layout_training_refuses_is_refused_with_the_same_rule() {
        let config = preset(include_str!("../../../configs/tiny.toml"), &["parallel.tensor=3"]);
        let error = format!("{:#}", report(&config, 6, Target::Cpu).unwrap_err());
        assert_eq!(error, "invalid config for 6 ranks: parallel.tensor = 3 must divide model.n_heads = 8");
    }

    #[test]
    fn the_search_tries_only_tensor_degrees_the_model_can_be_split_into() {
        // 4 KV heads: tensor 8 cannot split them.
        let config = preset(include_str!("../../../configs/llama-1b.toml"), &[]);
        let text = search(&config, 8, 80.0).unwrap();
        let rows: Vec<(i64, i64)> = text
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
            })
            .collect();
        assert_eq!(rows, [(1, 8), (1, 8), (2, 4), (2, 4), (4, 2), (4, 2)], "{text}");
    }
}
