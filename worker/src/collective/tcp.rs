//! The CPU collective: a ring all-reduce over TCP.
//!
//! # Wiring
//! Rank `r` of `n` opens one connection to its right neighbour `(r + 1) % n` and accepts one from
//! its left neighbour `(r - 1) % n`; data only ever flows left to right. Rendezvous, all within
//! one deadline (the configured timeout):
//! 1. connect to the right neighbour's listener (retrying while it is not up yet) and send a
//!    *hello*: `magic, protocol version, generation, rank, world size, chunk size`;
//! 2. accept from our listener until a connection sends a hello from the expected left rank with
//!    the same generation, world size and chunk size; answer it with our own hello and an
//!    *accept* byte. Anything else (a stale rank of an older generation, a foreign client, a
//!    misconfigured peer list) gets a *reject* byte, is closed, logged, and named in the timeout
//!    error if the right peer never comes;
//! 3. read the right neighbour's answer; a reject becomes an error saying what differed.
//!
//! Sends never wait for answers before the accept, so the ring cannot deadlock in rendezvous.
//!
//! # One all-reduce
//! Every operation starts with a header (`magic, sequence number, element count`) so ranks that
//! disagree about what they are reducing fail with [`CollectiveError::Mismatch`] instead of
//! exchanging garbage. The buffer is split into `n` segments (sizes differ by at most one
//! element), then:
//! - *reduce-scatter*, `n - 1` steps: at step `s` rank `r` sends segment `r - s` and receives
//!   segment `r - s - 1`, adding it into its own; afterwards rank `r` holds the full sum of
//!   segment `r + 1`;
//! - *all-gather*, `n - 1` steps: at step `s` rank `r` sends segment `r + 1 - s` and receives
//!   segment `r - s`, overwriting its own.
//!
//! Each segment travels as chunks (1 MiB by default) of little-endian f32. A dedicated sender
//! thread per ring owns the outgoing socket and drains a bounded queue, while the calling thread
//! alternates "queue chunk `c` of the outgoing segment, receive and reduce chunk `c` of the
//! incoming one". A rank is never more than a few chunks ahead of what it has received, and a
//! queue plus socket buffer holds more than that, so the ring cannot stall with every rank
//! blocked in a write. Each segment's sum is accumulated in a fixed rank order, so the result is
//! bitwise the same on every rank and on every run for a given world size.
//!
//! # Failures
//! Sockets carry read and write timeouts. A peer that dies (closed or reset connection) or hangs
//! (no bytes within the timeout) fails the operation; the failing rank then shuts its sockets
//! down, so its neighbours see the failure at once and it travels around the ring. The ring is
//! then broken for good: a new generation must rendezvous again.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Collective, CollectiveError};

/// Elements per chunk by default: 1 MiB of f32.
pub const DEFAULT_CHUNK_ELEMS: usize = 1 << 18;

const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"SCrh");
const OP_MAGIC: u32 = u32::from_le_bytes(*b"SCop");
const PROTOCOL_VERSION: u32 = 1;
const HELLO_LEN: usize = 32;
const OP_HEADER_LEN: usize = 20;
const HELLO_WAIT: Duration = Duration::from_secs(2);
const ACCEPT: u8 = 1;
const REJECT: u8 = 0;
/// Chunks queued for the sender thread; see the module docs for why this bounds no deadlock.
const QUEUE_CHUNKS: usize = 4;

/// Settings every rank of one ring must agree on (checked in the handshake).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConfig {
    /// Which incarnation of the group this is; connections from other generations are refused.
    pub generation: u64,
    /// The rendezvous deadline, and the longest a socket read or write may make no progress.
    pub timeout: Duration,
    /// Elements per chunk of the pipeline.
    pub chunk_elems: usize,
}

impl TcpConfig {
    pub fn new(generation: u64, timeout: Duration) -> Self {
        Self {
            generation,
            timeout,
            chunk_elems: DEFAULT_CHUNK_ELEMS,
        }
    }
}

/// One rank of a TCP ring. Dropping it closes its connections and joins its sender thread.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world_size: usize,
    config: TcpConfig,
    /// The sequence number of the next operation.
    seq: u64,
    /// `None` for a world of one.
    links: Option<Links>,
    broken: bool,
    #[cfg(test)]
    fail_after_chunks: Option<usize>,
}

