//! Server and client against each other (in-memory pipes, unix sockets, TCP loopback), and the
//! server against a hand-driven peer for the protocol corners our client never exercises.

mod common;

use bytes::Bytes;
use common::*;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tessera_nbd::proto::*;
use tessera_nbd::*;

// ---------------------------------------------------------------------------------------------
// Client ↔ server basics
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn round_trip_every_command() {
    let (export, server) = allow_all_server(8 * MIB);
    let c = duplex_client(&server, "vol", None).await.unwrap();
    let d = c.details().clone();
    assert_eq!(d.size, 8 * MIB);
    assert_eq!(d.block_size, BlockSize::DEFAULT);
    assert!(d.can_flush() && d.can_fua() && d.can_trim() && d.can_write_zeroes());
    assert!(d.can_multi_conn() && !d.read_only());

    let data = pattern(1, 64 * 1024);
    c.write(4096, data.clone(), false).await.unwrap();
    assert_eq!(c.read(4096, 64 * 1024).await.unwrap(), data);
    assert_eq!(export.slice(4096, 64 * 1024), data);

    c.write_zeroes(8192, 4096, true, false).await.unwrap();
    c.trim(16384, 4096, false).await.unwrap();
    let back = c.read(4096, 64 * 1024).await.unwrap();
    // Export offsets 8192.. (zeroed) and 16384.. (trimmed; MemExport zeroes) relative to 4096.
    assert!(back[4096..8192].iter().all(|b| *b == 0));
    assert!(back[12288..16384].iter().all(|b| *b == 0));
    assert_eq!(&back[..4096], &data[..4096]);
    assert_eq!(&back[8192..12288], &data[8192..12288]);
    assert_eq!(&back[16384..], &data[16384..]);
    c.flush().await.unwrap();

    // The largest request the server advertises works.
    let big = pattern(2, 32 << 20);
    let c2 = duplex_client(&allow_all_server(64 * MIB).1, "vol", None)
        .await
        .unwrap();
    c2.write(0, big.clone(), false).await.unwrap();
    assert_eq!(c2.read(0, 32 << 20).await.unwrap(), big);

    // Client-side validation: nothing is sent for requests the export forbids.
    assert!(matches!(
        c.read(8 * MIB, 512).await,
        Err(ClientError::InvalidRequest(_))
    ));
    assert!(matches!(
        c.read(1, 512).await,
        Err(ClientError::InvalidRequest(_))
    ));
    assert!(matches!(
        c.read(0, (32 << 20) + 512).await,
        Err(ClientError::InvalidRequest(_))
    ));
    assert_eq!(c.read(0, 0).await.unwrap().len(), 0);
    c.disconnect().await;
    assert!(c.is_closed());
    assert!(matches!(
        c.read(0, 512).await,
        Err(ClientError::Disconnected(_))
    ));
}

