//! The data directory: which generation of logs is current, and which engine holds it.
//!
//! # Layout
//!
//! ```text
//! data_dir/LOCK          flock'ed by the running engine; holds its pid
//! data_dir/CURRENT       names the current generation (a checked copy of its MANIFEST)
//! data_dir/gen-N/MANIFEST  the generation's facts: number, workers, lane mode, checksum
//! data_dir/gen-N/wK/     worker K's write-ahead log (see `crate::wal`)
//! ```
//!
//! # Surviving damage to any one small file
//!
//! `CURRENT` and each generation's `MANIFEST` say the same thing, each with its own crc32c.
//! A generation is complete once its `MANIFEST` is durable; `CURRENT` is written after it. So
//! the current generation is found from the directories, with `CURRENT` as a checked hint:
//!
//! * `CURRENT` intact: its generation, or a newer complete one (a crash between writing the
//!   new `MANIFEST` and `CURRENT`). If the generation it names is gone, dsplane refuses.
//! * `CURRENT` missing or damaged: the newest complete generation, with a warning, and
//!   `CURRENT` is written again. With no generation directory at all, a missing `CURRENT`
//!   means a new data directory; a damaged one is refused.
//! * the named generation's `MANIFEST` damaged: `CURRENT` holds the same facts.
//!
//! Whatever cannot be determined is refused with the file and the problem named, and nothing
//! is deleted. Generations other than the current one (a half-made one left by a crash during
//! recovery, or an old one whose deletion was interrupted) are listed as stale and deleted only
//! once recovery has succeeded.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::disk::{Disk, DiskFile, Open, OsDisk};
use crate::wal::{self, WalError};

/// The file naming the current generation.
pub const CURRENT: &str = "CURRENT";
/// The file of a generation's facts, inside `gen-N`.
pub const MANIFEST: &str = "MANIFEST";
/// The lock file of the running engine.
pub const LOCK: &str = "LOCK";
/// Longest `CURRENT` or `MANIFEST` read; anything longer is damaged.
const SMALL_FILE_BYTES_MAX: u64 = 4096;
/// First line of `CURRENT` and `MANIFEST`.
const MANIFEST_TAG: &str = "dsplane-log 2";

/// The facts of one generation of logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manifest {
    /// Its number (`gen-N`).
    pub generation: u64,
    /// Workers, one log each (`w0` …).
    pub workers: usize,
    /// Whether lanes are the one FIFO queue (`scheduling = "fifo"`) rather than levels.
    pub fifo: bool,
}

impl Manifest {
    fn body(&self) -> String {
        format!(
            "{MANIFEST_TAG}\ngeneration {}\nworkers {}\nlanes {}\n",
            self.generation,
            self.workers,
            if self.fifo { "fifo" } else { "levels" }
        )
    }

    /// The text of `CURRENT` and `MANIFEST`: the facts and a crc32c of them.
    pub fn encode(&self) -> String {
        let body = self.body();
        format!("{body}crc32c {:08x}\n", crc32c::crc32c(body.as_bytes()))
    }

    /// Reads the text of `CURRENT` or `MANIFEST`, or says what is wrong with it.
    pub fn decode(text: &[u8]) -> Result<Manifest, &'static str> {
        let text = std::str::from_utf8(text).map_err(|_| "not text")?;
        let (body, crc_line) = match text.trim_end_matches('\n').rsplit_once('\n') {
            Some((body, crc)) => (format!("{body}\n"), crc),
            None => return Err("too short"),
        };
        let crc = crc_line.strip_prefix("crc32c ").ok_or("no checksum line")?;
        if crc != format!("{:08x}", crc32c::crc32c(body.as_bytes())) {
            return Err("checksum mismatch");
        }
        let mut lines = body.lines();
        if lines.next() != Some(MANIFEST_TAG) {
            return Err("unknown format");
        }
        let mut field = |name: &str| -> Result<&str, &'static str> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .ok_or("a field is missing")
        };
        let generation = field("generation")?.parse().map_err(|_| "bad generation")?;
        let workers = field("workers")?.parse().map_err(|_| "bad workers")?;
        let fifo = match field("lanes")? {
            "fifo" => true,
            "levels" => false,
            _ => return Err("bad lanes"),
        };
        if generation == 0 || workers == 0 {
            return Err("generation and workers must be at least 1");
        }
        Ok(Manifest {
            generation,
            workers,
            fifo,
        })
    }
}

/// What a small file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Small {
    Missing,
    Damaged(&'static str),
    Intact(Manifest),
    /// The first format's `CURRENT`: a bare generation number.
    Legacy(u64),
}

