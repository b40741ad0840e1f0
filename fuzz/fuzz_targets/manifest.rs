//! Fuzz target `manifest`: runs `kith_net::fuzz::manifest` on each input (see FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kith_net::fuzz::manifest(data);
});
