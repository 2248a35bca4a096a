use super::*;

const GOOD: &str = r#"
[proxy]
listen = "127.0.0.1:8080"
[admin]
listen = "127.0.0.1:9090"
[[services]]
name = "api"
path_prefix = "/api"
blue = { upstreams = ["127.0.0.1:3001"] }
green = { upstreams = ["127.0.0.1:3011"] }
[services.rollback]
[[services.rollback.triggers]]
kind = "error_rate"
above = 0.05
over = "1m"
for = "2m"
[[services.rollback.triggers]]
kind = "p95_latency"
above = "1000ms"
[[services.rollback.triggers]]
kind = "critical_5xx"
paths = ["/api/payments"]
above = 0
over = "30s"
[[services.rollback.triggers]]
kind = "unhealthy"
for = "10s"
"#;

fn env() -> Option<std::collections::HashMap<String, String>> {
    Some(Default::default())
}

fn errors(text: &str) -> Vec<String> {
    match from_toml_str_with_env(text, env()) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn good_config_validates() {
    let c = from_toml_str_with_env(GOOD, env()).expect("valid");
    assert_eq!(c.services.len(), 1);
    assert_eq!(c.services[0].rollback.triggers.len(), 4);
    assert_eq!(
        c.services[0].rollback.triggers[0].for_,
        Duration::from_secs(120)
    );
    assert!(c.summary().contains("api"));
}

/// An IPv6 literal in `hosts` is refused saying what to do instead; an IPv4 one is a host.
#[test]
fn an_ipv6_literal_host_is_refused_with_a_way_out() {
    for (host, hint) in [("[::1]", true), ("::1", true), ("a.b:80", false)] {
        let text = GOOD.replacen(
            "name = \"api\"",
            &format!("name = \"api\"\nhosts = [\"{host}\"]"),
            1,
        );
        let errs = errors(&text);
        let e = errs
            .iter()
            .find(|e| e.starts_with("services[0].hosts[0]: invalid host"))
            .unwrap_or_else(|| panic!("{host}: {errs:#?}"));
        assert_eq!(
            e.contains("IPv6 literal is not routed on by host"),
            hint,
            "{e}"
        );
    }
    let text = GOOD.replacen(
        "name = \"api\"",
        "name = \"api\"\nhosts = [\"127.0.0.1\"]",
        1,
    );
    assert_eq!(errors(&text), Vec::<String>::new());
}

#[test]
fn every_unknown_key_is_reported() {
    let text = GOOD.replace("[admin]", "[admin]\nbogus = 1\n").replace(
        "kind = \"unhealthy\"",
        "kind = \"unhealthy\"\nwhatever = true",
    );
    let errs = errors(&text);
    assert!(
        errs.iter().any(|e| e.starts_with("admin.bogus")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("services[0].rollback.triggers[3].whatever")),
        "{errs:?}"
    );
}

/// Every table's unknown key carries the keys that table has (serde_ignored gives the path,
/// [`raw::fields_at`] the keys), and a type error still names its path.
#[test]
fn unknown_keys_list_their_tables_keys() {
    let text = format!(
        "zz = 1\n{}",
        GOOD.replace("[proxy]", "[proxy]\nzz = 1")
            .replace("[admin]", "[admin]\nzz = 1")
            .replace(
                "green = { upstreams = [\"127.0.0.1:3011\"] }",
                "green = { upstreams = [\"127.0.0.1:3011\"], zz = 1 }\nzz = 1\nhealth = { zz = 1 }",
            )
            .replace("[services.rollback]", "[services.rollback]\nzz = 1")
            .replace("kind = \"unhealthy\"", "kind = \"unhealthy\"\nzz = 1")
            + "[[services.verify]]\nkind = \"probe\"\npath = \"/\"\nzz = 1\n"
            + "[state]\nzz = 1\n[notify]\nzz = 1\n[log]\nzz = 1\n[analysis]\nzz = 1\n"
    );
    let errs = errors(&text);
    for key in [
        "zz",
        "proxy.zz",
        "admin.zz",
        "state.zz",
        "notify.zz",
        "log.zz",
        "analysis.zz",
        "services[0].zz",
        "services[0].green.zz",
        "services[0].health.zz",
        "services[0].rollback.zz",
        "services[0].rollback.triggers[3].zz",
        "services[0].verify[0].zz",
    ] {
        let want = format!("{key}: unknown key \"zz\" (expected ");
        assert!(
            errs.iter().any(|e| e.starts_with(&want)),
            "{want}: {errs:#?}"
        );
    }
    assert!(
        errs.contains(
            &"services[0].green.zz: unknown key \"zz\" (expected `upstreams` or `protocol`)"
                .to_string()
        ),
        "{errs:#?}"
    );
    assert_eq!(errs.len(), 13, "{errs:#?}");

    let errs = errors(&GOOD.replace("[admin]", "[admin]\nbogus = 1\nmax_connections = \"x\""));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].starts_with("admin.bogus: unknown key"), "{errs:#?}");
    assert!(
        errs[1].starts_with("admin.max_connections: invalid type"),
        "{errs:#?}"
    );
}

#[test]
fn semantic_errors_all_named() {
    let text = GOOD
        .replace("127.0.0.1:3011", "x:y")
        .replace("\"2m\"", "\"2 parsecs\"")
        .replace("kind = \"unhealthy\"", "kind = \"sad\"")
        .replace(
            "path_prefix = \"/api\"",
            "path_prefix = \"/api\"\nactive = \"red\"",
        );
    let errs = errors(&text);
    let want = [
        "services[0].green.upstreams[0]: invalid address \"x:y\"",
        "services[0].rollback.triggers[0].for: invalid duration",
        "services[0].rollback.triggers[3].kind: invalid trigger kind",
        "services[0].active: invalid color",
    ];
    for w in want {
        assert!(
            errs.iter().any(|e| e.starts_with(w)),
            "missing {w}: {errs:?}"
        );
    }
}

