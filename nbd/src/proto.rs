//! Sans-I/O codec for the NBD protocol (fixed newstyle handshake, simple replies).
//!
//! Everything here works on byte slices and [`BytesMut`]; nothing does I/O. Parsers never panic on
//! any input and never allocate more than a fixed cap regardless of the lengths a peer declares:
//! they return [`Parse::Incomplete`] until a whole message is present, [`Parse::Parsed`] with the
//! number of bytes consumed, or a typed [`ProtoError`] for input that cannot be resynchronised
//! (after which the connection must be dropped — a "hard disconnect" in the spec's words).
//!
//! Section references ("spec §…") are to the NBD protocol document, `doc/proto.md` in the
//! NetworkBlockDevice/nbd repository (public domain).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;

// ---------------------------------------------------------------------------------------------
// Magic numbers (spec §"Newstyle negotiation", §"Request message", §"Simple reply message").
// ---------------------------------------------------------------------------------------------

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second greeting word of newstyle negotiation, and the prefix of every option.
pub const NBD_IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Second greeting word of the (unsupported) oldstyle negotiation.
pub const NBD_CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of structured reply chunks (never negotiated by this crate; recognised to give a clear
/// error).
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server, 16 bits) and client flags (32 bits) — spec §"Handshake flags".
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this implementation understands; anything else must drop the connection.
pub const NBD_FLAG_C_KNOWN: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

// Transmission flags (16 bits) — spec §"Transmission flags".
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Option types — spec §"Option types".
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;
/// Tessera's private authentication option.
///
/// NBD defines no authentication option (spec §"Certificates, authentication and authorisation"
/// leaves it to implementations) and reserves no experimental range, so we use a number far above
/// the registered ones (ASCII `tA` in the high half). Standard servers answer it with
/// `NBD_REP_ERR_UNSUP`, standard clients never send it. Data: 16-bit principal length, principal
/// (UTF-8), then the secret token (the rest of the option data).
pub const NBD_OPT_TESSERA_AUTH: u32 = 0x7441_0001;

// Option reply types — spec §"Option reply types".
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks every error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// Information types for NBD_REP_INFO — spec §"NBD_REP_INFO".
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// Command types — spec §"Request types".
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
pub const NBD_CMD_RESIZE: u16 = 8;

// Command flags — spec §"Command flags".
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------------------------
// Sizes and caps.
// ---------------------------------------------------------------------------------------------

/// Server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags.
pub const SERVER_GREETING_LEN: usize = 18;
/// Client flags: 32 bits.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Option header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Simple reply header.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// Reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless NO_ZEROES.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
pub const EXPORT_NAME_REPLY_ZEROES: usize = 124;

/// Largest string the spec allows (export names, descriptions, messages): 4096 bytes
/// (spec §"Conventions").
pub const MAX_STRING_LEN: usize = 4096;
/// Largest option data we accept. 4 KiB would be enough for every option except
/// `NBD_OPT_GO`/`NBD_OPT_INFO`, whose data is a 4-byte length, a name of up to
/// [`MAX_STRING_LEN`] bytes, and a list of 16-bit information requests; 8 KiB covers that with
/// room for the list while still bounding what an unauthenticated peer can make us buffer.
pub const MAX_OPTION_DATA: u32 = 8 * 1024;
/// Largest option reply data a client accepts: an `NBD_REP_SERVER` carries a name and a
/// description of up to 4096 bytes each.
pub const MAX_OPTION_REPLY_DATA: u32 = 16 * 1024;
/// Largest READ/WRITE payload: 2^25 bytes, the size the spec says must never be treated as a
/// denial of service (spec §"Block size constraints"), and our advertised maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest principal name in `NBD_OPT_TESSERA_AUTH`.
pub const MAX_PRINCIPAL_LEN: usize = 256;

// ---------------------------------------------------------------------------------------------
// Errors and parse results.
// ---------------------------------------------------------------------------------------------

/// Outcome of an incremental parse over a byte slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse<T> {
    /// Not enough input: at least `needed` bytes (in total, from the start of the slice) are
    /// required before the parse can make progress.
    Incomplete { needed: usize },
    /// A complete message, and the number of bytes of input it consumed.
    Parsed { value: T, consumed: usize },
}

impl<T> Parse<T> {
    /// Maps the parsed value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Parse<U> {
        match self {
            Parse::Incomplete { needed } => Parse::Incomplete { needed },
            Parse::Parsed { value, consumed } => Parse::Parsed {
                value: f(value),
                consumed,
            },
        }
    }
}

