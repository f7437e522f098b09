//! Catalog damage: telling it from a failing filesystem or a live daemon,
//! and moving a damaged catalog aside so the daemon starts cold.
//!
//! The catalog is a cache's metadata: losing it costs warm blocks, never
//! correctness. A damaged catalog must therefore not stop the daemon (under
//! systemd a start-up error is a crash loop), but it must not vanish either:
//! the directory is renamed to `<dir>.damaged-<UTC time>`, kept 0700 and
//! never deleted. What is not damage stays a start-up error: a catalog
//! locked by a running daemon, a full disk, a directory kvbm may not use.
//!
//! RocksDB (10.4) reports most damage itself (a corrupt CURRENT, a table
//! file with a bad footer or block checksum, a missing table file), but it
//! opens a truncated MANIFEST without complaint: it keeps the table files
//! the surviving edits name, deletes the others and starts on what is left.
//! So kvbm keeps a marker file in the catalog, [`MARKER`], naming the
//! MANIFEST and its size when the catalog was last opened and closed; a
//! MANIFEST shorter than that is damage, found before RocksDB touches a file.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind as IoKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, ErrorKind, Result};

/// A damaged catalog that [`super::rocks::RocksCatalog::open_or_start_cold`]
/// moved aside before starting with an empty one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// What was wrong, as RocksDB or the marker check said it.
    pub reason: String,
    /// Where the damaged directory is now, kept for inspection.
    pub moved_to: PathBuf,
}

/// Why a catalog could not be opened.
pub(super) enum Failure {
    /// The catalog's files are damaged: move them aside, start cold.
    Damage(String),
    /// Anything else: a start-up error.
    Fatal(Error),
}

/// Sorts a RocksDB or validation error. Damage is the default: kvbm cannot
/// list every way files break, and wrongly starting cold keeps the files,
/// while wrongly refusing to start is the crash loop this module exists to
/// end. The exceptions are conditions of the process or the filesystem,
/// which a fresh catalog would meet too, and a LOCK held by a live daemon.
pub(super) fn classify(e: Error) -> Failure {
    const NOT_DAMAGE: &[&str] = &[
        "lock hold by current process", // RocksDB: the LOCK is held in-process
        "while lock file",              // and by another process
        "no space left on device",
        "disk quota exceeded",
        "read-only file system",
        "too many open files",
        "cannot allocate memory",
        "resource busy",
        "resource temporarily unavailable",
        "try again",
        "timed out",
        "shutdown in progress",
    ];
    let msg = e.to_string().to_lowercase();
    if NOT_DAMAGE.iter().any(|m| msg.contains(m)) {
        Failure::Fatal(e)
    } else {
        Failure::Damage(e.to_string())
    }
}

