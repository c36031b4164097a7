//! Helpers for running as a service: daemonizing, the pidfile, systemd notification,
//! dropping privileges, and the close-on-exec flag of inherited sockets.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, Flock, FlockArg, OFlag};
use nix::sys::stat::{umask, Mode};
use nix::sys::wait::waitpid;
use nix::unistd::{
    chdir, dup2, fork, geteuid, getgid, getpid, getuid, pipe2, setgid, setgroups, setsid, setuid,
    ForkResult, Group, Pid, User,
};

/// Errors of the daemon helpers. Messages name the file, user or step that failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another launcher holds the pidfile's lock.
    #[error("{program} already running with pid {} (pidfile {})", show_pid(pid), path.display())]
    AlreadyRunning {
        program: String,
        pid: Option<Pid>,
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A system call of daemonizing failed.
    #[error("cannot daemonize ({what}): {source}")]
    Daemonize { what: &'static str, source: Errno },
    /// No such user in the password database.
    #[error("unknown user \"{0}\"")]
    UnknownUser(String),
    /// No such group in the group database.
    #[error("unknown group \"{0}\"")]
    UnknownGroup(String),
    /// Changing user or group failed.
    #[error("cannot drop privileges to {target} ({what}): {source}")]
    Privileges {
        target: String,
        what: &'static str,
        source: Errno,
    },
}

/// Sets (`on`) or clears the close-on-exec flag of `fd`.
///
/// Workers are forked, not exec'd, so they inherit listening sockets either way; the flag
/// matters when a process execs (e.g. a binary upgrade re-executing the launcher with its
/// sockets): clear it on what must survive `exec`, set it on everything else.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD)?);
    let flags = if on {
        flags | FdFlag::FD_CLOEXEC
    } else {
        flags - FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// The daemon's promise to tell the process that started it how start-up went. See
/// [`daemonize`].
#[derive(Debug)]
pub struct Daemonized {
    pipe: Option<OwnedFd>,
}

impl Daemonized {
    /// A stand-in for a process that stays in the foreground: notifications do nothing, so
    /// the caller has one code path for both modes. Like [`daemonize`] it sets umask 027, so
    /// the files the daemon creates (database, log) are not world-readable in any mode
    /// (under systemd, in a terminal, in a container).
    pub fn foreground() -> Self {
        umask(Mode::from_bits_truncate(0o027));
        Daemonized { pipe: None }
    }

    /// True in a daemon made by [`daemonize`] that has not reported yet.
    pub fn is_pending(&self) -> bool {
        self.pipe.is_some()
    }

    /// Start-up succeeded: the original process exits with status 0.
    pub fn notify_ready(&mut self) {
        self.report(0, "");
    }

    /// Start-up failed: the original process prints `message` on its stderr and exits with
    /// `code` (1 if `code` is 0). The caller then exits too.
    pub fn notify_failure(&mut self, code: u8, message: &str) {
        self.report(code.max(1), message);
    }

    fn report(&mut self, code: u8, message: &str) {
        if let Some(fd) = self.pipe.take() {
            let _ = write_report(fd.as_fd(), code, message);
        }
    }

    /// The readiness pipe's descriptor while pending: pass it to
    /// [`crate::SupervisorHandle::close_in_children`] so workers do not hold it.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.pipe.as_ref().map(|p| p.as_raw_fd())
    }
}

/// Report on the readiness pipe: status byte, 2-byte big-endian length, message.
fn write_report(out: BorrowedFd<'_>, code: u8, message: &str) -> io::Result<()> {
    let msg = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
    let mut frame = vec![code];
    frame.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    frame.extend_from_slice(msg);
    let mut rest = &frame[..];
    while !rest.is_empty() {
        match nix::unistd::write(out, rest) {
            Ok(n) => rest = &rest[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What the original process does with the report: the exit code, after printing a failure.
fn exit_code_from_report(mut input: impl Read) -> i32 {
    let mut head = [0u8; 3];
    if input.read_exact(&mut head).is_err() {
        eprintln!("the daemon exited before it was ready (see its log)");
        return 1;
    }
    if head[0] == 0 {
        return 0;
    }
    let mut msg = vec![0u8; u16::from_be_bytes([head[1], head[2]]) as usize];
    let n = input.read(&mut msg).unwrap_or(0);
    let _ = input.read_exact(&mut msg[n..]);
    eprintln!("{}", String::from_utf8_lossy(&msg).trim_end_matches('\0'));
    i32::from(head[0])
}

/// Detaches from the terminal: double fork, `setsid`, `chdir /`, umask 027, stdin, stdout and
/// stderr to `/dev/null`.
///
/// Returns only in the daemon (the grandchild). The original process waits until the daemon
/// calls [`Daemonized::notify_ready`] (exit status 0) or [`Daemonized::notify_failure`]
/// (prints the message, exits with the code), or exits with 1 if the daemon dies first — so
/// an init script gets a truthful exit status. The process must be single-threaded.
///
/// Log to a file (stderr is gone) and open it after this call or with an absolute path
/// (the working directory is `/` afterwards). A [`Pidfile`] acquired before this call stays
/// locked across it (the lock belongs to the open file, which the daemon inherits); call
/// [`Pidfile::write_pid`] afterwards to record the daemon's pid.
pub fn daemonize() -> Result<Daemonized, DaemonError> {
    crate::fork::debug_assert_single_threaded("daemonize");
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    let (read, write) = pipe2(OFlag::O_CLOEXEC).map_err(|source| DaemonError::Daemonize {
        what: "pipe",
        source,
    })?;

    // SAFETY: single-threaded (documented contract, asserted in debug builds); the parent
    // branch only waits and exits, the child continues as the same single thread.
    match unsafe { fork() } {
        Err(source) => {
            return Err(DaemonError::Daemonize {
                what: "fork",
                source,
            })
        }
        Ok(ForkResult::Parent { child }) => {
            drop(write);
            let code = exit_code_from_report(File::from(read));
            let _ = waitpid(child, None);
            // Not `return`: this process's job is done, and none of the caller's destructors
            // (pidfile removal!) may run here.
            std::process::exit(code);
        }
        Ok(ForkResult::Child) => {}
    }
    drop(read);
    let fail = |what: &str, e: Errno| -> ! {
        let _ = write_report(write.as_fd(), 1, &format!("cannot daemonize ({what}): {e}"));
        // SAFETY: _exit(2) ends this intermediate process without running destructors
        // that belong to the caller.
        unsafe { libc::_exit(1) }
    };

    // A new session without a controlling terminal...
    if let Err(e) = setsid() {
        fail("setsid", e);
    }
    // ...and a second fork so the daemon is not the session leader and can never acquire a
    // controlling terminal again by opening one.
    // SAFETY: as above; the intermediate parent only calls _exit.
    match unsafe { fork() } {
        Err(e) => fail("second fork", e),
        // SAFETY: _exit(2) in the intermediate process; never returns.
        Ok(ForkResult::Parent { .. }) => unsafe { libc::_exit(0) },
        Ok(ForkResult::Child) => {}
    }
    if let Err(e) = chdir("/") {
        fail("chdir /", e);
    }
    umask(Mode::from_bits_truncate(0o027));
    let null = match OpenOptions::new().read(true).write(true).open("/dev/null") {
        Ok(f) => f,
        Err(e) => fail(
            "open /dev/null",
            Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        ),
    };
    for target in 0..=2 {
        if let Err(e) = dup2(null.as_raw_fd(), target) {
            fail("redirect stdio to /dev/null", e);
        }
    }
    Ok(Daemonized { pipe: Some(write) })
}

/// The launcher's pidfile, locked with `flock` for the launcher's lifetime.
///
/// A pidfile nobody holds locked is stale (its launcher died) and is taken over, whatever
/// pid it names — so a recycled pid can never keep the service from starting. One that is
/// locked refuses a second launcher. The lock is on the file that stays at the path: the
/// pid is written in place (truncate, one write, fsync) while holding it, never by renaming
/// a new file over the locked one. Readers may see an empty file while a launcher starts,
/// never a partial pid. The file is removed on drop.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    file: Flock<File>,
    dev: u64,
    ino: u64,
    /// Write end of the pipe whose EOF tells the keeper (see [`Pidfile::keep_removable`])
    /// that this process is gone.
    keeper: Option<OwnedFd>,
}

impl Pidfile {
    /// Creates or takes over the pidfile at `path` and writes this process's pid to it.
    pub fn acquire(path: impl AsRef<Path>) -> Result<Pidfile, DaemonError> {
        let path = path.as_ref().to_path_buf();
        let io_err = |what, source| DaemonError::Io {
            what,
            path: path.clone(),
            source,
        };
        // Each retry needs another process to remove or replace the file meanwhile.
        for _ in 0..16 {
            // O_NOFOLLOW: a pidfile that is a symbolic link is refused, not followed (root
            // would lock, truncate and overwrite whatever it points to).
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path)
                .map_err(|e| {
                    if e.raw_os_error() == Some(libc::ELOOP) {
                        io_err(
                            "use pidfile",
                            io::Error::other("it is a symbolic link; refusing to follow it"),
                        )
                    } else {
                        io_err("open pidfile", e)
                    }
                })?;
            // Not a FIFO, device or directory someone planted there either.
            let kind = file.metadata().map_err(|e| io_err("stat pidfile", e))?;
            if !kind.file_type().is_file() {
                return Err(io_err(
                    "use pidfile",
                    io::Error::other("it is not a regular file"),
                ));
            }
            let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => locked,
                Err((file, Errno::EWOULDBLOCK)) => {
                    return Err(DaemonError::AlreadyRunning {
                        program: program_name(),
                        pid: read_pid(&file),
                        path,
                    })
                }
                Err((_, Errno::EINTR)) => continue,
                Err((_, e)) => return Err(io_err("lock pidfile", e.into())),
            };
            // Between open and flock, the previous holder may have removed the file (its
            // Drop) and someone else created a new one: then we locked a file that is no
            // longer the pidfile. Start over.
            let ours = file.metadata().map_err(|e| io_err("stat pidfile", e))?;
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {}
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat pidfile", e)),
            }
            let mut pidfile = Pidfile {
                path: path.clone(),
                file,
                dev: ours.dev(),
                ino: ours.ino(),
                keeper: None,
            };
            pidfile.write_pid()?;
            return Ok(pidfile);
        }
        Err(io_err(
            "lock pidfile",
            io::Error::other("it keeps being removed or replaced by another process"),
        ))
    }

    /// Writes this process's pid (again): after [`daemonize`], the pid changed.
    pub fn write_pid(&mut self) -> Result<(), DaemonError> {
        let line = format!("{}\n", getpid());
        let io_err = |what, source| DaemonError::Io {
            what,
            path: self.path.clone(),
            source,
        };
        self.file
            .set_len(0)
            .map_err(|e| io_err("truncate pidfile", e))?;
        self.file
            .write_all_at(line.as_bytes(), 0)
            .map_err(|e| io_err("write pidfile", e))?;
        self.file.sync_data().map_err(|e| io_err("sync pidfile", e))
    }

    /// The pidfile's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Call before dropping privileges: once they are dropped, this process may no longer
    /// unlink the pidfile from its (root-owned) directory, and a pidfile left behind makes
    /// an init script's `kill -0` signal whatever process recycles the pid. This leaves a
    /// keeper behind, a detached process with the current privileges that does nothing but
    /// wait for this process to exit (EOF on a pipe, whatever the cause of the exit) and
    /// then remove the pidfile, if no other launcher has locked it meanwhile.
    ///
    /// Call only while the process is single-threaded (it forks).
    pub fn keep_removable(&mut self) -> Result<(), DaemonError> {
        let path = std::ffi::CString::new(self.path.as_os_str().as_bytes()).map_err(|_| {
            DaemonError::Io {
                what: "use pidfile",
                path: self.path.clone(),
                source: io::Error::other("path contains a NUL byte"),
            }
        })?;
        let fork_err = |what, source| DaemonError::Daemonize { what, source };
        let (read, write) = pipe2(OFlag::O_CLOEXEC).map_err(|e| fork_err("pipe", e))?;
        crate::fork::debug_assert_single_threaded("Pidfile::keep_removable");
        // SAFETY: single-threaded (asserted above in debug builds; the launcher calls this
        // before it starts any thread), so the child may run ordinary code.
        match unsafe { fork() }.map_err(|e| fork_err("fork", e))? {
            ForkResult::Parent { child } => {
                drop(read);
                // The intermediate child exits at once; the keeper is reparented to init.
                let _ = waitpid(child, None);
                self.keeper = Some(write);
                Ok(())
            }
            ForkResult::Child => {
                let _ = setsid();
                // SAFETY: as above; the intermediate child only forks and exits.
                match unsafe { fork() } {
                    Ok(ForkResult::Child) => {
                        keeper(read.as_raw_fd(), &path, self.dev, self.ino);
                    }
                    // SAFETY: _exit in a forked child, skipping the parent's destructors.
                    _ => unsafe { libc::_exit(0) },
                }
            }
        }
    }

    /// The keeper's pipe end, to close in forked workers (they must not delay its EOF).
    pub fn keeper_fd(&self) -> Option<RawFd> {
        self.keeper.as_ref().map(|f| f.as_raw_fd())
    }

    /// The locked file's descriptor: pass it to [`crate::SupervisorHandle::close_in_children`]
    /// so workers do not share the lock (a worker outliving a killed launcher would keep the
    /// service "running").
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Still holding the lock: nobody else can have taken the file over. Remove it only
        // if the path still names our file.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        // The lock goes with the descriptor when `file` drops.
    }
}

