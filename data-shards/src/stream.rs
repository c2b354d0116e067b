//! The corpus' documents in order, read and handed out in pieces of at most [`PIECE_BYTES`], so that memory does not grow with a document's length.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::corpus::{CorpusOptions, InputFile};
use crate::error::DataError;

/// The most bytes of text in one piece. A longer document is cut where byte-level BPE pre-tokenizers (GPT-2's and
/// LLaMA-3's patterns) split it anyway, so that its tokens do not change (see [`cut_point`]).
pub const PIECE_BYTES: usize = 64 << 10;

/// What a piece is to its document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocEnd {
    /// More pieces of the same document follow.
    Continues,
    /// The document's last piece; the document is kept.
    Keep,
    /// The last piece of a document that is empty or only whitespace: it is dropped with its earlier pieces.
    Drop,
}

/// A run of at most [`PIECE_BYTES`] of a document's text.
#[derive(Clone, Debug)]
pub struct Piece {
    pub text: String,
    pub end: DocEnd,
}

/// Where to cut `text`, which is longer than [`PIECE_BYTES`], so that the first part is at most that long: before
/// the last space that is followed by a character other than whitespace (a space starts the next pre-token: it
/// attaches to the word after it); else after the last lone newline between two such characters (the newline is a
/// pre-token of its own); else at the last character boundary, where a word is cut in two and the tokens are those
/// of its two parts.
pub fn cut_point(text: &str) -> usize {
    let bytes = text.as_bytes();
    let word_at = |p: usize| text[p..].chars().next().is_some_and(|c| !c.is_whitespace());
    let word_before = |p: usize| text[..p].chars().next_back().is_some_and(|c| !c.is_whitespace());
    let before_space = || (1..=PIECE_BYTES).rev().find(|&p| bytes[p] == b' ' && word_at(p + 1));
    let after_newline = || {
        (2..=PIECE_BYTES)
            .rev()
            .find(|&p| bytes[p - 1] == b'\n' && text.is_char_boundary(p) && word_at(p) && word_before(p - 1))
    };
    let boundary =
        || (1..=PIECE_BYTES).rev().find(|&p| text.is_char_boundary(p)).expect("a character boundary every 4 bytes");
    before_space().or_else(after_newline).unwrap_or_else(boundary)
}

/// A document is dropped when it is empty or only whitespace.
fn is_blank(s: &str) -> bool {
    s.trim().is_empty()
}

/// The part of the document being read that has not been handed out yet.
struct Pending {
    /// Checked text; `text[start..]` is not handed out yet.
    text: String,
    start: usize,
    /// Bytes after `text` that begin a character whose end is still to be read.
    partial: Vec<u8>,
    /// The document has had nothing but whitespace so far.
    blank: bool,
    /// Pieces of the document handed out so far.
    pieces: u64,
    /// File offset and line number of `text[start]`, for messages.
    offset: u64,
    line: u64,
}

impl Pending {
    fn new(offset: u64, line: u64) -> Self {
        Pending { text: String::new(), start: 0, partial: Vec::new(), blank: true, pieces: 0, offset, line }
    }

    /// A whole document's text (from a JSONL line).
    fn from_text(text: String) -> Self {
        Pending { blank: is_blank(&text), text, ..Pending::new(0, 1) }
    }

    /// Appends bytes read from `path`, checking that they continue valid UTF-8.
    fn push(&mut self, path: &Path, bytes: &[u8]) -> Result<(), DataError> {
        self.text.drain(..self.start);
        self.start = 0;
        self.partial.extend_from_slice(bytes);
        let checked = match std::str::from_utf8(&self.partial) {
            Ok(_) => self.partial.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(e) => return Err(self.utf8_error(path, e.valid_up_to())),
        };
        let new = std::str::from_utf8(&self.partial[..checked]).expect("checked above");
        self.blank = self.blank && is_blank(new);
        self.text.push_str(new);
        self.partial.drain(..checked);
        Ok(())
    }

    /// The error for invalid UTF-8 at byte `at` of `partial`.
    fn utf8_error(&self, path: &Path, at: usize) -> DataError {
        let before = self.text[self.start..].bytes().chain(self.partial[..at].iter().copied());
        let lines = before.filter(|&b| b == b'\n').count() as u64;
        let offset = self.offset + (self.text.len() - self.start + at) as u64;
        DataError::NotUtf8 { path: path.to_path_buf(), offset, line: self.line + lines }
    }

