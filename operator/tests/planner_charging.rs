//! Property tests of the charging planner (seed 000 Fig. 10): exact decimal round trips,
//! restart safety (splitting a charging window anywhere charges the same), idempotence, and
//! exactness for whole GiB-hours.

use proptest::prelude::*;
use tessera_operator::planners::charging::{
    Amount, Rates, StoredBytes, accrue, charge_for, intervals_due,
};

const GIB: u64 = 1 << 30;

fn rate() -> impl Strategy<Value = String> {
    (
        0u64..1_000_000,
        proptest::option::of(0u32..1_000_000),
        1usize..=6,
    )
        .prop_map(|(int, frac, digits)| match frac {
            None => int.to_string(),
            Some(f) => {
                let f = f % 10u32.pow(digits as u32);
                format!("{int}.{f:0digits$}")
            }
        })
}

fn stored() -> impl Strategy<Value = StoredBytes> {
    (0u64..(1 << 44), 0u64..=100).prop_map(|(in_use, pct)| {
        StoredBytes::new(in_use, (u128::from(in_use) * u128::from(pct) / 100) as u64)
            .expect("consistent")
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decimal_strings_round_trip(micros in 0i128..1_000_000_000_000_000_000_000) {
        let amount = Amount::from_micros(micros);
        let text = amount.to_decimal_string();
        prop_assert_eq!(text.split_once('.').map(|(_, f)| f.len()), Some(6));
        prop_assert_eq!(Amount::parse_accrued(&text), Ok(amount));
    }

    #[test]
    fn rates_parse_exactly(rate in rate()) {
        let parsed = Amount::parse_rate(&rate).expect("valid rate");
        let (int, frac) = rate.split_once('.').unwrap_or((&rate, ""));
        let expected = int.parse::<i128>().expect("digits") * 1_000_000
            + format!("{frac:0<6}").parse::<i128>().expect("digits");
        prop_assert_eq!(parsed.micros(), expected);
    }

    /// A restart (or any split of the window) never charges twice and never loses an interval:
    /// charging [t0, t1) then [mark, t2) equals charging [t0, t2) at once, and running again at
    /// the same time charges nothing.
    #[test]
    fn split_windows_charge_the_same_as_one(
        high in rate(),
        low in rate(),
        stored in stored(),
        interval in 1i64..100_000,
        t0 in -1_000_000_000i64..2_000_000_000,
        d1 in 0i64..5_000_000,
        d2 in 0i64..5_000_000,
        accrued in 0i128..1_000_000_000_000,
    ) {
        let rates = Rates::parse(&high, &low).expect("valid");
        let start = Amount::from_micros(accrued);
        let once = accrue(start, t0, t0 + d1 + d2, interval, stored, &rates).expect("fits");
        let first = accrue(start, t0, t0 + d1, interval, stored, &rates).expect("fits");
        let second = accrue(first.accrued, first.charged_until, t0 + d1 + d2, interval, stored, &rates)
            .expect("fits");
        prop_assert_eq!(second.accrued, once.accrued);
        prop_assert_eq!(second.charged_until, once.charged_until);
        prop_assert_eq!(first.intervals + second.intervals, once.intervals);
        let again = accrue(once.accrued, once.charged_until, t0 + d1 + d2, interval, stored, &rates)
            .expect("fits");
        prop_assert_eq!((again.intervals, again.accrued), (0, once.accrued));
        // The mark never passes `now` and stays on the interval grid.
        let due = intervals_due(t0, t0 + d1 + d2, interval).expect("valid interval");
        prop_assert!(due.charged_until <= t0 + d1 + d2);
        prop_assert!(t0 + d1 + d2 - due.charged_until < interval);
        prop_assert_eq!((due.charged_until - t0) % interval, 0);
    }

    /// Whole GiB for whole hours is charged exactly: GiB × rate × hours, no rounding.
    #[test]
    fn whole_gib_hours_are_exact(
        high in rate(),
        low in rate(),
        high_gib in 0u64..10_000,
        low_gib in 0u64..10_000,
        hours in 0u64..1000,
    ) {
        let rates = Rates::parse(&high, &low).expect("valid");
        let stored = StoredBytes::new((high_gib + low_gib) * GIB, high_gib * GIB).expect("consistent");
        let charge = charge_for(stored, &rates, hours * 3600).expect("fits");
        let expected = (i128::from(high_gib) * rates.high_priority.micros()
            + i128::from(low_gib) * rates.low_priority.micros())
            * i128::from(hours);
        prop_assert_eq!(charge.micros(), expected);
    }

    /// More stored data or a higher rate never costs less; nothing stored costs nothing.
    #[test]
    fn charges_are_monotone(
        rate_a in rate(),
        rate_b in rate(),
        a in stored(),
        extra in 0u64..(1 << 40),
        seconds in 0u64..1_000_000,
    ) {
        let low = Rates::parse(&rate_a, &rate_a).expect("valid");
        let parse = |r: &str| Amount::parse_rate(r).expect("valid");
        let (lo, hi) = if parse(&rate_a) <= parse(&rate_b) {
            (rate_a.clone(), rate_b.clone())
        } else {
            (rate_b.clone(), rate_a.clone())
        };
        let cheap = Rates::parse(&lo, &lo).expect("valid");
        let dear = Rates::parse(&hi, &hi).expect("valid");
        let more = StoredBytes::new(a.in_use() + extra, a.high_priority()).expect("consistent");
        let charge = |s, r| charge_for(s, r, seconds).expect("fits");
        prop_assert!(charge(a, &low) <= charge(more, &low));
        prop_assert!(charge(a, &cheap) <= charge(a, &dear));
        prop_assert_eq!(charge_for(StoredBytes::default(), &dear, seconds), Ok(Amount::ZERO));
    }
}
