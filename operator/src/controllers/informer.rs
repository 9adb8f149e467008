//! One watch per kind, shared by every controller.
//!
//! The reflector writes each change into the kind's cache *before* it hands the object to the
//! subscribers (the controllers' trigger streams), so a reconcile started by a change of kind K
//! reads a K cache that already has that change. With one `Controller::new` (and one watch) per
//! controller, a controller could be triggered by its own watch of, say, VolumeRemaps while the
//! remap cache it reads (fed by another watch) had not seen the change yet — and then nothing
//! would trigger it again. Deletions are forwarded too (kube's shared-store subscriptions drop
//! them), so a volume that goes away updates its pool and areas at once.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

type Subscribers<K> = Arc<Mutex<Vec<UnboundedSender<K>>>>;

/// The cache of one kind and the fan-out of its changes.
pub struct Informer<K>
where
    K: Resource<DynamicType = ()> + 'static,
{
    store: Store<K>,
    subscribers: Subscribers<K>,
    driver: Option<BoxFuture<'static, ()>>,
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// A cluster-wide watch of `K`. Nothing happens until [`Informer::take_driver`]'s future
    /// runs.
    pub fn new(client: &Client) -> Self {
        let (store, writer) = reflector::store();
        let subscribers: Subscribers<K> = Arc::default();
        let fan_out = Arc::clone(&subscribers);
        let driver = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .touched_objects()
            .for_each(move |change| {
                match change {
                    Ok(object) => {
                        let mut subscribers = fan_out.lock().unwrap_or_else(|e| e.into_inner());
                        subscribers.retain(|tx| tx.unbounded_send(object.clone()).is_ok());
                    }
                    Err(e) => {
                        tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed, retrying")
                    }
                }
                futures::future::ready(())
            })
            .boxed();
        Informer {
            store,
            subscribers,
            driver: Some(driver),
        }
    }

    /// The cache.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// A trigger stream of every object touched from now on (applied or deleted).
    pub fn subscribe(&self) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
        let (tx, rx): (UnboundedSender<K>, UnboundedReceiver<K>) = unbounded();
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        rx.map(Ok)
    }

    /// The future that drives the watch; run it for as long as the controllers run.
    pub fn take_driver(&mut self) -> BoxFuture<'static, ()> {
        self.driver
            .take()
            .unwrap_or_else(|| futures::future::pending().boxed())
    }
}
