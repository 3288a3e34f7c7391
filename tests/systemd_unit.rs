//! The shipped systemd unit (`tools/systemd/dsplane.service`) against the real engine.
//!
//! systemd turns `SystemCallFilter=` into a seccomp filter installed just before it execs the
//! service. These tests build the same filter from the unit's own lines and install it in a child
//! process before it execs `dsplane run`, so a unit that denies a call the engine makes fails here
//! rather than on a host (issue 14, item 1: `~@resources` denied `sched_setaffinity`, and the
//! engine died with SIGSYS, rc 159, right after "log recovered").
//!
//! How the filter is built, as systemd 252 does it (`config_parse_syscall_filter`):
//!
//! * the groups (`@system-service`, …) are expanded by `systemd-analyze syscall-filter`, the
//!   installed systemd's own tables, nested groups included;
//! * the first `SystemCallFilter=` line decides the mode: without `~` it is an allow-list, which
//!   starts from `@default`; then every line applies in order, a plain name adding to the list and
//!   a `~name` removing from it (the reverse for a deny-list); an empty assignment resets;
//! * a call outside the allow-list gets `SystemCallErrorNumber=` (EPERM, …) if set, else the
//!   process is killed (SIGSYS);
//! * names are turned into this architecture's numbers with the C headers (`cc -E -dM` of
//!   `<sys/syscall.h>`); names the architecture lacks (`_llseek`, `setuid32`) are dropped, as
//!   systemd drops them.
//!
//! Without `systemd-analyze` the tests that need it say so and pass, except under CI (`CI` set),
//! where `.ci/run` installs systemd and a missing tool is a failure. `DSPLANE_TEST_UNIT=FILE`
//! checks another unit file (for example the one before the fix).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dsplane::client::Client;
use dsplane::ids::Eui64;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

const BIN: &str = env!("CARGO_BIN_EXE_dsplane");
const SU_ID: &str = "90-B3-D5-1F-30-01-00-00";

fn unit_path() -> PathBuf {
    std::env::var_os("DSPLANE_TEST_UNIT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/systemd/dsplane.service"),
        PathBuf::from,
    )
}

/// `Some(path)` of a tool on PATH; `None` after saying the test is skipped (a failure under CI).
fn tool(name: &str, why: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is not installed, and under CI this test must not be skipped ({why})"
        );
        eprintln!("SKIPPED: {name} is not installed ({why}); apt-get install systemd");
    }
    found
}

/// The `[Service]` lines of a unit file named `key`, in order, values trimmed.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let mut section = "";
    let mut values = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]" && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    values.push(v.trim().to_owned());
                }
            }
        }
    }
    values
}

/// Every group systemd knows, as `systemd-analyze syscall-filter` lists them: `@name` at the start
/// of a line, then its members indented, comments (`# …`) among them.
fn syscall_groups(systemd_analyze: &Path) -> HashMap<String, Vec<String>> {
    let out = Command::new(systemd_analyze)
        .args(["syscall-filter", "--no-pager"])
        .output()
        .expect("systemd-analyze syscall-filter");
    assert!(out.status.success(), "{out:?}");
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let item = line.trim();
        if line.starts_with('@') {
            current = Some(item.to_owned());
            groups.entry(item.to_owned()).or_default();
        } else if !line.starts_with(char::is_whitespace) || item.is_empty() {
            current = None;
        } else if let (Some(group), false) = (&current, item.starts_with('#')) {
            groups.get_mut(group).unwrap().push(item.to_owned());
        }
    }
    for needed in ["@default", "@system-service"] {
        assert!(
            groups.get(needed).is_some_and(|members| members.len() > 10),
            "systemd-analyze listed no {needed} group"
        );
    }
    groups
}

/// A name or `@group` as the set of system-call names it stands for, nested groups expanded.
fn expand(name: &str, groups: &HashMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
    // `name:ERRNO` gives one call its own error number; the name is what matters here.
    let name = name.split(':').next().unwrap_or(name);
    if name.starts_with('@') {
        let members = groups
            .get(name)
            .unwrap_or_else(|| panic!("the unit names {name}, a group systemd does not know"));
        for member in members {
            expand(member, groups, out);
        }
    } else {
        out.insert(name.to_owned());
    }
}

/// What a unit's `SystemCallFilter=` lines come to.
#[derive(Debug)]
struct UnitFilter {
    /// An allow-list (the listed calls run, others are refused) or a deny-list.
    allow_list: bool,
    /// The calls listed, after every line has been applied in order.
    calls: BTreeSet<String>,
}

