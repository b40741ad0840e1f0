//! Fuzz target `frame`: runs `kith_net::fuzz::frame` on each input (see FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kith_net::fuzz::frame(data);
});
