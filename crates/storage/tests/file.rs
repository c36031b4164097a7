//! The file dispatcher: line format, RotatingFileHandler rotation boundaries, reopen.

mod common;

use common::{s, sample};
use meter::{Sample, Value, Volume};
use std::fs;
use std::path::{Path, PathBuf};
use storage::FileDispatcher;

/// Samples whose JSON lines all have the same length.
fn fixed(n: usize) -> Vec<Sample> {
    (0..n)
        .map(|i| {
            sample(
                &format!("id-{i:04}"),
                "cpu",
                "vm",
                "2026-01-01T00:00:00",
                1.0,
            )
        })
        .collect()
}

fn line_len() -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("probe.log");
    FileDispatcher::open(&path, 0, 0)
        .unwrap()
        .append(&fixed(1))
        .unwrap();
    fs::metadata(&path).unwrap().len()
}

fn backup(path: &Path, i: u32) -> PathBuf {
    PathBuf::from(format!("{}.{i}", path.display()))
}

/// The message ids in a file, in order ("-" for a missing file).
fn ids_in(path: &Path) -> Vec<String> {
    match fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["message_id"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("id-000")
                    .to_string()
            })
            .collect(),
        Err(_) => vec!["-".to_string()],
    }
}

#[test]
fn writes_every_field_as_one_json_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logs/samples.log");
    let mut f = FileDispatcher::open(&path, 0, 0).unwrap();
    let mut smp = sample("id-1", "cpu", "vm-1", "2026-01-01T00:00:00+02:00", 1.0);
    smp.counter_volume = Volume::Int(42);
    smp.user_name = Some("alice".into());
    smp.monotonic_time = Some(f64::INFINITY);
    smp.resource_metadata = Value::Map(vec![
        (s("z"), Value::Int(1)),
        (s("a"), Value::Bin(vec![0xff, 0x00])),
        (s("nan"), Value::Float(f64::NAN)),
        (
            s("nested"),
            Value::Map(vec![(
                s("list"),
                Value::Array(vec![Value::Nil, Value::Bool(false)]),
            )]),
        ),
    ])
    .into();
    smp.extra = vec![
        ("publisher_extra".into(), s("kept")),
        ("blob".into(), Value::Bin(b"utf8 text".to_vec())),
    ];
    let mut second = sample("id-2", "mem", "vm-2", "2026-01-01T00:00:01", 2.5);
    second.counter_volume = Volume::Float(f64::NEG_INFINITY);
    f.append(&[smp, second]).unwrap();

    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(text.ends_with('\n'));
    // Field order: ceilometer's, then extras; metadata in wire order.
    assert!(lines[0].starts_with(r#"{"source":"openstack","counter_name":"cpu","counter_type":"gauge","counter_unit":"%","counter_volume":42,"#), "{}", lines[0]);
    assert!(
        lines[0].contains(
            r#""resource_metadata":{"z":1,"a":[255,0],"nan":"NaN","nested":{"list":[null,false]}}"#
        ),
        "{}",
        lines[0]
    );
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let want = serde_json::json!({
        "source": "openstack", "counter_name": "cpu", "counter_type": "gauge",
        "counter_unit": "%", "counter_volume": 42, "user_id": "user-1",
        "project_id": "project-1", "user_name": "alice", "project_name": null,
        "resource_id": "vm-1", "timestamp": "2026-01-01T00:00:00+02:00",
        "resource_metadata": {"z": 1, "a": [255, 0], "nan": "NaN",
                              "nested": {"list": [null, false]}},
        "message_id": "id-1", "message_signature": "sig-id-1",
        "monotonic_time": "Infinity", "publisher_extra": "kept", "blob": "utf8 text"
    });
    assert_eq!(v, want);
    let v2: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(v2["counter_volume"], "-Infinity");
    assert_eq!(v2["monotonic_time"], serde_json::Value::Null);
}

#[test]
fn rotates_like_python_rotating_file_handler() {
    let l = line_len();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    // max_bytes = 3 lines: a file holds 2 (a 3rd would *reach* max_bytes, which rotates).
    let mut f = FileDispatcher::open(&path, 3 * l, 2).unwrap();
    let all = fixed(7);
    f.append(&all[0..2]).unwrap();
    assert_eq!(ids_in(&path), ["0", "1"]);
    assert!(!backup(&path, 1).exists());
    f.append(&all[2..3]).unwrap();
    assert_eq!(ids_in(&path), ["2"]);
    assert_eq!(ids_in(&backup(&path, 1)), ["0", "1"]);
    // Several rotations within one append; the oldest backup falls off the end.
    f.append(&all[3..7]).unwrap();
    assert_eq!(ids_in(&path), ["6"]);
    assert_eq!(ids_in(&backup(&path, 1)), ["4", "5"]);
    assert_eq!(ids_in(&backup(&path, 2)), ["2", "3"]);
    assert!(!backup(&path, 3).exists());
}

#[test]
fn rotation_boundary_is_reaching_max_bytes() {
    let l = line_len();
    for (max_bytes, per_file) in [
        (2 * l, 1),
        (2 * l + 1, 2),
        (3 * l - 1, 2),
        (3 * l, 2),
        (3 * l + 1, 3),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.log");
        let mut f = FileDispatcher::open(&path, max_bytes, 5).unwrap();
        f.append(&fixed(per_file + 1)).unwrap();
        assert_eq!(ids_in(&path).len(), 1, "max_bytes {max_bytes} (line {l})");
        assert_eq!(
            ids_in(&backup(&path, 1)).len(),
            per_file,
            "max_bytes {max_bytes}"
        );
    }
}

#[test]
fn an_oversized_line_goes_whole_into_an_empty_file() {
    let l = line_len();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let mut f = FileDispatcher::open(&path, l / 2, 3).unwrap();
    f.append(&fixed(3)).unwrap();
    // Never rotate an empty file: each line lands alone in one file.
    assert_eq!(ids_in(&path), ["2"]);
    assert_eq!(ids_in(&backup(&path, 1)), ["1"]);
    assert_eq!(ids_in(&backup(&path, 2)), ["0"]);
}

#[test]
fn zero_max_bytes_or_zero_backups_never_rotate() {
    let l = line_len();
    for (max_bytes, backups) in [(0, 3), (l, 0)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.log");
        let mut f = FileDispatcher::open(&path, max_bytes, backups).unwrap();
        f.append(&fixed(5)).unwrap();
        f.append(&fixed(5)).unwrap();
        assert_eq!(ids_in(&path).len(), 10);
        assert!(!backup(&path, 1).exists());
    }
}

#[test]
fn appends_to_an_existing_file_and_counts_its_size() {
    let l = line_len();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    FileDispatcher::open(&path, 0, 0)
        .unwrap()
        .append(&fixed(1))
        .unwrap();
    // A restarted daemon: the existing line counts toward max_bytes.
    let mut f = FileDispatcher::open(&path, 2 * l + 1, 1).unwrap();
    f.append(&fixed(2)).unwrap();
    assert_eq!(ids_in(&path), ["1"]);
    assert_eq!(ids_in(&backup(&path, 1)), ["0", "0"]);
}

#[test]
fn reopen_follows_logrotate_and_renames_are_noticed_anyway() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let moved = dir.path().join("s.log.rotated");
    let mut f = FileDispatcher::open(&path, 0, 0).unwrap();
    f.append(&fixed(1)).unwrap();
    fs::rename(&path, &moved).unwrap();
    f.reopen().unwrap();
    f.append(&fixed(2)[1..]).unwrap();
    assert_eq!(ids_in(&moved), ["0"]);
    assert_eq!(ids_in(&path), ["1"]);

    // Without reopen (a missed signal): the next append still follows the name.
    fs::rename(&path, &moved).unwrap();
    f.append(&fixed(3)[2..]).unwrap();
    assert_eq!(ids_in(&moved), ["1"]);
    assert_eq!(ids_in(&path), ["2"]);

    // Deleted outright: recreated.
    fs::remove_file(&path).unwrap();
    f.append(&fixed(1)).unwrap();
    assert_eq!(ids_in(&path), ["0"]);
}