/// Input that breaks the framing of the protocol: the stream cannot be resynchronised and the
/// connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic: expected {expected:#x}, found {found:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("server uses the oldstyle handshake, which is not supported")]
    OldstyleServer,
    #[error("server does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option {option} carries {len} bytes of data, more than the {max} byte limit")]
    OptionTooLarge { option: u32, len: u32, max: u32 },
    #[error("option reply carries {len} bytes of data, more than the {max} byte limit")]
    OptionReplyTooLarge { len: u32, max: u32 },
    #[error("request payload of {len} bytes exceeds the {max} byte limit")]
    PayloadTooLarge { len: u32, max: u32 },
    #[error("structured reply received although structured replies were not negotiated")]
    UnexpectedStructuredReply,
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// An option whose framing was fine but whose data is invalid; the server answers it with
/// `NBD_REP_ERR_INVALID` (or `NBD_REP_ERR_TOO_BIG`) and the negotiation continues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid option data: {reason}")]
pub struct OptionDataError {
    pub reason: &'static str,
    /// Whether the right reply is `NBD_REP_ERR_TOO_BIG` rather than `NBD_REP_ERR_INVALID`.
    pub too_big: bool,
}

impl OptionDataError {
    fn invalid(reason: &'static str) -> Self {
        Self {
            reason,
            too_big: false,
        }
    }
    fn too_big(reason: &'static str) -> Self {
        Self {
            reason,
            too_big: true,
        }
    }
}

/// NBD error values carried in simple replies (spec §"Error values").
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

impl Errno {
    pub const EPERM: Errno = Errno(1);
    pub const EIO: Errno = Errno(5);
    pub const ENOMEM: Errno = Errno(12);
    pub const EINVAL: Errno = Errno(22);
    pub const ENOSPC: Errno = Errno(28);
    pub const EOVERFLOW: Errno = Errno(75);
    pub const ENOTSUP: Errno = Errno(95);
    pub const ESHUTDOWN: Errno = Errno(108);

    /// The symbolic name, or `None` for values the spec does not define (a client treats those
    /// as `EINVAL`, spec §"Error values").
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Errno::EPERM => "EPERM",
            Errno::EIO => "EIO",
            Errno::ENOMEM => "ENOMEM",
            Errno::EINVAL => "EINVAL",
            Errno::ENOSPC => "ENOSPC",
            Errno::EOVERFLOW => "EOVERFLOW",
            Errno::ENOTSUP => "ENOTSUP",
            Errno::ESHUTDOWN => "ESHUTDOWN",
            _ => return None,
        })
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "NBD_{name}"),
            None => write!(f, "NBD error {}", self.0),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A bounds-checked big-endian reader (no panics on short input).
// ---------------------------------------------------------------------------------------------

struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (head, rest) = self.0.split_first_chunk::<2>()?;
        self.0 = rest;
        Some(u16::from_be_bytes(*head))
    }
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*head))
    }
    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_be_bytes(*head))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn string(bytes: &[u8]) -> Result<String, OptionDataError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionDataError::too_big("string longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(OptionDataError::invalid("string contains NUL"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| OptionDataError::invalid("string is not UTF-8"))
}

/// Lossy string decoding for text a client merely displays (descriptions, error messages).
fn display_string(bytes: &[u8]) -> String {
    let bytes = &bytes[..bytes.len().min(MAX_STRING_LEN)];
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Handshake: greeting and client flags.
// ---------------------------------------------------------------------------------------------

/// Encodes the server's newstyle greeting.
pub fn encode_server_greeting(buf: &mut BytesMut, handshake_flags: u16) {
    buf.put_u64(NBD_MAGIC);
    buf.put_u64(NBD_IHAVEOPT);
    buf.put_u16(handshake_flags);
}

/// Parses the server greeting (client side) and returns the handshake flags.
pub fn parse_server_greeting(buf: &[u8]) -> Result<Parse<u16>, ProtoError> {
    if buf.len() < 16 {
        return Ok(Parse::Incomplete { needed: 16 });
    }
    let mut rd = Rd(buf);
    let magic = rd.u64().unwrap_or_default();
    if magic != NBD_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: NBD_MAGIC,
            found: magic,
        });
    }
    match rd.u64().unwrap_or_default() {
        NBD_IHAVEOPT => {}
        NBD_CLISERV_MAGIC => return Err(ProtoError::OldstyleServer),
        found => {
            return Err(ProtoError::BadMagic {
                expected: NBD_IHAVEOPT,
                found,
            });
        }
    }
    let Some(flags) = rd.u16() else {
        return Ok(Parse::Incomplete {
            needed: SERVER_GREETING_LEN,
        });
    };
    Ok(Parse::Parsed {
        value: flags,
        consumed: SERVER_GREETING_LEN,
    })
}

/// Encodes the client's flags.
pub fn encode_client_flags(buf: &mut BytesMut, flags: u32) {
    buf.put_u32(flags);
}

/// Parses the client flags (server side). Unknown flags are an error: the server "MUST drop the
/// TCP connection if the client sets an unknown flag" (spec §"Client flags").
pub fn parse_client_flags(buf: &[u8], server_flags: u16) -> Result<Parse<u32>, ProtoError> {
    let Some(flags) = Rd(buf).u32() else {
        return Ok(Parse::Incomplete {
            needed: CLIENT_FLAGS_LEN,
        });
    };
    let mut allowed = NBD_FLAG_C_FIXED_NEWSTYLE;
    if server_flags & NBD_FLAG_NO_ZEROES != 0 {
        allowed |= NBD_FLAG_C_NO_ZEROES;
    }
    if flags & !allowed != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(Parse::Parsed {
        value: flags,
        consumed: CLIENT_FLAGS_LEN,
    })
}

