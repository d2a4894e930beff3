//! The state store: the conformance suite against the embedded store and against a real etcd
//! (started here from `/usr/bin/etcd`), and the embedded store's crash-safety on disk.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use stagecoach_coordinator::store::embedded::{EmbeddedStore, SNAPSHOT_FILE, WAL_FILE};
use stagecoach_coordinator::store::{self, conformance, Op, StateStore, StoreError, Versioned};
use tempfile::TempDir;

const ETCD: &str = "/usr/bin/etcd";

#[tokio::test]
async fn embedded_store_conforms() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let store = store::open(&format!("file://{}", dir.path().display())).await?;
    conformance::run_all(store).await;
    Ok(())
}

#[tokio::test]
async fn etcd_store_conforms() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    // Once under a job prefix (how jobs share a cluster) and once at the root.
    let prefixed = format!("{}/jobs/conformance-{}", etcd.url, std::process::id());
    conformance::run_all(store::open(&prefixed).await?).await;
    conformance::run_all(store::open(&etcd.url).await?).await;

    // Prefixes keep jobs apart.
    let one = store::open(&format!("{}/jobs/one", etcd.url)).await?;
    let two = store::open(&format!("{}/jobs/two/", etcd.url)).await?;
    one.put("k", b"1".to_vec()).await?;
    assert_eq!(two.get("k").await?, None);
    assert!(two.range("").await?.is_empty());
    assert_eq!(one.range("").await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn unreachable_etcd_is_unavailable_and_retryable() -> anyhow::Result<()> {
    let [port] = free_ports()?;
    let started = Instant::now();
    let err = store::open(&format!("etcd://127.0.0.1:{port}"))
        .await
        .err()
        .context("opened an etcd that does not exist")?;
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert!(err.retryable());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn bad_urls_are_rejected() {
    for url in [
        "etcd://",
        "etcd://127.0.0.1:1,",
        "s3://bucket",
        "file://relative",
        "",
    ] {
        let err = store::open(url).await.err().expect(url);
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{url}: {err}");
    }
}

#[tokio::test]
async fn embedded_store_reopens_with_everything() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (before, last) = {
        let s = EmbeddedStore::open(dir.path())?;
        for i in 0..10u8 {
            s.put(&format!("k/{}", i % 4), vec![i]).await?;
        }
        s.delete("k/3").await?;
        let op = |k: &str| Op::Put {
            key: k.to_owned(),
            value: b"t".to_vec(),
        };
        s.txn(Vec::new(), vec![op("t/a"), op("t/b")]).await?;
        let last = s.put("k/0", b"last".to_vec()).await?;
        (s.range("").await?, last)
    };
    let s = EmbeddedStore::open(dir.path())?;
    assert_eq!(s.range("").await?, before);
    assert_eq!(s.get("k/0").await?.map(|v| v.version), Some(4));
    assert_eq!(
        s.put("k/new", Vec::new()).await?,
        last + 1,
        "the revision carries on"
    );
    Ok(())
}

#[tokio::test]
async fn embedded_store_drops_a_torn_last_record() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let mut lens = Vec::new();
    {
        let s = EmbeddedStore::open(dir.path())?;
        for i in 0..5 {
            s.put(&format!("k/{i}"), vec![i; 10]).await?;
            lens.push(fs::metadata(dir.path().join(WAL_FILE))?.len());
        }
    }
    let wal = fs::read(dir.path().join(WAL_FILE))?;
    let (four, five) = (lens[3] as usize, lens[4] as usize);
    // Cut inside the last record's header, right after it, inside its payload, one byte short.
    for cut in [four + 1, four + 7, four + 8, four + 12, five - 1] {
        let torn = TempDir::new()?;
        fs::write(torn.path().join(WAL_FILE), &wal[..cut])?;
        let s = EmbeddedStore::open(torn.path())?;
        assert_eq!(
            keys(&s).await?,
            ["k/0", "k/1", "k/2", "k/3"],
            "cut at {cut}"
        );
        assert_eq!(fs::metadata(torn.path().join(WAL_FILE))?.len(), lens[3]);
        // New writes land after the last good record and survive the next reopen.
        assert_eq!(s.put("k/after", Vec::new()).await?, 5);
        drop(s);
        let s = EmbeddedStore::open(torn.path())?;
        assert_eq!(keys(&s).await?, ["k/0", "k/1", "k/2", "k/3", "k/after"]);
    }
    Ok(())
}

#[tokio::test]
async fn embedded_store_drops_garbage_after_the_log() -> anyhow::Result<()> {
    // A plausible header with a wrong checksum, and a length far past the end of the file.
    let junk: [&[u8]; 2] = [
        &[
            16, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
            16,
        ],
        &[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 42],
    ];
    for junk in junk {
        let dir = TempDir::new()?;
        let s = EmbeddedStore::open(dir.path())?;
        s.put("k/a", b"a".to_vec()).await?;
        s.put("k/b", b"b".to_vec()).await?;
        drop(s);
        OpenOptions::new()
            .append(true)
            .open(dir.path().join(WAL_FILE))?
            .write_all(junk)?;
        let s = EmbeddedStore::open(dir.path())?;
        assert_eq!(keys(&s).await?, ["k/a", "k/b"]);
        s.put("k/c", b"c".to_vec()).await?;
        drop(s);
        let s = EmbeddedStore::open(dir.path())?;
        assert_eq!(keys(&s).await?, ["k/a", "k/b", "k/c"]);
    }
    Ok(())
}

