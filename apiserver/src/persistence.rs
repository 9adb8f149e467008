//! Durable state in the data directory: an append-only log of committed mutations
//! (`wal.jsonl`, one JSON record per line, fsynced before the request is answered) and a snapshot
//! (`snapshot.json`: every object, the resourceVersion counter and the watch history window),
//! written to a temporary file, fsynced and atomically renamed. On start the snapshot is loaded,
//! the log replayed (a torn last line — a write that was never acknowledged — is dropped), and the
//! result compacted into a new snapshot. A `LOCK` file (`flock`) keeps a second server out.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::errors::StoreError;
use crate::store::{EventType, ObjectKey, StoredEvent};

const SNAPSHOT: &str = "snapshot.json";
const SNAPSHOT_TMP: &str = "snapshot.json.tmp";
const WAL: &str = "wal.jsonl";
const LOCK: &str = "LOCK";
const FORMAT: u32 = 1;

/// One committed mutation, as logged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub rv: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub key: ObjectKey,
    pub object: Value,
}

#[derive(Serialize)]
struct SnapshotOut<'a> {
    format: u32,
    rv: u64,
    objects: Vec<ObjOut<'a>>,
    history: Vec<EventOut<'a>>,
}

#[derive(Serialize)]
struct ObjOut<'a> {
    key: &'a ObjectKey,
    object: &'a Value,
}

#[derive(Serialize)]
struct EventOut<'a> {
    rv: u64,
    #[serde(rename = "type")]
    kind: EventType,
    key: &'a ObjectKey,
    object: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev: Option<&'a Value>,
}

#[derive(Deserialize)]
struct SnapshotIn {
    format: u32,
    rv: u64,
    objects: Vec<ObjIn>,
    history: Vec<EventIn>,
}

#[derive(Deserialize)]
struct ObjIn {
    key: ObjectKey,
    object: Value,
}

/// A history event as stored in the snapshot.
#[derive(Debug, Deserialize)]
pub struct EventIn {
    pub rv: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub key: ObjectKey,
    pub object: Value,
    pub prev: Option<Value>,
}

/// What was on disk.
pub struct Recovered {
    pub rv: u64,
    pub objects: Vec<(ObjectKey, Value)>,
    pub history: Vec<EventIn>,
    /// Log records newer than the snapshot, in order.
    pub log: Vec<Record>,
}

