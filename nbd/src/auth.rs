//! Who is connecting (authentication), what they may open, and which requests they may make
//! (authorization).
//!
//! ## Authentication
//!
//! NBD has no authentication option (spec §"Certificates, authentication and authorisation"
//! leaves it to implementations). The server asks an [`Authenticator`] twice:
//!
//! 1. [`Authenticator::on_connect`] when the connection is accepted, with the transport identity
//!    in [`PeerInfo`] (TCP address, unix-socket peer credentials, and — once the transport is
//!    wrapped in TLS — the verified client-certificate identity). Returning a [`Principal`] here
//!    authenticates the connection without any NBD-level exchange. This is how unix-socket
//!    frontends work with stock clients ([`AllowAll`]; the socket's file permissions are the
//!    access control) and how mTLS replaces tokens: terminate TLS before handing the stream to
//!    the server, put the certificate identity in [`PeerInfo::tls_identity`], and accept it here.
//! 2. [`Authenticator::authenticate`] when the client sends the private option
//!    [`NBD_OPT_TESSERA_AUTH`](crate::proto::NBD_OPT_TESSERA_AUTH) carrying a principal name and
//!    a secret token. Our own client sends it before `NBD_OPT_GO`; stock clients never do.
//!
//! Until one of them succeeds, every option except `NBD_OPT_ABORT` and the auth option is
//! answered with `NBD_REP_ERR_POLICY` (so `NBD_OPT_LIST` reveals nothing and `NBD_OPT_GO` cannot
//! succeed), and `NBD_OPT_EXPORT_NAME` — which cannot carry an error — ends the session.
//!
//! ## Authorization
//!
//! [`ExportCatalog::open`] decides whether a principal may open an export at all, and
//! [`ExportCatalog::authorize`] is consulted for every transmission request (before the export
//! sees it); a refusal is answered with `NBD_EPERM`. [`RangeAuthorization`] is an in-memory
//! table principal → export → allowed byte ranges (read or read-write) that a control plane can
//! update at any time, and [`SimpleCatalog`] wires it to a map of exports.

use crate::export::Export;
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

/// The transport-level address of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAddr {
    Tcp(SocketAddr),
    /// A unix-socket peer with its credentials (`SO_PEERCRED`) when available.
    Unix {
        uid: Option<u32>,
        gid: Option<u32>,
        pid: Option<i32>,
    },
    /// Anything else (in-memory streams in tests, tunnels).
    Other(String),
}

/// What the server knows about a peer before any NBD exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub addr: PeerAddr,
    /// The identity from a verified client certificate, when the stream is (m)TLS.
    pub tls_identity: Option<String>,
}

impl PeerInfo {
    pub fn tcp(addr: SocketAddr) -> Self {
        Self {
            addr: PeerAddr::Tcp(addr),
            tls_identity: None,
        }
    }

    pub fn unix(uid: Option<u32>, gid: Option<u32>, pid: Option<i32>) -> Self {
        Self {
            addr: PeerAddr::Unix { uid, gid, pid },
            tls_identity: None,
        }
    }

    pub fn other(description: impl Into<String>) -> Self {
        Self {
            addr: PeerAddr::Other(description.into()),
            tls_identity: None,
        }
    }
}

impl fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            PeerAddr::Tcp(a) => write!(f, "tcp:{a}")?,
            PeerAddr::Unix { uid, pid, .. } => {
                write!(f, "unix")?;
                if let Some(uid) = uid {
                    write!(f, ":uid={uid}")?;
                }
                if let Some(pid) = pid {
                    write!(f, ":pid={pid}")?;
                }
            }
            PeerAddr::Other(s) => write!(f, "{s}")?,
        }
        if let Some(id) = &self.tls_identity {
            write!(f, "[tls:{id}]")?;
        }
        Ok(())
    }
}

/// An authenticated identity (a node name for the extent server, e.g. `node-a`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Principal(Arc<str>);

