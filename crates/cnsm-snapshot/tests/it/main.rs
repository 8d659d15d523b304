//! Snapshot round trips and tampering, against real stores and runtimes (VirtualClock).

use std::sync::Arc;

use cnsm_core::snapshot::{SnapshotReader, SnapshotWriter};
use cnsm_runtime::{CreateInstance, EventRequest, Runtime, RuntimeOptions, VirtualClock};
use cnsm_snapshot::files::{SignedOutput, SnapshotPaths, verify_file};
use cnsm_snapshot::{
    FILE_MAGIC, ImportFailure, ImportSource, PublicKey, Selection, SigningKey, SnapshotFile,
    VerifyError, bundle, export, export_to, verify,
};
use cnsm_store::embedded::EmbeddedStore;
use cnsm_store::{InstanceQuery, Store};
use serde_json::json;

const T0_MS: u64 = 1_700_000_000_000;

const MACHINE: &str = r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: job, namespace: shop}
spec:
  initialState: queued
  states:
  - name: queued
    type: task
    timeoutSeconds: 30
    onTimeout: expired
    onEvent:
    - {event: start, target: running, assign: {note: "event.note"}}
  - {name: running, type: task, timeoutSeconds: 3600, onEvent: [{event: finish, target: done}]}
  - {name: done, type: final}
  - {name: expired, type: final, outcome: failed}
"#;

struct Node {
    _dir: tempfile::TempDir,
    clock: VirtualClock,
    runtime: Runtime,
}

impl Node {
    fn new(now_ms: u64) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let clock = VirtualClock::new(now_ms);
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let runtime = Runtime::open(
            store,
            RuntimeOptions::default().with_clock(Arc::new(clock.clone())),
        )
        .unwrap();
        Node {
            _dir: dir,
            clock,
            runtime,
        }
    }

    fn store(&self) -> &dyn Store {
        &**self.runtime.store()
    }

    fn export_all(&self, as_of_ms: u64) -> Vec<u8> {
        export(
            self.store(),
            "shop",
            &Selection::All,
            as_of_ms,
            &mut |_, _| {},
        )
        .unwrap()
    }

    fn n_instances(&self) -> usize {
        self.store()
            .list_instances(&InstanceQuery::default())
            .unwrap()
            .len()
    }

    /// Verify (all six steps), then import streamed: what `cnsmctl snapshot import` does.
    async fn import(
        &self,
        bytes: &[u8],
        key: &PublicKey,
        replace: bool,
    ) -> Result<cnsm_store::ImportReport, String> {
        let file = SnapshotFile::from_bytes(bytes).map_err(|e| e.to_string())?;
        verify(&file, key).map_err(|e| e.to_string())?;
        self.import_stream(file.payload, replace).await
    }

    /// Streams a payload into the runtime (`ImportSource` + `Runtime::import_stream`); the
    /// snapshot's own failure, when there is one, wins over the store's refusal.
    async fn import_stream(
        &self,
        payload: Vec<u8>,
        replace: bool,
    ) -> Result<cnsm_store::ImportReport, String> {
        let (source, definitions) =
            ImportSource::open(std::io::Cursor::new(payload), "shop", Box::new(|_, _| {}))
                .map_err(|e| e.to_string())?;
        let failure = source.failure();
        let result = self
            .runtime
            .import_stream(definitions, Box::new(source), replace)
            .await;
        if let Some(failure) = failure.lock().unwrap().take() {
            return Err(failure.to_string());
        }
        result.map_err(|e| e.to_string())
    }

    /// Nothing imported: no instance, no definition.
    fn is_empty(&self) -> bool {
        self.n_instances() == 0 && self.store().list_definitions(None).unwrap().is_empty()
    }
}

/// A source node with five instances: q-0..q-2 queued (their 30 s timeouts pending), r-3
/// running (started with an idempotency key), d-4 done.
async fn source() -> Node {
    let node = Node::new(T0_MS);
    let rt = &node.runtime;
    rt.apply_yaml(MACHINE, None).await.unwrap();
    for (i, prefix) in ["q", "q", "q", "r", "d"].iter().enumerate() {
        rt.create_instance(
            CreateInstance::new("shop", "job")
                .id(format!("{prefix}-{i}"))
                .label("tier", if i % 2 == 0 { "gold" } else { "silver" }),
        )
        .await
        .unwrap();
        node.clock.advance_ms(10);
    }
    for id in ["r-3", "d-4"] {
        rt.send(
            "shop",
            id,
            EventRequest::new("start")
                .payload(json!({"note": id}))
                .idempotency_key(format!("key-{id}")),
        )
        .await
        .unwrap();
    }
    rt.send("shop", "d-4", EventRequest::new("finish"))
        .await
        .unwrap();
    node
}

