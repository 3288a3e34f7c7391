//! A simulated disk: deterministic, in memory, with the faults of a real one.
//!
//! # What it models
//!
//! * **Written is not synced.** Each file keeps the bytes written and the bytes made durable by
//!   `sync_data`/`sync_all`. [`SimDisk::crash`] keeps what was synced and of the rest a random
//!   prefix (a torn write), possibly with its last bytes garbled and possibly with a hole of
//!   zeros in it (a page that did not reach the disk while a later one did), so a crash tears
//!   only what was not synced.
//! * **A file's name is not its data.** Creating, renaming and removing a file change the
//!   directory at once, but durably only once `sync_dir` of its directory returns. A crash keeps a
//!   random prefix of each directory's changes since its last `sync_dir`, in order: a new file may
//!   vanish, a removed one come back, a rename is undone, but a rename is never half done (POSIX
//!   makes it atomic) and an older change is never lost while a newer one is kept (an ordered
//!   metadata journal, as ext4 and XFS have). A rename across directories counts as a change of
//!   the directory it moves to.
//! * **Faults on demand**, switched at any time: a full disk ([`SimDisk::set_capacity`]: writes
//!   past it write what fits and fail with `ENOSPC`, the kernel's error, which
//!   [`crate::wal::is_no_space`] recognises); failing syncs ([`SimDisk::fail_syncs`]: the next
//!   N syncs fail with `EIO` and make nothing durable, as Linux may drop the pages); and bit
//!   flips in data already on the medium ([`SimDisk::flip_bit`], [`SimDisk::flip_random_bit`]).
//! * **A crashed process is gone.** Handles opened before a crash, and clones of the disk
//!   made before it, fail every operation afterwards, so a store dropped after a crash cannot
//!   write on the disk the next run recovers from.
//!
//! # What it does not model
//!
//! Directories themselves are durable at once (`create_dir_all`, `remove_dir`,
//! `remove_dir_all`, renaming a directory): dsplane syncs the directories whose entries matter
//! (a segment's, a generation's) and a lost directory shows up as a missing file anyway. Time
//! is the simulator's business: [`SimDisk::stats`] counts bytes written and syncs so it can
//! charge latency. There are no misdirected writes, no lying `fsync`, and no locks
//! (`flock` is not part of [`Disk`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Disk, DiskFile, Open};

/// `ENOSPC`, as the kernel returns it.
const ENOSPC: i32 = 28;
/// `EIO`.
const EIO: i32 = 5;
/// `EBADF`: a write on a file opened to read.
const EBADF: i32 = 9;
/// Most bytes at the end of a torn write that a crash garbles.
const GARBLED_BYTES_MAX: u64 = 8;

/// A small seedable random number generator (splitmix64): every fault a simulation injects
/// comes from one seed, so that a run can be replayed.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// `true` once in `n` times.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// What a simulated disk has done, for a simulator to charge time for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Bytes written to files.
    pub bytes_written: u64,
    /// `sync_data`/`sync_all` calls that succeeded.
    pub syncs: u64,
    /// `sync_dir` calls that succeeded.
    pub dir_syncs: u64,
    /// Syncs (of files or directories) that failed because [`SimDisk::fail_syncs`] said so.
    pub sync_errors: u64,
    /// Writes refused for want of space.
    pub no_space_errors: u64,
    /// Crashes.
    pub crashes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Dir,
    File(u64),
}

/// A change to a directory not yet made durable by `sync_dir`.
#[derive(Debug, Clone)]
enum DirOp {
    Link(PathBuf, u64),
    Unlink(PathBuf),
    Rename(PathBuf, PathBuf, u64),
}

#[derive(Debug, Default)]
struct Inode {
    /// What reads see.
    data: Vec<u8>,
    /// What a crash keeps for sure.
    durable: Vec<u8>,
    /// `data` and `durable` agree on this many bytes.
    common: usize,
}

