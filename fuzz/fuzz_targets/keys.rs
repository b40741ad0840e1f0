//! Fuzz target `keys`: runs `kith_net::fuzz::keys` on each input (see FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kith_net::fuzz::keys(data);
});