// ---------------------------------------------------------------------------------------------
// Options (client → server).
// ---------------------------------------------------------------------------------------------

/// One framed option: its number and raw data (at most [`MAX_OPTION_DATA`] bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawOption<'a> {
    pub option: u32,
    pub data: &'a [u8],
}

/// Parses one option frame. Data longer than [`MAX_OPTION_DATA`] is a framing error: we refuse
/// to buffer (or skip) arbitrary amounts of data from a peer that may not be authenticated.
pub fn parse_option(buf: &[u8]) -> Result<Parse<RawOption<'_>>, ProtoError> {
    parse_option_with_limit(buf, MAX_OPTION_DATA)
}

/// [`parse_option`] with an explicit data limit.
pub fn parse_option_with_limit(buf: &[u8], max: u32) -> Result<Parse<RawOption<'_>>, ProtoError> {
    let mut rd = Rd(buf);
    let (Some(magic), Some(option), Some(len)) = (rd.u64(), rd.u32(), rd.u32()) else {
        return Ok(Parse::Incomplete {
            needed: OPTION_HEADER_LEN,
        });
    };
    if magic != NBD_IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: NBD_IHAVEOPT,
            found: magic,
        });
    }
    if len > max {
        return Err(ProtoError::OptionTooLarge { option, len, max });
    }
    let total = OPTION_HEADER_LEN + len as usize;
    match rd.bytes(len as usize) {
        Some(data) => Ok(Parse::Parsed {
            value: RawOption { option, data },
            consumed: total,
        }),
        None => Ok(Parse::Incomplete { needed: total }),
    }
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO` (spec §"NBD_OPT_INFO and NBD_OPT_GO").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub info_types: Vec<u16>,
}

/// Credentials carried by [`NBD_OPT_TESSERA_AUTH`].
#[derive(Clone, PartialEq, Eq)]
pub struct AuthRequest {
    pub principal: String,
    pub token: Vec<u8>,
}

impl fmt::Debug for AuthRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never log the secret.
        f.debug_struct("AuthRequest")
            .field("principal", &self.principal)
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .finish()
    }
}

/// A decoded option request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    Auth(AuthRequest),
    /// Any option this implementation does not implement (answered with `NBD_REP_ERR_UNSUP`).
    Unsupported(u32),
}

impl OptionRequest {
    /// The option number this request was sent as.
    pub fn option(&self) -> u32 {
        match self {
            OptionRequest::ExportName(_) => NBD_OPT_EXPORT_NAME,
            OptionRequest::Abort => NBD_OPT_ABORT,
            OptionRequest::List => NBD_OPT_LIST,
            OptionRequest::StartTls => NBD_OPT_STARTTLS,
            OptionRequest::Info(_) => NBD_OPT_INFO,
            OptionRequest::Go(_) => NBD_OPT_GO,
            OptionRequest::StructuredReply => NBD_OPT_STRUCTURED_REPLY,
            OptionRequest::Auth(_) => NBD_OPT_TESSERA_AUTH,
            OptionRequest::Unsupported(o) => *o,
        }
    }

    /// Decodes the data of a framed option.
    pub fn decode(raw: &RawOption<'_>) -> Result<OptionRequest, OptionDataError> {
        let data = raw.data;
        Ok(match raw.option {
            NBD_OPT_EXPORT_NAME => OptionRequest::ExportName(string(data)?),
            // "a server SHOULD ignore any data sent by the client" (spec §NBD_OPT_ABORT).
            NBD_OPT_ABORT => OptionRequest::Abort,
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    return Err(OptionDataError::invalid("NBD_OPT_LIST carries data"));
                }
                OptionRequest::List
            }
            NBD_OPT_STARTTLS => {
                if !data.is_empty() {
                    return Err(OptionDataError::invalid("NBD_OPT_STARTTLS carries data"));
                }
                OptionRequest::StartTls
            }
            NBD_OPT_INFO => OptionRequest::Info(decode_info_request(data)?),
            NBD_OPT_GO => OptionRequest::Go(decode_info_request(data)?),
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return Err(OptionDataError::invalid(
                        "NBD_OPT_STRUCTURED_REPLY carries data",
                    ));
                }
                OptionRequest::StructuredReply
            }
            NBD_OPT_TESSERA_AUTH => {
                let mut rd = Rd(data);
                let len = rd
                    .u16()
                    .ok_or(OptionDataError::invalid("auth data too short"))?;
                if len as usize > MAX_PRINCIPAL_LEN {
                    return Err(OptionDataError::too_big("principal name too long"));
                }
                let principal = rd
                    .bytes(len as usize)
                    .ok_or(OptionDataError::invalid("principal exceeds option data"))?;
                let principal = string(principal)?;
                OptionRequest::Auth(AuthRequest {
                    principal,
                    token: rd.rest().to_vec(),
                })
            }
            other => OptionRequest::Unsupported(other),
        })
    }

    /// Encodes this request as an option frame.
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut data = BytesMut::new();
        match self {
            OptionRequest::ExportName(name) => data.put_slice(name.as_bytes()),
            OptionRequest::Abort
            | OptionRequest::List
            | OptionRequest::StartTls
            | OptionRequest::StructuredReply
            | OptionRequest::Unsupported(_) => {}
            OptionRequest::Info(req) | OptionRequest::Go(req) => {
                data.put_u32(req.name.len() as u32);
                data.put_slice(req.name.as_bytes());
                data.put_u16(req.info_types.len() as u16);
                for t in &req.info_types {
                    data.put_u16(*t);
                }
            }
            OptionRequest::Auth(auth) => {
                data.put_u16(auth.principal.len() as u16);
                data.put_slice(auth.principal.as_bytes());
                data.put_slice(&auth.token);
            }
        }
        encode_option(buf, self.option(), &data);
    }
}

/// Encodes an option frame with arbitrary data.
pub fn encode_option(buf: &mut BytesMut, option: u32, data: &[u8]) {
    buf.reserve(OPTION_HEADER_LEN + data.len());
    buf.put_u64(NBD_IHAVEOPT);
    buf.put_u32(option);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

fn decode_info_request(data: &[u8]) -> Result<InfoRequest, OptionDataError> {
    let mut rd = Rd(data);
    let name_len = rd
        .u32()
        .ok_or(OptionDataError::invalid("info request too short"))?;
    // "MUST be no larger than the option data length - 6" (spec §NBD_OPT_INFO).
    if name_len as usize > data.len().saturating_sub(6) {
        return Err(OptionDataError::invalid("name length exceeds option data"));
    }
    let name = rd
        .bytes(name_len as usize)
        .ok_or(OptionDataError::invalid("name exceeds option data"))?;
    let name = string(name)?;
    let count = rd.u16().ok_or(OptionDataError::invalid(
        "missing information request count",
    ))?;
    // The count is attacker-controlled: check it against the bytes actually present before
    // allocating anything for it.
    if rd.0.len() != count as usize * 2 {
        return Err(OptionDataError::invalid(
            "information request count does not match option length",
        ));
    }
    let mut info_types = Vec::with_capacity(count as usize);
    while let Some(t) = rd.u16() {
        info_types.push(t);
    }
    debug_assert!(rd.is_empty());
    Ok(InfoRequest { name, info_types })
}

// ---------------------------------------------------------------------------------------------
// Option replies (server → client).
// ---------------------------------------------------------------------------------------------

/// An `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// An information type this implementation does not know (clients MUST ignore it).
    Unknown {
        info_type: u16,
    },
}