#[derive(Debug, Default)]
struct State {
    epoch: u64,
    next_ino: u64,
    inodes: BTreeMap<u64, Inode>,
    /// The namespace as it is.
    entries: BTreeMap<PathBuf, Entry>,
    /// The namespace a crash falls back to, less the changes it keeps.
    durable: BTreeMap<PathBuf, Entry>,
    /// Per directory, its changes since its last `sync_dir`.
    pending: BTreeMap<PathBuf, Vec<DirOp>>,
    capacity: Option<u64>,
    sync_failures: u64,
    /// Operations left before the process dies ([`SimDisk::die_after`]).
    die_after: Option<u64>,
    stats: SimStats,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory (simulated)", path.display()),
    )
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `p` with its prefix `from` replaced by `to`.
fn rebase(p: &Path, from: &Path, to: &Path) -> PathBuf {
    match p.strip_prefix(from) {
        Ok(rest) if rest.as_os_str().is_empty() => to.to_path_buf(),
        Ok(rest) => to.join(rest),
        Err(_) => p.to_path_buf(),
    }
}

fn rebase_keys<V>(map: &mut BTreeMap<PathBuf, V>, from: &Path, to: &Path) {
    let moved: Vec<PathBuf> = map
        .keys()
        .filter(|k| k.starts_with(from))
        .cloned()
        .collect();
    for k in moved {
        if let Some(v) = map.remove(&k) {
            map.insert(rebase(&k, from, to), v);
        }
    }
}

fn apply(namespace: &mut BTreeMap<PathBuf, Entry>, op: &DirOp) {
    match op {
        DirOp::Link(path, ino) => {
            namespace.insert(path.clone(), Entry::File(*ino));
        }
        DirOp::Unlink(path) => {
            namespace.remove(path);
        }
        DirOp::Rename(from, to, ino) => {
            namespace.remove(from);
            namespace.insert(to.clone(), Entry::File(*ino));
        }
    }
}

impl State {
    /// Whether `dir` can hold entries: a directory, or the root of the namespace.
    fn is_dir_or_root(&self, dir: &Path) -> bool {
        dir.parent().is_none()
            || dir.as_os_str().is_empty()
            || self.entries.get(dir) == Some(&Entry::Dir)
    }

    fn used(&self) -> u64 {
        self.entries
            .values()
            .filter_map(|e| match e {
                Entry::File(ino) => self.inodes.get(ino),
                Entry::Dir => None,
            })
            .map(|i| i.data.len() as u64)
            .sum()
    }

    fn link_new(&mut self, path: &Path) -> io::Result<u64> {
        let parent = parent_of(path);
        if !self.is_dir_or_root(&parent) {
            return Err(not_found(&parent));
        }
        self.next_ino += 1;
        let ino = self.next_ino;
        self.inodes.insert(ino, Inode::default());
        self.entries.insert(path.to_path_buf(), Entry::File(ino));
        self.pending
            .entry(parent)
            .or_default()
            .push(DirOp::Link(path.to_path_buf(), ino));
        Ok(ino)
    }

    fn sync_failure(&mut self) -> io::Result<()> {
        if self.sync_failures > 0 {
            self.sync_failures -= 1;
            self.stats.sync_errors += 1;
            return Err(io::Error::from_raw_os_error(EIO));
        }
        Ok(())
    }

    /// Drops the files no name refers to any more, in either namespace.
    fn collect_garbage(&mut self) {
        let mut live: Vec<u64> = self
            .entries
            .values()
            .chain(self.durable.values())
            .filter_map(|e| match e {
                Entry::File(ino) => Some(*ino),
                Entry::Dir => None,
            })
            .collect();
        live.sort_unstable();
        self.inodes.retain(|ino, _| live.binary_search(ino).is_ok());
    }
}

/// A simulated disk. Clones share one disk (`Arc<Mutex<..>>`), so a simulator can hold it
/// while stores write on it, crash it, and recover from it again. See the module
/// documentation for what it models.
#[derive(Debug, Clone)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
    /// The process this handle belongs to: every operation fails once the disk has crashed
    /// since.
    epoch: u64,
}

impl Default for SimDisk {
    fn default() -> Self {
        SimDisk::new()
    }
}

