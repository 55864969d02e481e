//! The change log as a follower reads it: entries parsed from an `XREAD` reply,
//! assembled into whole versions, and every anomaly that calls for reading the
//! namespace whole instead.
//!
//! A version is applied only when the follower holds all of its entries, in order,
//! of the epoch it follows, numbered one more than the last version it applied.
//! Anything else (a gap, a version whose start was trimmed or that a read split and
//! something interrupted, a version seen again, an operation this crate does not
//! know, another epoch) is an [`Anomaly`]: the hash is the truth, and the follower
//! reads it whole.

use std::{collections::HashMap, fmt};

use redis::Value;

use super::model::MAX_VERSION_ENTRIES;

/// A stream entry id, `ms-seq`, ordered as Redis orders them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct StreamId(pub(crate) u64, pub(crate) u64);

impl StreamId {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (ms, seq) = text.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// What an entry does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// The key's new record.
    Put(Vec<u8>),
    Del,
    /// The namespace was created again ([`SWAP`](super::model::SWAP)).
    Reset,
    /// An operation this crate does not know, or none.
    Unknown,
}

/// One entry of the change log, as read.
#[derive(Clone, Debug)]
pub(crate) struct LogEntry {
    pub(crate) at: StreamId,
    pub(crate) epoch: Option<String>,
    pub(crate) version: Option<u64>,
    pub(crate) index: Option<u64>,
    pub(crate) count: Option<u64>,
    pub(crate) id: Option<String>,
    pub(crate) op: Op,
}

/// One change of a whole version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    Put { id: String, record: Vec<u8> },
    Del(String),
}

/// Why the log cannot be followed from here: read the namespace whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Anomaly {
    /// An entry of another epoch: the namespace was created again.
    OtherEpoch,
    /// The namespace was created again.
    Reset,
    /// An operation this crate does not know.
    UnknownOp,
    /// An entry without its version, index, count or id, or with nonsense in them.
    Malformed,
    /// A version claiming more entries than the log holds.
    TooLarge { version: u64 },
    /// Versions between ours and the next entry's are not in the log (trimmed).
    Gap { from: u64, to: u64 },
    /// A version at or below the one applied: a version number used twice.
    Stale { version: u64 },
    /// The next version's first entries are not in the log (trimmed).
    Partial { version: u64 },
    /// A version's entries stopped before it was whole.
    Interrupted { version: u64 },
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OtherEpoch => f.write_str("the log has an entry of another epoch"),
            Self::Reset => f.write_str("the namespace was created again"),
            Self::UnknownOp => f.write_str("the log has an operation this crate does not know"),
            Self::Malformed => f.write_str("the log has an entry this crate cannot read"),
            Self::TooLarge { version } => {
                write!(
                    f,
                    "version {version} claims more entries than the log holds"
                )
            }
            Self::Gap { from, to } => write!(
                f,
                "the log goes from version {from} to {to}: versions between were trimmed"
            ),
            Self::Stale { version } => write!(
                f,
                "the log has version {version} again, which was applied already"
            ),
            Self::Partial { version } => {
                write!(f, "the start of version {version} was trimmed from the log")
            }
            Self::Interrupted { version } => {
                write!(f, "version {version} stops before its last entry")
            }
        }
    }
}

/// Where a follower is in the log: the epoch it follows, the last version it has
/// applied, the last entry it has read, and the entries of a version it holds only
/// part of.
#[derive(Debug)]
pub(crate) struct Cursor {
    pub(crate) epoch: String,
    pub(crate) version: u64,
    pub(crate) at: StreamId,
    partial: Option<Partial>,
}

#[derive(Debug)]
struct Partial {
    version: u64,
    count: u64,
    changes: Vec<Change>,
}

impl Cursor {
    pub(crate) fn new(epoch: String, version: u64, at: StreamId) -> Self {
        Self {
            epoch,
            version,
            at,
            partial: None,
        }
    }