/// A decoded option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply {
    Ack,
    Server {
        name: String,
        description: String,
    },
    Info(InfoReply),
    /// An error reply: the `NBD_REP_ERR_*` type and the optional human-readable message.
    Error {
        reply_type: u32,
        message: String,
    },
    /// A non-error reply type we do not know.
    Unknown {
        reply_type: u32,
    },
}

/// One framed option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReplyFrame {
    pub option: u32,
    pub reply: OptionReply,
}

/// Encodes an option reply header followed by `data`.
pub fn encode_option_reply(buf: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    buf.reserve(OPTION_REPLY_HEADER_LEN + data.len());
    buf.put_u64(NBD_REP_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply_type);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

impl OptionReply {
    /// Encodes this reply to `option`.
    pub fn encode(&self, buf: &mut BytesMut, option: u32) {
        let mut data = BytesMut::new();
        let reply_type = match self {
            OptionReply::Ack => NBD_REP_ACK,
            OptionReply::Server { name, description } => {
                data.put_u32(name.len() as u32);
                data.put_slice(name.as_bytes());
                data.put_slice(description.as_bytes());
                NBD_REP_SERVER
            }
            OptionReply::Info(info) => {
                match info {
                    InfoReply::Export { size, flags } => {
                        data.put_u16(NBD_INFO_EXPORT);
                        data.put_u64(*size);
                        data.put_u16(*flags);
                    }
                    InfoReply::Name(name) => {
                        data.put_u16(NBD_INFO_NAME);
                        data.put_slice(name.as_bytes());
                    }
                    InfoReply::Description(d) => {
                        data.put_u16(NBD_INFO_DESCRIPTION);
                        data.put_slice(d.as_bytes());
                    }
                    InfoReply::BlockSize {
                        min,
                        preferred,
                        max,
                    } => {
                        data.put_u16(NBD_INFO_BLOCK_SIZE);
                        data.put_u32(*min);
                        data.put_u32(*preferred);
                        data.put_u32(*max);
                    }
                    InfoReply::Unknown { info_type } => data.put_u16(*info_type),
                }
                NBD_REP_INFO
            }
            OptionReply::Error {
                reply_type,
                message,
            } => {
                let m = message.as_bytes();
                data.put_slice(&m[..m.len().min(MAX_STRING_LEN)]);
                *reply_type
            }
            OptionReply::Unknown { reply_type } => *reply_type,
        };
        encode_option_reply(buf, option, reply_type, &data);
    }

    /// Builds an error reply.
    pub fn error(reply_type: u32, message: impl Into<String>) -> Self {
        OptionReply::Error {
            reply_type,
            message: message.into(),
        }
    }
}

/// Parses one option reply (client side). Replies whose data exceeds
/// [`MAX_OPTION_REPLY_DATA`] are a framing error.
pub fn parse_option_reply(buf: &[u8]) -> Result<Parse<OptionReplyFrame>, ProtoError> {
    let mut rd = Rd(buf);
    let (Some(magic), Some(option), Some(reply_type), Some(len)) =
        (rd.u64(), rd.u32(), rd.u32(), rd.u32())
    else {
        return Ok(Parse::Incomplete {
            needed: OPTION_REPLY_HEADER_LEN,
        });
    };
    if magic != NBD_REP_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: NBD_REP_MAGIC,
            found: magic,
        });
    }
    if len > MAX_OPTION_REPLY_DATA {
        return Err(ProtoError::OptionReplyTooLarge {
            len,
            max: MAX_OPTION_REPLY_DATA,
        });
    }
    let total = OPTION_REPLY_HEADER_LEN + len as usize;
    let Some(data) = rd.bytes(len as usize) else {
        return Ok(Parse::Incomplete { needed: total });
    };
    let reply = decode_option_reply(reply_type, data)?;
    Ok(Parse::Parsed {
        value: OptionReplyFrame { option, reply },
        consumed: total,
    })
}

