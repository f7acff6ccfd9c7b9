//! One behavioural suite, run against every backend.

use std::sync::Arc;

use crate::*;

fn cred(hash: &str, n: u8) -> StoredCredential {
    StoredCredential {
        hash: hash.into(),
        salt: vec![n; 16],
        iterations: 4096,
        stored_key: vec![n; 32],
        server_key: vec![n + 1; 32],
    }
}

fn item(jid: &str, sub: Subscription) -> RosterItem {
    RosterItem {
        subscription: sub,
        ..RosterItem::new(jid)
    }
}

async fn accounts_crud<S: Storage>(s: &S) {
    assert!(s.account("a@x").await.unwrap().is_none());
    s.create_account("a@x", vec![cred("SHA-1", 1), cred("SHA-256", 2)])
        .await
        .unwrap();
    assert!(matches!(
        s.create_account("a@x", vec![]).await,
        Err(StorageError::AccountExists)
    ));
    let a = s.account("a@x").await.unwrap().unwrap();
    assert_eq!(a.jid, "a@x");
    assert_eq!(a.credentials, vec![cred("SHA-1", 1), cred("SHA-256", 2)]);
    assert!(a.created_unix > 1_600_000_000);

    s.set_credentials("a@x", vec![cred("SHA-512", 3)])
        .await
        .unwrap();
    let b = s.account("a@x").await.unwrap().unwrap();
    assert_eq!(b.credentials, vec![cred("SHA-512", 3)]);
    assert_eq!(b.created_unix, a.created_unix);
    assert!(matches!(
        s.set_credentials("nobody@x", vec![]).await,
        Err(StorageError::NoSuchAccount)
    ));

    // Asked twice, so that a backend that remembers the answer is asked again after the deletion.
    assert!(s.account_exists("a@x").await.unwrap());
    assert!(s.account_exists("a@x").await.unwrap());
    assert!(!s.account_exists("nobody@x").await.unwrap());
    s.delete_account("a@x").await.unwrap();
    assert!(s.account("a@x").await.unwrap().is_none());
    assert!(!s.account_exists("a@x").await.unwrap());
    assert!(matches!(
        s.delete_account("a@x").await,
        Err(StorageError::NoSuchAccount)
    ));
    // Re-creatable after deletion.
    s.create_account("a@x", vec![]).await.unwrap();
    assert!(s.account_exists("a@x").await.unwrap());
    assert!(s
        .account("a@x")
        .await
        .unwrap()
        .unwrap()
        .credentials
        .is_empty());
}

async fn list_accounts<S: Storage>(s: &S) {
    assert!(s.list_accounts(None).await.unwrap().is_empty());
    for j in [
        "zed@b.org",
        "amy@a.org",
        "bob@b.org",
        "cat@a.org.evil",
        "b.org",
        "al@a.org",
    ] {
        s.create_account(j, vec![]).await.unwrap();
    }
    assert_eq!(
        s.list_accounts(None).await.unwrap(),
        [
            "al@a.org",
            "amy@a.org",
            "b.org",
            "bob@b.org",
            "cat@a.org.evil",
            "zed@b.org"
        ]
    );
    assert_eq!(
        s.list_accounts(Some("a.org")).await.unwrap(),
        ["al@a.org", "amy@a.org"]
    );
    assert_eq!(
        s.list_accounts(Some("b.org")).await.unwrap(),
        ["b.org", "bob@b.org", "zed@b.org"]
    );
    assert!(s.list_accounts(Some("c.org")).await.unwrap().is_empty());
}