/// The two connections of a rank and the sender thread that owns the outgoing one.
#[derive(Debug)]
struct Links {
    left: TcpStream,
    /// A handle on the outgoing socket, kept to shut it down while the sender thread writes.
    right: TcpStream,
    queue: Option<SyncSender<Outgoing>>,
    /// Flush acknowledgements and the sender's fatal error.
    done: Receiver<io::Result<()>>,
    /// Byte buffers the sender has finished with, for reuse.
    spare: Receiver<Vec<u8>>,
    recv_buf: Vec<u8>,
    sender: Option<JoinHandle<()>>,
}

enum Outgoing {
    Bytes(Vec<u8>),
    /// Answer on `done` once everything queued before has been written.
    Flush,
}

impl TcpRing {
    /// Joins the ring as `rank` of `world_size`. `listener` is already bound (its address is
    /// where rank `rank - 1` connects; a `try_clone` of a long-lived listener is fine); `next`
    /// is where rank `(rank + 1) % world_size` listens. A rank needs no other address: the ring
    /// is wired by each rank connecting to its right and accepting its left. Fails if the
    /// neighbours are not wired within `config.timeout`.
    pub fn connect(
        rank: usize,
        world_size: usize,
        listener: TcpListener,
        next: SocketAddr,
        config: TcpConfig,
    ) -> Result<Self, CollectiveError> {
        if world_size == 0 || rank >= world_size {
            return Err(CollectiveError::Rendezvous(format!(
                "rank {rank} of world size {world_size}"
            )));
        }
        if config.chunk_elems == 0 || config.timeout.is_zero() {
            return Err(CollectiveError::Rendezvous(
                "chunk size and timeout must be positive".into(),
            ));
        }
        let links =
            if world_size == 1 {
                None
            } else {
                let (left, right) = rendezvous(rank, world_size, &listener, next, &config)?;
                Some(Links::start(rank, left, right, &config).map_err(|e| {
                    CollectiveError::Rendezvous(format!("setting up connections: {e}"))
                })?)
            };
        tracing::debug!(
            rank,
            world_size,
            generation = config.generation,
            "tcp ring connected"
        );
        Ok(Self {
            rank,
            world_size,
            config,
            seq: 0,
            links,
            broken: false,
            #[cfg(test)]
            fail_after_chunks: None,
        })
    }

    pub fn config(&self) -> &TcpConfig {
        &self.config
    }

    fn left(&self) -> usize {
        (self.rank + self.world_size - 1) % self.world_size
    }

    fn right(&self) -> usize {
        (self.rank + 1) % self.world_size
    }

    /// Marks the ring broken and shuts its sockets so the neighbours fail fast too.
    fn abort(&mut self) {
        self.broken = true;
        if let Some(links) = &mut self.links {
            links.stop();
        }
    }

