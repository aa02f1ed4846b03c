#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| natcall_fuzz::media_feedback(data));
