//! The scenario table of issue 5: each scenario with the exact credited seconds, run against
//! every backend (SQLite always; PostgreSQL when `HAVEN_TEST_DATABASE_URL` is set).

mod common;

use common::{backends, locations, pid, Script};
use haven_attendance::{
    client_weeks, session_report, AttendanceRules, CountingRules, EventKind, IsoWeek, LeaveReason,
    Ledger, Modality, NodeId, ProgramRules, Status,
};
use haven_ids::Role;
use time::macros::datetime;
use time::OffsetDateTime;

const NINE: OffsetDateTime = datetime!(2026-03-02 09:00 UTC);
const T: Role = Role::Therapist;
const C: Role = Role::Client;

/// The client's credited and audio-only seconds and stays in the script's session.
fn outcome(ledger: &mut Ledger, s: &Script, who: &str) -> (f64, f64, Vec<Option<LeaveReason>>) {
    let entries = ledger.session_events(&s.session).expect("read");
    let r = session_report(&entries, &CountingRules::default());
    let p = r
        .participants
        .iter()
        .find(|p| p.participant_id.as_str() == who)
        .expect("participant in report");
    (
        p.credited_seconds,
        p.credited_audio_only_seconds,
        p.stays.iter().map(|s| s.end_reason).collect(),
    )
}

fn lost(s: &mut Script, who: &str, min: f64) {
    s.p(who, C, min, EventKind::MediaLost);
}

fn restored(s: &mut Script, who: &str, min: f64) {
    s.p(who, C, min, EventKind::MediaRestored);
}

struct Case {
    name: &'static str,
    build: fn(&mut Script),
    who: &'static str,
    credited: f64,
    audio_only: f64,
    stays: usize,
}

const LEFT: LeaveReason = LeaveReason::Left;

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "on time",
            build: |s| {
                s.stay("t-01", T, 0.0, 60.0).stay("p-01", C, 0.0, 60.0);
            },
            who: "p-01",
            credited: 3600.0,
            audio_only: 0.0,
            stays: 1,
        },
        Case {
            name: "late join",
            build: |s| {
                s.stay("t-01", T, 0.0, 60.0).stay("p-01", C, 12.0, 60.0);
            },
            who: "p-01",
            credited: 2880.0,
            audio_only: 0.0,
            stays: 1,
        },
        Case {
            name: "early leave",
            build: |s| {
                s.stay("t-01", T, 0.0, 60.0).stay("p-01", C, 0.0, 45.0);
            },
            who: "p-01",
            credited: 2700.0,
            audio_only: 0.0,
            stays: 1,
        },
        Case {
            name: "2-second drop resumed",
            build: |s| {
                s.stay("t-01", T, 0.0, 60.0).stay("p-01", C, 0.0, 60.0);
                lost(s, "p-01", 20.0);
                restored(s, "p-01", 20.0 + 2.0 / 60.0);
            },
            who: "p-01",
            credited: 3598.0,
            audio_only: 0.0,
            stays: 1,
        },
        Case {
            name: "drop past grace",
            build: |s| {
                s.stay("t-01", T, 0.0, 60.0).stay("p-01", C, 0.0, 60.0);
                lost(s, "p-01", 20.0);
                restored(s, "p-01", 25.0);
            },
            who: "p-01",
            credited: 3300.0,
            audio_only: 0.0,
            stays: 2,
        },
        Case {
            name: "therapist absent for ten minutes",
            build: |s| {
                s.stay("t-01", T, 0.0, 60.0).stay("p-01", C, 0.0, 60.0);
                s.p("t-01", T, 20.0, EventKind::MediaLost).p(
                    "t-01",
                    T,
                    30.0,
                    EventKind::MediaRestored,
                );
            },
            who: "p-01",
            credited: 3000.0,
            audio_only: 0.0,
            stays: 1,
        },
        Case {
            name: "therapist leaves early",
            build: |s| {
                s.stay("t-01", T, 0.0, 40.0).stay("p-01", C, 0.0, 60.0);
            },
            who: "p-01",
            credited: 2400.0,
            audio_only: 0.0,
            stays: 1,
        },
        Case {
            name: "sponsor present (client)",
            build: |s| {
                s.stay("t-01", T, 0.0, 60.0)
                    .stay("p-01", C, 0.0, 60.0)
                    .stay("s-01", Role::Sponsor, 0.0, 60.0);
            },
            who: "p-01",
            credited: 3600.0,
            audio_only: 0.0,
            stays: 1,
        },
        Case {
            name: "sponsor present (sponsor)",
            build: |s| {
                s.stay("t-01", T, 0.0, 60.0)
                    .stay("p-01", C, 0.0, 60.0)
                    .stay("s-01", Role::Sponsor, 0.0, 60.0);
            },
            who: "s-01",
            credited: 0.0,
            audio_only: 0.0,
            stays: 1,
        },
        Case {
            name: "audio-only stretch",
            build: |s| {
                s.stay("t-01", T, 0.0, 60.0).stay("p-01", C, 0.0, 60.0);
                let audio = EventKind::ModalityChanged {
                    modality: Modality::AudioOnly,
                };
                let video = EventKind::ModalityChanged {
                    modality: Modality::Video,
                };
                s.p("p-01", C, 10.0, audio).p("p-01", C, 25.0, video);
            },
            who: "p-01",
            credited: 3600.0,
            audio_only: 900.0,
            stays: 1,
        },
        Case {
            name: "session running past its allowance",
            build: |s| {
                s.stay("t-01", T, 0.0, 90.0).stay("p-01", C, 0.0, 90.0);
            },
            who: "p-01",
            credited: 4500.0,
            audio_only: 0.0,
            stays: 1,
        },
    ]
}

