//! The embedded store's log records, and the snapshot of stores from before segments (the
//! segments' layout is in `segment.rs`). Integers are little-endian; a byte string is
//! `len: u32 | bytes`.
//!
//! - A frame (each log record, each segment block and index, and the whole snapshot):
//!   `len: u32 | crc32(payload): u32 | payload`.
//! - A log record's payload, one committed write: `revision: u64 | op count: u32 | ops`, each op
//!   `tag: u8 (1 put, 2 delete) | key | value (puts only)`.
//! - The snapshot's payload: `revision: u64 | count: u64 | entries`, each
//!   `key | value | version: u64 | mod_revision: u64`, in key order.

use std::collections::BTreeMap;

use crate::store::{Op, StoreError, Versioned};

const PUT: u8 = 1;
const DELETE: u8 = 2;
const FRAME_HEADER: usize = 8;

/// Frames a payload; fails for one over 4 GiB (then also any field in it may have overflowed
/// its `u32` length, which is why the encoders need not check).
pub(super) fn frame(payload: &[u8]) -> Result<Vec<u8>, StoreError> {
    let len = u32::try_from(payload.len()).map_err(|_| {
        StoreError::InvalidArgument(format!("a state record of {} bytes", payload.len()))
    })?;
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// The payload of the frame at `at` and the offset after it, if it is complete and intact.
pub(super) fn unframe(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let header = bytes.get(at..at.checked_add(FRAME_HEADER)?)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    let start = at + FRAME_HEADER;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    (crc32fast::hash(payload) == crc).then_some((payload, start + len))
}

pub(super) fn encode_batch(revision: u64, ops: &[Op]) -> Vec<u8> {
    let mut out = revision.to_le_bytes().to_vec();
    put_len(&mut out, ops.len());
    for op in ops {
        match op {
            Op::Put { key, value } => {
                out.push(PUT);
                put_bytes(&mut out, key.as_bytes());
                put_bytes(&mut out, value);
            }
            Op::Delete { key } => {
                out.push(DELETE);
                put_bytes(&mut out, key.as_bytes());
            }
        }
    }
    out
}

pub(super) fn decode_batch(payload: &[u8]) -> Option<(u64, Vec<Op>)> {
    let r = &mut Reader(payload);
    let revision = r.u64()?;
    let ops = (0..r.u32()?)
        .map(|_| match r.u8()? {
            PUT => Some(Op::Put {
                key: r.string()?,
                value: r.bytes()?.to_vec(),
            }),
            DELETE => Some(Op::Delete { key: r.string()? }),
            _ => None,
        })
        .collect::<Option<_>>()?;
    r.0.is_empty().then_some((revision, ops))
}

/// Only tests write snapshots now: the store turns one into a segment when it opens it.
#[cfg(test)]
pub(super) fn encode_snapshot(revision: u64, kvs: &BTreeMap<String, Versioned>) -> Vec<u8> {
    let mut out = revision.to_le_bytes().to_vec();
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (key, v) in kvs {
        put_bytes(&mut out, key.as_bytes());
        put_bytes(&mut out, &v.value);
        out.extend_from_slice(&v.version.to_le_bytes());
        out.extend_from_slice(&v.mod_revision.to_le_bytes());
    }
    out
}

pub(super) fn decode_snapshot(payload: &[u8]) -> Option<(u64, BTreeMap<String, Versioned>)> {
    let r = &mut Reader(payload);
    let revision = r.u64()?;
    let kvs = (0..r.u64()?)
        .map(|_| {
            let key = r.string()?;
            let value = r.bytes()?.to_vec();
            let (version, mod_revision) = (r.u64()?, r.u64()?);
            let v = Versioned {
                value,
                version,
                mod_revision,
            };
            Some((key, v))
        })
        .collect::<Option<_>>()?;
    r.0.is_empty().then_some((revision, kvs))
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Wraps only for a field over 4 GiB, which makes its record too large for `frame`.
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

pub(super) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// Reads fields off the front of a payload; `None` when it runs out.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    pub(super) fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    pub(super) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    pub(super) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub(super) fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    pub(super) fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let ops = vec![
            Op::Put {
                key: "k".to_owned(),
                value: b"v".to_vec(),
            },
            Op::Delete {
                key: "gone".to_owned(),
            },
        ];
        let framed = frame(&encode_batch(7, &ops)).unwrap();
        let (payload, end) = unframe(&framed, 0).unwrap();
        assert_eq!(end, framed.len());
        assert_eq!(decode_batch(payload), Some((7, ops)));
        for cut in 0..framed.len() {
            assert!(unframe(&framed[..cut], 0).is_none(), "cut at {cut}");
        }
        let mut flipped = framed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(unframe(&flipped, 0).is_none());
    }
}
