#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| natcall_fuzz::room_receiver(data));
