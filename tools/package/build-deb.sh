#!/usr/bin/env bash
# Builds the Debian package: target/debian/dsplane_<version>-1_<arch>.deb.
#
#   tools/package/build-deb.sh            # needs cargo-deb: cargo install cargo-deb --locked
#   dpkg -i target/debian/dsplane_*.deb
#
# It builds the release binary, generates the man pages and shell completions from the clap
# definitions (dsplane man, dsplane completions) into target/deb-assets/, then packages them with
# the unit, the example config and the maintainer scripts listed in Cargo.toml's
# [package.metadata.deb]. The release profile is the one `cargo test --release` uses, so after
# .ci/run's memory test little is left to compile.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v cargo-deb >/dev/null; then
  echo "cargo-deb is not installed: cargo install cargo-deb --locked" >&2
  exit 1
fi

cargo build --release --locked --bin dsplane
bin="$(cargo metadata --format-version 1 --no-deps | sed 's/.*"target_directory":"\([^"]*\)".*/\1/')/release/dsplane"

# cargo-deb reads these from target/deb-assets/ under the workspace root, wherever the target
# directory is (only target/release/ paths are redirected to it).
generated=target/deb-assets
rm -rf "$generated"
mkdir -p "$generated/completions"
"$bin" man --dir "$generated/man"
"$bin" completions bash >"$generated/completions/dsplane"
"$bin" completions zsh >"$generated/completions/_dsplane"
"$bin" completions fish >"$generated/completions/dsplane.fish"

# --strip: Debian ships stripped binaries (the release profile keeps line tables for backtraces
# in development builds).
cargo deb --no-build --locked --strip -p dsplane "$@"
