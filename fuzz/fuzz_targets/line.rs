//! `LineBuffer` fed in random-sized chunks with skips, takes and discards,
//! compared with a plain model; see `run_line` in `src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mail_tls_proxy_fuzz::fuzz_line(data);
});