fn read_small<D: Disk>(disk: &D, path: &Path) -> Result<Small, WalError> {
    let io_err = |source| WalError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match disk.open(path, Open::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Small::Missing),
        Err(e) => return Err(io_err(e)),
    };
    let mut text = Vec::new();
    file.take(SMALL_FILE_BYTES_MAX + 1)
        .read_to_end(&mut text)
        .map_err(io_err)?;
    if text.len() as u64 > SMALL_FILE_BYTES_MAX {
        return Ok(Small::Damaged("too long"));
    }
    if text.is_empty() {
        return Ok(Small::Damaged("empty"));
    }
    Ok(match Manifest::decode(&text) {
        Ok(m) => Small::Intact(m),
        Err(why) => match std::str::from_utf8(&text).ok().map(str::trim) {
            Some(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
                t.parse().map_or(Small::Damaged(why), Small::Legacy)
            }
            _ => Small::Damaged(why),
        },
    })
}

/// The directory of generation `n`.
pub fn gen_dir(data_dir: &Path, n: u64) -> PathBuf {
    data_dir.join(format!("gen-{n}"))
}

/// The directory of worker `w`'s log in a generation.
pub fn worker_dir(gen_dir: &Path, w: usize) -> PathBuf {
    gen_dir.join(format!("w{w}"))
}

/// The generation directories in `data_dir`, ascending: `gen-N`, and with `kept` also the
/// damaged generations a salvage set aside (`gen-N.salvaged-<time>`, counted as N).
pub(crate) fn list_generations<D: Disk>(
    disk: &D,
    data_dir: &Path,
    kept: bool,
) -> Result<Vec<u64>, WalError> {
    let mut out = Vec::new();
    let entries = match disk.read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(source) => {
            return Err(WalError::Io {
                path: data_dir.to_owned(),
                source,
            })
        }
    };
    for name in entries {
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("gen-")) else {
            continue;
        };
        let number = match rest.split_once(".salvaged-") {
            Some((n, _)) if kept => n,
            Some(_) => continue,
            None => rest,
        };
        if let (Ok(n), true) = (number.parse::<u64>(), disk.is_dir(&data_dir.join(&name))) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The state of a data directory, as found at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Nothing here yet: a new data directory.
    Fresh {
        /// Generation directories of a first start that stopped before its generation was
        /// complete (they never held a frame): deleted before the new one is made.
        leftovers: Vec<PathBuf>,
    },
    /// A generation of logs to recover.
    Generation {
        /// Its facts. For a first-format generation, `workers` counts its worker directories
        /// and `fifo` is unknown (`false`).
        manifest: Manifest,
        /// Written by the first format (`DSPLWAL1`, no `MANIFEST`).
        legacy: bool,
        /// What was repaired or noticed (each a sentence, for the log).
        notes: Vec<String>,
        /// `CURRENT` must be written again (it was missing, damaged or behind).
        rewrite_current: bool,
        /// Generation directories to delete once recovery has succeeded.
        stale: Vec<PathBuf>,
    },
}

/// Finds the current generation. See the module documentation for the rules.
pub fn resolve(data_dir: &Path) -> Result<Found, WalError> {
    resolve_on(&OsDisk, data_dir)
}

