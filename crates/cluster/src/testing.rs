//! A PostgreSQL cluster of a test's own: `initdb` in a temporary directory, the server on a
//! free loopback port, stopped (`pg_ctl stop -m immediate`) and removed when dropped. So
//! `cargo test` needs no running database, only PostgreSQL's programs.
//!
//! The programs are found on `PATH`, else in the newest `/usr/lib/postgresql/*/bin` (where
//! Debian's `postgresql` package puts them). PostgreSQL refuses to run as root: as root the
//! cluster's directory is given to the `postgres` user (which Debian's package creates) and the
//! programs run as it, through `runuser`.
//!
//! Without PostgreSQL, [`TempPostgres::start`] says the test is skipped and returns `None`;
//! under CI (`CI` set) it panics instead, since there a skipped test would hide a failure
//! (`.ci/run` installs PostgreSQL).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long [`TempPostgres::start`] waits for the server to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running throwaway cluster. See the module documentation.
#[derive(Debug)]
pub struct TempPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

/// Where PostgreSQL's server programs are, if they are installed.
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            if ["initdb", "pg_ctl", "pg_basebackup"]
                .iter()
                .all(|p| dir.join(p).is_file())
            {
                return Some(dir);
            }
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl TempPostgres {
    /// Starts a cluster with a superuser `dsplane` (trust authentication, loopback only) and a
    /// database `dsplane`; `None` (the test is skipped) without PostgreSQL, except under CI.
    ///
    /// # Panics
    ///
    /// The cluster cannot be made or started (the panic carries the programs' output), or
    /// PostgreSQL is missing under CI.
    pub fn start(test: &str) -> Option<TempPostgres> {
        let Some(bin) = find_bin_dir() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin), and under CI {test} must not be skipped"
            );
            eprintln!("{test}: skipped, PostgreSQL is not installed (apt-get install postgresql)");
            return None;
        };
        let dir = new_dir(test);
        let as_postgres = is_root();
        let pg = TempPostgres {
            bin,
            dir,
            port: free_port(),
            as_postgres,
        };
        if as_postgres {
            pg.must(Command::new("chown").arg("postgres:").arg(&pg.dir), "chown");
        }
        let data = pg.data();
        pg.must(
            pg.program("initdb")
                .args([
                    "-U",
                    "dsplane",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "-D",
                ])
                .arg(&data),
            "initdb",
        );
        pg.restart();
        let mut db = postgres::Client::connect(&pg.conninfo_db("postgres"), postgres::NoTls)
            .expect("connect to the new cluster");
        db.batch_execute("CREATE DATABASE dsplane")
            .expect("create the dsplane database");
        Some(pg)
    }

    /// A streaming-replication standby of this cluster, made by `pg_basebackup -R` into a
    /// directory of its own and started on a free port of its own. With
    /// `synchronous_standby_names` set on this one ([`TempPostgres::require_sync_standby`]), a
    /// commit here waits until the standby has it.
    ///
    /// # Panics
    ///
    /// `pg_basebackup` fails, or the standby does not start.
    pub fn start_standby(&self, test: &str) -> TempPostgres {
        let standby = TempPostgres {
            bin: self.bin.clone(),
            dir: new_dir(&format!("{test}-standby")),
            port: free_port(),
            as_postgres: self.as_postgres,
        };
        if standby.as_postgres {
            standby.must(
                Command::new("chown").arg("postgres:").arg(&standby.dir),
                "chown",
            );
        }
        standby.must(
            standby
                .program("pg_basebackup")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "dsplane",
                ])
                .args(["-c", "fast", "-X", "stream", "-R", "--no-sync", "-D"])
                .arg(standby.data()),
            "pg_basebackup",
        );
        standby.restart();
        standby
    }

    /// Makes every commit here wait for a synchronous standby (`synchronous_standby_names =
    /// '*'`, `synchronous_commit = on`), and waits until one is streaming in sync.
    ///
    /// # Panics
    ///
    /// No standby is in sync within [`START_TIMEOUT`].
    pub fn require_sync_standby(&self) {
        let mut db = postgres::Client::connect(&self.conninfo_db("postgres"), postgres::NoTls)
            .expect("connect to the primary");
        // One statement at a time: ALTER SYSTEM refuses to run inside a transaction block.
        for sql in [
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "ALTER SYSTEM SET synchronous_commit = 'on'",
            "SELECT pg_reload_conf()",
        ] {
            db.batch_execute(sql)
                .expect("require a synchronous standby");
        }
        let until = Instant::now() + START_TIMEOUT;
        loop {
            let row = db
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                    &[],
                )
                .expect("pg_stat_replication");
            if row.get::<_, i64>(0) > 0 {
                return;
            }
            assert!(Instant::now() < until, "no synchronous standby");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The libpq connection string of the `dsplane` database.
    pub fn conninfo(&self) -> String {
        self.conninfo_db("dsplane")
    }

    /// The libpq connection string of database `db`, as the superuser `dsplane`.
    pub fn conninfo_db(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={db} user=dsplane connect_timeout=5",
            self.port
        )
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server at once (`-m immediate`: as a crash would); [`TempPostgres::restart`]
    /// brings it back on the same port.
    pub fn stop(&self) {
        let _ = self.run(
            self.program("pg_ctl")
                .args(["-w", "-m", "immediate", "-D"])
                .arg(self.data())
                .arg("stop"),
        );
    }

    /// Starts the server (again, once stopped), on its port and data, and waits until it
    /// accepts connections.
    ///
    /// # Panics
    ///
    /// It does not start.
    pub fn restart(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on",
            self.port,
            self.dir.display()
        );
        self.must(
            self.program("pg_ctl")
                .args(["-w", "-t", "60", "-D"])
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-o", &options, "start"]),
            "pg_ctl start",
        );
        self.wait_ready();
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn program(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, command: &mut Command) -> std::io::Result<Output> {
        command.current_dir(&self.dir).output()
    }

    fn must(&self, command: &mut Command, what: &str) {
        let out = self
            .run(command)
            .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
        assert!(
            out.status.success(),
            "{what} failed ({}):\n{}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            log_tail(&self.dir.join("server.log"))
        );
    }

    fn wait_ready(&self) {
        let until = Instant::now() + START_TIMEOUT;
        loop {
            match postgres::Client::connect(&self.conninfo_db("postgres"), postgres::NoTls) {
                Ok(_) => return,
                Err(e) if Instant::now() >= until => panic!(
                    "PostgreSQL did not accept connections within {START_TIMEOUT:?}: {e}\n{}",
                    log_tail(&self.dir.join("server.log"))
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// A fresh directory for one test's cluster.
fn new_dir(test: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "dsplane-pg-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        test.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the cluster's directory");
    dir
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
