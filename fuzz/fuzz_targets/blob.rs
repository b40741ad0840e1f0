//! Fuzz target `blob`: runs `kith_net::fuzz::blob` on each input (see FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kith_net::fuzz::blob(data);
});