#[test]
fn concurrent_dispatchers_on_one_file_rotate_once_and_lose_nothing() {
    let l = line_len();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    // Each dispatcher has its own open file description, as separate worker processes do.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut f = FileDispatcher::open(&path, 10 * l, 100).unwrap();
                for b in 0..25 {
                    let batch: Vec<Sample> = (0..3)
                        .map(|i| {
                            let id = format!("id-{w}{b:02}{i}");
                            sample(&id, "cpu", "vm", "2026-01-01T00:00:00", 1.0)
                        })
                        .collect();
                    f.append(&batch).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let mut lines = Vec::new();
    let mut files = vec![path.clone()];
    files.extend((1..=100).map(|i| backup(&path, i)).filter(|p| p.exists()));
    for p in &files {
        let text = fs::read_to_string(p).unwrap();
        if (text.len() as u64) >= 10 * l {
            for q in &files {
                eprintln!("{}: {:?}", q.display(), ids_in(q));
            }
        }
        // Rotation never let a file reach max_bytes, and no line was torn.
        assert!(
            (text.len() as u64) < 10 * l,
            "{} has {} bytes",
            p.display(),
            text.len()
        );
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            lines.push(v["message_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(lines.len(), 4 * 25 * 3);
    lines.sort();
    lines.dedup();
    assert_eq!(lines.len(), 4 * 25 * 3, "no line written twice");
    assert_eq!(
        files.len(),
        300 / 9 + 1,
        "every file but the last holds 9 lines"
    );
}
