//! `generate-assets`, the hidden subcommand the Debian package build
//! (packaging/build-deb.sh) runs: one manual page for the command and one
//! per visible subcommand, and the bash, zsh and fish completions, all made
//! from the binary's own command line, none offering the hidden subcommand.

use std::path::Path;

use crate::support::{run_binary, TempDir};

const MANUAL_PAGES: [&str; 11] = [
    "mail-tls-proxy-acme-renew.1",
    "mail-tls-proxy-acme.1",
    "mail-tls-proxy-cert-self-signed.1",
    "mail-tls-proxy-cert.1",
    "mail-tls-proxy-check.1",
    "mail-tls-proxy-healthcheck.1",
    "mail-tls-proxy-run.1",
    "mail-tls-proxy-tickets-rotate.1",
    "mail-tls-proxy-tickets.1",
    "mail-tls-proxy-tlsa.1",
    "mail-tls-proxy.1",
];

const COMPLETIONS: [&str; 3] = [
    "_mail-tls-proxy",
    "mail-tls-proxy.bash",
    "mail-tls-proxy.fish",
];

const VISIBLE_SUBCOMMANDS: [&str; 7] = [
    "run",
    "check",
    "healthcheck",
    "cert",
    "tickets",
    "acme",
    "tlsa",
];

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

#[test]
fn generate_assets_writes_a_manual_page_per_subcommand_and_three_completions() {
    let dir = TempDir::new("assets");
    let out = dir.join("out");
    let (ok, stdout, stderr) = run_binary(
        &["generate-assets", "--out", out.to_str().expect("utf-8")],
        None,
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("manual pages"), "{stdout}");
    assert_eq!(file_names(&out.join("man")), MANUAL_PAGES);
    assert_eq!(file_names(&out.join("completions")), COMPLETIONS);

    // roff escapes every hyphen.
    let main_page = read(&out.join("man/mail-tls-proxy.1"));
    assert!(
        main_page.contains(".SH NAME\nmail\\-tls\\-proxy \\- TLS front door"),
        "{main_page}"
    );
    assert!(main_page.contains(".SH SUBCOMMANDS"), "{main_page}");
    for subcommand in VISIBLE_SUBCOMMANDS {
        assert!(
            main_page.contains(&format!("mail\\-tls\\-proxy\\-{subcommand}(1)")),
            "{subcommand} missing from {main_page}"
        );
        let page = read(&out.join(format!("man/mail-tls-proxy-{subcommand}.1")));
        assert!(
            page.contains(&format!(
                ".SH SYNOPSIS\n\\fBmail\\-tls\\-proxy {subcommand}\\fR"
            )),
            "{page}"
        );
    }
    let check_page = read(&out.join("man/mail-tls-proxy-check.1"));
    assert!(check_page.contains("\\fB\\-\\-config\\fR"), "{check_page}");

    let bash = read(&out.join("completions/mail-tls-proxy.bash"));
    assert!(
        bash.contains("run check healthcheck cert tickets acme tlsa help"),
        "the bash completion offers the subcommands: {bash}"
    );
    assert!(read(&out.join("completions/_mail-tls-proxy")).starts_with("#compdef mail-tls-proxy"));
    assert!(
        read(&out.join("completions/mail-tls-proxy.fish")).contains("complete -c mail-tls-proxy")
    );

    for written in MANUAL_PAGES
        .iter()
        .map(|page| out.join("man").join(page))
        .chain(
            COMPLETIONS
                .iter()
                .map(|file| out.join("completions").join(file)),
        )
    {
        let text = read(&written).replace("\\-", "-");
        assert!(
            !text.contains("generate-assets"),
            "{} offers the hidden subcommand",
            written.display()
        );
    }
}

#[test]
fn generate_assets_is_hidden_from_help() {
    let (ok, stdout, stderr) = run_binary(&["--help"], None);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("healthcheck"), "{stdout}");
    assert!(!stdout.contains("generate-assets"), "{stdout}");
}