    /// The next piece, if more than [`PIECE_BYTES`] are waiting.
    fn full_piece(&mut self) -> Option<Piece> {
        let rest = &self.text[self.start..];
        if rest.len() <= PIECE_BYTES {
            return None;
        }
        let text = rest[..cut_point(rest)].to_string();
        self.start += text.len();
        self.offset += text.len() as u64;
        self.line += text.bytes().filter(|&b| b == b'\n').count() as u64;
        self.pieces += 1;
        Some(Piece { text, end: DocEnd::Continues })
    }

    /// The document's last piece; none for a blank document that has handed out nothing.
    fn last_piece(mut self, path: &Path) -> Result<Option<Piece>, DataError> {
        if !self.partial.is_empty() {
            return Err(self.utf8_error(path, 0));
        }
        let end = if self.blank { DocEnd::Drop } else { DocEnd::Keep };
        let text = if self.start == 0 { self.text } else { self.text.split_off(self.start) };
        Ok((self.pieces > 0 || !self.blank).then_some(Piece { text, end }))
    }
}

/// Pieces read but not handed out yet.
#[derive(Default)]
struct Ready {
    pieces: VecDeque<Piece>,
    /// Documents kept so far.
    documents: u64,
}

impl Ready {
    fn full_pieces(&mut self, doc: &mut Pending) {
        self.pieces.extend(std::iter::from_fn(|| doc.full_piece()));
    }

    fn end_document(&mut self, path: &Path, mut doc: Pending) -> Result<(), DataError> {
        self.full_pieces(&mut doc);
        if let Some(piece) = doc.last_piece(path)? {
            self.documents += u64::from(piece.end == DocEnd::Keep);
            self.pieces.push_back(piece);
        }
        Ok(())
    }
}

/// Text files: the whole file is one document, or lines equal to `--doc-separator` end documents. Read a line, or
/// [`PIECE_BYTES`] of a longer one, at a time.
struct TextReader {
    input: BufReader<File>,
    doc: Pending,
    at_line_start: bool,
    /// File offset and line number of the next byte.
    offset: u64,
    line: u64,
}

impl TextReader {
    /// Reads the next line or part of one into `part`; returns its length, 0 at the end of the file.
    fn read(
        &mut self,
        path: &Path,
        separator: Option<&str>,
        part: &mut Vec<u8>,
        ready: &mut Ready,
    ) -> Result<usize, DataError> {
        part.clear();
        let limit = PIECE_BYTES as u64;
        let n = (&mut self.input).take(limit).read_until(b'\n', part).map_err(|e| DataError::io(path, e))?;
        let starts_line = self.at_line_start;
        self.at_line_start = part.ends_with(b"\n");
        // Shorter than the limit without a newline: the file's last line.
        let whole_line = starts_line && (self.at_line_start || n < PIECE_BYTES);
        self.offset += n as u64;
        self.line += u64::from(self.at_line_start);
        if n == 0 || (whole_line && separator.is_some_and(|sep| is_separator(part, sep))) {
            let doc = std::mem::replace(&mut self.doc, Pending::new(self.offset, self.line));
            ready.end_document(path, doc)?;
        } else {
            self.doc.push(path, part)?;
            ready.full_pieces(&mut self.doc);
        }
        Ok(n)
    }
}

/// Whether `line` is `separator` followed by its line ending.
fn is_separator(line: &[u8], separator: &str) -> bool {
    let bare = line.strip_suffix(b"\n").unwrap_or(line);
    let bare = bare.strip_suffix(b"\r").unwrap_or(bare);
    bare == separator.as_bytes()
}

/// JSONL files: one JSON object per line, the document's text in one of its fields. A line is held in memory
/// while it is parsed.
struct JsonlReader {
    input: BufReader<File>,
    line: u64,
    offset: u64,
}

