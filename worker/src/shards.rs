//! Token shards in the datatrove/nanotron tokenized format.
//!
//! A shard is three files side by side:
//! - `NAME.ds`: the tokens of all documents, concatenated, little-endian `uint16` (or `uint32`
//!   when the vocabulary exceeds 65,536 ids);
//! - `NAME.ds.index`: one little-endian `uint64` per document, the cumulative token count at the
//!   end of that document (so the last entry equals the number of tokens in `NAME.ds`);
//! - `NAME.ds.metadata`: text; first line the tokenizer name followed by `|2` or `|4` (the token
//!   size in bytes), second line the token count, third line the same count for humans.
//!
//! A folder of shards is read as one token stream: its `.ds` files in name order, concatenated.
//! A sample is a window of that stream addressed by its first token's offset (the coordinator
//! decides which offsets; see `SampleRef` in the proto), so a window may span two files.
//! Files are memory-mapped; nothing is read until a window is asked for.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, IoContext, Result};

/// Bytes per token in a `.ds` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSize {
    U16,
    U32,
}

impl TokenSize {
    /// The narrowest size that holds every id of a vocabulary of `vocab_size` tokens.
    pub fn for_vocab(vocab_size: usize) -> TokenSize {
        if vocab_size <= 1 << 16 {
            TokenSize::U16
        } else {
            TokenSize::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            TokenSize::U16 => 2,
            TokenSize::U32 => 4,
        }
    }

    fn from_bytes(n: usize) -> Option<TokenSize> {
        match n {
            2 => Some(TokenSize::U16),
            4 => Some(TokenSize::U32),
            _ => None,
        }
    }
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes one shard: call [`ShardWriter::write_document`] per document, then
/// [`ShardWriter::finish`], which writes the index and metadata files.
pub struct ShardWriter {
    path: PathBuf,
    out: BufWriter<File>,
    token_size: TokenSize,
    tokenizer_name: String,
    doc_ends: Vec<u64>,
    written: u64,
}

/// What a finished shard holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSummary {
    pub path: PathBuf,
    pub documents: usize,
    pub tokens: u64,
}

impl ShardWriter {
    /// Creates `path` (which should end in `.ds`) and its sidecars on [`finish`](Self::finish).
    pub fn create(path: &Path, token_size: TokenSize, tokenizer_name: &str) -> Result<Self> {
        let file = File::create(path).at(path)?;
        Ok(ShardWriter {
            path: path.to_owned(),
            out: BufWriter::with_capacity(1 << 20, file),
            token_size,
            tokenizer_name: tokenizer_name.to_owned(),
            doc_ends: Vec::new(),
            written: 0,
        })
    }

    /// Appends one document (its end-of-document token included, if the caller wants one).
    pub fn write_document(&mut self, tokens: &[u32]) -> Result<()> {
        match self.token_size {
            TokenSize::U16 => {
                for &t in tokens {
                    let t16 = u16::try_from(t).map_err(|_| {
                        Error::shard(
                            &self.path,
                            format!("token id {t} does not fit the 2-byte token size; use a 4-byte shard for vocabularies over 65,536"),
                        )
                    })?;
                    self.out.write_all(&t16.to_le_bytes()).at(&self.path)?;
                }
            }
            TokenSize::U32 => {
                for &t in tokens {
                    self.out.write_all(&t.to_le_bytes()).at(&self.path)?;
                }
            }
        }
        self.written += tokens.len() as u64;
        self.doc_ends.push(self.written);
        Ok(())
    }

    /// Tokens written so far.
    pub fn tokens(&self) -> u64 {
        self.written
    }

    /// Flushes the tokens and writes `.ds.index` and `.ds.metadata`.
    pub fn finish(mut self) -> Result<ShardSummary> {
        self.out.flush().at(&self.path)?;
        self.out.get_ref().sync_all().at(&self.path)?;
        let index_path = sidecar(&self.path, ".index");
        let mut index = BufWriter::new(File::create(&index_path).at(&index_path)?);
        for end in &self.doc_ends {
            index.write_all(&end.to_le_bytes()).at(&index_path)?;
        }
        index.flush().at(&index_path)?;
        let meta_path = sidecar(&self.path, ".metadata");
        let meta = format!(
            "{}|{}\n{}\n{}",
            self.tokenizer_name,
            self.token_size.bytes(),
            self.written,
            human_count(self.written)
        );
        std::fs::write(&meta_path, meta).at(&meta_path)?;
        Ok(ShardSummary {
            path: self.path,
            documents: self.doc_ends.len(),
            tokens: self.written,
        })
    }
}