#[tokio::test]
async fn embedded_store_is_locked_while_open() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let first = store::open(&dir.path().display().to_string()).await?;
    let err = EmbeddedStore::open(dir.path())
        .err()
        .context("opened twice")?;
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(
        message.contains("in use by another coordinator"),
        "{message}"
    );
    drop(first);
    EmbeddedStore::open(dir.path())?;
    Ok(())
}

#[tokio::test]
async fn embedded_store_compaction_preserves_state() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let wal = dir.path().join(WAL_FILE);
    let s = EmbeddedStore::open(dir.path())?;
    for i in 0..20u8 {
        s.put(&format!("k/{}", i % 7), vec![i]).await?;
    }
    s.delete("k/2").await?;
    let before = s.range("").await?;
    let old_log = fs::read(&wal)?;
    s.compact().await?;
    assert_eq!(fs::metadata(&wal)?.len(), 0);
    assert!(dir.path().join(SNAPSHOT_FILE).exists());
    assert_eq!(s.range("").await?, before);
    drop(s);

    let s = EmbeddedStore::open(dir.path())?;
    assert_eq!(s.range("").await?, before);
    assert_eq!(
        s.put("k/0", Vec::new()).await?,
        22,
        "the revision carries on"
    );
    assert_eq!(s.get("k/0").await?.map(|v| v.version), Some(4));
    drop(s);

    // A crash after the snapshot's rename but before the log was emptied: the old records are
    // already in the snapshot and must not be applied twice.
    let mut log = old_log;
    log.extend(fs::read(&wal)?);
    fs::write(&wal, log)?;
    let s = EmbeddedStore::open(dir.path())?;
    assert_eq!(s.get("k/0").await?.map(|v| v.version), Some(4));
    assert_eq!(s.range("").await?.len(), before.len());
    drop(s);

    // Compaction by size, as writes go.
    let small = TempDir::new()?;
    let s = EmbeddedStore::open_with(small.path(), 256)?;
    for i in 0..50u8 {
        s.put(&format!("k/{}", i % 5), vec![i; 30]).await?;
    }
    let state = s.range("").await?;
    assert!(fs::metadata(small.path().join(WAL_FILE))?.len() < 256 + 64);
    drop(s);
    assert_eq!(EmbeddedStore::open(small.path())?.range("").await?, state);
    Ok(())
}

#[tokio::test]
async fn embedded_watch_that_falls_behind_is_told() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let s = EmbeddedStore::open(dir.path())?;
    let mut w = s.watch("k/").await?;
    // Fill the watcher's channel, then outrun the commits the store keeps for it.
    let ops = (0..store::WATCH_CHANNEL_CAPACITY + 10)
        .map(|i| Op::Put {
            key: format!("k/{i}"),
            value: Vec::new(),
        })
        .collect();
    s.txn(Vec::new(), ops).await?;
    for i in 0..=store::embedded::WATCH_LAG_LIMIT {
        s.put("k/more", vec![i as u8]).await?;
    }
    let mut seen = 0;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(10), w.recv()).await? {
            Some(Ok(_)) => seen += 1,
            Some(Err(e)) => break e,
            None => bail!("the watch ended without an error after {seen} events"),
        }
    };
    assert!(matches!(err, StoreError::WatchLagged(_)), "{err}");
    assert!(err.retryable());
    assert!(seen >= store::WATCH_CHANNEL_CAPACITY, "{seen}");
    Ok(())
}

async fn keys(s: &dyn StateStore) -> anyhow::Result<Vec<String>> {
    Ok(s.range("")
        .await?
        .into_iter()
        .map(|(k, _): (String, Versioned)| k)
        .collect())
}

/// A single-member etcd on loopback ports, in a scratch directory, killed on drop.
struct Etcd {
    child: Child,
    url: String,
    _dir: TempDir,
}

impl Etcd {
    async fn start() -> anyhow::Result<Self> {
        if !Path::new(ETCD).exists() {
            bail!(
                "{ETCD} is missing: this test needs a real etcd (Debian's etcd-server); \
                 run `make setup`"
            );
        }
        let dir = TempDir::new()?;
        let [client_port, peer_port] = free_ports()?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log_path = dir.path().join("etcd.log");
        let log = File::create(&log_path)?;
        let child = Command::new(ETCD)
            .args(["--name", "default", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {ETCD}"))?;
        let mut etcd = Etcd {
            child,
            url: format!("etcd://127.0.0.1:{client_port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let failure = |why: String| {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            anyhow::anyhow!(
                "{why}; the end of etcd's log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        };
        loop {
            if let Some(status) = etcd.child.try_wait()? {
                return Err(failure(format!("etcd exited at start ({status})")));
            }
            let why = if TcpStream::connect(("127.0.0.1", client_port)).is_ok() {
                match store::open(&etcd.url).await {
                    Ok(_) => return Ok(etcd),
                    Err(e) => e.to_string(),
                }
            } else {
                "not listening".to_owned()
            };
            if Instant::now() > deadline {
                return Err(failure(format!("etcd did not answer within 20 s: {why}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `N` distinct loopback ports that were free a moment ago.
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect::<anyhow::Result<_>>()?;
    Ok(ports.try_into().expect("N ports"))
}
