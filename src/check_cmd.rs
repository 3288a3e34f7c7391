//! `dsplane check-config FILE`: validates a configuration, checks that its `data_dir` can be
//! created and written and, with `[cluster]`, that its PostgreSQL can be reached and holds no
//! newer schema, and prints the effective configuration (tokens and the connection string
//! redacted).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use dsplane::config::Config;

/// Exit 0 with the effective configuration on stdout, or 2 with one error naming the file
/// and what to fix.
pub fn run(file: &Path) -> ExitCode {
    let config = match Config::load(file) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    if let Err(e) = data_dir_writable(&config.engine.data_dir) {
        eprintln!("{}: {e}", file.display());
        return ExitCode::from(2);
    }
    let cluster = match config
        .cluster
        .as_ref()
        .map(crate::cluster_cmd::check)
        .transpose()
    {
        Ok(note) => note,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    print!("{}", config.effective_toml());
    if let Some(note) = cluster {
        eprintln!("{}: {note}", file.display());
    }
    for warning in config.warnings() {
        eprintln!("{}: warning: {warning}", file.display());
    }
    eprintln!("{}: ok", file.display());
    ExitCode::SUCCESS
}

/// Whether the engine will be able to keep its log in `dir`: creates it if missing (as `run`
/// would), then creates, writes, syncs and removes a probe file in it.
fn data_dir_writable(dir: &Path) -> Result<(), String> {
    let shown = if dir.is_relative() {
        format!(
            "engine.data_dir {} (relative to the current directory)",
            dir.display()
        )
    } else {
        format!("engine.data_dir {}", dir.display())
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("{shown} cannot be created: {e}; dsplane keeps its log there"))?;
    let probe = dir.join(format!(".dsplane-check-config-{}", std::process::id()));
    let written = std::fs::File::create(&probe)
        .and_then(|mut f| f.write_all(b"probe").and_then(|()| f.sync_all()));
    let removed = std::fs::remove_file(&probe);
    written.map_err(|e| {
        format!(
            "{shown} is not writable: {e}; dsplane keeps its log there (check its owner and mode)"
        )
    })?;
    removed.map_err(|e| {
        format!(
            "{shown}: cannot remove the probe file {}: {e}",
            probe.display()
        )
    })
}