/// `1234567` → `"1.23 MT"`, as datatrove's metadata third line.
fn human_count(n: u64) -> String {
    let units = [(1e12, "TT"), (1e9, "GT"), (1e6, "MT"), (1e3, "kT")];
    for (scale, unit) in units {
        if n as f64 >= scale {
            return format!("{:.2} {unit}", n as f64 / scale);
        }
    }
    format!("{n} T")
}

/// One memory-mapped, validated `.ds` file.
pub struct Shard {
    path: PathBuf,
    tokens: Option<Mmap>,
    token_size: TokenSize,
    num_tokens: u64,
    doc_ends: Vec<u64>,
    tokenizer_name: Option<String>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("token_size", &self.token_size)
            .field("num_tokens", &self.num_tokens)
            .finish()
    }
}

impl Shard {
    /// Opens and checks a shard. The token size comes from the metadata file when it names one,
    /// else `default_size`. Checks: the `.ds` size is a whole number of tokens, the index is a
    /// whole number of non-decreasing `uint64` ends whose last value is the token count, and the
    /// metadata's token count (if present) agrees.
    pub fn open(path: &Path, default_size: TokenSize) -> Result<Shard> {
        let meta = read_metadata(path)?;
        let token_size = meta
            .as_ref()
            .and_then(|m| m.token_size)
            .unwrap_or(default_size);
        let file = File::open(path).at(path)?;
        let len = file.metadata().at(path)?.len();
        let tsize = token_size.bytes() as u64;
        if len % tsize != 0 {
            return Err(Error::shard(
                path,
                format!("size {len} bytes is not a whole number of {tsize}-byte tokens (truncated or damaged file)"),
            ));
        }
        let num_tokens = len / tsize;
        if let Some(count) = meta.as_ref().and_then(|m| m.token_count) {
            if count != num_tokens {
                return Err(Error::shard(
                    path,
                    format!("holds {num_tokens} tokens but its .metadata says {count} (truncated .ds or stale metadata)"),
                ));
            }
        }
        let doc_ends = check_index(path, num_tokens)?;
        // An empty file cannot be mapped; it simply holds no samples.
        let tokens = if len == 0 {
            None
        } else {
            // SAFETY: the mapping is read-only; shards are immutable once written (a file changed
            // under a running job is a user error that can at worst yield wrong tokens, which
            // are range-checked before use).
            Some(unsafe { Mmap::map(&file) }.at(path)?)
        };
        Ok(Shard {
            path: path.to_owned(),
            tokens,
            token_size,
            num_tokens,
            doc_ends,
            tokenizer_name: meta.map(|m| m.tokenizer_name),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn num_tokens(&self) -> u64 {
        self.num_tokens
    }

    pub fn num_documents(&self) -> u64 {
        self.doc_ends.len() as u64
    }

    pub fn token_size(&self) -> TokenSize {
        self.token_size
    }

    pub fn tokenizer_name(&self) -> Option<&str> {
        self.tokenizer_name.as_deref()
    }

    /// Copies tokens `[start, start + out.len())` into `out`.
    pub fn read_tokens(&self, start: u64, out: &mut [i64]) -> Result<()> {
        let end = start + out.len() as u64;
        if end > self.num_tokens {
            return Err(Error::shard(
                &self.path,
                format!(
                    "tokens {start}..{end} asked for, but the file holds {}",
                    self.num_tokens
                ),
            ));
        }
        let Some(bytes) = &self.tokens else {
            return Ok(());
        };
        let tsize = self.token_size.bytes();
        let bytes = &bytes[start as usize * tsize..end as usize * tsize];
        match self.token_size {
            TokenSize::U16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = i64::from(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            TokenSize::U32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                }
            }
        }
        Ok(())
    }

    /// The tokens of document `doc` (end-of-document token included).
    pub fn document(&self, doc: u64) -> Result<Vec<i64>> {
        let ends = &self.doc_ends;
        let Some(&end) = ends.get(doc as usize) else {
            return Err(Error::shard(
                &self.path,
                format!(
                    "document {doc} asked for, but the file holds {}",
                    ends.len()
                ),
            ));
        };
        let start = if doc == 0 { 0 } else { ends[doc as usize - 1] };
        let mut out = vec![0; (end - start) as usize];
        self.read_tokens(start, &mut out)?;
        Ok(out)
    }
}

struct Metadata {
    tokenizer_name: String,
    token_size: Option<TokenSize>,
    token_count: Option<u64>,
}

fn read_metadata(ds: &Path) -> Result<Option<Metadata>> {
    let path = sidecar(ds, ".metadata");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).at(&path),
    };
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    let (name, size) = match first.rsplit_once('|') {
        Some((name, size)) => {
            let bytes: usize = size.trim().parse().map_err(|_| {
                Error::shard(
                    &path,
                    format!("first line {first:?}: expected NAME|2 or NAME|4"),
                )
            })?;
            let size = TokenSize::from_bytes(bytes).ok_or_else(|| {
                Error::shard(
                    &path,
                    format!("token size {bytes} in {first:?}: only 2 and 4 exist"),
                )
            })?;
            (name.to_owned(), Some(size))
        }
        None => (first.to_owned(), None),
    };
    let count = match lines.next() {
        Some(l) if !l.trim().is_empty() => Some(l.trim().parse().map_err(|_| {
            Error::shard(
                &path,
                format!("second line {l:?} should be the token count"),
            )
        })?),
        _ => None,
    };
    Ok(Some(Metadata {
        tokenizer_name: name,
        token_size: size,
        token_count: count,
    }))
}