async fn delete_account_removes_only_that_user<S: Storage>(s: &S) {
    for owner in ["a@x", "a@xy", "a@x.y"] {
        s.create_account(owner, vec![]).await.unwrap();
        s.put_roster_item(owner, item("c@z", Subscription::Both))
            .await
            .unwrap();
        s.push_offline(owner, b"<message/>".to_vec(), 10)
            .await
            .unwrap();
        s.push_offline(owner, b"<message/>".to_vec(), 10)
            .await
            .unwrap();
        s.put_user_data(owner, "vcard", b"v".to_vec())
            .await
            .unwrap();
        s.put_user_data(owner, "private:a", b"p".to_vec())
            .await
            .unwrap();
    }
    s.delete_account("a@x").await.unwrap();
    assert_eq!(s.roster("a@x").await.unwrap(), (0, vec![]));
    assert!(s.roster_item("a@x", "c@z").await.unwrap().is_none());
    assert!(s.offline_messages("a@x").await.unwrap().is_empty());
    assert_eq!(s.offline_count("a@x").await.unwrap(), 0);
    assert!(s.list_user_data("a@x", "").await.unwrap().is_empty());
    assert!(s.get_user_data("a@x", "vcard").await.unwrap().is_none());
    for other in ["a@xy", "a@x.y"] {
        assert!(s.account(other).await.unwrap().is_some());
        let (v, items) = s.roster(other).await.unwrap();
        assert_eq!((v, items.len()), (1, 1));
        assert_eq!(s.offline_messages(other).await.unwrap().len(), 2);
        assert_eq!(s.offline_count(other).await.unwrap(), 2);
        assert_eq!(s.list_user_data(other, "").await.unwrap().len(), 2);
    }
    // A recreated account starts from scratch: its queue and its roster version start over.
    s.create_account("a@x", vec![]).await.unwrap();
    assert_eq!(s.push_offline("a@x", b"m".to_vec(), 10).await.unwrap(), 1);
    assert_eq!(
        s.put_roster_item("a@x", item("c@z", Subscription::None))
            .await
            .unwrap(),
        1
    );
}

async fn roster_versions<S: Storage>(s: &S) {
    assert_eq!(s.roster("a@x").await.unwrap(), (0, vec![]));
    let v1 = s
        .put_roster_item("a@x", item("m@y", Subscription::None))
        .await
        .unwrap();
    let v2 = s
        .put_roster_item("a@x", item("b@y", Subscription::To))
        .await
        .unwrap();
    assert!(v1 >= 1 && v2 > v1);
    let mut full = item("m@y", Subscription::Both);
    full.name = Some("Emm".into());
    full.ask = true;
    full.approved = true;
    full.groups = vec!["Work".into(), "Friends".into()];
    let v3 = s.put_roster_item("a@x", full.clone()).await.unwrap();
    assert!(v3 > v2);
    let (v, items) = s.roster("a@x").await.unwrap();
    assert_eq!(v, v3);
    assert_eq!(items, vec![item("b@y", Subscription::To), full.clone()]);
    assert_eq!(s.roster_item("a@x", "m@y").await.unwrap(), Some(full));
    assert_eq!(s.roster_item("a@x", "zz@y").await.unwrap(), None);

    let v4 = s.remove_roster_item("a@x", "m@y").await.unwrap();
    assert!(v4 > v3);
    let v5 = s.remove_roster_item("a@x", "absent@y").await.unwrap();
    assert!(v5 > v4);
    assert_eq!(
        s.roster("a@x").await.unwrap(),
        (v5, vec![item("b@y", Subscription::To)])
    );
    // Other owners are independent, including one whose JID extends this one.
    assert_eq!(s.roster("a@xy").await.unwrap(), (0, vec![]));
    assert_eq!(s.roster("a").await.unwrap(), (0, vec![]));
    // Removing the last item keeps the version.
    let v6 = s.remove_roster_item("a@x", "b@y").await.unwrap();
    assert_eq!(s.roster("a@x").await.unwrap(), (v6, vec![]));
}

