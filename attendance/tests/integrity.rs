//! Tampering and crashes, on every backend: a changed row and a deleted row make `verify`
//! fail, and a writer killed with SIGKILL loses no acknowledged event.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::{locations, pid, sid, Script};
use haven_attendance::{
    Event, EventKind, LeaveReason, Ledger, LedgerHandle, Location, NodeId, StaffId,
};
use haven_ids::Role;
use time::macros::datetime;

/// A ledger with one short session in it (seq 1 to 7).
fn seeded(location: &Location) -> Ledger {
    let mut ledger = Ledger::open_at(location).expect("open");
    let mut s = Script::new("sess-01", "iop-adult", datetime!(2026-03-02 09:00 UTC), 60);
    s.stay("t-01", Role::Therapist, 0.0, 60.0)
        .stay("p-01", Role::Client, 0.0, 60.0);
    s.write(&mut ledger);
    let report = ledger.verify().expect("verify");
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.entries, 7);
    ledger
}

/// Runs SQL behind Haven's back with the append-only triggers switched off, as someone with
/// write access to the database could.
fn tamper(location: &Location, sql: &str) {
    match location {
        Location::SqliteFile(path) => {
            let conn = rusqlite::Connection::open(path).expect("second connection");
            conn.execute_batch(
                "DROP TRIGGER ledger_entries_no_update; DROP TRIGGER ledger_entries_no_delete;",
            )
            .expect("drop triggers");
            conn.execute_batch(sql).expect("tamper");
        }
        Location::Postgres { url, schema } => {
            let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect");
            let schema = schema.as_deref().expect("tests use a schema");
            client
                .batch_execute(&format!(
                    "SET search_path TO {schema}; \
                     ALTER TABLE ledger_entries DISABLE TRIGGER USER; {sql}"
                ))
                .expect("tamper");
        }
        Location::InMemory => unreachable!("tests use files or databases"),
    }
}

#[test]
fn triggers_refuse_update_and_delete() {
    for (backend, location, _dir) in locations() {
        let _ledger = seeded(&location);
        let refused = match &location {
            Location::SqliteFile(path) => {
                let conn = rusqlite::Connection::open(path).expect("open");
                conn.execute("UPDATE ledger_entries SET at = 0", [])
                    .is_err()
                    && conn.execute("DELETE FROM ledger_entries", []).is_err()
            }
            Location::Postgres { url, schema } => {
                let mut c = postgres::Client::connect(url, postgres::NoTls).expect("connect");
                let schema = schema.as_deref().expect("schema");
                c.batch_execute(&format!("SET search_path TO {schema}"))
                    .expect("search path");
                c.execute("UPDATE ledger_entries SET at = 0", &[]).is_err()
                    && c.execute("DELETE FROM ledger_entries", &[]).is_err()
                    && c.batch_execute("TRUNCATE ledger_entries").is_err()
            }
            Location::InMemory => false,
        };
        assert!(refused, "[{backend}]");
    }
}

#[test]
fn updated_row_makes_verify_fail_and_names_it() {
    for (backend, location, _dir) in locations() {
        drop(seeded(&location));
        // Ten minutes more for the client: the kind of edit the chain exists to catch.
        tamper(
            &location,
            "UPDATE ledger_entries SET at = at - 600000000000 WHERE seq = 5",
        );

        let mut ledger = Ledger::open_at(&location).expect("open");
        let report = ledger.verify().expect("verify runs");
        let bad = report.first_bad.expect("tampering caught");
        assert_eq!(bad.seq, 5, "[{backend}] {bad:?}");
        assert!(
            ledger.session_events(&sid("sess-01")).is_err(),
            "[{backend}]"
        );
    }
}

#[test]
fn deleted_row_makes_verify_fail_and_names_it() {
    for (backend, location, _dir) in locations() {
        drop(seeded(&location));
        tamper(&location, "DELETE FROM ledger_entries WHERE seq = 7");

        let report = Ledger::open_at(&location)
            .expect("open")
            .verify()
            .expect("verify runs");
        let bad = report.first_bad.expect("deletion caught");
        assert_eq!(bad.seq, 7, "[{backend}] {bad:?}");
    }
}

#[test]
fn emptied_lookup_table_makes_verify_fail() {
    for (backend, location, _dir) in locations() {
        drop(seeded(&location));
        tamper(&location, "DELETE FROM session_participants");

        let report = Ledger::open_at(&location)
            .expect("open")
            .verify()
            .expect("verify runs");
        assert!(report.first_bad.is_none(), "[{backend}]");
        assert!(report.index_problem.is_some(), "[{backend}] {report:?}");
    }
}

#[test]
fn reads_are_logged_in_their_own_chain() {
    for (backend, location, _dir) in locations() {
        let mut ledger = seeded(&location);
        let auditor = StaffId::parse("aud-01").expect("id");
        ledger
            .record_read(&auditor, "session sess-01")
            .expect("read logged");
        ledger
            .record_read(&auditor, "program iop-adult week 2026-W10")
            .expect("read logged");

        let reads = ledger.reads().expect("reads");
        assert_eq!(reads.len(), 2, "[{backend}]");
        assert_eq!(reads[1].2, "program iop-adult week 2026-W10");
        let report = ledger.verify().expect("verify");
        assert_eq!(report.reads, 2);
        assert!(report.is_intact(), "[{backend}] {report:?}");
    }
}

