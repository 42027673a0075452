//! The command line of the real binary: exit status 78 for configuration
//! errors and 1 for the rest (`run` and `check`), `-c` for `--config`, the
//! default configuration path, and `healthcheck` finding the admin endpoint
//! in the configuration.

use std::path::Path;

use crate::support::certs::*;
use crate::support::*;

/// `EX_CONFIG`.
const CONFIG_ERROR: Option<i32> = Some(78);

const DEFAULT_CONFIG: &str = "/etc/mail-tls-proxy/config.toml";

/// The binary with `args`, to completion.
fn binary(args: &[&str], config: &Path) -> Finished {
    finish(binary_command().args(args).arg(config))
}

/// A configuration that `check` and `run` load without contacting anyone.
fn imaps_only() -> TestConfig {
    TestConfig::new().listener(listener("imaps", "imap", "implicit", "127.0.0.1:143"))
}

#[test]
fn configuration_errors_exit_78_naming_the_file() {
    let dir = TempDir::new("exit-78");
    let syntax = dir.join("syntax.toml");
    std::fs::write(&syntax, "[[listener]\nname = \"imaps\"\n").expect("write");
    let missing = dir.join("missing.toml");
    let invalid = dir.join("invalid.toml");
    std::fs::write(
        &invalid,
        imaps_only().to_toml().replace("implicit", "sometimes"),
    )
    .expect("write");
    for command in ["check", "run"] {
        for file in [&syntax, &missing, &invalid] {
            let finished = binary(&[command, "-c"], file);
            assert_eq!(
                finished.code, CONFIG_ERROR,
                "{command} {file:?}: {finished:?}"
            );
            assert!(
                finished.stderr.contains(&file.display().to_string()),
                "{command}: {finished:?}"
            );
        }
    }
}

#[test]
fn a_certificate_file_the_configuration_names_is_a_configuration_error() {
    let dir = TempDir::new("exit-78-certificate");
    let pair = PairPaths::mismatched_in(dir.path(), "mail", &TestCa::new());
    let config = imaps_only().certificate(&pair).write_in(dir.path());
    for command in ["check", "run"] {
        let finished = binary(&[command, "--config"], &config);
        assert_eq!(finished.code, CONFIG_ERROR, "{command}: {finished:?}");
        assert!(
            finished
                .stderr
                .contains("does not belong to the certificate"),
            "{finished:?}"
        );
    }
    std::fs::remove_file(&pair.key).expect("remove");
    let finished = binary(&["run", "-c"], &config);
    assert_eq!(finished.code, CONFIG_ERROR, "{finished:?}");
    assert!(
        finished.stderr.contains(&pair.key.display().to_string()),
        "{finished:?}"
    );
}

#[test]
fn a_port_in_use_is_not_a_configuration_error() {
    let dir = TempDir::new("exit-1");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address");
    let config = TestConfig::new()
        .listener(listener("imaps", "imap", "implicit", "127.0.0.1:143").listen_on(address))
        .write_in(dir.path());
    let finished = binary(&["run", "-c"], &config);
    assert_eq!(finished.code, Some(1), "{finished:?}");
    assert!(
        finished
            .stderr
            .contains(&format!("cannot listen on {address}")),
        "{finished:?}"
    );
}

#[test]
fn short_long_and_environment_name_the_same_configuration() {
    let dir = TempDir::new("dash-c");
    let config = imaps_only().write_in(dir.path());
    for flag in ["-c", "--config"] {
        let finished = binary(&["check", flag], &config);
        assert_eq!(finished.code, Some(0), "{flag}: {finished:?}");
        assert!(
            finished
                .stdout
                .contains(&format!("configuration {}: OK", config.display())),
            "{finished:?}"
        );
    }
    let finished = finish(
        binary_command()
            .arg("check")
            .env("MAIL_TLS_PROXY_CONFIG", &config),
    );
    assert_eq!(finished.code, Some(0), "{finished:?}");
}

