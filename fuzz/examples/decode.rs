//! Prints fuzz inputs as dialogues and replays them without libFuzzer:
//! `cargo run --example decode -- smtp FILE...` (protocol: smtp, imap,
//! pop3 or line). Exits 1 if any input breaks an invariant.
use mail_tls_proxy::protocol::Protocol;
use mail_tls_proxy_fuzz::{describe, run_line, run_protocol};

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_default();
    let mut failed = false;
    for path in args {
        let data = std::fs::read(&path).unwrap_or_else(|error| panic!("{path}: {error}"));
        let result = match target.as_str() {
            "smtp" | "imap" | "pop3" => {
                let protocol = match target.as_str() {
                    "smtp" => Protocol::Smtp,
                    "imap" => Protocol::Imap,
                    _ => Protocol::Pop3,
                };
                print!("== {path}\n{}", describe(&data));
                run_protocol(protocol, &data, mail_tls_proxy_fuzz::allowed_from_env)
            }
            "line" => {
                println!("== {path}\n{}", mail_tls_proxy_fuzz::escape(&data));
                run_line(&data)
            }
            _ => panic!("usage: decode smtp|imap|pop3|line FILE..."),
        };
        match result {
            Ok(()) => println!("-> clean"),
            Err(violation) => {
                failed = true;
                println!("-> {violation}");
            }
        }
    }
    std::process::exit(i32::from(failed));
}