/// Runs schema SQL on the ledger's database directly (triggers left in place).
fn run_sql(location: &Location, sql: &str) {
    match location {
        Location::SqliteFile(path) => {
            let conn = rusqlite::Connection::open(path).expect("second connection");
            conn.execute_batch(sql).expect("sql");
        }
        Location::Postgres { url, schema } => {
            let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect");
            let schema = schema.as_deref().expect("tests use a schema");
            client
                .batch_execute(&format!("SET search_path TO {schema}; {sql}"))
                .expect("sql");
        }
        Location::InMemory => unreachable!("tests use files or databases"),
    }
}

/// A ledger of schema version 2 (no `stay_nodes`) opens as version 3, and a stay left open
/// under version 2 is still closed by its node's start-up recovery.
#[test]
fn schema_version_2_is_upgraded_and_its_open_stays_recovered() {
    for (backend, location, _dir) in locations() {
        let node = NodeId::parse("node-a").expect("id");
        let start = datetime!(2026-03-02 09:00 UTC);
        {
            let mut ledger = Ledger::open_at(&location).expect("open");
            ledger.recover(&node).expect("recover");
            let mut s = Script::new("sess-v2", "iop-adult", start, 60);
            s.p("p-01", Role::Client, 0.0, EventKind::Admitted);
            s.write(&mut ledger);
            ledger.heartbeat_at(&node, s.at(10.0)).expect("heartbeat");
        }
        let downgrade = match &location {
            Location::SqliteFile(_) => "DROP TABLE stay_nodes; PRAGMA user_version = 2;",
            _ => "DROP TABLE stay_nodes; UPDATE haven_schema SET version = 2;",
        };
        run_sql(&location, downgrade);

        let mut ledger = Ledger::open_at(&location).expect("open upgrades");
        let report = ledger.recover(&node).expect("recover");
        assert_eq!(report.stays_closed, 1, "[{backend}]");
        let entries = ledger.session_events(&sid("sess-v2")).expect("read");
        let last = entries.last().expect("entries");
        assert_eq!(
            last.event.kind,
            EventKind::Left {
                reason: LeaveReason::NodeRecovered
            },
            "[{backend}]"
        );
        assert_eq!(last.event.at, start + time::Duration::minutes(10));
        assert!(ledger.verify().expect("verify").is_intact(), "[{backend}]");
        // The upgraded ledger records stays by node again.
        drop(ledger);
        let mut again = Ledger::open_at(&location).expect("reopen");
        assert_eq!(again.recover(&node).expect("recover").stays_closed, 0);
    }
}

/// The env var that turns `crash_child_writer` into the writer process.
const CHILD_ENV: &str = "HAVEN_CRASH_CHILD_LOCATION";

/// Not a test on its own: the child process of `kill_9_loses_no_acknowledged_event`.
/// Appends from 16 tasks and prints `ack <participant>` after each acknowledged append.
#[test]
#[ignore = "runs only as the child of kill_9_loses_no_acknowledged_event"]
fn crash_child_writer() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let location = match spec.split_once('|') {
        Some((url, schema)) => Location::Postgres {
            url: url.into(),
            schema: Some(schema.into()),
        },
        None => Location::SqliteFile(spec.into()),
    };
    let ledger = Ledger::open_at(&location).expect("open");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let handle = LedgerHandle::spawn(ledger);
        let mut tasks = Vec::new();
        for task in 0..16 {
            let h = handle.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0.. {
                    let who = format!("p-{task}x{n}");
                    let e = Event::participant(
                        sid("sess-kill"),
                        pid(&who),
                        Role::Client,
                        EventKind::Admitted,
                        datetime!(2026-03-02 09:00 UTC),
                    );
                    h.append(e).await.expect("append");
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "ack {who}");
                    let _ = out.flush();
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[test]
fn kill_9_loses_no_acknowledged_event() {
    for (backend, location, _dir) in locations() {
        let spec = match &location {
            Location::SqliteFile(p) => p.display().to_string(),
            Location::Postgres { url, schema } => {
                format!("{url}|{}", schema.as_deref().expect("schema"))
            }
            Location::InMemory => unreachable!(),
        };
        // Create the schema first, so the child only appends.
        drop(Ledger::open_at(&location).expect("open"));

        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "crash_child_writer", "--ignored", "--nocapture"])
            .env(CHILD_ENV, &spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        let stdout = child.stdout.take().expect("piped");
        let mut acked = HashSet::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("line");
            if let Some(who) = line.strip_prefix("ack ") {
                acked.insert(who.to_owned());
                if acked.len() >= 3000 {
                    break;
                }
            }
        }
        // SIGKILL, in the middle of appends.
        child.kill().expect("kill -9");
        let _ = child.wait();

        let mut ledger = Ledger::open_at(&location).expect("reopen");
        let report = ledger.verify().expect("verify");
        assert!(report.is_intact(), "[{backend}] {report:?}");
        let stored: HashSet<String> = ledger
            .session_events(&sid("sess-kill"))
            .expect("read")
            .into_iter()
            .filter_map(|e| e.event.participant_id.map(|p| p.as_str().to_owned()))
            .collect();
        let lost: Vec<_> = acked.difference(&stored).collect();
        println!(
            "figure: kill -9 [{backend}]: {} acknowledged, {} stored, {} lost",
            acked.len(),
            stored.len(),
            lost.len()
        );
        assert!(lost.is_empty(), "[{backend}] lost {lost:?}");
    }
}
