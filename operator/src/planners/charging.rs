//! Periodic charging: seed 000 Fig. 10 (charging processing 514, [0075]–[0077]; claims 5–6).
//!
//! Per interval and volume: `charge += high × rateHigh + (inUse − high) × rateLow` ([0076]);
//! allocated-but-unused space is free. Tessera's rates are per GiB-hour of stored data (D-4), so
//! one interval of `s` seconds charges
//!
//! ```text
//! (highBytes × rateHigh + (inUseBytes − highBytes) × rateLow) × s / (2^30 × 3600)
//! ```
//!
//! All money is fixed-point: [`Amount`] counts micro-units (10⁻⁶) in an `i128`, parsed from and
//! printed as decimal strings (D-2). No floats anywhere. The only rounding is the conversion of
//! one interval's exact rational charge to whole micro-units (half to even); every interval is
//! rounded the same way, so charging `k` missed intervals at once equals charging them one by
//! one.
//!
//! Restart safety: `VirtualVolume.status.charge.lastChargedTime` is the end of the last charged
//! interval, not the time the operator last ran. [`intervals_due`] counts the whole intervals
//! since then and moves the mark by exactly that many intervals, so a restart never charges an
//! interval twice, a partial interval carries over, and a long downtime charges every missed
//! interval exactly once (no cap — see docs/planners.md).

use std::fmt;
use std::str::FromStr;

use tessera_api::model::ExtentSize;
use tessera_api::v1alpha1::ChargingPolicy;

use super::accounting::VolumeUsage;

/// Micro-units per unit.
const MICROS_PER_UNIT: i128 = 1_000_000;
/// Fractional digits of every amount.
const FRACTION_DIGITS: usize = 6;
/// Integer digits of a rate (the API pattern `^[0-9]{1,12}(\.[0-9]{1,6})?$`).
const RATE_INTEGER_DIGITS: usize = 12;
/// Integer digits accepted in an accrued amount (10²⁶ units still fits `i128` micro-units).
const ACCRUED_INTEGER_DIGITS: usize = 26;
/// Bytes per GiB.
const GIB: i128 = 1 << 30;
/// Seconds per hour.
const HOUR: i128 = 3600;

/// Why a charging computation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChargingError {
    #[error(
        "{value:?} is not a decimal amount: expected 1–{max_integer_digits} digits, \
         optionally followed by a point and 1–6 digits"
    )]
    InvalidDecimal {
        value: String,
        max_integer_digits: usize,
    },

    #[error("charging interval must be at least 1 second, got {0}")]
    InvalidInterval(i64),

    #[error("high-priority bytes {high_priority} exceed in-use bytes {in_use}")]
    InconsistentUsage { in_use: u64, high_priority: u64 },

    #[error("charge computation overflowed (usage, rate or interval out of range)")]
    Overflow,
}

/// An exact non-negative amount of money in micro-units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Amount(i128);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    pub const fn from_micros(micros: i128) -> Self {
        Amount(micros)
    }

    pub const fn micros(self) -> i128 {
        self.0
    }

    /// Parses a rate (`StoragePool.spec.charging.*RatePerGiBHour`, e.g. `"0.10"`).
    pub fn parse_rate(value: &str) -> Result<Self, ChargingError> {
        parse_decimal(value, RATE_INTEGER_DIGITS)
    }

    /// Parses an accrued charge (`VirtualVolume.status.charge.accrued`).
    pub fn parse_accrued(value: &str) -> Result<Self, ChargingError> {
        parse_decimal(value, ACCRUED_INTEGER_DIGITS)
    }

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).map(Amount)
    }

    pub fn checked_mul(self, factor: u64) -> Option<Amount> {
        self.0.checked_mul(i128::from(factor)).map(Amount)
    }

    /// The decimal string with exactly six fractional digits, e.g. `"1384000.000000"`.
    pub fn to_decimal_string(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let unit = MICROS_PER_UNIT as u128;
        write!(
            f,
            "{sign}{}.{:0width$}",
            abs / unit,
            abs % unit,
            width = FRACTION_DIGITS
        )
    }
}

impl FromStr for Amount {
    type Err = ChargingError;
    fn from_str(value: &str) -> Result<Self, ChargingError> {
        Amount::parse_accrued(value)
    }
}