fn decode_option_reply(reply_type: u32, data: &[u8]) -> Result<OptionReply, ProtoError> {
    let mut rd = Rd(data);
    Ok(match reply_type {
        NBD_REP_ACK => OptionReply::Ack,
        NBD_REP_SERVER => {
            let len = rd
                .u32()
                .ok_or(ProtoError::Malformed("NBD_REP_SERVER too short"))?;
            let name = rd
                .bytes(len as usize)
                .ok_or(ProtoError::Malformed("NBD_REP_SERVER name exceeds reply"))?;
            OptionReply::Server {
                name: display_string(name),
                description: display_string(rd.rest()),
            }
        }
        NBD_REP_INFO => {
            let info_type = rd
                .u16()
                .ok_or(ProtoError::Malformed("NBD_REP_INFO too short"))?;
            let info = match info_type {
                NBD_INFO_EXPORT => {
                    let (Some(size), Some(flags), true) = (rd.u64(), rd.u16(), rd.is_empty())
                    else {
                        return Err(ProtoError::Malformed("NBD_INFO_EXPORT length is not 12"));
                    };
                    InfoReply::Export { size, flags }
                }
                NBD_INFO_NAME => InfoReply::Name(display_string(rd.rest())),
                NBD_INFO_DESCRIPTION => InfoReply::Description(display_string(rd.rest())),
                NBD_INFO_BLOCK_SIZE => {
                    let (Some(min), Some(preferred), Some(max), true) =
                        (rd.u32(), rd.u32(), rd.u32(), rd.is_empty())
                    else {
                        return Err(ProtoError::Malformed(
                            "NBD_INFO_BLOCK_SIZE length is not 14",
                        ));
                    };
                    InfoReply::BlockSize {
                        min,
                        preferred,
                        max,
                    }
                }
                info_type => InfoReply::Unknown { info_type },
            };
            OptionReply::Info(info)
        }
        t if t & NBD_REP_FLAG_ERROR != 0 => OptionReply::Error {
            reply_type: t,
            message: display_string(data),
        },
        t => OptionReply::Unknown { reply_type: t },
    })
}

/// Encodes the reply to `NBD_OPT_EXPORT_NAME` (spec §"Newstyle negotiation").
pub fn encode_export_name_reply(buf: &mut BytesMut, size: u64, flags: u16, no_zeroes: bool) {
    buf.put_u64(size);
    buf.put_u16(flags);
    if !no_zeroes {
        buf.put_bytes(0, EXPORT_NAME_REPLY_ZEROES);
    }
}