impl JsonlReader {
    /// Reads the next line into `buf`; returns its length, 0 at the end of the file.
    fn read(&mut self, path: &Path, field: &str, buf: &mut Vec<u8>, ready: &mut Ready) -> Result<usize, DataError> {
        buf.clear();
        let n = self.input.read_until(b'\n', buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            return Ok(0);
        }
        self.line += 1;
        let line = std::str::from_utf8(buf).map_err(|e| {
            let lines = buf[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() as u64;
            DataError::NotUtf8 {
                path: path.to_path_buf(),
                offset: self.offset + e.valid_up_to() as u64,
                line: self.line + lines,
            }
        })?;
        self.offset += n as u64;
        if !is_blank(line) {
            ready.end_document(path, Pending::from_text(parse_jsonl_line(path, self.line, line, field)?))?;
        }
        buf.shrink_to(PIECE_BYTES);
        Ok(n)
    }
}

fn parse_jsonl_line(path: &Path, line_no: u64, line: &str, field: &str) -> Result<String, DataError> {
    let err = |message: String| DataError::Jsonl { path: path.to_path_buf(), line: line_no, message };
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON ({e})")))?;
    let serde_json::Value::Object(mut obj) = value else { return Err(err("expected a JSON object".into())) };
    match obj.remove(field) {
        None => Err(err(format!("no field {field:?}"))),
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(err(format!(
            "field {field:?} is not a string (found {})",
            match other {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::Object(_) => "an object",
                serde_json::Value::String(_) => "a string",
            }
        ))),
    }
}

fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(),
        Some("jsonl") | Some("ndjson")
    )
}

enum Reader {
    Text(TextReader),
    Jsonl(JsonlReader),
}

/// Streams the documents of the input files in order, in pieces.
pub struct DocumentStream {
    files: Vec<InputFile>,
    opts: CorpusOptions,
    next_file: usize,
    /// The reader of `files[next_file - 1]`, until its end.
    reader: Option<Reader>,
    /// Documents kept before the current file.
    documents_before: u64,
    ready: Ready,
    buf: Vec<u8>,
    /// Bytes of input consumed so far (for progress).
    pub bytes_read: u64,
}

impl DocumentStream {
    /// Streams the documents of `files` (from [`crate::corpus::discover`]).
    pub fn new(files: Vec<InputFile>, opts: CorpusOptions) -> Self {
        DocumentStream {
            files,
            opts,
            next_file: 0,
            reader: None,
            documents_before: 0,
            ready: Ready::default(),
            buf: Vec::new(),
            bytes_read: 0,
        }
    }

    /// Total size of all input files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }

    /// The next piece of text, or `None` at the end of the input. Blank documents yield nothing, except that a
    /// blank one longer than [`PIECE_BYTES`] ends with a [`DocEnd::Drop`] piece.
    pub fn next_piece(&mut self) -> Result<Option<Piece>, DataError> {
        loop {
            if let Some(piece) = self.ready.pieces.pop_front() {
                return Ok(Some(piece));
            }
            let Some(reader) = self.reader.as_mut() else {
                let Some(file) = self.files.get(self.next_file) else { return Ok(None) };
                let input = File::open(&file.path).map_err(|e| DataError::io(&file.path, e))?;
                let input = BufReader::with_capacity(1 << 20, input);
                self.reader = Some(if is_jsonl(&file.path) {
                    Reader::Jsonl(JsonlReader { input, line: 0, offset: 0 })
                } else {
                    Reader::Text(TextReader { input, doc: Pending::new(0, 1), at_line_start: true, offset: 0, line: 1 })
                });
                self.documents_before = self.ready.documents;
                self.next_file += 1;
                continue;
            };
            let file = &self.files[self.next_file - 1];
            let n = match reader {
                Reader::Text(r) => {
                    r.read(&file.path, self.opts.doc_separator.as_deref(), &mut self.buf, &mut self.ready)?
                }
                Reader::Jsonl(r) => r.read(&file.path, &self.opts.jsonl_field, &mut self.buf, &mut self.ready)?,
            };
            self.bytes_read += n as u64;
            if n == 0 {
                self.reader = None;
                if file.explicit && self.ready.documents == self.documents_before {
                    return Err(DataError::EmptyInput {
                        path: file.path.clone(),
                        what: if file.len == 0 {
                            "file is empty".into()
                        } else {
                            "file contains no documents (only whitespace or separators)".into()
                        },
                    });
                }
            }
        }
    }