impl SimDisk {
    /// An empty disk with no limit on space and no faults.
    pub fn new() -> SimDisk {
        SimDisk {
            state: Arc::new(Mutex::new(State::default())),
            epoch: 0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, for an operation of this handle's process.
    fn live(&self) -> io::Result<MutexGuard<'_, State>> {
        let mut state = self.lock();
        if state.epoch != self.epoch {
            return Err(io::Error::other(
                "simulated disk: this handle belongs to a process that crashed",
            ));
        }
        if let Some(left) = state.die_after.as_mut() {
            if *left == 0 {
                return Err(io::Error::other(
                    "simulated disk: the process died here (SimDisk::die_after)",
                ));
            }
            *left -= 1;
        }
        Ok(state)
    }

    /// The process dies after `ops` more operations on the disk (any handle): from then on
    /// every operation fails, until [`SimDisk::crash`]. A simulator sets it to kill a process in
    /// the middle of something, a recovery say, at an operation chosen by its seed.
    pub fn die_after(&self, ops: u64) {
        self.lock().die_after = Some(ops);
    }

    /// Whether the process died ([`SimDisk::die_after`] ran out) and the disk waits for its
    /// [`SimDisk::crash`].
    pub fn has_died(&self) -> bool {
        self.lock().die_after == Some(0)
    }

    /// No death pending any more.
    pub fn live_on(&self) {
        self.lock().die_after = None;
    }

    /// Power loss: what was not synced is lost or torn (see the module documentation), and
    /// every handle and clone made before is dead. This handle goes on with the disk.
    pub fn crash(&mut self, rng: &mut SimRng) {
        let shared = Arc::clone(&self.state);
        let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
        state.die_after = None;
        state.epoch += 1;
        state.stats.crashes += 1;
        self.epoch = state.epoch;
        let pending = std::mem::take(&mut state.pending);
        for ops in pending.values() {
            let kept = rng.below(ops.len() as u64 + 1) as usize;
            for op in ops.iter().take(kept) {
                apply(&mut state.durable, op);
            }
        }
        state.entries = state.durable.clone();
        state.collect_garbage();
        for inode in state.inodes.values_mut() {
            let common = inode.common.min(inode.data.len());
            let torn = inode.durable.len() <= common || rng.one_in(2);
            if torn {
                let tail = inode.data.get(common..).unwrap_or_default();
                let kept = rng.below(tail.len() as u64 + 1) as usize;
                let mut after = inode.data.get(..common).unwrap_or_default().to_vec();
                after.extend_from_slice(tail.get(..kept).unwrap_or_default());
                if kept > 0 && rng.one_in(2) {
                    let garbled = 1 + rng.below(GARBLED_BYTES_MAX.min(kept as u64)) as usize;
                    let from = after.len() - garbled;
                    for b in after.iter_mut().skip(from) {
                        *b = rng.next_u64() as u8;
                    }
                }
                if kept > 1 && rng.one_in(4) {
                    // A page that did not reach the disk while a later one did.
                    let at = common + rng.below(kept as u64) as usize;
                    let hole = 1 + rng.below((common + kept - at) as u64) as usize;
                    for b in after.iter_mut().skip(at).take(hole) {
                        *b = 0;
                    }
                }
                inode.data = after;
            } else {
                // A cut or an overwrite that was not synced is undone.
                inode.data = inode.durable.clone();
            }
            inode.durable = inode.data.clone();
            inode.common = inode.data.len();
        }
    }

    /// Bytes the files may hold in all (`None`: no limit). Writes past it write what fits and
    /// fail with `ENOSPC`; a limit below what is held already only refuses writes.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().capacity = bytes;
    }

    /// A full disk: no byte more fits until files are removed or [`Self::set_capacity`] is
    /// called again.
    pub fn fill(&self) {
        let mut state = self.lock();
        state.capacity = Some(state.used());
    }