impl Principal {
    pub fn new(name: impl AsRef<str>) -> Self {
        Self(Arc::from(name.as_ref()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Decides who a connection is. See the module documentation.
pub trait Authenticator: Send + Sync {
    /// Authenticates from the transport alone (unix-socket credentials, mTLS identity).
    /// `None` means the client must present a token.
    fn on_connect(&self, peer: &PeerInfo) -> Option<Principal>;

    /// Checks a token presented with `NBD_OPT_TESSERA_AUTH`.
    fn authenticate(&self, peer: &PeerInfo, principal: &str, token: &[u8]) -> Option<Principal>;
}

/// Accepts every connection as principal `local`. For unix-socket frontends, where the
/// socket's file-system permissions are the access control and stock clients must work.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn on_connect(&self, _peer: &PeerInfo) -> Option<Principal> {
        Some(Principal::new("local"))
    }
    fn authenticate(&self, _peer: &PeerInfo, principal: &str, _token: &[u8]) -> Option<Principal> {
        Some(Principal::new(principal))
    }
}

/// Token authentication for the extent server.
///
/// Either per-principal tokens (each node has its own secret, so the principal a client claims
/// is proven) or one shared token (any holder may claim any principal name — adequate when every
/// node already holds the cluster secret, but per-principal tokens are preferable). Optionally
/// trusts a verified TLS identity, which is how mTLS replaces the token without code changes
/// elsewhere. Tokens are compared in constant time.
#[derive(Default, Clone)]
pub struct TokenAuthenticator {
    per_principal: HashMap<String, Vec<u8>>,
    shared: Option<Vec<u8>>,
    trust_tls_identity: bool,
}

impl fmt::Debug for TokenAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenAuthenticator")
            .field("principals", &self.per_principal.keys().collect::<Vec<_>>())
            .field("shared", &self.shared.is_some())
            .field("trust_tls_identity", &self.trust_tls_identity)
            .finish()
    }
}

impl TokenAuthenticator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `principal` when it presents `token`.
    pub fn with_principal(
        mut self,
        principal: impl Into<String>,
        token: impl Into<Vec<u8>>,
    ) -> Self {
        self.per_principal.insert(principal.into(), token.into());
        self
    }

    /// Accepts any principal name presenting this shared token.
    pub fn with_shared_token(mut self, token: impl Into<Vec<u8>>) -> Self {
        self.shared = Some(token.into());
        self
    }

    /// Authenticates connections whose [`PeerInfo::tls_identity`] is set (verified by the TLS
    /// layer) as that identity.
    pub fn trust_tls_identity(mut self, trust: bool) -> Self {
        self.trust_tls_identity = trust;
        self
    }
}

/// Constant-time equality (the length is not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator for TokenAuthenticator {
    fn on_connect(&self, peer: &PeerInfo) -> Option<Principal> {
        match &peer.tls_identity {
            Some(id) if self.trust_tls_identity => Some(Principal::new(id)),
            _ => None,
        }
    }

    fn authenticate(&self, _peer: &PeerInfo, principal: &str, token: &[u8]) -> Option<Principal> {
        if principal.is_empty() || token.is_empty() {
            return None;
        }
        if let Some(expected) = self.per_principal.get(principal) {
            return ct_eq(expected, token).then(|| Principal::new(principal));
        }
        match &self.shared {
            Some(shared) if ct_eq(shared, token) => Some(Principal::new(principal)),
            _ => None,
        }
    }
}

impl<T: Authenticator + ?Sized> Authenticator for Arc<T> {
    fn on_connect(&self, peer: &PeerInfo) -> Option<Principal> {
        (**self).on_connect(peer)
    }
    fn authenticate(&self, peer: &PeerInfo, principal: &str, token: &[u8]) -> Option<Principal> {
        (**self).authenticate(peer, principal, token)
    }
}

// ---------------------------------------------------------------------------------------------
// Catalog
// ---------------------------------------------------------------------------------------------

/// One entry of `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    pub name: String,
    pub description: String,
}

/// Why an export could not be opened; mapped to option error replies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// `NBD_REP_ERR_UNKNOWN`.
    #[error("no such export")]
    NotFound,
    /// `NBD_REP_ERR_POLICY`.
    #[error("access denied")]
    Denied,
    /// `NBD_REP_ERR_UNKNOWN` with the message ("the requested export is not available").
    #[error("export unavailable: {0}")]
    Unavailable(String),
    /// `NBD_REP_ERR_SHUTDOWN`.
    #[error("server shutting down")]
    ShuttingDown,
}