#[test]
fn scenario_table_credits_exact_seconds_on_every_backend() {
    for (backend, mut ledger, _dir) in backends() {
        for (i, case) in cases().into_iter().enumerate() {
            let mut s = Script::new(&format!("sess-{i:02}"), "iop-adult", NINE, 60);
            (case.build)(&mut s);
            s.write(&mut ledger);

            let (credited, audio, stays) = outcome(&mut ledger, &s, case.who);
            println!(
                "scenario [{backend}] {:<36} credited {credited:>7.1} s",
                case.name
            );
            assert_eq!(credited, case.credited, "[{backend}] {}", case.name);
            assert_eq!(audio, case.audio_only, "[{backend}] {}", case.name);
            assert_eq!(
                stays.len(),
                case.stays,
                "[{backend}] {}: {stays:?}",
                case.name
            );
        }
        assert!(ledger.verify().expect("verify").is_intact(), "[{backend}]");
    }
}

#[test]
fn drop_past_grace_ends_the_first_stay_as_connection_lost() {
    for (backend, mut ledger, _dir) in backends() {
        let mut s = Script::new("sess-grace", "iop-adult", NINE, 60);
        s.stay("t-01", T, 0.0, 60.0).stay("p-01", C, 0.0, 60.0);
        lost(&mut s, "p-01", 20.0);
        restored(&mut s, "p-01", 25.0);
        s.write(&mut ledger);

        let (_, _, stays) = outcome(&mut ledger, &s, "p-01");
        assert_eq!(
            stays,
            [Some(LeaveReason::ConnectionLost), Some(LEFT)],
            "[{backend}]"
        );
    }
}

fn new_york_rules() -> AttendanceRules {
    let mut rules = AttendanceRules::default();
    rules.programs.insert(
        "iop-ny".into(),
        ProgramRules {
            time_zone: "America/New_York".into(),
            ..ProgramRules::default()
        },
    );
    rules
}

/// `(date, credited seconds)` of each day of the client's weeks.
fn days(ledger: &mut Ledger, rules: &AttendanceRules, week: &str) -> Vec<(String, f64)> {
    let w = IsoWeek::parse(week).expect("week");
    let r = client_weeks(ledger, rules, &pid("p-01"), w, w).expect("weeks");
    r.weeks[0]
        .days
        .iter()
        .map(|d| (d.date.to_string(), d.credited_seconds))
        .collect()
}

#[test]
fn two_sessions_in_a_day_add_up_on_that_day() {
    for (backend, mut ledger, _dir) in backends() {
        for (id, start) in [
            ("sess-am", datetime!(2026-03-03 14:00 UTC)),
            ("sess-pm", datetime!(2026-03-03 19:00 UTC)),
        ] {
            let mut s = Script::new(id, "iop-ny", start, 60);
            s.stay("t-01", T, 0.0, 60.0).stay("p-01", C, 0.0, 60.0);
            s.write(&mut ledger);
        }

        let d = days(&mut ledger, &new_york_rules(), "2026-W10");
        assert_eq!(d, [("2026-03-03".to_string(), 7200.0)], "[{backend}]");
    }
}