#[test]
fn shadowed_service_and_duplicates() {
    let text = r#"
[[services]]
name = "all"
blue = { upstreams = ["127.0.0.1:1"] }
green = { upstreams = ["127.0.0.1:2"] }
[[services]]
name = "all"
path_prefix = "/x"
blue = { upstreams = [] }
green = { upstreams = ["127.0.0.1:2"] }
"#;
    let errs = errors(text);
    assert!(
        errs.iter().any(|e| e.contains("duplicate service name")),
        "{errs:?}"
    );
    assert!(
        errs.iter().any(|e| e.contains("can never match")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("services[1].blue.upstreams")),
        "{errs:?}"
    );
}

/// A service that failed its own checks (no green pool) does not shift the index the later
/// checks name: the shadowed service and its prometheus trigger are `services[2]`.
#[test]
fn checks_across_services_name_them_as_the_file_numbers_them() {
    let text = r#"
[[services]]
name = "broken"
blue = { upstreams = ["127.0.0.1:1"] }
[[services]]
name = "all"
blue = { upstreams = ["127.0.0.1:1"] }
green = { upstreams = ["127.0.0.1:2"] }
[[services]]
name = "hidden"
path_prefix = "/x"
blue = { upstreams = ["127.0.0.1:1"] }
green = { upstreams = ["127.0.0.1:2"] }
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = "up"
above = 0.5
"#;
    let errs = errors(text);
    assert!(
        errs.iter().any(|e| e.starts_with("services[0].green")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("services[2]:") && e.contains("can never match")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("services[2].rollback.triggers[0]")),
        "{errs:?}"
    );
}

#[test]
fn env_overrides() {
    let mut env = std::collections::HashMap::new();
    env.insert(
        "SWITCHYARD__PROXY__LISTEN".to_string(),
        "127.0.0.1:7000".to_string(),
    );
    env.insert("SWITCHYARD__PROXY__WORKERS".to_string(), "3".to_string());
    let c = from_toml_str_with_env(GOOD, Some(env)).expect("valid");
    assert_eq!(c.proxy.listen, "127.0.0.1:7000".parse().unwrap());
    assert_eq!(c.proxy.workers, Some(3));
}

/// `per_worker` unless the config names a runtime (the scaling run, BENCHMARKS.md), and
/// whether it named one (an upgrade from a `shared` process keeps `shared` only when not).
#[test]
fn the_runtime_is_per_worker_unless_named() {
    let c = from_toml_str_with_env(GOOD, env()).expect("valid");
    assert_eq!(
        (c.proxy.runtime, c.proxy.runtime_set),
        (RuntimeFlavor::PerWorker, false)
    );
    for (name, want) in [
        ("shared", RuntimeFlavor::Shared),
        ("per_worker", RuntimeFlavor::PerWorker),
    ] {
        let text = GOOD.replacen("[proxy]\n", &format!("[proxy]\nruntime = \"{name}\"\n"), 1);
        let c = from_toml_str_with_env(&text, env()).expect("valid");
        assert_eq!(
            (c.proxy.runtime, c.proxy.runtime_set),
            (want, true),
            "{name}"
        );
    }
    let text = GOOD.replacen("[proxy]\n", "[proxy]\nruntime = \"threads\"\n", 1);
    let errs = errors(&text);
    assert!(
        errs.iter().any(|e| e.starts_with("proxy.runtime: ")),
        "{errs:?}"
    );
}

/// A value of the wrong type is reported at its key beside every other error of the file; it
/// counts as absent, so no "required" follows it and a later array element keeps its index.
#[test]
fn wrong_types_are_reported_with_every_other_error() {
    let text = GOOD
        .replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"nowhere\"\nworkers = \"two\"\nzz = 1",
        )
        .replace(
            "path_prefix = \"/api\"",
            "path_prefix = \"/api\"\nactive = \"purple\"\nhosts = [\"a.example\", 5, \"b c\"]\n\
             health = { unhealthy_after = \"x\", interval = \"2 parsecs\" }",
        )
        .replace(
            "[services.rollback]",
            "[services.rollback]\ndry_run = \"no\"",
        )
        .replace("kind = \"unhealthy\"", "kind = 7");
    let errs = errors(&text);
    let want = [
        "proxy.zz: unknown key \"zz\"",
        "proxy.workers: invalid type: string \"two\", expected an integer",
        "services[0].hosts[1]: invalid type: integer `5`, expected a string",
        "services[0].health.unhealthy_after: invalid type: string \"x\", expected an integer",
        "services[0].rollback.dry_run: invalid type: string \"no\", expected a boolean",
        "services[0].rollback.triggers[3].kind: invalid type: integer `7`, expected a string",
        "proxy.listen: invalid address \"nowhere\"",
        "services[0].active: invalid color \"purple\"",
        // The element after the removed hosts[1] keeps the index it has in the file.
        "services[0].hosts[2]: invalid host \"b c\"",
        "services[0].health.interval: invalid duration \"2 parsecs\"",
    ];
    for w in want {
        assert!(
            errs.iter().any(|e| e.starts_with(w)),
            "missing {w}: {errs:#?}"
        );
    }
    // Nothing else: no "required" at the trigger's kind, no second error at a key.
    assert_eq!(errs.len(), want.len(), "{errs:#?}");

    // A table where a table belongs, and a table's value of the wrong type.
    let errs = errors(
        &GOOD
            .replace("name = \"api\"", "name = 6")
            .replace("green = { upstreams = [\"127.0.0.1:3011\"] }", "green = 5"),
    );
    assert_eq!(
        errs,
        [
            "services[0].green: invalid type: integer `5`, expected a table",
            "services[0].name: invalid type: integer `6`, expected a string",
        ],
        "{errs:#?}"
    );
}

