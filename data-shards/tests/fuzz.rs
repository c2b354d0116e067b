//! Bounded fuzzing of the readers: damaged shards (with and without a loss mask), document tables, manifests and Megatron indexes (fixed seed) must
//! give a clean one-line error or a result, never a panic, an abort or an unbounded allocation.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use data_shards::{prepare_sft, CorpusOptions, SftFormat, SftOptions, Split, TokenDataset, WindowSampler};

const CASES: u64 = 300;
/// Address space for each CLI run (`ulimit -v`, KiB): far more than the small datasets need, far less than what a
/// length read from a damaged file can ask for.
const MEMORY_KIB: u64 = 2 << 20;

/// One random change to the files of a dataset directory.
fn damage(dir: &Path, rng: &mut Rng) -> String {
    let shards: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .collect();
        v.sort();
        v
    };
    let shard = &shards[rng.below(shards.len() as u64) as usize];
    let mut bytes = std::fs::read(shard).unwrap();
    let len = bytes.len() as u64;
    let huge = [u64::MAX, 1 << 63, 1 << 41, u64::from(u32::MAX), len, len / 2 + 1];
    let value = if rng.below(2) == 0 { huge[rng.below(huge.len() as u64) as usize] } else { rng.below(4 * len + 1) };
    // Where the tokens and the document table are, if an earlier change left the header readable.
    let num_tokens = bytes.get(16..24).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let table = num_tokens.checked_mul(2).and_then(|t| t.checked_add(64)).filter(|&t| len >= 64 && t < len);
    let what = match (rng.below(8), table) {
        (0, _) if len > 0 => {
            bytes.truncate(rng.below(len) as usize);
            format!("{} truncated to {}", shard.display(), bytes.len())
        }
        (1, _) if len > 0 => {
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(len) as usize;
                bytes[at] ^= 1 << rng.below(8);
            }
            format!("bytes of {} flipped", shard.display())
        }
        (2, _) if len >= 64 => {
            let field = [16usize, 24][rng.below(2) as usize];
            bytes[field..field + 8].copy_from_slice(&value.to_le_bytes());
            format!("header field at {field} of {} = {value}", shard.display())
        }
        (3, Some(table)) if (len - table) % 8 == 0 => {
            let at = (table + 8 * rng.below((len - table) / 8)) as usize;
            bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            format!("document table entry at byte {at} of {} = {value}", shard.display())
        }
        (4, Some(_)) if num_tokens > 0 => {
            let at = 64 + 2 * rng.below(num_tokens) as usize;
            bytes[at..at + 2].copy_from_slice(&(value as u16).to_le_bytes());
            format!("token at byte {at} of {} = {}", shard.display(), value as u16)
        }
        (6, _) => return damage_manifest(dir, rng, value),
        (7, _) if dir.join("tokenizer.json").exists() => {
            std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
            return "tokenizer.json removed".into();
        }
        _ => {
            bytes.extend((0..1 + rng.below(64)).map(|_| rng.below(256) as u8));
            format!("bytes appended to {}", shard.display())
        }
    };
    std::fs::write(shard, &bytes).unwrap();
    what
}

/// One random change to `dir/manifest.json`: its text damaged, or one field set to `value` or to a bad name.
fn damage_manifest(dir: &Path, rng: &mut Rng, value: u64) -> String {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let parsed = serde_json::from_str::<serde_json::Value>(&text).ok();
    let Some(mut m) = parsed.filter(|_| rng.below(3) != 0) else {
        let mut bytes = text.into_bytes();
        match rng.below(2) {
            0 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
            _ => {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] = b"{}[]\",:0-9e"[rng.below(11) as usize];
            }
        }
        std::fs::write(&path, bytes).unwrap();
        return "manifest.json text damaged".into();
    };
    let split = ["train", "valid"][rng.below(2) as usize];
    let first = &mut m["splits"][split]["shards"][0];
    let what = match rng.below(7) {
        0 => format!("vocab_size = {}", std::mem::replace(&mut m["vocab_size"], (value % (1 << 32)).into())),
        1 => format!("eos_id = {}", std::mem::replace(&mut m["eos_id"], (value % (1 << 32)).into())),
        2 => format!("{split} num_tokens = {}", std::mem::replace(&mut m["splits"][split]["num_tokens"], value.into())),
        3 => format!(
            "first {split} shard num_documents = {}",
            std::mem::replace(&mut first["num_documents"], value.into())
        ),
        4 => format!("first {split} shard file = {}", std::mem::replace(&mut first["file"], "../manifest.json".into())),
        5 => format!("tokenizer = {}", std::mem::replace(&mut m["tokenizer"], "../../tok.json".into())),
        _ => format!(
            "dtype = {}",
            std::mem::replace(&mut m["dtype"], ["u32", "i64", "f32"][rng.below(3) as usize].into())
        ),
    };
    std::fs::write(&path, serde_json::to_string(&m).unwrap()).unwrap();
    format!("manifest.json: {what} replaced")
}

/// Opens both splits and reads everything through the library: open, verify, every document, all tokens, windows.
fn read_everything(dir: &Path) {
    for split in Split::ALL {
        let Ok(ds) = TokenDataset::open(dir, split) else { continue };
        let _ = ds.verify_checksums();
        for i in 0..ds.num_documents() {
            let _ = ds.document(i);
        }
        for i in 0..ds.num_documents() {
            let _ = ds.document_loss_mask(i);
        }
        let _ = ds.tokens(0, ds.num_tokens());
        if let Ok(sampler) = WindowSampler::new(Arc::new(ds), 8, 1) {
            let (mut window, mut mask, mut positions) = ([0i64; 9], [0u8; 9], [0i64; 9]);
            for i in 0..sampler.num_windows().min(64) {
                sampler.window_into(i, &mut window);
                sampler.masked_window_into(i, &mut window, &mut mask, &mut positions);
            }
        }
    }
}

