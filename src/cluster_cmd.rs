//! `dsplane cluster init --config FILE`: creates the dsplane tables in the PostgreSQL of the
//! file's `[cluster]` (`docs/ha.md`); and the `[cluster]` part of `check-config`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dsplane::config::{Cluster, Config};
use dsplane_cluster::pg::{ClusterError, Db};

/// `dsplane cluster …`.
#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// Create the dsplane tables in the PostgreSQL of the configuration's [cluster] (safe to
    /// run again, and from several nodes at once); refuses a database made by a newer dsplane.
    Init {
        /// The TOML configuration file, with a [cluster] section.
        #[arg(long)]
        config: PathBuf,
    },
}

/// Runs a `cluster` command: 0, or 2 with one error naming the file and what to fix.
pub fn run(command: ClusterCommand) -> ExitCode {
    match command {
        ClusterCommand::Init { config } => init(&config),
    }
}

fn init(file: &Path) -> ExitCode {
    let config = match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dsplane: {}", e.in_file(file));
            return ExitCode::from(2);
        }
    };
    let Some(cluster) = &config.cluster else {
        eprintln!(
            "dsplane: {}: no [cluster] section: `cluster init` needs its node and postgres",
            file.display()
        );
        return ExitCode::from(2);
    };
    match Db::connect(cluster.postgres.expose_str()).and_then(|mut db| db.init()) {
        Ok(version) => {
            eprintln!(
                "{}: the dsplane tables are ready in PostgreSQL (schema version {version})",
                file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dsplane: {}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}

/// What `check-config` says of `[cluster]`: `Ok(note)` when PostgreSQL can be reached (the note
/// says whether the tables are there), `Err` when it cannot, or holds a newer schema.
pub fn check(cluster: &Cluster) -> Result<String, String> {
    let mut db = Db::connect(cluster.postgres.expose_str()).map_err(|e| e.to_string())?;
    match db.check() {
        Ok(version) => Ok(format!(
            "[cluster] PostgreSQL reached; the dsplane tables are at schema version {version}"
        )),
        Err(ClusterError::NoSchema) => Ok(
            "[cluster] PostgreSQL reached; the dsplane tables are not there yet (`dsplane cluster init` creates them)"
                .to_string(),
        ),
        Err(e) => Err(e.to_string()),
    }
}
