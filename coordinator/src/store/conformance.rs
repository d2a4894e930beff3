//! The behaviour every [`StateStore`] must share, as a test suite: `tests/store.rs` runs it
//! against the embedded store and against a real etcd. It panics on the first difference.
//!
//! Each check writes its own keys (`<check>/...`), so the suite needs a store where those are
//! absent, and runs once per store.

use std::sync::Arc;
use std::time::Duration;

use super::{Compare, Op, StateStore, StoreError, Versioned, WatchEvent, WatchStream};

/// How long a watch may take to deliver an event before the suite gives up.
const WATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs every check, in order.
pub async fn run_all(store: Arc<dyn StateStore>) {
    let s = &*store;
    get_absent_and_present(s).await;
    put_returns_increasing_revisions(s).await;
    versions_count_writes_and_reset_on_delete(s).await;
    delete_reports_whether_the_key_existed(s).await;
    range_is_a_string_prefix_in_key_order(s).await;
    txn_success_applies_all_ops_at_one_revision(s).await;
    txn_failure_changes_nothing(s).await;
    txn_version_zero_means_create_if_absent(s).await;
    txn_compare_value(s).await;
    invalid_requests_are_rejected(s).await;
    watch_sees_later_changes_under_its_prefix_in_order(s).await;
}

pub async fn get_absent_and_present(s: &dyn StateStore) {
    assert_eq!(s.get("get/k").await.unwrap(), None);
    let rev = s.put("get/k", b"v".to_vec()).await.unwrap();
    let got = s.get("get/k").await.unwrap().expect("a key just put");
    let want = Versioned {
        value: b"v".to_vec(),
        version: 1,
        mod_revision: rev,
    };
    assert_eq!(got, want);
    assert_eq!(
        s.get("get/k2").await.unwrap(),
        None,
        "only the key put exists"
    );
}

pub async fn put_returns_increasing_revisions(s: &dyn StateStore) {
    let mut last = 0;
    for key in ["rev/a", "rev/b", "rev/a"] {
        let rev = s.put(key, key.into()).await.unwrap();
        assert!(
            rev > last,
            "put of {key} returned revision {rev} after {last}"
        );
        assert_eq!(s.get(key).await.unwrap().unwrap().mod_revision, rev);
        last = rev;
    }
}

pub async fn versions_count_writes_and_reset_on_delete(s: &dyn StateStore) {
    for n in 1..=3 {
        s.put("ver/k", vec![n]).await.unwrap();
        assert_eq!(version(s, "ver/k").await, u64::from(n));
    }
    assert!(s.delete("ver/k").await.unwrap());
    assert_eq!(version(s, "ver/k").await, 0);
    s.put("ver/k", b"again".to_vec()).await.unwrap();
    assert_eq!(version(s, "ver/k").await, 1, "a delete resets the version");
}

pub async fn delete_reports_whether_the_key_existed(s: &dyn StateStore) {
    assert!(!s.delete("del/k").await.unwrap(), "delete of an absent key");
    s.put("del/k", b"v".to_vec()).await.unwrap();
    assert!(s.delete("del/k").await.unwrap());
    assert_eq!(s.get("del/k").await.unwrap(), None);
    assert!(!s.delete("del/k").await.unwrap(), "second delete");
}

pub async fn range_is_a_string_prefix_in_key_order(s: &dyn StateStore) {
    for key in ["jobx", "job/b", "job", "job/ab", "joa", "job/a", "jobs/a"] {
        s.put(&format!("range/{key}"), key.into()).await.unwrap();
    }
    let cases: [(&str, &[&str]); 6] = [
        ("job/", &["job/a", "job/ab", "job/b"]),
        ("job/a", &["job/a", "job/ab"]),
        ("job/ab", &["job/ab"]),
        (
            "job",
            &["job", "job/a", "job/ab", "job/b", "jobs/a", "jobx"],
        ),
        ("jobs/", &["jobs/a"]),
        ("nothing", &[]),
    ];
    for (prefix, want) in cases {
        let got = s.range(&format!("range/{prefix}")).await.unwrap();
        let keys: Vec<&str> = got.iter().map(|(k, _)| &k["range/".len()..]).collect();
        assert_eq!(keys, want, "range of {prefix:?}");
        for (key, v) in &got {
            assert_eq!(v.value, &key.as_bytes()["range/".len()..]);
            assert_eq!(v.version, 1);
        }
    }
}

pub async fn txn_success_applies_all_ops_at_one_revision(s: &dyn StateStore) {
    s.put("txn/c", b"old".to_vec()).await.unwrap();
    let compares = vec![version_is("txn/a", 0), value_is("txn/c", "old")];
    let ops = vec![put("txn/a", "1"), put("txn/b", "2"), delete("txn/c")];
    assert!(s.txn(compares, ops).await.unwrap());
    let (a, b) = (get(s, "txn/a").await, get(s, "txn/b").await);
    assert_eq!((a.value.as_slice(), a.version), (&b"1"[..], 1));
    assert_eq!((b.value.as_slice(), b.version), (&b"2"[..], 1));
    assert_eq!(
        a.mod_revision, b.mod_revision,
        "one transaction, one revision"
    );
    assert_eq!(s.get("txn/c").await.unwrap(), None);
}

