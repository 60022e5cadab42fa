//! How a keyed command's first result is stored (`idempotency.outcome`), in pure functions,
//! for both backends: SQLite keeps a record as a BLOB and JSON as TEXT; PostgreSQL keeps
//! either as the bytes of one `bytea` ([`to_bytes`], [`from_bytes`]: a record starts with
//! [`FORMAT`], a JSON text with `{`).
//!
//! The effects of the hot commands (held, settled, released, spent) are stored as a compact
//! record, a BLOB of 15 to 40 bytes at everyday values (at most [`MAX_RECORD_BYTES`]); every
//! other effect as its JSON text (~150 to 250 bytes),
//! which is also how files written before this encoding stored every effect, and still read.
//! The idempotency rows were most of the pages a spend writes: a settle's row went from ~250
//! bytes to ~70, and with it most of the WAL's bytes.
//!
//! The record: [`FORMAT`], then the effect's tag, then its fields in the order written below,
//! each a zigzag LEB128 varint (a time is two: Unix seconds, then nanoseconds). Settled and
//! spent effects carrying cost events (an alert or a throttle) are stored as JSON instead.
//! A record is decoded strictly: an unknown format or tag, a varint over 64 bits, a value out
//! of its type's range, or bytes left over are errors, never a guess.

use chrono::{DateTime, Utc};
use rusqlite::types::{Value, ValueRef};

use crate::cost::CostEvents;
use crate::error::{Error, Result};
use crate::ledger::{Balances, BucketAmounts, Effect, EntryId, HoldId};

/// The first byte of a compact record (a JSON text starts with `{`, and is stored as TEXT).
const FORMAT: u8 = 1;
const HELD: u8 = 1;
const SETTLED: u8 = 2;
const RELEASED: u8 = 3;
const SPENT: u8 = 4;
/// The longest record: format, tag, and 11 varints of at most 10 bytes.
const MAX_RECORD_BYTES: usize = 2 + 11 * 10;

/// The stored form of `effect`: a compact BLOB for the hot effects, JSON text otherwise.
pub(crate) fn encode(effect: &Effect) -> Value {
    let mut w = Vec::with_capacity(32);
    w.push(FORMAT);
    match effect {
        Effect::Held { hold, amount, deadline, balances } => {
            w.push(HELD);
            put(&mut w, hold.0);
            put(&mut w, *amount);
            put(&mut w, deadline.timestamp());
            put(&mut w, i64::from(deadline.timestamp_subsec_nanos()));
            put_balances(&mut w, balances);
        }
        Effect::Settled { hold, entry, charged, released, capped, balances, cost } if *cost == CostEvents::default() => {
            w.push(SETTLED);
            put(&mut w, hold.0);
            put(&mut w, entry.0);
            put_amounts(&mut w, charged);
            put(&mut w, *released);
            put(&mut w, i64::from(*capped));
            put_balances(&mut w, balances);
        }
        Effect::Released { hold, released, balances } => {
            w.push(RELEASED);
            put(&mut w, hold.0);
            put(&mut w, *released);
            put_balances(&mut w, balances);
        }
        Effect::Spent { entry, charged, balances, cost } if *cost == CostEvents::default() => {
            w.push(SPENT);
            put(&mut w, entry.0);
            put_amounts(&mut w, charged);
            put_balances(&mut w, balances);
        }
        other => return Value::Text(serde_json::to_string(other).expect("effects serialize")),
    }
    debug_assert!(w.len() <= MAX_RECORD_BYTES);
    Value::Blob(w)
}

/// The effect stored as `stored` (a compact record or JSON text).
pub(crate) fn decode(stored: ValueRef<'_>) -> Result<Effect> {
    match stored {
        ValueRef::Text(t) => serde_json::from_slice(t).map_err(|e| Error::Invariant(format!("stored outcome: {e}"))),
        ValueRef::Blob(b) => decode_record(b).ok_or_else(|| Error::Invariant(format!("stored outcome: not a valid record ({} bytes)", b.len()))),
        other => Err(Error::Invariant(format!("stored outcome: a {:?}, not a record or JSON", other.data_type()))),
    }
}

