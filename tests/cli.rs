//! The command line: `switchyard check` and `switchyard demo`, run as the real binary.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::time::timeout;

fn switchyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run switchyard")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &std::path::Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write");
    p.to_str().expect("utf8").to_string()
}

/// A bearer token that cannot travel in an `Authorization` header, in the variable
/// `admin.token_env` or `analysis.prometheus_token_env` names, is a problem `check` lists beside
/// the rest, with its key, as `serve` does (it used to pass `check`, and `serve` refused it
/// alone); one trailing line end is not part of the token, and passes.
#[test]
fn check_refuses_a_token_that_cannot_be_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "c.toml",
        "[proxy]\nconnect_timeout = \"soon\"\n[admin]\ntoken_env = \"SY_T_ADMIN\"\n\
         [analysis]\nprometheus_url = \"http://127.0.0.1:9\"\nprometheus_token_env = \"SY_T_PROM\"\n\
         [[services]]\nname = \"api\"\nblue = { upstreams = [\"127.0.0.1:3001\"] }\n\
         green = { upstreams = [\"127.0.0.1:3011\"] }\n",
    );
    let run = |cmd: &str, admin: &str, prom: &str| {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([cmd, "--config", &file])
            .env("RUST_LOG", "warn")
            .env("SY_T_ADMIN", admin)
            .env("SY_T_PROM", prom)
            .stdin(Stdio::null())
            .output()
            .expect("run switchyard")
    };
    for cmd in ["check", "serve"] {
        let out = run(cmd, "zqx\nlines", "caf\u{e9}");
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(err.contains("3 problems"), "{cmd}: {err}");
        for key in [
            "proxy.connect_timeout",
            "admin.token_env: the token in SY_T_ADMIN",
            "analysis.prometheus_token_env: the token in SY_T_PROM",
        ] {
            assert!(err.contains(key), "{cmd}: no {key} in {err}");
        }
        assert!(
            !err.contains("zqx"),
            "{cmd}: the token is not repeated: {err}"
        );
    }
    let ok = std::fs::read_to_string(&file)
        .expect("read")
        .replace("connect_timeout = \"soon\"\n", "");
    std::fs::write(&file, ok).expect("write");
    let out = run("check", "secret\n", "token\r\n");
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
}

/// `check` reads the files the config names as `serve` does at startup: a TLS key that is not
/// one, a certificate and key that do not match, an access log in a directory that does not
/// exist: exit 1, each named by its key; a good pair passes.
#[test]
fn check_reads_the_tls_files_and_the_access_log_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = |name: &str| {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
        (
            write(dir.path(), &format!("{name}.crt"), &ck.cert.pem()),
            write(
                dir.path(),
                &format!("{name}.key"),
                &ck.key_pair.serialize_pem(),
            ),
        )
    };
    let (cert, key) = pair("a");
    let (_, other_key) = pair("b");
    let garbage = write(dir.path(), "garbage.key", "not a key\n");
    let service = "[[services]]\nname = \"api\"\nblue = { upstreams = [\"127.0.0.1:3001\"] }\ngreen = { upstreams = [\"127.0.0.1:3002\"] }\n";
    // The CA files: the certificate itself is a usable CA (rustls takes any certificate as a
    // trust anchor); garbage, and a file that is not there, are not.
    let config = |tls_key: &str, admin_key: &str, access: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:8080\"\ntls_listen = \"127.0.0.1:8443\"\n\
             tls_cert = \"{cert}\"\ntls_key = \"{tls_key}\"\n\
             [admin]\nlisten = \"127.0.0.1:9090\"\ntls_cert = \"{cert}\"\ntls_key = \"{admin_key}\"\n\
             [log]\naccess = \"{access}\"\n\
             [analysis]\nca_file = \"{cert}\"\n[notify]\nca_file = \"{cert}\"\n{service}"
        )
    };
    let good = write(
        dir.path(),
        "good.toml",
        &config(
            &key,
            &key,
            &dir.path().join("access.log").display().to_string(),
        ),
    );
    let out = switchyard(&["check", "--config", &good]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(!text(&out).0.contains("warning"), "{:?}", text(&out));

    // An expired certificate passes (it is served, as nginx serves it) with a warning at its
    // key; so does one within two weeks of its end.
    let dated = |name: &str, days: i64| {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock");
        let shift = std::time::Duration::from_secs(days.unsigned_abs() * 86_400);
        let now = rcgen::date_time_ymd(1970, 1, 1) + now;
        params.not_after = if days < 0 { now - shift } else { now + shift };
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        (
            write(dir.path(), &format!("{name}.crt"), &cert.pem()),
            write(dir.path(), &format!("{name}.key"), &key.serialize_pem()),
        )
    };
    let (old_cert, old_key) = dated("old", -1);
    let (soon_cert, soon_key) = dated("soon", 5);
    let aging = config(
        &old_key,
        &soon_key,
        &dir.path().join("access.log").display().to_string(),
    )
    .replacen(
        &format!("tls_cert = \"{cert}\""),
        &format!("tls_cert = \"{old_cert}\""),
        1,
    )
    .replacen(
        &format!("tls_cert = \"{cert}\""),
        &format!("tls_cert = \"{soon_cert}\""),
        1,
    );
    let aging = write(dir.path(), "aging.toml", &aging);
    let out = switchyard(&["check", "--config", &aging]);
    let (said, err) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said} {err}");
    assert!(
        said.contains(&format!(
            "warning: proxy.tls_cert: certificate {old_cert} expired at"
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "warning: admin.tls_cert: certificate {soon_cert} expires at"
        )),
        "{said}"
    );
    assert!(said.contains("in 4days 23h"), "{said}");

    let bad = write(
        dir.path(),
        "bad.toml",
        &config(
            &garbage,
            &other_key,
            &dir.path().join("nowhere/access.log").display().to_string(),
        )
        .replacen(
            &format!("ca_file = \"{cert}\""),
            &format!("ca_file = \"{garbage}\""),
            1,
        )
        .replacen(
            &format!("ca_file = \"{cert}\""),
            &format!("ca_file = \"{}\"", dir.path().join("no-ca.pem").display()),
            1,
        ),
    );
    let out = switchyard(&["check", "--config", &bad]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for key in [
        "proxy.tls_key:",
        "admin.tls_",
        "log.access:",
        "analysis.ca_file:",
        "notify.ca_file:",
    ] {
        assert!(err.contains(key), "no {key} in {err}");
    }
    assert!(err.contains("5 problems"), "{err}");

    // With a problem elsewhere in the file, the files' problems are listed beside it, by
    // `check` and by `serve` alike (they used to wait until the rest was valid).
    let text_bad = std::fs::read_to_string(&bad).expect("read");
    let both = write(
        dir.path(),
        "both.toml",
        &text_bad.replace("[proxy]\n", "[proxy]\nconnect_timeout = \"soon\"\n"),
    );
    for cmd in ["check", "serve"] {
        let out = switchyard(&[cmd, "--config", &both]);
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        for key in [
            "proxy.connect_timeout",
            "proxy.tls_key",
            "admin.tls_",
            "log.access",
            "analysis.ca_file",
            "notify.ca_file",
        ] {
            assert!(err.contains(key), "{cmd}: no {key} in {err}");
        }
    }
    let out = switchyard(&["check", "--config", &both]);
    assert!(text(&out).1.contains("6 problems"), "{:?}", text(&out));

    // The proxy's pair without a TLS listener is an error at its keys (no HTTPS would start),
    // and its files are not read (`serve` would not read them).
    let unused = write(
        dir.path(),
        "unused.toml",
        &config(
            &garbage,
            &key,
            &dir.path().join("access.log").display().to_string(),
        )
        .replace("tls_listen = \"127.0.0.1:8443\"\n", ""),
    );
    let out = switchyard(&["check", "--config", &unused]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("proxy.tls_cert: set, but proxy.tls_listen is not"),
        "{err}"
    );
    assert!(err.contains("2 problems"), "{err}");
}