#[tokio::test]
async fn fua_and_flush_reach_the_export() {
    let (export, server) = allow_all_server(MIB);
    let c = duplex_client(&server, "vol", None).await.unwrap();
    c.write(0, pattern(3, 4096), true).await.unwrap();
    c.write(4096, pattern(4, 4096), false).await.unwrap();
    c.flush().await.unwrap();
    let s = export.stats();
    assert_eq!((s.writes, s.fua_writes, s.flushes), (2, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_concurrent_io_from_many_tasks() {
    let (export, server) = allow_all_server(64 * MIB);
    let c = Arc::new(duplex_client(&server, "vol", None).await.unwrap());
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            // Each task owns a 2 MiB region and does 40 write/read-verify rounds in it.
            let base = t * 2 * MIB;
            for i in 0..40u64 {
                let len = 4096 * (1 + (i % 16) as usize);
                let off = base + (i * 37 % 256) * 4096;
                let data = pattern(t * 1000 + i, len);
                c.write(off, data.clone(), i % 7 == 0).await.unwrap();
                let back = c.read(off, len as u32).await.unwrap();
                assert_eq!(back, data, "task {t} round {i}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(export.stats().writes, 32 * 40);
    assert_eq!(c.in_flight(), 0);
}

/// An export whose reads at offset 0 take a while: proves requests are processed concurrently
/// and replies go out in completion order.
struct SlowFirstBlock {
    inner: MemExport,
    concurrent: AtomicUsize,
    max_concurrent: AtomicUsize,
}

impl Export for SlowFirstBlock {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        let now = self.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_concurrent.fetch_max(now, Ordering::SeqCst);
        if offset == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.concurrent.fetch_sub(1, Ordering::SeqCst);
        self.inner.read(offset, len).await
    }
    fn write(
        &self,
        o: u64,
        d: Bytes,
        f: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send {
        self.inner.write(o, d, f)
    }
    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send {
        self.inner.flush()
    }
}

#[tokio::test]
async fn replies_are_sent_out_of_order_as_requests_complete() {
    let export = Arc::new(SlowFirstBlock {
        inner: MemExport::new(MIB),
        concurrent: AtomicUsize::new(0),
        max_concurrent: AtomicUsize::new(0),
    });
    let catalog = Arc::new(SimpleCatalog::new());
    catalog.insert("vol", export.clone());
    let server = Server::new(catalog, Arc::new(AllowAll));
    let mut raw = RawClient::new(serve_duplex(&server));
    raw.go("vol").await;
    raw.request(Command::Read, 0, 1, 0, 512, &[]).await;
    for h in 2..=10u64 {
        raw.request(Command::Read, 0, h, h * 4096, 512, &[]).await;
    }
    let mut order = Vec::new();
    for _ in 0..10 {
        let r = raw.reply().await.unwrap();
        assert_eq!(r.error, 0);
        raw.data(512).await;
        order.push(r.handle);
    }
    assert_eq!(
        *order.last().unwrap(),
        1,
        "slow request should complete last: {order:?}"
    );
    assert!(export.max_concurrent.load(Ordering::SeqCst) >= 5);
}

// ---------------------------------------------------------------------------------------------
// Authentication and authorization
// ---------------------------------------------------------------------------------------------

fn token_server(
    size: u64,
) -> (
    Arc<MemExport>,
    Arc<RangeAuthorization>,
    Server<SimpleCatalog<MemExport>, TokenAuthenticator>,
) {
    let export = Arc::new(MemExport::new(size));
    let table = Arc::new(RangeAuthorization::new());
    let catalog = Arc::new(SimpleCatalog::new().with_authorization(table.clone()));
    catalog.insert("vol", export.clone());
    let auth = TokenAuthenticator::new()
        .with_principal("node-a", b"secret-a".to_vec())
        .with_principal("node-b", b"secret-b".to_vec());
    (export, table, Server::new(catalog, Arc::new(auth)))
}

#[tokio::test]
async fn unauthenticated_client_sees_nothing_and_cannot_go() {
    let (_e, table, server) = token_server(MIB);
    table.grant("node-a", "vol", 0..MIB, Permission::ReadWrite);

    // No credentials: LIST and GO are refused by policy.
    let err = client::list_exports(serve_duplex(&server), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Refused {
                reply: NBD_REP_ERR_POLICY,
                ..
            }
        ),
        "{err:?}"
    );
    let err = duplex_client(&server, "vol", None).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Refused {
                option: NBD_OPT_GO,
                reply: NBD_REP_ERR_POLICY,
                ..
            }
        ),
        "{err:?}"
    );

    // Wrong token.
    let bad = Credentials::new("node-a", b"secret-b".to_vec());
    let err = duplex_client(&server, "vol", Some(&bad)).await.unwrap_err();
    assert!(
        matches!(err, ClientError::AuthenticationFailed(_)),
        "{err:?}"
    );

    // Raw peer: every option but ABORT is refused; EXPORT_NAME ends the session.
    let mut raw = RawClient::new(serve_duplex(&server));
    raw.greet(NBD_FLAG_C_FIXED_NEWSTYLE).await;
    for opt in [
        OptionRequest::List,
        OptionRequest::StructuredReply,
        OptionRequest::Info(InfoRequest {
            name: "vol".into(),
            info_types: vec![],
        }),
        OptionRequest::Unsupported(4242),
    ] {
        raw.send_option(&opt).await;
        assert_eq!(
            raw.option_replies().await,
            vec![OptionReply::error(
                NBD_REP_ERR_POLICY,
                "authentication required"
            )]
        );
    }
    raw.send_option(&OptionRequest::ExportName("vol".into()))
        .await;
    assert!(raw.at_eof().await);

    // Three bad tokens and the server hangs up.
    let mut raw = RawClient::new(serve_duplex(&server));
    raw.greet(NBD_FLAG_C_FIXED_NEWSTYLE).await;
    for _ in 0..3 {
        raw.send_option(&OptionRequest::Auth(AuthRequest {
            principal: "node-a".into(),
            token: b"guess".to_vec(),
        }))
        .await;
        assert!(matches!(
            raw.option_reply().await.unwrap().reply,
            OptionReply::Error {
                reply_type: NBD_REP_ERR_POLICY,
                ..
            }
        ));
    }
    assert!(raw.at_eof().await);
}

#[tokio::test]
async fn authenticated_client_lists_and_uses_granted_exports() {
    let (export, table, server) = token_server(4 * MIB);
    table.grant("node-a", "vol", 0..MIB, Permission::ReadWrite);
    table.grant("node-a", "vol", MIB..2 * MIB, Permission::Read);
    let a = Credentials::new("node-a", b"secret-a".to_vec());
    let b = Credentials::new("node-b", b"secret-b".to_vec());

    let list = client::list_exports(serve_duplex(&server), Some(&a))
        .await
        .unwrap();
    assert_eq!(
        list.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        vec!["vol"]
    );
    // node-b is authenticated but has no grant: sees nothing, may not open.
    assert!(
        client::list_exports(serve_duplex(&server), Some(&b))
            .await
            .unwrap()
            .is_empty()
    );
    let err = duplex_client(&server, "vol", Some(&b)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Refused {
                reply: NBD_REP_ERR_POLICY,
                ..
            }
        ),
        "{err:?}"
    );
    let err = duplex_client(&server, "nope", Some(&a)).await.unwrap_err();
    assert!(matches!(err, ClientError::ExportNotFound(_)), "{err:?}");

    let c = duplex_client(&server, "vol", Some(&a)).await.unwrap();
    // In range: allowed.
    c.write(0, pattern(5, 8192), false).await.unwrap();
    assert_eq!(c.read(MIB, 4096).await.unwrap().len(), 4096);
    c.flush().await.unwrap();
    // Outside the grants: EPERM, and the export never sees it.
    let writes_before = export.stats().writes;
    let e = c.write(MIB, pattern(6, 4096), false).await.unwrap_err();
    assert!(matches!(e, ClientError::Remote(Errno::EPERM)), "{e:?}");
    let e = c
        .write(MIB - 4096, pattern(6, 8192), false)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Remote(Errno::EPERM)), "{e:?}");
    let e = c.read(2 * MIB, 4096).await.unwrap_err();
    assert!(matches!(e, ClientError::Remote(Errno::EPERM)), "{e:?}");
    let e = c.trim(MIB, 4096, false).await.unwrap_err();
    assert!(matches!(e, ClientError::Remote(Errno::EPERM)), "{e:?}");
    assert_eq!(export.stats().writes, writes_before);

    // The control plane revokes access: the very next request is refused.
    table.revoke("node-a", "vol", 0..4096);
    let e = c.read(0, 4096).await.unwrap_err();
    assert!(matches!(e, ClientError::Remote(Errno::EPERM)), "{e:?}");
    assert!(c.read(4096, 4096).await.is_ok());
    table.set_export("node-a", "vol", []);
    let e = c.flush().await.unwrap_err();
    assert!(matches!(e, ClientError::Remote(Errno::EPERM)), "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// Protocol corners (raw peer)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn transmission_errors_follow_the_spec() {
    let (export, server) = allow_all_server(MIB);
    let mut raw = RawClient::new(serve_duplex(&server));
    let (size, flags) = raw.go("vol").await;
    assert_eq!(size, MIB);
    assert_ne!(flags & NBD_FLAG_HAS_FLAGS, 0);

    let cases: Vec<(Command, u16, u64, u32, Vec<u8>, Errno)> = vec![
        // Writes beyond the end: ENOSPC; reads and trims: EINVAL (spec §"Error values").
        (Command::Write, 0, MIB, 512, vec![0; 512], Errno::ENOSPC),
        (
            Command::WriteZeroes,
            0,
            MIB - 512,
            1024,
            vec![],
            Errno::ENOSPC,
        ),
        (Command::Read, 0, MIB, 512, vec![], Errno::EINVAL),
        (Command::Trim, 0, u64::MAX - 100, 512, vec![], Errno::EINVAL),
        // Misaligned to the advertised 512-byte minimum.
        (Command::Read, 0, 1, 512, vec![], Errno::EINVAL),
        (Command::Write, 0, 0, 100, vec![0; 100], Errno::EINVAL),
        // Unknown and unnegotiated commands and flags.
        (Command::Unknown(77), 0, 0, 0, vec![], Errno::EINVAL),
        (Command::BlockStatus, 0, 0, 512, vec![], Errno::EINVAL),
        (Command::Cache, 0, 0, 512, vec![], Errno::EINVAL),
        (
            Command::Read,
            NBD_CMD_FLAG_DF,
            0,
            512,
            vec![],
            Errno::EINVAL,
        ),
        (
            Command::WriteZeroes,
            NBD_CMD_FLAG_FAST_ZERO,
            0,
            512,
            vec![],
            Errno::EINVAL,
        ),
        (Command::Write, 1 << 9, 0, 512, vec![0; 512], Errno::EINVAL),
    ];
    for (i, (cmd, fl, off, len, payload, want)) in cases.into_iter().enumerate() {
        raw.request(cmd, fl, 100 + i as u64, off, len, &payload)
            .await;
        let r = raw.reply().await.unwrap();
        assert_eq!(
            (r.handle, Errno(r.error)),
            (100 + i as u64, want),
            "case {i}: {cmd:?}"
        );
    }
    // FUA on a read is accepted (spec: "valid for all commands"); zero-length requests succeed.
    raw.request(Command::Read, NBD_CMD_FLAG_FUA, 1, 0, 512, &[])
        .await;
    assert_eq!(raw.reply().await.unwrap().error, 0);
    raw.data(512).await;
    raw.request(Command::Write, 0, 2, 0, 0, &[]).await;
    assert_eq!(raw.reply().await.unwrap().error, 0);
    // The session survived every error.
    raw.request(Command::Write, NBD_CMD_FLAG_FUA, 3, 512, 512, &[7; 512])
        .await;
    assert_eq!(raw.reply().await.unwrap().error, 0);
    assert_eq!(export.slice(512, 512), vec![7; 512]);

    // Export failures map to NBD errors.
    export.set_fault(Some(ExportError::Io("disk on fire".into())));
    raw.request(Command::Read, 0, 4, 0, 512, &[]).await;
    assert_eq!(Errno(raw.reply().await.unwrap().error), Errno::EIO);
    export.set_fault(Some(ExportError::NoSpace));
    raw.request(Command::Write, 0, 5, 0, 512, &[1; 512]).await;
    assert_eq!(Errno(raw.reply().await.unwrap().error), Errno::ENOSPC);
    export.set_fault(None);

    // An oversized WRITE is a hard disconnect (it cannot be skipped without reading 4 GiB).
    raw.request(Command::Write, 0, 6, 0, u32::MAX, &[]).await;
    assert!(raw.at_eof().await);
}