    fn reduce(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (n, r, len, seq) = (self.world_size, self.rank, buf.len(), self.seq);
        let (left, right, timeout, chunk) = (
            self.left(),
            self.right(),
            self.config.timeout,
            self.config.chunk_elems,
        );
        #[cfg(test)]
        let mut budget = self.fail_after_chunks;
        let Some(links) = self.links.as_mut() else {
            return Ok(());
        };
        let io_err = |peer: usize| move |e: io::Error| peer_error(peer, timeout, e);

        let mut header = links.take_buffer();
        header.clear();
        header.extend_from_slice(&OP_MAGIC.to_le_bytes());
        header.extend_from_slice(&seq.to_le_bytes());
        header.extend_from_slice(&(len as u64).to_le_bytes());
        links.push(header, right, timeout)?;
        let mut theirs = [0u8; OP_HEADER_LEN];
        links.left.read_exact(&mut theirs).map_err(io_err(left))?;
        let (magic, their_seq, their_len) = (
            u32::from_le_bytes(le(&theirs[0..4])),
            u64::from_le_bytes(le(&theirs[4..12])),
            u64::from_le_bytes(le(&theirs[12..20])),
        );
        if magic != OP_MAGIC || their_seq != seq || their_len != len as u64 {
            return Err(CollectiveError::Mismatch(format!(
                "rank {r} runs all-reduce #{seq} of {len} elements, rank {left} sent #{their_seq} \
                 of {their_len}{}",
                if magic == OP_MAGIC {
                    ""
                } else {
                    " (bad magic: stream out of sync)"
                }
            )));
        }

        let segment = |k: usize| {
            let (base, extra) = (len / n, len % n);
            let start = k * base + k.min(extra);
            start..start + base + usize::from(k < extra)
        };
        for step in 0..2 * (n - 1) {
            let reducing = step < n - 1;
            let s = step % (n - 1);
            // Segment indices modulo n, kept non-negative by adding 2n.
            let (send, recv) = if reducing {
                (
                    segment((r + 2 * n - s) % n),
                    segment((r + 2 * n - s - 1) % n),
                )
            } else {
                (
                    segment((r + 2 * n + 1 - s) % n),
                    segment((r + 2 * n - s) % n),
                )
            };
            let piece = |seg: &std::ops::Range<usize>, c: usize| {
                let start = (seg.start + c * chunk).min(seg.end);
                start..(start + chunk).min(seg.end)
            };
            for c in 0..send.len().max(recv.len()).div_ceil(chunk) {
                let out = piece(&send, c);
                if !out.is_empty() {
                    #[cfg(test)]
                    if let Some(left_over) = budget.as_mut() {
                        if *left_over == 0 {
                            return Err(CollectiveError::Peer {
                                peer: r,
                                source: io::Error::other("injected failure"),
                            });
                        }
                        *left_over -= 1;
                    }
                    let mut bytes = links.take_buffer();
                    encode(&buf[out], &mut bytes);
                    links.push(bytes, right, timeout)?;
                }
                let inc = piece(&recv, c);
                if !inc.is_empty() {
                    let bytes = &mut links.recv_buf[..inc.len() * 4];
                    links.left.read_exact(bytes).map_err(io_err(left))?;
                    let values = buf[inc].iter_mut().zip(bytes.chunks_exact(4));
                    if reducing {
                        values.for_each(|(x, b)| *x += f32::from_le_bytes(le(b)));
                    } else {
                        values.for_each(|(x, b)| *x = f32::from_le_bytes(le(b)));
                    }
                }
            }
        }
        links.flush(right, timeout)
    }

    /// Test failpoint: fail (as if the process died) before sending chunk number `n` of the next
    /// operations.
    #[cfg(test)]
    fn fail_after_chunks(&mut self, n: usize) {
        self.fail_after_chunks = Some(n);
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.broken {
            return Err(CollectiveError::Broken);
        }
        let result = self.reduce(buf);
        self.seq += 1;
        if let Err(e) = &result {
            tracing::warn!(rank = self.rank, seq = self.seq - 1, error = %e, "all-reduce failed; ring aborted");
            self.abort();
        }
        result
    }
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        if let Some(links) = &mut self.links {
            links.stop();
        }
    }
}

