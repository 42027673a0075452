//! The PROXY protocol header reader fed the first bytes of a trusted
//! source's connection; see `run_proxy_header` in `src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mail_tls_proxy_fuzz::fuzz_proxy_header(data);
});
