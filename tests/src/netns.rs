//! Network namespaces by name (`/run/netns/NAME`, as `ip netns` manages them): create, run
//! commands and closures inside, list and kill their processes, delete, and sweep namespaces
//! left behind by a lab whose owning process died.
//!
//! Owns nothing beyond the namespaces whose names it is given; a sweep only ever touches names
//! of the lab form `vrl<pid>x<n>-...` whose `<pid>` is dead.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Parent of every lab's working directory.
pub const LAB_ROOT: &str = "/tmp/vpn-router-lab";

/// Failure of a namespace operation.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot run `{cmd}`: {source} (is the tool installed? see tests/README)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("cannot enter network namespace {name}: {reason}")]
    Enter { name: String, reason: String },
}

/// A named network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion; non-zero exit is an error carrying its stderr.
pub fn run(cmd: &mut Command) -> Result<Output, NetnsError> {
    let desc = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            cmd: desc.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            cmd: desc,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Runs a command feeding `input` on stdin; non-zero exit is an error.
pub fn run_with_input(cmd: &mut Command, input: &str) -> Result<Output, NetnsError> {
    use std::io::Write;
    let desc = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetnsError::Spawn {
            cmd: desc.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|source| NetnsError::Spawn {
                cmd: desc.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NetnsError::Spawn {
            cmd: desc.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            cmd: format!("{desc} <<EOF\n{input}EOF"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

impl Netns {
    /// Creates the namespace (and brings its loopback up).
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on an existing namespace (no check that it exists).
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        let out = run(Command::new("ip").arg("-n").arg(&self.name).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Many `ip` commands in one process (`ip -n NS -batch -`), one per line.
    pub fn ip_batch(&self, lines: &[String]) -> Result<(), NetnsError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut input = lines.join("\n");
        input.push('\n');
        run_with_input(
            Command::new("ip")
                .arg("-n")
                .arg(&self.name)
                .args(["-batch", "-"]),
            &input,
        )?;
        Ok(())
    }

    /// A `Command` that runs `program` inside the namespace (`ip netns exec`, which execs, so
    /// the spawned pid is the program's own).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec"]).arg(&self.name).arg(program);
        c
    }

    /// Runs a program inside the namespace to completion and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, NetnsError> {
        let out = run(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Loads an nft ruleset (text) into the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<(), NetnsError> {
        run_with_input(self.command("nft").args(["-f", "-"]), ruleset)?;
        Ok(())
    }

    /// Writes a sysctl inside the namespace (via /proc/sys in a thread that entered it).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        self.run_in(move || std::fs::write(&path, value.as_bytes()))?
            .map_err(|e| NetnsError::Enter {
                name: self.name.clone(),
                reason: format!("sysctl {key}: {e}"),
            })
    }

    /// Runs `f` on a fresh thread that has entered this namespace. Sockets it creates stay in
    /// the namespace and may be used from any thread afterwards.
    pub fn run_in<F, R>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        let name = self.name.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = File::open(&path).map_err(|e| NetnsError::Enter {
                    name: name.clone(),
                    reason: format!("open {}: {e}", path.display()),
                })?;
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    NetnsError::Enter {
                        name: name.clone(),
                        reason: format!("setns: {e}"),
                    }
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetnsError::Enter {
                    name: self.name.clone(),
                    reason: "the closure run inside panicked".to_string(),
                })
            })
        })
    }

    /// Pids of every process whose network namespace is this one (what `ip netns pids`
    /// reports, found by comparing namespace inodes under /proc), without our own process.
    pub fn pids(&self) -> Vec<i32> {
        pids_in(std::slice::from_ref(self))
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    /// SIGKILLs every process in the namespace and waits (up to 2 s) until they are gone.
    pub fn kill_all(&self) {
        kill_all_in(std::slice::from_ref(self));
    }

    /// Kills its processes and deletes the namespace (its interfaces go with it).
    pub fn destroy(&self) -> Result<(), NetnsError> {
        self.kill_all();
        if !self.path().exists() {
            return Ok(());
        }
        run(Command::new("ip").args(["netns", "del", &self.name]))?;
        Ok(())
    }
}

/// `(namespace index, pid)` of every process living in one of `namespaces`, in one pass over
/// /proc. Zombies and our own process are left out.
pub fn pids_in(namespaces: &[Netns]) -> Vec<(usize, i32)> {
    use std::os::unix::fs::MetadataExt;
    let ids: Vec<Option<(u64, u64)>> = namespaces
        .iter()
        .map(|n| std::fs::metadata(n.path()).ok().map(|m| (m.dev(), m.ino())))
        .collect();
    if ids.iter().all(Option::is_none) {
        return Vec::new();
    }
    let me = i32::try_from(std::process::id()).unwrap_or(-1);
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(m) = std::fs::metadata(e.path().join("ns/net")) else {
            continue;
        };
        let id = (m.dev(), m.ino());
        if let Some(idx) = ids.iter().position(|x| *x == Some(id)) {
            if pid_alive(pid) {
                out.push((idx, pid));
            }
        }
    }
    out
}