#[test]
fn check_reports_every_error_with_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "bad.toml",
        r#"
[proxy]
listen = "127.0.0.1:8080"
request_timeout = "30"
colour = "blue"

[[services]]
name = "api"
active = "red"
blue  = { upstreams = ["127.0.0.1:3001", "x:y"] }
green = { upstreams = ["127.0.0.1:3011"] }

[[services.rollback.triggers]]
kind = "error_ratio"
above = 0.05
over = "1m"
for = "2m"
"#,
    );
    let out = switchyard(&["check", "--config", &file]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let all = format!("{stdout}{stderr}");
    for expected in [
        "proxy.colour: unknown key",
        "proxy.request_timeout: invalid duration \"30\"",
        "services[0].active: invalid color \"red\"",
        "services[0].blue.upstreams[1]: invalid address \"x:y\"",
        "services[0].rollback.triggers[0].kind: invalid trigger kind \"error_ratio\"",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
    assert!(all.contains("5 problems"), "{all}");
}

/// Values of the wrong type do not hide the rest: each is named at its key, beside every
/// semantic error of the file, and none draws a second error about its key.
#[test]
fn check_reports_wrong_types_with_every_other_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "bad.toml",
        r#"
[proxy]
listen = "localhost"
workers = "two"

[[services]]
name = "api"
active = "purple"
blue  = { upstreams = ["127.0.0.1:3001"] }
green = { upstreams = ["127.0.0.1:3011"] }
health = { interval = "5", unhealthy_after = "x" }

[services.rollback]
dry_run = "no"
"#,
    );
    let out = switchyard(&["check", "--config", &file]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let all = format!("{stdout}{stderr}");
    for expected in [
        "proxy.workers: invalid type: string \"two\", expected an integer",
        "services[0].health.unhealthy_after: invalid type: string \"x\", expected an integer",
        "services[0].rollback.dry_run: invalid type: string \"no\", expected a boolean",
        "proxy.listen: invalid address \"localhost\"",
        "services[0].active: invalid color \"purple\"",
        "services[0].health.interval: invalid duration \"5\"",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
    assert!(all.contains("6 problems"), "{all}");
}

#[test]
fn check_accepts_a_good_file_and_prints_a_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "good.toml",
        r#"
[proxy]
listen = "127.0.0.1:8080"

[[services]]
name = "api"
path_prefix = "/api"
blue  = { upstreams = ["127.0.0.1:3001", "127.0.0.1:3002"] }
green = { upstreams = ["127.0.0.1:3011"] }

[[services.rollback.triggers]]
kind = "error_rate"
above = 0.05
over = "1m"
for = "2m"
"#,
    );
    let out = switchyard(&["check", "--config", &file]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
    assert!(stdout.contains("services: 1"), "{stdout}");
    assert!(stdout.contains("api"), "{stdout}");
    assert!(stdout.contains("127.0.0.1:3002"), "{stdout}");
    assert!(stdout.contains("error_rate"), "{stdout}");
}

/// `SWITCHYARD__SECTION__KEY` overrides any key whatever its value looks like: a string key
/// given "123" or "true" keeps the string (they were refused as an integer and a boolean), and
/// an integer key still reads its number.
#[test]
fn check_takes_number_and_boolean_looking_overrides_of_string_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "c.toml",
        "[[services]]\nname = \"api\"\nblue = { upstreams = [\"127.0.0.1:3001\"] }\n\
         green = { upstreams = [\"127.0.0.1:3011\"] }\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config", &file])
        .env("RUST_LOG", "warn")
        .env("SWITCHYARD__STATE__PATH", "123")
        .env("SWITCHYARD__STATE__ETCD_PREFIX", "true")
        .env("SWITCHYARD__ADMIN__TOKEN_ENV", "1")
        .env("SWITCHYARD__PROXY__WORKERS", "4")
        // An empty list key is an empty list.
        .env("SWITCHYARD__NOTIFY__WEBHOOKS", "")
        .stdin(Stdio::null())
        .output()
        .expect("run switchyard");
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
}

/// Two overrides where one's key is inside the other's are refused with exit 1, naming both
/// variables, in every run: applied in hash-map order, they were an error in some runs and in
/// others dropped the file's whole `[proxy]` table.
#[test]
fn check_refuses_overrides_one_inside_the_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "c.toml",
        "[proxy]\nlisten = \"127.0.0.1:8088\"\n[[services]]\nname = \"api\"\n\
         blue = { upstreams = [\"127.0.0.1:3001\"] }\ngreen = { upstreams = [\"127.0.0.1:3011\"] }\n",
    );
    for _ in 0..5 {
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["check", "--config", &file])
            .env("RUST_LOG", "warn")
            .env("SWITCHYARD__PROXY", "1")
            .env("SWITCHYARD__PROXY__WORKERS", "4")
            .stdin(Stdio::null())
            .output()
            .expect("run switchyard");
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
        assert!(
            stderr.contains("proxy: ")
                && stderr.contains("SWITCHYARD__PROXY ")
                && stderr.contains("SWITCHYARD__PROXY__WORKERS ")
                && stderr.contains("set only one"),
            "{stderr}"
        );
    }
}

#[test]
fn check_of_a_missing_file_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.toml");
    let missing = missing.to_str().expect("utf8");
    let out = switchyard(&["check", "--config", missing]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("cannot read config file"), "{stderr}");
    assert!(stderr.contains(missing), "{stderr}");
}

/// `serve` with a certificate or key it cannot use exits 1 naming the one key at fault (not
/// both), with the file and the reason.
#[test]
fn serve_names_the_tls_key_that_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    let cert = write(dir.path(), "cert.pem", &ck.cert.pem());
    let key = write(dir.path(), "key.pem", &ck.key_pair.serialize_pem());
    let garbage = write(dir.path(), "garbage.pem", "not a PEM file\n");
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().expect("utf8").to_string();
    let state = dir.path().join("state.json");
    let services = "[[services]]\nname = \"api\"\n\
                    blue = { upstreams = [\"127.0.0.1:3001\"] }\n\
                    green = { upstreams = [\"127.0.0.1:3011\"] }\n";
    // (section, cert, key, the key that must be named, the other one, the file, the reason)
    let cases = [
        (
            "proxy",
            &cert,
            &missing,
            "proxy.tls_key",
            "proxy.tls_cert",
            &missing,
            "cannot read private key",
        ),
        (
            "proxy",
            &cert,
            &garbage,
            "proxy.tls_key",
            "proxy.tls_cert",
            &garbage,
            "cannot read private key",
        ),
        (
            "proxy",
            &missing,
            &key,
            "proxy.tls_cert",
            "proxy.tls_key",
            &missing,
            "cannot read certificate",
        ),
        (
            "proxy",
            &garbage,
            &key,
            "proxy.tls_cert",
            "proxy.tls_key",
            &garbage,
            "no certificate found",
        ),
        (
            "admin",
            &cert,
            &missing,
            "admin.tls_key",
            "admin.tls_cert",
            &missing,
            "cannot read private key",
        ),
        (
            "admin",
            &missing,
            &key,
            "admin.tls_cert",
            "admin.tls_key",
            &missing,
            "cannot read certificate",
        ),
    ];
    for (section, c, k, named, other, file, why) in cases {
        let (proxy_tls, admin_tls) = match section {
            "proxy" => (
                format!("tls_listen = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\n"),
                String::new(),
            ),
            _ => (
                String::new(),
                format!("tls_cert = \"{c}\"\ntls_key = \"{k}\"\n"),
            ),
        };
        let config = write(
            dir.path(),
            "switchyard.toml",
            &format!(
                "[proxy]\nlisten = \"127.0.0.1:0\"\n{proxy_tls}[admin]\nlisten = \"127.0.0.1:0\"\n\
                 {admin_tls}[state]\npath = \"{}\"\n{services}",
                state.display()
            ),
        );
        let out = switchyard(&["serve", "--config", &config]);
        let (stdout, stderr) = text(&out);
        let case = format!("{named} ({why}): {stdout}\n{stderr}");
        assert_eq!(out.status.code(), Some(1), "{case}");
        assert!(stderr.contains(&format!("{named}: {why}")), "{case}");
        assert!(stderr.contains(file.as_str()), "{case}");
        assert!(
            !stderr.contains(other),
            "the key not at fault is named: {case}"
        );
    }
}

