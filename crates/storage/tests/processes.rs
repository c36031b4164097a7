//! Two processes writing one SQLite file at once lose nothing and store nothing twice.
//!
//! The child processes are this test binary itself, started with `--exact child_writer` and
//! an environment variable that gives the child its job; run normally, `child_writer` does
//! nothing.

mod common;

use common::{sample, url_for};
use rusqlite::Connection;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use storage::StorageOptions;

const CHILD_ENV: &str = "STORAGE_TEST_CHILD_JOB";
const BATCHES: usize = 40;
const BATCH: usize = 250;

/// The ids child `prefix` writes: its own, plus every fifth one shared with the other child.
fn ids_for(prefix: &str) -> Vec<Vec<String>> {
    (0..BATCHES)
        .map(|b| {
            (0..BATCH)
                .map(|i| {
                    let n = b * BATCH + i;
                    if n % 5 == 0 {
                        format!("shared-{n}")
                    } else {
                        format!("{prefix}-{n}")
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn child_writer() {
    let Ok(job) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (db, prefix) = job.split_once('|').expect("job is DB|PREFIX");
    let mut storage = storage::open(&url_for(Path::new(db)), &StorageOptions::default())
        .expect("child opens the database");
    let (mut stored, mut duplicates, mut retries) = (0, 0, 0);
    for (b, batch_ids) in ids_for(prefix).iter().enumerate() {
        let batch: Vec<_> = batch_ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let ts = format!("2026-01-01T00:{:02}:{:02}", b % 60, i % 60);
                sample(id, "cpu", &format!("vm-{}", i % 7), &ts, i as f64)
            })
            .collect();
        // What the daemon does on a transient failure: retry the same batch later.
        loop {
            match storage.record_metering_data(&batch) {
                Ok(out) => {
                    assert!(out.rejected.is_empty());
                    stored += out.stored;
                    duplicates += out.duplicates;
                    break;
                }
                Err(e) if e.is_transient() && retries < 100 => {
                    retries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("child {prefix}: {e}"),
            }
        }
    }
    println!("RESULT {stored} {duplicates} {retries}");
}

fn spawn_child(db: &Path, prefix: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{}|{prefix}", db.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child test process")
}

#[test]
fn two_processes_writing_one_file_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Not created beforehand: both children race to create and migrate it.
    let db = dir.path().join("shared.db");
    let children = [spawn_child(&db, "a"), spawn_child(&db, "b")];
    let mut totals = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "child failed: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        // The harness prints "test child_writer ... " on the same line first.
        let line = stdout
            .split_once("RESULT ")
            .and_then(|(_, rest)| rest.lines().next())
            .unwrap_or_else(|| panic!("no RESULT in {stdout}"));
        let n: Vec<usize> = line.split(' ').map(|x| x.parse().unwrap()).collect();
        assert_eq!(n[0] + n[1], BATCHES * BATCH, "every sample accounted for");
        eprintln!(
            "child: stored {} duplicates {} retries {}",
            n[0], n[1], n[2]
        );
        totals.push((n[0], n[1]));
    }

    let mut want: BTreeSet<String> = BTreeSet::new();
    for prefix in ["a", "b"] {
        want.extend(ids_for(prefix).into_iter().flatten());
    }
    let shared = BATCHES * BATCH / 5;
    assert_eq!(want.len(), 2 * BATCHES * BATCH - shared);
    // Each shared id was stored by exactly one child and reported duplicate by the other.
    assert_eq!(totals[0].0 + totals[1].0, want.len());
    assert_eq!(totals[0].1 + totals[1].1, shared);

    let conn = Connection::open(&db).unwrap();
    let mut stmt = conn.prepare("SELECT message_id FROM sample").unwrap();
    let got: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(got.len(), want.len(), "no sample stored twice");
    let got: BTreeSet<String> = got.into_iter().collect();
    assert_eq!(got, want, "every message_id stored");
    let resources: i64 = conn
        .query_row("SELECT COUNT(*) FROM resource", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        resources, 7,
        "one resource row per resource, whichever process created it"
    );
}