/// SIGKILLs every process in `namespaces` and waits (up to 2 s) until they are gone.
pub fn kill_all_in(namespaces: &[Netns]) -> usize {
    let mut killed = 0;
    for round in 0..200 {
        let pids = pids_in(namespaces);
        if pids.is_empty() {
            break;
        }
        if round == 0 {
            killed = pids.len();
        }
        for (_, p) in pids {
            let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    killed
}

/// Names of all named namespaces.
pub fn list_namespaces() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// The owner pid encoded in a lab name `vrl<pid>x<n>[-...]`, if it is one.
pub fn lab_owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("vrl")?;
    let (pid, rest) = rest.split_once('x')?;
    let n_end = rest.find('-').unwrap_or(rest.len());
    if n_end == 0 || !rest[..n_end].bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// The lab prefix `vrl<pid>x<n>` of a lab namespace name.
pub fn lab_prefix(name: &str) -> Option<&str> {
    lab_owner(name)?;
    Some(name.split_once('-').map_or(name, |(p, _)| p))
}

/// True while `pid` names a live (non-zombie) process.
pub fn pid_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Field 3 (after the parenthesised comm, which may hold spaces) is the state.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// The start time of `pid` (clock ticks since boot, field 22 of /proc/PID/stat): with the pid,
/// it names one process for good, even when pids are reused.
pub fn proc_starttime(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // After the comm: field 3 is at index 0, so field 22 is at index 19.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// File in a lab's directory that records its owner's start time.
pub const OWNER_FILE: &str = "owner-starttime";

/// True while the process that created lab `prefix` (pid encoded in the name) still runs.
/// A recorded start time that no longer matches means the pid was reused: the owner is dead.
pub fn lab_owner_alive(prefix: &str) -> bool {
    let Some(pid) = lab_owner(prefix) else {
        return false;
    };
    if !pid_alive(pid) {
        return false;
    }
    let recorded = std::fs::read_to_string(Path::new(LAB_ROOT).join(prefix).join(OWNER_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match recorded {
        Some(t) => proc_starttime(pid) == Some(t),
        None => true,
    }
}

/// What a sweep removed.
#[derive(Debug, Default)]
pub struct SweepReport {
    pub namespaces: Vec<String>,
    pub processes_killed: usize,
    pub dirs: Vec<PathBuf>,
}

/// Removes namespaces (and lab directories) of labs whose owner process is dead: kills their
/// processes, deletes them. Labs of live owners are left alone, so labs can run side by side.
pub fn sweep_stale() -> SweepReport {
    let mut report = SweepReport::default();
    let stale: Vec<Netns> = list_namespaces()
        .into_iter()
        .filter(|n| lab_prefix(n).is_some_and(|p| !lab_owner_alive(p)))
        .map(|n| Netns::named(&n))
        .collect();
    // Kill everything first, then delete: a process in one namespace may hold another's veth.
    report.processes_killed = kill_all_in(&stale);
    for ns in stale {
        if ns.destroy().is_ok() {
            report.namespaces.push(ns.name);
        }
    }
    if let Ok(rd) = std::fs::read_dir(LAB_ROOT) {
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if lab_owner(&name).is_some()
                && !lab_owner_alive(&name)
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                report.dirs.push(e.path());
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lab_names() {
        assert_eq!(lab_owner("vrl1234x0-gw3"), Some(1234));
        assert_eq!(lab_owner("vrl1234x12"), Some(1234));
        assert_eq!(lab_prefix("vrl1234x12-r0"), Some("vrl1234x12"));
        assert_eq!(lab_owner("vrlx0-gw3"), None);
        assert_eq!(lab_owner("vrl12x-a"), None);
        assert_eq!(lab_owner("other"), None);
    }

    #[test]
    fn starttime_names_a_process() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(proc_starttime(me).is_some());
        assert_eq!(proc_starttime(me), proc_starttime(me));
        assert_eq!(proc_starttime(i32::MAX), None);
    }

    #[test]
    fn own_pid_is_alive() {
        assert!(pid_alive(i32::try_from(std::process::id()).unwrap()));
        assert!(!pid_alive(i32::MAX));
    }
}