/// `serve --log-format json` says why it cannot start in JSON lines shaped like its other log
/// lines (`timestamp`, `level`, `fields`, `target`): every config problem with its key, a
/// listener it cannot bind, even with `RUST_LOG=off`; exit 1 all the same. Text stays text.
#[test]
fn serve_reports_startup_errors_as_json_lines_with_log_format_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = write(
        dir.path(),
        "bad.toml",
        "[proxy]\nlisten = \"127.0.0.1:0\"\ncolour = \"blue\"\n[admin]\nlisten = \"nope\"\n\
         [[services]]\nname = \"api\"\nblue = { upstreams = [\"x:y\"] }\n\
         green = { upstreams = [\"127.0.0.1:3011\"] }\n",
    );
    let keys = [
        "proxy.colour",
        "admin.listen",
        "services[0].blue.upstreams[0]",
    ];
    // Every stderr line a JSON object of the tracing shape; the ERROR ones returned.
    let json_lines = |out: &Output| -> Vec<serde_json::Value> {
        let (stdout, stderr) = text(out);
        assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
        assert!(!stderr.trim().is_empty(), "nothing said");
        let mut errors = Vec::new();
        for line in stderr.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n{stderr}"));
            for k in ["timestamp", "level", "fields", "target"] {
                assert!(v.get(k).is_some(), "no {k} in {line}");
            }
            assert!(v["fields"]["message"].is_string(), "{line}");
            if v["level"] == "ERROR" {
                errors.push(v);
            }
        }
        errors
    };
    for rust_log in ["warn", "off"] {
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["--log-format", "json", "serve", "--config", &bad])
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .output()
            .expect("run switchyard");
        let errors = json_lines(&out);
        for key in keys {
            let e = errors
                .iter()
                .find(|e| e["fields"]["key"] == key)
                .unwrap_or_else(|| panic!("RUST_LOG={rust_log}: no error for {key}: {errors:?}"));
            let error = e["fields"]["error"].as_str().unwrap_or_default();
            assert!(error.starts_with(&format!("{key}: ")), "{e}");
            assert!(e["fields"]["config"].as_str() == Some(bad.as_str()), "{e}");
        }
    }
    let missing = dir.path().join("nope.toml").display().to_string();
    let out = switchyard(&["--log-format", "json", "serve", "--config", &missing]);
    let errors = json_lines(&out);
    assert!(
        errors.iter().any(|e| e["fields"]["error"]
            .as_str()
            .is_some_and(|t| t.contains("cannot read config file"))),
        "{errors:?}"
    );

    // A taken port: the bind failure with its key.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let good = write(
        dir.path(),
        "good.toml",
        &format!(
            "[proxy]\nlisten = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\n\
             green = {{ upstreams = [\"127.0.0.1:3011\"] }}\n",
            taken.local_addr().expect("addr"),
            dir.path().join("state.json").display()
        ),
    );
    let out = switchyard(&["--log-format", "json", "serve", "--config", &good]);
    let errors = json_lines(&out);
    assert!(
        errors.iter().any(|e| e["fields"]["error"]
            .as_str()
            .is_some_and(|t| t.starts_with("proxy.listen: cannot listen on"))),
        "{errors:?}"
    );

    // Text as before: a header, then every problem with its key.
    let out = switchyard(&["serve", "--config", &bad]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.starts_with(&format!("{bad}: 3 problems:\n")),
        "{stderr}"
    );
    for key in keys {
        assert!(
            stderr.contains(&format!("\n  {key}: ")),
            "no {key}: {stderr}"
        );
    }
    let out = switchyard(&["serve", "--config", &good]);
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("error: proxy.listen: cannot listen on"),
        "{stderr}"
    );
    drop(taken);
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["check", "--no-such-flag"][..],
        &["no-such-command"][..],
        &[][..],
        &["serve", "--config"][..],
    ] {
        let out = switchyard(args);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stdout}\n{stderr}");
        assert!(!stderr.is_empty(), "{args:?}: usage error says nothing");
    }
}

#[test]
fn shipped_config_passes_check() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml");
    let out = switchyard(&["check", "--config", path]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("services: 2"), "{stdout}");
}

