//! Fuzz target `mailbox`: runs `kith_net::fuzz::mailbox` on each input (see FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kith_net::fuzz::mailbox(data);
});