fn parse_decimal(value: &str, max_integer_digits: usize) -> Result<Amount, ChargingError> {
    let invalid = || ChargingError::InvalidDecimal {
        value: value.to_owned(),
        max_integer_digits,
    };
    let (integer, fraction) = match value.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (value, None),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if integer.is_empty() || integer.len() > max_integer_digits || !all_digits(integer) {
        return Err(invalid());
    }
    let fraction = fraction.unwrap_or("");
    if value.contains('.') && fraction.is_empty()
        || fraction.len() > FRACTION_DIGITS
        || !all_digits(fraction)
    {
        return Err(invalid());
    }
    let int: i128 = integer.parse().map_err(|_| invalid())?;
    let mut frac: i128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| invalid())?
    };
    for _ in fraction.len()..FRACTION_DIGITS {
        frac *= 10;
    }
    int.checked_mul(MICROS_PER_UNIT)
        .and_then(|m| m.checked_add(frac))
        .map(Amount)
        .ok_or_else(invalid)
}

/// The two charge amounts 326 and 328 ([0026]), per GiB-hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rates {
    pub high_priority: Amount,
    pub low_priority: Amount,
}

impl Rates {
    pub fn parse(high_priority: &str, low_priority: &str) -> Result<Self, ChargingError> {
        Ok(Rates {
            high_priority: Amount::parse_rate(high_priority)?,
            low_priority: Amount::parse_rate(low_priority)?,
        })
    }
}

impl TryFrom<&ChargingPolicy> for Rates {
    type Error = ChargingError;
    fn try_from(policy: &ChargingPolicy) -> Result<Self, ChargingError> {
        Rates::parse(
            &policy.high_priority_rate_per_gib_hour,
            &policy.low_priority_rate_per_gib_hour,
        )
    }
}

/// The chargeable bytes of one volume: in use 308 and high priority 310, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StoredBytes {
    in_use: u64,
    high_priority: u64,
}

impl StoredBytes {
    pub fn new(in_use: u64, high_priority: u64) -> Result<Self, ChargingError> {
        if high_priority > in_use {
            return Err(ChargingError::InconsistentUsage {
                in_use,
                high_priority,
            });
        }
        Ok(StoredBytes {
            in_use,
            high_priority,
        })
    }

    /// From extent counters (each in-use extent counts whole).
    pub fn from_usage(usage: VolumeUsage, extent_size: ExtentSize) -> Result<Self, ChargingError> {
        let bytes = |extents: u64| {
            extents
                .checked_mul(extent_size.get())
                .ok_or(ChargingError::Overflow)
        };
        StoredBytes::new(bytes(usage.in_use())?, bytes(usage.high_priority())?)
    }

    pub const fn in_use(&self) -> u64 {
        self.in_use
    }

    pub const fn high_priority(&self) -> u64 {
        self.high_priority
    }

    /// `inUse − high` ([0076]).
    pub const fn low_priority(&self) -> u64 {
        self.in_use - self.high_priority
    }
}

/// Step 920 ([0076]) for `seconds` of storage: the charge of `stored` at `rates`, rounded half
/// to even to whole micro-units. Unused bytes are free (they are not an input).
pub fn charge_for(
    stored: StoredBytes,
    rates: &Rates,
    seconds: u64,
) -> Result<Amount, ChargingError> {
    let high = i128::from(stored.high_priority())
        .checked_mul(rates.high_priority.micros())
        .ok_or(ChargingError::Overflow)?;
    let low = i128::from(stored.low_priority())
        .checked_mul(rates.low_priority.micros())
        .ok_or(ChargingError::Overflow)?;
    let numerator = high
        .checked_add(low)
        .and_then(|sum| sum.checked_mul(i128::from(seconds)))
        .ok_or(ChargingError::Overflow)?;
    Ok(Amount(div_round_half_even(numerator, GIB * HOUR)))
}

/// `numerator / denominator` for non-negative numerator and positive denominator, rounded half
/// to even.
fn div_round_half_even(numerator: i128, denominator: i128) -> i128 {
    let quotient = numerator / denominator;
    let remainder = numerator % denominator;
    let twice = remainder * 2;
    if twice > denominator || (twice == denominator && quotient % 2 == 1) {
        quotient + 1
    } else {
        quotient
    }
}

/// Whole intervals due since the last charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DueIntervals {
    /// Whole intervals between the mark and `now` (0 when none completed).
    pub intervals: u64,
    /// The new `lastChargedTime`: the old mark plus `intervals` intervals (Unix seconds). Never
    /// later than `now`, never earlier than the old mark.
    pub charged_until: i64,
}