fn unit_filter(unit: &str, groups: &HashMap<String, Vec<String>>) -> Option<UnitFilter> {
    let mut filter: Option<UnitFilter> = None;
    for value in unit_values(unit, "SystemCallFilter") {
        if value.is_empty() {
            filter = None;
            continue;
        }
        let (invert, names) = match value.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, value.as_str()),
        };
        let filter = filter.get_or_insert_with(|| {
            let mut calls = BTreeSet::new();
            if !invert {
                // An allow-list always admits @default (execve, exit, clock_gettime, …).
                expand("@default", groups, &mut calls);
            }
            UnitFilter {
                allow_list: !invert,
                calls,
            }
        });
        let mut named = BTreeSet::new();
        for name in names.split_whitespace() {
            expand(name, groups, &mut named);
        }
        if invert == filter.allow_list {
            filter.calls.retain(|c| !named.contains(c));
        } else {
            filter.calls.extend(named);
        }
    }
    filter
}

/// This architecture's system-call numbers by name, from the C headers the toolchain links with.
fn syscall_numbers() -> BTreeMap<String, i64> {
    let mut cc = Command::new("cc")
        .args(["-E", "-dM", "-x", "c", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cc, to read <sys/syscall.h>");
    std::io::Write::write_all(cc.stdin.as_mut().unwrap(), b"#include <sys/syscall.h>\n").unwrap();
    drop(cc.stdin.take());
    let out = cc.wait_with_output().unwrap();
    assert!(out.status.success(), "cc -E <sys/syscall.h> failed");
    let numbers: BTreeMap<String, i64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("#define __NR_")?;
            let (name, value) = rest.split_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect();
    assert!(
        numbers.contains_key("sched_setaffinity") && numbers.contains_key("read"),
        "no system-call numbers in <sys/syscall.h>"
    );
    numbers
}

fn arch() -> TargetArch {
    TargetArch::try_from(std::env::consts::ARCH).expect("seccompiler supports this architecture")
}

/// The action for a call the filter refuses: `SystemCallErrorNumber=`, or kill.
fn refusal(unit: &str) -> SeccompAction {
    match unit_values(unit, "SystemCallErrorNumber")
        .last()
        .map(String::as_str)
    {
        None | Some("") | Some("kill") => SeccompAction::KillProcess,
        Some("EPERM") => SeccompAction::Errno(libc_errno::EPERM),
        Some("EACCES") => SeccompAction::Errno(libc_errno::EACCES),
        Some("ENOSYS") => SeccompAction::Errno(libc_errno::ENOSYS),
        Some(other) => panic!("SystemCallErrorNumber={other}: add it to this test"),
    }
}

/// The few errno values a unit is likely to name (Linux numbers, the same on every architecture
/// seccompiler supports).
mod libc_errno {
    pub const EPERM: u32 = 1;
    pub const EACCES: u32 = 13;
    pub const ENOSYS: u32 = 38;
}

fn bpf(filter: &UnitFilter, refused: SeccompAction) -> BpfProgram {
    let numbers = syscall_numbers();
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = filter
        .calls
        .iter()
        .filter_map(|name| numbers.get(name))
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let (mismatch, matched) = if filter.allow_list {
        (refused, SeccompAction::Allow)
    } else {
        (SeccompAction::Allow, refused)
    };
    SeccompFilter::new(rules, mismatch, matched, arch())
        .and_then(TryInto::try_into)
        .expect("a seccomp filter from the unit")
}

/// A config for a real run: two workers (so two pins), loopback ports the OS chooses, its own
/// data_dir.
fn config(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsplane-unit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dsplane.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[engine]
cores = 2
data_dir = "{}"
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[[service_user]]
id = "{SU_ID}"
token = "unit-test-su"
[[csp]]
name = "c"
token = "unit-test-csp"
"#,
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

/// `dsplane run` with `filter` installed in the child between fork and exec, as systemd does.
struct Filtered {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Filtered {
    fn spawn(config: &Path, filter: BpfProgram) -> Filtered {
        let mut command = Command::new(BIN);
        command
            .args(["run", "--config"])
            .arg(config)
            .env("DSPLANE_LOG", "info")
            .env_remove("DSPLANE_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec. It only makes the prctl and
        // seccomp system calls on a program built before the fork (no allocation, no lock); the
        // error path allocates, but then the child exits at once without exec.
        unsafe {
            command.pre_exec(move || {
                seccompiler::apply_filter(&filter).map_err(std::io::Error::other)
            });
        }
        let mut child = command.spawn().expect("spawn dsplane run under the filter");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Filtered {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for "dsplane running" and returns the SU port, or panics with how the engine ended.
    fn wait_running(&mut self) -> std::net::SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let running = line.contains("dsplane running");
                    self.seen.push(line);
                    if running {
                        let line = self.seen.last().unwrap();
                        let start = line.find("su=").unwrap() + 3;
                        return line[start..]
                            .split_whitespace()
                            .next()
                            .unwrap()
                            .parse()
                            .unwrap();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = match self.child.try_wait().unwrap() {
            Some(status) => status,
            None => {
                let _ = self.child.kill();
                self.child.wait().unwrap()
            }
        };
        let how = match (status.code(), status.signal()) {
            (_, Some(31)) => "killed by SIGSYS (Bad system call), shell rc 159".to_owned(),
            (_, Some(signal)) => format!("killed by signal {signal}"),
            (Some(code), _) => format!("exited with rc {code}"),
            _ => format!("{status}"),
        };
        panic!(
            "dsplane run under the filter never logged 'dsplane running': {how}; its log:\n{}",
            self.seen.join("\n")
        );
    }

    /// A Service User's HELLO is accepted.
    fn hello(&self, su: std::net::SocketAddr) {
        let id: Eui64 = SU_ID.parse().unwrap();
        Client::connect_su(su, id, "unit-test-su").expect("HELLO accepted under the filter");
    }

    /// SIGTERM, then a clean exit (rc 0, "dsplane stopped") within 10 s. Returns every log line.
    fn stop(mut self) -> Vec<String> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "no exit within 10 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(line);
        }
        assert!(
            status.success(),
            "dsplane under the filter ended with {status} after SIGTERM; its log:\n{}",
            self.seen.join("\n")
        );
        assert!(
            self.seen.iter().any(|l| l.contains("dsplane stopped")),
            "no 'dsplane stopped' line:\n{}",
            self.seen.join("\n")
        );
        self.seen
    }
}

#[test]
fn the_units_system_call_filter_lets_the_engine_start_pin_serve_and_stop() {
    let Some(systemd_analyze) = tool("systemd-analyze", "it expands the unit's groups") else {
        return;
    };
    let unit_file = unit_path();
    let unit = std::fs::read_to_string(&unit_file).unwrap();
    let groups = syscall_groups(&systemd_analyze);
    let filter = unit_filter(&unit, &groups).expect("the unit has a SystemCallFilter=");
    let refused = refusal(&unit);
    eprintln!(
        "{}: {} {} calls, refused ones get {refused:?}",
        unit_file.display(),
        if filter.allow_list {
            "allows"
        } else {
            "denies"
        },
        filter.calls.len()
    );

    let mut engine = Filtered::spawn(&config("unit"), bpf(&filter, refused));
    let su = engine.wait_running();
    engine.hello(su);
    let log = engine.stop();
    // The unit allows pinning, so both workers are pinned and none is refused.
    let pinned = log.iter().filter(|l| l.contains("worker pinned")).count();
    assert_eq!(
        pinned,
        2,
        "both workers pinned under the unit's filter:\n{}",
        log.join("\n")
    );
    assert!(
        filter.allow_list == filter.calls.contains("sched_setaffinity"),
        "the unit's filter refuses sched_setaffinity, which worker pinning calls"
    );
}

#[test]
fn a_refused_pin_is_a_warning_naming_worker_and_core_and_the_engine_runs_unpinned() {
    // Only sched_setaffinity refused, with EPERM: what a cpuset or a stricter filter does.
    let filter = UnitFilter {
        allow_list: false,
        calls: BTreeSet::from(["sched_setaffinity".to_owned()]),
    };
    let mut engine = Filtered::spawn(
        &config("refused-pin"),
        bpf(&filter, SeccompAction::Errno(libc_errno::EPERM)),
    );
    let su = engine.wait_running();
    engine.hello(su);
    let log = engine.stop();
    for worker in 0..2 {
        let warning = log.iter().find(|l| {
            l.contains("WARN")
                && l.contains("core pinning refused; running unpinned")
                && l.contains(&format!("worker={worker} "))
                && l.contains("core=")
                && l.contains("Operation not permitted")
        });
        assert!(
            warning.is_some(),
            "no WARN naming worker {worker}, its core and the error:\n{}",
            log.join("\n")
        );
    }
    assert!(!log.iter().any(|l| l.contains("worker pinned")));
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let Some(systemd_analyze) = tool("systemd-analyze", "it verifies the unit") else {
        return;
    };
    let unit = std::fs::read_to_string(unit_path()).unwrap();
    for exec in ["ExecStartPre", "ExecStart"] {
        let lines = unit_values(&unit, exec);
        assert!(
            lines.iter().all(|l| l.starts_with("/usr/bin/dsplane ")),
            "{exec} runs /usr/bin/dsplane, where the package installs it: {lines:?}"
        );
    }
    // verify checks that each Exec*= program exists: point them at the binary just built.
    let dir = std::env::temp_dir().join(format!("dsplane-unit-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("dsplane.service");
    std::fs::write(&copy, unit.replace("/usr/bin/dsplane", BIN)).unwrap();
    let out = Command::new(systemd_analyze)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    // verify exits 0 on some problems it only warns about (an unknown key, a bad value).
    assert!(
        !said.contains("dsplane.service:"),
        "systemd-analyze verify has something to say about the unit: {said}"
    );
}