#[tokio::test]
async fn read_only_exports_refuse_writes_with_eperm() {
    let export = Arc::new(MemExport::new(MIB).with_capabilities(Capabilities {
        read_only: true,
        can_trim: true,
        can_write_zeroes: true,
        can_multi_conn: true,
    }));
    let catalog = Arc::new(SimpleCatalog::new());
    catalog.insert("ro", export);
    let server = Server::new(catalog, Arc::new(AllowAll));
    let mut raw = RawClient::new(serve_duplex(&server));
    let (_, flags) = raw.go("ro").await;
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    assert_eq!(flags & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES), 0);
    raw.request(Command::Write, 0, 1, 0, 512, &[0; 512]).await;
    assert_eq!(Errno(raw.reply().await.unwrap().error), Errno::EPERM);
    raw.request(Command::Trim, 0, 2, 0, 512, &[]).await;
    assert_eq!(Errno(raw.reply().await.unwrap().error), Errno::EPERM);
    let c = duplex_client(&server, "ro", None).await.unwrap();
    assert!(matches!(
        c.write(0, pattern(1, 512), false).await,
        Err(ClientError::InvalidRequest(_))
    ));
    assert_eq!(c.read(0, 512).await.unwrap().len(), 512);
}

#[tokio::test]
async fn negotiation_options() {
    let (_e, server) = allow_all_server(MIB);
    let mut raw = RawClient::new(serve_duplex(&server));
    let hs = raw.greet(NBD_FLAG_C_FIXED_NEWSTYLE).await;
    assert_eq!(hs, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);

    raw.send_option(&OptionRequest::StructuredReply).await;
    assert!(matches!(
        raw.option_replies().await[..],
        [OptionReply::Error {
            reply_type: NBD_REP_ERR_UNSUP,
            ..
        }]
    ));
    raw.send_option(&OptionRequest::Unsupported(NBD_OPT_EXTENDED_HEADERS))
        .await;
    assert!(matches!(
        raw.option_replies().await[..],
        [OptionReply::Error {
            reply_type: NBD_REP_ERR_UNSUP,
            ..
        }]
    ));
    raw.send_option(&OptionRequest::StartTls).await;
    assert!(matches!(
        raw.option_replies().await[..],
        [OptionReply::Error {
            reply_type: NBD_REP_ERR_UNSUP,
            ..
        }]
    ));
    // LIST with data is invalid; the session continues.
    let mut b = bytes::BytesMut::new();
    encode_option(&mut b, NBD_OPT_LIST, b"junk");
    raw.send_raw(&b).await;
    assert!(matches!(
        raw.option_replies().await[..],
        [OptionReply::Error {
            reply_type: NBD_REP_ERR_INVALID,
            ..
        }]
    ));
    raw.send_option(&OptionRequest::List).await;
    assert_eq!(
        raw.option_replies().await,
        vec![
            OptionReply::Server {
                name: "vol".into(),
                description: "test volume".into()
            },
            OptionReply::Ack
        ]
    );
    raw.send_option(&OptionRequest::Info(InfoRequest {
        name: "missing".into(),
        info_types: vec![],
    }))
    .await;
    assert!(matches!(
        raw.option_replies().await[..],
        [OptionReply::Error {
            reply_type: NBD_REP_ERR_UNKNOWN,
            ..
        }]
    ));
    raw.send_option(&OptionRequest::Info(InfoRequest {
        name: "vol".into(),
        info_types: vec![
            NBD_INFO_NAME,
            NBD_INFO_DESCRIPTION,
            NBD_INFO_BLOCK_SIZE,
            999,
        ],
    }))
    .await;
    let replies = raw.option_replies().await;
    assert!(replies.contains(&OptionReply::Info(InfoReply::Export {
        size: MIB,
        flags: NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_CAN_MULTI_CONN
    })));
    assert!(replies.contains(&OptionReply::Info(InfoReply::Name("vol".into()))));
    assert!(replies.contains(&OptionReply::Info(InfoReply::Description(
        "test volume".into()
    ))));
    assert!(replies.contains(&OptionReply::Info(InfoReply::BlockSize {
        min: 512,
        preferred: 4096,
        max: 32 << 20
    })));
    assert_eq!(replies.last(), Some(&OptionReply::Ack));
    raw.send_option(&OptionRequest::Abort).await;
    assert_eq!(raw.option_replies().await, vec![OptionReply::Ack]);
    assert!(raw.at_eof().await);
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    let (_e, server) = allow_all_server(MIB);
    for no_zeroes in [false, true] {
        let mut raw = RawClient::new(serve_duplex(&server));
        let flags = NBD_FLAG_C_FIXED_NEWSTYLE | if no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
        raw.greet(flags).await;
        raw.send_option(&OptionRequest::ExportName("vol".into()))
            .await;
        let want = if no_zeroes { 10 } else { 134 };
        let reply = raw.data(want).await;
        assert!(matches!(
            parse_export_name_reply(&reply, no_zeroes),
            Parse::Parsed { value: (s, _), .. } if s == MIB
        ));
        raw.request(Command::Read, 0, 9, 0, 512, &[]).await;
        assert_eq!(raw.reply().await.unwrap().handle, 9);
    }
    // Unknown client flags: the server drops the connection.
    let mut raw = RawClient::new(serve_duplex(&server));
    raw.greet(0x80).await;
    assert!(raw.at_eof().await);
    // Unknown export via EXPORT_NAME: hard disconnect (no way to send an error).
    let mut raw = RawClient::new(serve_duplex(&server));
    raw.greet(NBD_FLAG_C_FIXED_NEWSTYLE).await;
    raw.send_option(&OptionRequest::ExportName("nope".into()))
        .await;
    assert!(raw.at_eof().await);
}

