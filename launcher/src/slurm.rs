//! `launcher slurm`: an sbatch script that runs the trainer's ranks with `srun --mpi=pmix`, forwards the preemption signal and requeues the job by exit status alone (75: requeue; 78: never).
use crate::slurm_job::JobState;
use anyhow::{bail, Context, Result};
use launcher::protocol::{exit_code, INVALID_CONFIG, PREEMPTED};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Everything the batch script is made of.
#[derive(Debug, Clone)]
pub struct Batch {
    pub nodes: u32,
    pub gpus_per_node: u32,
    pub ntasks_per_node: u32,
    pub cpus_per_task: Option<u32>,
    pub time: Option<String>,
    pub partition: Option<String>,
    pub job_name: String,
    /// Absolute; holds the script, the job's output and the Prometheus targets.
    pub output_dir: PathBuf,
    /// The directory the job runs in (relative paths in the trainer's arguments are relative to it).
    pub workdir: PathBuf,
    pub signal_lead_seconds: u32,
    /// Absolute path of the trainer binary.
    pub program: PathBuf,
    pub program_args: Vec<OsString>,
    pub metrics_port: u16,
}

/// Quotes `arg` for bash (single quotes unless it only holds characters that need none).
pub fn quote(arg: &str) -> String {
    let plain = !arg.is_empty() && arg.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-+=.,:/@%".contains(&b));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn quote_path(path: &Path) -> Result<String> {
    Ok(quote(path.to_str().with_context(|| format!("path {} is not UTF-8", path.display()))?))
}

