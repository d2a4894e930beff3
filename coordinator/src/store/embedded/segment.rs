//! The embedded store's segments: immutable files that hold the latest state of each key they
//! cover (a value with its metadata, or a deletion), in key order, read a block at a time. A
//! flush writes one from a memtable; a merge writes one from several, newest winning. Only a
//! segment's block index (one key per block of about [`BLOCK_BYTES`]) is held in memory.
//!
//! A segment holds the flushes `lo..=hi` and is named `{lo:020}-{hi:020}.seg`. It is written as
//! `<name>.tmp`, synced, renamed into place and the directory synced, so a file with the name is
//! always complete; a merge's inputs are deleted only after its output is in place, and a
//! segment whose flushes another covers is such a leftover.
//!
//! Byte layout (integers little-endian, a byte string is `len: u32 | bytes`):
//! - blocks, each a frame (`len: u32 | crc32: u32 | payload`, as the log's records) whose payload
//!   is entries `key | tag: u8 (1 value, 2 deleted) | value | version: u64 | mod_revision: u64`
//!   (the last three for values only), in key order;
//! - the index, one frame: `revision: u64 | entries: u64 | block count: u32 | per block
//!   first key | offset: u64 | len: u32 | last key` (the last key of the segment);
//! - the footer: `index offset: u64 | magic "SCSEG\0\0\x01"`.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{frame, put_bytes, unframe, Reader};
use crate::store::{StoreError, Versioned};

/// A key's latest state in a memtable or a segment; `None` is a deletion (a tombstone), which
/// hides the key's value in older segments until a merge into the oldest drops both.
pub(super) type Entry = Option<Versioned>;

/// The payload size after which a block is closed.
pub(super) const BLOCK_BYTES: usize = 4096;
pub const SEGMENT_EXTENSION: &str = "seg";
const MAGIC: &[u8; 8] = b"SCSEG\0\0\x01";
const FOOTER: u64 = 16;
const VALUE: u8 = 1;
const DELETED: u8 = 2;

/// An open segment: its file and block index.
pub(super) struct Segment {
    pub(super) path: PathBuf,
    file: File,
    /// The flushes it holds.
    pub(super) lo: u64,
    pub(super) hi: u64,
    /// It holds every write up to this store revision.
    pub(super) revision: u64,
    /// Its size on disk.
    pub(super) bytes: u64,
    pub(super) entries: u64,
    blocks: Vec<Block>,
    last_key: String,
}

struct Block {
    first_key: String,
    offset: u64,
    len: u32,
}

/// The file name of the segment holding flushes `lo..=hi`.
pub(super) fn name(lo: u64, hi: u64) -> String {
    format!("{lo:020}-{hi:020}.{SEGMENT_EXTENSION}")
}

/// The flushes a segment's file name says it holds; `None` for any other file.
pub(super) fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (lo, hi) = name
        .strip_suffix(SEGMENT_EXTENSION)?
        .strip_suffix('.')?
        .split_once('-')?;
    let (lo, hi) = (lo.parse().ok()?, hi.parse().ok()?);
    (lo <= hi).then_some((lo, hi))
}