/// `effect` as one byte string: its record, or its JSON text.
pub(crate) fn to_bytes(effect: &Effect) -> Vec<u8> {
    match encode(effect) {
        Value::Blob(b) => b,
        Value::Text(t) => t.into_bytes(),
        other => unreachable!("encode gives a blob or a text, not {other:?}"),
    }
}

/// The effect [`to_bytes`] gave `b` for (a record if it starts with [`FORMAT`], else JSON).
pub(crate) fn from_bytes(b: &[u8]) -> Result<Effect> {
    match b.first() {
        Some(&FORMAT) => decode(ValueRef::Blob(b)),
        _ => decode(ValueRef::Text(b)),
    }
}

fn decode_record(b: &[u8]) -> Option<Effect> {
    if b.len() > MAX_RECORD_BYTES {
        return None;
    }
    let mut r = Reader(b);
    if r.byte()? != FORMAT {
        return None;
    }
    let effect = match r.byte()? {
        HELD => {
            let hold = HoldId(r.int()?);
            let amount = r.int()?;
            let secs = r.int()?;
            let nanos = u32::try_from(r.int()?).ok()?;
            let deadline = DateTime::<Utc>::from_timestamp(secs, nanos)?;
            Effect::Held { hold, amount, deadline, balances: r.balances()? }
        }
        SETTLED => Effect::Settled {
            hold: HoldId(r.int()?),
            entry: EntryId(r.int()?),
            charged: r.amounts()?,
            released: r.int()?,
            capped: match r.int()? {
                0 => false,
                1 => true,
                _ => return None,
            },
            balances: r.balances()?,
            cost: CostEvents::default(),
        },
        RELEASED => Effect::Released { hold: HoldId(r.int()?), released: r.int()?, balances: r.balances()? },
        SPENT => Effect::Spent { entry: EntryId(r.int()?), charged: r.amounts()?, balances: r.balances()?, cost: CostEvents::default() },
        _ => return None,
    };
    r.0.is_empty().then_some(effect)
}

fn put(w: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        w.push((z as u8) | 0x80);
        z >>= 7;
    }
    w.push(z as u8);
}

fn put_amounts(w: &mut Vec<u8>, a: &BucketAmounts) {
    for v in [a.monthly, a.rollover, a.purchased] {
        put(w, v);
    }
}