    /// Takes the next entry of the log: the changes of a version once it is whole.
    pub(crate) fn feed(&mut self, entry: LogEntry) -> Result<Option<Vec<Change>>, Anomaly> {
        self.at = entry.at;
        if entry.epoch.as_deref() != Some(self.epoch.as_str()) {
            return Err(match entry.op {
                Op::Reset => Anomaly::Reset,
                _ => Anomaly::OtherEpoch,
            });
        }
        let change = match (entry.op, entry.id) {
            (Op::Reset, _) => return Err(Anomaly::Reset),
            (Op::Unknown, _) => return Err(Anomaly::UnknownOp),
            (_, None) => return Err(Anomaly::Malformed),
            (Op::Put(record), Some(id)) => Change::Put { id, record },
            (Op::Del, Some(id)) => Change::Del(id),
        };
        let (Some(version), Some(index), Some(count)) = (entry.version, entry.index, entry.count)
        else {
            return Err(Anomaly::Malformed);
        };
        if count == 0 || index >= count {
            return Err(Anomaly::Malformed);
        }
        if count > MAX_VERSION_ENTRIES {
            return Err(Anomaly::TooLarge { version });
        }
        let partial = match &mut self.partial {
            Some(p) => {
                if version != p.version || count != p.count || index != p.changes.len() as u64 {
                    return Err(Anomaly::Interrupted { version: p.version });
                }
                p
            }
            None => {
                if version <= self.version {
                    return Err(Anomaly::Stale { version });
                }
                if version > self.version + 1 {
                    return Err(Anomaly::Gap {
                        from: self.version,
                        to: version,
                    });
                }
                if index != 0 {
                    return Err(Anomaly::Partial { version });
                }
                self.partial.insert(Partial {
                    version,
                    count,
                    changes: Vec::with_capacity(count.min(1024) as usize),
                })
            }
        };
        partial.changes.push(change);
        if (partial.changes.len() as u64) < partial.count {
            return Ok(None);
        }
        let whole = self.partial.take().map(|p| p.changes).unwrap_or_default();
        self.version = version;
        Ok(Some(whole))
    }

    /// Whether it holds part of a version.
    pub(crate) fn holds_part(&self) -> bool {
        self.partial.is_some()
    }
}

/// The entries of an `XREAD` reply, in order.
pub(crate) fn entries(reply: Value) -> Vec<LogEntry> {
    let mut out = Vec::new();
    let streams = match reply {
        Value::Array(streams) => streams,
        Value::Map(streams) => streams.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => return out,
    };
    for stream in streams {
        let items = match stream {
            Value::Array(mut parts) if parts.len() == 2 => parts.swap_remove(1),
            other => other,
        };
        let Value::Array(items) = items else { continue };
        for item in items {
            if let Some(entry) = entry(item) {
                out.push(entry);
            }
        }
    }
    out
}

