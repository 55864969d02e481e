use std::{error::Error as StdError, fmt, io, path::PathBuf, sync::Arc};

/// Errors from loading, validating and publishing key sets.
///
/// No variant ever carries key material: errors name key **ids**, files, lines and
/// environment variables, so they are safe to log and to show an operator.
///
/// As the standard library's errors do, `Display` describes this error alone and
/// [`source`](std::error::Error::source) gives the error underneath (an I/O error, a
/// custom source's own error): print the chain (`anyhow`'s `{:#}`, or walk
/// `source()`) to see both. The crate's own logs print the chain.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// A key definition is not acceptable (empty id, malformed hash, ...).
    InvalidKey {
        /// The id of the offending key, when it has one.
        id: Option<String>,
        /// What is wrong with it.
        reason: String,
    },
    /// Two keys in one set share an id.
    DuplicateId {
        /// The id used twice.
        id: String,
    },
    /// The same secret is listed under two ids.
    DuplicateKey {
        /// The id of the key seen first.
        first: String,
        /// The id of the key that repeats it.
        second: String,
    },
    /// Two sources feeding one store disagree: one key under two ids, or one id
    /// defined by both.
    Conflict {
        /// The id in the source being published.
        id: String,
        /// The id it clashes with in the other source.
        other_id: String,
        /// The name of the other source.
        other_source: String,
    },
    /// The key file is not valid TOML or does not follow the key-file format.
    Parse {
        /// Why the file was refused.
        reason: String,
    },
    /// An error located in a file: wraps another error with the path and line.
    File {
        /// The file.
        path: PathBuf,
        /// The 1-based line, where known.
        line: Option<usize>,
        /// What is wrong there.
        error: Box<Error>,
    },
    /// Reading a file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: Arc<io::Error>,
    },
    /// Writing a file failed (`KeySet::write_file` with the `file` feature, a
    /// backend's `export_file`). What was at the path is as it was, unless the
    /// underlying error says the new file is in place but its directory could not be
    /// synced (the write may then not survive a crash).
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: Arc<io::Error>,
    },
    /// An environment variable is missing or malformed.
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A user-written [`KeySource`](crate::KeySource) failed.
    Source {
        /// The source's name.
        source: String,
        /// Why: the source's own error, also given by
        /// [`source()`](std::error::Error::source).
        error: Arc<dyn StdError + Send + Sync>,
    },
    /// The store this update was meant for has been dropped.
    StoreClosed,
    /// The operating system's random number generator failed.
    Random(String),
}

impl Error {
    /// Builds an [`Error::Source`] for a user-written key source: `error` is a
    /// message or the source's own error, which [`source()`](std::error::Error::source)
    /// then returns.
    ///
    /// # Example
    ///
    /// ```
    /// use std::error::Error as _;
    ///
    /// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
    /// let err = tower_api_key::Error::custom("vault", io);
    /// assert_eq!(err.to_string(), "key source `vault` failed");
    /// assert_eq!(err.source().unwrap().to_string(), "connection refused");
    ///
    /// let err = tower_api_key::Error::custom("vault", "sealed");
    /// assert_eq!(err.source().unwrap().to_string(), "sealed");
    /// ```
    pub fn custom(
        source: impl Into<String>,
        error: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self::Source {
            source: source.into(),
            error: Arc::from(error.into()),
        }
    }

    pub(crate) fn invalid(id: Option<&str>, reason: impl Into<String>) -> Self {
        Self::InvalidKey {
            id: id.map(str::to_owned),
            reason: reason.into(),
        }
    }

    pub(crate) fn in_file(self, path: impl Into<PathBuf>, line: Option<usize>) -> Self {
        Self::File {
            path: path.into(),
            line,
            error: Box::new(self),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, error: io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error: Arc::new(error),
        }
    }

    #[cfg_attr(not(feature = "file"), allow(dead_code))]
    pub(crate) fn write(path: impl Into<PathBuf>, error: io::Error) -> Self {
        Self::Write {
            path: path.into(),
            error: Arc::new(error),
        }
    }