impl Segment {
    /// Opens the segment at `path` (holding flushes `lo..=hi`), reading its index.
    pub(super) fn open(path: PathBuf, lo: u64, hi: u64) -> Result<Self, StoreError> {
        let file = File::open(&path).map_err(StoreError::io(&path))?;
        let bytes = file.metadata().map_err(StoreError::io(&path))?.len();
        let corrupt = |reason: &str| {
            StoreError::Corrupt {
            path: path.clone(),
            reason: format!("the segment {reason} (segments are written whole and synced before they are named: this is damage)"),
        }
        };
        if bytes < FOOTER {
            return Err(corrupt("is shorter than its footer"));
        }
        let mut footer = [0; FOOTER as usize];
        file.read_exact_at(&mut footer, bytes - FOOTER)
            .map_err(StoreError::io(&path))?;
        let index_at = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
        if &footer[8..] != MAGIC || index_at > bytes - FOOTER {
            return Err(corrupt("has no valid footer"));
        }
        let mut index = vec![0; (bytes - FOOTER - index_at) as usize];
        file.read_exact_at(&mut index, index_at)
            .map_err(StoreError::io(&path))?;
        let payload = unframe(&index, 0)
            .filter(|&(_, end)| end == index.len())
            .map(|(payload, _)| payload)
            .ok_or_else(|| corrupt("index fails its checksum"))?;
        let r = &mut Reader(payload);
        let decoded = (|| {
            let (revision, entries) = (r.u64()?, r.u64()?);
            let blocks = (0..r.u32()?)
                .map(|_| {
                    Some(Block {
                        first_key: r.string()?,
                        offset: r.u64()?,
                        len: r.u32()?,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            let last_key = r.string()?;
            r.0.is_empty()
                .then_some((revision, entries, blocks, last_key))
        })();
        let (revision, entries, blocks, last_key) =
            decoded.ok_or_else(|| corrupt("index cannot be decoded"))?;
        if blocks
            .iter()
            .any(|b| b.offset.saturating_add(u64::from(b.len)) > index_at)
        {
            return Err(corrupt("index points past its blocks"));
        }
        Ok(Self {
            path,
            file,
            lo,
            hi,
            revision,
            bytes,
            entries,
            blocks,
            last_key,
        })
    }

    /// The memory its index takes, roughly.
    pub(super) fn index_bytes(&self) -> u64 {
        let keys: usize = self.blocks.iter().map(|b| b.first_key.len()).sum();
        (keys + self.blocks.len() * std::mem::size_of::<Block>() + self.last_key.len()) as u64
    }

    /// The key's entry if this segment has one (`Some(None)`: deleted as of this segment).
    pub(super) fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        if self.blocks.is_empty()
            || key < self.blocks[0].first_key.as_str()
            || key > self.last_key.as_str()
        {
            return Ok(None);
        }
        let at = self.blocks.partition_point(|b| b.first_key.as_str() <= key) - 1;
        Ok(self
            .block(at)?
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, entry)| entry))
    }

    /// Every entry whose key starts with `prefix`, in key order.
    pub(super) fn range(&self, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        let mut out = Vec::new();
        if self.blocks.is_empty() || self.last_key.as_str() < prefix {
            return Ok(out);
        }
        let start = self
            .blocks
            .partition_point(|b| b.first_key.as_str() <= prefix)
            .saturating_sub(1);
        for at in start..self.blocks.len() {
            if at > start && !self.blocks[at].first_key.starts_with(prefix) {
                break;
            }
            for (key, entry) in self.block(at)? {
                if key.starts_with(prefix) {
                    out.push((key, entry));
                } else if key.as_str() > prefix {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// Its entries in key order, a block at a time.
    pub(super) fn iter(&self) -> Entries<'_> {
        Entries {
            segment: self,
            next_block: 0,
            pending: Vec::new().into_iter(),
        }
    }

    fn block(&self, at: usize) -> Result<Vec<(String, Entry)>, StoreError> {
        let block = &self.blocks[at];
        let mut bytes = vec![0; block.len as usize];
        self.file
            .read_exact_at(&mut bytes, block.offset)
            .map_err(StoreError::io(&self.path))?;
        let corrupt = |reason: &str| StoreError::Corrupt {
            path: self.path.clone(),
            reason: format!("block {at} at byte {} {reason}", block.offset),
        };
        let payload = unframe(&bytes, 0)
            .filter(|&(_, end)| end == bytes.len())
            .map(|(payload, _)| payload)
            .ok_or_else(|| corrupt("fails its checksum"))?;
        decode_block(payload).ok_or_else(|| corrupt("cannot be decoded"))
    }
}

/// A segment's entries in key order (see [`Segment::iter`]).
pub(super) struct Entries<'a> {
    segment: &'a Segment,
    next_block: usize,
    pending: std::vec::IntoIter<(String, Entry)>,
}

impl Iterator for Entries<'_> {
    type Item = Result<(String, Entry), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(entry) = self.pending.next() {
                return Some(Ok(entry));
            }
            if self.next_block == self.segment.blocks.len() {
                return None;
            }
            match self.segment.block(self.next_block) {
                Ok(entries) => self.pending = entries.into_iter(),
                Err(e) => {
                    self.next_block = self.segment.blocks.len();
                    return Some(Err(e));
                }
            }
            self.next_block += 1;
        }
    }
}