/// The kind of a transmission request, for authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    Read,
    Write,
    Trim,
    WriteZeroes,
    Flush,
}

impl AccessKind {
    /// Whether the request can modify data.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            AccessKind::Write | AccessKind::Trim | AccessKind::WriteZeroes
        )
    }
}

/// A transmission request as seen by [`ExportCatalog::authorize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub kind: AccessKind,
    pub offset: u64,
    pub len: u64,
}

/// The exports a server offers, and the policy over them.
pub trait ExportCatalog: Send + Sync {
    /// The export type; `dyn DynExport` serves heterogeneous exports.
    type Export: Export + ?Sized;

    /// Exports the principal may see (`NBD_OPT_LIST`).
    fn list(&self, principal: &Principal) -> Vec<ExportListing>;

    /// Opens an export for `NBD_OPT_INFO`/`NBD_OPT_GO`/`NBD_OPT_EXPORT_NAME`. The empty name is
    /// the default export, if the catalog has one.
    fn open(
        &self,
        name: &str,
        principal: &Principal,
    ) -> impl Future<Output = Result<Arc<Self::Export>, OpenError>> + Send;

    /// Per-request authorization hook, called for every READ/WRITE/TRIM/WRITE_ZEROES/FLUSH
    /// after protocol validation and before the export sees the request. Refusal → `NBD_EPERM`.
    /// It is on the hot path: keep it to a lookup.
    fn authorize(&self, principal: &Principal, export: &str, access: &Access) -> bool {
        let _ = (principal, export, access);
        true
    }
}

impl<C: ExportCatalog + ?Sized> ExportCatalog for Arc<C> {
    type Export = C::Export;
    fn list(&self, principal: &Principal) -> Vec<ExportListing> {
        (**self).list(principal)
    }
    fn open(
        &self,
        name: &str,
        principal: &Principal,
    ) -> impl Future<Output = Result<Arc<Self::Export>, OpenError>> + Send {
        (**self).open(name, principal)
    }
    fn authorize(&self, principal: &Principal, export: &str, access: &Access) -> bool {
        (**self).authorize(principal, export, access)
    }
}

// ---------------------------------------------------------------------------------------------
// RangeAuthorization
// ---------------------------------------------------------------------------------------------

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    Read,
    ReadWrite,
}

/// A set of disjoint, non-adjacent half-open ranges `start..end`, keyed by start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // Absorb every range that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    fn remove(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let overlapping: Vec<(u64, u64)> = self
            .0
            .range(..r.end)
            .rev()
            .take_while(|(_, e)| **e > r.start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in overlapping {
            self.0.remove(&s);
            if s < r.start {
                self.0.insert(s, r.start);
            }
            if e > r.end {
                self.0.insert(r.end, e);
            }
        }
    }

    /// Whether `[offset, offset + len)` is entirely inside one range (ranges are merged, so
    /// coverage by the union implies coverage by one).
    fn covers(&self, offset: u64, len: u64) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        match self.0.range(..=offset).next_back() {
            Some((_, e)) => *e > offset && *e >= end,
            None => false,
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn ranges(&self) -> Vec<Range<u64>> {
        self.0.iter().map(|(s, e)| *s..*e).collect()
    }
}

#[derive(Debug, Clone, Default)]
struct Grants {
    /// Ranges readable (granted Read or ReadWrite).
    read: RangeSet,
    /// Ranges writable (granted ReadWrite).
    write: RangeSet,
}

/// The extent server's authorization table: principal → export (volume/area) → byte ranges the
/// principal may read or read-and-write. Updated by the control plane at any time; every request
/// is checked against the current state.
///
/// Semantics of [`RangeAuthorization::check`]: a read needs the whole range readable, a
/// write/trim/write-zeroes needs it writable, a flush needs any grant on the export (it touches
/// no range), and a zero-length request needs its offset to fall in a granted range of the
/// right kind.
#[derive(Debug, Default)]
pub struct RangeAuthorization {
    table: RwLock<HashMap<Principal, HashMap<String, Grants>>>,
}

