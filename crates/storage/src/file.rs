//! The file dispatcher: one JSON object per line per sample, in a size-rotated file.
//!
//! Rotation follows Python's `logging.handlers.RotatingFileHandler`, which ceilometer's file
//! dispatcher used: before a line is written, if the file is not empty and the line would
//! bring it to `max_bytes` or beyond, `path.N-1` → `path.N`, …, `path` → `path.1` (`.1` is the
//! newest backup, `.N` the oldest, anything older dropped), and a new `path` is started.
//! `max_bytes == 0` never rotates, and neither does `backup_count == 0` (Python then reopens
//! the same file and keeps appending). A single line longer than `max_bytes` still goes whole
//! into an empty file.
//!
//! Several worker processes may append to one file: the file is opened `O_APPEND`, each
//! `append` writes under an exclusive `flock` on the current file and first checks that `path`
//! still names the file it holds open (another process, or logrotate, may have renamed it),
//! reopening if not. So rotation happens once, by whoever crosses the limit, and no process
//! keeps writing into a rotated-away backup.
//!
//! Each line holds every field of the sample, including `extra` fields this version does not
//! know, in wire order; values are converted as [`crate::json`] describes.

use crate::json::{non_finite_text, Json};
use meter::{Sample, Volume};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Appends samples as JSON lines to a rotating file.
pub struct FileDispatcher {
    path: PathBuf,
    max_bytes: u64,
    backup_count: u32,
    /// `None` after a failed write: the next call reopens.
    file: Option<File>,
    buf: Vec<u8>,
    line: Vec<u8>,
}

impl FileDispatcher {
    /// Open (creating it and its directory if missing) the file at `path` for appending.
    pub fn open(path: impl AsRef<Path>, max_bytes: u64, backup_count: u32) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = open_append(&path)?;
        Ok(FileDispatcher {
            path,
            max_bytes,
            backup_count,
            file: Some(file),
            buf: Vec::new(),
            line: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Close and reopen the file (USR1, after an external logrotate).
    pub fn reopen(&mut self) -> io::Result<()> {
        self.file = None;
        self.file = Some(open_append(&self.path)?);
        Ok(())
    }

    /// Append one line per sample, rotating as needed; everything is handed to the kernel
    /// before this returns.
    pub fn append(&mut self, samples: &[Sample]) -> io::Result<()> {
        if samples.is_empty() {
            return Ok(());
        }
        let result = self.append_locked(samples);
        if result.is_err() {
            // Start from a fresh open next time (the file may have been removed or replaced).
            self.file = None;
        }
        result
    }

    fn rotates(&self) -> bool {
        self.max_bytes > 0 && self.backup_count > 0
    }

    fn append_locked(&mut self, samples: &[Sample]) -> io::Result<()> {
        // On any error below, `file` is dropped: closing it releases the lock.
        let mut file = self.lock_current()?;
        let rotate_here = self.rotates() && file.metadata()?.is_file();
        let mut size = file.metadata()?.len();
        // RotatingFileHandler.shouldRollover: never for an empty file; else when the line
        // would bring the file to max_bytes or beyond.
        let max_bytes = self.max_bytes;
        let full = |pos: u64, line: usize| pos > 0 && pos + line as u64 >= max_bytes;
        self.buf.clear();
        for s in samples {
            self.line.clear();
            serde_json::to_writer(&mut self.line, &Record(s)).map_err(io::Error::other)?;
            self.line.push(b'\n');
            // A loop, not an `if`: the new file may already be full when we get its lock.
            while rotate_here && full(size + self.buf.len() as u64, self.line.len()) {
                file.write_all(&self.buf)?;
                self.buf.clear();
                self.rotate()?;
                // Closing the renamed file releases its lock; whoever waited on it finds the
                // name moved and follows it, as we do now. The new file may already hold
                // lines from a process that got there first (or even have been rotated).
                drop(file);
                self.file = None;
                file = self.lock_current()?;
                size = file.metadata()?.len();
            }
            self.buf.extend_from_slice(&self.line);
        }
        file.write_all(&self.buf)?;
        self.buf.clear();
        unlock(&file);
        self.file = Some(file);
        Ok(())
    }

    /// Lock the file `path` names now, reopening while another process renames it away.
    fn lock_current(&mut self) -> io::Result<File> {
        // Each retry means someone else rotated in between; a bound only guards against a
        // name that never settles (something replacing the file in a tight loop).
        for _ in 0..1000 {
            let file = match self.file.take() {
                Some(f) => f,
                None => open_append(&self.path)?,
            };
            lock(&file)?;
            if same_file(&self.path, &file)? {
                return Ok(file);
            }
            // Renamed or removed under us: closing it drops the lock; follow the name.
        }
        Err(io::Error::other(format!(
            "{} keeps being replaced while opening it",
            self.path.display()
        )))
    }

    /// `path.{N-1}` → `path.N`, …, `path` → `path.1`.
    fn rotate(&self) -> io::Result<()> {
        let backup = |i: u32| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{i}"));
            PathBuf::from(name)
        };
        for i in (1..self.backup_count).rev() {
            let from = backup(i);
            if from.exists() {
                std::fs::rename(&from, backup(i + 1))?;
            }
        }
        std::fs::rename(&self.path, backup(1))
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Whether `path` currently names `file` (false if it names nothing).
fn same_file(path: &Path, file: &File) -> io::Result<bool> {
    let open = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(named) => Ok(named.dev() == open.dev() && named.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Take an exclusive `flock`; released by [`unlock`] or when the file is closed.
fn lock(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: flock only reads the descriptor number, which `file` keeps open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            // Not lockable (some special files, some network file systems): go unlocked.
            Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP) => return Ok(()),
            _ => return Err(err),
        }
    }
}

fn unlock(file: &File) {
    // SAFETY: as in `lock`. A failure leaves the lock to be released when the file closes.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// A non-finite float as its JSON stand-in (see [`crate::json`]).
struct Float(f64);

impl Serialize for Float {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_finite() {
            s.serialize_f64(self.0)
        } else {
            s.serialize_str(non_finite_text(self.0))
        }
    }
}

/// One sample as a JSON object: the known fields in ceilometer's order, then `extra`.
struct Record<'a>(&'a Sample);

impl Serialize for Record<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let s = self.0;
        let mut m = ser.serialize_map(Some(15 + s.extra.len()))?;
        m.serialize_entry("source", &s.source)?;
        m.serialize_entry("counter_name", &s.counter_name)?;
        m.serialize_entry("counter_type", s.counter_type.as_str())?;
        m.serialize_entry("counter_unit", &s.counter_unit)?;
        match s.counter_volume {
            Volume::Int(i) => m.serialize_entry("counter_volume", &i)?,
            Volume::Float(f) => m.serialize_entry("counter_volume", &Float(f))?,
        }
        m.serialize_entry("user_id", &s.user_id)?;
        m.serialize_entry("project_id", &s.project_id)?;
        m.serialize_entry("user_name", &s.user_name)?;
        m.serialize_entry("project_name", &s.project_name)?;
        m.serialize_entry("resource_id", &s.resource_id)?;
        m.serialize_entry("timestamp", &s.timestamp)?;
        m.serialize_entry(
            "resource_metadata",
            &Json::wire_order(&s.resource_metadata.value()),
        )?;
        m.serialize_entry("message_id", &s.message_id)?;
        m.serialize_entry("message_signature", &s.message_signature)?;
        m.serialize_entry("monotonic_time", &s.monotonic_time.map(Float))?;
        for (k, v) in &s.extra {
            m.serialize_entry(k, &Json::wire_order(v))?;
        }
        m.end()
    }
}