/// The whole intervals to charge between `last_charged` and `now` (Unix seconds) — step 512 of
/// Fig. 5 ([0042]: "a fixed time has elapsed since charging last ran").
///
/// A clock behind the mark (skew, restore from backup) charges nothing and keeps the mark.
pub fn intervals_due(
    last_charged: i64,
    now: i64,
    interval_seconds: i64,
) -> Result<DueIntervals, ChargingError> {
    if interval_seconds < 1 {
        return Err(ChargingError::InvalidInterval(interval_seconds));
    }
    let elapsed = i128::from(now) - i128::from(last_charged);
    if elapsed <= 0 {
        return Ok(DueIntervals {
            intervals: 0,
            charged_until: last_charged,
        });
    }
    let interval = i128::from(interval_seconds);
    let intervals = elapsed / interval;
    // last + intervals × interval ≤ now, so it fits in an i64.
    let charged_until = i64::try_from(i128::from(last_charged) + intervals * interval)
        .map_err(|_| ChargingError::Overflow)?;
    Ok(DueIntervals {
        intervals: u64::try_from(intervals).map_err(|_| ChargingError::Overflow)?,
        charged_until,
    })
}

/// The result of one charging run for one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Accrual {
    /// New `status.charge.accrued` (cumulative charge 312).
    pub accrued: Amount,
    /// New `status.charge.lastChargedTime`.
    pub charged_until: i64,
    /// Whole intervals charged by this run.
    pub intervals: u64,
    /// What this run added.
    pub charged: Amount,
}

/// Fig. 10 for one volume: charges every whole interval since `last_charged` at the current
/// usage and rates, and returns the new accrued charge and mark. Running it twice with the same
/// `now` charges nothing the second time.
pub fn accrue(
    accrued: Amount,
    last_charged: i64,
    now: i64,
    interval_seconds: i64,
    stored: StoredBytes,
    rates: &Rates,
) -> Result<Accrual, ChargingError> {
    let due = intervals_due(last_charged, now, interval_seconds)?;
    let per_interval = charge_for(stored, rates, interval_seconds.unsigned_abs())?;
    let charged = per_interval
        .checked_mul(due.intervals)
        .ok_or(ChargingError::Overflow)?;
    Ok(Accrual {
        accrued: accrued
            .checked_add(charged)
            .ok_or(ChargingError::Overflow)?,
        charged_until: due.charged_until,
        intervals: due.intervals,
        charged,
    })
}