fn show_pid(pid: &Option<Pid>) -> String {
    pid.map_or_else(|| "unknown".to_string(), |p| p.to_string())
}

fn read_pid(mut file: &File) -> Option<Pid> {
    let mut s = String::new();
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok().map(Pid::from_raw)
}

fn program_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "launcher".to_string())
}

/// Sends `state` (e.g. `"READY=1"`, `"RELOADING=1"`, `"STOPPING=1"`, `"STATUS=..."`) to
/// systemd's `NOTIFY_SOCKET`. `Ok(false)` when the variable is unset (not under systemd).
pub fn sd_notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => sd_notify_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the notification socket `socket`: a path, or `@name` for an abstract
/// socket.
pub fn sd_notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        Some(b'/') => {
            sock.send_to(state.as_bytes(), Path::new(socket))?;
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "NOTIFY_SOCKET {:?} is neither an absolute path nor @abstract",
                    socket
                ),
            ))
        }
    }
    Ok(())
}

/// Switches to `user` and/or `group` (after binding privileged ports and opening files).
///
/// With a user and no group, the user's primary group is used. Supplementary groups are
/// reduced to that one group. Groups change before the user (afterwards it would no longer be
/// allowed). Without root, succeeds only if nothing has to change.
pub fn drop_privileges(user: Option<&str>, group: Option<&str>) -> Result<(), DaemonError> {
    if user.is_none() && group.is_none() {
        return Ok(());
    }
    let target = match (user, group) {
        (Some(u), Some(g)) => format!("{u}:{g}"),
        (Some(u), None) => u.to_string(),
        (None, Some(g)) => format!(":{g}"),
        (None, None) => unreachable!(),
    };
    let err = |what, source| DaemonError::Privileges {
        target: target.clone(),
        what,
        source,
    };
    let user = match user {
        Some(name) => Some(
            User::from_name(name)
                .map_err(|e| err("look up user", e))?
                .ok_or_else(|| DaemonError::UnknownUser(name.to_string()))?,
        ),
        None => None,
    };
    let gid = match (group, &user) {
        (Some(name), _) => {
            Group::from_name(name)
                .map_err(|e| err("look up group", e))?
                .ok_or_else(|| DaemonError::UnknownGroup(name.to_string()))?
                .gid
        }
        (None, Some(u)) => u.gid,
        (None, None) => unreachable!(),
    };
    let uid = user.as_ref().map(|u| u.uid);
    if !geteuid().is_root() {
        if getgid() == gid && uid.map_or(true, |u| getuid() == u) {
            return Ok(());
        }
        return Err(err("not running as root", Errno::EPERM));
    }
    setgroups(&[gid]).map_err(|e| err("setgroups", e))?;
    setgid(gid).map_err(|e| err("setgid", e))?;
    if let Some(uid) = uid {
        setuid(uid).map_err(|e| err("setuid", e))?;
        if getuid() != uid || geteuid() != uid {
            return Err(err("verify uid", Errno::EPERM));
        }
    }
    if getgid() != gid {
        return Err(err("verify gid", Errno::EPERM));
    }
    Ok(())
}