/// Parses the reply to `NBD_OPT_EXPORT_NAME` (client side): `(size, transmission flags)`.
pub fn parse_export_name_reply(buf: &[u8], no_zeroes: bool) -> Parse<(u64, u16)> {
    let total = EXPORT_NAME_REPLY_LEN
        + if no_zeroes {
            0
        } else {
            EXPORT_NAME_REPLY_ZEROES
        };
    let mut rd = Rd(buf);
    match (rd.u64(), rd.u16()) {
        (Some(size), Some(flags)) if buf.len() >= total => Parse::Parsed {
            value: (size, flags),
            consumed: total,
        },
        _ => Parse::Incomplete { needed: total },
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests and simple replies.
// ---------------------------------------------------------------------------------------------

/// A transmission command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Resize,
    Unknown(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Command {
        match v {
            NBD_CMD_READ => Command::Read,
            NBD_CMD_WRITE => Command::Write,
            NBD_CMD_DISC => Command::Disc,
            NBD_CMD_FLUSH => Command::Flush,
            NBD_CMD_TRIM => Command::Trim,
            NBD_CMD_CACHE => Command::Cache,
            NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Command::BlockStatus,
            NBD_CMD_RESIZE => Command::Resize,
            other => Command::Unknown(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => NBD_CMD_READ,
            Command::Write => NBD_CMD_WRITE,
            Command::Disc => NBD_CMD_DISC,
            Command::Flush => NBD_CMD_FLUSH,
            Command::Trim => NBD_CMD_TRIM,
            Command::Cache => NBD_CMD_CACHE,
            Command::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Command::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Command::Resize => NBD_CMD_RESIZE,
            Command::Unknown(v) => v,
        }
    }
}

/// A transmission request header (the payload of a WRITE travels separately).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    /// The client's opaque handle ("cookie"), echoed in the reply.
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Whether the request is followed by `len` bytes of payload.
    pub fn has_payload(&self) -> bool {
        self.command == Command::Write
    }

    /// Encodes the 28-byte header (not the payload).
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(REQUEST_HEADER_LEN);
        buf.put_u32(NBD_REQUEST_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.command.to_u16());
        buf.put_u64(self.handle);
        buf.put_u64(self.offset);
        buf.put_u32(self.len);
    }
}

/// Parses a request header. The payload of a WRITE is not part of this parse; use
/// [`RequestDecoder`] to get header and payload together.
pub fn parse_request_header(buf: &[u8]) -> Result<Parse<Request>, ProtoError> {
    let mut rd = Rd(buf);
    let (Some(magic), Some(flags), Some(cmd), Some(handle), Some(offset), Some(len)) =
        (rd.u32(), rd.u16(), rd.u16(), rd.u64(), rd.u64(), rd.u32())
    else {
        return Ok(Parse::Incomplete {
            needed: REQUEST_HEADER_LEN,
        });
    };
    if magic != NBD_REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: NBD_REQUEST_MAGIC.into(),
            found: magic.into(),
        });
    }
    Ok(Parse::Parsed {
        value: Request {
            flags,
            command: Command::from_u16(cmd),
            handle,
            offset,
            len,
        },
        consumed: REQUEST_HEADER_LEN,
    })
}

/// Incremental decoder of requests with their payload, over a [`BytesMut`] read buffer.
///
/// A WRITE payload is returned as a [`Bytes`] split off the read buffer (no copy). The decoder
/// reserves room for the whole payload once the header is seen, which is bounded by
/// `max_payload`; a WRITE declaring more is a [`ProtoError::PayloadTooLarge`] — the spec lets a
/// server hard-disconnect when a WRITE payload "would be large enough to be deemed a denial of
/// service attack" (spec §"Block size constraints").
#[derive(Debug, Clone)]
pub struct RequestDecoder {
    max_payload: u32,
}

impl Default for RequestDecoder {
    fn default() -> Self {
        Self::new(MAX_PAYLOAD)
    }
}

impl RequestDecoder {
    pub fn new(max_payload: u32) -> Self {
        Self { max_payload }
    }

    /// Decodes one request from the front of `buf`, consuming it. `Ok(None)` means more input is
    /// needed (and room for it may have been reserved in `buf`).
    pub fn decode(
        &self,
        buf: &mut BytesMut,
    ) -> Result<Option<(Request, Option<Bytes>)>, ProtoError> {
        let req = match parse_request_header(buf)? {
            Parse::Incomplete { .. } => return Ok(None),
            Parse::Parsed { value, .. } => value,
        };
        if !req.has_payload() {
            buf.advance(REQUEST_HEADER_LEN);
            return Ok(Some((req, None)));
        }
        if req.len > self.max_payload {
            return Err(ProtoError::PayloadTooLarge {
                len: req.len,
                max: self.max_payload,
            });
        }
        let total = REQUEST_HEADER_LEN + req.len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(REQUEST_HEADER_LEN);
        let payload = buf.split_to(req.len as usize).freeze();
        Ok(Some((req, Some(payload))))
    }
}

/// A simple reply header (spec §"Simple reply message"). For a successful READ it is followed
/// by exactly the requested number of bytes, which only the requester knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub handle: u64,
}

impl SimpleReply {
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(SIMPLE_REPLY_HEADER_LEN);
        buf.put_u32(NBD_SIMPLE_REPLY_MAGIC);
        buf.put_u32(self.error);
        buf.put_u64(self.handle);
    }
}

