//! Attendance benchmarks: ingest through the `LedgerHandle` (group commit) on SQLite, and a
//! program-week report for 500 clients from a year of data.
//!
//! Run with `cargo bench -p haven-attendance`; figures go to `docs/benchmarks.md`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use haven_attendance::{
    program_week, AttendanceRules, Event, EventKind, IsoWeek, LeaveReason, Ledger, LedgerHandle,
};
use haven_ids::{ParticipantId, Role, SessionId, SessionKind};
use time::macros::datetime;

/// Events per ingest iteration, sent by `WRITERS` concurrent tasks (a busy node: every
/// participant's connection task records its own events).
const EVENTS: usize = 20_000;
const WRITERS: usize = 1000;

fn ingest(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("attendance");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("ingest_sqlite_20k_events", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("temp dir");
                let ledger = Ledger::open(&dir.path().join("ledger.sqlite3")).expect("open");
                (dir, LedgerHandle::spawn(ledger))
            },
            |(_dir, handle)| {
                rt.block_on(async {
                    let mut tasks = Vec::new();
                    for w in 0..WRITERS {
                        let h = handle.clone();
                        tasks.push(tokio::spawn(async move {
                            for n in 0..EVENTS / WRITERS {
                                let e = Event::participant(
                                    SessionId::parse(&format!("sess-{}", w % 16)).expect("id"),
                                    ParticipantId::parse(&format!("p-{w}x{n}")).expect("id"),
                                    Role::Client,
                                    EventKind::MediaConnected,
                                    datetime!(2026-03-02 09:00 UTC),
                                );
                                h.append(e).await.expect("append");
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.expect("task");
                    }
                })
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// A year of one program: 500 clients in 50 groups of 10, each group meeting three times a
/// week for three hours with one therapist.
fn year_of_data(ledger: &mut Ledger) {
    let start = datetime!(2025-03-03 14:00 UTC);
    let mut batch = Vec::new();
    for week in 0..52 {
        for day in [0, 2, 4] {
            for group in 0..50 {
                let begin = start + time::Duration::days(week * 7 + day);
                let session = SessionId::parse(&format!("sess-w{week}d{day}g{group}")).expect("id");
                let opened = EventKind::SessionOpened {
                    kind: SessionKind::Group,
                    starts_at: begin,
                    ends_at: begin + time::Duration::hours(3),
                    program: Some("iop-adult".into()),
                };
                batch.push(Event::session(session.clone(), opened, begin));
                let mut people = vec![(format!("t-{group}"), Role::Therapist)];
                people.extend((0..10).map(|i| (format!("p-{}", group * 10 + i), Role::Client)));
                for (k, (who, role)) in people.into_iter().enumerate() {
                    let p = ParticipantId::parse(&who).expect("id");
                    let late = time::Duration::minutes((k % 4) as i64 * 5);
                    let ev =
                        |kind, at| Event::participant(session.clone(), p.clone(), role, kind, at);
                    batch.push(ev(EventKind::Admitted, begin + late));
                    batch.push(ev(EventKind::MediaConnected, begin + late));
                    let left = EventKind::Left {
                        reason: LeaveReason::Left,
                    };
                    batch.push(ev(left, begin + time::Duration::hours(3)));
                }
            }
        }
        for r in ledger.append_batch(std::mem::take(&mut batch)) {
            r.expect("append");
        }
    }
}

fn program_week_report(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ledger = Ledger::open(&dir.path().join("ledger.sqlite3")).expect("open");
    let t = Instant::now();
    year_of_data(&mut ledger);
    eprintln!(
        "year of data: {} entries written in {:?}",
        ledger.count().expect("count"),
        t.elapsed()
    );
    let rules = AttendanceRules::default();
    let week = IsoWeek::parse("2025-W40").expect("week");
    let r = program_week(&mut ledger, &rules, "iop-adult", week).expect("report");
    assert_eq!(r.clients.len(), 500);

    let mut group = c.benchmark_group("attendance");
    group.sample_size(20);
    group.bench_function("program_week_500_clients_year_sqlite", |b| {
        b.iter(|| program_week(&mut ledger, &rules, "iop-adult", week).expect("report"))
    });
    group.finish();
}

criterion_group!(benches, ingest, program_week_report);
criterion_main!(benches);
