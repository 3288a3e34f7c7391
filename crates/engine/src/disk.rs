//! The file system the log and recovery write through: real files ([`OsDisk`]) or a simulated
//! disk with faults ([`SimDisk`]).
//!
//! # Why a trait, and why generics
//!
//! The write-ahead log ([`crate::wal`]), the store ([`crate::store`]), the data directory
//! ([`crate::datadir`]) and recovery ([`crate::recovery`]) reach the file system only through
//! [`Disk`] and its [`DiskFile`]. A deterministic simulator can then run that same code, not a
//! model of it, over a disk that loses unsynced writes, tears the tail of a file, fills up,
//! fails an `fsync` or flips a bit in old data (TigerBeetle's storage and VOPR are the model).
//!
//! The types are generic parameters with [`OsDisk`] as the default (`Store<D: Disk = OsDisk>`),
//! never `dyn`: on the real path every call compiles to the `std::fs` call it replaces, with no
//! dispatch per record and no extra copy. [`OsDisk`] is a zero-sized type.
//!
//! # What the interface covers
//!
//! Exactly what the four modules use: opening a file in one of the [`Open`] modes, reading it
//! (`Read + Seek`), appending to it, `sync_data`/`sync_all`, `set_len`, its length; and on paths,
//! the length of a file, whether a directory exists, listing a directory's names, creating,
//! renaming and removing, and `sync_dir`. Every write the log makes is an append (a new file is
//! written from its start, which is an append too), so there is no write at an offset. Errors
//! stay [`std::io::Error`], so that [`crate::wal::is_no_space`] and every message keep working.
//!
//! The data directory's `flock` ([`crate::datadir::DataDirLock`]) is not part of it: it guards
//! against a second engine process, which a simulation in one process does not have. It stays
//! on real files only.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::Path;

mod sim;

pub use sim::{SimDisk, SimFile, SimRng, SimStats};

/// How a file is opened: the handful of ways the log opens files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// An existing file, to read.
    Read,
    /// An existing file, to read and append to (a segment resumed, a torn tail cut).
    Append,
    /// A file created if it is missing, to append to (the reserve).
    AppendOrCreate,
    /// A new file, which must not exist, to read and append to (a new segment).
    CreateNew,
    /// A file created or emptied, to write from its start (`CURRENT`, `MANIFEST`).
    Truncate,
}

/// An open file. Writes take `&self`, as they do on `&std::fs::File`, so that a segment can be
/// shared between the worker that appends and the flusher that syncs it.
pub trait DiskFile: Read + Seek + Send + Sync + std::fmt::Debug + 'static {
    /// Appends all of `buf` (every write the log makes is an append; a file opened with
    /// [`Open::Truncate`] is empty). On an error part of it may have been written, as with
    /// `write_all`.
    fn append_all(&self, buf: &[u8]) -> io::Result<()>;
    /// `fdatasync`: the file's data is durable once this returns.
    fn sync_data(&self) -> io::Result<()>;
    /// `fsync`: the file's data and metadata are durable once this returns.
    fn sync_all(&self) -> io::Result<()>;
    /// Cuts the file to `len` bytes (or extends it with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Bytes in the file.
    fn size(&self) -> io::Result<u64>;
}

/// A file system. Paths are plain paths; the simulated disk keys its files by them.
pub trait Disk: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// Its open files.
    type File: DiskFile;
    /// Opens `path` as `how` says.
    fn open(&self, path: &Path, how: Open) -> io::Result<Self::File>;
    /// The length of the file at `path` (`fs::metadata(path)?.len()`).
    fn file_len(&self, path: &Path) -> io::Result<u64>;
    /// Whether `path` is a directory (`Path::is_dir`: `false` on any error).
    fn is_dir(&self, path: &Path) -> bool;
    /// Whether anything is at `path` (`Path::exists`).
    fn exists(&self, path: &Path) -> bool;
    /// The names in the directory `path`, in no particular order.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>>;
    /// Creates a directory and its missing parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes an empty directory.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Renames a file or directory, replacing a file at `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes a directory's entries (created, renamed, deleted files) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system, through `std::fs`. The default disk everywhere.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OsDisk;

impl DiskFile for File {
    #[inline]
    fn append_all(&self, buf: &[u8]) -> io::Result<()> {
        (&*self).write_all(buf)
    }

    #[inline]
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    #[inline]
    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }

    #[inline]
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    #[inline]
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl Disk for OsDisk {
    type File = File;

    fn open(&self, path: &Path, how: Open) -> io::Result<File> {
        let mut o = OpenOptions::new();
        match how {
            Open::Read => o.read(true),
            Open::Append => o.read(true).append(true),
            Open::AppendOrCreate => o.create(true).append(true),
            Open::CreateNew => o.create_new(true).read(true).append(true),
            Open::Truncate => o.create(true).write(true).truncate(true),
        };
        o.open(path)
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(path)? {
            names.push(entry?.file_name());
        }
        Ok(names)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}