impl RangeAuthorization {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a grant (merged with existing ones).
    pub fn grant(&self, principal: &str, export: &str, range: Range<u64>, perm: Permission) {
        let mut t = self.table.write();
        let g = t
            .entry(Principal::new(principal))
            .or_default()
            .entry(export.to_owned())
            .or_default();
        g.read.insert(range.clone());
        if perm == Permission::ReadWrite {
            g.write.insert(range);
        }
    }

    /// Removes `range` from every grant of `principal` on `export`.
    pub fn revoke(&self, principal: &str, export: &str, range: Range<u64>) {
        let mut t = self.table.write();
        let p = Principal::new(principal);
        if let Some(exports) = t.get_mut(&p) {
            if let Some(g) = exports.get_mut(export) {
                g.read.remove(range.clone());
                g.write.remove(range);
                if g.read.is_empty() && g.write.is_empty() {
                    exports.remove(export);
                }
            }
            if exports.is_empty() {
                t.remove(&p);
            }
        }
    }

    /// Atomically replaces every grant of `principal` on `export` (e.g. on a new mapping
    /// generation). An empty list revokes access to the export.
    pub fn set_export(
        &self,
        principal: &str,
        export: &str,
        grants: impl IntoIterator<Item = (Range<u64>, Permission)>,
    ) {
        let mut g = Grants::default();
        for (r, perm) in grants {
            g.read.insert(r.clone());
            if perm == Permission::ReadWrite {
                g.write.insert(r);
            }
        }
        let mut t = self.table.write();
        let p = Principal::new(principal);
        if g.read.is_empty() {
            if let Some(exports) = t.get_mut(&p) {
                exports.remove(export);
                if exports.is_empty() {
                    t.remove(&p);
                }
            }
        } else {
            t.entry(p).or_default().insert(export.to_owned(), g);
        }
    }

    /// Removes every grant of `principal`.
    pub fn revoke_principal(&self, principal: &str) {
        self.table.write().remove(&Principal::new(principal));
    }

    /// Removes every grant on `export`, for all principals.
    pub fn revoke_export(&self, export: &str) {
        let mut t = self.table.write();
        t.retain(|_, exports| {
            exports.remove(export);
            !exports.is_empty()
        });
    }

    /// Whether `principal` has any grant on `export`.
    pub fn has_any(&self, principal: &Principal, export: &str) -> bool {
        self.table
            .read()
            .get(principal)
            .is_some_and(|e| e.contains_key(export))
    }

