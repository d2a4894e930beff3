//! The state store: the conformance suite against the embedded store and against a real etcd
//! (started here from `/usr/bin/etcd`), and the embedded store's crash-safety on disk.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use stagecoach_coordinator::ledger::{Ledger, StoreLedger};
use stagecoach_coordinator::store::embedded::{
    EmbeddedStore, SEGMENT_EXTENSION, WAL_FILE, WAL_PREVIOUS_FILE,
};
use stagecoach_coordinator::store::local_etcd::{free_ports, LocalEtcd};
use stagecoach_coordinator::store::{self, conformance, Op, StateStore, StoreError, Versioned};
use stagecoach_proto::v1;
use tempfile::TempDir;

#[tokio::test]
async fn embedded_store_conforms() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let store = store::open(&format!("file://{}", dir.path().display())).await?;
    conformance::run_all(store).await;
    Ok(())
}

#[tokio::test]
async fn etcd_store_conforms() -> anyhow::Result<()> {
    let etcd = LocalEtcd::start().await?;
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
    // The reason says why, once: the root cause, none repeated down the error chain.
    let text = err.to_string();
    assert!(text.contains("Connection refused"), "{text}");
    let parts: Vec<&str> = text.split(": ").collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].contains(part),
            "{part:?} is said twice in {text:?}"
        );
    }
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
    assert!(has_segment(dir.path())?);
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

    // A crash after the segment's rename but before the log was emptied: the old records are
    // already in the segment and must not be applied twice.
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
    drop(s);
    // The log was set aside at least once (the writes alone hold 50 × 30 bytes of values); a
    // write that finds a compaction still running lets the log grow until the next one.
    assert!(has_segment(small.path())?);
    assert!(fs::metadata(small.path().join(WAL_FILE))?.len() < 50 * 30);
    assert!(
        !small.path().join(WAL_PREVIOUS_FILE).exists(),
        "a finished background compaction leaves no set-aside log"
    );
    assert_eq!(EmbeddedStore::open(small.path())?.range("").await?, state);
    Ok(())
}

