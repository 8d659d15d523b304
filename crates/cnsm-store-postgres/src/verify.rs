//! The full check behind [`Store::verify`](cnsm_store::Store::verify): every definition's hash,
//! every chain from genesis over the stored bytes, every instance row against the replay of its
//! history, and the timer columns against the row.

use cnsm_core::Instance;
use cnsm_core::record::{ErasureCheck, Hash32, SealedRecord, decode_record};
use cnsm_store::{StoreError, VerifyReport};

use crate::pool::{Pool, db_error};
use crate::{check_definition_row, decode_instance, definition_row, indexed_timer, kind_code};

/// Most problems one report lists; the rest are counted in a last line.
pub const PROBLEMS_MAX: usize = 10_000;

/// Instances read per page.
const PAGE_LEN: i64 = 500;

#[derive(Default)]
struct Problems {
    list: Vec<String>,
    n_more: u64,
}

impl Problems {
    fn push(&mut self, problem: String) {
        if self.list.len() < PROBLEMS_MAX {
            self.list.push(problem);
        } else {
            self.n_more += 1;
        }
    }

    fn finish(mut self) -> Vec<String> {
        if self.n_more > 0 {
            self.list
                .push(format!("... and {} more problems", self.n_more));
        }
        self.list
    }
}

pub(crate) async fn verify_all(pool: &Pool) -> Result<VerifyReport, StoreError> {
    let mut lease = pool.get().await?;
    let client = &lease.conn().client;
    let mut report = VerifyReport::default();
    let mut problems = Problems::default();

    let status = crate::schema::status(client).await?;
    if status.version > crate::SCHEMA_VERSION {
        problems.push(format!(
            "schema version {} is newer than this binary supports ({})",
            status.version,
            crate::SCHEMA_VERSION
        ));
    }

    let mut latest = std::collections::BTreeSet::new();
    for row in client
        .query(
            "SELECT * FROM cnsm_definitions ORDER BY namespace, name, revision",
            &[],
        )
        .await
        .map_err(db_error)?
    {
        match definition_row(&row) {
            Ok(definition) => {
                if definition.definition.metadata.namespace != definition.namespace
                    || definition.definition.metadata.name != definition.name
                {
                    problems.push(format!(
                        "definition {}/{}@{}: holds {}/{}",
                        definition.namespace,
                        definition.name,
                        definition.revision,
                        definition.definition.metadata.namespace,
                        definition.definition.metadata.name
                    ));
                }
                if let Some(problem) = check_definition_row(&definition) {
                    problems.push(problem);
                }
                latest.insert((definition.namespace, definition.name));
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    report.n_definitions = latest.len() as u64;

    let mut after: i64 = 0;
    loop {
        let rows = client
            .query(
                "SELECT uid, namespace, id, version, status, last_hash, body, \
                        timer_due_ms, timer_entry_seq, timer_kind, machine, state \
                   FROM cnsm_instances WHERE uid > $1 ORDER BY uid LIMIT $2",
                &[&after, &PAGE_LEN],
            )
            .await
            .map_err(db_error)?;
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        for row in &rows {
            let uid: i64 = row.get(0);
            let namespace: &str = row.get(1);
            let id: &str = row.get(2);
            let name = format!("instance {namespace}/{id}");
            report.n_instances += 1;
            let stored = match decode_instance(row.get::<_, &[u8]>(6), namespace, id) {
                Ok(instance) => Some(instance),
                Err(e) => {
                    problems.push(e.to_string());
                    None
                }
            };
            let records = client
                .query(
                    "SELECT version, hash, bytes FROM cnsm_records WHERE uid = $1 ORDER BY version",
                    &[&uid],
                )
                .await
                .map_err(db_error)?;
            report.n_records += records.len() as u64;
            let replayed = replay(namespace, id, &records, &mut problems);
            let Some(stored) = stored else { continue };
            let version: i64 = row.get(3);
            let status: i16 = row.get(4);
            let last_hash: &[u8] = row.get(5);
            let timer = indexed_timer(&stored);
            let timer_columns: (Option<i64>, Option<i64>, Option<i16>) =
                (row.get(7), row.get(8), row.get(9));
            let want_columns = (
                timer.map(|t| t.due_ms as i64),
                timer.map(|t| t.entry_seq as i64),
                timer.map(|t| kind_code(t.kind)),
            );
            let fixed = version as u64 == stored.version
                && status == crate::status_code(stored.status)
                && last_hash == stored.last_hash.0.as_slice()
                && row.get::<_, &str>(10) == &*stored.machine
                && row.get::<_, &str>(11) == &*stored.state
                && &*stored.namespace == namespace
                && &*stored.id == id
                && timer_columns == want_columns;
            if !fixed {
                problems.push(format!(
                    "{name}: the row's columns disagree with its document"
                ));
            }
            if let Some(replayed) = replayed
                && replayed != stored
            {
                problems.push(format!(
                    "{name}: the row differs from the replay of its history"
                ));
            }
        }
    }
    report.problems = problems.finish();
    Ok(report)
}

/// Replays one chain from genesis over the stored bytes; `None` when it is broken (reported).
fn replay(
    namespace: &str,
    id: &str,
    rows: &[tokio_postgres::Row],
    problems: &mut Problems,
) -> Option<Instance> {
    let mut replayed: Option<Instance> = None;
    let mut prev = Hash32::ZERO;
    let mut erasures = ErasureCheck::default();
    for (expected, row) in rows.iter().enumerate() {
        let version: i64 = row.get(0);
        let name = format!("instance {namespace}/{id} record {version}");
        if version as u64 != expected as u64 {
            problems.push(format!("{name}: expected record {expected} first"));
            return None;
        }
        let Ok(hash) = <[u8; 32]>::try_from(row.get::<_, &[u8]>(1)) else {
            problems.push(format!("{name}: the stored hash is not 32 bytes"));
            return None;
        };
        let sealed = SealedRecord {
            version: version as u64,
            bytes: row.get(2),
            hash: Hash32(hash),
        };
        // A record whose bytes do not hash to its stored hash is held until the end of the
        // chain: only a later erasure record may accept it (the core's rule).
        let matched = erasures.check_hash(sealed.version, sealed.hash, &sealed.bytes);
        let record = match decode_record(sealed.version, &sealed.bytes) {
            Ok(record) => record,
            Err(_) if !matched => {
                problems.push(format!("{name}: stored hash does not match its bytes"));
                return None;
            }
            Err(e) => {
                problems.push(format!("instance {namespace}/{id}: {e}"));
                return None;
            }
        };
        if let Some(erasure) = &record.erasure {
            erasures.note(sealed.version, erasure);
        }
        if &*record.namespace != namespace || &*record.instance != id {
            problems.push(format!(
                "{name}: belongs to {}/{}",
                record.namespace, record.instance
            ));
            return None;
        }
        if record.prev_hash != prev {
            problems.push(format!(
                "{name}: previous hash does not match the stored record before it"
            ));
            return None;
        }
        let applied = match replayed.as_mut() {
            None => Instance::from_genesis(&record, sealed.hash).map(|i| replayed = Some(i)),
            Some(instance) => instance.apply_record(&record, sealed.hash),
        };
        if let Err(e) = applied {
            problems.push(format!("instance {namespace}/{id}: {e}"));
            return None;
        }
        prev = sealed.hash;
    }
    if replayed.is_none() {
        problems.push(format!("instance {namespace}/{id}: has no history"));
    }
    if let Err(e) = erasures.finish() {
        problems.push(format!("instance {namespace}/{id}: {e}"));
        return None;
    }
    replayed
}