    /// The 1-based line in the key file this error points at, where known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::File { line, .. } => *line,
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidKey {
                id: Some(id),
                reason,
            } => write!(f, "key `{id}`: {reason}"),
            Self::InvalidKey { id: None, reason } => write!(f, "invalid key: {reason}"),
            Self::DuplicateId { id } => write!(f, "duplicate key id `{id}`"),
            Self::DuplicateKey { first, second } => {
                write!(f, "key `{second}` has the same secret as key `{first}`")
            }
            Self::Conflict {
                id,
                other_id,
                other_source,
            } if id == other_id => write!(
                f,
                "key id `{id}` is already defined by source `{other_source}`"
            ),
            Self::Conflict {
                id,
                other_id,
                other_source,
            } => write!(
                f,
                "key `{id}` has the same secret as key `{other_id}` from source `{other_source}`"
            ),
            Self::Parse { reason } => f.write_str(reason),
            Self::File {
                path,
                line: Some(line),
                error,
            } => write!(f, "{}:{line}: {error}", path.display()),
            Self::File {
                path,
                line: None,
                error,
            } => write!(f, "{}: {error}", path.display()),
            Self::Io { path, .. } => write!(f, "cannot read {}", path.display()),
            Self::Write { path, .. } => write!(f, "cannot write {}", path.display()),
            Self::Env { var, reason } => write!(f, "environment variable {var}: {reason}"),
            Self::Source { source, .. } => write!(f, "key source `{source}` failed"),
            Self::StoreClosed => f.write_str("the key store has been dropped"),
            Self::Random(message) => write!(f, "no randomness available: {message}"),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            // A file error's `Display` already says what is wrong in the file: the
            // located error is this crate's own, not a cause underneath it.
            Self::Io { error, .. } | Self::Write { error, .. } => Some(error.as_ref()),
            Self::Source { error, .. } => Some(error.as_ref()),
            _ => None,
        }
    }
}

/// Displays an error and every error under it: `a: b: c`.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn StdError + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(error) = next {
            write!(f, ": {error}")?;
            next = error.source();
        }
        Ok(())
    }
}

/// Whether a member name from the caller (a JSON member's, a key file's field name)
/// may be quoted back in an error: one shaped like the crate's own field names, 1 to
/// 32 lowercase ASCII letters and `_` (a misspelt `scope`). Any other name may be a
/// secret sent as a name, as `{"tak_…": …}` or `tak_… = 1` would be. The same rule
/// holds for any other name the caller gives that an error would repeat (a rate
/// limit's, a scope).
pub(crate) fn may_quote_name(name: &str) -> bool {
    (1..=32).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// serde's `unknown field `name`, expected …` without the name unless
/// [`may_quote_name`] allows it; any other message as it is.
#[cfg(feature = "file")]
pub(crate) fn without_unknown_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let end = rest.rfind("`, expected")?;
    (!may_quote_name(&rest[..end])).then(|| format!("unknown field{}", &rest[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_leaves_the_source_to_source() {
        let io = io::Error::new(io::ErrorKind::NotFound, "no such file");
        let err = Error::io("keys.toml", io);
        assert_eq!(err.to_string(), "cannot read keys.toml");
        assert_eq!(err.source().unwrap().to_string(), "no such file");
        assert_eq!(
            Chain(&err).to_string(),
            "cannot read keys.toml: no such file"
        );
        let io = io::Error::new(io::ErrorKind::PermissionDenied, "denied");
        assert_eq!(
            Chain(&Error::write("keys.toml", io)).to_string(),
            "cannot write keys.toml: denied"
        );
        let located = Error::DuplicateId { id: "a".into() }.in_file("keys.toml", Some(4));
        assert_eq!(located.to_string(), "keys.toml:4: duplicate key id `a`");
        assert!(located.source().is_none(), "said once, in Display");
    }
}