#[tokio::test]
async fn demo_serves_and_flips_with_nothing_else_installed() {
    let demo = start_demo(&["--no-traffic"], None).await;
    let (proxy, admin, preview) = (demo.proxy, demo.admin, demo.preview);
    let mut child = demo.drained();

    let result = async {
        let up = eventually(20, || async {
            try_get(proxy, "/api/x").await == Some((200, "blue\n".to_string()))
        })
        .await;
        if !up {
            return Err("the demo proxy never answered blue".to_string());
        }
        if try_get(preview, "/api/x").await != Some((200, "green\n".to_string())) {
            return Err("the preview listener does not serve the idle color".to_string());
        }
        let (s, v) = admin_post(
            admin,
            "/api/services/api/flip",
            Some("demo-token"),
            Some(json!({"to": "green"})),
        )
        .await;
        if s != 200 {
            return Err(format!("flip answered {s}: {v}"));
        }
        match try_get(proxy, "/api/x").await {
            Some((200, b)) if b == "green\n" => Ok(()),
            other => Err(format!("after the flip: {other:?}")),
        }
    }
    .await;
    let _ = child.start_kill();
    let _ = timeout(Duration::from_secs(10), child.wait()).await;
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Ctrl-C (SIGINT) or SIGTERM stops the demo: exit 0, its upstreams closed with it, and the
/// state directory it made in the temp dir removed (one was left behind per run).
#[tokio::test]
async fn demo_stops_on_a_signal_and_leaves_nothing_behind() {
    for signal in ["-INT", "-TERM"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let demo = start_demo(&["--no-traffic"], Some(tmp.path())).await;
        let proxy = demo.proxy;
        let mut child = demo.drained();
        let up = eventually(20, || async {
            try_get(proxy, "/api/x").await == Some((200, "blue\n".to_string()))
        })
        .await;
        let made = std::fs::read_dir(tmp.path()).expect("read tmp").count();
        let pid = child.id().expect("pid").to_string();
        let _ = Command::new("kill").args([signal, &pid]).status();
        let status = timeout(Duration::from_secs(20), child.wait()).await;
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("read tmp")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(up, "the demo never answered blue");
        assert_eq!(made, 1, "the demo made its state directory in TMPDIR");
        let status = status
            .expect("the demo did not stop within 20 s")
            .expect("wait");
        assert_eq!(status.code(), Some(0), "{signal}");
        assert!(left.is_empty(), "{signal}: left behind {left:?}");
        assert_eq!(try_get(proxy, "/api/x").await, None, "the proxy is closed");
    }
}

/// A `switchyard demo` started by [`start_demo`], its stdout read up to its listeners' URLs.
struct Demo {
    child: tokio::process::Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    preview: SocketAddr,
    /// The rest of what it prints.
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Demo {
    /// Its process, the rest of its stdout read and dropped meanwhile (so that nothing it
    /// prints finds the pipe closed).
    fn drained(self) -> tokio::process::Child {
        let mut lines = self.lines;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child
    }
}

/// `switchyard demo` with token `demo-token`, every listener on port 0: the system picks free
/// ports as the demo binds them (a port picked beforehand could be taken by a parallel test
/// first), and the URLs the demo prints, read here, say which. `tmpdir`: its TMPDIR.
async fn start_demo(extra: &[&str], tmpdir: Option<&std::path::Path>) -> Demo {
    use tokio::io::AsyncBufReadExt;
    let any = "127.0.0.1:0";
    let mut args = vec![
        "demo",
        "--listen",
        any,
        "--admin",
        any,
        "--preview",
        any,
        "--token",
        "demo-token",
    ];
    args.extend_from_slice(extra);
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if let Some(dir) = tmpdir {
        cmd.env("TMPDIR", dir);
    }
    let mut child = cmd.spawn().expect("spawn demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    // `  proxy      http://127.0.0.1:PORT        ...`, then preview, then dashboard.
    let url = |line: &str, label: &str| -> Option<SocketAddr> {
        let rest = line.trim_start().strip_prefix(label)?.trim_start();
        let addr = rest.strip_prefix("http://")?.split([' ', '/']).next()?;
        addr.parse().ok()
    };
    let (mut proxy, mut preview, mut admin) = (None, None, None);
    while admin.is_none() {
        let line = match timeout(Duration::from_secs(20), lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => panic!("the demo printed no URLs within 20 s: {other:?}"),
        };
        proxy = proxy.or_else(|| url(&line, "proxy"));
        preview = preview.or_else(|| url(&line, "preview"));
        admin = admin.or_else(|| url(&line, "dashboard"));
    }
    let (Some(proxy), Some(preview), Some(admin)) = (proxy, preview, admin) else {
        panic!("the demo printed its dashboard before its proxy and preview URLs");
    };
    Demo {
        child,
        proxy,
        admin,
        preview,
        lines,
    }
}

/// The README's demo walk-through: flip api to green, make green fail through the demo
/// upstream's control URL (printed by the demo), and the automatic rollback shows in
/// /api/events while the demo's own background traffic runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_walkthrough_rolls_back_a_failing_green() {
    let Demo {
        mut child,
        proxy,
        admin,
        lines,
        ..
    } = start_demo(&[], None).await;

    let result = async {
        // The demo prints the line with the break command for green's api upstream.
        let mut lines = lines;
        let mut fail_url = None;
        while let Ok(Ok(Some(line))) = timeout(Duration::from_secs(20), lines.next_line()).await {
            if let Some(start) = line.find("'http://") {
                if line.contains("/_demo/fail") {
                    let rest = &line[start + 1..];
                    fail_url = rest.split('\'').next().map(str::to_string);
                    break;
                }
            }
        }
        let fail_url = fail_url.ok_or("the demo did not print the /_demo/fail command")?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let up = eventually(20, || async {
            try_get(proxy, "/api/x").await == Some((200, "blue\n".to_string()))
        })
        .await;
        if !up {
            return Err("the demo proxy never answered blue".to_string());
        }
        let (s, v) = admin_post(
            admin,
            "/api/services/api/flip",
            Some("demo-token"),
            Some(json!({"to": "green"})),
        )
        .await;
        if s != 200 {
            return Err(format!("flip answered {s}: {v}"));
        }
        // `curl 'http://127.0.0.1:PORT/_demo/fail?rate=30'`, as printed.
        let url: http::Uri = fail_url.parse().map_err(|e| format!("{fail_url}: {e}"))?;
        let addr: SocketAddr = url
            .authority()
            .ok_or("no authority")?
            .as_str()
            .parse()
            .map_err(|e| format!("{e}"))?;
        let path = url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        if try_get(addr, path).await.map(|r| r.0) != Some(200) {
            return Err("the demo upstream's control URL failed".to_string());
        }
        // The demo's triggers read 10 s windows and hold for 5 s.
        let rolled = eventually(40, || async {
            let (_, v) = admin_get(admin, "/api/events").await;
            v["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["reason"] == "auto_rollback"))
        })
        .await;
        if !rolled {
            return Err("no auto_rollback event within 40 s".to_string());
        }
        match try_get(proxy, "/api/x").await {
            Some((_, b)) if b == "blue\n" => Ok(()),
            other => Err(format!("after the rollback: {other:?}")),
        }
    }
    .await;
    let _ = child.start_kill();
    let _ = timeout(Duration::from_secs(10), child.wait()).await;
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// From the Dockerfile: the HEALTHCHECK command and the CMD (the arguments of the
/// `switchyard` entrypoint), both in exec form, and the SWITCHYARD_CONFIG it sets.
fn dockerfile() -> (Vec<String>, Vec<String>, String) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .expect("Dockerfile");
    let exec = |prefix: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in the Dockerfile"));
        let json = &line[line
            .find("CMD [")
            .unwrap_or_else(|| panic!("exec form: {line}"))
            + 4..];
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{line}: {e}"))
    };
    let config = text
        .split("SWITCHYARD_CONFIG=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("ENV SWITCHYARD_CONFIG in the Dockerfile")
        .to_string();
    (exec("HEALTHCHECK "), exec("CMD "), config)
}

/// The binary run as a Dockerfile argument list says (`switchyard` first), with `env`, under a
/// bound of its own: (exit code, stdout, stderr).
async fn run_image_command(args: &[String], env: &[(&str, &str)]) -> (i32, String, String) {
    assert_eq!(
        args.first().map(String::as_str),
        Some("switchyard"),
        "{args:?}"
    );
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(&args[1..])
        .kill_on_drop(true)
        .env("RUST_LOG", "warn");
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHYARD") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let out = timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("no exit within 30 s")
        .expect("run switchyard");
    let (stdout, stderr) = text(&out);
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// The image's HEALTHCHECK follows the config the image's CMD serves (both from
/// SWITCHYARD_CONFIG and the SWITCHYARD__* overrides): an admin listener on a port other than
/// 9090 and one over https (a certificate naming neither the IP nor localhost) are healthy; a
/// wildcard admin address is probed on loopback; another certificate than the configured one,
/// a stopped server and a listener that never answers are not, each within its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_healthcheck_follows_the_admin_port_and_tls_of_the_config() {
    let (health, serve, image_config) = dockerfile();
    assert_eq!(
        serve.first().map(String::as_str),
        Some("serve"),
        "{serve:?}"
    );
    assert!(
        image_config.starts_with("/etc/switchyard/"),
        "{image_config}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let ck =
        rcgen::generate_simple_self_signed(vec!["admin.example.com".to_string()]).expect("rcgen");
    let cert = write(dir.path(), "admin.crt", &ck.cert.pem());
    let key = write(dir.path(), "admin.key", &ck.key_pair.serialize_pem());
    let other =
        rcgen::generate_simple_self_signed(vec!["admin.example.com".to_string()]).expect("rcgen");
    let other_cert = write(dir.path(), "other.crt", &other.cert.pem());
    let up = TestUpstream::start("blue").await;

    for tls in [false, true] {
        let admin_port = free_port();
        let admin_tls = if tls {
            format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n")
        } else {
            String::new()
        };
        let config = write(
            dir.path(),
            &format!("switchyard-{tls}.toml"),
            &format!(
                "[proxy]\nlisten = \"127.0.0.1:{}\"\nshutdown_grace = \"1s\"\n\
                 [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{admin_tls}\
                 [state]\npath = \"{}\"\n{}",
                free_port(),
                dir.path().join(format!("state-{tls}.json")).display(),
                service("api", &[up.addr], &[up.addr], "")
            ),
        );
        let env = [("SWITCHYARD_CONFIG", config.as_str())];
        let log = dir.path().join(format!("serve-{tls}.log"));
        let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        server
            .args(&serve)
            .env("RUST_LOG", "warn")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .kill_on_drop(true);
        for (k, _) in std::env::vars() {
            if k.starts_with("SWITCHYARD__") {
                server.env_remove(k);
            }
        }
        let mut server = server.spawn().expect("spawn serve");
        let mut last = (0, String::new(), String::new());
        let mut healthy = false;
        for _ in 0..100 {
            last = run_image_command(&health, &env).await;
            if last.0 == 0 {
                healthy = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            healthy,
            "tls={tls}: never healthy: {last:?}\nserve: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let scheme = if tls { "https" } else { "http" };
        assert!(
            last.1
                .contains(&format!("{scheme}://127.0.0.1:{admin_port}/healthz")),
            "{last:?}"
        );

        // The image listens on 0.0.0.0: probed on loopback.
        let wildcard = format!("0.0.0.0:{admin_port}");
        let o = run_image_command(
            &health,
            &[
                ("SWITCHYARD_CONFIG", &config),
                ("SWITCHYARD__ADMIN__LISTEN", &wildcard),
            ],
        )
        .await;
        assert_eq!(o.0, 0, "tls={tls}: {o:?}");
        if tls {
            let o = run_image_command(
                &health,
                &[
                    ("SWITCHYARD_CONFIG", &config),
                    ("SWITCHYARD__ADMIN__TLS_CERT", &other_cert),
                ],
            )
            .await;
            assert_eq!(o.0, 1, "another certificate passed: {o:?}");
            assert!(o.2.contains("certificate"), "{o:?}");

            // A renewal: the files replaced on disk, then a reload (SIGHUP). Before the reload
            // the server still serves the old certificate (unhealthy); after it, the new one.
            std::fs::write(&cert, other.cert.pem()).expect("renew cert");
            std::fs::write(&key, other.key_pair.serialize_pem()).expect("renew key");
            let o = run_image_command(&health, &env).await;
            assert_eq!(
                o.0, 1,
                "the old certificate matched the renewed file: {o:?}"
            );
            let pid = server.id().expect("pid").to_string();
            let hup = std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .expect("kill -HUP");
            assert!(hup.success());
            let mut renewed = (0, String::new(), String::new());
            for _ in 0..100 {
                renewed = run_image_command(&health, &env).await;
                if renewed.0 == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert_eq!(
                renewed.0,
                0,
                "the admin certificate was not reloaded: {renewed:?}\nserve: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            // Back to the first pair for the rest of the test.
            std::fs::write(&cert, ck.cert.pem()).expect("restore cert");
            std::fs::write(&key, ck.key_pair.serialize_pem()).expect("restore key");
        }

        server.start_kill().expect("kill");
        let _ = timeout(Duration::from_secs(10), server.wait()).await;
        let started = tokio::time::Instant::now();
        let o = run_image_command(&health, &env).await;
        assert_eq!(o.0, 1, "tls={tls}: a stopped server is healthy: {o:?}");
        assert!(o.2.contains("unhealthy"), "{o:?}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    // A listener that takes the connection and never answers: bounded by --timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = write(
        dir.path(),
        "silent.toml",
        &format!(
            "[admin]\nlisten = \"{}\"\n{}",
            silent.local_addr().expect("addr"),
            service("api", &[up.addr], &[up.addr], "")
        ),
    );
    let started = tokio::time::Instant::now();
    let o = run_image_command(
        &[
            "switchyard".to_string(),
            "healthcheck".to_string(),
            "--timeout".to_string(),
            "1s".to_string(),
        ],
        &[("SWITCHYARD_CONFIG", &config)],
    )
    .await;
    assert_eq!(o.0, 1, "{o:?}");
    assert!(o.2.contains("no answer"), "{o:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

/// An empty `SWITCHYARD_CONFIG` is unset, for every subcommand that reads it: `check`,
/// `healthcheck` and `serve` use `config/switchyard.toml` (not a usage error, exit 2); an explicit
/// `--config` still wins.
#[test]
fn an_empty_switchyard_config_is_the_default_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |cwd: &std::path::Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .current_dir(cwd)
            .env("SWITCHYARD_CONFIG", "")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run switchyard")
    };
    // A valid config at the default path; nothing listens on its admin port.
    std::fs::create_dir(dir.path().join("config")).expect("mkdir");
    let admin = free_port();
    let good = format!(
        "[proxy]\nlisten = \"127.0.0.1:{}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\n\
         green = {{ upstreams = [\"127.0.0.1:3002\"] }}\n",
        free_port()
    );
    write(&dir.path().join("config"), "switchyard.toml", &good);
    let out = run(dir.path(), &["check"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("config/switchyard.toml"), "{stdout}");
    let out = run(dir.path(), &["healthcheck", "--timeout", "1s"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("unhealthy"), "{stdout}{stderr}");
    // `serve` where the default path holds no config: it names that path, exit 1.
    let empty = tempfile::tempdir().expect("tempdir");
    let out = run(empty.path(), &["serve"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("cannot read config file config/switchyard.toml"),
        "{stdout}{stderr}"
    );
    // --config given explicitly is read, not the default.
    let other = write(dir.path(), "other.toml", &good);
    let out = run(empty.path(), &["check", "--config", &other]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("other.toml"), "{stdout}");
}

/// A stand-in admin listener for `ctl`: answers every request `200` with a JSON object the ctl
/// commands accept, and hands each request's head (lowercased) to the test.
fn fake_admin() -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = r#"{"services":[],"events":[],"message":"ok","current":null,"recent":[]}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            if tx
                .send(String::from_utf8_lossy(&head).to_lowercase())
                .is_err()
            {
                return;
            }
        }
    });
    (addr, rx)
}

/// An empty `SWITCHYARD_ADMIN_URL`, `SWITCHYARD_ADMIN_TOKEN` or `SWITCHYARD_ADMIN_CA_FILE` is
/// unset for `ctl` (and `ctl release`), as an empty `SWITCHYARD_CONFIG` is: not a usage error
/// (exit 2: an empty URL, "a value is required for --ca-file"), and no `Authorization: Bearer `
/// with nothing after it.
#[test]
fn empty_ctl_environment_variables_are_unset() {
    let ctl = |env: (&str, &str), args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("ctl")
            .args(args)
            .env_remove("SWITCHYARD_ADMIN_URL")
            .env_remove("SWITCHYARD_ADMIN_TOKEN")
            .env_remove("SWITCHYARD_ADMIN_CA_FILE")
            .env(env.0, env.1)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run switchyard");
        let (stdout, stderr) = text(&out);
        (out.status.code(), format!("{stdout}{stderr}"))
    };
    let (admin, heads) = fake_admin();
    let admin = admin.to_string();
    let a = admin.as_str();

    // The URL: the default address is used (whatever answers there, not a usage error).
    let (code, out) = ctl(("SWITCHYARD_ADMIN_URL", ""), &["--timeout", "2s", "status"]);
    assert_ne!(code, Some(2), "{out}");
    assert!(!out.contains("invalid admin URL"), "{out}");
    assert!(out.contains("127.0.0.1:9090"), "{out}");
    // --admin still wins.
    let (code, out) = ctl(("SWITCHYARD_ADMIN_URL", ""), &["--admin", a, "status"]);
    assert_eq!(code, Some(0), "{out}");
    let _ = heads.recv_timeout(Duration::from_secs(5));

    // The CA file: plain http needs none; https would use the system bundle.
    for args in [
        &["--admin", a, "status"][..],
        &["--admin", a, "release", "status"][..],
    ] {
        let (code, out) = ctl(("SWITCHYARD_ADMIN_CA_FILE", ""), args);
        assert_eq!(code, Some(0), "{args:?}: {out}");
        let _ = heads.recv_timeout(Duration::from_secs(5));
    }

    // The token: a read sends no Authorization header; a change is refused before any call,
    // naming the token; --token still wins.
    for args in [
        &["--admin", a, "status"][..],
        &["--admin", a, "release", "status"][..],
    ] {
        let (code, out) = ctl(("SWITCHYARD_ADMIN_TOKEN", ""), args);
        assert_eq!(code, Some(0), "{args:?}: {out}");
        let head = heads
            .recv_timeout(Duration::from_secs(5))
            .expect("a request");
        assert!(!head.contains("authorization"), "{args:?}: {head}");
    }
    let (code, out) = ctl(
        ("SWITCHYARD_ADMIN_TOKEN", ""),
        &["--admin", a, "flip", "api", "green"],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("needs the admin token"), "{out}");
    let (code, out) = ctl(
        ("SWITCHYARD_ADMIN_TOKEN", ""),
        &["--admin", a, "--token", "t0k", "flip", "api", "green"],
    );
    assert_eq!(code, Some(0), "{out}");
    let head = heads
        .recv_timeout(Duration::from_secs(5))
        .expect("a request");
    assert!(head.contains("authorization: bearer t0k\r\n"), "{head}");
    // An explicit empty --token is no token either.
    let (code, out) = ctl(("SWITCHYARD_ADMIN_URL", a), &["--token", "", "status"]);
    assert_eq!(code, Some(0), "{out}");
    let head = heads
        .recv_timeout(Duration::from_secs(5))
        .expect("a request");
    assert!(!head.contains("authorization"), "{head}");
}

/// `[state] path = ""` passed `check` and `serve`, and then every flip answered 500 (the state
/// could not be written): `check` refuses it naming the key, with either backend (etcd keeps
/// its cache there); the default and a real path pass.
#[test]
fn check_refuses_an_empty_state_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = "[[services]]\nname = \"api\"\nactive = \"blue\"\n\
               blue  = { upstreams = [\"127.0.0.1:3001\"] }\n\
               green = { upstreams = [\"127.0.0.1:3011\"] }\n";
    for (name, state, ok) in [
        ("file", "[state]\npath = \"\"\n", false),
        ("backend", "[state]\nbackend = \"file\"\npath = \"\"\n", false),
        (
            "etcd",
            "[state]\nbackend = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\npath = \"\"\n",
            false,
        ),
        ("default", "", true),
        ("set", "[state]\npath = \"state/s.json\"\n", true),
    ] {
        let file = write(
            dir.path(),
            &format!("{name}.toml"),
            &format!("[proxy]\nlisten = \"127.0.0.1:8080\"\n{state}{svc}"),
        );
        let out = switchyard(&["check", "--config", &file]);
        let (stdout, stderr) = text(&out);
        let all = format!("{stdout}{stderr}");
        if ok {
            assert_eq!(out.status.code(), Some(0), "{name}: {all}");
        } else {
            assert_eq!(out.status.code(), Some(1), "{name}: {all}");
            assert!(all.contains("state.path: must be a path"), "{name}: {all}");
        }
    }
}

/// Runs `switchyard ARGS` with `env`, killed if still running after 20 seconds (a `serve` that
/// started when it should have refused): (exit code, None when killed; stderr).
fn run_bounded(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run switchyard");
    // 400 waits of 50 ms: 20 s.
    let mut waits = 0;
    let code = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st.code();
        }
        waits += 1;
        if waits > 400 {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (code, err)
}

/// `proxy.upgrade_socket` naming an existing file that is not a socket (the config file, the
/// state file) passed `check`, and `serve` deleted that file to bind its socket there: both now
/// refuse it naming the key, and the file is left as it was. The state file and the files kept
/// beside it are refused even before they exist.
#[test]
fn upgrade_socket_on_an_existing_file_is_refused_and_nothing_is_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8");
    let conf = |sock: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupgrade_socket = \"{sock}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{d}/s.json\"\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\n\
             green = {{ upstreams = [\"127.0.0.1:3011\"] }}\n"
        )
    };
    let config = format!("{d}/c.toml");
    let body = conf(&config);
    std::fs::write(&config, &body).expect("write");
    let state = format!("{d}/s.json");
    std::fs::write(&state, "{\"services\":{}}\n").expect("write");
    let other = format!("{d}/c2.toml");
    std::fs::write(&other, conf(&state)).expect("write");
    for file in [&config, &other] {
        for cmd in ["check", "serve"] {
            let (code, err) =
                run_bounded(&[cmd, "--config", file], &[("SWITCHYARD_ADMIN_TOKEN", "t")]);
            assert_eq!(code, Some(1), "{cmd} {file}: {err}");
            assert!(err.contains("proxy.upgrade_socket:"), "{cmd} {file}: {err}");
        }
    }
    assert_eq!(std::fs::read_to_string(&config).expect("config kept"), body);
    assert_eq!(
        std::fs::read_to_string(&state).expect("state kept"),
        "{\"services\":{}}\n"
    );
    // Before they exist: the state file, its lock, the release file.
    std::fs::remove_file(&state).expect("rm");
    for sock in [
        state.clone(),
        format!("{d}/s.lock"),
        format!("{d}/s.release.json"),
    ] {
        std::fs::write(&other, conf(&sock)).expect("write");
        let (code, err) = run_bounded(&["check", "--config", &other], &[]);
        assert_eq!(code, Some(1), "{sock}: {err}");
        assert!(err.contains("proxy.upgrade_socket:"), "{sock}: {err}");
        assert!(err.contains("a path of its own"), "{sock}: {err}");
    }
    // A path of its own passes.
    std::fs::write(&other, conf(&format!("{d}/u.sock"))).expect("write");
    let (code, err) = run_bounded(&["check", "--config", &other], &[]);
    assert_eq!(code, Some(0), "{err}");
}

/// `[log] access` naming the state file, a file kept beside it (the audit log, the release
/// file) or the config file itself passed `check` and `serve`, and each proxied request then
/// appended a JSON line to it (the next start refused the state file as corrupt, the next
/// reload the config): both refuse it naming the key, compared as the upgrade socket's path
/// is (a symlink to the state file too), and the files are left as they were.
#[test]
fn check_and_serve_refuse_an_access_log_on_the_state_or_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8");
    let conf = |access: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [state]\npath = \"{d}/s.json\"\n[log]\naccess = \"{access}\"\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\n\
             green = {{ upstreams = [\"127.0.0.1:3011\"] }}\n"
        )
    };
    let state = format!("{d}/s.json");
    let stored = "{\"version\":1,\"services\":{}}\n";
    std::fs::write(&state, stored).expect("write");
    let link = format!("{d}/access-link.log");
    std::os::unix::fs::symlink(&state, &link).expect("symlink");
    let file = format!("{d}/c.toml");
    let env = [("SWITCHYARD_ADMIN_TOKEN", "t")];
    for (access, what) in [
        (state.clone(), "the state file"),
        (format!("{d}/s.events.jsonl"), "the audit log"),
        (format!("{d}/s.release.json"), "the release file"),
        (link.clone(), "the state file"),
        (file.clone(), "the config file"),
    ] {
        let body = conf(&access);
        std::fs::write(&file, &body).expect("write");
        for cmd in ["check", "serve"] {
            let (code, err) = run_bounded(&[cmd, "--config", &file], &env);
            assert_eq!(code, Some(1), "{cmd} {access}: {err}");
            assert!(
                err.contains("log.access:")
                    && err.contains(what)
                    && err.contains("the access log needs a path of its own"),
                "{cmd} {access}: {err}"
            );
        }
        assert_eq!(std::fs::read_to_string(&file).expect("config kept"), body);
        assert_eq!(std::fs::read_to_string(&state).expect("state kept"), stored);
        assert!(!dir.path().join("s.events.jsonl").exists());
    }
    // A path of its own passes.
    std::fs::write(&file, conf(&format!("{d}/access.log"))).expect("write");
    let (code, err) = run_bounded(&["check", "--config", &file], &env);
    assert_eq!(code, Some(0), "{err}");
}

