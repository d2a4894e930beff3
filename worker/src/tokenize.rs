//! Turning text into token shards: the `tokenize` command.
//!
//! Input is jsonl (one document per line, in a `text` field), or plain files (one document per
//! file), or folders of either. Documents are tokenized with a `tokenizer.json` through the
//! `tokenizers` crate, or with the built-in byte-level tokenizer (id 0 = `<|endoftext|>`,
//! byte `b` = id `b + 1`), an end-of-document token appended to each. As datatrove does, the
//! documents are first written unshuffled, then copied in a seeded random order into the
//! final shards, so memory stays flat whatever the corpus size.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, IoContext, Result};
use crate::shards::{Shard, ShardSummary, ShardWriter, TokenSize};

/// Ids of the built-in byte-level tokenizer: 256 bytes plus `<|endoftext|>`.
pub const BYTE_VOCAB: usize = 257;

/// A text tokenizer.
pub enum TextTokenizer {
    /// The built-in byte-level tokenizer.
    Bytes,
    /// A `tokenizers` tokenizer loaded from a `tokenizer.json`.
    Hf {
        inner: Box<tokenizers::Tokenizer>,
        name: String,
        eos: u32,
    },
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; `eos` names the end-of-document token (it must exist in the vocabulary).
    pub fn from_file(path: &Path, eos: &str) -> Result<TextTokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        let eos_id = inner.token_to_id(eos).ok_or_else(|| {
            Error::Tokenizer(format!(
                "{} has no token {eos:?}; pass the end-of-document token of this tokenizer with --eos-token",
                path.display()
            ))
        })?;
        let name = path.parent().and_then(Path::file_name).map_or_else(
            || path.display().to_string(),
            |d| d.to_string_lossy().into_owned(),
        );
        Ok(TextTokenizer::Hf {
            inner: Box::new(inner),
            name,
            eos: eos_id,
        })
    }

    /// The name recorded in the shards' metadata.
    pub fn name(&self) -> &str {
        match self {
            TextTokenizer::Bytes => "stagecoach/bytes",
            TextTokenizer::Hf { name, .. } => name,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            TextTokenizer::Bytes => BYTE_VOCAB,
            TextTokenizer::Hf { inner, .. } => inner.get_vocab_size(true),
        }
    }

    pub fn eos_id(&self) -> u32 {
        match self {
            TextTokenizer::Bytes => 0,
            TextTokenizer::Hf { eos, .. } => *eos,
        }
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            TextTokenizer::Bytes => Ok(text.bytes().map(|b| u32::from(b) + 1).collect()),
            TextTokenizer::Hf { inner, .. } => inner
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer(e.to_string())),
        }
    }

    /// Text of `ids` (byte-level: invalid UTF-8 replaced, `<|endoftext|>` shown as such).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        match self {
            TextTokenizer::Bytes => {
                let mut out = String::new();
                let mut bytes = Vec::new();
                for &id in ids {
                    if id == 0 {
                        out.push_str(&String::from_utf8_lossy(&bytes));
                        bytes.clear();
                        out.push_str("<|endoftext|>");
                    } else {
                        bytes.push((id - 1).clamp(0, 255) as u8);
                    }
                }
                out.push_str(&String::from_utf8_lossy(&bytes));
                Ok(out)
            }
            TextTokenizer::Hf { inner, .. } => {
                let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                inner
                    .decode(&ids, false)
                    .map_err(|e| Error::Tokenizer(e.to_string()))
            }
        }
    }
}

/// Where and how to write shards.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// Output folder; must not already hold `.ds` files.
    pub output: PathBuf,
    /// File name prefix: files are `PREFIX_00000.ds`, `PREFIX_00001.ds`, ...
    pub prefix: String,
    /// Seed of the document shuffle.
    pub seed: u64,
    /// Start a new file once this many tokens are written (documents are never split).
    pub max_tokens_per_file: u64,
    pub shuffle: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ShardsWritten {
    pub files: Vec<ShardSummary>,
    pub documents: usize,
    pub tokens: u64,
}