impl Batch {
    /// Checks what sbatch would only refuse later, or not at all.
    pub fn validate(&self) -> Result<()> {
        if self.job_name.is_empty() || !self.job_name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            bail!("--job-name {:?} must be letters, digits, '.', '_' or '-'", self.job_name);
        }
        if self.ntasks_per_node == 0 {
            bail!("--ntasks-per-node must be at least 1 (with --gpus-per-node 0 it must be given)");
        }
        if let Some(time) = &self.time {
            if time.is_empty() || !time.bytes().all(|b| b.is_ascii_digit() || b == b':' || b == b'-') {
                bail!("--time {time:?} must look like HH:MM:SS, MM or D-HH:MM:SS");
            }
        }
        if let Some(partition) = &self.partition {
            if partition.is_empty() || !partition.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-,".contains(&b)) {
                bail!("--partition {partition:?} is not a partition name");
            }
        }
        if u32::from(self.metrics_port) + self.ntasks_per_node > 65536 {
            bail!("metrics.port {} + {} ranks per node exceeds 65535", self.metrics_port, self.ntasks_per_node);
        }
        Ok(())
    }

    /// Where the job's output goes (`%j`: the job id).
    pub fn output_pattern(&self) -> PathBuf {
        self.output_dir.join(format!("{}-%j.out", self.job_name))
    }

    pub fn script_path(&self) -> PathBuf {
        self.output_dir.join(format!("{}.sbatch", self.job_name))
    }

    pub fn targets_path(&self) -> PathBuf {
        self.output_dir.join("prometheus-targets.json")
    }

    /// The batch script.
    pub fn script(&self) -> Result<String> {
        self.validate()?;
        let mut s = String::new();
        let mut line = |text: String| {
            s.push_str(&text);
            s.push('\n');
        };
        line("#!/bin/bash".into());
        line(format!(
            "# Written by `launcher slurm`: {} node(s) x {} rank(s) of the trainer, started by srun --mpi=pmix.",
            self.nodes, self.ntasks_per_node
        ));
        line(format!(
            "# USR1/TERM are forwarded to the ranks, which save a checkpoint and exit {PREEMPTED}; the job then requeues"
        ));
        line(
            "# itself and the next run resumes from the checkpoint's `latest`. The requeue is decided by the step's"
                .into(),
        );
        line(format!(
            "# exit status alone: {INVALID_CONFIG} (invalid configuration) and any other failure are not requeued."
        ));
        line(format!("#SBATCH --job-name={}", self.job_name));
        line(format!("#SBATCH --nodes={}", self.nodes));
        line(format!("#SBATCH --ntasks-per-node={}", self.ntasks_per_node));
        if self.gpus_per_node > 0 {
            line(format!("#SBATCH --gpus-per-node={}", self.gpus_per_node));
        }
        if let Some(cpus) = self.cpus_per_task {
            line(format!("#SBATCH --cpus-per-task={cpus}"));
        }
        if let Some(time) = &self.time {
            line(format!("#SBATCH --time={time}"));
        }
        if let Some(partition) = &self.partition {
            line(format!("#SBATCH --partition={partition}"));
        }
        // #SBATCH lines are not parsed by a shell: paths with spaces cannot be quoted there.
        for (flag, path) in [("chdir", &self.workdir), ("output", &self.output_pattern())] {
            let text = path.to_str().with_context(|| format!("path {} is not UTF-8", path.display()))?;
            if text.contains(char::is_whitespace) {
                bail!("Slurm cannot take --{flag}={text}: the path contains whitespace");
            }
            line(format!("#SBATCH --{flag}={text}"));
        }
        line("#SBATCH --open-mode=append".into());
        line("#SBATCH --requeue".into());
        line(format!("#SBATCH --signal=B:USR1@{}", self.signal_lead_seconds));
        line(String::new());
        line("set -u".into());
        line(format!("OUT_DIR={}", quote_path(&self.output_dir)?));
        line(format!("TRAINER={}", quote_path(&self.program)?));
        line(format!("METRICS_PORT={}", self.metrics_port));
        line(format!("RANKS_PER_NODE={}", self.ntasks_per_node));
        line("# The trainer's restarts gauge; NCCL reports a failed collective instead of hanging.".into());
        line("export TRAINER_RESTARTS=${SLURM_RESTART_COUNT:-0}".into());
        line("export NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1".into());
        let mut args = vec!["\"$TRAINER\"".to_string()];
        for arg in &self.program_args {
            args.push(quote(arg.to_str().with_context(|| format!("argument {arg:?} is not UTF-8"))?));
        }
        s.push_str(
            &SCRIPT_BODY
                .replace("@TRAINER_COMMAND@", &args.join(" "))
                .replace("@PREEMPTED@", &PREEMPTED.to_string())
                .replace("@INVALID_CONFIG@", &INVALID_CONFIG.to_string()),
        );
        Ok(s)
    }
}

/// The part of the batch script that does not depend on the options.
const SCRIPT_BODY: &str = r#"log() { echo "launcher-slurm: $(date '+%F %T') job ${SLURM_JOB_ID} (restart ${TRAINER_RESTARTS}): $*"; }

# Prometheus file-SD targets: one per rank, host:METRICS_PORT+local rank, written atomically.
write_targets() {
  local hosts host r targets="" tmp="$OUT_DIR/.prometheus-targets.json.$SLURM_JOB_ID"
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || return 1
  for host in $hosts; do
    for ((r = 0; r < RANKS_PER_NODE; r++)); do targets+="${targets:+, }\"$host:$((METRICS_PORT + r))\""; done
  done
  printf '[{"targets": [%s], "labels": {"job_name": "%s", "slurm_job_id": "%s"}}]\n' \
    "$targets" "$SLURM_JOB_NAME" "$SLURM_JOB_ID" >"$tmp" && mv -f "$tmp" "$OUT_DIR/prometheus-targets.json"
}
write_targets || log "could not write $OUT_DIR/prometheus-targets.json"