#[tokio::test]
async fn round_trip_is_byte_identical_and_imported_instances_go_on() {
    let source = source().await;
    let key = SigningKey::generate().unwrap();
    let as_of = cnsm_runtime::Clock::now_ms(&source.clock);
    let payload = source.export_all(as_of);
    assert_eq!(payload, source.export_all(as_of), "export is deterministic");
    let file = SnapshotFile::sign(&key, payload.clone())
        .unwrap()
        .to_bytes();

    // The target's clock is 40 s later: the queued instances' 30 s timeouts fell due in transit.
    let target = Node::new(as_of + 40_000);
    let report = target
        .import(&file, &key.public_key(), false)
        .await
        .unwrap();
    assert_eq!((report.n_instances, report.n_timers), (5, 4));
    assert_eq!(
        target.export_all(as_of),
        payload,
        "re-export is byte-identical"
    );
    assert_eq!(target.runtime.pending_timers().await.unwrap(), 4);

    // Timers that fell due in transit fire right after the import.
    assert_eq!(target.runtime.fire_due_timers().await.unwrap(), 3);
    let q0 = target.runtime.instance("shop", "q-0").await.unwrap();
    assert_eq!((&*q0.state, q0.version), ("expired", 1));
    // The running instance takes its next event; its idempotency key came along.
    let replay = target
        .runtime
        .send(
            "shop",
            "r-3",
            EventRequest::new("start")
                .payload(json!({"note": "r-3"}))
                .idempotency_key("key-r-3"),
        )
        .await
        .unwrap();
    assert!(replay.replayed);
    let done = target
        .runtime
        .send("shop", "r-3", EventRequest::new("finish"))
        .await
        .unwrap();
    assert_eq!((&*done.instance.state, done.instance.version), ("done", 2));
    let report = target.store().verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);

    // Importing again is refused as a whole; with replace it restores the snapshot's state.
    let refused = target.import(&file, &key.public_key(), false).await;
    assert!(refused.unwrap_err().contains("already exist"));
    assert_eq!(
        target
            .runtime
            .instance("shop", "r-3")
            .await
            .unwrap()
            .version,
        2
    );
    let report = target.import(&file, &key.public_key(), true).await.unwrap();
    assert_eq!(report.n_replaced, 5);
    assert_eq!(target.export_all(as_of), payload);
    let report = target.store().verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[tokio::test]
