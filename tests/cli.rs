//! A CLI that explains itself (issue 15), with the real binaries: collectorctl's queries
//! without --meter, with --project/--user filters, --output table|json|csv and relative times;
//! the ceilometer.conf importer on a file written from ceilometer's and oslo's real option
//! definitions, then --check-config on its output; the generated man pages rendered by `man`
//! and the generated bash completion completing subcommands.

use collector_e2e::*;
use meter::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A signed sample of `meter` for `project`/`user`, stamped `age_s` seconds before now.
fn sample_at(id: &str, meter: &str, project: &str, user: &str, age_s: i64) -> Value {
    let mut v = sample_with(id, SECRET, meter, 7);
    let ts = (time::OffsetDateTime::now_utc() - time::Duration::seconds(age_s))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    if let Value::Map(pairs) = &mut v {
        for (k, val) in pairs.iter_mut() {
            match k {
                Value::Str(k) if k == "project_id" => *val = Value::Str(project.into()),
                Value::Str(k) if k == "user_id" => *val = Value::Str(user.into()),
                Value::Str(k) if k == "timestamp" => *val = Value::Str(ts.clone()),
                _ => {}
            }
        }
    }
    meter::signature::sign(&mut v, SECRET);
    v
}

fn ok(d: &Daemon, args: &[&str]) -> String {
    let (code, out, err) = d.ctl(args);
    assert_eq!(code, 0, "collectorctl {args:?}: {err}");
    out
}