fn put_balances(w: &mut Vec<u8>, b: &Balances) {
    for v in [b.monthly, b.rollover, b.purchased, b.held] {
        put(w, v);
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    /// A zigzag LEB128 varint; `None` past the end, over 64 bits (a tenth byte above 1, or an
    /// eleventh byte), or not in its shortest form (a last byte of 0 after others), which
    /// [`put`] never writes.
    fn int(&mut self) -> Option<i64> {
        let mut z: u64 = 0;
        for i in 0..10 {
            let b = self.byte()?;
            if (i == 9 && b > 1) || (i > 0 && b == 0) {
                return None;
            }
            z |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(((z >> 1) as i64) ^ -((z & 1) as i64));
            }
        }
        None
    }

    fn amounts(&mut self) -> Option<BucketAmounts> {
        Some(BucketAmounts { monthly: self.int()?, rollover: self.int()?, purchased: self.int()? })
    }

    fn balances(&mut self) -> Option<Balances> {
        Some(Balances { monthly: self.int()?, rollover: self.int()?, purchased: self.int()?, held: self.int()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{Alert, AlertKind, ThrottleReason};
    use proptest::prelude::*;

    fn balances() -> impl Strategy<Value = Balances> {
        (any::<i64>(), any::<i64>(), any::<i64>(), any::<i64>()).prop_map(|(monthly, rollover, purchased, held)| Balances {
            monthly,
            rollover,
            purchased,
            held,
        })
    }

    fn amounts() -> impl Strategy<Value = BucketAmounts> {
        (any::<i64>(), any::<i64>(), any::<i64>()).prop_map(|(monthly, rollover, purchased)| BucketAmounts { monthly, rollover, purchased })
    }

    fn time() -> impl Strategy<Value = DateTime<Utc>> {
        // Every instant chrono represents, to the nanosecond.
        (DateTime::<Utc>::MIN_UTC.timestamp()..=DateTime::<Utc>::MAX_UTC.timestamp(), 0u32..1_000_000_000)
            .prop_filter_map("in range", |(s, n)| DateTime::<Utc>::from_timestamp(s, n))
    }

    /// The hot effects (what `encode` stores as records) at any value of their fields.
    fn hot_effect() -> impl Strategy<Value = Effect> {
        prop_oneof![
            (any::<i64>(), any::<i64>(), time(), balances()).prop_map(|(h, amount, deadline, balances)| Effect::Held {
                hold: HoldId(h),
                amount,
                deadline,
                balances
            }),
            (any::<i64>(), any::<i64>(), amounts(), any::<i64>(), any::<bool>(), balances()).prop_map(|(h, e, charged, released, capped, balances)| {
                Effect::Settled { hold: HoldId(h), entry: EntryId(e), charged, released, capped, balances, cost: CostEvents::default() }
            }),
            (any::<i64>(), any::<i64>(), balances()).prop_map(|(h, released, balances)| Effect::Released { hold: HoldId(h), released, balances }),
            (any::<i64>(), amounts(), balances()).prop_map(|(e, charged, balances)| Effect::Spent {
                entry: EntryId(e),
                charged,
                balances,
                cost: CostEvents::default()
            }),
        ]
    }

    fn round_trip(e: &Effect) -> Effect {
        let v = encode(e);
        decode(ValueRef::from(&v)).expect("decodes")
    }

    proptest! {
        #[test]
        fn hot_effects_round_trip_as_short_records(e in hot_effect()) {
            let v = encode(&e);
            let Value::Blob(b) = &v else { panic!("{e:?} was stored as {v:?}") };
            prop_assert!(b.len() <= MAX_RECORD_BYTES);
            prop_assert_eq!(round_trip(&e), e);
        }

        /// Whatever the bytes (a damaged file, a future format), decoding answers; it never
        /// panics, and what it accepts is exactly what encoding it again gives back.
        #[test]
        fn any_bytes_decode_to_an_error_or_their_own_record(
            head in proptest::option::of(0u8..6),
            tail in proptest::collection::vec(prop_oneof![any::<u8>(), 0u8..2, 0x80u8..=0xff], 0..48),
        ) {
            // Mostly a valid format and a tag (valid or not), so the fields' decoding is reached.
            let b: Vec<u8> = head.map(|tag| vec![FORMAT, tag]).unwrap_or_default().into_iter().chain(tail).collect();
            if let Ok(e) = decode(ValueRef::Blob(&b)) {
                prop_assert_eq!(encode(&e), Value::Blob(b));
            }
        }

        /// A record cut short, or with a byte more, is refused.
        #[test]
        fn cut_or_padded_records_are_refused(e in hot_effect(), extra in any::<u8>()) {
            let Value::Blob(b) = encode(&e) else { unreachable!() };
            for n in 0..b.len() {
                prop_assert!(decode(ValueRef::Blob(&b[..n])).is_err());
            }
            let mut longer = b.clone();
            longer.push(extra);
            prop_assert!(decode(ValueRef::Blob(&longer)).is_err());
        }
    }

    proptest! {
        /// PostgreSQL's one-bytea form gives back every effect, a record as the same bytes.
        #[test]
        fn hot_effects_round_trip_as_bytes(e in hot_effect()) {
            let b = to_bytes(&e);
            prop_assert_eq!(Value::Blob(b.clone()), encode(&e));
            prop_assert_eq!(from_bytes(&b).unwrap(), e);
        }
    }

    #[test]
    fn json_effects_round_trip_as_bytes_and_bad_bytes_are_refused() {
        let e = Effect::AccountCreated { granted: 5, balances: Balances { monthly: 5, rollover: 0, purchased: 0, held: 0 } };
        let b = to_bytes(&e);
        assert_eq!(b, serde_json::to_vec(&e).unwrap());
        assert_eq!(from_bytes(&b).unwrap(), e);
        for bad in [&b""[..], b"{", &[FORMAT], &[2, HELD]] {
            assert!(matches!(from_bytes(bad), Err(Error::Invariant(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_bench_settle_is_a_fraction_of_its_json() {
        let balances = Balances { monthly: 0, rollover: 0, purchased: 999_999_965, held: 0 };
        let charged = BucketAmounts { monthly: 0, rollover: 0, purchased: 1 };
        let e = Effect::Settled { hold: HoldId(40_000), entry: EntryId(83_000), charged, released: 3, capped: false, balances, cost: CostEvents::default() };
        let Value::Blob(b) = encode(&e) else { panic!("not a record") };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json.len(), 233);
        assert_eq!(b.len(), 21, "{b:?}");
        assert_eq!(b[..5], [FORMAT, SETTLED, 0x80, 0xf1, 0x04], "format, tag, then hold 40,000 zigzagged (80,000) in LEB128");
    }

    #[test]
    fn other_effects_and_cost_events_are_stored_as_json_and_read_back() {
        let balances = Balances { monthly: 5, rollover: 0, purchased: 0, held: 0 };
        let alert = Alert {
            kind: AlertKind::Threshold,
            month: chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(),
            cost_micros: 9,
            limit_micros: 10,
            at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        };
        let cost = CostEvents {
            alerts: vec![alert],
            throttled: Some(ThrottleReason::MonthlyCostLimit { month: chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap() }),
        };
        let charged = BucketAmounts { monthly: 1, rollover: 0, purchased: 0 };
        for e in [
            Effect::AccountCreated { granted: 5, balances },
            Effect::Granted { entry: EntryId(7), balances },
            Effect::Spent { entry: EntryId(8), charged, balances, cost: cost.clone() },
            Effect::Settled { hold: HoldId(1), entry: EntryId(9), charged, released: 0, capped: true, balances, cost },
        ] {
            let v = encode(&e);
            assert_eq!(v, Value::Text(serde_json::to_string(&e).unwrap()), "{e:?}");
            assert_eq!(round_trip(&e), e);
        }
    }

    #[test]
    fn outcomes_stored_as_json_by_earlier_versions_still_read() {
        let e = Effect::Held {
            hold: HoldId(3),
            amount: 4,
            deadline: DateTime::from_timestamp(1_800_000_000, 305_000_000).unwrap(),
            balances: Balances { monthly: 0, rollover: 0, purchased: 96, held: 4 },
        };
        let json =
            r#"{"effect":"held","hold":3,"amount":4,"deadline":"2027-01-15T08:00:00.305Z","balances":{"monthly":0,"rollover":0,"purchased":96,"held":4}}"#;
        assert_eq!(decode(ValueRef::Text(json.as_bytes())).unwrap(), e);
        assert!(matches!(decode(ValueRef::Text(b"{\"effect\":\"held\"")), Err(Error::Invariant(_))));
        assert!(matches!(decode(ValueRef::Integer(1)), Err(Error::Invariant(_))));
        assert!(matches!(decode(ValueRef::Blob(&[2, HELD])), Err(Error::Invariant(_))), "an unknown format");
        assert!(matches!(decode(ValueRef::Blob(&[FORMAT, 9, 0])), Err(Error::Invariant(_))), "an unknown tag");
        // A settle's `capped` is 0 or 1.
        assert!(decode(ValueRef::Blob(&[FORMAT, SETTLED, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0])).is_err());
        assert!(decode(ValueRef::Blob(&[FORMAT, SETTLED, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0])).is_ok());
    }
}
