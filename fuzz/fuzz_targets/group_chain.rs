//! Fuzz target `group_chain`: runs `kith_net::fuzz::group_chain` on each input (see FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kith_net::fuzz::group_chain(data);
});