fn decode_block(payload: &[u8]) -> Option<Vec<(String, Entry)>> {
    let r = &mut Reader(payload);
    let mut out = Vec::new();
    while !r.0.is_empty() {
        let key = r.string()?;
        let entry = match r.u8()? {
            VALUE => Some(Versioned {
                value: r.bytes()?.to_vec(),
                version: r.u64()?,
                mod_revision: r.u64()?,
            }),
            DELETED => None,
            _ => return None,
        };
        out.push((key, entry));
    }
    Some(out)
}

/// Writes a segment of flushes `lo..=hi` holding every write up to `revision` from `entries`
/// (ascending keys; deletions left out when `drop_deleted`, i.e. when no older segment remains
/// for them to hide a value in), puts it in place and opens it.
pub(super) fn write<'a>(
    dir: &Path,
    (lo, hi): (u64, u64),
    revision: u64,
    entries: impl IntoIterator<Item = (&'a String, &'a Entry)>,
    drop_deleted: bool,
) -> Result<Segment, StoreError> {
    removing_tmp_on_error(dir, (lo, hi), || {
        let mut w = Writer::create(dir, lo, hi, drop_deleted)?;
        for (key, entry) in entries {
            w.push(key, entry)?;
        }
        w.finish(revision)
    })
}

/// Runs a segment write, deleting its temporary file if it fails.
fn removing_tmp_on_error(
    dir: &Path,
    (lo, hi): (u64, u64),
    f: impl FnOnce() -> Result<Segment, StoreError>,
) -> Result<Segment, StoreError> {
    let written = f();
    if written.is_err() {
        let _ = fs::remove_file(tmp_path(dir, lo, hi));
    }
    written
}

fn tmp_path(dir: &Path, lo: u64, hi: u64) -> PathBuf {
    dir.join(format!("{}.tmp", name(lo, hi)))
}

/// Merges `inputs` (oldest first, holding consecutive flushes) into one segment, the newest
/// entry of each key winning; see [`write`] for `drop_deleted`. Reads a block of each input
/// at a time, whatever their sizes.
pub(super) fn merge(
    dir: &Path,
    inputs: &[&Segment],
    drop_deleted: bool,
) -> Result<Segment, StoreError> {
    let (lo, hi) = (inputs[0].lo, inputs[inputs.len() - 1].hi);
    removing_tmp_on_error(dir, (lo, hi), || merge_into(dir, inputs, drop_deleted))
}