/// [`resolve`] on `disk`.
pub fn resolve_on<D: Disk>(disk: &D, data_dir: &Path) -> Result<Found, WalError> {
    let current_path = data_dir.join(CURRENT);
    let current = read_small(disk, &current_path)?;
    let generations = list_generations(disk, data_dir, false)?;
    let mut manifests = Vec::with_capacity(generations.len());
    for &g in &generations {
        let path = gen_dir(data_dir, g).join(MANIFEST);
        let state = match read_small(disk, &path)? {
            Small::Intact(m) if m.generation != g => Small::Damaged("names another generation"),
            Small::Legacy(_) => Small::Damaged("not a manifest"),
            s => s,
        };
        manifests.push((g, state));
    }
    let complete = manifests.iter().rev().find_map(|(_, s)| match s {
        Small::Intact(m) => Some(*m),
        _ => None,
    });
    let mut notes = Vec::new();
    let missing = |path: PathBuf, why: String| Err(WalError::Missing { path, why });

    let (manifest, legacy, rewrite_current) = match (&current, complete) {
        (Small::Intact(c), _) => {
            let dir = gen_dir(data_dir, c.generation);
            if !disk.is_dir(&dir) {
                return missing(
                    dir,
                    format!(
                        "{} names generation {}, but its directory is missing",
                        current_path.display(),
                        c.generation
                    ),
                );
            }
            match complete {
                Some(m) if m.generation > c.generation => {
                    notes.push(format!(
                        "generation {} is complete but {CURRENT} still named {} (a crash between the two); using {}",
                        m.generation, c.generation, m.generation
                    ));
                    (m, false, true)
                }
                _ => {
                    if let Some((_, s)) = manifests.iter().find(|(g, _)| *g == c.generation) {
                        if !matches!(s, Small::Intact(_)) {
                            notes.push(format!(
                                "{} is missing or damaged; {CURRENT} holds the same facts and is used instead",
                                dir.join(MANIFEST).display()
                            ));
                        }
                    }
                    (*c, false, false)
                }
            }
        }
        (Small::Legacy(n), None) => {
            let dir = gen_dir(data_dir, *n);
            if !disk.is_dir(&dir) {
                return missing(
                    dir,
                    format!(
                        "{} names generation {n}, but its directory is missing",
                        current_path.display()
                    ),
                );
            }
            let workers = worker_dirs_in(disk, &dir)?;
            let m = Manifest {
                generation: *n,
                workers: workers.max(1),
                fifo: false,
            };
            notes.push(format!(
                "generation {n} was written by the first log format; it is read and recovered into a new generation"
            ));
            (m, true, false)
        }
        (current, Some(m)) => {
            let why = describe(current);
            // A newer generation without an intact MANIFEST that holds frames may be the
            // current one, its MANIFEST damaged: with CURRENT damaged too, nothing says which.
            for &g in generations.iter().filter(|&&g| g > m.generation) {
                let dir = gen_dir(data_dir, g);
                if holds_frames(disk, &dir)? {
                    return missing(
                        dir.join(MANIFEST),
                        format!(
                            "{} {why}, and generation {g} holds frames but has no intact {MANIFEST}: it may be the current generation, so neither it nor generation {} is used",
                            current_path.display(),
                            m.generation
                        ),
                    );
                }
            }
            notes.push(format!(
                "{} {why}; generation {} was found from the directories and {CURRENT} is written again",
                current_path.display(),
                m.generation
            ));
            (m, false, true)
        }
        (Small::Missing, None) if generations.is_empty() => {
            return Ok(Found::Fresh {
                leftovers: Vec::new(),
            })
        }
        (Small::Missing, None) if no_frames(disk, data_dir, &generations)? => {
            // A first start that stopped before its generation was complete: it never took a
            // frame (the MANIFEST is written before any worker runs).
            return Ok(Found::Fresh {
                leftovers: generations.iter().map(|&g| gen_dir(data_dir, g)).collect(),
            });
        }
        (current, None) => {
            let why = describe(current);
            let path = if generations.is_empty() {
                current_path.clone()
            } else {
                data_dir.to_owned()
            };
            return missing(
                path,
                format!(
                    "{} {why} and no generation directory has an intact {MANIFEST}: which generation holds the log cannot be determined",
                    current_path.display()
                ),
            );
        }
    };
    let stale = generations
        .iter()
        .filter(|&&g| g != manifest.generation)
        .map(|&g| gen_dir(data_dir, g))
        .collect();
    Ok(Found::Generation {
        manifest,
        legacy,
        notes,
        rewrite_current,
        stale,
    })
}