/// `state.path` naming the config file (or a file another key names for reading: a TLS
/// certificate, the hosts file) passed `check`; `serve --reset-state` then moved the config
/// aside and wrote the state's JSON over its path, and every reload or restart after failed.
/// `check`, `serve` and `serve --reset-state` refuse it naming `state.path`, and leave the
/// files as they were. A TLS pair whose two files are both unreadable is named twice in one run.
#[test]
fn check_and_serve_refuse_a_state_file_on_the_config_or_a_file_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8");
    let file = format!("{d}/c.toml");
    let conf = |state: &str, extra: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n{extra}[admin]\nlisten = \"127.0.0.1:0\"\n\
             [state]\npath = \"{state}\"\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\n\
             green = {{ upstreams = [\"127.0.0.1:3011\"] }}\n"
        )
    };
    let hosts = format!("{d}/hosts");
    std::fs::write(&hosts, "127.0.0.1 api.internal\n").expect("hosts");
    let env = [("SWITCHYARD_ADMIN_TOKEN", "t")];
    let cases = [
        (conf(&file, ""), "the config file (--config)", file.clone()),
        (
            conf(
                &format!("{d}/cert.pem"),
                &format!("tls_listen = \"127.0.0.1:0\"\ntls_cert = \"{d}/cert.pem\"\ntls_key = \"{d}/key.pem\"\n"),
            ),
            "proxy.tls_cert",
            format!("{d}/cert.pem"),
        ),
        (
            // The audit log kept beside `s.json` is `s.events.jsonl`.
            conf(
                &format!("{d}/s.json"),
                &format!("resolve_hosts_file = \"{d}/s.events.jsonl\"\n"),
            ),
            "proxy.resolve_hosts_file",
            format!("{d}/s.events.jsonl"),
        ),
    ];
    for (body, what, path) in cases {
        std::fs::write(&file, &body).expect("write");
        let before = std::fs::read(&path).ok();
        for args in [
            &["check", "--config", &file][..],
            &["serve", "--config", &file],
            &["serve", "--reset-state", "--config", &file],
        ] {
            let (code, err) = run_bounded(args, &env);
            assert_eq!(code, Some(1), "{args:?} {what}: {err}");
            assert!(
                err.contains("state.path:")
                    && err.contains(&format!("but it is {what}"))
                    && err.contains("give it a path of its own"),
                "{args:?} {what}: {err}"
            );
            assert_eq!(
                std::fs::read(&path).ok(),
                before,
                "{args:?}: {path} changed"
            );
        }
        assert_eq!(std::fs::read_to_string(&file).expect("config kept"), body);
    }
    // Both files of a TLS pair missing: both named.
    std::fs::write(
        &file,
        conf(
            &format!("{d}/s.json"),
            &format!("tls_listen = \"127.0.0.1:0\"\ntls_cert = \"{d}/none.pem\"\ntls_key = \"{d}/nokey.pem\"\n"),
        ),
    )
    .expect("write");
    let (code, err) = run_bounded(&["check", "--config", &file], &env);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("proxy.tls_cert:") && err.contains("proxy.tls_key:"),
        "{err}"
    );
}

