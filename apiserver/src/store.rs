//! The object store: every object as JSON in memory, one global resourceVersion counter (like
//! etcd's revision), and a bounded history of change events that watches and consistent
//! paginated lists read from. Writes run as short transactions under one lock; a committed batch
//! is made durable (see `persistence`) before it becomes visible.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::errors::{ApiError, StoreError};
use crate::meta;
use crate::persistence::{Persistence, Record};
use crate::resources::Registry;

pub type Obj = Arc<Value>;

/// Change event types, as in watch events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// Where an object lives: its resource table (`group/plural`), namespace (`""` when cluster
/// scoped) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectKey {
    #[serde(rename = "r")]
    pub resource: String,
    #[serde(rename = "ns", default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(rename = "n")]
    pub name: String,
}

impl ObjectKey {
    pub fn new(resource: impl Into<String>, namespace: &str, name: &str) -> Self {
        ObjectKey {
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// One committed change. `object` is the new state (for `Deleted`: the last state, carrying the
/// deletion's resourceVersion); `prev` the state before.
#[derive(Debug)]
pub struct StoredEvent {
    pub rv: u64,
    pub kind: EventType,
    pub key: ObjectKey,
    pub object: Obj,
    pub prev: Option<Obj>,
}

/// Reading history failed: the requested resourceVersion left the window.
#[derive(Debug, Clone, Copy)]
pub struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

/// Tunables of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How many change events are kept for watches and consistent lists.
    pub history_window: usize,
    /// Snapshot the state once the log holds this many records.
    pub compact_every: usize,
    /// fsync the log before answering (turn off only for throwaway data).
    pub fsync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            history_window: 10_000,
            compact_every: 20_000,
            fsync: true,
        }
    }
}

type Table = BTreeMap<(String, String), Obj>;

struct Inner {
    rv: u64,
    tables: HashMap<String, Table>,
    history: VecDeque<Arc<StoredEvent>>,
    opts: StoreOptions,
    persist: Option<Persistence>,
    closed: bool,
}

/// The store.
pub struct Store {
    inner: Mutex<Inner>,
    registry: RwLock<Arc<Registry>>,
    rv_tx: watch::Sender<u64>,
}

enum Mutation {
    Put { key: ObjectKey, object: Obj },
    Delete { key: ObjectKey, object: Obj },
}

/// A write transaction: reads see the committed state plus this transaction's own writes.
pub struct Txn<'a> {
    inner: &'a Inner,
    registry: Arc<Registry>,
    next_rv: u64,
    dry_run: bool,
    muts: Vec<Mutation>,
    overlay: HashMap<ObjectKey, Option<Obj>>,
}

pub const CRD_TABLE: &str = "apiextensions.k8s.io/customresourcedefinitions";
pub const NAMESPACE_TABLE: &str = "/namespaces";

impl Txn<'_> {
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Obj> {
        if let Some(staged) = self.overlay.get(key) {
            return staged.clone();
        }
        self.inner
            .tables
            .get(&key.resource)?
            .get(&(key.namespace.clone(), key.name.clone()))
            .cloned()
    }

    pub fn exists(&self, key: &ObjectKey) -> bool {
        self.get(key).is_some()
    }

    /// Committed objects of a table (optionally one namespace), with this transaction's writes.
    pub fn objects(&self, resource: &str, namespace: Option<&str>) -> Vec<(ObjectKey, Obj)> {
        let mut out: BTreeMap<ObjectKey, Obj> = BTreeMap::new();
        if let Some(t) = self.inner.tables.get(resource) {
            for ((ns, name), o) in t {
                if namespace.is_none_or(|want| want == ns) {
                    out.insert(ObjectKey::new(resource, ns, name), o.clone());
                }
            }
        }
        for (k, v) in &self.overlay {
            if k.resource == resource && namespace.is_none_or(|want| want == k.namespace) {
                match v {
                    Some(o) => {
                        out.insert(k.clone(), o.clone());
                    }
                    None => {
                        out.remove(k);
                    }
                }
            }
        }
        out.into_iter().collect()
    }

    /// Every table that has objects in `namespace` (this transaction's writes included).
    pub fn tables_with_namespace(&self, namespace: &str) -> Vec<String> {
        let mut candidates: Vec<String> = self
            .inner
            .tables
            .iter()
            .filter(|(_, t)| t.keys().any(|(ns, _)| ns == namespace))
            .map(|(k, _)| k.clone())
            .collect();
        for k in self.overlay.keys() {
            if k.namespace == namespace && !candidates.contains(&k.resource) {
                candidates.push(k.resource.clone());
            }
        }
        candidates.retain(|t| !self.objects(t, Some(namespace)).is_empty());
        candidates.sort();
        candidates
    }

    /// Stages `object` at `key`; returns it as it will be stored (with its new resourceVersion).
    pub fn put(&mut self, key: ObjectKey, mut object: Value) -> Obj {
        meta::normalize_metadata(&mut object);
        if !self.dry_run {
            self.next_rv += 1;
            meta::set_meta(
                &mut object,
                "resourceVersion",
                Value::String(self.next_rv.to_string()),
            );
        }
        let obj = Arc::new(object);
        self.overlay.insert(key.clone(), Some(obj.clone()));
        self.muts.push(Mutation::Put {
            key,
            object: obj.clone(),
        });
        obj
    }

    /// Stages the removal of `key`; returns the last state with the deletion's resourceVersion.
    pub fn delete(&mut self, key: ObjectKey) -> Option<Obj> {
        let current = self.get(&key)?;
        let mut last = (*current).clone();
        if !self.dry_run {
            self.next_rv += 1;
            meta::set_meta(
                &mut last,
                "resourceVersion",
                Value::String(self.next_rv.to_string()),
            );
        }
        let obj = Arc::new(last);
        self.overlay.insert(key.clone(), None);
        self.muts.push(Mutation::Delete {
            key,
            object: obj.clone(),
        });
        Some(obj)
    }
}