fn no_frames<D: Disk>(disk: &D, data_dir: &Path, generations: &[u64]) -> Result<bool, WalError> {
    for &g in generations {
        if holds_frames(disk, &gen_dir(data_dir, g))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a generation directory may hold frames: an ENQUEUE record in any segment, or a
/// segment that cannot be read far enough to tell (of the first format, or with a bad
/// header). A torn SEGMENT_START of the current format holds none.
fn holds_frames<D: Disk>(disk: &D, dir: &Path) -> Result<bool, WalError> {
    let Ok(entries) = disk.read_dir(dir) else {
        return Ok(true);
    };
    let workers = entries
        .iter()
        .map(|name| dir.join(name))
        .filter(|p| disk.is_dir(p));
    for worker in workers {
        let segments = wal::list_segments_on(disk, &worker).map_err(|source| WalError::Io {
            path: worker.clone(),
            source,
        })?;
        for n in segments {
            let path = wal::segment_path(&worker, n);
            let Ok(mut reader) = wal::SegmentReader::open_on(disk, &path, 0) else {
                return Ok(true);
            };
            if reader.version() < 2 {
                return Ok(true);
            }
            while let Some((_, record)) = reader.next_record()? {
                if matches!(record, wal::Record::Enqueue { .. }) {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

fn describe(current: &Small) -> String {
    match current {
        Small::Missing => "is missing".to_string(),
        Small::Damaged(why) => format!("is damaged ({why})"),
        Small::Legacy(n) => {
            format!("holds a bare number ({n}) beside manifests of the current format")
        }
        Small::Intact(_) => "is intact".to_string(),
    }
}

/// How many worker logs a generation directory was made with, as far as its directories tell:
/// one more than the highest `wK` (so a missing `w0` beside a `w1` is still counted, and then
/// found missing).
pub(crate) fn worker_dirs_in<D: Disk>(disk: &D, dir: &Path) -> Result<usize, WalError> {
    let entries = disk.read_dir(dir).map_err(|source| WalError::Io {
        path: dir.to_owned(),
        source,
    })?;
    Ok(entries
        .iter()
        .filter(|name| disk.is_dir(&dir.join(name)))
        .filter_map(|name| {
            name.to_str()
                .and_then(|n| n.strip_prefix('w'))
                .and_then(|n| n.parse::<usize>().ok())
        })
        .max()
        .map_or(0, |w| w + 1))
}

/// Writes `text` to `path` atomically and durably: a temporary file, `fsync`, rename, `fsync`
/// of the directory.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    write_atomic_on(&OsDisk, path, text)
}

/// [`write_atomic`] on `disk`.
pub fn write_atomic_on<D: Disk>(disk: &D, path: &Path, text: &str) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let f = disk.open(&tmp, Open::Truncate)?;
    f.append_all(text.as_bytes())?;
    f.sync_all()?;
    disk.rename(&tmp, path)?;
    disk.sync_dir(dir)
}

/// Names `manifest`'s generation as current.
pub fn write_current(data_dir: &Path, manifest: &Manifest) -> io::Result<()> {
    write_current_on(&OsDisk, data_dir, manifest)
}

/// [`write_current`] on `disk`.
pub fn write_current_on<D: Disk>(disk: &D, data_dir: &Path, manifest: &Manifest) -> io::Result<()> {
    write_atomic_on(disk, &data_dir.join(CURRENT), &manifest.encode())
}

/// Writes a generation's `MANIFEST`: it is complete from then on.
pub fn write_manifest(data_dir: &Path, manifest: &Manifest) -> io::Result<()> {
    write_manifest_on(&OsDisk, data_dir, manifest)
}

/// [`write_manifest`] on `disk`.
pub fn write_manifest_on<D: Disk>(
    disk: &D,
    data_dir: &Path,
    manifest: &Manifest,
) -> io::Result<()> {
    write_atomic_on(
        disk,
        &gen_dir(data_dir, manifest.generation).join(MANIFEST),
        &manifest.encode(),
    )
}

/// The exclusive hold of one engine on its data directory (`flock` on `LOCK`), released when
/// dropped or when the process dies.
///
/// On real files only: it guards against a second engine process, which a simulation on
/// [`crate::disk::SimDisk`] (one process) does not have, so the simulator skips it.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock, or says which process holds it.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, String> {
        fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot create data_dir {}: {e}", data_dir.display()))?;
        let path = data_dir.join(LOCK);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                let holder = if pid.is_empty() {
                    "another process".to_string()
                } else {
                    format!("another dsplane (pid {pid})")
                };
                return Err(format!(
                    "data_dir {} is in use by {holder}: one engine per data_dir. Stop it, or give this one its own data_dir",
                    data_dir.display()
                ));
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(format!("cannot lock {}: {e}", path.display()))
            }
        }
        // The pid is for the message above; on a full disk it may not fit, and the lock holds
        // without it.
        let _ = file
            .set_len(0)
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()));
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("dsplane-datadir-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn generation(dir: &Path, n: u64) -> Manifest {
        let m = Manifest {
            generation: n,
            workers: 2,
            fifo: false,
        };
        fs::create_dir_all(gen_dir(dir, n)).unwrap();
        write_manifest(dir, &m).unwrap();
        m
    }

    #[test]
    fn a_manifest_round_trips_and_any_flipped_bit_is_found() {
        let m = Manifest {
            generation: 7,
            workers: 3,
            fifo: true,
        };
        let text = m.encode();
        assert_eq!(Manifest::decode(text.as_bytes()), Ok(m));
        for i in 0..text.len() * 8 {
            let mut bytes = text.clone().into_bytes();
            bytes[i / 8] ^= 1 << (i % 8);
            assert_ne!(Manifest::decode(&bytes), Ok(m), "bit {i}");
        }
    }

    #[test]
    fn an_empty_directory_is_fresh() {
        let dir = temp_dir("fresh");
        let fresh = Found::Fresh {
            leftovers: Vec::new(),
        };
        assert_eq!(resolve(&dir).unwrap(), fresh);
        assert_eq!(resolve(&dir.join("not-yet")).unwrap(), fresh);
    }

    #[test]
    fn a_damaged_or_missing_current_is_found_from_the_directories() {
        let dir = temp_dir("current");
        generation(&dir, 4);
        let m = generation(&dir, 5);
        write_current(&dir, &m).unwrap();
        let intact = fs::read(dir.join(CURRENT)).unwrap();
        let mut damages: Vec<Vec<u8>> =
            vec![b"".to_vec(), b"x".to_vec(), b"0".to_vec(), b"7".to_vec()];
        let mut flipped = intact.clone();
        flipped[20] ^= 0x04;
        damages.push(flipped);
        for damage in damages {
            fs::write(dir.join(CURRENT), &damage).unwrap();
            match resolve(&dir).unwrap() {
                Found::Generation {
                    manifest,
                    rewrite_current,
                    stale,
                    ..
                } => {
                    assert_eq!(manifest, m, "{damage:?}");
                    assert!(rewrite_current);
                    assert_eq!(stale, vec![gen_dir(&dir, 4)]);
                }
                other => panic!("{other:?}"),
            }
        }
        fs::remove_file(dir.join(CURRENT)).unwrap();
        assert!(matches!(
            resolve(&dir).unwrap(),
            Found::Generation { manifest, .. } if manifest == m
        ));
    }

    #[test]
    fn a_missing_generation_or_undeterminable_state_is_refused() {
        let dir = temp_dir("refuse");
        let m = generation(&dir, 3);
        write_current(&dir, &m).unwrap();
        fs::remove_dir_all(gen_dir(&dir, 3)).unwrap();
        let e = resolve(&dir).unwrap_err().to_string();
        assert!(e.contains("gen-3") && e.contains("missing"), "{e}");
        // A damaged CURRENT and no intact manifest: nothing can be trusted.
        fs::create_dir_all(gen_dir(&dir, 3)).unwrap();
        fs::write(dir.join(CURRENT), b"garbage").unwrap();
        let e = resolve(&dir).unwrap_err().to_string();
        assert!(e.contains("cannot be determined"), "{e}");
        assert!(gen_dir(&dir, 3).exists(), "nothing deleted");
        // A damaged CURRENT alone, with no generation: refused too, not "start empty".
        fs::remove_dir_all(gen_dir(&dir, 3)).unwrap();
        assert!(resolve(&dir).is_err());
    }

    #[test]
    fn a_damaged_manifest_is_covered_by_current_and_a_newer_complete_generation_wins() {
        let dir = temp_dir("manifest");
        let m = generation(&dir, 2);
        write_current(&dir, &m).unwrap();
        fs::write(gen_dir(&dir, 2).join(MANIFEST), b"junk").unwrap();
        assert!(matches!(
            resolve(&dir).unwrap(),
            Found::Generation { manifest, rewrite_current: false, .. } if manifest == m
        ));
        // A half-made generation 3 (no manifest) is stale; a complete one is used.
        fs::create_dir_all(gen_dir(&dir, 3)).unwrap();
        assert!(matches!(
            resolve(&dir).unwrap(),
            Found::Generation { manifest, ref stale, .. } if manifest == m && stale == &vec![gen_dir(&dir, 3)]
        ));
        let m3 = generation(&dir, 3);
        assert!(matches!(
            resolve(&dir).unwrap(),
            Found::Generation { manifest, rewrite_current: true, .. } if manifest == m3
        ));
    }

    #[test]
    fn a_first_format_current_is_read() {
        let dir = temp_dir("legacy");
        fs::create_dir_all(gen_dir(&dir, 6).join("w0")).unwrap();
        fs::create_dir_all(gen_dir(&dir, 6).join("w1")).unwrap();
        fs::write(dir.join(CURRENT), b"6\n").unwrap();
        assert!(matches!(
            resolve(&dir).unwrap(),
            Found::Generation {
                manifest: Manifest {
                    generation: 6,
                    workers: 2,
                    ..
                },
                legacy: true,
                ..
            }
        ));
    }

    #[test]
    fn the_lock_is_exclusive_and_names_the_holder() {
        let dir = temp_dir("lock");
        let held = DataDirLock::acquire(&dir).unwrap();
        let e = DataDirLock::acquire(&dir).unwrap_err();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains(&dir.display().to_string()), "{e}");
        drop(held);
        DataDirLock::acquire(&dir).unwrap();
    }
}
