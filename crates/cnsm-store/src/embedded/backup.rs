//! Online backup and restore of the embedded store.
//!
//! A backup is a complete, standalone store file (the same format as `cnsm.redb`) copied from one
//! read snapshot: a consistent point-in-time copy taken while the store keeps committing beside
//! it (redb readers never block the writer). The copy is written to `OUT.partial`, made durable,
//! reopened and verified from genesis ([`Store::verify`]), and only then renamed to `OUT`; a
//! failed backup leaves no file at `OUT`.
//!
//! Restore checks a backup the same way before it becomes the store of a new data directory.

use std::path::{Path, PathBuf};

use redb::{
    Database, Durability, Key, ReadTransaction, ReadableTable, TableDefinition, TableHandle, Value,
    WriteTransaction,
};

use super::tables::*;
use super::{EmbeddedOptions, EmbeddedStore, FILE_NAME};
use crate::{BackupReport, Store, StoreError, VerifyReport};

/// Entries copied per write transaction of the copy (the last one is made durable).
const COPY_CHUNK: usize = 50_000;

/// Every table of the store: a backup copies exactly these. A test checks that a live store
/// has no table outside this list, so a new table cannot be forgotten here.
#[doc(hidden)]
pub const TABLE_NAMES: [&str; 16] = [
    "meta",
    "definitions",
    "definition_latest",
    "instances",
    "instance_uids",
    "active_instances",
    "records",
    "record_index",
    "timers",
    "idempotency",
    "idempotency_expiry",
    "retired_uids",
    "rollouts",
    "delivery_cursors",
    "dead_letters",
    "dead_letter_redrives",
];

impl EmbeddedStore {
    /// Writes a consistent point-in-time copy of the store to the file `out` while the store
    /// keeps serving, then verifies the copy from genesis. Refuses to overwrite `out`.
    ///
    /// Errors: [`StoreError::Refused`] when `out` exists; [`StoreError::Corrupt`] when the copy
    /// does not verify (the partial file is removed); [`StoreError::Io`].
    pub fn backup_to(&self, out: &Path) -> Result<BackupReport, StoreError> {
        if out.exists() {
            return Err(StoreError::Refused(format!(
                "{} exists; choose another file or remove it first",
                out.display()
            )));
        }
        place_verified(out, |partial| {
            let snapshot = self.read()?;
            copy_all(&snapshot, partial)
        })
    }
}

