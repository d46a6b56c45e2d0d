//! Shared helpers: the backends every scenario runs against, and a script builder.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use haven_attendance::{Event, EventKind, LeaveReason, Ledger, Location};
use haven_ids::{ParticipantId, Role, SessionId, SessionKind};
use time::{Duration, OffsetDateTime};

/// Env var naming a PostgreSQL the tests may create schemas in.
pub const ENV_PG: &str = "HAVEN_TEST_DATABASE_URL";

/// A fresh empty ledger on each backend available: SQLite always, PostgreSQL when
/// `HAVEN_TEST_DATABASE_URL` is set (each call gets its own schema).
pub fn backends() -> Vec<(&'static str, Ledger, Option<tempfile::TempDir>)> {
    locations()
        .into_iter()
        .map(|(name, loc, dir)| (name, Ledger::open_at(&loc).expect("open ledger"), dir))
        .collect()
}

/// Where a fresh ledger can be opened (and reopened) on each backend available.
pub fn locations() -> Vec<(&'static str, Location, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ledger.sqlite3");
    let mut out = vec![("sqlite", Location::SqliteFile(path), Some(dir))];
    if let Some(loc) = pg_location() {
        out.push(("postgresql", loc, None));
    }
    out
}

/// A new schema in the test PostgreSQL, or `None` (with a loud message) without one.
pub fn pg_location() -> Option<Location> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    match std::env::var(ENV_PG) {
        Ok(url) if !url.is_empty() => {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
            let schema = format!("t{}_{}_{n}", std::process::id(), nanos % 1_000_000_000);
            Some(Location::Postgres {
                url,
                schema: Some(schema),
            })
        }
        _ => {
            eprintln!(
                "!!! SKIPPING PostgreSQL: {ENV_PG} is not set; these tests ran on SQLite only !!!"
            );
            None
        }
    }
}

pub fn sid(s: &str) -> SessionId {
    SessionId::parse(s).expect("valid test id")
}

pub fn pid(s: &str) -> ParticipantId {
    ParticipantId::parse(s).expect("valid test id")
}

/// Builds a session's events: times are minutes after `start`.
pub struct Script {
    pub session: SessionId,
    pub start: OffsetDateTime,
    pub events: Vec<Event>,
}

impl Script {
    /// A session scheduled `start` to `start + minutes`, opened five minutes early.
    pub fn new(session: &str, program: &str, start: OffsetDateTime, minutes: i64) -> Self {
        let mut s = Script {
            session: sid(session),
            start,
            events: Vec::new(),
        };
        let opened = EventKind::SessionOpened {
            kind: SessionKind::Group,
            starts_at: start,
            ends_at: start + Duration::minutes(minutes),
            program: Some(program.into()),
        };
        s.events.push(Event::session(
            s.session.clone(),
            opened,
            start - Duration::minutes(5),
        ));
        s
    }

    pub fn at(&self, min: f64) -> OffsetDateTime {
        self.start + Duration::seconds_f64(min * 60.0)
    }

    pub fn p(&mut self, who: &str, role: Role, min: f64, kind: EventKind) -> &mut Self {
        let e = Event::participant(self.session.clone(), pid(who), role, kind, self.at(min));
        self.events.push(e);
        self
    }

    /// Admitted and media connected at `from`, left at `to`.
    pub fn stay(&mut self, who: &str, role: Role, from: f64, to: f64) -> &mut Self {
        self.p(who, role, from, EventKind::Admitted)
            .p(who, role, from, EventKind::MediaConnected)
            .p(
                who,
                role,
                to,
                EventKind::Left {
                    reason: LeaveReason::Left,
                },
            )
    }

    pub fn end(&mut self, min: f64) -> &mut Self {
        let e = Event::session(self.session.clone(), EventKind::SessionEnded, self.at(min));
        self.events.push(e);
        self
    }

    pub fn write(&self, ledger: &mut Ledger) {
        for r in ledger.append_batch(self.events.clone()) {
            r.expect("append");
        }
    }
}
