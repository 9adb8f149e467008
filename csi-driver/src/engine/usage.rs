//! Usage tracking: seed 000's usage state bitmap 332 and data priority bitmap 334 (§3.4, [0028]),
//! kept per volume at extent granularity, with the in-use and high-priority counters of the write
//! processing (Fig. 8, [0059]–[0067]).
//!
//! - A write marks every extent it touches in use (the whole extent, even for a partial write:
//!   the extent is the allocation unit) and sets or clears the priority bit per the volume's
//!   current data priority (step 808: high → 810/812 set, low → the bit stays or becomes 0).
//! - A trim or write-zeroes that covers a whole extent clears both bits (seed 000 Fig. 9 releases
//!   such blocks). Write-zeroes never sets the bit: zeros are what a released extent reads as, so
//!   the data survives a reclaim.
//! - Counters change **only on transitions** (0→1 adds, 1→0 subtracts), which the digest infers
//!   from the bitmap semantics (seed 000 §4.4 observation): overwrites do not double-count and
//!   a priority change moves an extent between the tiers exactly once.
//! - The usage bit is set before the write is issued (seed 000 sets it after 802; setting it
//!   first is the safe order for a lock-free tracker read by a reclaim planner while the write is
//!   in flight). A failed write leaves its extents marked, which only keeps them from being
//!   reclaimed as unused.
//!
//! Deltas ([`UsageDelta`]) carry absolute set/cleared bits plus a sequence number, so applying one
//! twice changes nothing and a gap is detected ([`UsageMirror`]).

use std::io::{self, Read};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use roaring::RoaringBitmap;
use tessera_api::model::Generation;
use tessera_api::v1alpha1::DataPriority;

use super::bitmap::AtomicBitmap;

pub(crate) struct UsageTracker {
    extent_size: u64,
    /// Seed 000 usage state bitmap 332.
    in_use: AtomicBitmap,
    /// Seed 000 data priority bitmap 334 (a bit is meaningful only where 332 is set).
    high: AtomicBitmap,
    /// Popcounts of the two bitmaps, changed only on transitions. Signed: a decrement may land
    /// before the increment of a racing transition on another extent.
    in_use_extents: AtomicI64,
    high_extents: AtomicI64,
    high_priority: AtomicBool,
    instance: u64,
    report: Mutex<ReportState>,
}

struct ReportState {
    sequence: u64,
    in_use: RoaringBitmap,
    high: RoaringBitmap,
}

impl UsageTracker {
    pub(crate) fn new(extent_size: u64, extents: u64, priority: DataPriority) -> Self {
        UsageTracker {
            extent_size,
            in_use: AtomicBitmap::new(extents),
            high: AtomicBitmap::new(extents),
            in_use_extents: AtomicI64::new(0),
            high_extents: AtomicI64::new(0),
            high_priority: AtomicBool::new(priority == DataPriority::High),
            instance: new_instance_id(),
            report: Mutex::new(ReportState {
                sequence: 0,
                in_use: RoaringBitmap::new(),
                high: RoaringBitmap::new(),
            }),
        }
    }

    pub(crate) fn grow(&self, extents: u64) {
        self.in_use.grow(extents);
        self.high.grow(extents);
    }

    pub(crate) fn priority(&self) -> DataPriority {
        if self.high_priority.load(Ordering::SeqCst) {
            DataPriority::High
        } else {
            DataPriority::Low
        }
    }

    pub(crate) fn set_priority(&self, priority: DataPriority) {
        self.high_priority
            .store(priority == DataPriority::High, Ordering::SeqCst);
    }