/// A trigger's window is whole seconds, as the windows count them: `1500ms` is refused at its
/// key (it was taken as 1s).
#[test]
fn a_trigger_window_of_part_seconds_is_refused() {
    let errs = errors(&GOOD.replace("over = \"1m\"", "over = \"1500ms\""));
    assert_eq!(
        errs,
        ["services[0].rollback.triggers[0].over: must be whole seconds (the windows count seconds): 1s, 2s, 90s"],
        "{errs:#?}"
    );
    assert!(errors(&GOOD.replace("over = \"1m\"", "over = \"2000ms\"")).is_empty());
}

/// A trigger's `above` of the wrong type for its kind says so, as serde words the file's other
/// wrong types, not "required" as if it were not written.
#[test]
fn a_trigger_threshold_of_the_wrong_type_says_so() {
    let text = GOOD
        .replace("above = 0.05", "above = \"5%\"")
        .replace("above = \"1000ms\"", "above = 1000");
    let errs = errors(&text);
    assert_eq!(
        errs,
        [
            "services[0].rollback.triggers[0].above: invalid type: string \"5%\", expected a ratio between 0 and 1, e.g. 0.05",
            "services[0].rollback.triggers[1].above: invalid type: integer `1000`, expected a duration such as \"1000ms\"",
        ],
        "{errs:#?}"
    );
    let errs = errors(
        &GOOD
            .replace("above = 0.05", "above = true")
            .replace("above = \"1000ms\"", "above = 1.5"),
    );
    assert_eq!(
        errs,
        [
            "services[0].rollback.triggers[0].above: invalid type: boolean `true`, expected a ratio between 0 and 1, e.g. 0.05",
            "services[0].rollback.triggers[1].above: invalid type: floating point `1.5`, expected a duration such as \"1000ms\"",
        ],
        "{errs:#?}"
    );
    // Not written at all is still "required".
    let errs = errors(&GOOD.replace("above = 0.05\n", ""));
    assert_eq!(
        errs,
        ["services[0].rollback.triggers[0].above: required: a ratio between 0 and 1, e.g. 0.05"],
        "{errs:#?}"
    );
}

