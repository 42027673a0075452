//! Test helpers shared by the protocol machines' unit tests: feed a side's
//! bytes line by line and collect what the machine wrote.

use super::{Inspector, Next, Output};

/// Feeds backend bytes line by line; returns (to_client, to_backend, last Next).
pub(crate) fn backend(
    machine: &mut (impl Inspector + ?Sized),
    bytes: &[u8],
) -> (Vec<u8>, Vec<u8>, Next) {
    feed(machine, bytes, false)
}

/// Feeds client bytes line by line; returns (to_client, to_backend, last Next).
pub(crate) fn client(
    machine: &mut (impl Inspector + ?Sized),
    bytes: &[u8],
) -> (Vec<u8>, Vec<u8>, Next) {
    feed(machine, bytes, true)
}

fn feed(
    machine: &mut (impl Inspector + ?Sized),
    bytes: &[u8],
    from_client: bool,
) -> (Vec<u8>, Vec<u8>, Next) {
    let mut out = Output::default();
    let mut next = Next::Continue;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        next = if from_client {
            machine.client_line(line, &mut out)
        } else {
            machine.backend_line(line, &mut out)
        };
    }
    (out.to_client, out.to_backend, next)
}