impl Links {
    fn start(
        rank: usize,
        left: TcpStream,
        right: TcpStream,
        config: &TcpConfig,
    ) -> io::Result<Self> {
        for s in [&left, &right] {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(config.timeout))?;
            s.set_write_timeout(Some(config.timeout))?;
        }
        let mut out = right.try_clone()?;
        let (queue, incoming) = sync_channel::<Outgoing>(QUEUE_CHUNKS);
        // Two slots: one flush answer and one fatal error at most are ever pending.
        let (done_tx, done) = sync_channel(2);
        let (spare_tx, spare) = sync_channel(QUEUE_CHUNKS + 2);
        let sender = std::thread::Builder::new()
            .name(format!("collective-tx-{rank}"))
            .spawn(move || {
                for msg in incoming {
                    match msg {
                        Outgoing::Bytes(bytes) => {
                            if let Err(e) = out.write_all(&bytes) {
                                let _ = done_tx.try_send(Err(e));
                                return;
                            }
                            let _ = spare_tx.try_send(bytes);
                        }
                        Outgoing::Flush => {
                            if done_tx.try_send(Ok(())).is_err() {
                                return;
                            }
                        }
                    }
                }
            })?;
        Ok(Self {
            left,
            right,
            queue: Some(queue),
            done,
            spare,
            recv_buf: vec![0; config.chunk_elems * 4],
            sender: Some(sender),
        })
    }

    fn take_buffer(&self) -> Vec<u8> {
        self.spare.try_recv().unwrap_or_default()
    }

    /// Queues bytes for the right neighbour; blocks while the queue is full.
    fn push(
        &mut self,
        bytes: Vec<u8>,
        right: usize,
        timeout: Duration,
    ) -> Result<(), CollectiveError> {
        let queue = self.queue.as_ref().ok_or(CollectiveError::Broken)?;
        if queue.send(Outgoing::Bytes(bytes)).is_err() {
            return Err(self.sender_error(right, timeout));
        }
        Ok(())
    }

    /// Waits until everything queued has been handed to the kernel.
    fn flush(&mut self, right: usize, timeout: Duration) -> Result<(), CollectiveError> {
        let queue = self.queue.as_ref().ok_or(CollectiveError::Broken)?;
        if queue.send(Outgoing::Flush).is_err() {
            return Err(self.sender_error(right, timeout));
        }
        // Each queued chunk may take up to `timeout` before a write error; allow for the queue.
        match self.done.recv_timeout(timeout * (QUEUE_CHUNKS as u32 + 2)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(peer_error(right, timeout, e)),
            Err(RecvTimeoutError::Timeout) => Err(CollectiveError::Timeout {
                peer: Some(right),
                timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(self.sender_error(right, timeout)),
        }
    }

    /// The reason the sender thread stopped.
    fn sender_error(&self, right: usize, timeout: Duration) -> CollectiveError {
        match self.done.try_iter().find_map(Result::err) {
            Some(e) => peer_error(right, timeout, e),
            None => CollectiveError::Peer {
                peer: right,
                source: io::Error::other("sender thread stopped"),
            },
        }
    }

    /// Shuts both sockets (unblocking the sender and telling the neighbours) and joins the
    /// sender thread.
    fn stop(&mut self) {
        let _ = self.right.shutdown(Shutdown::Both);
        let _ = self.left.shutdown(Shutdown::Both);
        self.queue = None;
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
    }
}

/// Classifies an I/O error on the connection to `peer`.
fn peer_error(peer: usize, timeout: Duration, e: io::Error) -> CollectiveError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CollectiveError::Timeout {
            peer: Some(peer),
            timeout,
        },
        io::ErrorKind::UnexpectedEof => CollectiveError::Peer {
            peer,
            source: io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed by peer"),
        },
        _ => CollectiveError::Peer { peer, source: e },
    }
}

fn encode(values: &[f32], bytes: &mut Vec<u8>) {
    bytes.resize(values.len() * 4, 0);
    for (b, x) in bytes.chunks_exact_mut(4).zip(values) {
        b.copy_from_slice(&x.to_le_bytes());
    }
}

/// The first `N` bytes of `b`, for `from_le_bytes` (callers pass slices of exactly `N`).
fn le<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// What a rank says about itself when it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hello {
    generation: u64,
    rank: u32,
    world_size: u32,
    chunk_elems: u64,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..20].copy_from_slice(&self.rank.to_le_bytes());
        b[20..24].copy_from_slice(&self.world_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.chunk_elems.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, String> {
        let u32_at = |i: usize| u32::from_le_bytes(le(&b[i..i + 4]));
        let u64_at = |i: usize| u64::from_le_bytes(le(&b[i..i + 8]));
        if u32_at(0) != HELLO_MAGIC {
            return Err("not a stagecoach collective peer (bad magic)".into());
        }
        if u32_at(4) != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {}, expected {PROTOCOL_VERSION}",
                u32_at(4)
            ));
        }
        Ok(Self {
            generation: u64_at(8),
            rank: u32_at(16),
            world_size: u32_at(20),
            chunk_elems: u64_at(24),
        })
    }

    /// Why a peer announcing `theirs` cannot be our neighbour `expected_rank`, if it cannot.
    fn conflict(&self, theirs: &Hello, expected_rank: usize) -> Option<String> {
        if theirs.generation != self.generation {
            Some(format!(
                "generation {} (stale or foreign), expected {}",
                theirs.generation, self.generation
            ))
        } else if theirs.world_size != self.world_size {
            Some(format!(
                "world size {}, expected {}",
                theirs.world_size, self.world_size
            ))
        } else if theirs.chunk_elems != self.chunk_elems {
            Some(format!(
                "chunk size {}, expected {}",
                theirs.chunk_elems, self.chunk_elems
            ))
        } else if theirs.rank as usize != expected_rank {
            Some(format!(
                "rank {}, expected rank {expected_rank} (check the peer list)",
                theirs.rank
            ))
        } else {
            None
        }
    }
}