async fn selections_export_one_instance_or_a_label_match() {
    let source = source().await;
    let one = export(
        source.store(),
        "shop",
        &Selection::Instance("r-3".into()),
        T0_MS,
        &mut |_, _| {},
    )
    .unwrap();
    let reader = SnapshotReader::open(&one).unwrap();
    assert_eq!(reader.n_instances(), 1);
    let gold = export(
        source.store(),
        "shop",
        &Selection::Labels(vec![("tier".into(), "gold".into())]),
        T0_MS,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(SnapshotReader::open(&gold).unwrap().n_instances(), 3);
    let missing = export(
        source.store(),
        "shop",
        &Selection::Instance("nope".into()),
        T0_MS,
        &mut |_, _| {},
    );
    assert!(matches!(
        missing,
        Err(cnsm_snapshot::ExportError::NotFound(_))
    ));
}

#[tokio::test]
async fn files_stream_through_spool_verify_and_import_and_a_failure_midway_imports_nothing() {
    let source = source().await;
    let key = SigningKey::generate().unwrap();
    let as_of = T0_MS + 1_000;
    let payload = source.export_all(as_of);
    let dir = tempfile::tempdir().unwrap();

    // One file: spooled while hashed, the digest signed (deterministically, RFC 6979), so the
    // bytes are those of signing the payload in memory.
    let one = dir.path().join("shop.snapshot");
    let mut output = SignedOutput::create(&one, None).unwrap();
    output.check_while_writing().unwrap();
    let mut seen = Vec::new();
    let n_bytes = export_to(
        source.store(),
        "shop",
        &Selection::All,
        as_of,
        output.writer(),
        &mut |done, total| seen.push((done, total)),
    )
    .unwrap();
    assert_eq!(n_bytes, payload.len() as u64);
    assert_eq!(seen.last(), Some(&(5, 5)));
    // Checked on a second thread while it was written.
    let checked = output.checked().unwrap().unwrap();
    assert_eq!(
        (checked.n_instances, checked.payload_len),
        (5, payload.len() as u64)
    );
    let written = output.finish(&key).unwrap();
    assert_eq!(written.payload_len, payload.len() as u64);
    let in_memory = SnapshotFile::sign(&key, payload.clone()).unwrap();
    // The payload went straight after room reserved for the longest bundle: the bundle line
    // is the bundle JSON, padded with spaces (if the signature is shorter) to fill it.
    let file_bytes = std::fs::read(&one).unwrap();
    assert_eq!(SnapshotFile::from_bytes(&file_bytes).unwrap(), in_memory);
    let head_len = FILE_MAGIC.len() + bundle::signed_bundle_len_max() + 1;
    assert_eq!(file_bytes.len(), head_len + payload.len());
    let line = &file_bytes[FILE_MAGIC.len()..head_len - 1];
    assert!(line.starts_with(&in_memory.bundle_json));
    assert!(
        line[in_memory.bundle_json.len()..]
            .iter()
            .all(|b| *b == b' ')
    );
    // Padding is spaces only: any other byte after the JSON is a layout error (step 1).
    let mut tabbed = FILE_MAGIC.to_vec();
    tabbed.extend_from_slice(&in_memory.bundle_json);
    tabbed.extend_from_slice(b" \t\n");
    tabbed.extend_from_slice(&payload);
    assert!(matches!(
        SnapshotFile::from_bytes(&tabbed),
        Err(VerifyError::Bundle(_))
    ));
    let names = |dir: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        names(dir.path()),
        ["shop.snapshot"],
        "no temporary file is left"
    );

    // Detached: the payload file is the bare payload, the bundle beside it.
    let bare = dir.path().join("shop.cbor");
    let bundle = dir.path().join("shop.sigstore.json");
    let mut output = SignedOutput::create(&bare, Some(&bundle)).unwrap();
    export_to(
        source.store(),
        "shop",
        &Selection::All,
        as_of,
        output.writer(),
        &mut |_, _| {},
    )
    .unwrap();
    output.finish(&key).unwrap();
    assert_eq!(std::fs::read(&bare).unwrap(), payload);
    assert_eq!(std::fs::read(&bundle).unwrap(), in_memory.bundle_json);

    // An export that fails (dropped before finish) leaves nothing behind.
    let failed = dir.path().join("failed.snapshot");
    let mut output = SignedOutput::create(&failed, None).unwrap();
    std::io::Write::write_all(output.writer(), b"partial").unwrap();
    drop(output);
    assert_eq!(
        names(dir.path()),
        ["shop.cbor", "shop.sigstore.json", "shop.snapshot"]
    );

    // Both layouts verify from disk in two streaming passes.
    let public = key.public_key();
    for paths in [
        SnapshotPaths::open(&one, None).unwrap(),
        SnapshotPaths::open(&bare, Some(&bundle)).unwrap(),
    ] {
        let summary = verify_file(&paths, &public, &mut |_, _| {}).unwrap();
        assert_eq!(
            (summary.n_instances, summary.payload_len),
            (5, payload.len() as u64)
        );
    }
    // A truncated file stops at the digest; a bare payload without its bundle at the layout.
    let cut = dir.path().join("cut.snapshot");
    let bytes = std::fs::read(&one).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
    let paths = SnapshotPaths::open(&cut, None).unwrap();
    assert!(matches!(
        verify_file(&paths, &public, &mut |_, _| {}),
        Err(VerifyError::Digest { .. })
    ));
    assert!(matches!(
        SnapshotPaths::open(&bare, None),
        Err(VerifyError::Bundle(_))
    ));

    // Streamed import of the file's payload restores the same bytes.
    let target = Node::new(as_of);
    let paths = SnapshotPaths::open(&one, None).unwrap();
    let (import, definitions) =
        ImportSource::open(paths.payload().unwrap(), "shop", Box::new(|_, _| {})).unwrap();
    let report = target
        .runtime
        .import_stream(definitions, Box::new(import), false)
        .await
        .unwrap();
    assert_eq!(report.n_instances, 5);
    assert_eq!(target.export_all(as_of), payload);

    // Signed streamed import: the digest and signature are checked in the same read, at its
    // end, before the store commits. Another key, or a changed byte the decoder accepts (a
    // note's text), imports nothing; the right key imports everything.
    let other = SigningKey::generate().unwrap().public_key();
    let signed_target = Node::new(as_of);
    let (result, failure) = signed_import(&signed_target, &paths, &other).await;
    assert!(result.is_err());
    assert!(
        matches!(
            failure,
            Some(ImportFailure::Verify(VerifyError::Signature(_)))
        ),
        "{failure:?}"
    );
    assert!(signed_target.is_empty());
    let changed = dir.path().join("changed.snapshot");
    // The first hex digit of an idempotency key's request hash (after the key name and the
    // text head 0x78 0x40): nothing but the digest covers it.
    let at = file_bytes
        .windows(11)
        .position(|w| w == b"requestHash")
        .expect("an idempotency key in the payload")
        + 11
        + 2;
    let mut bytes = file_bytes.clone();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&changed, &bytes).unwrap();
    let changed_paths = SnapshotPaths::open(&changed, None).unwrap();
    let (result, failure) = signed_import(&signed_target, &changed_paths, &public).await;
    assert!(result.is_err());
    assert!(
        matches!(
            failure,
            Some(ImportFailure::Verify(VerifyError::Digest { .. }))
        ),
        "{failure:?}"
    );
    assert!(signed_target.is_empty());
    let (result, failure) = signed_import(&signed_target, &paths, &public).await;
    assert_eq!(result.unwrap().n_instances, 5, "{failure:?}");
    assert_eq!(signed_target.export_all(as_of), payload);

    // A broken chain in the last instance: the first four were already written into the
    // transaction when the fifth is refused, and nothing is left.
    let broken = rewrite(&payload, |_, instances| {
        let last = instances.last_mut().unwrap();
        last.records.swap(0, 1);
    });
    let empty = Node::new(as_of);
    let refused = empty.import_stream(broken, false).await.unwrap_err();
    assert!(refused.contains("chain"), "{refused}");
    assert!(empty.is_empty());
    // Cut short midway, and with an instance moved to another namespace: the same.
    let refused = empty
        .import_stream(payload[..payload.len() - 40].to_vec(), false)
        .await
        .unwrap_err();
    assert!(refused.contains("ends early"), "{refused}");
    assert!(empty.is_empty());
    let elsewhere = rewrite(&payload, |_, instances| {
        let last = instances.last_mut().unwrap();
        last.instance.namespace = "zzz".into();
    });
    // (Its records still name shop, so its chain check refuses it first.)
    let refused = empty.import_stream(elsewhere, false).await.unwrap_err();
    assert!(refused.contains("zzz/r-3"), "{refused}");
    assert!(empty.is_empty());
}