/// A wrong type from `SWITCHYARD__*` names its key and the variable it came from.
#[test]
fn wrong_types_from_the_environment_name_the_variable() {
    let env = [
        ("SWITCHYARD__PROXY__WORKERS", "two"),
        ("SWITCHYARD__PROXY__LISTEN", "127.0.0.1:7000"),
        ("SWITCHYARD__ADMIN__WATCH_CONFIG", "maybe"),
        ("SWITCHYARD__LOG__ACCESS_FORMAT", "xml"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let errs: Vec<String> = match from_toml_str_with_env(GOOD, Some(env)) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    };
    assert_eq!(
        errs,
        [
            "admin.watch_config: invalid type: string \"maybe\", expected a boolean \
             (from environment variable SWITCHYARD__ADMIN__WATCH_CONFIG)",
            "proxy.workers: invalid type: string \"two\", expected an integer \
             (from environment variable SWITCHYARD__PROXY__WORKERS)",
            "log.access_format: invalid format \"xml\" (expected \"json\" or \"combined\") \
             (from environment variable SWITCHYARD__LOG__ACCESS_FORMAT)",
        ],
        "{errs:#?}"
    );
}

/// An entry of a list cannot be set from the environment (README "Configuration"): a variable
/// that names one is refused with what to do, not as "invalid type: map, expected a sequence"
/// on the whole list.
#[test]
fn a_variable_naming_a_list_entry_says_to_set_it_in_the_file() {
    let env = [
        (
            "SWITCHYARD__SERVICES__0__ROLLBACK__TRIGGERS__0__ABOVE",
            "0.1",
        ),
        ("SWITCHYARD__PROXY__WORKERS", "2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let errs: Vec<String> = match from_toml_str_with_env(GOOD, Some(env)) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    };
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("services.0.rollback.triggers.0.above: environment variable SWITCHYARD__SERVICES__0__ROLLBACK__TRIGGERS__0__ABOVE names an entry of a list"),
        "{errs:#?}"
    );
    assert!(errs[0].contains("set them in the file"), "{errs:#?}");

    // A plan named by digits is a table's key: its keys are set as any other.
    let text = format!("{GOOD}[release_plans.2026]\nvalidate = \"1h\"\n[[release_plans.2026.phases]]\nservices = [\"api\"]\n");
    let env = [("SWITCHYARD__RELEASE_PLANS__2026__VALIDATE", "bogus")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let errs: Vec<String> = match from_toml_str_with_env(&text, Some(env)) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    };
    assert!(
        errs.iter()
            .any(|e| e.starts_with("release_plans.2026.validate: invalid duration \"bogus\"")),
        "{errs:#?}"
    );
}

/// A number the `config` crate cannot hold (an integer past i64, a float past f64, `nan`) is
/// reported at its key beside every other problem (it used to be the one problem reported,
/// "number too large to fit in target type", with no key, hiding the rest).
#[test]
fn numbers_too_large_are_reported_at_their_keys_with_the_rest() {
    let text = GOOD.replace(
        "[proxy]\n",
        "[proxy]\nworkers = 0\nconect_timeout = \"1s\"\n",
    ) + "[state]\npath = \"s.json\"\nevents_max_bytes = 99999999999999999999\n";
    let errs: Vec<String> = match from_toml_str_with_env(&text, env()) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    };
    let all = errs.join("\n");
    assert!(all.contains("proxy.workers: 0 is out of range"), "{all}");
    assert!(all.contains("proxy.conect_timeout: unknown key"), "{all}");
    assert!(
        all.contains("99999999999999999999 cannot be held: an integer must lie within"),
        "{all}"
    );
    for (lit, want) in [
        ("1e400", "1e400 cannot be held"),
        ("nan", "nan cannot be held"),
    ] {
        let text = GOOD.replace("[proxy]\n", "[proxy]\nworkers = 0\n")
            + &format!("[[services]]\nname = \"x\"\nblue = {{ upstreams = [\"127.0.0.1:1\"] }}\ngreen = {{ upstreams = [\"127.0.0.1:2\"] }}\npath_prefix = \"/x\"\n[services.rollback]\ntriggers = [{{ kind = \"error_rate\", above = {lit} }}]\n");
        let errs: Vec<String> = match from_toml_str_with_env(&text, env()) {
            Ok(_) => panic!("accepted {lit}"),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        };
        let all = errs.join("\n");
        assert!(
            all.contains("proxy.workers: 0 is out of range"),
            "{lit}: {all}"
        );
        assert!(
            all.contains(&format!("].rollback.triggers[0].above: {want}")),
            "{lit}: {all}"
        );
    }
}

#[test]
fn analysis_keys_validate() {
    let base = r#"
[[services]]
name = "api"
blue = { upstreams = ["127.0.0.1:3001"] }
green = { upstreams = ["127.0.0.1:3011"] }
"#;
    let good = format!(
        "[analysis]\nprometheus_url = \"https://prom.example:9090/prefix\"\nprometheus_token_env = \"PROM_TOKEN\"\n{base}{}",
        r#"
[[services.verify]]
kind = "probe"
url = "http://checks.internal/{{service}}/{{color}}"
[[services.verify]]
kind = "prometheus"
query = 'max(x{instance=~"{{ upstreams }}"})'
below = 1
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = 'sum(rate(app_db_errors_total{service="{{service}}",color="{{color}}"}[1m]))'
above = 0.5
for = "1m"
on_empty = "fail"
on_error = "fail"
max_errors = 5
[[services.rollback.triggers]]
kind = "probe"
path = "/health/deps"
json_pointer = "/pool"
above = 0.9
above_fraction = 0.25
interval = "5s"
"#
    );
    let c = from_toml_str_with_env(&good, env()).unwrap_or_else(|e| panic!("{e}"));
    let t = &c.services[0].rollback.triggers;
    match &t[0].kind {
        TriggerKind::Prometheus(p) => {
            assert_eq!(p.bound, Bound::Above(0.5));
            assert_eq!(p.interval, Duration::from_secs(15));
            assert_eq!(p.on_empty, OnEmpty::Fail);
            assert_eq!(p.on_error, OnError::Fail);
            assert_eq!(p.max_errors, 5);
        }
        k => panic!("{k:?}"),
    }
    match &t[1].kind {
        TriggerKind::Probe(p) => {
            assert_eq!(p.condition, ProbeCondition::Bound(Bound::Above(0.9)));
            assert_eq!(p.above_fraction, 0.25);
            assert_eq!(p.max_errors, 3);
            assert_eq!(p.on_error, OnError::Hold);
        }
        k => panic!("{k:?}"),
    }
    assert_eq!(c.services[0].verify.len(), 2);
    match &c.services[0].verify[0] {
        // `above_fraction` defaults to 0: any one failing upstream fails the probe.
        VerifyCheck::Probe(p) => assert_eq!(p.above_fraction, 0.0),
        k => panic!("{k:?}"),
    }
    assert_eq!(c.analysis.timeout, Duration::from_secs(5));
    assert!(c.summary().contains("verify probe"), "{}", c.summary());

    // A verify check takes a trigger's keys but `for` (the contract); they are checked.
    let reused = format!(
        "[analysis]\nprometheus_url = \"http://127.0.0.1:9091\"\n{base}{}",
        r#"
[[services.verify]]
kind = "prometheus"
query = "up"
below = 1
interval = "15s"
on_empty = "fail"
on_error = "hold"
max_errors = 3
[[services.verify]]
kind = "probe"
path = "/health/deps"
interval = "5s"
on_error = "fail"
"#
    );
    let c = from_toml_str_with_env(&reused, env()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.services[0].verify.len(), 2);
    let errs = errors(&format!(
        "{base}{}",
        r#"
[[services.verify]]
kind = "probe"
path = "/health/deps"
interval = "5"
on_empty = "fail"
max_errors = 0
"#
    ));
    for want in [
        "services[0].verify[0].interval: invalid duration",
        "services[0].verify[0].on_empty: not used by kind \"probe\"",
        "services[0].verify[0].max_errors",
    ] {
        assert!(errs.iter().any(|e| e.contains(want)), "{want}: {errs:?}");
    }

    let bad = format!(
        "{base}{}",
        r#"
[[services.verify]]
kind = "prometheus"
query = "up"
above = 1
for = "1m"
[[services.verify]]
kind = "probe"
path = "/x"
equals = "ok"
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = "up{x=\"{{upstream}}\"}"
above = 1
below = 2
on_error = "ignore"
on_empty = "pass"
[[services.rollback.triggers]]
kind = "probe"
path = "/x"
url = "http://a/b"
[[services.rollback.triggers]]
kind = "error_rate"
above = 0.1
query = "up"
[[services.rollback.triggers]]
kind = "probe"
url = "ftp://x/{{color}}"
above_fraction = 1
"#
    );
    let errs = errors(&bad);
    for want in [
        "services[0].rollback.triggers[0]: kind \"prometheus\" needs [analysis] prometheus_url",
        "services[0].verify[0].for: unknown key",
        "services[0].verify[1].json_pointer: required with `equals`",
        "services[0].rollback.triggers[0].query: unknown placeholder {{upstream}}",
        "services[0].rollback.triggers[0].below: set either `above` or `below`",
        "services[0].rollback.triggers[0].on_error: invalid value \"ignore\"",
        "services[0].rollback.triggers[0].on_empty: invalid value \"pass\"",
        "services[0].rollback.triggers[1].url: set either `path` or `url`",
        "services[0].rollback.triggers[2].query: not used by kind \"error_rate\"",
        "services[0].rollback.triggers[3].url: invalid URL",
        "services[0].rollback.triggers[3].above_fraction: 1 is out of range",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "missing {want}: {errs:#?}"
        );
    }
    assert!(placeholder_errors("a{{b", QUERY_PLACEHOLDERS)[0].starts_with("unclosed"));

    // An earlier trigger (or verify check) dropped for its own error does not shift the index
    // the missing prometheus_url names: the file's numbering.
    let bad = format!(
        "{base}{}",
        r#"
[[services.verify]]
kind = "probe"
[[services.verify]]
kind = "prometheus"
query = "up"
above = 1
[services.rollback]
[[services.rollback.triggers]]
kind = "probe"
path = "/h"
url = "http://127.0.0.1:1/h"
[[services.rollback.triggers]]
kind = "prometheus"
query = "up"
above = 1
"#
    );
    let errs = errors(&bad);
    let needs: Vec<_> = errs
        .iter()
        .filter(|e| e.contains("needs [analysis] prometheus_url"))
        .collect();
    assert_eq!(needs.len(), 1, "{errs:#?}");
    assert!(
        needs[0].starts_with("services[0].rollback.triggers[1]: "),
        "{errs:#?}"
    );
    let bad = bad.replace(
        "[services.rollback]\n[[services.rollback.triggers]]\nkind = \"probe\"\npath = \"/h\"\nurl = \"http://127.0.0.1:1/h\"\n[[services.rollback.triggers]]\nkind = \"prometheus\"\nquery = \"up\"\nabove = 1\n",
        "",
    );
    let errs = errors(&bad);
    assert!(
        errs.iter().any(|e| e.starts_with(
            "services[0].verify[1]: kind \"prometheus\" needs [analysis] prometheus_url"
        )),
        "{errs:#?}"
    );
}

