//! Watch streams: newline-delimited `WatchEvent`s read from the store's history in
//! resourceVersion order, filtered like the real watch cache (an object that stops matching the
//! selectors is sent as DELETED, one that starts matching as ADDED), with periodic and final
//! BOOKMARKs, `sendInitialEvents` streaming lists, `timeoutSeconds`, and a 410 `Expired` ERROR
//! event when the requested resourceVersion left the history window.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::errors::ApiError;
use crate::meta;
use crate::rest::{self, Scope};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{EventType, Store, StoredEvent};
use crate::table::{self, IncludeObject};

/// How objects are rendered in responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    /// `PartialObjectMetadata`.
    Metadata,
    /// `meta.k8s.io/v1 Table`.
    Table(IncludeObject),
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// At the current state; `initial` sends it first as synthetic ADDED events.
    Now { initial: bool },
    /// After this resourceVersion.
    After(u64),
}

/// A watch request, validated.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub scope: Scope,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub start: WatchStart,
    pub bookmarks: bool,
    /// Streaming list: end the initial events with a `k8s.io/initial-events-end` bookmark.
    pub initial_events_end: bool,
    pub timeout: Duration,
    pub format: Format,
}

impl WatchRequest {
    fn matches(&self, obj: &Value) -> bool {
        (self.scope.namespace.is_empty() || meta::namespace(obj) == self.scope.namespace)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }

    fn render(&self, obj: &Value) -> Value {
        let o = rest::render(&self.scope, obj);
        match self.format {
            Format::Json => o,
            Format::Metadata => table::partial_metadata(&o),
            Format::Table(include) => table::table(
                &self.scope.res,
                &self.scope.version,
                std::slice::from_ref(&o),
                serde_json::Map::new(),
                include,
                true,
            ),
        }
    }

    /// The watch-cache conversion of one change for this watcher.
    fn convert(&self, ev: &StoredEvent) -> Option<(&'static str, Value)> {
        if ev.key.resource != self.scope.res.key() {
            return None;
        }
        let cur = ev.kind != EventType::Deleted && self.matches(&ev.object);
        let old = ev.prev.as_ref().is_some_and(|p| self.matches(p));
        match (cur, old) {
            (true, false) => Some(("ADDED", self.render(&ev.object))),
            (true, true) => Some(("MODIFIED", self.render(&ev.object))),
            (false, true) => {
                if ev.kind == EventType::Deleted {
                    Some(("DELETED", self.render(&ev.object)))
                } else {
                    // The previous state, with this event's resourceVersion.
                    let mut prev = ev.prev.as_deref().cloned().unwrap_or(Value::Null);
                    meta::set_meta(&mut prev, "resourceVersion", json!(ev.rv.to_string()));
                    Some(("DELETED", self.render(&prev)))
                }
            }
            (false, false) => None,
        }
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Value {
        let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        match self.format {
            Format::Json => json!({
                "kind": self.scope.res.kind,
                "apiVersion": self.scope.res.api_version(&self.scope.version),
                "metadata": metadata,
            }),
            Format::Metadata => json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata,
            }),
            Format::Table(_) => json!({
                "kind": "Table",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata,
                "columnDefinitions": [],
                "rows": [],
            }),
        }
    }
}

fn line(type_: &str, object: Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": type_, "object": object})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

type Tx = mpsc::Sender<Result<Bytes, Infallible>>;

async fn send(tx: &Tx, type_: &str, object: Value) -> bool {
    tx.send(Ok(line(type_, object))).await.is_ok()
}

/// Starts the watch; the returned stream is the response body.
pub fn start(
    store: Arc<Store>,
    req: WatchRequest,
    bookmark_interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<Result<Bytes, Infallible>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut rv_rx = store.subscribe();
        let deadline = tokio::time::Instant::now() + req.timeout;
        let ns = (!req.scope.namespace.is_empty()).then_some(req.scope.namespace.as_str());
        rv_rx.borrow_and_update();
        let mut last_rv = match req.start {
            WatchStart::Now { initial } => {
                let (rv, objs) = store.snapshot(&req.scope.res.key(), ns);
                if initial {
                    for o in objs.iter().filter(|o| req.matches(o)) {
                        if !send(&tx, "ADDED", req.render(o)).await {
                            return;
                        }
                    }
                }
                if req.initial_events_end && !send(&tx, "BOOKMARK", req.bookmark(rv, true)).await {
                    return;
                }
                rv
            }
            WatchStart::After(rv) => rv,
        };
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + bookmark_interval,
            bookmark_interval,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            rv_rx.borrow_and_update();
            match store.events_since(last_rv) {
                Ok(events) => {
                    for ev in events {
                        last_rv = ev.rv;
                        if let Some((t, o)) = req.convert(&ev)
                            && !send(&tx, t, o).await
                        {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let status = ApiError::too_old(e.requested, e.oldest).to_status();
                    let _ = send(&tx, "ERROR", status).await;
                    return;
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                () = tx.closed() => return,
                () = tokio::time::sleep_until(deadline) => {
                    if req.bookmarks {
                        let _ = send(&tx, "BOOKMARK", req.bookmark(last_rv, false)).await;
                    }
                    return;
                }
                changed = rv_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tick.tick(), if req.bookmarks => {
                    if !send(&tx, "BOOKMARK", req.bookmark(last_rv, false)).await {
                        return;
                    }
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