    /// Bytes the files hold.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used()
    }

    /// The next `n` syncs (`sync_data`, `sync_all`, `sync_dir`) fail with `EIO` and make
    /// nothing durable.
    pub fn fail_syncs(&self, n: u64) {
        self.lock().sync_failures = n;
    }

    /// Flips bit `bit` (0–7) of byte `offset` of the file at `path`, on the medium: a crash
    /// keeps the flip when the byte was synced.
    pub fn flip_bit(&self, path: &Path, offset: u64, bit: u8) -> io::Result<()> {
        let mut state = self.lock();
        let Some(Entry::File(ino)) = state.entries.get(path).copied() else {
            return Err(not_found(path));
        };
        let Some(inode) = state.inodes.get_mut(&ino) else {
            return Err(not_found(path));
        };
        let mask = 1u8 << (bit % 8);
        let at = offset as usize;
        let Some(b) = inode.data.get_mut(at) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: offset {offset} is past the end", path.display()),
            ));
        };
        *b ^= mask;
        if let Some(b) = inode.durable.get_mut(at) {
            *b ^= mask;
        }
        Ok(())
    }

    /// Flips one random bit in the synced bytes of a random file that `which` accepts (at
    /// byte `skip` or later); the file and offset, or `None` if there is no such byte.
    pub fn flip_random_bit(
        &self,
        rng: &mut SimRng,
        skip: u64,
        which: impl Fn(&Path) -> bool,
    ) -> Option<(PathBuf, u64)> {
        let candidates: Vec<(PathBuf, u64)> = {
            let state = self.lock();
            state
                .entries
                .iter()
                .filter(|(path, _)| which(path))
                .filter_map(|(path, e)| match e {
                    Entry::File(ino) => state.inodes.get(ino).map(|i| (path.clone(), i)),
                    Entry::Dir => None,
                })
                .map(|(path, i)| (path, i.common.min(i.durable.len()) as u64))
                .filter(|(_, synced)| *synced > skip)
                .collect()
        };
        let (path, synced) = candidates.get(rng.below(candidates.len() as u64) as usize)?;
        let offset = skip + rng.below(synced - skip);
        self.flip_bit(path, offset, rng.below(8) as u8).ok()?;
        Some((path.clone(), offset))
    }

    /// What the disk has done.
    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }

    /// The bytes of the file at `path` as reads see them (for tests and checks).
    pub fn contents(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.lock();
        match state.entries.get(path) {
            Some(Entry::File(ino)) => Ok(state
                .inodes
                .get(ino)
                .map(|i| i.data.clone())
                .unwrap_or_default()),
            _ => Err(not_found(path)),
        }
    }

    /// Bytes of the file at `path` that a crash keeps for sure.
    pub fn synced_len(&self, path: &Path) -> io::Result<u64> {
        let state = self.lock();
        match state.entries.get(path) {
            Some(Entry::File(ino)) => Ok(state
                .inodes
                .get(ino)
                .map_or(0, |i| i.common.min(i.durable.len()) as u64)),
            _ => Err(not_found(path)),
        }
    }

    /// Every file, in path order.
    pub fn files(&self) -> Vec<PathBuf> {
        self.lock()
            .entries
            .iter()
            .filter(|(_, e)| matches!(e, Entry::File(_)))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Writes `bytes` as the whole file at `path`, synced and durably named (a test's setup).
    pub fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let file = self.open(path, Open::Truncate)?;
        file.append_all(bytes)?;
        file.sync_all()?;
        self.sync_dir(&parent_of(path))
    }
}

impl Disk for SimDisk {
    type File = SimFile;