/// The pidfile keeper (see [`Pidfile::keep_removable`]): closes every other descriptor (the
/// listening sockets, the pidfile's lock), ignores the signals sent to the daemon's process
/// group, waits for EOF on `pipe`, then removes the file at `path` if it is still the same
/// file (`dev`, `ino`) and nobody holds its lock. Never returns.
fn keeper(pipe: RawFd, path: &std::ffi::CStr, dev: u64, ino: u64) -> ! {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        if fd != pipe {
            // SAFETY: closing descriptors this process no longer uses (the directory handle
            // read_dir used is already closed: closing its number again just fails).
            unsafe { libc::close(fd) };
        }
    }
    // SAFETY: setting dispositions to SIG_IGN installs no code.
    unsafe {
        for s in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGPIPE,
        ] {
            libc::signal(s, libc::SIG_IGN);
        }
        libc::prctl(libc::PR_SET_NAME, c"pidfile-keeper".as_ptr(), 0, 0, 0);
        libc::chdir(c"/".as_ptr());
    }
    let mut byte = [0u8; 1];
    loop {
        // SAFETY: read(2) into a live 1-byte buffer.
        let n = unsafe { libc::read(pipe, byte.as_mut_ptr().cast(), 1) };
        if n == 0 || (n < 0 && Errno::last() != Errno::EINTR) {
            break;
        }
    }
    // SAFETY: plain system calls on a valid C string and our own descriptor.
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
        );
        if fd >= 0 {
            let mut st: libc::stat = std::mem::zeroed();
            let same = libc::fstat(fd, &mut st) == 0 && st.st_dev == dev && st.st_ino == ino;
            // A new launcher that took the file over holds its lock: leave it alone.
            if same && libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) == 0 {
                libc::unlink(path.as_ptr());
            }
            libc::close(fd);
        }
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn pidfile_is_exclusive_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pid");
        let first = Pidfile::acquire(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        // flock locks belong to open files: a second open in the same process conflicts.
        match Pidfile::acquire(&path) {
            Err(DaemonError::AlreadyRunning { pid, path: p, .. }) => {
                assert_eq!(pid, Some(getpid()));
                assert_eq!(p, path);
            }
            other => panic!("expected AlreadyRunning, got {other:?}"),
        }
        let msg = Pidfile::acquire(&path).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("already running with pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        drop(first);
        assert!(!path.exists());
    }

    #[test]
    fn stale_pidfile_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.pid");
        std::fs::write(&path, "999999999 and some junk that is longer than a pid\n").unwrap();
        let pidfile = Pidfile::acquire(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        assert_eq!(pidfile.path(), path);
    }

    #[test]
    fn pidfile_in_missing_directory_names_the_path() {
        let err = Pidfile::acquire("/nonexistent-dir/x.pid").unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/x.pid"), "{err}");
    }

    #[test]
    fn sd_notify_reaches_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        sd_notify_to(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("supervisor-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        sd_notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(sd_notify_to(OsStr::new("relative"), "READY=1").is_err());
    }

    #[test]
    fn readiness_report_round_trips() {
        let mut wire = Vec::new();
        // Success.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("report");
        write_report(File::create(&p).unwrap().as_fd(), 0, "").unwrap();
        assert_eq!(exit_code_from_report(File::open(&p).unwrap()), 0);
        // Failure with a message.
        write_report(File::create(&p).unwrap().as_fd(), 2, "bad config").unwrap();
        File::open(&p).unwrap().read_to_end(&mut wire).unwrap();
        assert_eq!(wire, b"\x02\x00\x0abad config");
        assert_eq!(exit_code_from_report(File::open(&p).unwrap()), 2);
        // The daemon died without a word.
        assert_eq!(exit_code_from_report(io::empty()), 1);
    }

    #[test]
    fn cloexec_can_be_cleared_and_set() {
        let sock = UnixDatagram::unbound().unwrap();
        let fd = sock.as_raw_fd();
        let get = || FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap());
        assert!(get().contains(FdFlag::FD_CLOEXEC));
        set_cloexec(fd, false).unwrap();
        assert!(!get().contains(FdFlag::FD_CLOEXEC));
        set_cloexec(fd, true).unwrap();
        assert!(get().contains(FdFlag::FD_CLOEXEC));
    }

    #[test]
    fn drop_privileges_without_change_is_ok_and_unknown_names_fail() {
        assert!(drop_privileges(None, None).is_ok());
        assert!(matches!(
            drop_privileges(Some("no-such-user-xyz"), None),
            Err(DaemonError::UnknownUser(_))
        ));
        assert!(matches!(
            drop_privileges(None, Some("no-such-group-xyz")),
            Err(DaemonError::UnknownGroup(_))
        ));
    }
}