fn merge_into(dir: &Path, inputs: &[&Segment], drop_deleted: bool) -> Result<Segment, StoreError> {
    let (lo, hi) = (inputs[0].lo, inputs[inputs.len() - 1].hi);
    let revision = inputs.iter().map(|s| s.revision).max().unwrap_or(0);
    let mut heads = inputs
        .iter()
        .map(|s| {
            let mut entries = s.iter();
            let head = entries.next().transpose()?;
            Ok((entries, head))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let mut w = Writer::create(dir, lo, hi, drop_deleted)?;
    while let Some(least) = heads
        .iter()
        .filter_map(|(_, head)| head.as_ref().map(|(k, _)| k))
        .min()
        .cloned()
    {
        // Every input at the least key moves on; the newest (last) one's entry is kept.
        let mut winner = None;
        for (entries, head) in &mut heads {
            if head.as_ref().is_some_and(|(k, _)| *k == least) {
                let next = entries.next().transpose()?;
                winner = std::mem::replace(head, next).map(|(_, entry)| entry);
            }
        }
        w.push(&least, &winner.expect("an input held the least key"))?;
    }
    w.finish(revision)
}

/// A segment being written, as `<name>.tmp` until [`Writer::finish`].
struct Writer {
    dir: PathBuf,
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    lo: u64,
    hi: u64,
    drop_deleted: bool,
    at: u64,
    block: Vec<u8>,
    first_key: String,
    blocks: Vec<Block>,
    last_key: String,
    entries: u64,
}

impl Writer {
    fn create(dir: &Path, lo: u64, hi: u64, drop_deleted: bool) -> Result<Self, StoreError> {
        let path = dir.join(name(lo, hi));
        let tmp = tmp_path(dir, lo, hi);
        let out = BufWriter::new(File::create(&tmp).map_err(StoreError::io(&tmp))?);
        Ok(Self {
            dir: dir.to_owned(),
            path,
            tmp,
            out,
            lo,
            hi,
            drop_deleted,
            at: 0,
            block: Vec::new(),
            first_key: String::new(),
            blocks: Vec::new(),
            last_key: String::new(),
            entries: 0,
        })
    }

    /// Adds an entry; keys come in ascending order.
    fn push(&mut self, key: &str, entry: &Entry) -> Result<(), StoreError> {
        if entry.is_none() && self.drop_deleted {
            return Ok(());
        }
        debug_assert!(self.entries == 0 || key > self.last_key.as_str());
        if self.block.is_empty() {
            key.clone_into(&mut self.first_key);
        }
        put_bytes(&mut self.block, key.as_bytes());
        match entry {
            Some(v) => {
                self.block.push(VALUE);
                put_bytes(&mut self.block, &v.value);
                self.block.extend_from_slice(&v.version.to_le_bytes());
                self.block.extend_from_slice(&v.mod_revision.to_le_bytes());
            }
            None => self.block.push(DELETED),
        }
        key.clone_into(&mut self.last_key);
        self.entries += 1;
        if self.block.len() >= BLOCK_BYTES {
            self.close_block()?;
        }
        Ok(())
    }

    fn close_block(&mut self) -> Result<(), StoreError> {
        let framed = frame(&self.block)?;
        self.emit(&framed)?;
        self.blocks.push(Block {
            first_key: std::mem::take(&mut self.first_key),
            offset: self.at - framed.len() as u64,
            len: framed.len() as u32,
        });
        self.block.clear();
        Ok(())
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.out
            .write_all(bytes)
            .map_err(StoreError::io(&self.tmp))?;
        self.at += bytes.len() as u64;
        Ok(())
    }

    /// Writes the index and footer, syncs the file, renames it into place (syncing the
    /// directory) and opens it.
    fn finish(mut self, revision: u64) -> Result<Segment, StoreError> {
        if !self.block.is_empty() {
            self.close_block()?;
        }
        let mut index = revision.to_le_bytes().to_vec();
        index.extend_from_slice(&self.entries.to_le_bytes());
        index.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for b in &self.blocks {
            put_bytes(&mut index, b.first_key.as_bytes());
            index.extend_from_slice(&b.offset.to_le_bytes());
            index.extend_from_slice(&b.len.to_le_bytes());
        }
        put_bytes(&mut index, self.last_key.as_bytes());
        let index_at = self.at;
        let framed = frame(&index)?;
        self.emit(&framed)?;
        let mut footer = index_at.to_le_bytes().to_vec();
        footer.extend_from_slice(MAGIC);
        self.emit(&footer)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| StoreError::io(&self.tmp)(e.into_error()))?;
        file.sync_all().map_err(StoreError::io(&self.tmp))?;
        drop(file);
        fs::rename(&self.tmp, &self.path).map_err(StoreError::io(&self.path))?;
        super::sync_dir(&self.dir)?;
        Segment::open(self.path, self.lo, self.hi)
    }
}
