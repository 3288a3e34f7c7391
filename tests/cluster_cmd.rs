//! `[cluster]` on the command line: `check-config` reaches PostgreSQL (and says whether the
//! tables are there), `cluster init` creates them, an unreachable server is an error that names
//! it, the connection string is never printed, and `run` refuses a database that does not
//! exist or holds a newer schema. Against a throwaway PostgreSQL (`dsplane_cluster::testing`).

use std::path::PathBuf;
use std::process::{Command, Output};

use dsplane_cluster::testing::TempPostgres;

const BIN: &str = env!("CARGO_BIN_EXE_dsplane");

const PEERS: &str = r#"
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"

[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su-secret-0123456789"

[[csp]]
name = "csp-a"
token = "csp-secret-0123456789"
"#;

fn config_file(name: &str, cluster: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsplane-cluster-cmd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let text = format!(
        "[engine]\ndurability = \"replicated\"\ndata_dir = \"{}\"\n{PEERS}\n{cluster}",
        dir.join(format!("{name}.data")).display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn dsplane(args: &[&str], file: &PathBuf) -> (Output, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg(file)
        .env_remove("DSPLANE_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

#[test]
fn check_config_reaches_postgres_and_cluster_init_creates_the_tables() {
    let Some(pg) = TempPostgres::start("cluster-cmd") else {
        return;
    };
    // The password is ignored under trust authentication; it must never be printed.
    let cluster = format!(
        "[cluster]\nnode = \"node-a\"\npostgres = \"{} password=hunter2\"\nlease_ms = 1500\n",
        pg.conninfo()
    );
    let file = config_file("a.toml", &cluster);
    let (out, err) = dsplane(&["check-config"], &file);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("the dsplane tables are not there yet"),
        "{err}"
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("node = \"node-a\""), "{printed}");
    assert!(
        !printed.contains("hunter2") && !err.contains("hunter2"),
        "{printed}{err}"
    );

    let (out, err) = dsplane(&["cluster", "init", "--config"], &file);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("ready in PostgreSQL (schema version 1)"),
        "{err}"
    );
    let (out, err) = dsplane(&["cluster", "init", "--config"], &file);
    assert!(out.status.success(), "a second init changes nothing: {err}");
    let (out, err) = dsplane(&["check-config"], &file);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("tables are at schema version 1"), "{err}");

    // A database that does not exist is refused at start, with the server named.
    let missing = config_file(
        "b.toml",
        &format!(
            "[cluster]\nnode = \"node-b\"\npostgres = \"{} password=hunter2\"\n",
            pg.conninfo_db("no_such_db")
        ),
    );
    let (out, err) = dsplane(&["run", "--config"], &missing);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no_such_db"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    // A schema of a newer dsplane is refused before anything touches it.
    let mut db = dsplane_cluster::pg::Db::connect(&pg.conninfo()).unwrap();
    db.client()
        .execute(
            "UPDATE dsplane_meta SET value = '99' WHERE key = 'schema_version'",
            &[],
        )
        .unwrap();
    let (out, err) = dsplane(&["run", "--config"], &file);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("99"), "{err}");
    db.client()
        .execute(
            "UPDATE dsplane_meta SET value = '1' WHERE key = 'schema_version'",
            &[],
        )
        .unwrap();

    // The server goes away: check-config fails and names it.
    pg.stop();
    let (out, err) = dsplane(&["check-config"], &file);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot be reached"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{}", pg.port())), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn cluster_init_without_a_cluster_section_or_with_a_bad_one_says_what_to_fix() {
    let file = config_file("none.toml", "");
    let (out, err) = dsplane(&["cluster", "init", "--config"], &file);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // durability = "replicated" without [cluster] is refused as the file is read.
    assert!(err.contains("needs a [cluster] section"), "{err}");
    let file = config_file(
        "bad.toml",
        "[cluster]\nnode = \"a\"\npostgres = \"x\"\nlease_ms = 50\n",
    );
    let (out, err) = dsplane(&["check-config"], &file);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cluster.lease_ms"), "{err}");
}