/// Tokenizes `docs` and writes them as shards (see the module doc). Empty documents are skipped.
pub fn write_shards<I>(
    docs: I,
    tok: &TextTokenizer,
    opts: &ShardOptions,
    progress: &ProgressBar,
) -> Result<ShardsWritten>
where
    I: IntoIterator<Item = Result<String>>,
{
    std::fs::create_dir_all(&opts.output).at(&opts.output)?;
    if has_ds_files(&opts.output)? {
        return Err(Error::Config(format!(
            "{} already holds .ds files; write to an empty folder (or remove them) so two corpora are not mixed",
            opts.output.display()
        )));
    }
    let size = TokenSize::for_vocab(tok.vocab_size());
    let tmp = opts.output.join(format!(".{}.unshuffled.ds", opts.prefix));
    let mut writer = ShardWriter::create(&tmp, size, tok.name())?;
    let mut ids = Vec::new();
    for doc in docs {
        let doc = doc?;
        if doc.is_empty() {
            continue;
        }
        ids.clear();
        ids.extend(tok.encode(&doc)?);
        ids.push(tok.eos_id());
        writer.write_document(&ids)?;
        progress.inc(1);
        progress.set_message(format!("{} tokens", writer.tokens()));
    }
    writer.finish()?;
    let unshuffled = Shard::open(&tmp, size)?;
    let mut order: Vec<u64> = (0..unshuffled.num_documents()).collect();
    if opts.shuffle {
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed));
    }
    let mut files = Vec::new();
    let mut current: Option<ShardWriter> = None;
    for doc in order {
        let tokens: Vec<u32> = unshuffled
            .document(doc)?
            .iter()
            .map(|&t| t as u32)
            .collect();
        let w = match &mut current {
            Some(w) => w,
            None => {
                let path = opts
                    .output
                    .join(format!("{}_{:05}.ds", opts.prefix, files.len()));
                current.insert(ShardWriter::create(&path, size, tok.name())?)
            }
        };
        w.write_document(&tokens)?;
        if w.tokens() >= opts.max_tokens_per_file {
            files.push(current.take().expect("open writer").finish()?);
        }
    }
    if let Some(w) = current {
        files.push(w.finish()?);
    }
    drop(unshuffled);
    for suffix in ["", ".index", ".metadata"] {
        let p = PathBuf::from(format!("{}{suffix}", tmp.display()));
        std::fs::remove_file(&p).at(&p)?;
    }
    let documents = files.iter().map(|f| f.documents).sum();
    let tokens = files.iter().map(|f| f.tokens).sum();
    Ok(ShardsWritten {
        files,
        documents,
        tokens,
    })
}

fn has_ds_files(dir: &Path) -> Result<bool> {
    for entry in std::fs::read_dir(dir).at(dir)? {
        let p = entry.at(dir)?.path();
        if p.extension().is_some_and(|e| e == "ds") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Every input file under `inputs` (folders walked recursively, in path order).
pub fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let meta = std::fs::metadata(p).at(p)?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .at(p)?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()
                .at(p)?;
            entries.sort();
            for e in entries {
                if !e
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                {
                    walk(&e, out)?;
                }
            }
        } else {
            out.push(p.to_owned());
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in inputs {
        walk(p, &mut out)?;
    }
    if out.is_empty() {
        return Err(Error::Config("no input files found".into()));
    }
    Ok(out)
}

/// The documents of `files`: each line's `text_field` for `.jsonl` files, the whole file otherwise.
pub fn read_documents(
    files: Vec<PathBuf>,
    text_field: String,
) -> impl Iterator<Item = Result<String>> {
    files
        .into_iter()
        .flat_map(move |path| -> Box<dyn Iterator<Item = Result<String>>> {
            let is_jsonl = path.extension().is_some_and(|e| e == "jsonl");
            if !is_jsonl {
                return Box::new(std::iter::once(std::fs::read_to_string(&path).at(&path)));
            }
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => return Box::new(std::iter::once(Err(e).at(&path))),
            };
            let field = text_field.clone();
            Box::new(
                std::io::BufReader::new(file)
                    .lines()
                    .enumerate()
                    .filter_map(move |(i, line)| {
                        let line = match line {
                            Ok(l) => l,
                            Err(e) => return Some(Err(e).at(&path)),
                        };
                        if line.trim().is_empty() {
                            return None;
                        }
                        let bad = |why: String| {
                            Error::Config(format!("{}:{}: {why}", path.display(), i + 1))
                        };
                        let v: serde_json::Value = match serde_json::from_str(&line) {
                            Ok(v) => v,
                            Err(e) => return Some(Err(bad(format!("not valid JSON: {e}")))),
                        };
                        Some(match v.get(&field).and_then(|t| t.as_str()) {
                            Some(t) => Ok(t.to_owned()),
                            None => Err(bad(format!(
                                "no string field {field:?} (choose the field with --text-field)"
                            ))),
                        })
                    }),
            )
        })
}