fn read_index(ds: &Path) -> Result<Vec<u64>> {
    let path = sidecar(ds, ".index");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::shard(
            &path,
            "missing: every .ds needs its .ds.index of document ends (re-run the tokenize command)",
        )),
        Err(e) => return Err(e).at(&path),
    };
    if bytes.len() % 8 != 0 {
        return Err(Error::shard(
            &path,
            format!(
                "size {} bytes is not a whole number of uint64 document ends (truncated?)",
                bytes.len()
            ),
        ));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Validates the index against the token count; returns the document ends.
fn check_index(ds: &Path, num_tokens: u64) -> Result<Vec<u64>> {
    let ends = read_index(ds)?;
    let path = sidecar(ds, ".index");
    let mut prev = 0;
    for (i, &end) in ends.iter().enumerate() {
        if end < prev {
            return Err(Error::shard(
                &path,
                format!("document ends go backwards at entry {i} ({end} after {prev}): not an index of this format"),
            ));
        }
        prev = end;
    }
    if prev != num_tokens {
        return Err(Error::shard(
            &path,
            format!(
                "the last document ends at token {prev} but {} holds {num_tokens} tokens (truncated .ds or an index of another file)",
                ds.display()
            ),
        ));
    }
    Ok(ends)
}

/// All `.ds` files of a folder, read as one token stream.
#[derive(Debug)]
pub struct ShardFolder {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// `starts[i]`: the stream offset of shard `i`'s first token; one more entry, the total.
    starts: Vec<u64>,
}

impl ShardFolder {
    /// Opens every `*.ds` file under `dir` (recursively, in path order). Shards whose metadata
    /// names no token size are read with `default_size`.
    pub fn open(dir: &Path, default_size: TokenSize) -> Result<ShardFolder> {
        let mut files = Vec::new();
        collect_ds(dir, &mut files)?;
        files.sort();
        if files.is_empty() {
            return Err(Error::shard(
                dir,
                "no .ds files found (expected a folder written by the tokenize command)",
            ));
        }
        let shards = files
            .iter()
            .map(|f| Shard::open(f, default_size))
            .collect::<Result<Vec<_>>>()?;
        let mut starts = Vec::with_capacity(shards.len() + 1);
        let mut total = 0;
        starts.push(0);
        for s in &shards {
            total += s.num_tokens();
            starts.push(total);
        }
        if total == 0 {
            return Err(Error::shard(
                dir,
                format!(
                    "its {} .ds file(s) hold no tokens: there is nothing to train on (tokenize \
                     documents into the folder again)",
                    shards.len()
                ),
            ));
        }
        Ok(ShardFolder {
            dir: dir.to_owned(),
            shards,
            starts,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Tokens in the whole stream.
    pub fn num_tokens(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// The shard file holding token `offset` of the stream, and the token's offset in that
    /// file; `None` past the end.
    pub fn locate(&self, offset: u64) -> Option<(&Path, u64)> {
        if offset >= self.num_tokens() {
            return None;
        }
        // The last shard starting at or before `offset`: it holds tokens (an empty one shares
        // its start with the next).
        let i = self.starts.partition_point(|&s| s <= offset) - 1;
        Some((self.shards[i].path(), offset - self.starts[i]))
    }

    /// Refuses `window`, the tokens of the stream from `offset`, if one lies outside `0..vocab`,
    /// with an [`Error::Data`] naming the shard file and the token's offset in it.
    pub fn check_vocab(&self, offset: u64, window: &[i64], vocab: i64) -> Result<()> {
        let Some((i, &bad)) = window
            .iter()
            .enumerate()
            .find(|(_, &t)| t < 0 || t >= vocab)
        else {
            return Ok(());
        };
        let at = offset + i as u64;
        let (path, in_file) = self.locate(at).unwrap_or((self.dir(), at));
        Err(Error::Data {
            path: path.to_owned(),
            offset: in_file,
            reason: format!(
                "token id {bad} is outside the model's vocabulary of {vocab} ids (0..{}); the \
                 shards were tokenized for another vocabulary: tokenize them again with the \
                 model's tokenizer, or train a model whose vocab_size covers them",
                vocab - 1
            ),
        })
    }

    /// Copies the `out.len()` tokens of the stream that start at token `offset` into `out`,
    /// across file boundaries.
    pub fn read_window(&self, offset: u64, out: &mut [i64]) -> Result<()> {
        let total = self.num_tokens();
        let end = offset.checked_add(out.len() as u64).filter(|&e| e <= total);
        let Some(end) = end else {
            return Err(Error::shard(
                &self.dir,
                format!(
                    "tokens {offset}..{} asked for, but the folder holds {total} tokens (every worker must see the same data)",
                    offset.saturating_add(out.len() as u64)
                ),
            ));
        };
        // The last shard starting at or before `offset`; empty shards are skipped over below.
        let mut i = self.starts.partition_point(|&s| s <= offset) - 1;
        let mut pos = offset;
        let mut written = 0;
        while pos < end {
            let (start, stop) = (self.starts[i], self.starts[i + 1]);
            let n = (stop.min(end) - pos) as usize;
            if n > 0 {
                self.shards[i].read_tokens(pos - start, &mut out[written..written + n])?;
                written += n;
                pos += n as u64;
            }
            i += 1;
        }
        Ok(())
    }
}

/// The `.ds` files under `dir` (in path order) that have no `.ds.metadata` beside them: their
/// token size is whatever the reader is told (a model's vocabulary decides it for training).
pub fn without_metadata(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    collect_ds(dir, &mut files)?;
    files.sort();
    files.retain(|f| !sidecar(f, ".metadata").exists());
    Ok(files)
}

fn collect_ds(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).at(dir)?;
    for entry in entries {
        let path = entry.at(dir)?.path();
        if path.is_dir() {
            collect_ds(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "ds") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, size: TokenSize, docs: &[Vec<u32>]) -> PathBuf {
        let path = dir.join(name);
        let mut w = ShardWriter::create(&path, size, "test-tok").unwrap();
        for d in docs {
            w.write_document(d).unwrap();
        }
        w.finish().unwrap();
        path
    }

    fn docs() -> Vec<Vec<u32>> {
        vec![vec![5, 6, 7, 0], vec![9, 0], (1..=20).chain([0]).collect()]
    }

    #[test]
    fn round_trip_u16_and_u32() {
        let dir = tempfile::tempdir().unwrap();
        for (size, big) in [(TokenSize::U16, 65_535u32), (TokenSize::U32, 100_000u32)] {
            let mut docs = docs();
            docs.push(vec![big, 0]);
            let path = write(dir.path(), &format!("x{}.ds", size.bytes()), size, &docs);
            // Opened with the wrong default: the metadata's token size wins.
            let other = if size == TokenSize::U16 {
                TokenSize::U32
            } else {
                TokenSize::U16
            };
            let shard = Shard::open(&path, other).unwrap();
            assert_eq!(shard.token_size(), size);
            assert_eq!(shard.num_documents(), docs.len() as u64);
            assert_eq!(shard.tokenizer_name(), Some("test-tok"));
            for (i, d) in docs.iter().enumerate() {
                let back: Vec<u32> = shard
                    .document(i as u64)
                    .unwrap()
                    .iter()
                    .map(|&t| t as u32)
                    .collect();
                assert_eq!(&back, d);
            }
        }
    }

    #[test]
    fn file_layout_is_datatrove() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a.ds",
            TokenSize::U16,
            &[vec![1, 2, 0], vec![258, 0]],
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            [1, 0, 2, 0, 0, 0, 2, 1, 0, 0]
        );
        let index = std::fs::read(sidecar(&path, ".index")).unwrap();
        assert_eq!(index, [3u64.to_le_bytes(), 5u64.to_le_bytes()].concat());
        let meta = std::fs::read_to_string(sidecar(&path, ".metadata")).unwrap();
        assert_eq!(
            meta.lines().take(2).collect::<Vec<_>>(),
            ["test-tok|2", "5"]
        );
    }

    #[test]
    fn folder_windows_span_files_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        // Written out of name order, with an empty file between: the stream is a, (empty), b,
        // then c in a subfolder (path order).
        write(dir.path(), "b.ds", TokenSize::U16, &[(200..211).collect()]);
        write(
            dir.path(),
            "a.ds",
            TokenSize::U16,
            &[(100..120).collect(), (120..125).collect()],
        );
        write(dir.path(), "a_empty.ds", TokenSize::U16, &[]);
        std::fs::create_dir(dir.path().join("c")).unwrap();
        write(
            &dir.path().join("c"),
            "c.ds",
            TokenSize::U16,
            &[(300..304).collect()],
        );
        let folder = ShardFolder::open(dir.path(), TokenSize::U16).unwrap();
        assert_eq!(folder.shards().len(), 4);
        assert_eq!(folder.num_tokens(), 25 + 11 + 4);
        let stream: Vec<i64> = (100..125).chain(200..211).chain(300..304).collect();
        let mut out = [0i64; 5];
        // Within a file, at its very end, and across one and two boundaries (the empty file and
        // the folder boundary included).
        for offset in [0u64, 4, 20, 22, 24, 25, 33, 35] {
            folder.read_window(offset, &mut out).unwrap();
            assert_eq!(
                out[..],
                stream[offset as usize..offset as usize + 5],
                "offset {offset}"
            );
        }
        let mut all = vec![0i64; stream.len()];
        folder.read_window(0, &mut all).unwrap();
        assert_eq!(all, stream);
        // Consecutive windows of seq_len 4 advance by 4 and share one token.
        let (mut w0, mut w1) = ([0i64; 5], [0i64; 5]);
        folder.read_window(20, &mut w0).unwrap();
        folder.read_window(24, &mut w1).unwrap();
        assert_eq!(w0[4], w1[0]);
        // Past the end: the folder, the offset and the token count are named.
        let err = folder.read_window(36, &mut out).unwrap_err().to_string();
        assert!(
            err.contains(&dir.path().display().to_string())
                && err.contains("tokens 36..41")
                && err.contains("holds 40 tokens"),
            "{err}"
        );
        let err = folder
            .read_window(u64::MAX, &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds 40 tokens"), "{err}");
    }

    /// A stream offset is found in its file (empty files and subfolders skipped), and a window
    /// with a token outside the vocabulary is a data error naming that file and offset.
    #[test]
    fn tokens_are_located_in_their_file_and_checked_against_the_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.ds", TokenSize::U16, &[(0..10).collect()]);
        write(dir.path(), "a_empty.ds", TokenSize::U16, &[]);
        let b = write(dir.path(), "b.ds", TokenSize::U16, &[vec![1, 2, 999, 3]]);
        let folder = ShardFolder::open(dir.path(), TokenSize::U16).unwrap();
        assert_eq!(folder.locate(0), Some((a.as_path(), 0)));
        assert_eq!(folder.locate(9), Some((a.as_path(), 9)));
        assert_eq!(folder.locate(10), Some((b.as_path(), 0)));
        assert_eq!(folder.locate(13), Some((b.as_path(), 3)));
        assert_eq!(folder.locate(14), None);

        let mut window = [0i64; 6];
        folder.read_window(7, &mut window).unwrap();
        assert_eq!(window, [7, 8, 9, 1, 2, 999]);
        folder.check_vocab(7, &window, 1000).unwrap();
        let err = folder.check_vocab(7, &window, 264).unwrap_err();
        let Error::Data {
            path,
            offset,
            reason,
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!((path, *offset), (&b, 2));
        assert!(
            reason.contains("token id 999 is outside the model's vocabulary of 264 ids"),
            "{reason}"
        );
        assert!(err
            .to_string()
            .starts_with(&format!("{}, token 2: token id 999", b.display())));
    }

    #[test]
    fn truncated_ds_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "t.ds", TokenSize::U16, &docs());
        let len = std::fs::metadata(&path).unwrap().len();
        // Odd length: not a whole token.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 1).unwrap();
        let err = Shard::open(&path, TokenSize::U16).unwrap_err().to_string();
        assert!(
            err.contains("t.ds") && err.contains("not a whole number"),
            "{err}"
        );
        // Whole tokens missing, metadata removed: the index catches it.
        f.set_len(len - 4).unwrap();
        std::fs::remove_file(sidecar(&path, ".metadata")).unwrap();
        let err = Shard::open(&path, TokenSize::U16).unwrap_err().to_string();
        assert!(
            err.contains("t.ds.index") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn wrong_index_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "w.ds", TokenSize::U16, &docs());
        let index = sidecar(&path, ".index");
        // An index from another file: ends that do not reach the token count.
        std::fs::write(&index, [2u64.to_le_bytes(), 4u64.to_le_bytes()].concat()).unwrap();
        let err = Shard::open(&path, TokenSize::U16).unwrap_err().to_string();
        assert!(
            err.contains("w.ds.index") && err.contains("last document ends at token 4"),
            "{err}"
        );
        // Ends going backwards.
        std::fs::write(&index, [9u64.to_le_bytes(), 4u64.to_le_bytes()].concat()).unwrap();
        let err = Shard::open(&path, TokenSize::U16).unwrap_err().to_string();
        assert!(err.contains("backwards"), "{err}");
        // Not a whole number of uint64.
        std::fs::write(&index, [1u8, 2, 3]).unwrap();
        let err = Shard::open(&path, TokenSize::U16).unwrap_err().to_string();
        assert!(err.contains("not a whole number of uint64"), "{err}");
        // Missing.
        std::fs::remove_file(&index).unwrap();
        let err = Shard::open(&path, TokenSize::U16).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn token_too_large_for_u16_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(&dir.path().join("big.ds"), TokenSize::U16, "t").unwrap();
        let err = w.write_document(&[70_000]).unwrap_err().to_string();
        assert!(err.contains("70000") && err.contains("4-byte"), "{err}");
    }

    #[test]
    fn empty_folder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = ShardFolder::open(dir.path(), TokenSize::U16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no .ds files"), "{err}");
        // Shards, but not one token in them.
        write(dir.path(), "a.ds", TokenSize::U16, &[]);
        write(dir.path(), "b.ds", TokenSize::U16, &[vec![]]);
        let err = ShardFolder::open(dir.path(), TokenSize::U16)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&dir.path().display().to_string())
                && err.contains("its 2 .ds file(s) hold no tokens"),
            "{err}"
        );
    }

    #[test]
    fn shards_without_metadata_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.ds", TokenSize::U16, &docs());
        let b = write(dir.path(), "b.ds", TokenSize::U16, &docs());
        assert_eq!(without_metadata(dir.path()).unwrap(), Vec::<PathBuf>::new());
        std::fs::remove_file(sidecar(&b, ".metadata")).unwrap();
        assert_eq!(without_metadata(dir.path()).unwrap(), [b]);
        // The reader opens it all the same, with the size it is given.
        let folder = ShardFolder::open(dir.path(), TokenSize::U16).unwrap();
        assert_eq!(folder.shards()[1].tokenizer_name(), None);
        assert_eq!(folder.shards()[0].path(), a);
    }
}