/// Imports a signed snapshot file through `ImportSource::open_signed`: the runtime's result
/// and the snapshot-side failure, if any.
async fn signed_import(
    node: &Node,
    paths: &SnapshotPaths,
    public: &PublicKey,
) -> (
    Result<cnsm_store::ImportReport, cnsm_runtime::RuntimeError>,
    Option<ImportFailure>,
) {
    let (source, definitions) = ImportSource::open_signed(
        paths.payload().unwrap(),
        &paths.bundle_json,
        public,
        "shop",
        Box::new(|_, _| {}),
    )
    .unwrap();
    let failure = source.failure();
    let result = node
        .runtime
        .import_stream(definitions, Box::new(source), false)
        .await;
    let failure = failure.lock().unwrap().take();
    (result, failure)
}

/// Rewrites a payload through the reader and writer, letting `edit` change the parts.
fn rewrite(
    payload: &[u8],
    edit: impl Fn(
        &mut Vec<cnsm_core::snapshot::SnapshotDefinition>,
        &mut Vec<cnsm_core::snapshot::SnapshotInstance>,
    ),
) -> Vec<u8> {
    let mut reader = SnapshotReader::open(payload).unwrap();
    let mut definitions = reader.definitions().to_vec();
    let mut instances = Vec::new();
    while let Some(entry) = reader.next_instance().unwrap() {
        instances.push(entry);
    }
    edit(&mut definitions, &mut instances);
    let mut out = Vec::new();
    let mut writer = SnapshotWriter::begin(
        &mut out,
        reader.as_of_ms(),
        &definitions,
        instances.len() as u64,
    );
    for entry in &instances {
        writer
            .write_instance(&entry.instance, &entry.records, &entry.idempotency)
            .unwrap();
    }
    writer.finish().unwrap();
    out
}