#[test]
fn without_a_configuration_the_default_path_is_read() {
    if Path::new(DEFAULT_CONFIG).exists() {
        eprintln!("{DEFAULT_CONFIG} exists on this machine: nothing to assert");
        return;
    }
    for command in ["check", "run", "healthcheck"] {
        let finished = finish(binary_command().arg(command));
        let expected = if command == "healthcheck" {
            Some(1)
        } else {
            CONFIG_ERROR
        };
        assert_eq!(finished.code, expected, "{command}: {finished:?}");
        assert!(
            finished.stderr.contains(&format!(
                "no --config (-c) or MAIL_TLS_PROXY_CONFIG given, so the default {DEFAULT_CONFIG} was read: {DEFAULT_CONFIG}: cannot read the configuration"
            )),
            "{command}: {finished:?}"
        );
    }
}

#[tokio::test]
async fn healthcheck_asks_the_admin_endpoint_the_configuration_names() {
    let pki = TestPki::new();
    let backend = FakeBackend::start(Script::imap()).await;
    let metrics = free_address();
    // Unspecified: the check asks loopback.
    let config = TestConfig::new()
        .certificate(&pki.pair)
        .metrics_on(&format!("0.0.0.0:{}", metrics.port()))
        .listener(listener("imaps", "imap", "implicit", backend.address))
        .write_in(pki.dir.path());
    let healthcheck = || finish(binary_command().args(["healthcheck", "-c"]).arg(&config));

    let finished = healthcheck();
    assert_eq!(finished.code, Some(1), "not running: {finished:?}");
    assert!(
        finished.stderr.contains(&format!(
            "http://127.0.0.1:{}/readyz: cannot connect",
            metrics.port()
        )),
        "{finished:?}"
    );

    let mut proxy = ProxyProcess::spawn(&config);
    proxy.wait_for_log(&["serving /metrics"]).await;
    // Ready once the first backend check has passed; a container runtime
    // retries the same way.
    let finished = poll_until(async || {
        let finished = healthcheck();
        match finished.code {
            Some(0) => Ok(finished),
            _ => Err(format!("{finished:?}")),
        }
    })
    .await;
    assert!(finished.stdout.contains("/readyz: ready"), "{finished:?}");

    proxy.signal("TERM");
    assert_eq!(proxy.wait_for_exit().await.code(), Some(0));
    assert_eq!(healthcheck().code, Some(1));
}

#[tokio::test]
async fn healthcheck_fails_while_a_backend_is_down() {
    let pki = TestPki::new();
    let down = dead_address();
    let metrics = free_address();
    let config = TestConfig::new()
        .certificate(&pki.pair)
        .metrics_on(&metrics.to_string())
        .listener(listener("imaps", "imap", "implicit", down.address))
        .write_in(pki.dir.path());
    let proxy = ProxyProcess::spawn(&config);
    proxy.wait_for_log(&["serving /metrics"]).await;
    let finished = finish(
        binary_command()
            .args(["healthcheck", "--config"])
            .arg(&config),
    );
    assert_eq!(finished.code, Some(1), "{finished:?}");
    assert!(
        finished.stderr.contains("HTTP 503: not ready"),
        "{finished:?}"
    );
}

#[test]
fn healthcheck_without_an_admin_endpoint_says_so() {
    let dir = TempDir::new("no-metrics");
    let config = imaps_only().write_in(dir.path());
    let finished = binary(&["healthcheck", "-c"], &config);
    assert_eq!(finished.code, Some(1), "{finished:?}");
    assert!(
        finished
            .stderr
            .contains(&format!("{}: no [metrics] listen", config.display())),
        "{finished:?}"
    );
    // A URL needs no configuration at all.
    let finished =
        finish(binary_command().args(["healthcheck", "--url", "http://127.0.0.1:9/readyz"]));
    assert_eq!(finished.code, Some(1), "{finished:?}");
    assert!(finished.stderr.contains("cannot connect"), "{finished:?}");
}
