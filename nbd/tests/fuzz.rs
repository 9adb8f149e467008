//! Fuzz targets (bolero). Under plain `cargo test` each target replays its committed corpus
//! (`tests/__fuzz__/<target>/corpus/`) and then runs random inputs for about a second;
//! for longer runs:
//!
//! ```text
//! BOLERO_RANDOM_TEST_TIME_MS=600000 cargo test -p tessera-nbd --release --test fuzz -- session
//! cargo install cargo-bolero && cargo bolero test -p tessera-nbd --test fuzz session   # libFuzzer, coverage-guided
//! ```
//!
//! Every target asserts "no panic"; the parsers assert they never consume more than they were
//! given nor reserve more than the caps; the session target runs a whole server connection over
//! an in-memory pipe and asserts it terminates and that its peak heap use stays under a bound
//! that does not depend on lengths the input declares.

use bytes::BytesMut;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;
use tessera_nbd::proto::*;
use tessera_nbd::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Per-thread heap accounting. The session target runs on a current-thread runtime, so every
// allocation made on behalf of the connection happens on the test thread.
// ---------------------------------------------------------------------------------------------

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    // `try_with`: thread-local storage may be gone during thread teardown.
    let _ = LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() {
                p.set(v)
            }
        });
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        account(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the peak heap growth on this thread while it ran.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, isize) {
    let start = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(start));
    let out = f();
    (out, PEAK.with(|p| p.get()) - start)
}

// ---------------------------------------------------------------------------------------------
// Parser targets
// ---------------------------------------------------------------------------------------------

#[test]
fn option_parser() {
    bolero::check!().for_each(|input: &[u8]| {
        let _ = parse_client_flags(input, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        let mut rest = input;
        while let Ok(Parse::Parsed { value, consumed }) = parse_option(rest) {
            assert!(consumed >= OPTION_HEADER_LEN && consumed <= rest.len());
            assert!(value.data.len() <= MAX_OPTION_DATA as usize);
            if let Ok(req) = OptionRequest::decode(&value) {
                // Whatever decodes re-encodes to something that decodes the same.
                if !matches!(req, OptionRequest::Abort | OptionRequest::Unsupported(_)) {
                    let mut buf = BytesMut::new();
                    req.encode(&mut buf);
                    match parse_option(&buf) {
                        Ok(Parse::Parsed { value, .. }) => {
                            assert_eq!(OptionRequest::decode(&value).as_ref(), Ok(&req))
                        }
                        other => panic!("re-encoded option does not parse: {other:?}"),
                    }
                }
            }
            rest = &rest[consumed..];
        }
    });
}

#[test]
fn request_parser() {
    bolero::check!().for_each(|input: &[u8]| {
        let decoder = RequestDecoder::default();
        let mut buf = BytesMut::new();
        // Feed in uneven chunks to exercise the incremental paths.
        let step = 1 + input.first().copied().unwrap_or(0) as usize % 64;
        for chunk in input.chunks(step) {
            buf.extend_from_slice(chunk);
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some((req, payload))) => {
                        assert_eq!(payload.is_some(), req.has_payload());
                        if let Some(p) = payload {
                            assert_eq!(p.len(), req.len as usize);
                        }
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
                // Reserved room never exceeds one header plus the payload cap (plus what was
                // fed).
                assert!(buf.capacity() <= input.len() + REQUEST_HEADER_LEN + MAX_PAYLOAD as usize);
            }
        }
        let _ = parse_request_header(input);
    });
}

