//! The ClientHello reader fed a handshake message split into records; see
//! `run_client_hello` in `src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mail_tls_proxy_fuzz::fuzz_client_hello(data);
});