/// Wires `rank` to its neighbours; returns (from left, to right).
fn rendezvous(
    rank: usize,
    n: usize,
    listener: &TcpListener,
    next: SocketAddr,
    config: &TcpConfig,
) -> Result<(TcpStream, TcpStream), CollectiveError> {
    let deadline = Instant::now() + config.timeout;
    let (left, right) = ((rank + n - 1) % n, (rank + 1) % n);
    let fail = |what: String| CollectiveError::Rendezvous(format!("rank {rank}: {what}"));
    let ours = Hello {
        generation: config.generation,
        rank: rank as u32,
        world_size: n as u32,
        chunk_elems: config.chunk_elems as u64,
    };

    let mut to_right = connect_until(next, deadline)
        .map_err(|e| fail(format!("cannot reach rank {right} at {}: {e}", next)))?;
    to_right
        .set_write_timeout(Some(remaining(deadline)))
        .and_then(|()| to_right.write_all(&ours.encode()))
        .map_err(|e| fail(format!("sending hello to rank {right}: {e}")))?;

    let from_left = accept_until(listener, &ours, left, deadline);
    // The caller may keep (a clone of) the listener: leave it blocking, as it came.
    let _ = listener.set_nonblocking(false);
    let from_left = from_left.map_err(fail)?;

    let mut answer = [0u8; HELLO_LEN + 1];
    to_right
        .set_read_timeout(Some(remaining(deadline)))
        .and_then(|()| to_right.read_exact(&mut answer))
        .map_err(|e| fail(format!("no handshake answer from rank {right}: {e}")))?;
    let hello = le_hello(&answer).map_err(|e| fail(format!("rank {right} answered: {e}")))?;
    let conflict = ours.conflict(&hello, right);
    match (answer[HELLO_LEN], conflict) {
        (ACCEPT, None) => Ok((from_left, to_right)),
        (_, Some(why)) => Err(fail(format!(
            "rank {right} at {} refused the connection: it announces {why}",
            next
        ))),
        (_, None) => Err(fail(format!(
            "rank {right} at {} refused the connection",
            next
        ))),
    }
}

fn le_hello(answer: &[u8; HELLO_LEN + 1]) -> Result<Hello, String> {
    let mut b = [0u8; HELLO_LEN];
    b.copy_from_slice(&answer[..HELLO_LEN]);
    Hello::decode(&b)
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// Connects, retrying while the peer's listener is not accepting yet.
fn connect_until(addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    loop {
        match TcpStream::connect_timeout(&addr, remaining(deadline).min(Duration::from_secs(1))) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(remaining(deadline).min(Duration::from_millis(20))),
        }
    }
}