/// A probe whose target is doubled or missing still has its other keys checked: `check` prints
/// every problem in one run, not the rest only once the target is fixed.
#[test]
fn a_probe_with_a_bad_target_reports_its_other_errors() {
    let base = r#"
[[services]]
name = "api"
blue = { upstreams = ["127.0.0.1:3001"] }
green = { upstreams = ["127.0.0.1:3011"] }
"#;
    for target in [
        "path = \"/deps\"\nurl = \"http://127.0.0.1:3001/deps\"\n",
        "",
    ] {
        let tables = format!(
            r#"
[[services.verify]]
kind = "probe"
{target}json_pointer = "payments"
above_fraction = 7
[services.rollback]
[[services.rollback.triggers]]
kind = "probe"
{target}json_pointer = "database"
equals = "ok"
above = 1
above_fraction = 1.5
"#
        );
        let errs = errors(&format!("{base}{tables}"));
        let target_err = if target.is_empty() {
            ".path: required"
        } else {
            ".url: set either `path` or `url`"
        };
        for want in [
            format!("services[0].verify[0]{target_err}"),
            "services[0].verify[0].json_pointer: invalid JSON pointer".to_string(),
            "services[0].verify[0].equals: required with `json_pointer`".to_string(),
            "services[0].verify[0].above_fraction: 7 is out of range".to_string(),
            format!("services[0].rollback.triggers[0]{target_err}"),
            "services[0].rollback.triggers[0].json_pointer: invalid JSON pointer".to_string(),
            "services[0].rollback.triggers[0].equals: set either `equals` or `above`/`below`"
                .to_string(),
            "services[0].rollback.triggers[0].above_fraction: 1.5 is out of range".to_string(),
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(&want)),
                "missing {want}: {errs:#?}"
            );
        }
    }
}

#[test]
fn host_patterns() {
    assert!(host_pattern_matches("*.example.com", "a.example.com"));
    assert!(!host_pattern_matches("*.example.com", "example.com"));
    assert!(!host_pattern_matches("*.example.com", "aexample.com"));
    assert!(host_pattern_matches("api.x", "api.x"));
}

/// A duration past ten years is an error at its key: `now + d` for a longer one overflowed
/// `Instant` or left the RFC 3339 range and panicked (the status page, the release driver).
#[test]
fn absurdly_long_durations_are_errors_at_their_key() {
    let text = GOOD.replace(
        "[services.rollback]",
        "[services.rollback]\nwatch_for = \"500000000000h\"",
    );
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e
                .starts_with("services[0].rollback.watch_for: invalid duration \"500000000000h\"")),
        "{errs:?}"
    );
    assert!(parse_duration("3650d").is_ok());
    assert!(parse_duration("3651d").is_err());
}

