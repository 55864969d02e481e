use std::{env, ffi::OsString, fmt, path::PathBuf};

use zeroize::Zeroizing;

use super::read::{DEFAULT_MAX_SIZE, FileBytes, Fingerprint};
use crate::{ApiKey, Error, KeySet, KeySource, KeyUpdater, key::digest::KeyDigest};

/// A [`KeySource`] that reads keys from an environment variable.
///
/// The value is a comma- (or newline-) separated list of entries, each one of:
///
/// - `<key>`: a bare key; its id is a short fingerprint of its SHA-256 digest;
/// - `<id>=<key>`: a key with an id (the id is split at the first `=`);
/// - `sha256:<64 hex>` or `<id>=sha256:<64 hex>`: a key given by its digest.
///
/// Following the Docker and Kubernetes secrets convention, if `NAME` is not set but
/// `NAME_FILE` is, the entries are read from the file it names.
///
/// A process's own environment cannot change while it runs: to rotate keys given this
/// way, redeploy, or use `FileSource` (with the `file` feature, a
/// `NAME_FILE` file is also watched and reloaded like one).
///
/// # Example
///
/// ```
/// use tower_api_key::{ApiKeyLayer, EnvSource};
///
/// # unsafe { std::env::set_var("DOCTEST_API_KEYS", "ci=s3cr3t, break-glass=0ther") };
/// // DOCTEST_API_KEYS="ci=s3cr3t, break-glass=0ther"
/// let layer = ApiKeyLayer::try_new(EnvSource::new("DOCTEST_API_KEYS"))?;
/// assert_eq!(layer.store().len(), 2);
/// assert!(layer.store().get("break-glass").is_some());
/// # Ok::<(), tower_api_key::Error>(())
/// ```
pub struct EnvSource {
    var: String,
    file: Option<PathBuf>,
    /// The hash of the `NAME_FILE` content loaded, so the watcher applies any change
    /// made after it.
    loaded: Option<Fingerprint>,
    /// Whether an unset variable is an empty set rather than an error.
    optional: bool,
}

impl EnvSource {
    /// Reads keys from the variable `var` (or the file named by `{var}_FILE`).
    pub fn new(var: impl Into<String>) -> Self {
        Self {
            var: var.into(),
            file: None,
            loaded: None,
            optional: false,
        }
    }

    /// Like [`EnvSource::new`], but a variable that is not set (nor its `NAME_FILE`)
    /// is an empty set, not an error: the break-glass key that is normally absent.
    /// A variable that is set but malformed is still an error.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_api_key::{ApiKey, EnvSource, KeySet, KeyStore};
    ///
    /// let store = KeyStore::new();
    /// store.add_source(KeySet::from_keys([ApiKey::new("app", "s3cr3t")])?)?;
    /// // BREAK_GLASS_KEY is unset: nothing to add, and no error.
    /// store.add_source(EnvSource::optional("BREAK_GLASS_KEY"))?;
    /// assert_eq!(store.len(), 1);
    /// # Ok::<(), tower_api_key::Error>(())
    /// ```
    pub fn optional(var: impl Into<String>) -> Self {
        Self {
            optional: true,
            ..Self::new(var)
        }
    }

    /// Parses a value in this source's format. Never includes key material in errors.
    pub(crate) fn parse(var: &str, value: &str) -> Result<KeySet, Error> {
        let mut set = KeySet::new();
        let entries = value
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty());
        for (n, entry) in entries.enumerate() {
            let at = |reason: String| Error::Env {
                var: var.to_owned(),
                reason: format!("entry {}: {reason}", n + 1),
            };
            let key = parse_entry(entry).map_err(|e| at(e.to_string()))?;
            set.insert(key).map_err(|e| at(e.to_string()))?;
        }
        Ok(set)
    }
}