# A signal to this script (--signal=B:USR1@N before the time limit, `scancel --batch --signal=USR1`, or TERM) is
# passed on to the training step: srun forwards it to every rank, and the ranks finish their step, save and exit
# @PREEMPTED@.
srun_pid=""
interrupted=""
forward() {
  interrupted=1
  log "received SIG$1; forwarding it to the training step"
  [ -n "$srun_pid" ] && kill -s "$1" "$srun_pid" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

log "starting ${SLURM_NTASKS} rank(s) on ${SLURM_JOB_NODELIST}"
# No --kill-on-bad-exit: the ranks of a preempted job exit @PREEMPTED@ one after the other, and killing the last ones
# would turn the step's status @PREEMPTED@ into 143. A rank that dies makes the others fail at their collective timeout.
# srun exits with the error code of a rank's MPI_Abort (the trainer aborts with @INVALID_CONFIG@ on an invalid
# configuration), else with the highest status of the ranks, a rank killed by a signal counting as 128 + signal.
srun --mpi=pmix --kill-on-bad-exit=0 @TRAINER_COMMAND@ &
srun_pid=$!
# `wait` returns early when a trapped signal arrives; wait again until the step has really ended.
while :; do
  interrupted=""
  wait "$srun_pid"
  rc=$?
  [ -n "$interrupted" ] || break
done

# Requeue by the step's exit status alone: @PREEMPTED@ (a checkpoint was saved) is requeued; @INVALID_CONFIG@ (the
# configuration is invalid) and every other status end the job with that status.
if [ "$rc" -eq @PREEMPTED@ ]; then
  log "the trainer saved a checkpoint and exited @PREEMPTED@ (preempted); requeueing the job"
  if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
  log "scontrol requeue failed"
elif [ "$rc" -eq @INVALID_CONFIG@ ]; then
  log "the trainer refused its configuration (exit status @INVALID_CONFIG@); not requeueing: a restart cannot fix it"
fi
log "training step ended with exit status $rc"
exit "$rc"
"#;

/// Writes the script into the output directory and submits it; returns sbatch's exit code. The job id is printed as
/// soon as sbatch reports it (with `wait`, before the job ends).
pub fn submit(batch: &Batch, wait: bool) -> Result<i32> {
    let script = batch.script()?;
    std::fs::create_dir_all(&batch.output_dir)
        .with_context(|| format!("cannot create the output directory {}", batch.output_dir.display()))?;
    let path = batch.script_path();
    std::fs::write(&path, script).with_context(|| format!("cannot write {}", path.display()))?;
    let mut command = Command::new("sbatch");
    command.arg("--parsable");
    if wait {
        command.arg("--wait");
    }
    command.arg(&path).stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            bail!("sbatch not found on PATH: is Slurm installed (`apt-get install slurm-wlm`)?")
        }
        Err(err) => return Err(err).context("cannot start sbatch"),
    };
    let mut job_id = None;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading sbatch's output")?;
            let id = line.split(';').next().unwrap_or("").trim().to_string();
            if job_id.is_none() && !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
                println!("{id}");
                let output = batch.output_pattern().display().to_string().replace("%j", &id);
                eprintln!(
                    "launcher: submitted batch job {id}: script {}, output {output}, Prometheus targets {}",
                    path.display(),
                    batch.targets_path().display()
                );
                let _ = std::io::stdout().flush();
                job_id = Some(id);
            } else {
                println!("{line}");
            }
        }
    }
    let status = child.wait().context("waiting for sbatch")?;
    let code = match (&job_id, wait) {
        (Some(id), true) => final_exit_code(id, exit_code(status)),
        _ => exit_code(status),
    };
    match (&job_id, code) {
        (None, _) => bail!("sbatch did not submit the job (exit status {code})"),
        (Some(id), code) if wait && code != 0 => eprintln!("launcher: batch job {id} failed (exit status {code})"),
        (Some(id), _) if wait => eprintln!("launcher: batch job {id} finished"),
        _ => {}
    }
    Ok(code)
}