/// Accepts connections until one is a valid hello from `expected` rank; answers every hello.
fn accept_until(
    listener: &TcpListener,
    ours: &Hello,
    expected: usize,
    deadline: Instant,
) -> Result<TcpStream, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    let mut rejected: Option<String> = None;
    while Instant::now() < deadline {
        let (mut stream, addr) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(remaining(deadline).min(Duration::from_millis(10)));
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("accepting on the listener: {e}")),
        };
        let mut hello = [0u8; HELLO_LEN];
        let read = stream
            .set_nonblocking(false)
            // A real peer sends its hello right after connecting; a silent client must not
            // hold the listener until the deadline.
            .and_then(|()| stream.set_read_timeout(Some(remaining(deadline).min(HELLO_WAIT))))
            .and_then(|()| stream.set_write_timeout(Some(remaining(deadline))))
            .and_then(|()| stream.read_exact(&mut hello));
        let verdict = match read {
            Err(e) => Err(format!("no hello ({e})")),
            Ok(()) => {
                Hello::decode(&hello).and_then(|theirs| match ours.conflict(&theirs, expected) {
                    Some(why) => Err(why),
                    None => Ok(()),
                })
            }
        };
        let mut answer = [0u8; HELLO_LEN + 1];
        answer[..HELLO_LEN].copy_from_slice(&ours.encode());
        match verdict {
            Ok(()) => {
                answer[HELLO_LEN] = ACCEPT;
                match stream.write_all(&answer) {
                    Ok(()) => return Ok(stream),
                    Err(e) => rejected = Some(format!("{addr}: answering the hello: {e}")),
                }
            }
            Err(why) => {
                answer[HELLO_LEN] = REJECT;
                let _ = stream.write_all(&answer);
                tracing::warn!(%addr, reason = %why, "refused a collective connection");
                rejected = Some(format!("{addr}: {why}"));
            }
        }
    }
    Err(format!(
        "no valid connection from rank {expected} in time{}",
        rejected
            .map(|r| format!("; refused {r}"))
            .unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// Binds one loopback listener per rank on port 0.
    fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
        let ls: Vec<_> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        (ls, addrs)
    }

    /// Runs `f(rank, connect result)` on one thread per rank; returns the results by rank.
    fn world<T: Send + 'static>(
        configs: Vec<TcpConfig>,
        f: impl Fn(usize, Result<TcpRing, CollectiveError>) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let n = configs.len();
        let (ls, addrs) = listeners(n);
        let handles: Vec<_> = ls
            .into_iter()
            .zip(configs)
            .enumerate()
            .map(|(rank, (l, cfg))| {
                let (addrs, f) = (addrs.clone(), f.clone());
                thread::spawn(move || {
                    f(
                        rank,
                        TcpRing::connect(rank, n, l, addrs[(rank + 1) % n], cfg),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn input(rank: usize, len: usize, salt: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + rank * 104_729 + salt) % 1999) as f32 * 0.0137 - 11.3)
            .collect()
    }

    #[test]
    fn sums_agree_on_every_rank_for_odd_sizes() {
        for n in [2, 3, 4] {
            let lens = [0, 1, n - 1, n + 1, 7, 97, 1001, 10_007];
            for chunk_elems in [3, 1000, DEFAULT_CHUNK_ELEMS] {
                let cfg = TcpConfig {
                    chunk_elems,
                    ..TcpConfig::new(1, Duration::from_secs(20))
                };
                let outs = world(vec![cfg; n], move |rank, ring| {
                    let mut ring = ring.unwrap();
                    // Twice each, to check runs are bitwise repeatable.
                    lens.iter()
                        .flat_map(|&len| [len, len])
                        .map(|len| {
                            let mut buf = input(rank, len, len);
                            ring.all_reduce_sum(&mut buf).unwrap();
                            buf
                        })
                        .collect::<Vec<_>>()
                });
                for (op, &len) in lens.iter().flat_map(|l| [l, l]).enumerate() {
                    let bits = |b: &[f32]| b.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    for rank in 0..n {
                        assert_eq!(bits(&outs[rank][op]), bits(&outs[0][op]), "n={n} len={len}");
                    }
                    assert_eq!(bits(&outs[0][op]), bits(&outs[0][op & !1]), "repeatable");
                    let inputs: Vec<_> = (0..n).map(|r| input(r, len, len)).collect();
                    for (i, &got) in outs[0][op].iter().enumerate() {
                        let want: f64 = inputs.iter().map(|x| f64::from(x[i])).sum();
                        let got = f64::from(got);
                        assert!(
                            (got - want).abs() < 1e-3,
                            "n={n} len={len} i={i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn world_of_one_and_bad_arguments() {
        let (mut ls, addrs) = listeners(1);
        let cfg = TcpConfig::new(0, Duration::from_secs(1));
        let mut ring = TcpRing::connect(0, 1, ls.remove(0), addrs[0], cfg).unwrap();
        let mut buf = [1.5f32, -2.0];
        ring.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf, [1.5, -2.0]);

        let (mut ls, addrs) = listeners(1);
        let err = TcpRing::connect(1, 1, ls.remove(0), addrs[0], cfg).unwrap_err();
        assert!(matches!(err, CollectiveError::Rendezvous(_)), "{err}");
    }

    #[test]
    fn length_mismatch_is_an_error_not_garbage() {
        let cfg = TcpConfig::new(3, Duration::from_secs(5));
        let errs = world(vec![cfg; 2], |rank, ring| {
            let mut buf = vec![1.0; 10 + rank];
            ring.unwrap().all_reduce_sum(&mut buf).unwrap_err()
        });
        // The rank that notices first aborts; its neighbour may see that before the header.
        assert!(
            errs.iter()
                .any(|e| matches!(e, CollectiveError::Mismatch(_))),
            "{errs:?}"
        );
    }

    #[test]
    fn dead_peer_fails_the_others_within_the_timeout() {
        let timeout = Duration::from_secs(2);
        let cfg = TcpConfig {
            chunk_elems: 1000,
            ..TcpConfig::new(7, timeout)
        };
        let results = world(vec![cfg; 4], move |rank, ring| {
            let mut ring = ring.unwrap();
            let mut buf = vec![1.0f32; 100_000];
            ring.all_reduce_sum(&mut buf).unwrap();
            assert!(buf.iter().all(|&x| x == 4.0));
            if rank == 2 {
                // Dies mid-operation, having sent a few chunks.
                ring.fail_after_chunks(5);
            }
            let start = Instant::now();
            let result = ring.all_reduce_sum(&mut buf);
            let elapsed = start.elapsed();
            let again = ring.all_reduce_sum(&mut buf);
            (result.err(), elapsed, again.err())
        });
        for (rank, (err, elapsed, again)) in results.into_iter().enumerate() {
            let err = err.unwrap_or_else(|| panic!("rank {rank} did not fail"));
            eprintln!("rank {rank} after {elapsed:?}: {err}");
            assert!(
                elapsed < Duration::from_secs(10),
                "rank {rank}: {elapsed:?} ({err})"
            );
            assert!(
                matches!(again, Some(CollectiveError::Broken)),
                "rank {rank}"
            );
        }
    }

    #[test]
    fn hung_peer_times_out_everyone() {
        let timeout = Duration::from_secs(2);
        let cfg = TcpConfig::new(8, timeout);
        let results = world(vec![cfg; 3], move |rank, ring| {
            let mut ring = ring.unwrap();
            let mut buf = vec![1.0f32; 1000];
            if rank == 1 {
                // Alive but never joins the operation: the others must not wait for it.
                thread::sleep(timeout * 2);
                return Ok(Duration::ZERO);
            }
            let start = Instant::now();
            match ring.all_reduce_sum(&mut buf) {
                Ok(()) => Err(format!("rank {rank} succeeded")),
                Err(e) => {
                    eprintln!("rank {rank}: {e}");
                    Ok(start.elapsed())
                }
            }
        });
        for (rank, r) in results.into_iter().enumerate() {
            let elapsed = r.unwrap();
            assert!(
                elapsed < Duration::from_secs(10),
                "rank {rank}: {elapsed:?}"
            );
        }
    }

    #[test]
    fn wrong_generation_is_refused() {
        let timeout = Duration::from_secs(1);
        let errs = world(
            vec![TcpConfig::new(1, timeout), TcpConfig::new(2, timeout)],
            |_, ring| ring.unwrap_err().to_string(),
        );
        for e in errs {
            eprintln!("{e}");
            assert!(e.contains("generation"), "{e}");
        }
    }

    #[test]
    fn stale_connection_is_refused_and_the_ring_still_forms() {
        let cfg = TcpConfig::new(5, Duration::from_secs(10));
        let (ls, addrs) = listeners(2);
        // A rank of generation 4 knocks on rank 0 first.
        let mut stale = TcpStream::connect(addrs[0]).unwrap();
        let old = Hello {
            generation: 4,
            rank: 1,
            world_size: 2,
            chunk_elems: cfg.chunk_elems as u64,
        };
        stale.write_all(&old.encode()).unwrap();
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let addrs = addrs.clone();
                thread::spawn(move || {
                    let mut ring = TcpRing::connect(rank, 2, l, addrs[(rank + 1) % 2], cfg)?;
                    let mut buf = [rank as f32 + 1.0; 3];
                    ring.all_reduce_sum(&mut buf).map(|()| buf)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), [3.0; 3]);
        }
        let mut answer = [0u8; HELLO_LEN + 1];
        stale.read_exact(&mut answer).unwrap();
        assert_eq!(answer[HELLO_LEN], REJECT);
        assert_eq!(le_hello(&answer).unwrap().generation, 5);
    }
}
