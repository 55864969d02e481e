//! The key file's format, read and written in one place: TOML `[[keys]]` tables, read
//! by the general parser or, for files in the style the writer writes (the only
//! reader of files over 4 MiB), by a fast path that accepts exactly the same; written
//! by one writer that the generator, the key-management API and a replica's snapshot
//! share.

#[cfg(feature = "file")]
mod parse;
pub(crate) mod write;

#[cfg(feature = "file")]
pub(crate) use self::parse::parse;