impl Inner {
    fn table_get(&self, key: &ObjectKey) -> Option<&Obj> {
        self.tables
            .get(&key.resource)?
            .get(&(key.namespace.clone(), key.name.clone()))
    }

    /// Applies one event to memory (no I/O).
    fn apply(&mut self, rv: u64, kind: EventType, key: ObjectKey, object: Obj) -> Arc<StoredEvent> {
        let table = self.tables.entry(key.resource.clone()).or_default();
        let slot = (key.namespace.clone(), key.name.clone());
        let prev = match kind {
            EventType::Deleted => table.remove(&slot),
            _ => table.insert(slot, object.clone()),
        };
        if table.is_empty() {
            self.tables.remove(&key.resource);
        }
        let kind = match (kind, &prev) {
            (EventType::Deleted, _) => EventType::Deleted,
            (_, Some(_)) => EventType::Modified,
            (_, None) => EventType::Added,
        };
        let ev = Arc::new(StoredEvent {
            rv,
            kind,
            key,
            object,
            prev,
        });
        self.history.push_back(ev.clone());
        while self.history.len() > self.opts.history_window {
            self.history.pop_front();
        }
        self.rv = self.rv.max(rv);
        ev
    }

    fn snapshot(&mut self) -> Result<(), StoreError> {
        let Some(p) = self.persist.as_mut() else {
            return Ok(());
        };
        let objects = self.tables.iter().flat_map(|(res, t)| {
            t.iter().map(move |((ns, name), o)| {
                // Keys are rebuilt for the snapshot; cheap next to serialising the object.
                (ObjectKey::new(res.clone(), ns, name), o)
            })
        });
        let objects: Vec<(ObjectKey, &Obj)> = objects.collect();
        p.write_snapshot(
            self.rv,
            objects.iter().map(|(k, o)| (k, o.as_ref())),
            self.history.iter().map(|e| e.as_ref()),
        )
    }
}