#[test]
fn stay_crossing_midnight_in_the_program_zone_counts_on_both_days() {
    for (backend, mut ledger, _dir) in backends() {
        // 23:30 to 00:30 in New York (EST, UTC-5).
        let mut s = Script::new("sess-late", "iop-ny", datetime!(2026-03-04 04:30 UTC), 60);
        s.stay("t-01", T, 0.0, 60.0).stay("p-01", C, 0.0, 60.0);
        s.write(&mut ledger);

        let d = days(&mut ledger, &new_york_rules(), "2026-W10");
        assert_eq!(
            d,
            [
                ("2026-03-03".to_string(), 1800.0),
                ("2026-03-04".to_string(), 1800.0)
            ],
            "[{backend}]"
        );
    }
}

#[test]
fn week_with_a_daylight_saving_change_counts_real_elapsed_time() {
    for (backend, mut ledger, _dir) in backends() {
        // Monday and Wednesday 18:00-21:00 EST; Sunday 8 March 01:00 EST to 04:00 EDT, which
        // is two real hours because clocks jump from 02:00 to 03:00.
        let sessions = [
            ("sess-mon", datetime!(2026-03-02 23:00 UTC), 180),
            ("sess-wed", datetime!(2026-03-04 23:00 UTC), 180),
            ("sess-sun", datetime!(2026-03-08 06:00 UTC), 120),
        ];
        for (id, start, minutes) in sessions {
            let mut s = Script::new(id, "iop-ny", start, minutes);
            let m = minutes as f64;
            s.stay("t-01", T, 0.0, m).stay("p-01", C, 0.0, m);
            s.write(&mut ledger);
        }
        let rules = new_york_rules();
        let w = IsoWeek::parse("2026-W10").expect("week");
        let r = client_weeks(&mut ledger, &rules, &pid("p-01"), w, w).expect("weeks");

        let week = &r.weeks[0];
        assert_eq!(week.credited_seconds, 8.0 * 3600.0, "[{backend}]");
        assert_eq!(week.required_seconds, 9.0 * 3600.0, "[{backend}]");
        assert_eq!(week.status, Status::Short, "[{backend}]");
        let sunday = week.days.last().expect("a Sunday line");
        assert_eq!(sunday.date.to_string(), "2026-03-08");
        assert_eq!(sunday.credited_seconds, 7200.0, "[{backend}]");
    }
}

#[test]
fn node_killed_mid_session_is_closed_at_its_last_heartbeat() {
    for (backend, location, _dir) in locations() {
        let node = NodeId::parse("node-a").expect("valid id");
        let mut s = Script::new("sess-crash", "iop-adult", NINE, 60);
        s.p("t-01", T, 0.0, EventKind::Admitted)
            .p("t-01", T, 0.0, EventKind::MediaConnected)
            .p("p-01", C, 0.0, EventKind::Admitted)
            .p("p-01", C, 0.0, EventKind::MediaConnected);
        {
            let mut ledger = Ledger::open_at(&location).expect("open");
            ledger.recover(&node).expect("start-up recovery");
            s.write(&mut ledger);
            ledger.heartbeat_at(&node, s.at(20.0)).expect("heartbeat");
            ledger.heartbeat_at(&node, s.at(30.0)).expect("heartbeat");
            // Killed here: nothing else is written.
        }

        let mut ledger = Ledger::open_at(&location).expect("reopen");
        let report = ledger.recover(&node).expect("recovery");
        assert_eq!(report.stays_closed, 2, "[{backend}]");
        assert_eq!(report.last_heartbeat, Some(s.at(30.0)), "[{backend}]");

        let (credited, _, stays) = outcome(&mut ledger, &s, "p-01");
        println!(
            "scenario [{backend}] node killed and restarted        credited {credited:>7.1} s"
        );
        assert_eq!(credited, 1800.0, "[{backend}]");
        assert_eq!(stays, [Some(LeaveReason::NodeRecovered)], "[{backend}]");

        // A second start closes nothing more.
        let again = ledger.recover(&node).expect("recovery");
        assert_eq!(again.stays_closed, 0, "[{backend}]");
        assert!(ledger.verify().expect("verify").is_intact(), "[{backend}]");
    }
}

#[test]
fn recovery_leaves_other_nodes_sessions_alone() {
    for (backend, location, _dir) in locations() {
        let (a, b) = (
            NodeId::parse("node-a").expect("id"),
            NodeId::parse("node-b").expect("id"),
        );
        let mut s = Script::new("sess-b", "iop-adult", NINE, 60);
        s.p("p-01", C, 0.0, EventKind::Admitted);
        let mut on_b = Ledger::open_at(&location).expect("open");
        on_b.recover(&b).expect("recover b");
        s.write(&mut on_b);

        let mut on_a = Ledger::open_at(&location).expect("open");
        let report = on_a.recover(&a).expect("recover a");
        assert_eq!(report.stays_closed, 0, "[{backend}]");
    }
}
