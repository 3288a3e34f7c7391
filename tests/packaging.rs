//! What the Debian package ships besides the binary (issue 14, item 7): the man pages and shell
//! completions generated from the clap definitions, the example configuration for a real host,
//! the LICENSE, and a README whose every command builds the one release binary.
//!
//! The package itself is built, installed with `dpkg -i` and run from its installed paths by
//! `.ci/run` (tools/package/build-deb.sh).

use std::path::Path;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_dsplane");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn dsplane(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("DSPLANE_LOG_FORMAT")
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The subcommands `dsplane --help` lists (the visible ones, without clap's `help`).
fn subcommands() -> Vec<String> {
    let help = stdout(&dsplane(&["--help"]));
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    assert!(
        names.len() >= 6 && names.iter().any(|n| n == "check-config"),
        "{names:?}"
    );
    names
}

#[test]
fn the_man_page_names_every_subcommand_and_each_has_a_page() {
    let page = stdout(&dsplane(&["man"]));
    assert!(page.starts_with(".ie") || page.starts_with(".TH"), "{page}");
    assert!(page.contains(".TH dsplane 1"), "{page}");
    // roff escapes '-' as '\-'.
    let plain = page.replace("\\-", "-");
    for name in subcommands() {
        assert!(
            plain.contains(&format!("dsplane-{name}(1)")),
            "dsplane(1) does not mention {name}:\n{plain}"
        );
    }
    for section in ["FILES", "ENVIRONMENT", "EXIT STATUS", "SEE ALSO"] {
        assert!(
            plain.contains(&format!(".SH {section}\n"))
                || plain.contains(&format!(".SH \"{section}\"\n")),
            "no {section} section"
        );
    }
    assert!(plain.contains("/etc/dsplane/dsplane.toml") && plain.contains("DSPLANE_LOG"));
    // The packaging subcommands stay out of it.
    assert!(!plain.contains("dsplane-man(1)") && !plain.contains("dsplane-completions"));

    let dir = std::env::temp_dir().join(format!("dsplane-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    stdout(&dsplane(&["man", "--dir", dir.to_str().unwrap()]));
    let written = std::fs::read_to_string(dir.join("dsplane.1")).unwrap();
    assert_eq!(written, page, "dsplane.1 is the page `dsplane man` prints");
    for name in subcommands() {
        let sub = std::fs::read_to_string(dir.join(format!("dsplane-{name}.1")))
            .unwrap_or_else(|e| panic!("no dsplane-{name}.1: {e}"));
        assert!(sub.contains(".SH SYNOPSIS"), "dsplane-{name}.1");
    }
    for nested in ["client-su", "client-csp", "report-alerts"] {
        assert!(
            dir.join(format!("dsplane-{nested}.1")).is_file(),
            "{nested}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_generate_for_bash_zsh_and_fish_with_every_subcommand() {
    let subcommands = subcommands();
    for (shell, marker) in [
        ("bash", "complete -F _dsplane"),
        ("zsh", "#compdef dsplane"),
        ("fish", "complete -c dsplane"),
    ] {
        let script = stdout(&dsplane(&["completions", shell]));
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        for name in &subcommands {
            assert!(script.contains(name.as_str()), "{shell}: no {name}");
        }
        // The shell itself parses it, where it is installed.
        let parsed = Command::new(shell)
            .arg("-n")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map(|mut child| {
                std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes())
                    .unwrap();
                drop(child.stdin.take());
                child.wait_with_output().unwrap()
            });
        match parsed {
            Ok(out) => assert!(
                out.status.success(),
                "{shell} -n: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(_) => eprintln!("{shell} is not installed: its script was not parsed"),
        }
    }
    let out = dsplane(&["completions", "tcsh"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// The variables tools/dsplane.toml.example names, each with a distinct token.
const EXAMPLE_ENV: [(&str, &str); 4] = [
    ("DSPLANE_ADMIN_TOKEN", "example-admin-token"),
    ("DSPLANE_SU_SUPPLIER_A_TOKEN", "example-su-token"),
    ("DSPLANE_CSP_NORTH_TOKEN", "example-csp-north-token"),
    ("DSPLANE_CSP_SOUTH_TOKEN", "example-csp-south-token"),
];

#[test]
fn the_example_config_for_a_host_passes_check_config_with_its_tokens_set() {
    let example = root().join("tools/dsplane.toml.example");
    let text = std::fs::read_to_string(&example).unwrap();
    assert!(
        !text.lines().any(|l| l.trim_start().starts_with("token =")),
        "the example holds no token itself"
    );
    assert!(
        text.contains("data_dir = \"/var/lib/dsplane\""),
        "an absolute data_dir for a host"
    );
    // check-config creates and writes data_dir: the copy checked here keeps it in a temporary
    // directory, so the test needs no root and leaves /var/lib alone.
    let dir = std::env::temp_dir().join(format!("dsplane-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data_dir = dir.join("data");
    let example = dir.join("dsplane.toml");
    std::fs::write(
        &example,
        text.replace(
            "data_dir = \"/var/lib/dsplane\"",
            &format!("data_dir = \"{}\"", data_dir.display()),
        ),
    )
    .unwrap();
    let mut command = Command::new(BIN);
    command.arg("check-config").arg(&example);
    for (name, value) in EXAMPLE_ENV {
        command.env(name, value);
    }
    let effective = stdout(&command.output().unwrap());
    let wanted_dir = format!("data_dir = \"{}\"", data_dir.display());
    for wanted in [
        wanted_dir.as_str(),
        "name = \"csp-north\"",
        "name = \"csp-south\"",
        "rate = 2500",
    ] {
        assert!(effective.contains(wanted), "no {wanted:?} in:\n{effective}");
    }
    for (_, value) in EXAMPLE_ENV {
        assert!(!effective.contains(value), "a token in the output");
    }

    // Every variable is needed: without one, check-config names its key.
    for (missing, _) in EXAMPLE_ENV {
        let mut command = Command::new(BIN);
        command.arg("check-config").arg(&example);
        for (name, value) in EXAMPLE_ENV.iter().filter(|(n, _)| *n != missing) {
            command.env(name, value);
        }
        command.env_remove(missing);
        let out = command.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{missing} unset");
        assert!(String::from_utf8_lossy(&out.stderr).contains("token_env"));
    }
}

#[test]
fn the_license_file_is_the_apache_2_0_that_cargo_toml_names() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"Apache-2.0\""));
    let license = std::fs::read_to_string(root().join("LICENSE")).unwrap();
    for clause in [
        "Apache License",
        "Version 2.0, January 2004",
        "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
        "9. Accepting Warranty or Additional Liability.",
        "END OF TERMS AND CONDITIONS",
    ] {
        assert!(license.contains(clause), "LICENSE lacks {clause:?}");
    }
}

#[test]
fn every_cargo_run_in_the_readme_builds_the_release_binary() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let debug: Vec<&str> = readme
        .lines()
        .filter(|line| {
            line.match_indices("cargo run")
                .any(|(at, _)| !line[at..].starts_with("cargo run --release"))
        })
        .collect();
    assert!(
        debug.is_empty(),
        "README commands without --release (a second, debug build):\n{}",
        debug.join("\n")
    );
}

#[test]
fn the_package_assets_exist_or_are_generated_by_build_deb() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let script = std::fs::read_to_string(root().join("tools/package/build-deb.sh")).unwrap();
    let assets = manifest
        .split("assets = [")
        .nth(1)
        .and_then(|rest| rest.split("\n]").next())
        .expect("[package.metadata.deb] assets");
    let mut count = 0;
    for line in assets
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("[\""))
    {
        let source = line.trim_start_matches("[\"").split('"').next().unwrap();
        count += 1;
        if source.starts_with("target/release/") {
            continue; // cargo build
        }
        if let Some(generated) = source.strip_prefix("target/deb-assets/") {
            let dir = generated.split('/').next().unwrap();
            assert!(
                script.contains(&format!("$generated/{dir}")),
                "build-deb.sh does not generate {source}"
            );
            continue;
        }
        assert!(root().join(source).is_file(), "asset {source} is missing");
    }
    assert!(count >= 9, "{count} assets");
    for script in ["postinst", "prerm", "postrm"] {
        let path = root().join("tools/package/debian").join(script);
        let mode = std::os::unix::fs::PermissionsExt::mode(&path.metadata().unwrap().permissions());
        assert!(mode & 0o111 != 0, "{script} is not executable");
        let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        assert!(out.status.success(), "sh -n {script}");
    }
}