fn json_rows(d: &Daemon, args: &[&str]) -> Vec<serde_json::Value> {
    let out = ok(d, args);
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn ids(rows: &[serde_json::Value]) -> Vec<String> {
    let mut v: Vec<String> = rows
        .iter()
        .map(|r| r["message_id"].as_str().unwrap_or("").to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn queries_without_meter_with_filters_formats_and_relative_times() {
    let d = Daemon::start(Setup::default());
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    let batch = vec![
        sample_at("a-cpu-recent", "cpu", "p1", "u1", 600),
        sample_at("b-mem-recent", "memory", "p2", "u1", 300),
        sample_at("c-disk-old", "disk.read", "p1", "u2", 3 * 86400),
        sample_at("d-cpu-old", "cpu", "p2", "u2", 10 * 86400),
    ];
    assert_eq!(c.call(batch).unwrap().stored, 4);

    // No --meter: the latest samples of every meter, newest first.
    let rows = json_rows(&d, &["samples", "--output", "json"]);
    let order: Vec<&str> = rows
        .iter()
        .map(|r| r["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        ["b-mem-recent", "a-cpu-recent", "c-disk-old", "d-cpu-old"]
    );
    assert_eq!(
        json_rows(&d, &["samples", "--limit", "2", "--json"]).len(),
        2
    );
    let table = ok(&d, &["samples"]);
    assert!(table.starts_with("TIMESTAMP"), "{table}");
    assert_eq!(table.lines().count(), 5, "{table}");
    for meter in ["cpu", "memory", "disk.read"] {
        assert!(table.contains(meter), "{table}");
    }

    // ceilometer's project and user filters.
    assert_eq!(
        ids(&json_rows(&d, &["samples", "--project", "p1", "--json"])),
        ["a-cpu-recent", "c-disk-old"]
    );
    assert_eq!(
        ids(&json_rows(&d, &["samples", "--user", "u2", "--json"])),
        ["c-disk-old", "d-cpu-old"]
    );
    assert_eq!(
        ids(&json_rows(
            &d,
            &[
                "samples",
                "--meter",
                "cpu",
                "--project",
                "p2",
                "--user",
                "u2",
                "--json"
            ]
        )),
        ["d-cpu-old"]
    );

    // Relative and RFC 3339 times.
    assert_eq!(
        ids(&json_rows(&d, &["samples", "--since", "-1h", "--json"])),
        ["a-cpu-recent", "b-mem-recent"]
    );
    assert_eq!(
        ids(&json_rows(
            &d,
            &["samples", "--since", "-7d", "--until", "-1d", "--json"]
        )),
        ["c-disk-old"]
    );
    let since = (time::OffsetDateTime::now_utc() - time::Duration::days(5))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_eq!(
        json_rows(&d, &["samples", "--since", &since, "--json"]).len(),
        3
    );
    for bad in ["-1y", "-h", "yesterday", "2026-13-01T00:00:00Z"] {
        let (code, _, err) = d.ctl(&["samples", "--since", bad]);
        assert_eq!(code, 2, "--since {bad}: {err}");
        assert!(err.contains("-1h") || err.contains("RFC 3339"), "{err}");
    }

    // CSV: a header, one line per sample, fields quoted where needed.
    let csv = ok(&d, &["samples", "--project", "p1", "--output", "csv"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(
        lines[0].starts_with("timestamp,resource,meter,type,volume,unit,project,user,message_id")
    );
    assert!(
        lines[1].ends_with("a-cpu-recent\r") || lines[1].ends_with("a-cpu-recent"),
        "{csv}"
    );
    // --json and --output together is a usage error.
    assert_eq!(d.ctl(&["samples", "--json", "--output", "csv"]).0, 2);

    // statistics, meters and resources take the same filters and formats.
    let st = json_rows(
        &d,
        &["statistics", "--meter", "cpu", "--project", "p2", "--json"],
    );
    assert_eq!(st[0]["count"], 1);
    let csv = ok(&d, &["statistics", "--meter", "cpu", "-o", "csv"]);
    assert!(csv.starts_with("period_start,period_end,count"), "{csv}");
    let meters = json_rows(&d, &["meters", "--user", "u1", "--json"]);
    let mut names: Vec<&str> = meters.iter().map(|m| m["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["cpu", "memory"]);
    let resources = ok(&d, &["resources", "--meter", "disk.read"]);
    assert!(resources.starts_with("RESOURCE"), "{resources}");
    assert_eq!(resources.lines().count(), 2, "{resources}");

    // Without --config or --socket, $COLLECTOR_CONFIG names the config.
    let out = Command::new(bin("collectorctl"))
        .args(["samples", "--meter", "memory", "--json"])
        .env("COLLECTOR_CONFIG", &d.config_path)
        .current_dir(d.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("b-mem-recent"));

    // status keeps --json and gains --output.
    let s: serde_json::Value = serde_json::from_str(&ok(&d, &["status", "-o", "json"])).unwrap();
    assert!(s["pid"].as_u64().is_some());
    assert_eq!(d.ctl(&["status", "--output", "csv"]).0, 2);
    assert!(ok(&d, &["status"]).starts_with("collector pid"));
}

/// ceilometer 9.0.x (the last release with the collector) unpacked from its PyPI sdist, once
/// per target dir.
fn ceilometer_sdist(python: &Path) -> PathBuf {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ceilometer-sdist");
    let dir = base.join("ceilometer-9.0.6");
    if dir.join("ceilometer/opts.py").exists() {
        return dir;
    }
    std::fs::create_dir_all(&base).unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("run");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            "ceilometer==9.0.6",
            "-d",
        ])
        .arg(&base));
    run(Command::new("tar")
        .arg("xzf")
        .arg(base.join("ceilometer-9.0.6.tar.gz"))
        .arg("-C")
        .arg(&base));
    dir
}

#[test]
fn import_a_real_ceilometer_conf_then_check_config() {
    let python = ceilometer_python();
    let sdist = ceilometer_sdist(&python);
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("ceilometer.conf");
    let db = tmp.path().join("meters.db");
    let samples = tmp.path().join("samples.log");
    // Every option the importer carries, at ceilometer's and oslo's defaults, with the values
    // a deployment sets on top (ceilometer's sqlite URLs are SQLAlchemy's, as ours).
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/ceilometer_conf.py"))
        .arg(&sdist)
        .arg(&conf)
        .arg("DEFAULT.transport_url=rabbit://ceilometer:s3cret@rabbit-1:5672,ceilometer:s3cret@rabbit-2:5672/telemetry")
        .arg("DEFAULT.meter_dispatchers=database")
        .arg("DEFAULT.meter_dispatchers=file")
        .arg("DEFAULT.debug=True")
        .arg("DEFAULT.log_dir=/var/log/ceilometer")
        .arg(format!("database.connection=sqlite:///{}", db.display()))
        .arg("database.metering_time_to_live=604800")
        .arg(format!("dispatcher_file.file_path={}", samples.display()))
        .arg("dispatcher_file.max_bytes=10000000")
        .arg("dispatcher_file.backup_count=5")
        .arg("publisher.telemetry_secret=shared-secret")
        .arg("collector.workers=4")
        .arg("collector.batch_size=50")
        .arg("collector.batch_timeout=5")
        .arg("oslo_messaging_rabbit.amqp_durable_queues=True")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ini = std::fs::read_to_string(&conf).unwrap();
    // The real names and defaults made it into the file.
    for line in [
        "udp_address = 0.0.0.0",
        "udp_port = 4952",
        "rabbit_qos_prefetch_count = 100",
        "control_exchange = ceilometer",
        "metering_topic = metering",
        "telemetry_driver = messagingv2",
    ] {
        assert!(ini.contains(line), "{line} not in:\n{ini}");
    }

    let out = Command::new(bin("collector"))
        .arg("--import-ceilometer-conf")
        .arg(&conf)
        .output()
        .unwrap();
    let toml = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{toml}",
        String::from_utf8_lossy(&out.stderr)
    );
    let imported = tmp.path().join("collector.toml");
    std::fs::write(&imported, &toml).unwrap();
    let cfg = collector::config::Config::parse(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(cfg.service.workers, 4);
    assert_eq!(cfg.service.log_level, "debug");
    assert_eq!(cfg.service.log_file, "/var/log/ceilometer/collector.log");
    assert_eq!(cfg.collector.udp_address, "0.0.0.0");
    assert_eq!(cfg.collector.udp_port, 4952);
    assert_eq!(cfg.collector.batch_size, 50);
    assert_eq!(cfg.collector.batch_timeout, 5.0);
    assert_eq!(cfg.collector.dispatchers, ["database", "file"]);
    assert!(cfg.collector.requeue_sample_on_dispatcher_error);
    assert_eq!(cfg.publisher.telemetry_secret, "shared-secret");
    assert!(cfg
        .messaging
        .transport_url
        .starts_with("rabbit://ceilometer:s3cret@rabbit-1:5672,"));
    assert_eq!(cfg.messaging.control_exchange, "ceilometer");
    assert_eq!(cfg.messaging.metering_topic, "metering");
    assert!(cfg.messaging.amqp_durable_queues);
    assert_eq!(cfg.messaging.rabbit_qos_prefetch_count, 100);
    assert_eq!(
        cfg.database.connection,
        format!("sqlite:///{}", db.display())
    );
    assert_eq!(cfg.database.metering_time_to_live, 604800);
    assert_eq!(cfg.dispatcher_file.file_path, samples.display().to_string());
    assert_eq!(cfg.dispatcher_file.max_bytes, 10_000_000);
    assert_eq!(cfg.dispatcher_file.backup_count, 5);
    // What could not be carried over is named with a reason, secrets never echoed.
    assert!(toml.contains("# Not carried over from"), "{toml}");
    assert!(
        toml.contains("# [oslo_messaging_rabbit] heartbeat_timeout_threshold:"),
        "{toml}"
    );
    assert!(
        toml.contains("# [publisher_notifier] event_topic:"),
        "{toml}"
    );
    assert!(toml.contains("# [DEFAULT] use_syslog:"), "{toml}");

    let out = Command::new(bin("collector"))
        .arg("--check-config")
        .arg("--config")
        .arg(&imported)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "--check-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An understood but unsupported value: an error naming the option, nothing on stdout.
    std::fs::write(
        &conf,
        format!("{ini}\n[database]\nconnection = mongodb://ceilometer:pw@mongo/ceilometer\n"),
    )
    .unwrap();
    let out = Command::new(bin("collector"))
        .arg("--import-ceilometer-conf")
        .arg(&conf)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("[database] connection") && err.contains("mongodb"),
        "{err}"
    );
    assert!(!err.contains(":pw@"), "secret echoed: {err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn generated_man_pages_render_and_bash_completion_completes_subcommands() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin("collectorctl"))
        .arg("generate-docs")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let man = tmp.path().join("man");
    for page in [
        "collector.8",
        "collectorctl.8",
        "collectorctl-samples.8",
        "collector.toml.5",
    ] {
        assert!(man.join(page).exists(), "{page} not generated");
    }
    if Command::new("man").arg("--version").output().is_err() {
        eprintln!("skipped rendering: no `man` on this machine (.ci/run's package test renders the installed pages)");
    } else {
        for entry in std::fs::read_dir(&man).unwrap() {
            let page = entry.unwrap().path();
            let out = Command::new("man")
                .args(["--warnings", "-l"])
                .arg(&page)
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "100")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{}", page.display());
            assert!(text.contains("NAME"), "{}: {text}", page.display());
            assert!(
                out.stderr.is_empty(),
                "{}: {}",
                page.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let page = std::fs::read_to_string(man.join("collector.toml.5")).unwrap();
        assert!(page.contains("udp_address") && page.contains("[collector] udp_address"));
    }

    // Bash: complete `collectorctl s<TAB>` and `collectorctl samples --pro<TAB>` with the
    // generated script, as bash-completion would call it.
    let script = tmp.path().join("completions/collectorctl");
    let complete = |words: &str| -> String {
        let words: Vec<&str> = words.split(' ').collect();
        let cmd = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE=\"{}\"; COMP_POINT=${{#COMP_LINE}}; \
             _collectorctl collectorctl {} {}; echo \"${{COMPREPLY[@]}}\"",
            script.display(),
            words.join(" "),
            words.len() - 1,
            words.join(" "),
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let out = Command::new("bash").args(["-c", &cmd]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let subs = complete("collectorctl s");
    for s in ["samples", "statistics", "stats", "status", "stop"] {
        assert!(subs.split(' ').any(|w| w == s), "{s} not in {subs:?}");
    }
    assert!(!subs.contains("generate"), "{subs}");
    assert_eq!(complete("collectorctl samples --pro"), "--project");
    let zsh = std::fs::read_to_string(tmp.path().join("completions/_collectorctl")).unwrap();
    assert!(
        zsh.starts_with("#compdef collectorctl"),
        "{}",
        &zsh[..40.min(zsh.len())]
    );
}