/// Creates the catalog directory (0700) if missing and checks that kvbm may
/// use it: a directory it may not read or write is a configuration error,
/// not damage, whereas an unreadable file inside a usable one is damage.
pub(super) fn usable_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("cannot create catalog {}", dir.display()), e))?;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::invalid(format!("catalog path {} has a NUL", dir.display())))?;
    // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
    let rc = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::R_OK | libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if rc != 0 {
        return Err(Error::io(
            format!("catalog {} is not usable", dir.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

// --- the marker ------------------------------------------------------------

/// The marker file in the catalog directory. RocksDB ignores files whose
/// names it does not know.
pub(super) const MARKER: &str = "KVBM_CATALOG";
const MARKER_HEAD: &str = "kvbm catalog";

/// The MANIFEST the catalog used and a size its content had reached, synced.
#[derive(Debug, PartialEq, Eq)]
struct Manifest {
    number: u64,
    size: u64,
}

fn manifest_number(name: &str) -> Option<u64> {
    let n = name.strip_prefix("MANIFEST-")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

fn read_current(dir: &Path) -> std::io::Result<String> {
    let s = fs::read_to_string(dir.join("CURRENT"))?;
    Ok(s.trim_end_matches('\n').to_string())
}

/// Checks the catalog's files against the marker before RocksDB opens them.
/// Returns whether a catalog exists (RocksDB must not create one then: with
/// CURRENT lost it would start a new database over the old files).
pub(super) fn precheck(dir: &Path) -> std::result::Result<bool, Failure> {
    let damage = Failure::Damage;
    let marker = match fs::read_to_string(dir.join(MARKER)) {
        Ok(s) => Some(parse_marker(&s).ok_or_else(|| damage(format!("{MARKER} is garbled")))?),
        Err(e) if e.kind() == IoKind::NotFound => None,
        Err(e) => return Err(damage(format!("cannot read {MARKER}: {e}"))),
    };
    let current = match read_current(dir) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == IoKind::NotFound => None,
        Err(e) => return Err(damage(format!("cannot read CURRENT: {e}"))),
    };
    let Some(current) = current else {
        if marker.is_some() || has_database_files(dir).map_err(Failure::Fatal)? {
            return Err(damage("CURRENT is missing".into()));
        }
        return Ok(false); // a new catalog
    };
    // Without a marker (a catalog older than it) there is nothing to check;
    // a CURRENT that names no MANIFEST is RocksDB's to report.
    let (Some(m), Some(number)) = (marker, manifest_number(&current)) else {
        return Ok(true);
    };
    if number < m.number {
        return Err(damage(format!(
            "CURRENT names {current}, older than MANIFEST-{:06} the catalog last used",
            m.number
        )));
    }
    if number == m.number {
        // A missing MANIFEST is RocksDB's to report too.
        if let Ok(meta) = fs::metadata(dir.join(&current)) {
            if meta.len() < m.size {
                return Err(damage(format!(
                    "{current} was truncated: {} bytes, it had {} when the catalog was last \
                     opened or closed",
                    meta.len(),
                    m.size
                )));
            }
        }
    }
    Ok(true)
}

fn parse_marker(s: &str) -> Option<Manifest> {
    let mut lines = s.lines();
    if lines.next()? != MARKER_HEAD {
        return None;
    }
    let mut f = lines.next()?.split_whitespace();
    let number = manifest_number(f.next()?)?;
    let size = f.next()?.parse().ok()?;
    Some(Manifest { number, size })
}

fn has_database_files(dir: &Path) -> Result<bool> {
    let read = |e| Error::io(format!("cannot list catalog {}", dir.display()), e);
    for entry in fs::read_dir(dir).map_err(read)? {
        let name = entry.map_err(read)?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("MANIFEST-") || name.ends_with(".sst") || name.ends_with(".log") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Records the MANIFEST RocksDB uses now and its size. Call it when RocksDB
/// is not writing a MANIFEST edit: with background work stopped, or right
/// after opening (a compaction would have to finish within microseconds).
/// Every edit RocksDB has finished is synced, so the size recorded never
/// exceeds what survives a crash, and a later, shorter MANIFEST was
/// truncated.
pub(super) fn write_marker(dir: &Path) -> Result<()> {
    let io = |what: &str, e| Error::io(format!("catalog {}: {what}", dir.display()), e);
    let current = read_current(dir).map_err(|e| io("reading CURRENT", e))?;
    if manifest_number(&current).is_none() {
        return Err(Error::new(
            ErrorKind::Catalog,
            format!("catalog {}: CURRENT names no MANIFEST", dir.display()),
        ));
    }
    let size = fs::metadata(dir.join(&current))
        .map_err(|e| io("reading the MANIFEST's size", e))?
        .len();
    // Replaced by rename, so a crash leaves the old marker or the new one.
    let tmp = dir.join(format!("{MARKER}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("writing the marker", e))?;
    f.write_all(format!("{MARKER_HEAD}\n{current} {size}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .and_then(|_| fs::rename(&tmp, dir.join(MARKER)))
        .and_then(|_| File::open(dir)?.sync_all())
        .map_err(|e| io("writing the marker", e))
}

// --- moving aside ----------------------------------------------------------

/// Renames the damaged catalog to `<dir>.damaged-<UTC time>` next to it,
/// keeps it private and returns the new path. Refuses while another process
/// holds RocksDB's LOCK in it: a running daemon's catalog is never moved.
pub(super) fn move_aside(dir: &Path) -> Result<PathBuf> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let base = dir
        .file_name()
        .ok_or_else(|| Error::invalid(format!("catalog path {} has no name", dir.display())))?
        .to_string_lossy()
        .into_owned();
    let stamp = utc_stamp(SystemTime::now());
    let mut to = parent.join(format!("{base}.damaged-{stamp}"));
    let mut n = 1;
    while to.symlink_metadata().is_ok() {
        to = parent.join(format!("{base}.damaged-{stamp}-{n}"));
        n += 1;
    }
    let _lock = lock_out(dir)?;
    fs::rename(dir, &to).map_err(|e| {
        Error::io(
            format!("cannot rename {} to {}", dir.display(), to.display()),
            e,
        )
    })?;
    fs::set_permissions(&to, fs::Permissions::from_mode(0o700))
        .and_then(|_| File::open(parent)?.sync_all())
        .map_err(|e| Error::io(format!("cannot secure {}", to.display()), e))?;
    Ok(to)
}

/// Takes RocksDB's lock on `<dir>/LOCK` (an fcntl write lock) for as long
/// as the returned file is open, or fails when another process holds it.
/// Only safe while this process has no database open in `dir`: closing any
/// descriptor of a file drops every fcntl lock the process holds on it.
fn lock_out(dir: &Path) -> Result<Option<File>> {
    let path = dir.join("LOCK");
    let f = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        // No LOCK, no RocksDB holding it.
        Err(e) if e.kind() == IoKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot open {}", path.display()), e)),
    };
    // SAFETY: a zeroed flock is a valid value; every field used is set.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: `f` is open and `fl` is a valid flock for the call.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) } != 0 {
        return Err(Error::io(
            format!(
                "catalog {} is damaged but locked by another process; not moving it",
                dir.display()
            ),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(Some(f))
}

/// `YYYYMMDDTHHMMSSZ`, sortable and free of characters a shell quotes.
fn utc_stamp(t: SystemTime) -> String {
    let u = kvtier_net::clock::Utc::of(t);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        u.year, u.month, u.day, u.hour, u.minute, u.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn stamps_are_utc_calendar_times() {
        let at = |s| utc_stamp(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "19700101T000000Z");
        assert_eq!(at(951_782_400), "20000229T000000Z");
        assert_eq!(at(1_796_061_316), "20261130T175516Z");
    }

    #[test]
    fn only_files_are_damage() {
        let is_damage = |m: &str| {
            matches!(
                classify(Error::new(ErrorKind::Catalog, m)),
                Failure::Damage(_)
            )
        };
        assert!(is_damage("Corruption: CURRENT file corrupted"));
        assert!(is_damage(
            "IO error: While pread offset 0 len 53: /c/000009.sst: Is a directory"
        ));
        assert!(is_damage("truncated namespace record"));
        assert!(!is_damage(
            "IO error: While lock file: /c/LOCK: Resource temporarily unavailable"
        ));
        assert!(!is_damage(
            "IO error: lock hold by current process, acquire time 1 acquiring thread 2: \
             /c/LOCK: No locks available"
        ));
        assert!(!is_damage(
            "IO error: No space left on device: While appending to file: /c/MANIFEST-000024"
        ));
    }

    #[test]
    fn marker_round_trip() {
        assert_eq!(
            parse_marker("kvbm catalog\nMANIFEST-000024 1427\n"),
            Some(Manifest {
                number: 24,
                size: 1427
            })
        );
        assert_eq!(parse_marker("kvbm catalog\nMANIFEST-x 1\n"), None);
        assert_eq!(parse_marker("garbage"), None);
    }
}
