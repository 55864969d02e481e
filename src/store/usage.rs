//! How much a key has been used.

use std::time::SystemTime;

use crate::{KeyInfo, clock, store::counters::Usage};

/// As JSON: `key` (a [`KeyInfo`]), `requests`, `refused`, `last_used` (RFC 3339, or
/// null): a usage endpoint is `Json(store.usage())`.
impl serde::Serialize for KeyUsage {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut s = serializer.serialize_struct("KeyUsage", 4)?;
        s.serialize_field("key", &self.key)?;
        s.serialize_field("requests", &self.requests)?;
        s.serialize_field("refused", &self.refused())?;
        s.serialize_field("last_used", &self.last_used.map(clock::rfc3339))?;
        s.end()
    }
}

/// How much one key has been used: from [`KeyStore::usage`](crate::KeyStore::usage).
#[derive(Clone, Debug)]
pub struct KeyUsage {
    key: KeyInfo,
    requests: u64,
    last_used: Option<SystemTime>,
}

impl KeyUsage {
    /// `key`'s counters as read from its cell: requests, and the last use in Unix
    /// seconds (0 for never).
    pub(crate) fn new(key: KeyInfo, (requests, last_used): Usage) -> Self {
        let secs = u64::from(last_used);
        Self {
            key,
            requests,
            last_used: (secs != 0).then(|| clock::from_unix_ms(secs * 1000)),
        }
    }

    /// The key.
    pub fn key(&self) -> &KeyInfo {
        &self.key
    }

    /// Requests let in with this key since it was first loaded (counts carry over
    /// reloads that keep its id).
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Requests with this key its limits refused (rate limits, quota, address
    /// rules), counted since its limits last changed: the other half of
    /// [`requests`](Self::requests), which counts only those let in.
    pub fn refused(&self) -> u64 {
        self.key.refused()
    }

    /// When the key last let a request in, to the second; `None` if never.
    pub fn last_used(&self) -> Option<SystemTime> {
        self.last_used
    }
}
