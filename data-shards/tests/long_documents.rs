//! Documents far longer than a piece: `prepare` tokenizes them in pieces, in memory that does not grow with their
//! length, and gives the tokens of the whole document, except across a cut inside a run without spaces or newlines.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use data_shards::stream::PIECE_BYTES;
use data_shards::{load_tokenizer, Split, TokenDataset};
use tokenizers::Tokenizer;

/// The tokens of `texts` encoded one after the other, then EOS (id 0).
fn encoded(tok: &Tokenizer, texts: &[&str]) -> Vec<u32> {
    let mut ids: Vec<u32> = texts.iter().flat_map(|t| tok.encode(*t, false).unwrap().get_ids().to_vec()).collect();
    ids.push(0);
    ids
}

/// Text of `bytes` bytes or a little more: words with one or two spaces, tabs, punctuation and lone or doubled
/// newlines between them, and paragraphs without spaces.
fn varied_text(bytes: usize, seed: u64) -> String {
    let mut rng = Rng(seed);
    let words = ["the", "model", "learns", "tokens", "naïve", "日本語のテキストです", "emoji🙂", "42", "3.14", "(x)"];
    let mut s = String::new();
    while s.len() < bytes {
        s.push_str(words[rng.below(words.len() as u64) as usize]);
        s.push_str(match rng.below(20) {
            0 => "\n",
            1 => "\n\n",
            2 => "  ",
            3 => "\t",
            4 => ", ",
            5 => "",
            _ => " ",
        });
    }
    s
}

/// Runs the CLI with `args`; returns its peak resident memory in bytes (`wait4`'s rusage of that one child).
#[allow(clippy::zombie_processes, reason = "the child is reaped by wait4, which also gives its rusage")]
fn peak_rss_of(args: &[&str]) -> u64 {
    let child = Command::new(BIN).args(args).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of that plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `child` is our child and not waited for yet; both pointers are to live locals.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4: {}", std::io::Error::last_os_error());
    assert!(std::process::ExitStatus::from_raw(status).success(), "data-shards {args:?} failed");
    usage.ru_maxrss as u64 * 1024
}

fn documents(dir: &Path) -> Vec<Vec<u32>> {
    let ds = TokenDataset::open(dir, Split::Train).unwrap();
    (0..ds.num_documents()).map(|i| ds.document(i).unwrap()).collect()
}

#[test]
fn long_documents_get_the_tokens_of_the_whole_text() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, &[make_docs(200, 8), vec![varied_text(200_000, 1)]].concat());
    let tok_path = train(&corpus, &tmp.path().join("tok.json"), 600);
    let tok = load_tokenizer(&tok_path).unwrap();
    // Multi-line documents of 1 MB and a paragraph of 200 KB with newlines but no spaces: cut before a space or
    // after a lone newline, as the tokenizer's pre-tokenizer does.
    let long = varied_text(1 << 20, 2);
    let cjk: String = (0..2000).map(|i| if i % 7 == 6 { "。\n" } else { "日本語のテキストです" }).collect();
    // A run of letters longer than a piece: cut at PIECE_BYTES after the space that precedes it, so the tokens
    // across that cut are those of its two parts encoded on their own.
    let letters = format!("start {} end\n", "x".repeat(PIECE_BYTES + 1000));
    let cut = "start".len() + PIECE_BYTES;
    let input = tmp.path().join("long.txt");
    std::fs::write(&input, format!("{long}\n%\n{cjk}\n%\n{letters}")).unwrap();
    let out = tmp.path().join("ds");
    let args = ["prepare", "--input", input.to_str().unwrap(), "--doc-separator", "%"];
    let tokenizer = ["--tokenizer", tok_path.to_str().unwrap(), "--valid-fraction", "0"];
    assert_ok(&run(&[&args[..], &tokenizer, &["--output", out.to_str().unwrap()]].concat(), &[]));
    let docs = documents(&out);
    assert_eq!(docs.len(), 3);
    assert!(docs[0] == encoded(&tok, &[&format!("{long}\n")]), "multi-line document");
    assert!(docs[1] == encoded(&tok, &[&format!("{cjk}\n")]), "paragraph without spaces");
    assert!(docs[2] == encoded(&tok, &[&letters[..cut], &letters[cut..]]), "run longer than a piece");
}

#[test]
fn a_long_line_is_prepared_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, &make_docs(200, 9));
    let tok_path = train(&corpus, &tmp.path().join("tok.json"), 600);
    // One line of 16 MB (words and spaces). Tokenized whole, it took ~170 bytes of memory per byte (2.7 GB).
    let line = varied_text(16 << 20, 3).replace('\n', " ");
    let input = tmp.path().join("line.txt");
    std::fs::write(&input, &line).unwrap();
    let out = tmp.path().join("ds");
    let peak = peak_rss_of(&[
        "prepare",
        "--input",
        input.to_str().unwrap(),
        "--tokenizer",
        tok_path.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--valid-fraction",
        "0",
    ]);
    assert!(peak < 160 << 20, "prepare of a 16 MB line peaked at {} MB", peak >> 20);
    // The tokens are those of the line encoded in pieces of about 1 MB cut before a space (where this tokenizer's
    // pre-tokenizer splits anyway).
    let tok = load_tokenizer(&tok_path).unwrap();
    let mut pieces = Vec::new();
    let mut rest = line.as_str();
    while rest.len() > 1 << 20 {
        let after = rest.as_bytes()[1 << 20..].windows(2).position(|w| w == b" t");
        let cut = after.map_or(rest.len(), |i| i + (1 << 20));
        pieces.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    pieces.push(rest);
    assert!(documents(&out) == [encoded(&tok, &pieces)]);
}

#[test]
fn special_tokens_are_added_once_around_a_long_document() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, &make_docs(200, 10));
    let trained = train(&corpus, &tmp.path().join("trained.json"), 600);
    // The same tokenizer with a post-processor that puts <|endoftext|> (id 0) before a sequence, as BOS.
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&trained).unwrap()).unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}
    });
    let tok_path = tmp.path().join("bos.json");
    std::fs::write(&tok_path, json.to_string()).unwrap();
    let tok = load_tokenizer(&tok_path).unwrap();
    let short = "a short document\n";
    let long = format!("{}\n", varied_text(300_000, 4));
    let input = tmp.path().join("docs.txt");
    std::fs::write(&input, format!("{short}%\n{long}")).unwrap();
    let out = tmp.path().join("ds");
    let args = ["prepare", "--input", input.to_str().unwrap(), "--doc-separator", "%", "--add-special-tokens"];
    let rest = ["--tokenizer", tok_path.to_str().unwrap(), "--valid-fraction", "0", "--output", out.to_str().unwrap()];
    assert_ok(&run(&[&args[..], &rest].concat(), &[]));
    let with_eos = |mut ids: Vec<u32>| {
        ids.push(0);
        ids
    };
    let docs = documents(&out);
    assert_eq!(docs[0], with_eos(tok.encode(short, true).unwrap().get_ids().to_vec()));
    assert_eq!(docs[0][0], 0, "BOS");
    assert!(docs[1] == with_eos(tok.encode(long.as_str(), true).unwrap().get_ids().to_vec()), "long document");
}