    /// Seed 000 steps 804–812 for the extents a write touches.
    pub(crate) fn mark_written(&self, extents: Range<u64>) {
        let priority = self.priority();
        let in_use = self.in_use.view();
        let high = self.high.view();
        for extent in extents {
            // Priority before usage here, usage before priority in `mark_unused`: then a write
            // racing a trim can never leave a priority bit on an unused extent.
            match priority {
                DataPriority::High => {
                    if high.set(extent) {
                        self.high_extents.fetch_add(1, Ordering::SeqCst);
                    }
                }
                DataPriority::Low => {
                    if high.clear(extent) {
                        self.high_extents.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
            if in_use.set(extent) {
                self.in_use_extents.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Seed 000 Fig. 9: the extent holds no data any more.
    pub(crate) fn mark_unused(&self, extents: impl IntoIterator<Item = u64>) {
        let in_use = self.in_use.view();
        let high = self.high.view();
        for extent in extents {
            if in_use.clear(extent) {
                self.in_use_extents.fetch_sub(1, Ordering::SeqCst);
            }
            if high.clear(extent) {
                self.high_extents.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    pub(crate) fn in_use_extents(&self) -> u64 {
        self.in_use_extents.load(Ordering::SeqCst).max(0) as u64
    }

    pub(crate) fn high_priority_extents(&self) -> u64 {
        self.high_extents.load(Ordering::SeqCst).max(0) as u64
    }

    pub(crate) fn in_use_bitmap(&self) -> RoaringBitmap {
        self.in_use.to_roaring()
    }

    pub(crate) fn high_priority_bitmap(&self) -> RoaringBitmap {
        self.high.to_roaring()
    }

    /// The changes since the previous report (the first report of an instance is full).
    pub(crate) fn take_report(
        &self,
        volume: &str,
        map_generation: Generation,
        force_full: bool,
    ) -> UsageDelta {
        let mut state = self.report.lock();
        let in_use = self.in_use.to_roaring();
        let high = self.high.to_roaring();
        state.sequence += 1;
        let full = force_full || state.sequence == 1;
        let delta = UsageDelta {
            volume: volume.to_owned(),
            instance: self.instance,
            sequence: state.sequence,
            full,
            map_generation,
            extent_size: self.extent_size,
            set: if full {
                in_use.clone()
            } else {
                &in_use - &state.in_use
            },
            cleared: if full {
                RoaringBitmap::new()
            } else {
                &state.in_use - &in_use
            },
            high_priority_set: if full {
                high.clone()
            } else {
                &high - &state.high
            },
            high_priority_cleared: if full {
                RoaringBitmap::new()
            } else {
                &state.high - &high
            },
            in_use_bytes: self.in_use_extents().saturating_mul(self.extent_size),
            high_priority_bytes: self
                .high_priority_extents()
                .saturating_mul(self.extent_size),
        };
        state.in_use = in_use;
        state.high = high;
        delta
    }
}

fn new_instance_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let pid = u64::from(std::process::id());
    nanos
        ^ (pid << 40)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// One usage report of a volume, for the operator (ARCHITECTURE §4 "Nodes report usage deltas;
/// the operator keeps the counters").
///
/// Bits are extent indices. `set`/`cleared` are the usage bitmap 332 changes since the previous
/// report of the same `instance`; `high_priority_*` those of the priority bitmap 334. A `full`
/// report lists every set bit instead (`cleared` is empty) and replaces the receiver's state.
///
/// Applying (see [`UsageMirror`]): a report whose sequence is not newer than the last applied one
/// is a duplicate and ignored (applying it again would change nothing anyway: the bits are
/// absolute, `bits |= set; bits &= !cleared`); a delta that skips a sequence number means a lost
/// report, and the receiver asks for a full one. A new `instance` (the node plugin restarted and
/// tracks from scratch) starts with a full report.
///
/// `in_use_bytes` and `high_priority_bytes` are the node's live counters (extents × extent size,
/// the partial tail extent counting whole, like the area reservation). They are read just after
/// the bits, so under concurrent writes they may be ahead of the bits by the writes in between.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageDelta {
    pub volume: String,
    pub instance: u64,
    pub sequence: u64,
    pub full: bool,
    /// The volume's mapping generation when the report was taken.
    pub map_generation: Generation,
    pub extent_size: u64,
    pub set: RoaringBitmap,
    pub cleared: RoaringBitmap,
    pub high_priority_set: RoaringBitmap,
    pub high_priority_cleared: RoaringBitmap,
    pub in_use_bytes: u64,
    pub high_priority_bytes: u64,
}

/// Why bytes could not be decoded as a [`UsageDelta`].
#[derive(Debug, thiserror::Error)]
pub enum UsageDecodeError {
    #[error("not a usage delta (bad magic)")]
    BadMagic,
    #[error("usage delta truncated or malformed: {0}")]
    Malformed(#[from] io::Error),
    #[error("volume name is not UTF-8")]
    BadVolumeName,
    #[error("{0} trailing bytes after the usage delta")]
    TrailingBytes(usize),
}

const MAGIC: &[u8; 4] = b"TUD1";

impl UsageDelta {
    /// Compact binary form: a fixed little-endian header, the volume name, then the four bitmaps
    /// in the portable roaring format, each preceded by its length.
    pub fn to_bytes(&self) -> Vec<u8> {
        let bitmaps = [
            &self.set,
            &self.cleared,
            &self.high_priority_set,
            &self.high_priority_cleared,
        ];
        let size = 4
            + 8 * 6
            + 1
            + 4
            + self.volume.len()
            + bitmaps
                .iter()
                .map(|b| 8 + b.serialized_size())
                .sum::<usize>();
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(MAGIC);
        for value in [
            self.instance,
            self.sequence,
            self.map_generation.get(),
            self.extent_size,
            self.in_use_bytes,
            self.high_priority_bytes,
        ] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.push(u8::from(self.full));
        out.extend_from_slice(&(self.volume.len() as u32).to_le_bytes());
        out.extend_from_slice(self.volume.as_bytes());
        for bitmap in bitmaps {
            out.extend_from_slice(&(bitmap.serialized_size() as u64).to_le_bytes());
            // Writing into a Vec cannot fail.
            let _ = bitmap.serialize_into(&mut out);
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UsageDecodeError> {
        let mut input = bytes;
        let mut magic = [0u8; 4];
        input.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(UsageDecodeError::BadMagic);
        }
        let mut u64s = [0u64; 6];
        for value in &mut u64s {
            *value = read_u64(&mut input)?;
        }
        let [
            instance,
            sequence,
            generation,
            extent_size,
            in_use_bytes,
            high_priority_bytes,
        ] = u64s;
        let mut flag = [0u8; 1];
        input.read_exact(&mut flag)?;
        let mut len = [0u8; 4];
        input.read_exact(&mut len)?;
        let name_len = u32::from_le_bytes(len) as usize;
        if name_len > input.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        let (name, rest) = input.split_at(name_len);
        input = rest;
        let volume = std::str::from_utf8(name)
            .map_err(|_| UsageDecodeError::BadVolumeName)?
            .to_owned();
        let mut bitmaps = Vec::with_capacity(4);
        for _ in 0..4 {
            let len = usize::try_from(read_u64(&mut input)?)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
            if len > input.len() {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            let (encoded, rest) = input.split_at(len);
            input = rest;
            bitmaps.push(RoaringBitmap::deserialize_from(encoded)?);
        }
        if !input.is_empty() {
            return Err(UsageDecodeError::TrailingBytes(input.len()));
        }
        let mut bitmaps = bitmaps.into_iter();
        let mut next = || bitmaps.next().unwrap_or_default();
        Ok(UsageDelta {
            volume,
            instance,
            sequence,
            full: flag[0] != 0,
            map_generation: Generation::new(generation),
            extent_size,
            set: next(),
            cleared: next(),
            high_priority_set: next(),
            high_priority_cleared: next(),
            in_use_bytes,
            high_priority_bytes,
        })
    }
}

fn read_u64(input: &mut &[u8]) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    input.read_exact(&mut buf)?;
    Ok(u64::from_le_bytes(buf))
}

/// What [`UsageMirror::apply`] did with a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    Applied,
    /// Already applied (same or older sequence of the same instance): nothing changed.
    Duplicate,
    /// A report was lost (sequence gap) or a new instance sent a delta: ask for a full report.
    NeedFullReport,
}

/// The receiving side of usage reports: the operator's copy of one volume's bitmaps. Reference
/// implementation of the apply rules of [`UsageDelta`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageMirror {
    pub instance: Option<u64>,
    pub sequence: u64,
    pub in_use: RoaringBitmap,
    pub high_priority: RoaringBitmap,
}

impl UsageMirror {
    pub fn apply(&mut self, delta: &UsageDelta) -> ApplyOutcome {
        let same_instance = self.instance == Some(delta.instance);
        if delta.full {
            if same_instance && delta.sequence <= self.sequence {
                return ApplyOutcome::Duplicate;
            }
            self.instance = Some(delta.instance);
            self.sequence = delta.sequence;
            self.in_use = delta.set.clone();
            self.high_priority = delta.high_priority_set.clone();
            return ApplyOutcome::Applied;
        }
        if !same_instance {
            return ApplyOutcome::NeedFullReport;
        }
        if delta.sequence <= self.sequence {
            return ApplyOutcome::Duplicate;
        }
        if delta.sequence != self.sequence + 1 {
            return ApplyOutcome::NeedFullReport;
        }
        self.sequence = delta.sequence;
        self.in_use |= &delta.set;
        self.in_use -= &delta.cleared;
        self.high_priority |= &delta.high_priority_set;
        self.high_priority -= &delta.high_priority_cleared;
        ApplyOutcome::Applied
    }

    /// In-use extents (seed 000 in-use block count 308).
    pub fn in_use_extents(&self) -> u64 {
        self.in_use.len()
    }

    /// High-priority extents (seed 000 high-priority block count 310).
    pub fn high_priority_extents(&self) -> u64 {
        self.high_priority.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transitions_count() {
        let usage = UsageTracker::new(4096, 16, DataPriority::High);
        usage.mark_written(0..3);
        usage.mark_written(1..4); // overwrites of 1 and 2 do not count again
        assert_eq!(usage.in_use_extents(), 4);
        assert_eq!(usage.high_priority_extents(), 4);
        usage.set_priority(DataPriority::Low);
        usage.mark_written(3..5); // 3 moves to low, 4 is new and low
        assert_eq!(usage.in_use_extents(), 5);
        assert_eq!(usage.high_priority_extents(), 3);
        usage.mark_unused([0, 4, 9]); // 9 was never in use
        assert_eq!(usage.in_use_extents(), 3);
        assert_eq!(usage.high_priority_extents(), 2);
        assert_eq!(
            usage.in_use_bitmap().iter().collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            usage.high_priority_bitmap().iter().collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn reports_apply_idempotently_and_detect_gaps() {
        let usage = UsageTracker::new(4096, 16, DataPriority::High);
        let mut mirror = UsageMirror::default();
        usage.mark_written(0..2);
        let first = usage.take_report("v", Generation(1), false);
        assert!(first.full);
        assert_eq!(mirror.apply(&first), ApplyOutcome::Applied);
        usage.mark_unused([0]);
        usage.mark_written(5..6);
        let second = usage.take_report("v", Generation(1), false);
        assert!(!second.full);
        assert_eq!(second.set.iter().collect::<Vec<_>>(), vec![5]);
        assert_eq!(second.cleared.iter().collect::<Vec<_>>(), vec![0]);
        let decoded = UsageDelta::from_bytes(&second.to_bytes()).expect("round trip");
        assert_eq!(decoded, second);
        assert_eq!(mirror.apply(&decoded), ApplyOutcome::Applied);
        let after = mirror.clone();
        assert_eq!(mirror.apply(&second), ApplyOutcome::Duplicate);
        assert_eq!(mirror, after);
        assert_eq!(mirror.in_use, usage.in_use_bitmap());
        assert_eq!(second.in_use_bytes, 2 * 4096);
        // A lost report is detected.
        let _lost = usage.take_report("v", Generation(1), false);
        let fourth = usage.take_report("v", Generation(1), false);
        assert_eq!(mirror.apply(&fourth), ApplyOutcome::NeedFullReport);
        let full = usage.take_report("v", Generation(1), true);
        assert_eq!(mirror.apply(&full), ApplyOutcome::Applied);
        assert_eq!(mirror.in_use, usage.in_use_bitmap());
    }

    #[test]
    fn decode_rejects_garbage() {
        assert!(matches!(
            UsageDelta::from_bytes(b"nope"),
            Err(UsageDecodeError::BadMagic)
        ));
        let usage = UsageTracker::new(4096, 4, DataPriority::Low);
        let bytes = usage.take_report("vol", Generation(3), false).to_bytes();
        assert!(UsageDelta::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            UsageDelta::from_bytes(&long),
            Err(UsageDecodeError::TrailingBytes(1))
        ));
    }
}