/// Makes the backup file `backup` the store of the data directory `dir` (created if needed),
/// after verifying it from genesis. Refuses a directory that already holds a store, and a
/// backup that does not verify; in both cases nothing is written to `dir`.
pub fn restore(backup: &Path, dir: &Path) -> Result<BackupReport, StoreError> {
    let target = dir.join(FILE_NAME);
    if target.exists() {
        return Err(StoreError::Refused(format!(
            "{} already holds a store; restore into a new data directory",
            dir.display()
        )));
    }
    if !backup.is_file() {
        return Err(StoreError::Refused(format!(
            "{} is not a file",
            backup.display()
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", dir.display())))?;
    place_verified(&target, |partial| {
        std::fs::copy(backup, partial).map_err(|e| {
            StoreError::Io(format!(
                "cannot copy {} to {}: {e}",
                backup.display(),
                partial.display()
            ))
        })?;
        std::fs::File::open(partial)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::Io(format!("{}: {e}", partial.display())))
    })
}

/// Has `write` produce a store file at `TARGET.partial`, verifies it from genesis, and only then
/// renames it to `target` (and syncs the directory). On any failure the partial file is removed
/// and nothing is left at `target`.
fn place_verified(
    target: &Path,
    write: impl FnOnce(&Path) -> Result<(), StoreError>,
) -> Result<BackupReport, StoreError> {
    let partial = partial_path(target);
    let _ = std::fs::remove_file(&partial);
    let result = (|| {
        write(&partial)?;
        let verified = verify_backup_file(&partial)?;
        std::fs::rename(&partial, target)
            .map_err(|e| StoreError::Io(format!("cannot rename {}: {e}", partial.display())))?;
        sync_parent(target)?;
        let bytes = std::fs::metadata(target)
            .map_err(|e| StoreError::Io(format!("{}: {e}", target.display())))?
            .len();
        Ok(BackupReport {
            path: target.to_owned(),
            bytes,
            verified,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

pub(crate) fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::Io(format!("cannot sync {}: {e}", parent.display())))
}

/// Opens a store file (not a directory) and checks everything from genesis.
pub fn verify_backup_file(path: &Path) -> Result<VerifyReport, StoreError> {
    let store = EmbeddedStore::open_file(path, EmbeddedOptions::default())?;
    let report = store.verify()?;
    store.close()?;
    if !report.is_ok() {
        return Err(StoreError::Corrupt(format!(
            "the copy does not verify: {}",
            report.problems.join("; ")
        )));
    }
    Ok(report)
}

/// Copies every table of the snapshot into a new database at `path`.
fn copy_all(snapshot: &ReadTransaction, path: &Path) -> Result<(), StoreError> {
    let db = Database::create(path)
        .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", path.display())))?;
    let mut copier = Copier {
        db: &db,
        txn: Some(begin(&db, Durability::None)?),
        n_in_txn: 0,
    };
    copier.table(snapshot, META)?;
    copier.table(snapshot, DEFINITIONS)?;
    copier.table(snapshot, DEFINITION_LATEST)?;
    copier.table(snapshot, INSTANCES)?;
    copier.table(snapshot, INSTANCE_UIDS)?;
    copier.table(snapshot, ACTIVE_INSTANCES)?;
    copier.table(snapshot, RECORDS)?;
    copier.table(snapshot, RECORD_INDEX)?;
    copier.table(snapshot, TIMERS)?;
    copier.table(snapshot, IDEMPOTENCY)?;
    copier.table(snapshot, IDEMPOTENCY_EXPIRY)?;
    copier.table(snapshot, RETIRED_UIDS)?;
    copier.table(snapshot, ROLLOUTS)?;
    copier.table(snapshot, DELIVERY_CURSORS)?;
    copier.table(snapshot, DEAD_LETTERS)?;
    copier.table(snapshot, DEAD_LETTER_REDRIVES)?;
    let mut txn = copier.txn.take().expect("a transaction is open");
    txn.set_durability(Durability::Immediate).io()?;
    txn.commit().io()?;
    Ok(())
}

fn begin(db: &Database, durability: Durability) -> Result<WriteTransaction, StoreError> {
    let mut txn = db.begin_write().io()?;
    txn.set_durability(durability).io()?;
    Ok(txn)
}

struct Copier<'db> {
    db: &'db Database,
    txn: Option<WriteTransaction>,
    n_in_txn: usize,
}

impl Copier<'_> {
    fn table<K: Key + 'static, V: Value + 'static>(
        &mut self,
        snapshot: &ReadTransaction,
        definition: TableDefinition<K, V>,
    ) -> Result<(), StoreError> {
        debug_assert!(TABLE_NAMES.contains(&definition.name()));
        let source = match snapshot.open_table(definition) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(StoreError::Io(e.to_string())),
        };
        let mut entries = source.iter().io()?;
        loop {
            let txn = self.txn.as_ref().expect("a transaction is open");
            let mut target = txn.open_table(definition).io()?;
            let mut n = 0;
            let mut done = true;
            for entry in entries.by_ref() {
                let (key, value) = entry.io()?;
                target.insert(key.value(), value.value()).io()?;
                n += 1;
                if self.n_in_txn + n >= COPY_CHUNK {
                    done = false;
                    break;
                }
            }
            drop(target);
            self.n_in_txn += n;
            if done {
                return Ok(());
            }
            // Bound the dirty pages of one transaction; only the last commit is durable.
            let txn = self.txn.take().expect("a transaction is open");
            txn.commit().io()?;
            self.txn = Some(begin(self.db, Durability::None)?);
            self.n_in_txn = 0;
        }
    }
}

/// The names of the tables a store file holds (for the completeness test).
#[doc(hidden)]
pub fn table_names(store: &EmbeddedStore) -> Result<Vec<String>, StoreError> {
    let txn = store.read()?;
    let mut names: Vec<String> = txn
        .list_tables()
        .io()?
        .map(|t| t.name().to_owned())
        .collect();
    names.sort();
    Ok(names)
}