async fn offline_queue<S: Storage>(s: &S) {
    assert!(s.offline_messages("a@x").await.unwrap().is_empty());
    assert_eq!(s.offline_count("a@x").await.unwrap(), 0);
    let mut seqs = Vec::new();
    for i in 0..5u8 {
        seqs.push(s.push_offline("a@x", vec![i], 5).await.unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert!(matches!(
        s.push_offline("a@x", vec![9], 5).await,
        Err(StorageError::QueueFull)
    ));
    assert!(matches!(
        s.push_offline("a@x", vec![9], 0).await,
        Err(StorageError::QueueFull)
    ));
    assert_eq!(s.offline_count("a@x").await.unwrap(), 5);
    // Other owners have their own queue and cap.
    assert!(matches!(
        s.push_offline("a@xy", vec![9], 0).await,
        Err(StorageError::QueueFull)
    ));
    s.push_offline("a@xy", vec![9], 1).await.unwrap();
    let msgs = s.offline_messages("a@x").await.unwrap();
    assert_eq!(
        msgs,
        seqs.iter()
            .zip(0u8..)
            .map(|(s, i)| (*s, vec![i]))
            .collect::<Vec<_>>()
    );

    s.remove_offline("a@x", seqs[1]).await.unwrap();
    assert_eq!(s.offline_count("a@x").await.unwrap(), 3);
    assert_eq!(
        s.offline_messages("a@x").await.unwrap()[0],
        (seqs[2], vec![2])
    );
    s.remove_offline("a@x", 0).await.unwrap();
    s.remove_offline("a@x", seqs[1]).await.unwrap();
    assert_eq!(s.offline_count("a@x").await.unwrap(), 3);
    // Room again, and the sequence keeps going up after removals.
    let next = s.push_offline("a@x", vec![5], 5).await.unwrap();
    assert!(next > seqs[4]);
    s.remove_offline("a@x", u64::MAX).await.unwrap();
    assert_eq!(s.offline_count("a@x").await.unwrap(), 0);
    assert!(s.offline_messages("a@x").await.unwrap().is_empty());
    let after = s.push_offline("a@x", vec![6], 5).await.unwrap();
    assert!(after > next);
    assert_eq!(s.offline_messages("a@xy").await.unwrap().len(), 1);
    // Removing from an empty / unknown queue is fine.
    s.remove_offline("nobody@x", 10).await.unwrap();
    // Empty stanza bytes are stored faithfully.
    let e = s.push_offline("b@x", vec![], 5).await.unwrap();
    assert_eq!(s.offline_messages("b@x").await.unwrap(), vec![(e, vec![])]);
}

async fn offline_many_keep_order<S: Storage>(s: &S) {
    // More than 255 and 65535 would need many writes; 300 crosses a byte boundary of the big-endian key.
    for i in 0..300u32 {
        s.push_offline("a@x", i.to_be_bytes().to_vec(), 1000)
            .await
            .unwrap();
    }
    let msgs = s.offline_messages("a@x").await.unwrap();
    assert_eq!(msgs.len(), 300);
    for (i, (seq, m)) in msgs.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(m, &(i as u32).to_be_bytes());
    }
    s.remove_offline("a@x", 256).await.unwrap();
    assert_eq!(s.offline_count("a@x").await.unwrap(), 44);
    assert_eq!(s.offline_messages("a@x").await.unwrap()[0].0, 257);
}

async fn offline_pages<S: Storage>(s: &S) {
    assert!(s.offline_page("a@x", 10, 1000).await.unwrap().is_empty());
    for i in 0..10u8 {
        s.push_offline("a@x", vec![i; 100], 1000).await.unwrap();
    }
    s.push_offline("b@x", vec![9; 10], 1000).await.unwrap();
    // By count.
    let page = s.offline_page("a@x", 4, usize::MAX).await.unwrap();
    assert_eq!(
        page.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(page[3].1, vec![3; 100]);
    // By bytes: the stanza that reaches the limit is the last one.
    let page = s.offline_page("a@x", 100, 250).await.unwrap();
    assert_eq!(page.len(), 3);
    // At least one, however small the byte limit.
    assert_eq!(s.offline_page("a@x", 100, 1).await.unwrap().len(), 1);
    // After a removal the page starts at the oldest left, and only the owner's.
    s.remove_offline("a@x", 8).await.unwrap();
    let page = s.offline_page("a@x", 100, usize::MAX).await.unwrap();
    assert_eq!(page.iter().map(|(q, _)| *q).collect::<Vec<_>>(), [9, 10]);
    assert_eq!(
        s.offline_page("b@x", 100, usize::MAX).await.unwrap().len(),
        1
    );
}

async fn user_data<S: Storage>(s: &S) {
    assert!(s.get_user_data("a@x", "vcard").await.unwrap().is_none());
    s.put_user_data("a@x", "vcard", b"<vCard/>".to_vec())
        .await
        .unwrap();
    s.put_user_data("a@x", "private:storage:bookmarks", b"b".to_vec())
        .await
        .unwrap();
    s.put_user_data("a@x", "private:exodus", b"e".to_vec())
        .await
        .unwrap();
    s.put_user_data("a@x", "pending-sub:c@z", b"<presence/>".to_vec())
        .await
        .unwrap();
    s.put_user_data("a@xy", "private:other", b"o".to_vec())
        .await
        .unwrap();
    s.put_user_data("a@x", "empty", vec![]).await.unwrap();
    assert_eq!(
        s.get_user_data("a@x", "vcard").await.unwrap().unwrap(),
        b"<vCard/>"
    );
    assert_eq!(s.get_user_data("a@x", "empty").await.unwrap().unwrap(), b"");
    s.put_user_data("a@x", "vcard", b"<vCard>2</vCard>".to_vec())
        .await
        .unwrap();
    assert_eq!(
        s.get_user_data("a@x", "vcard").await.unwrap().unwrap(),
        b"<vCard>2</vCard>"
    );

    assert_eq!(
        s.list_user_data("a@x", "private:").await.unwrap(),
        vec![
            ("private:exodus".to_string(), b"e".to_vec()),
            ("private:storage:bookmarks".to_string(), b"b".to_vec()),
        ]
    );
    let all: Vec<String> = s
        .list_user_data("a@x", "")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        all,
        [
            "empty",
            "pending-sub:c@z",
            "private:exodus",
            "private:storage:bookmarks",
            "vcard"
        ]
    );
    assert!(s.list_user_data("a@x", "zzz").await.unwrap().is_empty());

    s.delete_user_data("a@x", "private:exodus").await.unwrap();
    s.delete_user_data("a@x", "absent").await.unwrap();
    assert!(s
        .get_user_data("a@x", "private:exodus")
        .await
        .unwrap()
        .is_none());
    assert_eq!(s.list_user_data("a@x", "private:").await.unwrap().len(), 1);
    assert_eq!(s.list_user_data("a@xy", "").await.unwrap().len(), 1);
}

async fn nul_in_owner_is_refused<S: Storage>(s: &S) {
    let bad = "a\0b@x";
    assert!(matches!(
        s.create_account(bad, vec![]).await,
        Err(StorageError::InvalidKey(_))
    ));
    assert!(matches!(
        s.put_roster_item(bad, item("c@z", Subscription::None))
            .await,
        Err(StorageError::InvalidKey(_))
    ));
    assert!(matches!(
        s.push_offline(bad, vec![], 5).await,
        Err(StorageError::InvalidKey(_))
    ));
    assert!(matches!(
        s.put_user_data(bad, "k", vec![]).await,
        Err(StorageError::InvalidKey(_))
    ));
    assert!(matches!(
        s.list_user_data(bad, "").await,
        Err(StorageError::InvalidKey(_))
    ));
    // NUL in the part after the owner is unambiguous and allowed.
    s.put_user_data("a@x", "k\0k", b"v".to_vec()).await.unwrap();
    assert_eq!(
        s.list_user_data("a@x", "k").await.unwrap(),
        vec![("k\0k".to_string(), b"v".to_vec())]
    );
}

async fn concurrent_writers<S: Storage>(s: Arc<S>) {
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("u{}@x", i % 5);
            s.push_offline(&owner, i.to_be_bytes().to_vec(), 8)
                .await
                .ok();
            s.put_roster_item(&owner, RosterItem::new(format!("c{i}@y")))
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for u in 0..5 {
        let owner = format!("u{u}@x");
        assert_eq!(s.offline_count(&owner).await.unwrap(), 8);
        let (v, items) = s.roster(&owner).await.unwrap();
        assert_eq!((v, items.len()), (10, 10));
    }
}

async fn flush_and_size<S: Storage>(s: &S) {
    s.flush().await.unwrap();
    s.put_user_data("a@x", "k", vec![1; 100]).await.unwrap();
    s.flush().await.unwrap();
    let _ = s.size_on_disk();
}

/// Every kind of record, with counters that differ from what the data alone implies (a roster version above
/// the item count, an offline counter above the queued messages).
async fn populate<S: Storage>(s: &S) {
    s.create_account("a@x", vec![cred("SHA-1", 1), cred("SHA-256", 2)])
        .await
        .unwrap();
    s.create_account("b@x", vec![cred("SHA-512", 3)])
        .await
        .unwrap();
    s.create_account("c@y", vec![]).await.unwrap();
    let mut named = item("b@x", Subscription::Both);
    named.name = Some("Bé".into());
    named.groups = vec!["Friends".into(), "".into()];
    s.put_roster_item("a@x", named).await.unwrap();
    let mut asking = item("c@y", Subscription::None);
    asking.ask = true;
    asking.approved = true;
    s.put_roster_item("a@x", asking).await.unwrap();
    s.put_roster_item("a@x", item("gone@z", Subscription::To))
        .await
        .unwrap();
    s.remove_roster_item("a@x", "gone@z").await.unwrap();
    s.put_roster_item("b@x", item("a@x", Subscription::Both))
        .await
        .unwrap();
    for m in ["one", "two", "three"] {
        s.push_offline("b@x", m.as_bytes().to_vec(), 10)
            .await
            .unwrap();
    }
    s.remove_offline("b@x", 1).await.unwrap();
    s.push_offline("c@y", b"\0binary\xff".to_vec(), 10)
        .await
        .unwrap();
    s.remove_offline("c@y", u64::MAX).await.unwrap();
    s.put_user_data("a@x", "vcard", b"<vCard xmlns='vcard-temp'/>".to_vec())
        .await
        .unwrap();
    s.put_user_data("a@x", "private/x y", vec![0, 1, 255])
        .await
        .unwrap();
    s.put_user_data("b@x", "", Vec::new()).await.unwrap();
}

async fn export_all<S: Storage + ?Sized>(s: &S) -> Vec<Record> {
    let mut out = Vec::new();
    s.export(&mut |r| {
        out.push(r);
        Ok(())
    })
    .await
    .unwrap();
    out
}

/// What a store holds, through the ordinary read methods.
async fn contents<S: Storage + ?Sized>(s: &S) -> Vec<String> {
    let mut out = Vec::new();
    for jid in s.list_accounts(None).await.unwrap() {
        out.push(format!("{:?}", s.account(&jid).await.unwrap()));
        out.push(format!("{:?}", s.roster(&jid).await.unwrap()));
        out.push(format!("{:?}", s.offline_messages(&jid).await.unwrap()));
        out.push(format!("{:?}", s.offline_count(&jid).await.unwrap()));
        out.push(format!("{:?}", s.list_user_data(&jid, "").await.unwrap()));
    }
    out
}

async fn export_import_roundtrip<S: Storage>(s: &S, fresh: &S) {
    populate(s).await;
    let records = export_all(s).await;
    assert!(matches!(records.first(), Some(Record::Account(_))));
    let count = |f: fn(&Record) -> bool| records.iter().filter(|r| f(r)).count();
    assert_eq!(count(|r| matches!(r, Record::Account(_))), 3);
    assert_eq!(count(|r| matches!(r, Record::RosterItem { .. })), 3);
    assert_eq!(count(|r| matches!(r, Record::RosterVersion { .. })), 2);
    assert_eq!(count(|r| matches!(r, Record::OfflineMessage { .. })), 2);
    assert_eq!(count(|r| matches!(r, Record::OfflineCounter { .. })), 2);
    assert_eq!(count(|r| matches!(r, Record::UserData { .. })), 3);

    fresh.import(records.clone()).await.unwrap();
    assert_eq!(contents(fresh).await, contents(s).await);
    assert_eq!(export_all(fresh).await, records);
    // The counters came along: versions and sequence numbers go on from where they were.
    assert_eq!(fresh.roster("a@x").await.unwrap().0, 4);
    assert_eq!(
        fresh
            .put_roster_item("a@x", item("d@z", Subscription::None))
            .await
            .unwrap(),
        5
    );
    assert_eq!(
        fresh
            .push_offline("b@x", b"four".to_vec(), 10)
            .await
            .unwrap(),
        4
    );
    assert_eq!(
        fresh
            .push_offline("c@y", b"again".to_vec(), 10)
            .await
            .unwrap(),
        2
    );
    // The cap counts the restored messages.
    assert!(matches!(
        fresh.push_offline("b@x", b"over".to_vec(), 3).await,
        Err(StorageError::QueueFull)
    ));
    // An export of an empty store is empty, and imports into an empty store.
    assert!(export_all(&*Arc::new(MemoryStorage::new()))
        .await
        .is_empty());
}

async fn import_refuses_a_store_with_data<S: Storage>(s: &S, other: &S) {
    populate(s).await;
    let records = export_all(s).await;
    other.create_account("z@x", vec![]).await.unwrap();
    let before = export_all(other).await;
    match other.import(records.clone()).await {
        Err(StorageError::NotEmpty(m)) => assert!(m.contains("1 account"), "{m}"),
        r => panic!("import into a store with an account: {r:?}"),
    }
    assert_eq!(export_all(other).await, before);
    // Records left without their account count as data too.
    other.delete_account("z@x").await.unwrap();
    other.put_user_data("z@x", "k", vec![1]).await.unwrap();
    assert!(matches!(
        other.import(records.clone()).await,
        Err(StorageError::NotEmpty(_))
    ));
    // The store exported from refuses its own records.
    assert!(matches!(
        s.import(records).await,
        Err(StorageError::NotEmpty(_))
    ));
}

async fn import_refuses_contradictions<S: Storage>(s: &S) {
    let acc = |jid: &str| {
        Record::Account(Account {
            jid: jid.into(),
            credentials: vec![cred("SHA-256", 1)],
            created_unix: 1,
        })
    };
    let msg = |seq| Record::OfflineMessage {
        owner: "a@x".into(),
        seq,
        stanza: b"m".to_vec(),
    };
    let counter = |last_seq| Record::OfflineCounter {
        owner: "a@x".into(),
        last_seq,
    };
    let ud = || Record::UserData {
        owner: "a@x".into(),
        key: "k".into(),
        value: vec![],
    };
    let ri = || Record::RosterItem {
        owner: "a@x".into(),
        item: RosterItem::new("b@y"),
    };
    let rv = || Record::RosterVersion {
        owner: "a@x".into(),
        version: 1,
    };
    let bad: Vec<(Vec<Record>, &str)> = vec![
        (
            vec![acc("a@x"), acc("b@x"), acc("a@x")],
            "duplicate account",
        ),
        (vec![acc("a@x"), ri(), ri()], "duplicate roster item"),
        (vec![rv(), rv()], "duplicate roster version"),
        (vec![msg(1), msg(1)], "duplicate offline message"),
        (vec![counter(3), counter(3)], "duplicate offline counter"),
        (vec![ud(), ud()], "duplicate user data"),
        (vec![counter(2), msg(3)], "above its counter"),
        (vec![msg(0)], "numbered 0"),
        (vec![acc("a\0b@x")], "NUL"),
    ];
    for (records, why) in bad {
        match s.import(records).await {
            Err(StorageError::Corrupt(m)) => assert!(m.contains(why), "{m} (expected {why})"),
            r => panic!("{why}: {r:?}"),
        }
        assert!(
            export_all(s).await.is_empty(),
            "{why}: something was imported"
        );
    }
    // A queue without a counter record takes its highest message as the counter.
    s.import(vec![acc("a@x"), msg(2), msg(7)]).await.unwrap();
    assert_eq!(s.offline_count("a@x").await.unwrap(), 2);
    assert_eq!(s.push_offline("a@x", b"n".to_vec(), 10).await.unwrap(), 8);
}

async fn export_stops_on_sink_error<S: Storage>(s: &S) {
    populate(s).await;
    let mut seen = 0;
    let r = s
        .export(&mut |_| {
            seen += 1;
            if seen == 2 {
                Err(StorageError::Backend("disk full".into()))
            } else {
                Ok(())
            }
        })
        .await;
    assert!(matches!(r, Err(StorageError::Backend(m)) if m == "disk full"));
    assert_eq!(seen, 2);
}

/// Exports taken while writers run are each one point in time: a roster's version always equals its number
/// of items and an offline counter its number of messages, because each writer only adds.
async fn export_is_a_snapshot<S: Storage>(s: Arc<S>) {
    const ROUNDS: u64 = 100;
    let mut writers = Vec::new();
    for w in 0..4 {
        let s = s.clone();
        writers.push(tokio::spawn(async move {
            let owner = format!("w{w}@x");
            for i in 0..ROUNDS {
                s.put_roster_item(&owner, item(&format!("c{i}@y"), Subscription::None))
                    .await
                    .unwrap();
                s.push_offline(&owner, vec![1], usize::MAX).await.unwrap();
                tokio::task::yield_now().await;
            }
        }));
    }
    // Exports while the writers run, and one after they are done.
    loop {
        let done = writers.iter().all(|w| w.is_finished());
        let records = export_all(&*s).await;
        let mut versions = std::collections::HashMap::new();
        let mut items = std::collections::HashMap::<String, u64>::new();
        let mut counters = std::collections::HashMap::new();
        let mut msgs = std::collections::HashMap::<String, u64>::new();
        for r in &records {
            match r {
                Record::RosterVersion { owner, version } => {
                    versions.insert(owner.clone(), *version);
                }
                Record::RosterItem { owner, .. } => *items.entry(owner.clone()).or_default() += 1,
                Record::OfflineCounter { owner, last_seq } => {
                    counters.insert(owner.clone(), *last_seq);
                }
                Record::OfflineMessage { owner, .. } => {
                    *msgs.entry(owner.clone()).or_default() += 1
                }
                _ => {}
            }
        }
        for (owner, v) in &versions {
            assert_eq!(
                items.get(owner).copied().unwrap_or(0),
                *v,
                "roster of {owner}"
            );
        }
        for (owner, c) in &counters {
            assert_eq!(
                msgs.get(owner).copied().unwrap_or(0),
                *c,
                "queue of {owner}"
            );
        }
        assert_eq!(items.len(), versions.len());
        assert_eq!(msgs.len(), counters.len());
        if done {
            assert_eq!(versions.values().copied().collect::<Vec<_>>(), [ROUNDS; 4]);
            break;
        }
        tokio::task::yield_now().await;
    }
    for w in writers {
        w.await.unwrap();
    }
}

/// A backup from one backend restores into the other.
#[tokio::test]
async fn export_crosses_backends() {
    let mem = MemoryStorage::new();
    populate(&mem).await;
    let dir = tempfile::tempdir().unwrap();
    let sled = SledStorage::open(dir.path()).unwrap();
    sled.import(export_all(&mem).await).await.unwrap();
    assert_eq!(contents(&sled).await, contents(&mem).await);
    let back = MemoryStorage::new();
    back.import(export_all(&sled).await).await.unwrap();
    assert_eq!(export_all(&back).await, export_all(&mem).await);
    // And it survives a reopen of the sled store.
    drop(sled);
    let sled = SledStorage::open(dir.path()).unwrap();
    assert_eq!(contents(&sled).await, contents(&mem).await);
}

#[test]
fn subscription_strings() {
    for s in [
        Subscription::None,
        Subscription::To,
        Subscription::From,
        Subscription::Both,
    ] {
        assert_eq!(s.as_str().parse::<Subscription>().unwrap(), s);
        assert_eq!(s.to_string(), s.as_str());
    }
    assert_eq!(Subscription::default(), Subscription::None);
    assert!("remove".parse::<Subscription>().is_err());
    assert!("Both".parse::<Subscription>().is_err());
}

/// The backends behind `dyn` work too (the server holds an `Arc<dyn Storage>`).
#[tokio::test]
async fn usable_as_trait_object() {
    let s: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    s.create_account("a@x", vec![]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<dyn Storage> = Arc::new(SledStorage::open(dir.path()).unwrap());
    s.create_account("a@x", vec![]).await.unwrap();
    assert_eq!(s.list_accounts(None).await.unwrap(), ["a@x"]);
}

macro_rules! suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            #[allow(unused_imports)]
            use std::sync::Arc;

            macro_rules! case {
                ($name:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                    async fn $name() {
                        #[allow(clippy::redundant_closure_call)]
                        let (_guard, s) = ($make)();
                        super::$name(&s).await;
                    }
                };
            }

            case!(accounts_crud);
            case!(list_accounts);
            case!(delete_account_removes_only_that_user);
            case!(roster_versions);
            case!(offline_queue);
            case!(offline_many_keep_order);
            case!(offline_pages);
            case!(user_data);
            case!(nul_in_owner_is_refused);
            case!(flush_and_size);
            case!(import_refuses_contradictions);
            case!(export_stops_on_sink_error);

            macro_rules! case2 {
                ($name:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                    async fn $name() {
                        #[allow(clippy::redundant_closure_call)]
                        let (_guard, s) = ($make)();
                        #[allow(clippy::redundant_closure_call)]
                        let (_guard2, s2) = ($make)();
                        super::$name(&s, &s2).await;
                    }
                };
            }

            case2!(export_import_roundtrip);
            case2!(import_refuses_a_store_with_data);

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn export_is_a_snapshot() {
                #[allow(clippy::redundant_closure_call)]
                let (_guard, s) = ($make)();
                super::export_is_a_snapshot(Arc::new(s)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_writers() {
                #[allow(clippy::redundant_closure_call)]
                let (_guard, s) = ($make)();
                super::concurrent_writers(Arc::new(s)).await;
            }
        }
    };
}

suite!(memory, || ((), MemoryStorage::new()));
suite!(sled, || {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStorage::open(dir.path()).unwrap();
    (dir, s)
});