impl Store {
    /// Opens the store on `dir` (or in memory), replaying what is on disk.
    pub fn open(dir: Option<&Path>, opts: StoreOptions) -> Result<Arc<Self>, StoreError> {
        let mut inner = Inner {
            rv: 0,
            tables: HashMap::new(),
            history: VecDeque::new(),
            opts: opts.clone(),
            persist: None,
            closed: false,
        };
        if let Some(dir) = dir {
            let (persist, recovered) = Persistence::open(dir, opts.fsync)?;
            inner.rv = recovered.rv;
            for (key, object) in recovered.objects {
                inner
                    .tables
                    .entry(key.resource.clone())
                    .or_default()
                    .insert((key.namespace, key.name), Arc::new(object));
            }
            for e in recovered.history {
                inner.history.push_back(Arc::new(StoredEvent {
                    rv: e.rv,
                    kind: e.kind,
                    key: e.key,
                    object: Arc::new(e.object),
                    prev: e.prev.map(Arc::new),
                }));
            }
            while inner.history.len() > opts.history_window {
                inner.history.pop_front();
            }
            let replayed = recovered.log.len();
            for rec in recovered.log {
                inner.apply(rec.rv, rec.kind, rec.key, Arc::new(rec.object));
            }
            inner.persist = Some(persist);
            inner.snapshot()?;
            tracing::info!(
                dir = %dir.display(),
                resource_version = inner.rv,
                replayed,
                "store opened"
            );
        }
        let registry = Registry::with_crds(
            inner
                .tables
                .get(CRD_TABLE)
                .into_iter()
                .flat_map(|t| t.values().map(|o| o.as_ref())),
        );
        let (rv_tx, _) = watch::channel(inner.rv);
        Ok(Arc::new(Store {
            inner: Mutex::new(inner),
            registry: RwLock::new(Arc::new(registry)),
            rv_tx,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied batch (memory is only
        // changed after the log write, without panicking paths), so keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// Notified with the latest resourceVersion after every commit.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.rv_tx.subscribe()
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Obj> {
        self.lock().table_get(key).cloned()
    }

    /// Runs `f` as a transaction and commits what it staged (unless `dry_run`).
    pub fn write<T>(
        &self,
        dry_run: bool,
        f: impl FnOnce(&mut Txn<'_>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(StoreError::Closed.into());
        }
        let (out, muts) = {
            let mut txn = Txn {
                inner: &inner,
                registry: self.registry(),
                next_rv: inner.rv,
                dry_run,
                muts: Vec::new(),
                overlay: HashMap::new(),
            };
            let out = f(&mut txn)?;
            (out, txn.muts)
        };
        if dry_run || muts.is_empty() {
            return Ok(out);
        }
        let records: Vec<Record> = muts
            .iter()
            .map(|m| {
                let (key, object, deleted) = match m {
                    Mutation::Put { key, object } => (key, object, false),
                    Mutation::Delete { key, object } => (key, object, true),
                };
                let rv = meta::resource_version(object).parse().unwrap_or(0);
                let kind = if deleted {
                    EventType::Deleted
                } else {
                    EventType::Modified
                };
                Record {
                    rv,
                    kind,
                    key: key.clone(),
                    object: (**object).clone(),
                }
            })
            .collect();
        if let Some(p) = inner.persist.as_mut() {
            p.append(&records)?;
        }
        let mut crds_changed = false;
        for m in muts {
            let (key, object, kind) = match m {
                Mutation::Put { key, object } => (key, object, EventType::Modified),
                Mutation::Delete { key, object } => (key, object, EventType::Deleted),
            };
            crds_changed |= key.resource == CRD_TABLE;
            let rv = meta::resource_version(&object).parse().unwrap_or(0);
            inner.apply(rv, kind, key, object);
        }
        if crds_changed {
            let reg = Registry::with_crds(
                inner
                    .tables
                    .get(CRD_TABLE)
                    .into_iter()
                    .flat_map(|t| t.values().map(|o| o.as_ref())),
            );
            *self.registry.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(reg);
        }
        let compact = inner
            .persist
            .as_ref()
            .is_some_and(|p| p.log_records() >= inner.opts.compact_every);
        if compact && let Err(e) = inner.snapshot() {
            tracing::warn!(error = %e, "snapshot failed; the log keeps growing");
        }
        self.rv_tx.send_replace(inner.rv);
        Ok(out)
    }

    /// The current objects of a table (optionally one namespace) and the resourceVersion they
    /// are current at.
    pub fn snapshot(&self, resource: &str, namespace: Option<&str>) -> (u64, Vec<Obj>) {
        let inner = self.lock();
        let objs = inner
            .tables
            .get(resource)
            .map(|t| {
                t.iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
                    .map(|(_, o)| o.clone())
                    .collect()
            })
            .unwrap_or_default();
        (inner.rv, objs)
    }

    /// The objects of a table as they were at resourceVersion `at` (rebuilt by undoing later
    /// history), in key order.
    pub fn list_at(
        &self,
        resource: &str,
        namespace: Option<&str>,
        at: Option<u64>,
    ) -> Result<(u64, Vec<Obj>), Expired> {
        let inner = self.lock();
        let at = at.unwrap_or(inner.rv);
        let mut objs: BTreeMap<(String, String), Obj> = inner
            .tables
            .get(resource)
            .map(|t| {
                t.iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
                    .map(|(k, o)| (k.clone(), o.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if at < inner.rv {
            let oldest = inner.history.front().map_or(inner.rv + 1, |e| e.rv);
            if at + 1 < oldest {
                return Err(Expired {
                    requested: at,
                    oldest,
                });
            }
            for ev in inner.history.iter().rev().take_while(|e| e.rv > at) {
                if ev.key.resource != resource
                    || namespace.is_some_and(|want| want != ev.key.namespace)
                {
                    continue;
                }
                let slot = (ev.key.namespace.clone(), ev.key.name.clone());
                match (&ev.kind, &ev.prev) {
                    (EventType::Added, _) | (_, None) => {
                        objs.remove(&slot);
                    }
                    (_, Some(prev)) => {
                        objs.insert(slot, prev.clone());
                    }
                }
            }
        }
        Ok((at, objs.into_values().collect()))
    }

    /// Events after resourceVersion `rv`, oldest first.
    pub fn events_since(&self, rv: u64) -> Result<Vec<Arc<StoredEvent>>, Expired> {
        let inner = self.lock();
        if rv >= inner.rv {
            return Ok(Vec::new());
        }
        let oldest = inner.history.front().map_or(inner.rv + 1, |e| e.rv);
        if rv + 1 < oldest {
            return Err(Expired {
                requested: rv,
                oldest,
            });
        }
        let start = inner.history.partition_point(|e| e.rv <= rv);
        Ok(inner.history.range(start..).cloned().collect())
    }

    /// Stops accepting writes, writes a final snapshot and releases the data directory.
    pub fn close(&self) {
        let mut inner = self.lock();
        if inner.closed {
            return;
        }
        inner.closed = true;
        if let Err(e) = inner.snapshot() {
            tracing::warn!(error = %e, "final snapshot failed; the log will be replayed");
        }
        inner.persist = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(store: &Store, name: &str, v: i64) {
        store
            .write(false, |t| {
                t.put(
                    ObjectKey::new("g/things", "ns", name),
                    json!({"metadata": {"name": name, "namespace": "ns"}, "v": v}),
                );
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn history_and_snapshots() {
        let store = Store::open(None, StoreOptions::default()).unwrap();
        put(&store, "a", 1);
        put(&store, "b", 1);
        put(&store, "a", 2);
        store
            .write(false, |t| {
                t.delete(ObjectKey::new("g/things", "ns", "b"));
                Ok(())
            })
            .unwrap();
        assert_eq!(store.current_rv(), 4);
        let evs = store.events_since(1).unwrap();
        let kinds: Vec<_> = evs.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec![EventType::Added, EventType::Modified, EventType::Deleted]
        );
        let (_, at2) = store.list_at("g/things", None, Some(2)).unwrap();
        assert_eq!(at2.len(), 2);
        assert_eq!(at2[0]["v"], json!(1));
        let (rv, now) = store.list_at("g/things", Some("ns"), None).unwrap();
        assert_eq!(rv, 4);
        assert_eq!(now.len(), 1);
        assert_eq!(now[0]["v"], json!(2));
    }

    #[test]
    fn window_expires() {
        let store = Store::open(
            None,
            StoreOptions {
                history_window: 2,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        for i in 0..5 {
            put(&store, "a", i);
        }
        assert!(store.events_since(1).is_err());
        assert_eq!(store.events_since(3).unwrap().len(), 2);
        assert!(store.list_at("g/things", None, Some(1)).is_err());
    }

    #[test]
    fn persistence_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(Some(dir.path()), StoreOptions::default()).unwrap();
            put(&store, "a", 1);
            put(&store, "a", 2);
            // No close(): simulate a crash; the log is replayed.
        }
        let store = Store::open(Some(dir.path()), StoreOptions::default()).unwrap();
        assert_eq!(store.current_rv(), 2);
        assert_eq!(store.events_since(0).unwrap().len(), 2);
        put(&store, "b", 1);
        assert_eq!(store.current_rv(), 3);
        store.close();
        let store = Store::open(Some(dir.path()), StoreOptions::default()).unwrap();
        assert_eq!(store.current_rv(), 3);
        assert_eq!(
            store.get(&ObjectKey::new("g/things", "ns", "a")).unwrap()["v"],
            json!(2)
        );
    }

    #[test]
    fn runtime_compaction_keeps_state_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            compact_every: 3,
            ..StoreOptions::default()
        };
        {
            let store = Store::open(Some(dir.path()), opts.clone()).unwrap();
            for i in 0..7 {
                put(&store, &format!("o{}", i % 2), i);
            }
        }
        let wal = std::fs::read_to_string(dir.path().join("wal.jsonl")).unwrap();
        assert_eq!(wal.lines().count(), 1, "compacted twice, one record since");
        let store = Store::open(Some(dir.path()), opts).unwrap();
        assert_eq!(store.current_rv(), 7);
        assert_eq!(store.events_since(0).unwrap().len(), 7);
        let (_, at3) = store.list_at("g/things", None, Some(3)).unwrap();
        assert_eq!(at3[0]["v"], json!(2));
    }

    #[test]
    fn torn_tail_is_dropped_and_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(Some(dir.path()), StoreOptions::default()).unwrap();
            put(&store, "a", 1);
            assert!(matches!(
                Store::open(Some(dir.path()), StoreOptions::default()),
                Err(StoreError::Locked(_))
            ));
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("wal.jsonl"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"{\"rv\":9,\"type\":\"MOD").unwrap();
        drop(f);
        let store = Store::open(Some(dir.path()), StoreOptions::default()).unwrap();
        assert_eq!(store.current_rv(), 1);
        put(&store, "b", 1);
        drop(store);
        let store = Store::open(Some(dir.path()), StoreOptions::default()).unwrap();
        assert_eq!(store.current_rv(), 2);
    }
}