/// Runs the CLI under a memory limit; it must succeed, or fail with exit status 1 and one line naming a file of `dir`.
fn assert_clean(dir: &Path, args: &[&str], case: &str) {
    let command = format!("ulimit -v {MEMORY_KIB}; exec \"$0\" \"$@\"");
    let out = Command::new("sh")
        .args(["-c", &command, BIN])
        .args(args)
        .stdout(Stdio::null())
        .output()
        .expect("run data-shards");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context =
        format!("{case}: data-shards {args:?}: {:?} (signal {:?})\n{stderr}", out.status, out.status.signal());
    if out.status.success() {
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{context}");
    assert!(stderr.starts_with("error: ") && stderr.lines().count() == 1, "{context}");
    assert!(stderr.contains(dir.to_str().unwrap()), "the error names no file of the dataset: {context}");
}

#[test]
fn damaged_datasets_give_clean_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, &make_docs(120, 21));
    let tok = train(&corpus, &tmp.path().join("tok.json"), 400);
    let pristine = tmp.path().join("pristine");
    prepare_dir(&corpus, &tok, &pristine, 0.3);
    fuzz(tmp.path(), &pristine, 0x5EED);
}

#[test]
fn damaged_fine_tuning_datasets_give_clean_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model_dir(tmp.path(), "model", CHATML_TEMPLATE);
    let input = tmp.path().join("chats.jsonl");
    write_chats(&input, &make_chats(40, 8));
    let pristine = tmp.path().join("pristine");
    let mut opts = SftOptions::new(SftFormat::Chat, CorpusOptions::new(vec![input]), Some(model), pristine.clone());
    opts.valid_fraction = 0.3;
    opts.shard_tokens = 1500;
    prepare_sft(&opts).unwrap();
    fuzz(tmp.path(), &pristine, 0xF1E7);
}

/// [`CASES`] damaged copies of the dataset `pristine`, each read through the library and the CLI.
fn fuzz(root: &Path, pristine: &Path, seed: u64) {
    let mut rng = Rng(seed);
    for case in 0..CASES {
        let dir = root.join(format!("case-{case}"));
        std::fs::create_dir(&dir).unwrap();
        for (name, bytes) in dir_contents(pristine) {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let mut what: Vec<String> = (0..1 + rng.below(3)).map(|_| damage(&dir, &mut rng)).collect();
        if rng.below(2) == 0 {
            // Let the damage through the checksum, to the checks behind it.
            rewrite_checksums(&dir);
            what.push("checksums rewritten".into());
        }
        let case = format!("case {case} ({})", what.join("; "));
        let d = dir.to_str().unwrap();
        if std::panic::catch_unwind(|| read_everything(&dir)).is_err() {
            panic!("{case}: the library panicked");
        }
        let commands = [
            vec!["verify", d],
            vec!["inspect", d],
            vec!["dump-docs", d],
            vec!["dump-docs", d, "--mask"],
            vec!["decode", d, "--len", "64"],
        ];
        for args in commands {
            assert_clean(&dir, &args, &case);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A Megatron index for `lens` sequences (int32 tokens, one document each).
fn megatron_index(lens: &[i32]) -> Vec<u8> {
    let mut idx = b"MMIDIDX\x00\x00".to_vec();
    idx.extend(1u64.to_le_bytes());
    idx.push(4);
    idx.extend((lens.len() as u64).to_le_bytes());
    idx.extend((lens.len() as u64 + 1).to_le_bytes());
    lens.iter().for_each(|l| idx.extend(l.to_le_bytes()));
    let mut at = 0i64;
    for l in lens {
        idx.extend(at.to_le_bytes());
        at += 4 * i64::from(*l);
    }
    (0..=lens.len() as i64).for_each(|d| idx.extend(d.to_le_bytes()));
    idx
}

#[test]
fn damaged_megatron_indexes_give_clean_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("mg");
    let lens = [5i32, 1, 9, 3, 7];
    let tokens: Vec<u8> = (0..lens.iter().sum::<i32>()).flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(prefix.with_extension("bin"), &tokens).unwrap();
    let pristine = megatron_index(&lens);
    let mut rng = Rng(0xD0C5);
    for case in 0..CASES {
        let mut idx = pristine.clone();
        let what = match rng.below(3) {
            0 => {
                idx.truncate(rng.below(idx.len() as u64) as usize);
                format!("truncated to {}", idx.len())
            }
            1 => {
                let at = rng.below(idx.len() as u64) as usize;
                idx[at] ^= 1 << rng.below(8);
                format!("bit flipped at {at}")
            }
            _ => {
                let at = 9 + 8 * rng.below((idx.len() as u64 - 9) / 8) as usize;
                let value = [u64::MAX, 1 << 40, rng.below(100)][rng.below(3) as usize];
                idx[at..at + 8].copy_from_slice(&value.to_le_bytes());
                format!("{value} written at {at}")
            }
        };
        std::fs::write(prefix.with_extension("idx"), &idx).unwrap();
        let case = format!("megatron case {case} ({what})");
        if std::panic::catch_unwind(|| TokenDataset::open_megatron(&prefix).map(|ds| ds.verify_checksums())).is_err() {
            panic!("{case}: the library panicked");
        }
        let p = prefix.to_str().unwrap();
        for args in [["verify", "--megatron", p], ["dump-docs", "--megatron", p]] {
            assert_clean(tmp.path(), &args, &case);
        }
    }
}