#[test]
fn reply_parser() {
    bolero::check!().for_each(|input: &[u8]| {
        let _ = parse_server_greeting(input);
        let _ = parse_export_name_reply(input, input.first().is_some_and(|b| b & 1 == 1));
        let mut rest = input;
        while let Ok(Parse::Parsed { value, consumed }) = parse_option_reply(rest) {
            assert!(consumed >= OPTION_REPLY_HEADER_LEN && consumed <= rest.len());
            let mut buf = BytesMut::new();
            value.reply.encode(&mut buf, value.option);
            rest = &rest[consumed..];
        }
        let mut rest = input;
        while let Ok(Parse::Parsed { consumed, .. }) = parse_simple_reply(rest) {
            rest = &rest[consumed..];
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Whole-session target
// ---------------------------------------------------------------------------------------------

const EXPORT_SIZE: u64 = 1 << 20;
/// Peak heap growth allowed for one session: the read buffer may reserve one maximal WRITE
/// (32 MiB), in-flight payloads are capped by the byte budget (32 MiB here), plus the export
/// (1 MiB) and buffers. Allocation proportional to a declared 4 GiB length would blow this.
const SESSION_HEAP_LIMIT: isize = 80 << 20;

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
}

/// Input layout: byte 0 selects the mode, the rest is interpreted per mode:
/// * `0`: raw bytes from the first byte of the handshake;
/// * `1`: a valid handshake (flags, `NBD_OPT_GO "vol"`), then raw transmission bytes;
/// * `2`: a valid handshake, then the rest turned into well-framed requests (so random input
///   reaches the command paths);
/// * `3`: valid client flags, then raw option bytes, against a token-protected server.
pub fn session_bytes(input: &[u8]) -> (u8, Vec<u8>) {
    let (mode, rest) = match input.split_first() {
        Some((m, r)) => (m % 4, r),
        None => (0, input),
    };
    let mut out = BytesMut::new();
    let handshake = |out: &mut BytesMut| {
        out.extend_from_slice(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes());
        OptionRequest::Go(InfoRequest {
            name: "vol".into(),
            info_types: vec![NBD_INFO_BLOCK_SIZE],
        })
        .encode(out);
    };
    match mode {
        0 => out.extend_from_slice(rest),
        1 => {
            handshake(&mut out);
            out.extend_from_slice(rest);
        }
        2 => {
            handshake(&mut out);
            for c in rest.chunks(12) {
                let mut c = c.to_vec();
                c.resize(12, 0);
                let command = Command::from_u16(match c[0] % 10 {
                    9 => 0x77,
                    n => n as u16,
                });
                let flags = u16::from(c[1] & 0x3f);
                let mut offset = u64::from(u16::from_be_bytes([c[2], c[3]])) * 512;
                if c[1] & 0x80 != 0 {
                    offset += 1;
                }
                let len = if c[1] & 0x40 != 0 {
                    u32::from_be_bytes([c[4], c[5], c[6], c[7]])
                } else {
                    u32::from(c[4]) * 512
                };
                let handle = u64::from(u32::from_be_bytes([c[8], c[9], c[10], c[11]]));
                Request {
                    flags,
                    command,
                    handle,
                    offset,
                    len,
                }
                .encode(&mut out);
                if command == Command::Write && len <= 128 * 1024 {
                    out.extend(std::iter::repeat_n(c[0], len as usize));
                }
            }
        }
        _ => {
            out.extend_from_slice(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
            out.extend_from_slice(rest);
        }
    }
    (mode, out.to_vec())
}

async fn run_session(mode: u8, bytes: Vec<u8>) {
    let export = Arc::new(MemExport::new(EXPORT_SIZE));
    let table = Arc::new(RangeAuthorization::new());
    table.grant("node-a", "vol", 0..EXPORT_SIZE / 2, Permission::ReadWrite);
    let catalog = Arc::new(SimpleCatalog::new().with_authorization(table));
    catalog.insert("vol", export);
    let config = ServerConfig {
        max_in_flight: 8,
        max_in_flight_bytes: 0, // clamped up to one maximal payload
        handshake_timeout: Duration::from_secs(2),
        max_auth_failures: 3,
        shutdown_grace: Duration::from_secs(1),
    };
    let (mut client, server_end) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let shutdown = CancellationToken::new();
        let peer = PeerInfo::other("fuzz");
        if mode == 3 {
            let auth = TokenAuthenticator::new().with_principal("node-a", b"t".to_vec());
            serve_connection_with(server_end, &*catalog, &auth, peer, &config, &shutdown).await
        } else {
            // AllowAll's principal is "local", which has no grant: use a token-less
            // authenticator that names the peer "node-a" so requests reach the export.
            struct AsNodeA;
            impl Authenticator for AsNodeA {
                fn on_connect(&self, _p: &PeerInfo) -> Option<Principal> {
                    Some(Principal::new("node-a"))
                }
                fn authenticate(&self, _p: &PeerInfo, _n: &str, _t: &[u8]) -> Option<Principal> {
                    None
                }
            }
            serve_connection_with(server_end, &*catalog, &AsNodeA, peer, &config, &shutdown).await
        }
    });
    let (mut rd, mut wr) = tokio::io::split(&mut client);
    let feed = async {
        let _ = wr.write_all(&bytes).await;
        let _ = wr.shutdown().await;
    };
    let drain = async {
        let mut sink = vec![0u8; 64 * 1024];
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let both = async { tokio::join!(feed, drain) };
    tokio::time::timeout(Duration::from_secs(20), both)
        .await
        .expect("session did not terminate");
    match tokio::time::timeout(Duration::from_secs(20), server).await {
        Err(_) => panic!("server did not terminate"),
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(_) => {}
    }
}

#[test]
fn session() {
    bolero::check!().for_each(|input: &[u8]| {
        let (mode, bytes) = session_bytes(input);
        let ((), peak) = peak_during(|| RT.with(|rt| rt.block_on(run_session(mode, bytes))));
        assert!(
            peak <= SESSION_HEAP_LIMIT,
            "session used {peak} bytes of heap (limit {SESSION_HEAP_LIMIT})"
        );
    });
}

/// The session harness really reaches the export (guards against a harness that only ever
/// exercises the handshake).
#[test]
fn session_harness_reaches_transmission() {
    let mut input = vec![2u8];
    // WRITE 4 KiB at 0 (len byte 8 → 8 * 512), then READ it back.
    input.extend_from_slice(&[1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 1]);
    input.extend_from_slice(&[0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 2]);
    let (mode, bytes) = session_bytes(&input);
    let ((), peak) = peak_during(|| RT.with(|rt| rt.block_on(run_session(mode, bytes))));
    assert!(peak > EXPORT_SIZE as isize, "the export was never opened");
}

/// The heap accounting sees what the caps allow (a maximal WRITE reserves its payload) and no
/// more (a WRITE declaring 4 GiB is a disconnect, not an allocation).
#[test]
fn session_heap_accounting_sees_declared_payloads() {
    let declared = |len: u32| {
        let mut input = vec![1u8];
        let mut b = BytesMut::new();
        Request {
            flags: 0,
            command: Command::Write,
            handle: 1,
            offset: 0,
            len,
        }
        .encode(&mut b);
        input.extend_from_slice(&b);
        let (mode, bytes) = session_bytes(&input);
        peak_during(|| RT.with(|rt| rt.block_on(run_session(mode, bytes)))).1
    };
    let max = declared(MAX_PAYLOAD);
    assert!(
        max >= MAX_PAYLOAD as isize && max <= SESSION_HEAP_LIMIT,
        "{max}"
    );
    let huge = declared(u32::MAX);
    assert!(huge < 8 << 20, "{huge}");
}

/// Writes the seed corpus (run by hand: `cargo test -p tessera-nbd --test fuzz -- --ignored`).
#[test]
#[ignore = "a tool, not a test: regenerates the committed seed corpus"]
fn write_seed_corpus() {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/__fuzz__");
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = base.join(target).join("corpus");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    let opt = |req: OptionRequest| {
        let mut b = BytesMut::new();
        req.encode(&mut b);
        b.to_vec()
    };
    let go = OptionRequest::Go(InfoRequest {
        name: "vol".into(),
        info_types: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, NBD_INFO_DESCRIPTION],
    });
    let auth = OptionRequest::Auth(AuthRequest {
        principal: "node-a".into(),
        token: b"t".to_vec(),
    });
    let mut options = Vec::new();
    for r in [
        OptionRequest::List,
        OptionRequest::StructuredReply,
        OptionRequest::Info(InfoRequest {
            name: "vol".into(),
            info_types: vec![],
        }),
        auth.clone(),
        OptionRequest::Unsupported(NBD_OPT_EXTENDED_HEADERS),
        go.clone(),
    ] {
        options.extend(opt(r));
    }
    write("option_parser", "negotiation", &options);
    write(
        "option_parser",
        "export_name",
        &opt(OptionRequest::ExportName("vol".into())),
    );
    write("option_parser", "abort", &opt(OptionRequest::Abort));

    let req = |command: Command, flags: u16, handle: u64, offset: u64, len: u32| {
        let mut b = BytesMut::new();
        Request {
            flags,
            command,
            handle,
            offset,
            len,
        }
        .encode(&mut b);
        b.to_vec()
    };
    let mut reqs = req(Command::Write, NBD_CMD_FLAG_FUA, 1, 0, 512);
    reqs.extend(vec![0xab; 512]);
    reqs.extend(req(Command::Read, 0, 2, 0, 512));
    reqs.extend(req(Command::Flush, 0, 3, 0, 0));
    reqs.extend(req(Command::Trim, 0, 4, 512, 512));
    reqs.extend(req(
        Command::WriteZeroes,
        NBD_CMD_FLAG_NO_HOLE,
        5,
        1024,
        4096,
    ));
    reqs.extend(req(Command::Disc, 0, 6, 0, 0));
    write("request_parser", "commands", &reqs);
    write(
        "request_parser",
        "huge_write",
        &req(Command::Write, 0, 1, 0, u32::MAX),
    );

    let mut replies = BytesMut::new();
    encode_server_greeting(&mut replies, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    write("reply_parser", "greeting", &replies);
    let mut replies = BytesMut::new();
    for r in [
        OptionReply::Info(InfoReply::Export {
            size: 1 << 20,
            flags: 0x16d,
        }),
        OptionReply::Info(InfoReply::BlockSize {
            min: 512,
            preferred: 4096,
            max: MAX_PAYLOAD,
        }),
        OptionReply::Server {
            name: "vol".into(),
            description: "d".into(),
        },
        OptionReply::error(NBD_REP_ERR_POLICY, "no"),
        OptionReply::Ack,
    ] {
        r.encode(&mut replies, NBD_OPT_GO);
    }
    write("reply_parser", "option_replies", &replies);

    // Session seeds (mode byte first, see `session_bytes`).
    let mut s = vec![0u8];
    s.extend((NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes());
    s.extend(&options);
    s.extend(&reqs);
    write("session", "raw_full", &s);
    let mut s = vec![1u8];
    s.extend(&reqs);
    write("session", "raw_transmission", &s);
    let mut s = vec![2u8];
    for (cmd, flags, off, len) in [
        (1u8, 1u8, 0u8, 8u8),
        (0, 0, 0, 8),
        (3, 0, 0, 0),
        (4, 0, 4, 1),
        (6, 2, 8, 2),
        (1, 0, 0x40, 1),
        (9, 0, 0, 0),
        (2, 0, 0, 0),
    ] {
        s.extend([cmd, flags, 0, off, len, 0, 0, 0, 0, 0, 0, cmd]);
    }
    write("session", "structured", &s);
    let mut s = vec![3u8];
    s.extend(opt(OptionRequest::List));
    s.extend(opt(auth));
    s.extend(opt(go));
    s.extend(req(Command::Read, 0, 1, 0, 512));
    write("session", "token_auth", &s);
}