/// The final settlement when a volume is deleted at `now`: the whole intervals due as in
/// [`accrue`], plus the partial last interval pro-rated by its seconds. Afterwards the mark is
/// `now`. The periodic path never charges a partial interval; only deletion does, because no
/// later run will.
pub fn settle_final(
    accrued: Amount,
    last_charged: i64,
    now: i64,
    interval_seconds: i64,
    stored: StoredBytes,
    rates: &Rates,
) -> Result<Accrual, ChargingError> {
    let whole = accrue(accrued, last_charged, now, interval_seconds, stored, rates)?;
    let tail_seconds = now
        .saturating_sub(whole.charged_until)
        .max(0)
        .unsigned_abs();
    let tail = charge_for(stored, rates, tail_seconds)?;
    Ok(Accrual {
        accrued: whole
            .accrued
            .checked_add(tail)
            .ok_or(ChargingError::Overflow)?,
        charged_until: whole.charged_until.max(now),
        intervals: whole.intervals,
        charged: whole
            .charged
            .checked_add(tail)
            .ok_or(ChargingError::Overflow)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amount(s: &str) -> Amount {
        Amount::parse_accrued(s).expect("valid amount")
    }

    #[test]
    fn parses_rates_exactly() {
        assert_eq!(Amount::parse_rate("0.10").map(Amount::micros), Ok(100_000));
        assert_eq!(Amount::parse_rate("2").map(Amount::micros), Ok(2_000_000));
        assert_eq!(Amount::parse_rate("0.000001").map(Amount::micros), Ok(1));
        assert_eq!(
            Amount::parse_rate("999999999999.999999").map(Amount::micros),
            Ok(999_999_999_999_999_999)
        );
        for bad in [
            "",
            ".",
            "1.",
            ".5",
            "-1",
            "+1",
            " 1",
            "1 ",
            "1e3",
            "0.1234567",
            "1,5",
            "1.2.3",
            "1000000000000",
        ] {
            assert!(Amount::parse_rate(bad).is_err(), "{bad:?} must be refused");
        }
        // Accrued amounts may exceed the 12 integer digits of a rate.
        assert_eq!(
            amount("1000000000000.5").to_decimal_string(),
            "1000000000000.500000"
        );
    }

    #[test]
    fn prints_six_fraction_digits() {
        assert_eq!(Amount::ZERO.to_string(), "0.000000");
        assert_eq!(Amount::from_micros(1).to_string(), "0.000001");
        assert_eq!(amount("0.10").to_string(), "0.100000");
        assert_eq!(amount("1294000").to_string(), "1294000.000000");
        assert_eq!(
            "12.5".parse::<Amount>(),
            Ok(Amount::from_micros(12_500_000))
        );
    }

    #[test]
    fn one_gib_hour_costs_the_rate() {
        let rates = Rates::parse("0.10", "0.04").expect("valid");
        let gib = 1u64 << 30;
        let stored = StoredBytes::new(3 * gib, gib).expect("consistent");
        // 1 GiB high × 0.10 + 2 GiB low × 0.04 for one hour.
        assert_eq!(charge_for(stored, &rates, 3600), Ok(amount("0.18")));
        // Pro-rated to a minute: 0.18 / 60 = 0.003.
        assert_eq!(charge_for(stored, &rates, 60), Ok(amount("0.003")));
        // Unused space is not an input at all; nothing stored costs nothing.
        assert_eq!(
            charge_for(StoredBytes::default(), &rates, 3600),
            Ok(Amount::ZERO)
        );
    }

    #[test]
    fn rounds_half_to_even_per_interval() {
        assert_eq!(div_round_half_even(5, 2), 2);
        assert_eq!(div_round_half_even(7, 2), 4);
        assert_eq!(div_round_half_even(4, 3), 1);
        assert_eq!(div_round_half_even(5, 3), 2);
        assert_eq!(div_round_half_even(0, 3), 0);
        // 1 byte for 1 s at 1 per GiB-hour is far below a micro-unit.
        let rates = Rates::parse("1", "1").expect("valid");
        let one = StoredBytes::new(1, 0).expect("consistent");
        assert_eq!(charge_for(one, &rates, 1), Ok(Amount::ZERO));
    }

    #[test]
    fn intervals_due_counts_whole_intervals_once() {
        assert_eq!(
            intervals_due(1000, 1000 + 3599, 3600),
            Ok(DueIntervals {
                intervals: 0,
                charged_until: 1000
            })
        );
        assert_eq!(
            intervals_due(1000, 1000 + 3 * 3600 + 17, 3600),
            Ok(DueIntervals {
                intervals: 3,
                charged_until: 1000 + 3 * 3600
            })
        );
        // Clock behind the mark: nothing, mark kept.
        assert_eq!(
            intervals_due(5000, 10, 3600),
            Ok(DueIntervals {
                intervals: 0,
                charged_until: 5000
            })
        );
        assert_eq!(
            intervals_due(0, 10, 0),
            Err(ChargingError::InvalidInterval(0))
        );
        // Extreme marks do not overflow.
        assert_eq!(
            intervals_due(i64::MIN, i64::MAX, 1).map(|d| d.charged_until),
            Ok(i64::MAX)
        );
    }

    #[test]
    fn restart_never_charges_twice_and_final_settlement_prorates() {
        let rates = Rates::parse("1", "0.5").expect("valid");
        let gib = 1u64 << 30;
        let stored = StoredBytes::new(2 * gib, gib).expect("consistent");
        let first = accrue(Amount::ZERO, 0, 7200 + 1800, 3600, stored, &rates).expect("ok");
        assert_eq!((first.intervals, first.charged_until), (2, 7200));
        assert_eq!(first.accrued, amount("3"));
        // A restart re-runs with the persisted mark and the same clock: nothing more.
        let again = accrue(
            first.accrued,
            first.charged_until,
            9000,
            3600,
            stored,
            &rates,
        )
        .expect("ok");
        assert_eq!((again.intervals, again.accrued), (0, first.accrued));
        // Deleting at 9000 charges the half interval.
        let last = settle_final(first.accrued, 7200, 9000, 3600, stored, &rates).expect("ok");
        assert_eq!(last.accrued, amount("3.75"));
        assert_eq!(last.charged_until, 9000);
    }

    #[test]
    fn refuses_inconsistent_or_huge_inputs() {
        assert!(StoredBytes::new(1, 2).is_err());
        let rates = Rates::parse("999999999999.999999", "1").expect("valid");
        let huge = StoredBytes::new(u64::MAX, u64::MAX).expect("consistent");
        assert_eq!(
            charge_for(huge, &rates, u64::MAX),
            Err(ChargingError::Overflow)
        );
    }
}