/// The state file bind-mounted on its own (`docker run -v $PWD/sy.json:/var/lib/switchyard/
/// switchyard.json`): `serve` started with a warning, and every flip and automatic rollback
/// then failed (500, "Device or resource busy": the rename over a mount point). `serve` now
/// writes the state at startup through the path each flip takes and refuses to start, saying
/// to mount the directory, whether or not the file held every service (nothing was written at
/// startup then); the file on the host is left as it was. The mount is made in a
/// mount namespace of the test's own (`unshare --user --map-root-user --mount`), which goes
/// with the process, so nothing stays mounted whatever the outcome.
#[test]
fn serve_refuses_a_state_file_bind_mounted_on_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8");
    std::fs::create_dir_all(dir.path().join("host")).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("state")).expect("mkdir");
    let host = format!("{d}/host/sy.json");
    let state = format!("{d}/state/sy.json");
    std::fs::write(&state, "").expect("mount point");
    let file = write(
        dir.path(),
        "c.toml",
        &format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [state]\npath = \"{state}\"\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\n\
             green = {{ upstreams = [\"127.0.0.1:3011\"] }}\n"
        ),
    );
    for stored in [
        "{\"version\":1,\"services\":{}}\n",
        "{\"version\":1,\"services\":{\"api\":{\"active\":\"green\",\"generation\":3}}}\n",
    ] {
        std::fs::write(&host, stored).expect("write");
        bind_mounted_serve_refuses(&host, &state, &file);
        assert_eq!(std::fs::read_to_string(&host).expect("host file"), stored);
    }
}