/// The open data directory.
pub struct Persistence {
    dir: PathBuf,
    wal: File,
    wal_len: u64,
    wal_records: usize,
    fsync: bool,
    poisoned: bool,
    _lock: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::io(path, e)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl Persistence {
    /// Opens (creating if needed) and locks `dir`, and reads its state.
    pub fn open(dir: &Path, fsync: bool) -> Result<(Self, Recovered), StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(dir.display().to_string()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(StoreError::io(&lock_path, e)),
        }

        let snap_path = dir.join(SNAPSHOT);
        let (rv, objects, history) = if snap_path.exists() {
            let mut buf = Vec::new();
            File::open(&snap_path)
                .and_then(|mut f| f.read_to_end(&mut buf))
                .map_err(io(&snap_path))?;
            let snap: SnapshotIn = serde_json::from_slice(&buf)
                .map_err(|e| StoreError::Corrupt(snap_path.display().to_string(), e.to_string()))?;
            if snap.format != FORMAT {
                return Err(StoreError::Corrupt(
                    snap_path.display().to_string(),
                    format!("unknown snapshot format {}", snap.format),
                ));
            }
            (
                snap.rv,
                snap.objects
                    .into_iter()
                    .map(|o| (o.key, o.object))
                    .collect(),
                snap.history,
            )
        } else {
            (0, Vec::new(), Vec::new())
        };

        let wal_path = dir.join(WAL);
        let mut log = Vec::new();
        let mut valid_len = 0u64;
        if wal_path.exists() {
            let mut buf = Vec::new();
            File::open(&wal_path)
                .and_then(|mut f| f.read_to_end(&mut buf))
                .map_err(io(&wal_path))?;
            let mut offset = 0usize;
            while offset < buf.len() {
                let Some(nl) = buf[offset..].iter().position(|b| *b == b'\n') else {
                    // A torn final write: it was never acknowledged.
                    tracing::warn!(bytes = buf.len() - offset, "dropping torn tail of the log");
                    break;
                };
                let line = &buf[offset..offset + nl];
                let next = offset + nl + 1;
                match serde_json::from_slice::<Record>(line) {
                    Ok(rec) => {
                        if rec.rv > rv {
                            log.push(rec);
                        }
                    }
                    Err(e) if next >= buf.len() => {
                        tracing::warn!(error = %e, "dropping unparsable last log record");
                        break;
                    }
                    Err(e) => {
                        return Err(StoreError::Corrupt(
                            wal_path.display().to_string(),
                            format!("record at byte {offset}: {e}"),
                        ));
                    }
                }
                offset = next;
                valid_len = offset as u64;
            }
        }
        let wal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&wal_path)
            .map_err(io(&wal_path))?;
        // Cut a torn tail so new records start on a line of their own.
        wal.set_len(valid_len).map_err(io(&wal_path))?;
        sync_dir(dir)?;
        let wal_records = log.len();
        Ok((
            Persistence {
                dir: dir.to_path_buf(),
                wal,
                wal_len: valid_len,
                wal_records,
                fsync,
                poisoned: false,
                _lock: lock,
            },
            Recovered {
                rv,
                objects,
                history,
                log,
            },
        ))
    }

    /// Appends `records` and makes them durable before returning.
    pub fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r)
                .map_err(|e| StoreError::Corrupt("log record".into(), e.to_string()))?;
            buf.push(b'\n');
        }
        let path = self.dir.join(WAL);
        let result = self.wal.write_all(&buf).and_then(|()| {
            if self.fsync {
                self.wal.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = result {
            // Roll the file back to the last acknowledged record.
            if self.wal.set_len(self.wal_len).is_err() {
                self.poisoned = true;
            }
            return Err(StoreError::io(&path, e));
        }
        self.wal_len += buf.len() as u64;
        self.wal_records += records.len();
        Ok(())
    }

    /// Records in the log since the last snapshot.
    pub fn log_records(&self) -> usize {
        self.wal_records
    }

    /// Writes a snapshot of the whole state atomically, then empties the log.
    pub fn write_snapshot<'a>(
        &mut self,
        rv: u64,
        objects: impl Iterator<Item = (&'a ObjectKey, &'a Value)>,
        history: impl Iterator<Item = &'a StoredEvent>,
    ) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let snap = SnapshotOut {
            format: FORMAT,
            rv,
            objects: objects
                .map(|(key, object)| ObjOut { key, object })
                .collect(),
            history: history
                .map(|e| EventOut {
                    rv: e.rv,
                    kind: e.kind,
                    key: &e.key,
                    object: &e.object,
                    prev: e.prev.as_deref(),
                })
                .collect(),
        };
        let tmp = self.dir.join(SNAPSHOT_TMP);
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = BufWriter::new(file);
        serde_json::to_writer(&mut w, &snap)
            .map_err(|e| StoreError::io(&tmp, std::io::Error::other(e)))?;
        let file = w
            .into_inner()
            .map_err(|e| StoreError::io(&tmp, e.into_error()))?;
        if self.fsync {
            file.sync_all().map_err(io(&tmp))?;
        }
        drop(file);
        let path = self.dir.join(SNAPSHOT);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        if self.fsync {
            sync_dir(&self.dir)?;
        }
        // The snapshot now holds everything: the log can go. A crash before this point replays
        // records the snapshot already has, which `open` skips by resourceVersion.
        let wal_path = self.dir.join(WAL);
        self.wal.set_len(0).map_err(io(&wal_path))?;
        if self.fsync {
            self.wal.sync_all().map_err(io(&wal_path))?;
        }
        self.wal_len = 0;
        self.wal_records = 0;
        Ok(())
    }
}