/// A progress spinner on stderr counting documents (hidden when stderr is not a terminal).
pub fn progress_bar(label: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix} {pos} docs, {msg} [{elapsed}]")
            .expect("valid template"),
    );
    pb.set_prefix(label.to_owned());
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::ShardFolder;

    #[test]
    fn bytes_round_trip() {
        let t = TextTokenizer::Bytes;
        let ids = t.encode("héllo").unwrap();
        assert_eq!(ids.len(), 6);
        let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).chain([0]).collect();
        assert_eq!(t.decode(&ids).unwrap(), "héllo<|endoftext|>");
    }

    #[test]
    fn jsonl_to_shards_keeps_every_document_once() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        let docs: Vec<String> = (0..50)
            .map(|i| format!("document number {i} says {}", "x".repeat(i)))
            .collect();
        let lines: Vec<String> = docs
            .iter()
            .map(|d| serde_json::json!({ "text": d, "id": 1 }).to_string())
            .collect();
        std::fs::write(&input, lines.join("\n")).unwrap();
        let opts = ShardOptions {
            output: dir.path().join("out"),
            prefix: "part".into(),
            seed: 7,
            max_tokens_per_file: 600,
            shuffle: true,
        };
        let tok = TextTokenizer::Bytes;
        let files = input_files(std::slice::from_ref(&input)).unwrap();
        let written = write_shards(
            read_documents(files, "text".into()),
            &tok,
            &opts,
            &ProgressBar::hidden(),
        )
        .unwrap();
        assert_eq!(written.documents, 50);
        assert!(written.files.len() > 1, "expected several files");
        // Every document comes back exactly once, in a shuffled order; no temporary file is left.
        let folder = ShardFolder::open(&opts.output, TokenSize::U16).unwrap();
        let mut back = Vec::new();
        for shard in folder.shards() {
            for d in 0..shard.num_documents() {
                let text = tok.decode(&shard.document(d).unwrap()).unwrap();
                back.push(text.strip_suffix("<|endoftext|>").unwrap().to_owned());
            }
        }
        assert_ne!(back, docs, "documents should be shuffled");
        back.sort();
        let mut sorted = docs.clone();
        sorted.sort();
        assert_eq!(back, sorted);
        assert_eq!(
            std::fs::read_dir(&opts.output).unwrap().count(),
            written.files.len() * 3
        );
        // Writing into the same folder again is refused.
        let files = input_files(&[input]).unwrap();
        let err = write_shards(
            read_documents(files, "text".into()),
            &tok,
            &opts,
            &ProgressBar::hidden(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("already holds"), "{err}");
    }

    #[test]
    fn bad_jsonl_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("bad.jsonl");
        std::fs::write(&input, "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n").unwrap();
        let docs: Vec<_> = read_documents(vec![input], "text".into()).collect();
        let err = docs[1].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("bad.jsonl:2") && err.contains("--text-field"),
            "{err}"
        );
    }
}