/// One `[id, [field, value, ...]]` of a stream reply.
fn entry(item: Value) -> Option<LogEntry> {
    let Value::Array(mut parts) = item else {
        return None;
    };
    if parts.len() != 2 {
        return None;
    }
    let fields = parts.swap_remove(1);
    let at = StreamId::parse(&super::text(parts.swap_remove(0))?)?;
    let mut map: HashMap<Vec<u8>, Vec<u8>> = super::pairs(fields).into_iter().collect();
    let text = |v: Vec<u8>| String::from_utf8(v).ok();
    let number = |v: Option<Vec<u8>>| v.and_then(text).and_then(|s| s.parse::<u64>().ok());
    let op = match map.get(&b"op"[..]).map(Vec::as_slice) {
        Some(b"put") => match map.remove(&b"record"[..]) {
            Some(record) => Op::Put(record),
            None => Op::Unknown,
        },
        Some(b"del") => Op::Del,
        Some(b"reset") => Op::Reset,
        _ => Op::Unknown,
    };
    Some(LogEntry {
        at,
        epoch: map.remove(&b"e"[..]).and_then(text),
        version: number(map.remove(&b"v"[..])),
        index: number(map.remove(&b"i"[..])),
        count: number(map.remove(&b"n"[..])),
        id: map.remove(&b"id"[..]).and_then(text),
        op,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn put(at: u64, version: u64, index: u64, count: u64, id: &str) -> LogEntry {
        LogEntry {
            at: StreamId(at, 0),
            epoch: Some("e1".into()),
            version: Some(version),
            index: Some(index),
            count: Some(count),
            id: Some(id.into()),
            op: Op::Put(id.as_bytes().to_vec()),
        }
    }

    #[test]
    fn a_version_is_given_once_whole() {
        let mut cursor = Cursor::new("e1".into(), 4, StreamId(1, 0));
        assert_eq!(
            cursor.feed(put(2, 5, 0, 1, "a")),
            Ok(Some(vec![change("a")]))
        );
        assert_eq!(cursor.feed(put(3, 6, 0, 2, "b")), Ok(None));
        assert!(cursor.holds_part());
        assert_eq!(
            cursor.feed(put(4, 6, 1, 2, "c")),
            Ok(Some(vec![change("b"), change("c")]))
        );
        assert_eq!((cursor.version, cursor.at), (6, StreamId(4, 0)));
    }

    fn change(id: &str) -> Change {
        Change::Put {
            id: id.into(),
            record: id.as_bytes().to_vec(),
        }
    }

    #[test]
    fn every_anomaly_is_named() {
        let at = |n| Cursor::new("e1".into(), n, StreamId(1, 0));
        assert_eq!(
            at(4).feed(put(2, 6, 0, 1, "a")),
            Err(Anomaly::Gap { from: 4, to: 6 })
        );
        assert_eq!(
            at(4).feed(put(2, 4, 0, 1, "a")),
            Err(Anomaly::Stale { version: 4 })
        );
        assert_eq!(
            at(4).feed(put(2, 5, 3, 9, "a")),
            Err(Anomaly::Partial { version: 5 })
        );
        let mut split = at(4);
        assert_eq!(split.feed(put(2, 5, 0, 3, "a")), Ok(None));
        assert_eq!(
            split.feed(put(3, 6, 0, 1, "b")),
            Err(Anomaly::Interrupted { version: 5 })
        );
        let mut other = put(2, 5, 0, 1, "a");
        other.epoch = Some("e2".into());
        assert_eq!(at(4).feed(other), Err(Anomaly::OtherEpoch));
        let mut unknown = put(2, 5, 0, 1, "a");
        unknown.op = Op::Unknown;
        assert_eq!(at(4).feed(unknown), Err(Anomaly::UnknownOp));
        let mut reset = put(2, 5, 0, 1, "a");
        reset.op = Op::Reset;
        assert_eq!(at(4).feed(reset), Err(Anomaly::Reset));
        assert_eq!(at(4).feed(put(2, 5, 1, 1, "a")), Err(Anomaly::Malformed));
        let mut bare = put(2, 5, 0, 1, "a");
        bare.count = None;
        assert_eq!(at(4).feed(bare), Err(Anomaly::Malformed));
        assert_eq!(
            at(4).feed(put(2, 5, 0, MAX_VERSION_ENTRIES + 1, "a")),
            Err(Anomaly::TooLarge { version: 5 })
        );
    }

    #[test]
    fn entries_are_read_from_a_reply_with_unknown_ops_kept_unknown() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let item = |id: &str, fields: &[&str]| {
            Value::Array(vec![
                bulk(id),
                Value::Array(fields.iter().map(|f| bulk(f)).collect()),
            ])
        };
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("tak:{ns}:log"),
            Value::Array(vec![
                item(
                    "5-1",
                    &[
                        "e", "x", "v", "7", "i", "0", "n", "1", "op", "put", "id", "a", "record",
                        "{}",
                    ],
                ),
                item("6-0", &["e", "x", "v", "8", "op", "frobnicate", "id", "b"]),
                item("7-0", &["v", "9", "op", "put", "id", "c"]),
            ]),
        ])]);
        let got = entries(reply);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].at, StreamId(5, 1));
        assert_eq!(got[0].op, Op::Put(b"{}".to_vec()));
        assert_eq!(got[0].count, Some(1));
        assert_eq!(got[1].op, Op::Unknown);
        // A put without its record is not a put.
        assert_eq!(got[2].op, Op::Unknown);
        assert!(StreamId(5, 1) < StreamId(5, 2) && StreamId(5, 9) < StreamId(6, 0));
    }

    /// A log written as the write script writes it, then read in chunks of any size,
    /// with any fault: the cursor gives each version whole, in order, none twice, or
    /// stops at an anomaly before giving anything it should not.
    fn log(sizes: &[u64]) -> Vec<(LogEntry, u64)> {
        let mut out = Vec::new();
        let mut at = 10;
        for (v, &n) in sizes.iter().enumerate() {
            let version = v as u64 + 1;
            for i in 0..n {
                at += 1;
                out.push((put(at, version, i, n, &format!("k{version}-{i}")), version));
            }
        }
        out
    }

    proptest! {
        #[test]
        fn versions_come_whole_and_in_order_or_not_at_all(
            sizes in prop::collection::vec(1u64..6, 1..12),
            fault in 0usize..6,
            at in any::<prop::sample::Index>(),
        ) {
            let mut entries = log(&sizes);
            let spot = at.index(entries.len());
            match fault {
                // Trimmed: the first `spot` entries are gone.
                1 => { entries.drain(..spot); }
                // One entry lost in the middle.
                2 => { entries.remove(spot); }
                // An entry written twice.
                3 => { let e = entries[spot].clone(); entries.insert(spot, e); }
                // An unknown operation.
                4 => entries[spot].0.op = Op::Unknown,
                // A hostile entry reusing the next version.
                5 => {
                    let mut e = entries[spot].clone();
                    e.0.index = Some(0);
                    e.0.count = Some(1);
                    entries.insert(spot, e);
                }
                _ => {}
            }
            let mut cursor = Cursor::new("e1".into(), 0, StreamId(0, 0));
            let mut applied = Vec::new();
            let mut anomaly = false;
            for (entry, _) in entries {
                match cursor.feed(entry) {
                    Ok(Some(changes)) => applied.push((cursor.version, changes)),
                    Ok(None) => {}
                    Err(_) => { anomaly = true; break; }
                }
            }
            // Whatever was applied is a prefix of the real versions, each whole.
            let truth: Vec<(u64, Vec<Change>)> = sizes.iter().enumerate().map(|(v, &n)| {
                let version = v as u64 + 1;
                (version, (0..n).map(|i| change(&format!("k{version}-{i}"))).collect())
            }).collect();
            let hostile = fault == 5;
            for (i, got) in applied.iter().enumerate() {
                if hostile && got != &truth[i] {
                    // The hostile entry itself may pass as a version: then the real
                    // one with that number must come out as an anomaly, never applied.
                    prop_assert_eq!(got.0, truth[i].0);
                    prop_assert!(anomaly || i + 1 == applied.len());
                    continue;
                }
                prop_assert_eq!(got, &truth[i]);
            }
            if fault == 0 {
                prop_assert!(!anomaly);
                prop_assert_eq!(applied.len(), sizes.len());
            }
            if !anomaly && !cursor.holds_part() && fault != 5 {
                // Read to the end without an anomaly: nothing was lost on the way
                // (a fault at the very end can only hide the last version's tail).
                prop_assert!(applied.len() + 1 >= sizes.len());
            }
        }
    }
}