/// `serve --config file` with `host` bind-mounted on `state`, in a namespace of its own: it must
/// exit 1 saying the state file cannot be replaced and what to do.
fn bind_mounted_serve_refuses(host: &str, state: &str, file: &str) {
    let mut child = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2" || exit 90; exec "$3" serve --config "$4""#)
        .args(["sh", host, state, env!("CARGO_BIN_EXE_switchyard"), file])
        .env("RUST_LOG", "warn")
        .env("SWITCHYARD_ADMIN_TOKEN", "t")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare (util-linux) runs");
    // 400 waits of 50 ms: 20 s, then a `serve` that started is stopped.
    let mut code = None;
    for _ in 0..400 {
        if let Some(st) = child.try_wait().expect("wait") {
            code = Some(st.code());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if code.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert_ne!(
        code,
        Some(Some(90)),
        "this test needs a bind mount in a user and mount namespace of its own (unshare --user --mount): {err}"
    );
    assert_eq!(
        code,
        Some(Some(1)),
        "serve kept running or failed otherwise: {err}"
    );
    assert!(
        err.contains("cannot replace the state file") && err.contains("Mount the directory"),
        "{err}"
    );
}

/// `state.path` naming an existing directory, or ending in `.lock` (the lock beside the state
/// file is the path with the extension `.lock`: the state file itself), passed `check` and
/// `serve` always refused it; `serve --reset-state` then renamed the whole directory aside.
/// Both are refused naming `state.path`, and the directory stays where it was, whole.
#[test]
fn check_and_serve_refuse_a_state_path_that_is_a_directory_or_the_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8");
    let data = dir.path().join("var/lib/switchyard");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("other-data"), b"keep").expect("write");
    let conf = |state: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [state]\npath = \"{state}\"\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\n\
             green = {{ upstreams = [\"127.0.0.1:3011\"] }}\n"
        )
    };
    let file = format!("{d}/c.toml");
    let env = [("SWITCHYARD_ADMIN_TOKEN", "t")];
    for state in [
        format!("{d}/var/lib/switchyard"),
        format!("{d}/switchyard.lock"),
    ] {
        std::fs::write(&file, conf(&state)).expect("write");
        for args in [
            vec!["check", "--config", &file],
            vec!["serve", "--config", &file],
            vec!["serve", "--config", &file, "--reset-state"],
        ] {
            let (code, err) = run_bounded(&args, &env);
            assert_eq!(code, Some(1), "{args:?}: {err}");
            assert!(err.contains("state.path:"), "{args:?}: {err}");
        }
    }
    assert_eq!(
        std::fs::read(data.join("other-data")).expect("kept"),
        b"keep"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path().join("var/lib"))
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("switchyard")],
        "nothing moved aside"
    );
}