fn replace_once(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let at = haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present");
    let mut out = haystack[..at].to_vec();
    out.extend_from_slice(with);
    out.extend_from_slice(&haystack[at + needle.len()..]);
    out
}

#[tokio::test]
async fn tampering_is_rejected_with_its_own_error_and_nothing_is_imported() {
    let source = source().await;
    let key = SigningKey::generate().unwrap();
    let public = key.public_key();
    let payload = source.export_all(T0_MS + 1_000);
    let good = SnapshotFile::sign(&key, payload.clone()).unwrap();
    let good_bytes = good.to_bytes();
    let target = Node::new(T0_MS + 2_000);

    let check = |bytes: &[u8]| -> Result<(), VerifyError> {
        let file = SnapshotFile::from_bytes(bytes)?;
        verify(&file, &public).map(|_| ())
    };
    let signed = |payload: Vec<u8>| SnapshotFile::sign(&key, payload).unwrap().to_bytes();

    // Any changed byte fails, wherever it is (magic line, bundle, payload).
    let header_len = good_bytes.len() - payload.len();
    assert!(header_len > 300 && good_bytes.len() > 4000);
    for at in 0..good_bytes.len() {
        let mut bytes = good_bytes.clone();
        bytes[at] ^= 0x01;
        assert!(check(&bytes).is_err(), "flipped byte {at} was accepted");
    }
    // Specific steps.
    let mut flipped = good_bytes.clone();
    flipped[0] ^= 0x20;
    assert!(matches!(check(&flipped), Err(VerifyError::Bundle(_))));
    let media = replace_once(&good_bytes, b"bundle.v0.3", b"bundle.v0.2");
    assert!(matches!(check(&media), Err(VerifyError::Bundle(_))));
    let mut flipped = good_bytes.clone();
    flipped[header_len + payload.len() / 2] ^= 0x01;
    assert!(matches!(check(&flipped), Err(VerifyError::Digest { .. })));
    let truncated = &good_bytes[..good_bytes.len() - 7];
    assert!(matches!(check(truncated), Err(VerifyError::Digest { .. })));
    assert!(matches!(
        check(&good_bytes[..20]),
        Err(VerifyError::Bundle(_))
    ));
    let other_key = SigningKey::generate().unwrap();
    let by_other = SnapshotFile::sign(&other_key, payload.clone())
        .unwrap()
        .to_bytes();
    assert!(matches!(check(&by_other), Err(VerifyError::Signature(_))));
    // Another key's signature under this key's hint.
    let mut forged = good.clone();
    let other_bundle = SnapshotFile::sign(&other_key, payload.clone())
        .unwrap()
        .bundle_json;
    let other_json: serde_json::Value = serde_json::from_slice(&other_bundle).unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&forged.bundle_json).unwrap();
    json["messageSignature"]["signature"] = other_json["messageSignature"]["signature"].clone();
    forged.bundle_json = json.to_string().into_bytes();
    assert!(matches!(
        check(&forged.to_bytes()),
        Err(VerifyError::Signature(_))
    ));

    // Payloads changed and signed again (a buggy or malicious exporter holding the key).
    let not_shortest = replace_once(
        &payload,
        &[0xa5, 0x64, b'a', b's'],
        &[0xb8, 0x05, 0x64, b'a', b's'],
    );
    assert!(matches!(
        check(&signed(not_shortest)),
        Err(VerifyError::Encoding(_))
    ));
    // A state with a member an instance does not have is not the canonical encoding.
    let q0 = source.runtime.instance("shop", "q-0").await.unwrap();
    let mut state = serde_json::to_value(&q0).unwrap();
    let canonical = cnsm_core::cbor::encode(&state);
    state["zzz"] = serde_json::json!(true);
    let widened = replace_once(&payload, &canonical, &cnsm_core::cbor::encode(&state));
    assert!(matches!(
        check(&signed(widened)),
        Err(VerifyError::Encoding(_))
    ));
    let future = replace_once(&payload, b"\x66format\x01", b"\x66format\x02");
    assert!(matches!(
        check(&signed(future)),
        Err(VerifyError::Format(_))
    ));
    assert_eq!(
        rewrite(&payload, |_, _| {}),
        payload,
        "rewriting without edits is the identity"
    );
    let reordered = rewrite(&payload, |_, instances| instances.swap(0, 1));
    assert!(matches!(
        check(&signed(reordered)),
        Err(VerifyError::Encoding(_))
    ));
    // d-4 has records 0 (genesis), 1 (start), 2 (finish).
    let swapped = rewrite(&payload, |_, instances| {
        let d4 = instances
            .iter_mut()
            .find(|i| &*i.instance.id == "d-4")
            .unwrap();
        d4.records.swap(1, 2);
    });
    assert!(matches!(
        check(&signed(swapped)),
        Err(VerifyError::Chain(_))
    ));
    let dropped = rewrite(&payload, |_, instances| {
        let d4 = instances
            .iter_mut()
            .find(|i| &*i.instance.id == "d-4")
            .unwrap();
        d4.records.remove(1);
    });
    assert!(matches!(
        check(&signed(dropped)),
        Err(VerifyError::Chain(_))
    ));
    let edited_record = rewrite(&payload, |_, instances| {
        let r = &mut instances[0].records[0];
        let at = r.bytes.len() - 3;
        r.bytes[at] ^= 0x01;
    });
    assert!(check(&signed(edited_record)).is_err());
    let changed_definition = rewrite(&payload, |definitions, _| {
        definitions[0].spec.spec.states[1].timeout_seconds = Some(7200);
    });
    assert!(matches!(
        check(&signed(changed_definition)),
        Err(VerifyError::Definition(_))
    ));
    let no_definition = rewrite(&payload, |definitions, _| definitions.clear());
    assert!(matches!(
        check(&signed(no_definition)),
        Err(VerifyError::Definition(_))
    ));

    // None of them imported anything; the good one does.
    for bytes in [&flipped, &by_other, &forged.to_bytes()] {
        assert!(target.import(bytes, &public, false).await.is_err());
    }
    assert_eq!(target.n_instances(), 0);
    assert!(target.store().list_definitions(None).unwrap().is_empty());
    target.import(&good_bytes, &public, false).await.unwrap();
    assert_eq!(target.n_instances(), 5);
}