pub async fn txn_failure_changes_nothing(s: &dyn StateStore) {
    s.put("fail/a", b"1".to_vec()).await.unwrap();
    s.put("fail/b", b"1".to_vec()).await.unwrap();
    let before = s.range("fail/").await.unwrap();
    // The first compare holds, the second does not.
    let compares = vec![version_is("fail/a", 1), value_is("fail/b", "wrong")];
    let ops = vec![put("fail/a", "2"), delete("fail/b"), put("fail/new", "x")];
    assert!(!s.txn(compares, ops).await.unwrap());
    assert_eq!(s.range("fail/").await.unwrap(), before);
}

pub async fn txn_version_zero_means_create_if_absent(s: &dyn StateStore) {
    let create = |value| {
        (
            vec![version_is("create/k", 0)],
            vec![put("create/k", value)],
        )
    };
    let (compares, ops) = create("first");
    assert!(s.txn(compares, ops).await.unwrap(), "absent key");
    let (compares, ops) = create("second");
    assert!(!s.txn(compares, ops).await.unwrap(), "present key");
    assert_eq!(get(s, "create/k").await.value, b"first");
    // A version other than 0 matches the write count.
    let ops = vec![put("create/k", "third")];
    assert!(s.txn(vec![version_is("create/k", 1)], ops).await.unwrap());
    assert_eq!(version(s, "create/k").await, 2);
}

pub async fn txn_compare_value(s: &dyn StateStore) {
    s.put("cas/k", b"a".to_vec()).await.unwrap();
    let swap = |from: &str, to: &str| (vec![value_is("cas/k", from)], vec![put("cas/k", to)]);
    let (compares, ops) = swap("b", "c");
    assert!(!s.txn(compares, ops).await.unwrap(), "value differs");
    let (compares, ops) = swap("a", "b");
    assert!(s.txn(compares, ops).await.unwrap(), "value matches");
    assert_eq!(get(s, "cas/k").await.value, b"b");
    let (compares, ops) = (vec![value_is("cas/absent", "")], vec![put("cas/k", "x")]);
    assert!(
        !s.txn(compares, ops).await.unwrap(),
        "an absent key has no value"
    );
    assert_eq!(get(s, "cas/k").await.value, b"b");
}

pub async fn invalid_requests_are_rejected(s: &dyn StateStore) {
    let err = s.put("", b"v".to_vec()).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err}");
    let ops = vec![put("bad/k", "1"), put("bad/k", "2")];
    let err = s.txn(Vec::new(), ops).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err}");
    assert!(!err.retryable());
    assert_eq!(s.get("bad/k").await.unwrap(), None);
}

pub async fn watch_sees_later_changes_under_its_prefix_in_order(s: &dyn StateStore) {
    s.put("watch/job/early", b"0".to_vec()).await.unwrap();
    let mut w = s.watch("watch/job/").await.unwrap();
    let r1 = s.put("watch/job/a", b"1".to_vec()).await.unwrap();
    s.put("watch/jobx", b"x".to_vec()).await.unwrap();
    s.put("watch/other", b"o".to_vec()).await.unwrap();
    assert!(s.delete("watch/job/a").await.unwrap());
    let ops = vec![
        put("watch/job/b", "2"),
        put("watch/other", "o2"),
        delete("watch/job/early"),
        delete("watch/job/absent"),
    ];
    assert!(s.txn(Vec::new(), ops).await.unwrap());
    let r_end = s.put("watch/job/end", b"e".to_vec()).await.unwrap();

    let mut events = Vec::new();
    for _ in 0..5 {
        events.push(next_event(&mut w).await);
    }
    let rev = |i: usize| match &events[i] {
        WatchEvent::Put { mod_revision, .. } | WatchEvent::Delete { mod_revision, .. } => {
            *mod_revision
        }
    };
    let (r_delete, r_txn) = (rev(1), rev(2));
    let want = vec![
        put_event("watch/job/a", "1", r1),
        WatchEvent::Delete {
            key: "watch/job/a".to_owned(),
            mod_revision: r_delete,
        },
        put_event("watch/job/b", "2", r_txn),
        WatchEvent::Delete {
            key: "watch/job/early".to_owned(),
            mod_revision: r_txn,
        },
        put_event("watch/job/end", "e", r_end),
    ];
    assert_eq!(events, want);
    assert!(
        r1 < r_delete && r_delete < r_txn && r_txn < r_end,
        "{events:?}"
    );
}

async fn next_event(w: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(WATCH_TIMEOUT, w.recv())
        .await
        .expect("no watch event in time")
        .expect("the watch ended")
        .expect("the watch failed")
}

async fn get(s: &dyn StateStore, key: &str) -> Versioned {
    s.get(key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{key} is absent"))
}

async fn version(s: &dyn StateStore, key: &str) -> u64 {
    s.get(key).await.unwrap().map_or(0, |v| v.version)
}

fn version_is(key: &str, version: u64) -> Compare {
    Compare::Version {
        key: key.to_owned(),
        version,
    }
}

fn value_is(key: &str, value: &str) -> Compare {
    Compare::Value {
        key: key.to_owned(),
        value: value.into(),
    }
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.into(),
    }
}

fn delete(key: &str) -> Op {
    Op::Delete {
        key: key.to_owned(),
    }
}

fn put_event(key: &str, value: &str, mod_revision: u64) -> WatchEvent {
    WatchEvent::Put {
        key: key.to_owned(),
        value: value.into(),
        mod_revision,
    }
}
