//! Helpers shared by the integration tests.
#![allow(dead_code)]

use bytes::{Buf, Bytes, BytesMut};
use std::sync::Arc;
use tessera_nbd::proto::*;
use tessera_nbd::{
    AllowAll, Authenticator, CancellationToken, ClientConfig, Credentials, ExportCatalog,
    MemExport, NbdClient, PeerInfo, Server, SimpleCatalog,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

pub const MIB: u64 = 1 << 20;

/// A catalog with one `MemExport` named `vol`.
pub fn mem_catalog(size: u64) -> (Arc<MemExport>, Arc<SimpleCatalog<MemExport>>) {
    let export = Arc::new(MemExport::new(size));
    let catalog = Arc::new(SimpleCatalog::new());
    catalog.insert_with_description("vol", export.clone(), "test volume");
    (export, catalog)
}

/// Serves one connection over an in-memory pipe; returns the client end.
pub fn serve_duplex<C, A>(server: &Server<C, A>) -> DuplexStream
where
    C: ExportCatalog + 'static,
    A: Authenticator + 'static,
{
    let (client, server_end) = tokio::io::duplex(1 << 20);
    let server = server.clone();
    tokio::spawn(async move {
        let _ = server
            .serve_connection(
                server_end,
                PeerInfo::other("duplex"),
                &CancellationToken::new(),
            )
            .await;
    });
    client
}

pub async fn duplex_client<C, A>(
    server: &Server<C, A>,
    export: &str,
    creds: Option<&Credentials>,
) -> Result<NbdClient, tessera_nbd::ClientError>
where
    C: ExportCatalog + 'static,
    A: Authenticator + 'static,
{
    NbdClient::from_stream(serve_duplex(server), export, creds, ClientConfig::default()).await
}

pub fn allow_all_server(size: u64) -> (Arc<MemExport>, Server<SimpleCatalog<MemExport>, AllowAll>) {
    let (export, catalog) = mem_catalog(size);
    (export, Server::new(catalog, Arc::new(AllowAll)))
}

/// Deterministic test pattern.
pub fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// A hand-driven protocol peer, for checking server behaviour our client never provokes.
pub struct RawClient {
    pub io: DuplexStream,
    pub rbuf: BytesMut,
}

impl RawClient {
    pub fn new(io: DuplexStream) -> Self {
        Self {
            io,
            rbuf: BytesMut::new(),
        }
    }

    async fn fill(&mut self) -> bool {
        self.rbuf.reserve(4096);
        matches!(self.io.read_buf(&mut self.rbuf).await, Ok(n) if n > 0)
    }

    /// Greeting + client flags; returns the server's handshake flags.
    pub async fn greet(&mut self, client_flags: u32) -> u16 {
        let flags = loop {
            match parse_server_greeting(&self.rbuf).unwrap() {
                Parse::Parsed { value, consumed } => {
                    self.rbuf.advance(consumed);
                    break value;
                }
                Parse::Incomplete { .. } => assert!(self.fill().await, "EOF in greeting"),
            }
        };
        self.io
            .write_all(&client_flags.to_be_bytes())
            .await
            .unwrap();
        flags
    }

    pub async fn send_option(&mut self, req: &OptionRequest) {
        let mut b = BytesMut::new();
        req.encode(&mut b);
        self.io.write_all(&b).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// Next option reply, or `None` on EOF.
    pub async fn option_reply(&mut self) -> Option<OptionReplyFrame> {
        loop {
            match parse_option_reply(&self.rbuf).unwrap() {
                Parse::Parsed { value, consumed } => {
                    self.rbuf.advance(consumed);
                    return Some(value);
                }
                Parse::Incomplete { .. } => {
                    if !self.fill().await {
                        return None;
                    }
                }
            }
        }
    }

    /// Option replies up to and including the final one (ACK or error).
    pub async fn option_replies(&mut self) -> Vec<OptionReply> {
        let mut out = Vec::new();
        loop {
            let r = self
                .option_reply()
                .await
                .expect("EOF during option replies")
                .reply;
            let last = matches!(r, OptionReply::Ack | OptionReply::Error { .. });
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// Full handshake into transmission for `name`; returns (size, flags).
    pub async fn go(&mut self, name: &str) -> (u64, u16) {
        self.greet(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
            .await;
        self.send_option(&OptionRequest::Go(InfoRequest {
            name: name.into(),
            info_types: vec![NBD_INFO_BLOCK_SIZE],
        }))
        .await;
        let mut export = None;
        for r in self.option_replies().await {
            match r {
                OptionReply::Info(InfoReply::Export { size, flags }) => {
                    export = Some((size, flags))
                }
                OptionReply::Ack => {}
                OptionReply::Info(_) => {}
                other => panic!("GO failed: {other:?}"),
            }
        }
        export.expect("no NBD_INFO_EXPORT")
    }

    pub async fn request(
        &mut self,
        command: Command,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = BytesMut::new();
        Request {
            flags,
            command,
            handle,
            offset,
            len,
        }
        .encode(&mut b);
        b.extend_from_slice(payload);
        self.io.write_all(&b).await.unwrap();
    }

    /// Next simple reply header, or `None` on EOF.
    pub async fn reply(&mut self) -> Option<SimpleReply> {
        loop {
            match parse_simple_reply(&self.rbuf).unwrap() {
                Parse::Parsed { value, consumed } => {
                    self.rbuf.advance(consumed);
                    return Some(value);
                }
                Parse::Incomplete { .. } => {
                    if !self.fill().await {
                        return None;
                    }
                }
            }
        }
    }

    pub async fn data(&mut self, n: usize) -> Bytes {
        while self.rbuf.len() < n {
            assert!(self.fill().await, "EOF in reply data");
        }
        self.rbuf.split_to(n).freeze()
    }

    /// Whether the server closed the connection (reads EOF).
    pub async fn at_eof(&mut self) -> bool {
        !self.fill().await && self.rbuf.is_empty()
    }
}
