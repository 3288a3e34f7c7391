//! `dsplane completions SHELL` and `dsplane man [--dir DIR]`: shell completions and manual pages
//! generated from the clap definitions, so that they can never disagree with `--help`.
//!
//! Both are hidden from `--help`: they are for packaging (`tools/package/build-deb.sh` installs
//! their output in the standard Debian places) rather than for an operator.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_mangen::roff::{bold, italic, roman, Roff};
use clap_mangen::Man;

/// `dsplane man`.
#[derive(clap::Args)]
pub struct ManArgs {
    /// Write dsplane.1 and one page per subcommand (dsplane-run.1, dsplane-client-su.1, …) into
    /// DIR instead of printing dsplane(1) on stdout.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Prints the completion script for `shell` on stdout.
pub fn completions(shell: clap_complete::Shell, mut command: clap::Command) -> ExitCode {
    let name = command.get_name().to_owned();
    // Into memory first: clap_complete panics on a failed write (a closed pipe), and a write to
    // a Vec cannot fail.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, name, &mut script);
    match io::stdout().lock().write_all(&script) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsplane completions: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints dsplane(1), or writes every page into `--dir`.
pub fn man(args: ManArgs, command: clap::Command) -> ExitCode {
    let command = command.disable_help_subcommand(true);
    let done = match &args.dir {
        None => main_page(&command, &mut io::stdout().lock()),
        Some(dir) => write_pages(command, dir),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsplane man: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_pages(command: clap::Command, dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // One page per subcommand (hidden ones left out), then dsplane.1 replaced by the full page.
    clap_mangen::generate_to(command.clone(), dir)?;
    let mut file = std::fs::File::create(dir.join("dsplane.1"))?;
    main_page(&command, &mut file)?;
    file.flush()
}

/// dsplane(1): clap's sections, then what an operator of a packaged install needs besides.
fn main_page(command: &clap::Command, out: &mut dyn Write) -> io::Result<()> {
    let man = Man::new(command.clone()).manual("dsplane manual");
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;

    let mut roff = Roff::new();
    roff.control("SH", ["FILES"]);
    for (path, what) in [
        (
            "/etc/dsplane/dsplane.toml",
            "The configuration (ENGINE.md §10); check it with dsplane check-config FILE.",
        ),
        (
            "/etc/dsplane/tokens.env",
            "The tokens named by token_env, as NAME=value lines, read by the systemd unit; mode 0640, group dsplane.",
        ),
        (
            "/var/lib/dsplane",
            "The data_dir: write-ahead log, alert report, expiry records. Owned by the dsplane user.",
        ),
        (
            "/lib/systemd/system/dsplane.service",
            "The hardened systemd unit.",
        ),
    ] {
        roff.control("TP", []);
        roff.text([italic(path)]);
        roff.text([roman(what)]);
    }
    roff.control("SH", ["ENVIRONMENT"]);
    for (name, what) in [
        (
            "DSPLANE_LOG",
            "Log verbosity, as a tracing filter: info (the default), warn, dsplane=debug.",
        ),
        (
            "DSPLANE_LOG_FORMAT",
            "human (the default) or json, one object per line; the same as --log-format.",
        ),
    ] {
        roff.control("TP", []);
        roff.text([bold(name)]);
        roff.text([roman(what)]);
    }
    roff.control("SH", ["EXIT STATUS"]);
    roff.text([roman(
        "0 on success; 2 for arguments or a configuration that are not valid (the error names \
         the key); 1 for any other failure.",
    )]);
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman(
        "systemctl(1), journalctl(1), /usr/share/doc/dsplane/operations.md, \
         /usr/share/doc/dsplane/README.md",
    )]);
    roff.to_writer(out)?;
    man.render_version_section(out)
}