    fn open(&self, path: &Path, how: Open) -> io::Result<SimFile> {
        let mut state = self.live()?;
        let ino = match (state.entries.get(path).copied(), how) {
            (Some(Entry::Dir), _) => {
                return Err(io::Error::new(
                    io::ErrorKind::IsADirectory,
                    format!("{}: is a directory (simulated)", path.display()),
                ))
            }
            (Some(Entry::File(_)), Open::CreateNew) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: file exists (simulated)", path.display()),
                ))
            }
            (Some(Entry::File(ino)), _) => ino,
            (None, Open::Read | Open::Append) => return Err(not_found(path)),
            (None, Open::AppendOrCreate | Open::CreateNew | Open::Truncate) => {
                state.link_new(path)?
            }
        };
        if how == Open::Truncate {
            if let Some(inode) = state.inodes.get_mut(&ino) {
                inode.data.clear();
                inode.common = 0;
            }
        }
        Ok(SimFile {
            disk: self.clone(),
            ino,
            pos: 0,
            writable: how != Open::Read,
        })
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        let state = self.live()?;
        match state.entries.get(path) {
            Some(Entry::File(ino)) => Ok(state.inodes.get(ino).map_or(0, |i| i.data.len() as u64)),
            Some(Entry::Dir) => Ok(0),
            None => Err(not_found(path)),
        }
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.live()
            .is_ok_and(|s| s.entries.get(path) == Some(&Entry::Dir))
    }

    fn exists(&self, path: &Path) -> bool {
        self.live().is_ok_and(|s| s.entries.contains_key(path))
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let state = self.live()?;
        match state.entries.get(path) {
            Some(Entry::Dir) => {}
            Some(Entry::File(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("{}: not a directory (simulated)", path.display()),
                ))
            }
            None if state.is_dir_or_root(path) => {}
            None => return Err(not_found(path)),
        }
        Ok(state
            .entries
            .keys()
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
            .collect())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.live()?;
        let mut missing = Vec::new();
        for dir in path.ancestors() {
            if dir.parent().is_none() || dir.as_os_str().is_empty() {
                break;
            }
            match state.entries.get(dir) {
                Some(Entry::Dir) => break,
                Some(Entry::File(_)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{}: a file is in the way (simulated)", dir.display()),
                    ))
                }
                None => missing.push(dir.to_path_buf()),
            }
        }
        for dir in missing {
            state.entries.insert(dir.clone(), Entry::Dir);
            state.durable.insert(dir, Entry::Dir);
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.live()?;
        match state.entries.get(path) {
            Some(Entry::File(_)) => {}
            Some(Entry::Dir) => {
                return Err(io::Error::new(
                    io::ErrorKind::IsADirectory,
                    format!("{}: is a directory (simulated)", path.display()),
                ))
            }
            None => return Err(not_found(path)),
        }
        state.entries.remove(path);
        state
            .pending
            .entry(parent_of(path))
            .or_default()
            .push(DirOp::Unlink(path.to_path_buf()));
        Ok(())
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.live()?;
        if state.entries.get(path) != Some(&Entry::Dir) {
            return Err(not_found(path));
        }
        if state.entries.keys().any(|p| p.parent() == Some(path)) {
            return Err(io::Error::new(
                io::ErrorKind::DirectoryNotEmpty,
                format!("{}: directory not empty (simulated)", path.display()),
            ));
        }
        state.entries.remove(path);
        state.durable.retain(|p, _| !p.starts_with(path));
        state.pending.retain(|p, _| !p.starts_with(path));
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.live()?;
        if state.entries.get(path) != Some(&Entry::Dir) {
            return Err(not_found(path));
        }
        state.entries.retain(|p, _| !p.starts_with(path));
        state.durable.retain(|p, _| !p.starts_with(path));
        state.pending.retain(|p, _| !p.starts_with(path));
        state.collect_garbage();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.live()?;
        match (state.entries.get(from).copied(), state.entries.get(to)) {
            (None, _) => Err(not_found(from)),
            (Some(Entry::File(_)), Some(Entry::Dir)) => Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{}: is a directory (simulated)", to.display()),
            )),
            (Some(Entry::File(ino)), _) => {
                if !state.is_dir_or_root(&parent_of(to)) {
                    return Err(not_found(&parent_of(to)));
                }
                state.entries.remove(from);
                state.entries.insert(to.to_path_buf(), Entry::File(ino));
                state
                    .pending
                    .entry(parent_of(to))
                    .or_default()
                    .push(DirOp::Rename(from.to_path_buf(), to.to_path_buf(), ino));
                Ok(())
            }
            (Some(Entry::Dir), Some(_)) => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists (simulated)", to.display()),
            )),
            (Some(Entry::Dir), None) => {
                // Directories are durable at once (see the module documentation).
                rebase_keys(&mut state.entries, from, to);
                rebase_keys(&mut state.durable, from, to);
                rebase_keys(&mut state.pending, from, to);
                for ops in state.pending.values_mut() {
                    for op in ops.iter_mut() {
                        match op {
                            DirOp::Link(p, _) | DirOp::Unlink(p) => *p = rebase(p, from, to),
                            DirOp::Rename(a, b, _) => {
                                *a = rebase(a, from, to);
                                *b = rebase(b, from, to);
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.live()?;
        if !state.is_dir_or_root(dir) {
            return Err(not_found(dir));
        }
        state.sync_failure()?;
        if let Some(ops) = state.pending.remove(dir) {
            for op in &ops {
                apply(&mut state.durable, op);
            }
        }
        state.stats.dir_syncs += 1;
        state.collect_garbage();
        Ok(())
    }
}

/// An open file of a [`SimDisk`].
#[derive(Debug)]
pub struct SimFile {
    disk: SimDisk,
    ino: u64,
    /// Where the next read is. Every write is an append: a file opened with
    /// [`Open::Truncate`] is empty, so writing it from its start is appending to it.
    pos: u64,
    writable: bool,
}

impl SimFile {
    fn with_inode<T>(&self, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        let mut state = self.disk.live()?;
        if !state.inodes.contains_key(&self.ino) {
            // Removed and collected: a removed file stays readable while it is open on a real
            // disk, but nothing in dsplane reads a file after removing it.
            return Err(io::Error::from_raw_os_error(EIO));
        }
        f(&mut state, self.ino)
    }

    fn sync(&self) -> io::Result<()> {
        self.with_inode(|state, ino| {
            state.sync_failure()?;
            if let Some(i) = state.inodes.get_mut(&ino) {
                let common = i.common.min(i.data.len());
                i.durable.truncate(common);
                i.durable
                    .extend_from_slice(i.data.get(common..).unwrap_or_default());
                i.common = i.data.len();
            }
            state.stats.syncs += 1;
            Ok(())
        })
    }
}

impl DiskFile for SimFile {
    fn append_all(&self, buf: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(EBADF));
        }
        self.with_inode(|state, ino| {
            let room = match state.capacity {
                Some(cap) => cap.saturating_sub(state.used()),
                None => u64::MAX,
            };
            let fits = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            if let Some(i) = state.inodes.get_mut(&ino) {
                i.data
                    .extend_from_slice(buf.get(..fits).unwrap_or_default());
            }
            state.stats.bytes_written += fits as u64;
            if fits < buf.len() {
                state.stats.no_space_errors += 1;
                return Err(io::Error::from_raw_os_error(ENOSPC));
            }
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.sync()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(EBADF));
        }
        self.with_inode(|state, ino| {
            if let Some(i) = state.inodes.get_mut(&ino) {
                let len = len as usize;
                i.data.resize(len, 0);
                i.common = i.common.min(len);
            }
            Ok(())
        })
    }

    fn size(&self) -> io::Result<u64> {
        self.with_inode(|state, ino| Ok(state.inodes.get(&ino).map_or(0, |i| i.data.len() as u64)))
    }
}

impl Read for SimFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let pos = self.pos as usize;
        let n = self.with_inode(|state, ino| {
            let data = state
                .inodes
                .get(&ino)
                .map(|i| i.data.as_slice())
                .unwrap_or_default();
            let rest = data.get(pos..).unwrap_or_default();
            let n = rest.len().min(buf.len());
            if let (Some(dst), Some(src)) = (buf.get_mut(..n), rest.get(..n)) {
                dst.copy_from_slice(src);
            }
            Ok(n)
        })?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SimFile {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let len = self.size()?;
        let target = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(d) => len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let Some(target) = target else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative position",
            ));
        };
        self.pos = target;
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::is_no_space;

    fn dir() -> PathBuf {
        PathBuf::from("/sim/d")
    }

    fn disk_with_dir() -> SimDisk {
        let disk = SimDisk::new();
        disk.create_dir_all(&dir()).unwrap();
        disk
    }

    #[test]
    fn unsynced_bytes_are_lost_or_torn_and_synced_ones_kept() {
        let mut saw_loss = false;
        for seed in 0..64 {
            let mut disk = disk_with_dir();
            let path = dir().join("f");
            let f = disk.open(&path, Open::CreateNew).unwrap();
            f.append_all(b"synced--").unwrap();
            f.sync_data().unwrap();
            disk.sync_dir(&dir()).unwrap();
            f.append_all(b"not synced").unwrap();
            assert_eq!(disk.synced_len(&path).unwrap(), 8);
            disk.crash(&mut SimRng::new(seed));
            let after = disk.contents(&path).unwrap();
            assert_eq!(after.get(..8), Some(&b"synced--"[..]), "seed {seed}");
            assert!(after.len() <= 18, "seed {seed}");
            saw_loss |= after.len() < 18;
        }
        assert!(saw_loss, "some crash must lose unsynced bytes");
    }

    #[test]
    fn a_crash_kills_every_handle_made_before_it() {
        let mut disk = disk_with_dir();
        let old = disk.clone();
        let f = disk.open(&dir().join("f"), Open::CreateNew).unwrap();
        disk.crash(&mut SimRng::new(1));
        assert!(f.append_all(b"x").is_err());
        assert!(old.create_dir_all(Path::new("/sim/e")).is_err());
        assert!(disk.create_dir_all(Path::new("/sim/e")).is_ok());
    }

    #[test]
    fn a_file_whose_directory_was_not_synced_may_vanish_and_a_rename_is_atomic() {
        let (mut vanished, mut kept) = (false, false);
        for seed in 0..64 {
            let mut disk = disk_with_dir();
            disk.write_file(&dir().join("CURRENT"), b"old").unwrap();
            let new = disk.open(&dir().join("new"), Open::CreateNew).unwrap();
            new.sync_all().unwrap();
            let tmp = disk
                .open(&dir().join("CURRENT.tmp"), Open::Truncate)
                .unwrap();
            tmp.append_all(b"new").unwrap();
            tmp.sync_all().unwrap();
            disk.rename(&dir().join("CURRENT.tmp"), &dir().join("CURRENT"))
                .unwrap();
            disk.crash(&mut SimRng::new(seed));
            let current = disk.contents(&dir().join("CURRENT")).unwrap();
            assert!(current == b"old" || current == b"new", "seed {seed}");
            let exists = disk.exists(&dir().join("new"));
            vanished |= !exists;
            kept |= exists;
        }
        assert!(vanished && kept);
        // Once the directory is synced, the name is durable; a removal not synced may be
        // undone.
        let (mut back, mut gone) = (false, false);
        for seed in 0..64 {
            let mut disk = disk_with_dir();
            disk.open(&dir().join("seg"), Open::CreateNew).unwrap();
            disk.open(&dir().join("keep"), Open::CreateNew).unwrap();
            disk.sync_dir(&dir()).unwrap();
            disk.remove_file(&dir().join("seg")).unwrap();
            disk.crash(&mut SimRng::new(seed));
            assert!(disk.exists(&dir().join("keep")), "seed {seed}");
            let exists = disk.exists(&dir().join("seg"));
            back |= exists;
            gone |= !exists;
        }
        assert!(back && gone);
    }

    #[test]
    fn a_full_disk_fails_writes_with_enospc_after_writing_what_fits() {
        let disk = disk_with_dir();
        let f = disk.open(&dir().join("f"), Open::CreateNew).unwrap();
        f.append_all(b"12345").unwrap();
        disk.set_capacity(Some(8));
        let e = f.append_all(b"6789").unwrap_err();
        assert!(is_no_space(&e), "{e:?}");
        assert_eq!(e.raw_os_error(), Some(28));
        assert_eq!(disk.contents(&dir().join("f")).unwrap(), b"12345678");
        disk.fill();
        assert!(is_no_space(&f.append_all(b"x").unwrap_err()));
        // Space comes back when files go.
        disk.remove_file(&dir().join("f")).unwrap();
        let g = disk.open(&dir().join("g"), Open::CreateNew).unwrap();
        g.append_all(b"abcdefgh").unwrap();
        assert_eq!(disk.stats().no_space_errors, 2);
    }

    #[test]
    fn a_sync_error_is_returned_as_often_as_asked_and_makes_nothing_durable() {
        let disk = disk_with_dir();
        let path = dir().join("f");
        let f = disk.open(&path, Open::CreateNew).unwrap();
        f.append_all(b"abc").unwrap();
        disk.fail_syncs(1);
        let e = f.sync_data().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(5));
        assert_eq!(disk.synced_len(&path).unwrap(), 0);
        f.sync_data().unwrap();
        assert_eq!(disk.synced_len(&path).unwrap(), 3);
        assert_eq!(disk.stats().sync_errors, 1);
        assert_eq!(disk.stats().syncs, 1);
    }

    #[test]
    fn a_flipped_bit_in_synced_bytes_survives_a_crash() {
        let mut disk = disk_with_dir();
        let path = dir().join("f.wal");
        disk.write_file(&path, &[0u8; 32]).unwrap();
        disk.flip_bit(&path, 3, 2).unwrap();
        let mut rng = SimRng::new(9);
        let (flipped, at) = disk
            .flip_random_bit(&mut rng, 16, |p| p.extension().is_some_and(|e| e == "wal"))
            .unwrap();
        assert_eq!(flipped, path);
        assert!((16..32).contains(&at));
        disk.crash(&mut rng);
        let bytes = disk.contents(&path).unwrap();
        assert_eq!(bytes[3], 4);
        assert_ne!(bytes[at as usize], 0);
    }

    #[test]
    fn a_crash_is_replayed_from_its_seed() {
        let run = |seed| {
            let mut disk = disk_with_dir();
            let f = disk.open(&dir().join("f"), Open::CreateNew).unwrap();
            f.append_all(&[7u8; 4096]).unwrap();
            disk.sync_dir(&dir()).unwrap();
            disk.crash(&mut SimRng::new(seed));
            disk.contents(&dir().join("f")).unwrap()
        };
        assert_eq!(run(42), run(42));
    }
}