    /// The next whole document, or `None` at the end of the input (for training a tokenizer, which holds them all).
    pub fn next_document(&mut self) -> Result<Option<String>, DataError> {
        let mut text = String::new();
        while let Some(piece) = self.next_piece()? {
            text.push_str(&piece.text);
            match piece.end {
                DocEnd::Continues => {}
                DocEnd::Keep => return Ok(Some(text)),
                DocEnd::Drop => text.clear(),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::discover;

    fn documents(path: &Path, separator: Option<&str>) -> (Vec<String>, u64) {
        let mut opts = CorpusOptions::new(vec![path.to_path_buf()]);
        opts.doc_separator = separator.map(str::to_owned);
        let mut s = DocumentStream::new(discover(&opts).unwrap(), opts);
        let mut docs = Vec::new();
        while let Some(d) = s.next_document().unwrap() {
            docs.push(d);
        }
        (docs, s.bytes_read)
    }

    #[test]
    fn separator_splitting_keeps_line_endings_and_drops_blank_documents() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.txt");
        std::fs::write(&f, "%\r\none\r\ntwo\n%\n \n%\nlast line no newline").unwrap();
        let (docs, bytes_read) = documents(&f, Some("%"));
        assert_eq!(docs, ["one\r\ntwo\n", "last line no newline"]);
        assert_eq!(bytes_read, std::fs::metadata(&f).unwrap().len());
    }

    #[test]
    fn long_documents_come_in_pieces_that_add_up_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.txt");
        // A long line of words, a blank document longer than a piece, a line without spaces, a last short one.
        let words: String = (0..40_000).map(|i| format!("w{i} ")).collect();
        let blank = " \n".repeat(PIECE_BYTES);
        let solid = "é".repeat(PIECE_BYTES);
        std::fs::write(&f, format!("{words}\n%\n{blank}%\n{solid}\n%\nend")).unwrap();
        let mut opts = CorpusOptions::new(vec![f.clone()]);
        opts.doc_separator = Some("%".into());
        let mut s = DocumentStream::new(discover(&opts).unwrap(), opts);
        let mut pieces = Vec::new();
        while let Some(p) = s.next_piece().unwrap() {
            assert!(p.text.len() <= PIECE_BYTES && !p.text.is_empty(), "{}", p.text.len());
            pieces.push(p);
        }
        let ends: Vec<usize> =
            pieces.iter().enumerate().filter(|(_, p)| p.end != DocEnd::Continues).map(|(i, _)| i).collect();
        let doc = |range: std::ops::Range<usize>| pieces[range].iter().map(|p| p.text.as_str()).collect::<String>();
        assert_eq!(ends.len(), 4);
        assert_eq!(doc(0..ends[0] + 1), format!("{words}\n"));
        assert!(pieces[..ends[0]].iter().all(|p| p.text.ends_with(|c| c != ' ')), "cut before a space");
        assert_eq!(pieces[ends[1]].end, DocEnd::Drop);
        assert_eq!(doc(ends[1] + 1..ends[2] + 1), format!("{solid}\n"));
        assert_eq!(doc(ends[2] + 1..pieces.len()), "end");
        let (docs, _) = documents(&f, Some("%"));
        assert_eq!(docs, [format!("{words}\n"), format!("{solid}\n"), "end".to_string()]);
    }

    #[test]
    fn cuts_before_a_word_after_a_lone_newline_or_at_a_character_boundary() {
        let text = format!("{}x\ny{}", "a".repeat(PIECE_BYTES - 10), "b".repeat(20));
        assert_eq!(cut_point(&text), PIECE_BYTES - 8);
        let text = format!("{}x \ny{}", "a".repeat(PIECE_BYTES - 10), "b".repeat(20));
        assert_eq!(cut_point(&text), PIECE_BYTES, "no lone newline: the last boundary");
        let text = format!("ab{}", "€".repeat(PIECE_BYTES));
        assert_eq!(cut_point(&text), PIECE_BYTES - 2);
        let text = format!("{}  b c{}", "a".repeat(PIECE_BYTES - 10), "d".repeat(20));
        assert_eq!(cut_point(&text), PIECE_BYTES - 7, "before the space before c");
    }
}