fn parse_entry(entry: &str) -> Result<ApiKey, Error> {
    let (id, key) = match entry.split_once('=') {
        // A trailing run of '=' is base64 padding, not an id separator.
        Some((id, key)) if !key.trim_matches('=').is_empty() => (Some(id.trim()), key.trim()),
        _ => (None, entry),
    };
    match key.strip_prefix("sha256:") {
        Some(hex) => {
            let digest = KeyDigest::from_hex(hex.trim()).ok_or_else(|| {
                Error::invalid(id, "`sha256:` must be followed by 64 hexadecimal digits")
            })?;
            let id = id.map_or_else(|| digest.fingerprint(), str::to_owned);
            Ok(ApiKey::from_digest(id.into(), digest))
        }
        None => {
            let id = id.map_or_else(
                || KeyDigest::of(key.as_bytes()).fingerprint(),
                str::to_owned,
            );
            Ok(ApiKey::new(id, key))
        }
    }
}

impl KeySource for EnvSource {
    fn name(&self) -> String {
        format!("env:{}", self.var)
    }

    fn load(&mut self) -> Result<KeySet, Error> {
        match env::var_os(&self.var) {
            Some(value) => {
                let value =
                    Zeroizing::new(value.into_string().map_err(|_: OsString| Error::Env {
                        var: self.var.clone(),
                        reason: "is not valid UTF-8".into(),
                    })?);
                Self::parse(&self.var, &value)
            }
            None => {
                let file_var = format!("{}_FILE", self.var);
                let Some(path) = env::var_os(&file_var) else {
                    if self.optional {
                        return Ok(KeySet::new());
                    }
                    return Err(Error::Env {
                        var: self.var.clone(),
                        reason: format!("is not set (nor is {file_var})"),
                    });
                };
                let path = PathBuf::from(path);
                self.file = Some(path.clone());
                let bytes =
                    FileBytes::read(&path, DEFAULT_MAX_SIZE).map_err(|e| Error::io(&path, e))?;
                self.loaded = Some(bytes.fingerprint());
                parse_bytes(&path, &bytes, &self.var)
            }
        }
    }

    fn watch(self: Box<Self>, updater: KeyUpdater) {
        #[cfg(feature = "file")]
        if let Some(path) = self.file {
            let var = self.var;
            super::watch::spawn_with(
                path,
                super::watch::Options::default(),
                Box::new(move |path, bytes| parse_bytes(path, bytes, &var)),
                updater,
                self.loaded,
            );
        }
        #[cfg(not(feature = "file"))]
        let _ = updater;
    }
}

fn parse_bytes(path: &std::path::Path, bytes: &[u8], var: &str) -> Result<KeySet, Error> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        Error::Parse {
            reason: "is not valid UTF-8".into(),
        }
        .in_file(path, None)
    })?;
    EnvSource::parse(var, text).map_err(|e| e.in_file(path, None))
}

impl fmt::Debug for EnvSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvSource")
            .field("var", &self.var)
            .field("file", &self.file)
            .field("optional", &self.optional)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(value: &str) -> Vec<String> {
        EnvSource::parse("T", value)
            .unwrap()
            .iter()
            .map(|k| k.id().to_owned())
            .collect()
    }

    #[test]
    fn entry_forms() {
        let hex = "4e738ca5563c06cfd0018299933d58db1dd8bf97f6973dc99bf6cdc64b5550bd";
        let set = EnvSource::parse(
            "T",
            &format!("a=k1, k2 ,\nb=sha256:{hex}, c=dGVzdA==, ZGF0YQ=="),
        )
        .unwrap();
        assert_eq!(set.len(), 5);
        assert_eq!(set.get("b").unwrap().digest, KeyDigest::of(b"s3cr3t"));
        assert_eq!(set.get("c").unwrap().digest, KeyDigest::of(b"dGVzdA=="));
        let bare = KeyDigest::of(b"ZGF0YQ==");
        assert_eq!(set.get(&bare.fingerprint()).unwrap().digest, bare);
        assert_eq!(ids("k2")[0], KeyDigest::of(b"k2").fingerprint());
        assert!(ids("").is_empty());
    }

    #[test]
    fn errors_name_the_entry_not_the_secret() {
        let err = EnvSource::parse("T", "a=topsecret, a=other")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "environment variable T: entry 2: duplicate key id `a`");
        let err = EnvSource::parse("T", "x=sha256:nothex")
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry 1") && !err.contains("nothex"), "{err}");
    }
}
