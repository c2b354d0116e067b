//! One document's token ids while its pieces are tokenized (in memory up to a limit, the rest in an unnamed temporary file), and the hash of its text that picks its split.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::error::DataError;
use crate::format::Split;
use crate::writer::DatasetWriter;

/// Token ids of one document kept in memory (16 MiB); a longer document's go to a temporary file.
const IN_MEMORY_TOKENS: usize = 4 << 20;

/// The document being tokenized.
pub struct DocumentTokens {
    /// Where the temporary file goes (the output's temporary directory).
    spill_dir: PathBuf,
    hasher: Xxh3,
    ids: Vec<u32>,
    /// Ids written out before `ids`, as little-endian u32.
    spilled: Option<BufWriter<File>>,
}

impl DocumentTokens {
    pub fn new(spill_dir: &Path) -> Self {
        DocumentTokens { spill_dir: spill_dir.to_path_buf(), hasher: Xxh3::new(), ids: Vec::new(), spilled: None }
    }

    /// Adds a piece of the document: its text to the hash, its token ids after the ones before.
    pub fn push(&mut self, text: &str, ids: &[u32]) -> Result<(), DataError> {
        self.hasher.update(text.as_bytes());
        self.ids.extend_from_slice(ids);
        if self.ids.len() > IN_MEMORY_TOKENS {
            let io = |e| DataError::io(&self.spill_dir, e);
            let out = match &mut self.spilled {
                Some(out) => out,
                None => self.spilled.insert(BufWriter::new(tempfile::tempfile_in(&self.spill_dir).map_err(io)?)),
            };
            let bytes: Vec<u8> = self.ids.iter().flat_map(|id| id.to_le_bytes()).collect();
            out.write_all(&bytes).map_err(io)?;
            self.ids.clear();
        }
        Ok(())
    }

    /// xxh3-64 of the document's text (the same as of the whole text at once).
    pub fn text_hash(&self) -> u64 {
        self.hasher.digest()
    }

    /// Writes `head`, the document's ids and `tail` as one document of `split`, then starts the next document;
    /// returns the number of tokens written.
    pub fn write_to(
        &mut self,
        writer: &mut DatasetWriter,
        split: Split,
        head: &[u32],
        tail: &[u32],
    ) -> Result<u64, DataError> {
        writer.push_tokens(split, head)?;
        let mut count = (head.len() + self.ids.len() + tail.len()) as u64;
        if let Some(out) = self.spilled.take() {
            let io = |e| DataError::io(&self.spill_dir, e);
            let mut file = out.into_inner().map_err(|e| io(e.into_error()))?;
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            let (mut bytes, mut ids) = (Vec::with_capacity(4 << 20), Vec::with_capacity(1 << 20));
            loop {
                bytes.clear();
                (&mut file).take(4 << 20).read_to_end(&mut bytes).map_err(io)?;
                if bytes.is_empty() {
                    break;
                }
                ids.clear();
                ids.extend(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
                writer.push_tokens(split, &ids)?;
                count += ids.len() as u64;
            }
        }
        writer.push_tokens(split, &self.ids)?;
        writer.push_tokens(split, tail)?;
        writer.end_document(split)?;
        self.clear();
        Ok(count)
    }

    /// Forgets the document (it is dropped, or written) and starts the next.
    pub fn clear(&mut self) {
        self.hasher.reset();
        self.ids.clear();
        self.spilled = None;
    }
}