fn has_segment(dir: &std::path::Path) -> anyhow::Result<bool> {
    for entry in fs::read_dir(dir)? {
        if entry?
            .path()
            .extension()
            .is_some_and(|e| e == SEGMENT_EXTENSION)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A compaction cut short by a crash: the log it set aside (`wal.previous`) is there, the
/// segment it was writing is not in place. Opening reads the segments, replays the set-aside
/// log and the log, in that order, and writes them out as a segment before taking writes;
/// damage in the set-aside log (which was complete and synced when set aside) is refused, not
/// truncated.
#[tokio::test]
async fn embedded_store_finishes_a_compaction_cut_short() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (wal, previous) = (
        dir.path().join(WAL_FILE),
        dir.path().join(WAL_PREVIOUS_FILE),
    );
    let s = EmbeddedStore::open(dir.path())?;
    for i in 0..10u8 {
        s.put(&format!("k/{}", i % 4), vec![i]).await?;
    }
    s.compact().await?;
    for i in 10..20u8 {
        s.put(&format!("k/{}", i % 4), vec![i]).await?;
    }
    let first = fs::read(&wal)?;
    for i in 20..30u8 {
        s.put(&format!("k/{}", i % 4), vec![i]).await?;
    }
    s.delete("k/1").await?;
    let want = s.range("").await?;
    let all = fs::read(&wal)?;
    drop(s);
    // As the rotation leaves it: the first part set aside, the rest in a fresh log.
    fs::write(&previous, &first)?;
    fs::write(&wal, &all[first.len()..])?;
    let s = EmbeddedStore::open(dir.path())?;
    assert_eq!(s.range("").await?, want);
    assert!(!previous.exists(), "written out as a segment at open");
    assert_eq!(fs::metadata(&wal)?.len(), 0);
    assert_eq!(s.put("k/9", vec![1]).await?, 32, "the revision carries on");
    drop(s);
    assert_eq!(
        EmbeddedStore::open(dir.path())?
            .get("k/9")
            .await?
            .map(|v| v.value),
        Some(vec![1])
    );

    // A set-aside log cut short is damage, not a torn last write.
    let dir = TempDir::new()?;
    let s = EmbeddedStore::open(dir.path())?;
    for i in 0..5u8 {
        s.put("k", vec![i; 20]).await?;
    }
    drop(s);
    let log = fs::read(dir.path().join(WAL_FILE))?;
    fs::write(dir.path().join(WAL_PREVIOUS_FILE), &log[..log.len() - 3])?;
    fs::write(dir.path().join(WAL_FILE), b"")?;
    let err = match EmbeddedStore::open(dir.path()) {
        Ok(_) => anyhow::bail!("a damaged set-aside log was accepted"),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(WAL_PREVIOUS_FILE), "{err}");
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

/// A ledger of `n` committed steps (nothing but their numbers).
async fn ledger_of(store: std::sync::Arc<dyn StateStore>, n: u64) -> anyhow::Result<StoreLedger> {
    let ledger = StoreLedger::new(store, "rewind");
    for step in 0..n {
        let entry = v1::LedgerStep {
            step,
            loss: 2.0,
            ..Default::default()
        };
        ledger.commit(&entry).await?;
    }
    Ok(ledger)
}

/// etcd takes at most 128 operations per transaction; a rollback of 200 steps sets every one
/// aside and points `last` at the step before, on a real etcd.
#[tokio::test]
async fn a_rewind_of_200_steps_fits_etcds_transactions() -> anyhow::Result<()> {
    let etcd = LocalEtcd::start().await?;
    let ledger = ledger_of(store::open(&etcd.url).await?, 230).await?;
    ledger.rewind(30, 7).await?;
    assert_eq!(ledger.last().await?.map(|l| l.step), Some(29));
    assert_eq!(ledger.steps().await?.len(), 30);
    let store = store::open(&etcd.url).await?;
    let aside = store
        .range("jobs/rewind/ledger/rolled_back/000007/")
        .await?;
    assert_eq!(aside.len(), 200);
    assert_eq!(store.get("jobs/rewind/ledger/rewinding").await?, None);
    // A rewind to the very start leaves no last step.
    ledger.rewind(0, 8).await?;
    assert_eq!(ledger.last().await?, None);
    assert!(ledger.steps().await?.is_empty());
    Ok(())
}

/// A coordinator that dies in the middle of a rewind leaves its marker; the next one finishes
/// the move before it reads the ledger.
#[tokio::test]
async fn a_rewind_cut_short_is_finished_by_the_next_coordinator() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let store = store::open(&format!("file://{}", dir.path().display())).await?;
    let ledger = ledger_of(store.clone(), 100).await?;
    // What the first transaction of a rewind to step 40 leaves, as if it died right after.
    let marker = v1::Rewind {
        to_step: 40,
        event: 3,
    };
    let last = ledger.steps().await?[39].clone();
    let ops = vec![
        Op::Put {
            key: "jobs/rewind/ledger/rewinding".into(),
            value: prost::Message::encode_to_vec(&marker),
        },
        Op::Put {
            key: "jobs/rewind/ledger/last".into(),
            value: prost::Message::encode_to_vec(&last),
        },
    ];
    assert!(store.txn(vec![], ops).await?);
    assert_eq!(ledger.steps().await?.len(), 100, "not moved yet");
    ledger.recover().await?;
    assert_eq!(ledger.steps().await?.len(), 40);
    assert_eq!(ledger.last().await?.map(|l| l.step), Some(39));
    assert_eq!(
        store
            .range("jobs/rewind/ledger/rolled_back/000003/")
            .await?
            .len(),
        60
    );
    // Nothing to do the second time.
    ledger.recover().await?;
    assert_eq!(ledger.steps().await?.len(), 40);
    Ok(())
}

/// Leadership fences writes: once another replica won the election, every write of the one
/// that led before (a put, a delete, a transaction) is refused as `Fenced`, and
/// nothing of it lands; the new leader's writes go through.
#[tokio::test]
async fn a_deposed_leaders_writes_are_refused() -> anyhow::Result<()> {
    use stagecoach_coordinator::ha::Election;
    use stagecoach_coordinator::store::etcd::EtcdStore;

    let etcd = LocalEtcd::start().await?;
    let (endpoints, prefix) = store::etcd_url(&format!("{}/fence", etcd.url)).unwrap()?;
    let ttl = Duration::from_secs(2);
    let a = Election::join(&endpoints, &prefix, "job", "http://a:1", ttl).await?;
    let b = Election::join(&endpoints, &prefix, "job", "http://b:1", ttl).await?;
    let store = EtcdStore::connect(&endpoints, &prefix).await?;
    let first = store.fenced(a.campaign().await?.fence);
    first.put("k", b"a".to_vec()).await?;

    // B campaigns while A leads: it wins only once A is gone (its lease revoked here, as
    // when A's lease expires during a pause).
    let b_wins = tokio::spawn(async move { b.campaign().await.map(|l| (b, l)) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_wins.is_finished(), "two leaders at once");
    a.resign().await;
    let (_b, won) = tokio::time::timeout(Duration::from_secs(10), b_wins).await???;
    let second = store.fenced(won.fence);

    let refused = first.put("k", b"stale".to_vec()).await;
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    let refused = first.delete("k").await;
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    let refused = first
        .txn(
            vec![],
            vec![Op::Put {
                key: "other".into(),
                value: b"stale".to_vec(),
            }],
        )
        .await;
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    assert_eq!(store.get("k").await?.map(|v| v.value), Some(b"a".to_vec()));
    assert_eq!(store.get("other").await?, None);

    second.put("k", b"b".to_vec()).await?;
    assert_eq!(store.get("k").await?.map(|v| v.value), Some(b"b".to_vec()));
    Ok(())
}

/// A committed step of a 16,384-sample global batch costs the store its plan's state, not its
/// samples: under 1 KB for both keys together, and a reader gets every sample back exactly as
/// the plan drew them, also after the step is set aside by a rollback.
#[tokio::test]
async fn a_step_is_stored_as_its_plan_state_and_read_back_with_every_sample() -> anyhow::Result<()>
{
    use stagecoach_core::plan::Plan;
    let dir = TempDir::new()?;
    let store = store::open(&format!("file://{}", dir.path().display())).await?;
    let ledger = StoreLedger::new(store.clone(), "compact");
    let mut plan = Plan::new(3, 2048, &[1 << 30, 1 << 28, 1 << 26], vec![0, 0, 0])?;
    plan.set_mix(vec![0.6, 0.3, 0.1], 2048, vec![0, 0, 0])?;
    let mut drawn = vec![];
    for step in 0..3 {
        let draw = plan.draw_state(16_384);
        let samples = plan.take(16_384);
        ledger
            .commit(&v1::LedgerStep {
                step,
                draw: Some(draw),
                cursors: plan.cursors().to_vec(),
                stage_taken: plan.taken().to_vec(),
                loss: 2.5,
                ..Default::default()
            })
            .await?;
        drawn.push(samples);
    }
    let bytes: usize = store
        .range("jobs/compact/ledger/")
        .await?
        .iter()
        .filter(|(k, _)| {
            *k == stagecoach_coordinator::keys::ledger_step("compact", 2)
                || *k == stagecoach_coordinator::keys::ledger_last("compact")
        })
        .map(|(k, v)| k.len() + v.value.len())
        .sum();
    println!("a 16,384-sample step: {bytes} bytes of keys and values (the step and `last`)");
    assert!(bytes > 0 && bytes < 1024, "{bytes} bytes");
    let as_refs = |s: &[stagecoach_core::plan::SampleId]| -> Vec<(u32, u64)> {
        s.iter().map(|x| (x.source as u32, x.index)).collect()
    };
    let read = ledger.steps().await?;
    assert_eq!(read.len(), 3);
    for (r, want) in read.iter().zip(&drawn) {
        let got: Vec<(u32, u64)> = r.samples.iter().map(|x| (x.source, x.index)).collect();
        assert_eq!(got, as_refs(want), "step {}", r.step);
    }
    let last = ledger.last().await?.expect("a last step");
    assert_eq!(last.samples.len(), 16_384);
    ledger.rewind(1, 4).await?;
    let aside = store.range("jobs/compact/ledger/rolled_back/").await?;
    assert_eq!(aside.len(), 2);
    for ((k, v), want) in aside.iter().zip(&drawn[1..]) {
        assert!(v.value.len() < 1024, "a step set aside stays compact");
        let step = stagecoach_coordinator::ledger::decode_step(k, &v.value)?;
        let got: Vec<(u32, u64)> = step.samples.iter().map(|x| (x.source, x.index)).collect();
        assert_eq!(got, as_refs(want));
    }
    // A record whose plan state no plan could have had is refused, naming the key.
    let bad = v1::LedgerStep {
        step: 9,
        draw: Some(v1::PlanDraw {
            blocks: vec![4],
            cursors: vec![0, 0],
            ..Default::default()
        }),
        ..Default::default()
    };
    let err =
        stagecoach_coordinator::ledger::decode_step("k/9", &prost::Message::encode_to_vec(&bad))
            .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("k/9"), "{err}");
    Ok(())
}