/// The exit status of a job that `sbatch --wait` saw end with `sbatch_code`: the controller's record of the job once
/// it is final. sbatch can return while the job requeues itself (its state between two runs); then the launcher waits
/// for the requeued run. Where scontrol cannot tell, sbatch's status stands.
fn final_exit_code(job_id: &str, sbatch_code: i32) -> i32 {
    match JobState::wait_final(job_id, Duration::from_secs(2)) {
        Some(state) if state.exit_code != sbatch_code => {
            eprintln!(
                "launcher: sbatch returned {sbatch_code}, but job {job_id} ended {} with exit status {}",
                state.state, state.exit_code
            );
            state.exit_code
        }
        Some(state) => state.exit_code,
        None => sbatch_code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            nodes: 2,
            gpus_per_node: 8,
            ntasks_per_node: 8,
            cpus_per_task: Some(12),
            time: Some("04:00:00".into()),
            partition: Some("gpu".into()),
            job_name: "llama-7b".into(),
            output_dir: "/scratch/jobs".into(),
            workdir: "/home/me/llama-trainer".into(),
            signal_lead_seconds: 120,
            program: "/opt/llama trainer/trainer".into(),
            program_args: ["train", "--config", "configs/llama-7b.toml", "--set", "train.run_dir=it's here"]
                .map(OsString::from)
                .to_vec(),
            metrics_port: 9500,
        }
    }

    #[test]
    fn script_has_resources_signal_requeue_and_quoted_command() {
        let script = batch().script().unwrap();
        for expected in [
            "#SBATCH --nodes=2\n",
            "#SBATCH --ntasks-per-node=8\n",
            "#SBATCH --gpus-per-node=8\n",
            "#SBATCH --cpus-per-task=12\n",
            "#SBATCH --time=04:00:00\n",
            "#SBATCH --partition=gpu\n",
            "#SBATCH --chdir=/home/me/llama-trainer\n",
            "#SBATCH --output=/scratch/jobs/llama-7b-%j.out\n",
            "#SBATCH --requeue\n",
            "#SBATCH --signal=B:USR1@120\n",
            "TRAINER='/opt/llama trainer/trainer'\n",
            "METRICS_PORT=9500\n",
            "srun --mpi=pmix --kill-on-bad-exit=0 \"$TRAINER\" train --config configs/llama-7b.toml --set 'train.run_dir=it'\\''s here' &\n",
            "scontrol requeue \"$SLURM_JOB_ID\"",
            "if [ \"$rc\" -eq 75 ]; then\n",
            "elif [ \"$rc\" -eq 78 ]; then\n  log \"the trainer refused its configuration (exit status 78); not requeueing",
        ] {
            assert!(script.contains(expected), "{expected:?} missing from:\n{script}");
        }
        let mut cpu = batch();
        cpu.gpus_per_node = 0;
        cpu.cpus_per_task = None;
        let script = cpu.script().unwrap();
        assert!(!script.contains("--gpus-per-node") && !script.contains("--cpus-per-task"), "{script}");
        for placeholder in ["@TRAINER_COMMAND@", "@PREEMPTED@", "@INVALID_CONFIG@"] {
            assert!(!script.contains(placeholder), "{placeholder} left in:\n{script}");
        }
    }

    #[test]
    fn bad_options_are_refused() {
        for (edit, expected) in [
            (Box::new(|b: &mut Batch| b.job_name = "a b".into()) as Box<dyn Fn(&mut Batch)>, "--job-name"),
            (Box::new(|b: &mut Batch| b.ntasks_per_node = 0), "--ntasks-per-node"),
            (Box::new(|b: &mut Batch| b.time = Some("4h".into())), "--time"),
            (Box::new(|b: &mut Batch| b.output_dir = "/a b".into()), "whitespace"),
        ] {
            let mut b = batch();
            edit(&mut b);
            let err = format!("{:#}", b.script().unwrap_err());
            assert!(err.contains(expected), "{err}");
        }
    }
}