#[tokio::test]
async fn disc_completes_outstanding_requests_first() {
    let (export, server) = allow_all_server(MIB);
    let mut raw = RawClient::new(serve_duplex(&server));
    raw.go("vol").await;
    for h in 0..20u64 {
        raw.request(Command::Write, 0, h, h * 4096, 4096, &[h as u8; 4096])
            .await;
    }
    raw.request(Command::Disc, 0, 99, 0, 0, &[]).await;
    let mut seen = Vec::new();
    while let Some(r) = raw.reply().await {
        assert_eq!(r.error, 0);
        seen.push(r.handle);
    }
    seen.sort();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    assert_eq!(export.stats().writes, 20);
}

// ---------------------------------------------------------------------------------------------
// Failure handling
// ---------------------------------------------------------------------------------------------

/// An export whose reads never complete.
struct Stuck(MemExport);

impl Export for Stuck {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read(&self, _o: u64, _l: u32) -> Result<Bytes, ExportError> {
        std::future::pending().await
    }
    fn write(
        &self,
        o: u64,
        d: Bytes,
        f: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send {
        self.0.write(o, d, f)
    }
    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send {
        self.0.flush()
    }
}

fn stuck_server() -> Server<SimpleCatalog<Stuck>, AllowAll> {
    let catalog = Arc::new(SimpleCatalog::new());
    catalog.insert("vol", Arc::new(Stuck(MemExport::new(MIB))));
    Server::new(catalog, Arc::new(AllowAll))
}

#[tokio::test]
async fn dead_connection_fails_in_flight_requests_instead_of_hanging() {
    let server = stuck_server();
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let s = server.clone();
    let task = tokio::spawn(async move {
        s.serve_connection(server_end, PeerInfo::other("t"), &CancellationToken::new())
            .await
    });
    let c = Arc::new(
        NbdClient::from_stream(client_end, "vol", None, ClientConfig::default())
            .await
            .unwrap(),
    );
    let reads: Vec<_> = (0..5)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.read(i * 4096, 4096).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(c.in_flight(), 5);
    task.abort(); // the server vanishes
    for r in reads {
        let r = tokio::time::timeout(Duration::from_secs(5), r)
            .await
            .expect("hung")
            .unwrap();
        assert!(matches!(r, Err(ClientError::Disconnected(_))), "{r:?}");
    }
    assert!(c.is_closed());
    assert!(matches!(
        c.write(0, pattern(1, 512), false).await,
        Err(ClientError::Disconnected(_))
    ));
}

#[tokio::test]
async fn request_timeout_fails_the_connection() {
    let server = stuck_server();
    let cfg = ClientConfig {
        request_timeout: Some(Duration::from_millis(200)),
        ..ClientConfig::default()
    };
    let c = Arc::new(
        NbdClient::from_stream(serve_duplex(&server), "vol", None, cfg)
            .await
            .unwrap(),
    );
    let other = {
        let c = c.clone();
        tokio::spawn(async move { c.read(4096, 512).await })
    };
    let r = c.read(0, 512).await;
    assert!(matches!(r, Err(ClientError::Timeout)), "{r:?}");
    let r = other.await.unwrap();
    assert!(
        matches!(r, Err(ClientError::Timeout | ClientError::Disconnected(_))),
        "{r:?}"
    );
    assert!(c.is_closed());
}

/// An export that reports it is shutting down.
#[tokio::test]
async fn eshutdown_makes_the_client_disconnect() {
    let (export, server) = allow_all_server(MIB);
    let c = duplex_client(&server, "vol", None).await.unwrap();
    export.set_fault(Some(ExportError::ShuttingDown));
    let r = c.read(0, 512).await;
    assert!(
        matches!(r, Err(ClientError::Remote(Errno::ESHUTDOWN))),
        "{r:?}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(c.is_closed());
}

// ---------------------------------------------------------------------------------------------
// Real sockets, graceful shutdown, pool
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unix_socket_and_tcp_listeners_with_graceful_shutdown() {
    let (export, server) = allow_all_server(16 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.sock");
    let shutdown = CancellationToken::new();
    let unix = tokio::spawn({
        let (server, shutdown) = (server.clone(), shutdown.clone());
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        async move { server.serve_unix(listener, shutdown).await }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tcp = tokio::spawn({
        let (server, shutdown) = (server.clone(), shutdown.clone());
        async move { server.serve_tcp(listener, shutdown).await }
    });

    let u = NbdClient::connect_unix(&path, "vol").await.unwrap();
    let t = NbdClient::connect_tcp(addr, "vol", None).await.unwrap();
    u.write(0, pattern(10, MIB as usize), false).await.unwrap();
    assert_eq!(
        t.read(0, MIB as u32).await.unwrap(),
        pattern(10, MIB as usize)
    );
    t.write(MIB, pattern(11, 4096), true).await.unwrap();
    assert_eq!(u.read(MIB, 4096).await.unwrap(), pattern(11, 4096));
    assert_eq!(export.stats().fua_writes, 1);

    // Shutdown closes idle connections and the listeners return.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), unix)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), tcp)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let r = u.read(0, 512).await;
    assert!(r.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_spreads_load_and_reconnects_after_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.sock");
    let (export, catalog) = mem_catalog(16 * MIB);
    let server = Server::new(catalog, Arc::new(AllowAll));
    let start = |server: Server<_, _>| {
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        let task = tokio::spawn(async move { server.serve_unix(listener, sd).await });
        (shutdown, task)
    };
    let (stop, task) = start(server.clone());
    let pool = Arc::new(
        ClientPool::connect(
            Target::Unix(path.clone()),
            "vol",
            None,
            ClientConfig::default(),
            PoolConfig {
                connections: 3,
                ..PoolConfig::default()
            },
        )
        .await
        .unwrap(),
    );
    assert_eq!(pool.connections(), 3);
    let mut tasks = Vec::new();
    for t in 0..24u64 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10u64 {
                let off = (t * 10 + i) * 65536;
                let data = pattern(t * 100 + i, 65536);
                pool.write(off, data.clone(), false).await.unwrap();
                assert_eq!(pool.read(off, 65536).await.unwrap(), data);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    pool.flush().await.unwrap();
    assert!(pool.live_connections() >= 2, "load should spread");

    // Restart the server: connections die, the pool reconnects on the next request.
    stop.cancel();
    task.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (stop, task) = start(server.clone());
    tokio::time::sleep(Duration::from_millis(250)).await; // past the reconnect backoff
    let data = pattern(999, 4096);
    pool.write(0, data.clone(), true).await.unwrap();
    assert_eq!(pool.read(0, 4096).await.unwrap(), data);
    assert_eq!(export.slice(0, 4096), data);
    pool.close().await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn pool_uses_one_connection_without_multi_conn() {
    let export = Arc::new(MemExport::new(MIB).with_capabilities(Capabilities {
        can_multi_conn: false,
        ..Capabilities::default()
    }));
    let catalog = Arc::new(SimpleCatalog::new());
    catalog.insert("vol", export);
    let server = Server::new(catalog, Arc::new(AllowAll));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let sd = shutdown.clone();
        async move { server.serve_tcp(listener, sd).await }
    });
    let pool = ClientPool::connect(
        Target::Tcp(addr.to_string()),
        "vol",
        None,
        ClientConfig::default(),
        PoolConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(pool.connections(), 1);
    pool.write(0, pattern(1, 4096), false).await.unwrap();
    pool.close().await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn token_auth_over_tcp() {
    let (_e, table, server) = token_server(MIB);
    table.grant("node-a", "vol", 0..MIB, Permission::ReadWrite);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let sd = shutdown.clone();
        async move { server.serve_tcp(listener, sd).await }
    });
    let err = NbdClient::connect_tcp(addr, "vol", None).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Refused {
                reply: NBD_REP_ERR_POLICY,
                ..
            }
        ),
        "{err:?}"
    );
    let c = NbdClient::connect_tcp(
        addr,
        "vol",
        Some(Credentials::new("node-a", b"secret-a".to_vec())),
    )
    .await
    .unwrap();
    c.write(0, pattern(1, 4096), true).await.unwrap();
    c.disconnect().await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// `dyn DynExport` catalogs serve heterogeneous exports.
#[tokio::test]
async fn dyn_export_catalog() {
    let catalog: Arc<SimpleCatalog<dyn DynExport>> = Arc::new(SimpleCatalog::new());
    catalog.insert("mem", Arc::new(MemExport::new(MIB)));
    catalog.insert("stuck", Arc::new(Stuck(MemExport::new(MIB))));
    let server = Server::new(catalog, Arc::new(AllowAll));
    let c = duplex_client(&server, "mem", None).await.unwrap();
    c.write(0, pattern(1, 512), false).await.unwrap();
    assert_eq!(c.read(0, 512).await.unwrap(), pattern(1, 512));
    let c = duplex_client(&server, "stuck", None).await.unwrap();
    c.write(0, pattern(1, 512), false).await.unwrap();
}