    /// Exports on which `principal` has any grant.
    pub fn exports_of(&self, principal: &Principal) -> Vec<String> {
        self.table
            .read()
            .get(principal)
            .map(|e| e.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The granted ranges `(readable, writable)` of `principal` on `export`.
    pub fn ranges(&self, principal: &str, export: &str) -> (Vec<Range<u64>>, Vec<Range<u64>>) {
        let t = self.table.read();
        match t
            .get(&Principal::new(principal))
            .and_then(|e| e.get(export))
        {
            Some(g) => (g.read.ranges(), g.write.ranges()),
            None => (Vec::new(), Vec::new()),
        }
    }

    /// Decides one request.
    pub fn check(&self, principal: &Principal, export: &str, access: &Access) -> bool {
        let t = self.table.read();
        let Some(g) = t.get(principal).and_then(|e| e.get(export)) else {
            return false;
        };
        match access.kind {
            AccessKind::Flush => true,
            AccessKind::Read => g.read.covers(access.offset, access.len),
            AccessKind::Write | AccessKind::Trim | AccessKind::WriteZeroes => {
                g.write.covers(access.offset, access.len)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SimpleCatalog
// ---------------------------------------------------------------------------------------------

struct Entry<E: ?Sized> {
    export: Arc<E>,
    description: String,
}

/// A catalog backed by a map of exports, optionally governed by a [`RangeAuthorization`]
/// (then a principal sees and opens only exports it has a grant on, and every request is
/// checked against the table).
pub struct SimpleCatalog<E: Export + ?Sized> {
    exports: RwLock<BTreeMap<String, Entry<E>>>,
    authorization: Option<Arc<RangeAuthorization>>,
}

impl<E: Export + ?Sized> Default for SimpleCatalog<E> {
    fn default() -> Self {
        Self {
            exports: RwLock::new(BTreeMap::new()),
            authorization: None,
        }
    }
}

impl<E: Export + ?Sized> SimpleCatalog<E> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Governs the catalog by `table`.
    pub fn with_authorization(mut self, table: Arc<RangeAuthorization>) -> Self {
        self.authorization = Some(table);
        self
    }

    /// Adds or replaces an export.
    pub fn insert(&self, name: impl Into<String>, export: Arc<E>) {
        self.insert_with_description(name, export, "");
    }

    pub fn insert_with_description(
        &self,
        name: impl Into<String>,
        export: Arc<E>,
        description: impl Into<String>,
    ) {
        self.exports.write().insert(
            name.into(),
            Entry {
                export,
                description: description.into(),
            },
        );
    }

    /// Removes an export (open connections keep serving it until they close).
    pub fn remove(&self, name: &str) -> Option<Arc<E>> {
        self.exports.write().remove(name).map(|e| e.export)
    }

    fn visible(&self, principal: &Principal, name: &str) -> bool {
        match &self.authorization {
            Some(t) => t.has_any(principal, name),
            None => true,
        }
    }
}

impl<E: Export + ?Sized> ExportCatalog for SimpleCatalog<E> {
    type Export = E;

    fn list(&self, principal: &Principal) -> Vec<ExportListing> {
        self.exports
            .read()
            .iter()
            .filter(|(name, _)| self.visible(principal, name))
            .map(|(name, e)| ExportListing {
                name: name.clone(),
                description: e.description.clone(),
            })
            .collect()
    }

    fn open(
        &self,
        name: &str,
        principal: &Principal,
    ) -> impl Future<Output = Result<Arc<E>, OpenError>> + Send {
        let result = match self.exports.read().get(name) {
            None => Err(OpenError::NotFound),
            Some(_) if !self.visible(principal, name) => Err(OpenError::Denied),
            Some(e) => Ok(e.export.clone()),
        };
        std::future::ready(result)
    }

    fn authorize(&self, principal: &Principal, export: &str, access: &Access) -> bool {
        match &self.authorization {
            Some(t) => t.check(principal, export, access),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(kind: AccessKind, offset: u64, len: u64) -> Access {
        Access { kind, offset, len }
    }

    #[test]
    fn range_set_merges_and_splits() {
        let mut s = RangeSet::default();
        s.insert(0..10);
        s.insert(20..30);
        s.insert(10..20); // touches both: one range
        assert_eq!(s.ranges(), vec![0..30]);
        s.insert(25..40);
        assert_eq!(s.ranges(), vec![0..40]);
        s.remove(5..15);
        assert_eq!(s.ranges(), vec![0..5, 15..40]);
        s.remove(0..100);
        assert!(s.is_empty());
        s.insert(5..5); // empty: ignored
        assert!(s.is_empty());
        s.insert(100..200);
        s.insert(0..50);
        s.insert(40..150);
        assert_eq!(s.ranges(), vec![0..200]);
    }

    #[test]
    fn range_set_coverage() {
        let mut s = RangeSet::default();
        s.insert(4096..8192);
        assert!(s.covers(4096, 4096));
        assert!(s.covers(5000, 100));
        assert!(!s.covers(4095, 2));
        assert!(!s.covers(8000, 193));
        assert!(!s.covers(8192, 0));
        assert!(s.covers(4096, 0));
        assert!(!s.covers(u64::MAX, 2));
    }

    #[test]
    fn range_authorization_decides_by_kind_and_range() {
        let t = RangeAuthorization::new();
        let a = Principal::new("node-a");
        let b = Principal::new("node-b");
        t.grant("node-a", "vol", 0..1 << 20, Permission::ReadWrite);
        t.grant("node-a", "vol", 1 << 20..2 << 20, Permission::Read);

        assert!(t.check(&a, "vol", &acc(AccessKind::Read, 0, 2 << 20)));
        assert!(t.check(&a, "vol", &acc(AccessKind::Write, 0, 1 << 20)));
        assert!(!t.check(&a, "vol", &acc(AccessKind::Write, 0, (1 << 20) + 512)));
        assert!(!t.check(&a, "vol", &acc(AccessKind::Trim, 1 << 20, 512)));
        assert!(!t.check(&a, "vol", &acc(AccessKind::Read, 2 << 20, 512)));
        assert!(t.check(&a, "vol", &acc(AccessKind::Flush, 0, 0)));
        assert!(!t.check(&a, "other", &acc(AccessKind::Flush, 0, 0)));
        assert!(!t.check(&b, "vol", &acc(AccessKind::Read, 0, 512)));

        t.revoke("node-a", "vol", 0..4096);
        assert!(!t.check(&a, "vol", &acc(AccessKind::Read, 0, 512)));
        assert!(t.check(&a, "vol", &acc(AccessKind::Write, 4096, 512)));

        t.set_export("node-a", "vol", [(8192..16384, Permission::Read)]);
        assert!(!t.check(&a, "vol", &acc(AccessKind::Write, 8192, 512)));
        assert!(t.check(&a, "vol", &acc(AccessKind::Read, 8192, 8192)));
        let (readable, writable) = t.ranges("node-a", "vol");
        assert_eq!((readable.len(), writable.len()), (1, 0));
        assert_eq!(readable[0], 8192..16384);

        t.set_export("node-a", "vol", []);
        assert!(!t.has_any(&a, "vol"));
        t.grant("node-b", "vol", 0..512, Permission::Read);
        t.grant("node-b", "vol2", 0..512, Permission::Read);
        t.revoke_export("vol");
        assert_eq!(t.exports_of(&b), vec!["vol2".to_string()]);
        t.revoke_principal("node-b");
        assert!(t.exports_of(&b).is_empty());
    }

    #[test]
    fn token_authenticator() {
        let peer = PeerInfo::other("test");
        let auth = TokenAuthenticator::new().with_principal("node-a", b"sa".to_vec());
        assert_eq!(auth.on_connect(&peer), None);
        assert_eq!(
            auth.authenticate(&peer, "node-a", b"sa"),
            Some(Principal::new("node-a"))
        );
        assert_eq!(auth.authenticate(&peer, "node-a", b"sb"), None);
        assert_eq!(auth.authenticate(&peer, "node-b", b"sa"), None);
        let shared = auth.clone().with_shared_token(b"cluster".to_vec());
        assert_eq!(
            shared.authenticate(&peer, "node-b", b"cluster"),
            Some(Principal::new("node-b"))
        );
        // A principal with its own token cannot fall back to the shared one.
        assert_eq!(shared.authenticate(&peer, "node-a", b"cluster"), None);
        assert_eq!(shared.authenticate(&peer, "", b"cluster"), None);

        let mut tls = PeerInfo::other("tls");
        tls.tls_identity = Some("node-c".into());
        assert_eq!(auth.on_connect(&tls), None);
        assert_eq!(
            auth.clone().trust_tls_identity(true).on_connect(&tls),
            Some(Principal::new("node-c"))
        );
    }

    #[tokio::test]
    async fn simple_catalog_with_authorization() {
        use crate::export::MemExport;
        let table = Arc::new(RangeAuthorization::new());
        let cat = SimpleCatalog::<MemExport>::new().with_authorization(table.clone());
        cat.insert_with_description("vol", Arc::new(MemExport::new(4096)), "v");
        cat.insert("hidden", Arc::new(MemExport::new(4096)));
        let a = Principal::new("a");
        assert!(cat.list(&a).is_empty());
        assert_eq!(cat.open("vol", &a).await.err(), Some(OpenError::Denied));
        assert_eq!(cat.open("nope", &a).await.err(), Some(OpenError::NotFound));
        table.grant("a", "vol", 0..4096, Permission::Read);
        assert_eq!(
            cat.list(&a),
            vec![ExportListing {
                name: "vol".into(),
                description: "v".into()
            }]
        );
        assert!(cat.open("vol", &a).await.is_ok());
        assert!(cat.authorize(&a, "vol", &acc(AccessKind::Read, 0, 4096)));
        assert!(!cat.authorize(&a, "vol", &acc(AccessKind::Write, 0, 4096)));
    }
}