/// Parses a simple reply header (client side).
pub fn parse_simple_reply(buf: &[u8]) -> Result<Parse<SimpleReply>, ProtoError> {
    let mut rd = Rd(buf);
    let (Some(magic), Some(error), Some(handle)) = (rd.u32(), rd.u32(), rd.u64()) else {
        return Ok(Parse::Incomplete {
            needed: SIMPLE_REPLY_HEADER_LEN,
        });
    };
    match magic {
        NBD_SIMPLE_REPLY_MAGIC => Ok(Parse::Parsed {
            value: SimpleReply { error, handle },
            consumed: SIMPLE_REPLY_HEADER_LEN,
        }),
        NBD_STRUCTURED_REPLY_MAGIC => Err(ProtoError::UnexpectedStructuredReply),
        found => Err(ProtoError::BadMagic {
            expected: NBD_SIMPLE_REPLY_MAGIC.into(),
            found: found.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed<T>(p: Parse<T>) -> (T, usize) {
        match p {
            Parse::Parsed { value, consumed } => (value, consumed),
            Parse::Incomplete { needed } => panic!("incomplete, needs {needed}"),
        }
    }

    #[test]
    fn greeting_round_trip_and_incremental() {
        let mut buf = BytesMut::new();
        encode_server_greeting(&mut buf, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        assert_eq!(buf.len(), SERVER_GREETING_LEN);
        for cut in 0..buf.len() {
            assert!(matches!(
                parse_server_greeting(&buf[..cut]),
                Ok(Parse::Incomplete { .. })
            ));
        }
        let (flags, used) = parsed(parse_server_greeting(&buf).unwrap());
        assert_eq!(flags, 3);
        assert_eq!(used, SERVER_GREETING_LEN);
    }

    #[test]
    fn oldstyle_and_bad_magic_rejected() {
        let mut buf = BytesMut::new();
        buf.put_u64(NBD_MAGIC);
        buf.put_u64(NBD_CLISERV_MAGIC);
        assert_eq!(parse_server_greeting(&buf), Err(ProtoError::OldstyleServer));
        let mut buf = BytesMut::new();
        buf.put_u64(1);
        buf.put_u64(NBD_IHAVEOPT);
        assert!(matches!(
            parse_server_greeting(&buf),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn client_flags_checked_against_server_flags() {
        let ok = 3u32.to_be_bytes();
        assert!(parse_client_flags(&ok, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).is_ok());
        // NO_ZEROES not offered by the server: the client must not set it.
        assert_eq!(
            parse_client_flags(&ok, NBD_FLAG_FIXED_NEWSTYLE),
            Err(ProtoError::UnknownClientFlags(3))
        );
        assert!(parse_client_flags(&8u32.to_be_bytes(), 3).is_err());
        assert!(matches!(
            parse_client_flags(&[0, 0], 3),
            Ok(Parse::Incomplete { needed: 4 })
        ));
    }

    #[test]
    fn option_requests_round_trip() {
        let cases = vec![
            OptionRequest::ExportName("vol-1".into()),
            OptionRequest::Abort,
            OptionRequest::List,
            OptionRequest::StartTls,
            OptionRequest::StructuredReply,
            OptionRequest::Info(InfoRequest {
                name: "".into(),
                info_types: vec![],
            }),
            OptionRequest::Go(InfoRequest {
                name: "a/b".into(),
                info_types: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, 77],
            }),
            OptionRequest::Auth(AuthRequest {
                principal: "node-a".into(),
                token: b"secret\0bytes".to_vec(),
            }),
            OptionRequest::Unsupported(999),
        ];
        for req in cases {
            let mut buf = BytesMut::new();
            req.encode(&mut buf);
            for cut in 0..buf.len() {
                assert!(matches!(
                    parse_option(&buf[..cut]),
                    Ok(Parse::Incomplete { .. })
                ));
            }
            let (raw, used) = parsed(parse_option(&buf).unwrap());
            assert_eq!(used, buf.len());
            assert_eq!(OptionRequest::decode(&raw).unwrap(), req);
        }
    }

    #[test]
    fn oversized_option_is_a_framing_error_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u64(NBD_IHAVEOPT);
        buf.put_u32(NBD_OPT_GO);
        buf.put_u32(u32::MAX);
        assert_eq!(
            parse_option(&buf),
            Err(ProtoError::OptionTooLarge {
                option: NBD_OPT_GO,
                len: u32::MAX,
                max: MAX_OPTION_DATA
            })
        );
    }

    #[test]
    fn malformed_info_requests_are_option_errors() {
        let raw = |data: &'static [u8]| RawOption {
            option: NBD_OPT_GO,
            data,
        };
        // name length larger than data
        assert!(OptionRequest::decode(&raw(&[0, 0, 0, 9, b'a', 0, 0])).is_err());
        // count claims 2 entries but none present
        assert!(OptionRequest::decode(&raw(&[0, 0, 0, 1, b'a', 0, 2])).is_err());
        // non-UTF-8 name
        assert!(OptionRequest::decode(&raw(&[0, 0, 0, 1, 0xff, 0, 0])).is_err());
        // NUL in name
        assert!(OptionRequest::decode(&raw(&[0, 0, 0, 1, 0, 0, 0])).is_err());
        // too short
        assert!(OptionRequest::decode(&raw(&[0, 0])).is_err());
        // LIST with data
        assert!(
            OptionRequest::decode(&RawOption {
                option: NBD_OPT_LIST,
                data: b"x"
            })
            .is_err()
        );
    }

    #[test]
    fn option_replies_round_trip() {
        let cases = vec![
            OptionReply::Ack,
            OptionReply::Server {
                name: "vol".into(),
                description: "a volume".into(),
            },
            OptionReply::Info(InfoReply::Export {
                size: 1 << 40,
                flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH,
            }),
            OptionReply::Info(InfoReply::Name("vol".into())),
            OptionReply::Info(InfoReply::Description("d".into())),
            OptionReply::Info(InfoReply::BlockSize {
                min: 512,
                preferred: 4096,
                max: MAX_PAYLOAD,
            }),
            OptionReply::Info(InfoReply::Unknown { info_type: 42 }),
            OptionReply::error(NBD_REP_ERR_POLICY, "authenticate first"),
            OptionReply::Unknown { reply_type: 77 },
        ];
        for reply in cases {
            let mut buf = BytesMut::new();
            reply.encode(&mut buf, NBD_OPT_GO);
            for cut in 0..buf.len() {
                assert!(matches!(
                    parse_option_reply(&buf[..cut]),
                    Ok(Parse::Incomplete { .. })
                ));
            }
            let (frame, used) = parsed(parse_option_reply(&buf).unwrap());
            assert_eq!(used, buf.len());
            assert_eq!(frame.option, NBD_OPT_GO);
            assert_eq!(frame.reply, reply);
        }
    }

    #[test]
    fn export_name_reply_with_and_without_zeroes() {
        for no_zeroes in [false, true] {
            let mut buf = BytesMut::new();
            encode_export_name_reply(&mut buf, 4096, 7, no_zeroes);
            assert_eq!(
                buf.len(),
                if no_zeroes { 10 } else { 134 },
                "no_zeroes={no_zeroes}"
            );
            assert!(matches!(
                parse_export_name_reply(&buf[..buf.len() - 1], no_zeroes),
                Parse::Incomplete { .. }
            ));
            assert_eq!(
                parsed(parse_export_name_reply(&buf, no_zeroes)).0,
                (4096, 7)
            );
        }
    }

    #[test]
    fn requests_round_trip_through_decoder() {
        let mut buf = BytesMut::new();
        let write = Request {
            flags: NBD_CMD_FLAG_FUA,
            command: Command::Write,
            handle: 0xdead_beef,
            offset: 4096,
            len: 5,
        };
        write.encode(&mut buf);
        buf.put_slice(b"hello");
        let read = Request {
            flags: 0,
            command: Command::Read,
            handle: 2,
            offset: 0,
            len: 1 << 20,
        };
        read.encode(&mut buf);
        let unknown = Request {
            flags: 0,
            command: Command::Unknown(1234),
            handle: 3,
            offset: 0,
            len: 0,
        };
        unknown.encode(&mut buf);

        let dec = RequestDecoder::default();
        // Feed byte by byte.
        let mut input = BytesMut::new();
        let mut out = Vec::new();
        for b in buf.iter() {
            input.put_u8(*b);
            while let Some(r) = dec.decode(&mut input).unwrap() {
                out.push(r);
            }
        }
        assert!(input.is_empty());
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].0, write);
        assert_eq!(out[0].1.as_deref(), Some(&b"hello"[..]));
        assert_eq!(out[1], (read, None));
        assert_eq!(out[2], (unknown, None));
    }

    #[test]
    fn oversized_write_rejected_without_reserving() {
        let mut buf = BytesMut::new();
        Request {
            flags: 0,
            command: Command::Write,
            handle: 1,
            offset: 0,
            len: MAX_PAYLOAD + 1,
        }
        .encode(&mut buf);
        let before = buf.capacity();
        assert!(matches!(
            RequestDecoder::default().decode(&mut buf),
            Err(ProtoError::PayloadTooLarge { .. })
        ));
        assert_eq!(buf.capacity(), before);
    }

    #[test]
    fn simple_reply_round_trip_and_structured_magic() {
        let mut buf = BytesMut::new();
        SimpleReply {
            error: Errno::EPERM.0,
            handle: 9,
        }
        .encode(&mut buf);
        let (r, used) = parsed(parse_simple_reply(&buf).unwrap());
        assert_eq!((r.error, r.handle, used), (1, 9, 16));
        let mut buf = BytesMut::new();
        buf.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
        buf.put_bytes(0, 12);
        assert_eq!(
            parse_simple_reply(&buf),
            Err(ProtoError::UnexpectedStructuredReply)
        );
    }

    #[test]
    fn errno_display() {
        assert_eq!(Errno::ENOSPC.to_string(), "NBD_ENOSPC");
        assert_eq!(Errno(4242).to_string(), "NBD error 4242");
    }
}