/// `demo --token ""` started, and every mutating call was then refused (no token to send):
/// an empty or blank token is a usage error (exit 2) saying so. A token the shell would split
/// or read (a space, a quote) is printed shell-quoted in the `export` line, which then sets
/// exactly that token.
#[tokio::test]
async fn demo_refuses_an_empty_token_and_quotes_the_one_it_prints() {
    use tokio::io::AsyncBufReadExt;
    let any = "127.0.0.1:0";
    let demo = |token: &'static str| {
        [
            "demo",
            "--listen",
            any,
            "--admin",
            any,
            "--preview",
            any,
            "--no-traffic",
            "--token",
            token,
        ]
    };
    for token in ["", "   ", "\n"] {
        let (code, err) = run_bounded(&demo(token), &[]);
        assert_eq!(code, Some(2), "{token:?}: {err}");
        assert!(err.contains("--token"), "{token:?}: {err}");
    }
    let token = "it's a token";
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(demo(token))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn demo");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let export = loop {
        match timeout(Duration::from_secs(20), lines.next_line()).await {
            Ok(Ok(Some(line))) if line.contains("export SWITCHYARD_ADMIN_TOKEN") => break line,
            Ok(Ok(Some(_))) => {}
            other => panic!("no export line within 20 s: {other:?}"),
        }
    };
    let _ = child.start_kill();
    let _ = timeout(Duration::from_secs(10), child.wait()).await;
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{export}\nprintf '%s|%s' \"$SWITCHYARD_ADMIN_TOKEN\" \"$SWITCHYARD_ADMIN_URL\""
        ))
        .output()
        .expect("sh");
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        got.starts_with(&format!("{token}|http://127.0.0.1:")),
        "{export:?} sets {got:?}"
    );
}

/// An access log that is a FIFO with no reader yet (a log shipper that starts later) does not
/// block `check`: the file is opened as the writer opens it (read and write, which a FIFO
/// takes at once), not for writing alone, which would wait for a reader forever.
#[test]
fn check_does_not_block_on_an_access_log_fifo_without_a_reader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("access.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let config = write(
        dir.path(),
        "fifo.toml",
        &format!(
            "[log]\naccess = \"{}\"\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\ngreen = {{ upstreams = [\"127.0.0.1:3002\"] }}\n",
            fifo.display()
        ),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config", &config])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run switchyard");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "check blocked or failed: {:?}",
        text(&out)
    );
}

/// A state path under a regular file (`afile/state.json`) is named as what it is, at its key,
/// by `check` and by `serve` before it starts: not a lock that "exists" or an unreadable
/// release file.
#[test]
fn a_state_path_under_a_file_is_named_at_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let afile = write(dir.path(), "afile", "hi\n");
    let config = write(
        dir.path(),
        "bad.toml",
        &format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{afile}/sub/state.json\"\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\ngreen = {{ upstreams = [\"127.0.0.1:3002\"] }}\n"
        ),
    );
    for cmd in ["check", "serve"] {
        let out = switchyard(&[cmd, "--config", &config]);
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains("state.path") && err.contains(&format!("{afile} is not a directory")),
            "{cmd}: {err}"
        );
    }
}

/// Valid configs that cannot do what they say passed `check` silently: an `unhealthy` trigger
/// on a service without health checks (it never sees an upstream go unhealthy), an upstream that
/// is the proxy's own listener (every request comes back to it). `check` warns (exit 0).
#[test]
fn check_warns_of_a_trigger_that_cannot_see_and_an_upstream_that_is_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!(
            "[proxy]\nlisten = \"0.0.0.0:44080\"\n[admin]\nlisten = \"127.0.0.1:44090\"\n\
             [state]\npath = \"{d}/s.json\"\n\
             [[services]]\nname = \"web\"\nhosts = [\"web\"]\nblue = {{ upstreams = [\"127.0.0.1:3002\"] }}\n\
             green = {{ upstreams = [\"127.0.0.1:3012\"] }}\n\
             rollback = {{ triggers = [{{ kind = \"unhealthy\", for = \"1s\" }}] }}\n\
             health = {{ path = \"/healthz\" }}\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\n\
             green = {{ upstreams = [\"127.0.0.1:44080\"] }}\n\
             rollback = {{ triggers = [{{ kind = \"unhealthy\", for = \"1s\" }}] }}\n"
        ),
    );
    let out = switchyard(&["check", "--config", &cfg]);
    let (said, err) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said} {err}");
    assert!(
        said.contains("warning: services[1].rollback.triggers[0]: kind \"unhealthy\"")
            && said.contains("has no [services.health]"),
        "{said}"
    );
    assert!(!said.contains("services[0].rollback"), "{said}");
    assert!(
        said.contains("warning: services[1].green.upstreams: 127.0.0.1:44080 is this Switchyard's own proxy.listen"),
        "{said}"
    );
    assert!(!said.contains(".blue.upstreams"), "{said}");
}

/// An upgrade socket path too long for a Unix socket (`sun_path`, 108 bytes) makes upgrades
/// impossible for that process; `serve` said so only in its log: `check` warns (exit 0).
#[test]
fn check_warns_of_an_upgrade_socket_path_too_long_for_a_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let long = format!("{}/{}/state.json", dir.path().display(), "d".repeat(120));
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!(
            "[state]\npath = \"{long}\"\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\n\
             green = {{ upstreams = [\"127.0.0.1:3011\"] }}\n"
        ),
    );
    let out = switchyard(&["check", "--config", &cfg]);
    let (said, err) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said} {err}");
    assert!(
        said.contains("warning: proxy.upgrade_socket:")
            && said.contains("is too long for a Unix socket path"),
        "{said}"
    );
    // A path that fits: no such warning.
    let short = write(
        dir.path(),
        "s.toml",
        "[[services]]\nname = \"api\"\nblue = { upstreams = [\"127.0.0.1:3001\"] }\n\
         green = { upstreams = [\"127.0.0.1:3011\"] }\n",
    );
    let out = switchyard(&["check", "--config", &short]);
    let (said, _) = text(&out);
    assert!(!said.contains("proxy.upgrade_socket"), "{said}");
}
