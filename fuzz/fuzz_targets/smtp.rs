//! The SMTP inspection machine driven through `Inspector` by a decoded
//! dialogue; see `src/lib.rs` for the input format and the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_tls_proxy::protocol::Protocol;

fuzz_target!(|data: &[u8]| {
    mail_tls_proxy_fuzz::fuzz_protocol(Protocol::Smtp, data);
});
