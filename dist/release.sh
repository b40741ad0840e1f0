#!/bin/sh
# Builds the release binaries with their debug information in separate files:
#
#   target/release/kith, target/release/kith-relay         what to ship: symbols, no DWARF
#   target/release/kith.debug, target/release/kith-relay.debug
#                                                          line tables, to keep beside them (or
#                                                          give to gdb / addr2line) for file:line
#                                                          in backtraces
#
# A plain `cargo build --release` gives the same small binaries without the .debug files.
set -eu
cd "$(dirname "$0")/.."
cargo build --release --locked -p kith-node -p kith-relay --bins \
    --config 'profile.release.strip=false'
dir="${CARGO_TARGET_DIR:-target}/release"
for bin in kith kith-relay; do
    objcopy --only-keep-debug "$dir/$bin" "$dir/$bin.debug"
    objcopy --strip-debug --add-gnu-debuglink="$dir/$bin.debug" "$dir/$bin"
done
ls -l "$dir/kith" "$dir/kith.debug" "$dir/kith-relay" "$dir/kith-relay.debug"