/// Prefixes are kept in the normalized form requests are matched in (RFC 3986 6.2.2): one
/// written with a dot segment or lower-case `%xx` still matches what it names.
#[test]
fn path_prefixes_and_critical_paths_are_normalized() {
    let text = GOOD
        .replace(
            "path_prefix = \"/api\"",
            "path_prefix = \"/v1/./caf%c3%a9\"",
        )
        .replace(
            "paths = [\"/api/payments\"]",
            "paths = [\"/api/x/../pay%6dents\"]",
        );
    let c = from_toml_str_with_env(&text, env()).expect("valid");
    assert_eq!(c.services[0].path_prefix.as_deref(), Some("/v1/caf%C3%A9"));
    let paths = c.services[0]
        .rollback
        .triggers
        .iter()
        .find_map(|t| match &t.kind {
            TriggerKind::Critical5xx { paths, .. } => Some(paths.clone()),
            _ => None,
        });
    assert_eq!(paths, Some(vec!["/api/payments".to_string()]));
}

/// Port 0 is refused for an address and a name alike (nothing can be connected to on it); a
/// fully qualified name with its root dot (`….svc.cluster.local.`, as Kubernetes writes them) is
/// a name, kept as written so the resolver takes it as absolute.
#[test]
fn upstream_ports_and_fully_qualified_names() {
    let with = |blue: &str| {
        GOOD.replace(
            "blue = { upstreams = [\"127.0.0.1:3001\"] }",
            &format!("blue = {{ upstreams = [{blue}] }}"),
        )
    };
    for (blue, expected) in [
        (
            "\"127.0.0.1:0\"",
            "services[0].blue.upstreams[0]: invalid address \"127.0.0.1:0\": port 0",
        ),
        (
            "\"[::1]:0\"",
            "services[0].blue.upstreams[0]: invalid address \"[::1]:0\": port 0",
        ),
        (
            "\"api-blue:0\"",
            "services[0].blue.upstreams[0]: invalid address \"api-blue:0\": port 0",
        ),
        (
            "\"api.ns.svc.cluster.local.:0\"",
            "services[0].blue.upstreams[0]: invalid address \"api.ns.svc.cluster.local.:0\": port 0",
        ),
        (
            "\"api..local:80\"",
            "services[0].blue.upstreams[0]: invalid address \"api..local:80\"",
        ),
        (
            "\"api.local..:80\"",
            "services[0].blue.upstreams[0]: invalid address \"api.local..:80\"",
        ),
        (
            "\".:80\"",
            "services[0].blue.upstreams[0]: invalid address \".:80\"",
        ),
        (
            "\"10.0.0.1.:80\"",
            "services[0].blue.upstreams[0]: invalid address \"10.0.0.1.:80\"",
        ),
        (
            "\"api.local:80\", \"API.local.:80\"",
            "services[0].blue.upstreams[1]: duplicate upstream \"API.local.:80\"",
        ),
    ] {
        let errs = errors(&with(blue));
        assert_eq!(errs.len(), 1, "{blue}: {errs:?}");
        assert!(errs[0].starts_with(expected), "{blue}: {errs:?}");
    }
    let c = from_toml_str_with_env(
        &with("\"api-blue.switchyard.svc.cluster.local.:8080\", \"127.0.0.1:1\""),
        env(),
    )
    .expect("a fully qualified name is valid");
    let names: Vec<(String, u16)> = c.services[0]
        .blue
        .entries
        .iter()
        .filter_map(|e| match e {
            UpstreamEntry::Name(n) => Some((n.host.clone(), n.port)),
            UpstreamEntry::Addr(_) => None,
        })
        .collect();
    assert_eq!(
        names,
        vec![("api-blue.switchyard.svc.cluster.local.".to_string(), 8080)]
    );
}

/// A URL Switchyard calls with a `user:password@` in it is refused, its key named and the
/// password not repeated: it was never sent (the receiver saw no credentials) and
/// `/api/status`, which needs no token, showed it as written.
#[test]
fn urls_with_a_user_or_password_are_refused_without_repeating_it() {
    let text = r#"
[analysis]
prometheus_url = "http://prom:s3cret@127.0.0.1:9090/prefix"
[notify]
webhooks = ["https://hook:s3cret@example.com/h", "http://hook:s3c/ret@example.com/h", "http://example.com/ok@team", "http://***@example.com/"]
[[services]]
name = "api"
blue = { upstreams = ["127.0.0.1:3001"] }
green = { upstreams = ["127.0.0.1:3011"] }
[services.rollback]
[[services.rollback.triggers]]
kind = "probe"
url = "http://probe:s3cret@127.0.0.1:3001/{{color}}/deps"
json_pointer = "/database"
equals = "ok"
"#;
    let errs = errors(text);
    for key in [
        "analysis.prometheus_url: URL \"http://***@127.0.0.1:9090/prefix\" carries a user or password",
        "notify.webhooks[0]: URL \"https://***@example.com/h\" carries a user or password",
        "notify.webhooks[1]: URL \"http://***@example.com/h\" carries a user or password",
        "services[0].rollback.triggers[0].url: URL \"http://***@127.0.0.1:3001/{{color}}/deps\" carries",
    ] {
        assert!(errs.iter().any(|e| e.starts_with(key)), "missing {key}: {errs:#?}");
    }
    assert!(
        errs.iter().all(|e| !e.contains("s3c")),
        "a password repeated: {errs:#?}"
    );
    // An `@` in the path cannot be told from a password holding `/`: refused too, saying how
    // to write it.
    assert!(
        errs.iter()
            .any(|e| e.starts_with("notify.webhooks[2]") && e.contains("%40")),
        "{errs:#?}"
    );
    // A user spelled `***` (what the error shows in place of one) is a user all the same.
    assert!(
        errs.iter().any(|e| e.starts_with("notify.webhooks[3]")),
        "{errs:#?}"
    );
    assert_eq!(errs.len(), 6, "{errs:#?}");
}