/// A snapshot written by the first version of the format (2026-11-27, `fixtures/snapshot-v1.bin`:
/// order-processing with o-1 paid and o-2 created, signed by `fixtures/fixture-key.pub.pem`)
/// keeps verifying and importing; its overdue timer fires right after the import.
#[tokio::test]
async fn the_v1_fixture_still_verifies_and_imports() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    let bytes = std::fs::read(format!("{fixtures}snapshot-v1.bin")).unwrap();
    let public = PublicKey::from_pem(
        &std::fs::read_to_string(format!("{fixtures}fixture-key.pub.pem")).unwrap(),
    )
    .unwrap();
    let file = SnapshotFile::from_bytes(&bytes).unwrap();
    let summary = verify(&file, &public).unwrap();
    assert_eq!(
        (
            summary.n_instances,
            summary.n_records,
            summary.n_definitions
        ),
        (2, 4, 1)
    );
    // Re-encoding what was read gives the same bytes.
    assert_eq!(rewrite(&file.payload, |_, _| {}), file.payload);

    let target = Node::new(summary.as_of_ms + 60_000);
    let report = target.import(&bytes, &public, false).await.unwrap();
    assert_eq!((report.n_instances, report.n_timers), (2, 2));
    assert_eq!(target.runtime.fire_due_timers().await.unwrap(), 1);
    let o2 = target.runtime.instance("shop", "o-2").await.unwrap();
    assert_eq!((&*o2.state, o2.version), ("cancelled", 1));
    let o1 = target.runtime.instance("shop", "o-1").await.unwrap();
    assert_eq!((&*o1.state, o1.version), ("paid", 2));
    let report = target.store().verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}