/// A URL port past 65535 (a typo: `:90900`) passed, and the client went to the scheme's port
/// (80/443) instead, with the Prometheus bearer token: each URL key refuses it, naming the
/// port; a port that fits passes.
#[test]
fn a_url_port_past_65535_is_refused_at_its_key() {
    let text = r#"
[analysis]
prometheus_url = "http://127.0.0.1:70000"
[notify]
webhooks = ["http://127.0.0.1:99999/hook", "https://example.com:0/h", "http://127.0.0.1:8081/ok", "http://[::1]:65536/h", "https://example.com/ok"]
[[services]]
name = "api"
blue = { upstreams = ["127.0.0.1:3001"] }
green = { upstreams = ["127.0.0.1:3011"] }
[services.rollback]
[[services.rollback.triggers]]
kind = "probe"
url = "http://127.0.0.1:123456/{{color}}/deps"
"#;
    let errs = errors(text);
    for key in [
        "analysis.prometheus_url: invalid URL \"http://127.0.0.1:70000\": invalid port \"70000\"",
        "notify.webhooks[0]: invalid URL \"http://127.0.0.1:99999/hook\": invalid port \"99999\"",
        "notify.webhooks[1]: invalid URL \"https://example.com:0/h\": invalid port \"0\"",
        "notify.webhooks[3]: invalid URL \"http://[::1]:65536/h\": invalid port \"65536\"",
        "services[0].rollback.triggers[0].url: invalid URL \"http://127.0.0.1:123456/{{color}}/deps\": invalid port \"123456\"",
    ] {
        assert!(errs.iter().any(|e| e.starts_with(key)), "missing {key}: {errs:#?}");
    }
    assert_eq!(errs.len(), 5, "{errs:#?}");
}

/// Listeners that overlap through a wildcard address passed `check`, and `serve` could never
/// start (address in use): `0.0.0.0:P` beside `127.0.0.1:P`, and `[::]:P` (dual-stack: the
/// sockets are bound without IPV6_V6ONLY) beside `0.0.0.0:P` or any IPv4 address. Each is
/// refused at the later key, naming the other; different ports, `[::1]` beside `127.0.0.1`,
/// and port 0 pass.
#[test]
fn listeners_overlapping_through_a_wildcard_are_refused() {
    let conf = |proxy: &str, preview: &str, admin: &str| {
        format!(
            "[proxy]\nlisten = \"{proxy}\"\npreview_listen = \"{preview}\"\n\
             [admin]\nlisten = \"{admin}\"\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\n\
             green = {{ upstreams = [\"127.0.0.1:3011\"] }}\n"
        )
    };
    for (proxy, preview, admin, key) in [
        (
            "0.0.0.0:8080",
            "127.0.0.1:8081",
            "127.0.0.1:8080",
            "admin.listen",
        ),
        (
            "127.0.0.1:8080",
            "0.0.0.0:8080",
            "127.0.0.1:9090",
            "proxy.preview_listen",
        ),
        (
            "[::]:8080",
            "0.0.0.0:8080",
            "127.0.0.1:9090",
            "proxy.preview_listen",
        ),
        (
            "0.0.0.0:8080",
            "127.0.0.1:8081",
            "[::]:8080",
            "admin.listen",
        ),
        (
            "[::]:8080",
            "127.0.0.1:8081",
            "10.1.2.3:8080",
            "admin.listen",
        ),
        (
            "[::1]:8080",
            "[::]:8080",
            "127.0.0.1:9090",
            "proxy.preview_listen",
        ),
        (
            "[::ffff:127.0.0.1]:8080",
            "127.0.0.1:8080",
            "127.0.0.1:9090",
            "proxy.preview_listen",
        ),
    ] {
        let errs = errors(&conf(proxy, preview, admin));
        assert_eq!(errs.len(), 1, "{proxy} {preview} {admin}: {errs:#?}");
        assert!(
            errs[0].starts_with(&format!("{key}: ")) && errs[0].contains("already used"),
            "{proxy} {preview} {admin}: {errs:#?}"
        );
    }
    for (proxy, preview, admin) in [
        ("0.0.0.0:8080", "0.0.0.0:8081", "127.0.0.1:9090"),
        ("[::1]:8080", "127.0.0.1:8080", "10.1.2.3:8080"),
        ("0.0.0.0:0", "127.0.0.1:0", "[::]:0"),
        ("[::]:8080", "[::]:8081", "[::1]:9090"),
    ] {
        let errs = errors(&conf(proxy, preview, admin));
        assert!(errs.is_empty(), "{proxy} {preview} {admin}: {errs:#?}");
    }
}

/// `admin.allowed_hosts` entries with a port, a scheme, a path or a wildcard passed `check` and
/// then never matched (403): each is refused at its index, saying an entry is a bare host name
/// compared with the Host header's name. Names, IP literals and upper case pass.
#[test]
fn allowed_hosts_entries_are_bare_host_names() {
    let conf = |hosts: &str| {
        format!(
            "[admin]\nallowed_hosts = [{hosts}]\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\n\
             green = {{ upstreams = [\"127.0.0.1:3011\"] }}\n"
        )
    };
    let errs = errors(&conf(
        r#""admin.example.com:9090", "*.corp.example", "http://ops.example.com", "ops.example.com/admin", "", "a b""#,
    ));
    for (i, why) in [
        "has a port",
        "is a wildcard",
        "has a scheme",
        "has a path",
        "is empty",
        "is not a host name",
    ]
    .iter()
    .enumerate()
    {
        let key = format!("admin.allowed_hosts[{i}]: ");
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&key) && e.contains(why) && e.contains("bare host name")),
            "{key}{why}: {errs:#?}"
        );
    }
    assert_eq!(errs.len(), 6, "{errs:#?}");
    let errs = errors(&conf(
        r#""admin.example.com", "Switchyard_Admin", "ops-1", "10.0.0.5", "::1", "[::1]""#,
    ));
    assert!(errs.is_empty(), "{errs:#?}");
}

/// `notify.timeout = "0s"` passed, and every webhook delivery then timed out at once (none was
/// ever delivered): refused like the other timeouts.
#[test]
fn a_zero_notify_timeout_is_refused() {
    let conf = |t: &str| {
        format!(
            "[notify]\nwebhooks = [\"http://127.0.0.1:9/h\"]\ntimeout = \"{t}\"\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\n\
             green = {{ upstreams = [\"127.0.0.1:3011\"] }}\n"
        )
    };
    let errs = errors(&conf("0s"));
    assert_eq!(
        errs,
        ["notify.timeout: must be greater than zero".to_string()],
        "{errs:#?}"
    );
    assert!(errors(&conf("1ms")).is_empty());
}

/// `upstream_max_idle` sizes a ring allocated whole for every upstream: a value whose rings
/// would take gigabytes (1,000,000 was accepted: ~130 MB per upstream at rest) is refused at
/// its key; the largest accepted one takes ~8.5 MB per upstream.
#[test]
fn an_idle_pool_too_large_to_allocate_per_upstream_is_refused() {
    let with = |n: &str| GOOD.replace("[proxy]\n", &format!("[proxy]\nupstream_max_idle = {n}\n"));
    let errs: Vec<String> = match from_toml_str_with_env(&with("1000000"), env()) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    };
    assert!(
        errs.join("\n")
            .contains("proxy.upstream_max_idle: 1000000 is out of range"),
        "{errs:?}"
    );
    let c = from_toml_str_with_env(&with("65536"), env()).expect("65536 is accepted");
    assert_eq!(c.proxy.upstream_max_idle, 65536);
}

/// A base URL Switchyard appends a path to (`analysis.prometheus_url`: `/api/v1/query`,
/// `state.etcd_endpoints`: `/v3/kv/...`) with a query string or a `#fragment` passed `check`,
/// and every call then went to `/prom?x=1/api/v1/query?...` (each prometheus trigger
/// inconclusive for good): refused at its key, the query not repeated. A full URL (a probe's,
/// a webhook's) keeps its query.
#[test]
fn a_base_url_with_a_query_or_fragment_is_refused() {
    for (url, part) in [
        ("http://127.0.0.1:9090/prom?token=s3cret", "a query string"),
        ("http://127.0.0.1:9090/prom#f", "a #fragment"),
        ("http://127.0.0.1:9090/?", "a query string"),
    ] {
        let text = format!("[analysis]\nprometheus_url = \"{url}\"\n{GOOD}");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{url}: {errs:#?}");
        assert!(
            errs[0].starts_with("analysis.prometheus_url: a base URL takes no query or fragment")
                && errs[0].contains(part)
                && errs[0].contains("/api/v1/query"),
            "{url}: {errs:#?}"
        );
        assert!(!errs[0].contains("s3cret"), "{errs:#?}");
    }
    let text = format!(
        "[state]\nbackend = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:2379\", \"http://127.0.0.1:2379?x=1\"]\n{GOOD}"
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("state.etcd_endpoints[1]: a base URL takes no query or fragment"),
        "{errs:#?}"
    );
    let text = r#"
[analysis]
prometheus_url = "http://127.0.0.1:9090/prom/"
[notify]
webhooks = ["http://127.0.0.1:8081/hook?channel=ops"]
[[services]]
name = "api"
blue = { upstreams = ["127.0.0.1:3001"] }
green = { upstreams = ["127.0.0.1:3011"] }
[services.rollback]
[[services.rollback.triggers]]
kind = "probe"
url = "http://127.0.0.1:3001/{{color}}/deps?full=1"
"#;
    assert_eq!(errors(text), Vec::<String>::new());
}

#[test]
fn a_certificate_without_a_tls_listener_is_refused_at_its_keys() {
    let text = GOOD.replacen(
        "[proxy]",
        "[proxy]\ntls_cert = \"a.crt\"\ntls_key = \"a.key\"",
        1,
    );
    assert_ne!(text, GOOD);
    let errs = errors(&text);
    for key in ["proxy.tls_cert", "proxy.tls_key"] {
        assert!(
            errs.iter()
                .any(|e| e.starts_with(key) && e.contains("proxy.tls_listen is not")),
            "{key}: {errs:?}"
        );
    }
}

#[test]
fn a_host_with_an_empty_label_is_refused() {
    let text = GOOD.replace(
        "path_prefix = \"/api\"",
        "path_prefix = \"/api\"\nhosts = [\"a..b\", \".a\", \"*..a\", \"a.example.\", \"*.a.example\"]",
    );
    let errs = errors(&text);
    for i in 0..3 {
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&format!("services[0].hosts[{i}]: invalid host"))),
            "hosts[{i}]: {errs:#?}"
        );
    }
    assert!(
        !errs
            .iter()
            .any(|e| e.contains("hosts[3]") || e.contains("hosts[4]")),
        "{errs:#?}"
    );
}
