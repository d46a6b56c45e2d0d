//! The scenario table of issue 5: each scenario with the exact credited seconds, run against
//! every backend (SQLite always; PostgreSQL when `HAVEN_TEST_DATABASE_URL` is set).

mod common;

use common::{backends, locations, pid, Script};
use haven_attendance::{
    client_weeks, session_report, AttendanceRules, CountingRules, Event, EventKind, IsoWeek,
    LeaveReason, Ledger, Location, Modality, NodeId, ProgramRules, RecoveryReport, Status,
};
use haven_ids::Role;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

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

/// `x` whole seconds after the script's start.
fn sec(s: &Script, x: i64) -> OffsetDateTime {
    s.start + Duration::seconds(x)
}

/// Appends one participant event `x` seconds after the script's start.
fn record(ledger: &mut Ledger, s: &Script, who: &str, role: Role, x: i64, kind: EventKind) {
    let e = Event::participant(s.session.clone(), pid(who), role, kind, sec(s, x));
    ledger.append(e).expect("append");
}

fn left() -> EventKind {
    EventKind::Left { reason: LEFT }
}

/// Heartbeats of `node` at each of `times` (seconds), each of which must recover nobody.
fn quiet_heartbeats(ledger: &mut Ledger, node: &NodeId, s: &Script, times: &[i64], tag: &str) {
    for &x in times {
        let recovered = ledger.heartbeat_at(node, sec(s, x)).expect("heartbeat");
        assert!(recovered.is_empty(), "[{tag}] at {x} s: {recovered:?}");
    }
}

/// `node` runs a session with therapist `t-01` and client `p-01`, media from 0 s, heartbeats
/// every 5 s up to `last_heartbeat`, and is killed: nothing else is written.
fn node_killed(location: &Location, node: &NodeId, s: &mut Script, last_heartbeat: i64) {
    s.p("t-01", T, 0.0, EventKind::Admitted)
        .p("t-01", T, 0.0, EventKind::MediaConnected)
        .p("p-01", C, 0.0, EventKind::Admitted)
        .p("p-01", C, 0.0, EventKind::MediaConnected);
    let mut ledger = Ledger::open_at(location).expect("open");
    ledger.recover(node).expect("start-up recovery");
    s.write(&mut ledger);
    let times: Vec<i64> = (0..=last_heartbeat).step_by(5).collect();
    quiet_heartbeats(&mut ledger, node, s, &times, node.as_str());
}

/// Whether the participant is in the room at the end of the ledger (admitted, no stay ended
/// since).
fn in_room(ledger: &mut Ledger, s: &Script, who: &str) -> bool {
    let entries = ledger.session_events(&s.session).expect("read");
    let r = session_report(&entries, &CountingRules::default());
    r.participants
        .iter()
        .any(|p| p.participant_id.as_str() == who && p.left_at.is_none())
}

/// The `at` of every `node_recovered` entry of the session.
fn recovered_at(ledger: &mut Ledger, s: &Script) -> Vec<OffsetDateTime> {
    ledger
        .session_events(&s.session)
        .expect("read")
        .iter()
        .filter(|e| {
            e.event.kind
                == EventKind::Left {
                    reason: LeaveReason::NodeRecovered,
                }
        })
        .map(|e| e.event.at)
        .collect()
}

/// The reported case: 15 s of media, the node killed, the server restarted under another
/// node id, a therapist back 45 s later. The old node's stays end at its last heartbeat.
#[test]
fn node_gone_under_another_id_is_closed_at_its_last_heartbeat() {
    for (backend, location, _dir) in locations() {
        let (one, two) = (
            NodeId::parse("haven-1").expect("id"),
            NodeId::parse("haven-2").expect("id"),
        );
        let mut s = Script::new("sess-renamed", "iop-adult", NINE, 60);
        node_killed(&location, &one, &mut s, 15);

        let mut ledger = Ledger::open_at(&location).expect("reopen");
        let report = ledger.recover(&two).expect("start-up recovery");
        assert_eq!(report.stays_closed, 0, "[{backend}] haven-1 may be running");
        // haven-2's heartbeats from 17 s: haven-1 is judged once silent for 30 s of them.
        quiet_heartbeats(
            &mut ledger,
            &two,
            &s,
            &[17, 22, 27, 32, 37, 42, 46],
            backend,
        );
        assert!(recovered_at(&mut ledger, &s).is_empty(), "[{backend}]");
        assert!(in_room(&mut ledger, &s, "p-01"), "[{backend}]");

        let recovered = ledger.heartbeat_at(&two, sec(&s, 47)).expect("heartbeat");
        let expected = RecoveryReport {
            last_heartbeat: Some(sec(&s, 15)),
            sessions: 1,
            stays_closed: 2,
        };
        assert_eq!(recovered, [(one.clone(), expected)], "[{backend}]");
        assert_eq!(
            recovered_at(&mut ledger, &s),
            [sec(&s, 15), sec(&s, 15)],
            "[{backend}]"
        );

        // The therapist comes back on haven-2 at 60 s; the client does not.
        record(&mut ledger, &s, "t-01", T, 60, EventKind::Admitted);
        record(&mut ledger, &s, "t-01", T, 60, EventKind::MediaConnected);
        record(&mut ledger, &s, "t-01", T, 120, left());
        let (credited, _, stays) = outcome(&mut ledger, &s, "p-01");
        println!(
            "scenario [{backend}] node gone, restarted as another  credited {credited:>7.1} s"
        );
        assert_eq!(credited, 15.0, "[{backend}]");
        assert_eq!(stays, [Some(LeaveReason::NodeRecovered)], "[{backend}]");

        // Nothing is closed twice, and haven-1's old id at start-up finds nothing left.
        quiet_heartbeats(&mut ledger, &two, &s, &[52, 57], backend);
        let mut again = Ledger::open_at(&location).expect("reopen");
        assert_eq!(again.recover(&one).expect("recover").stays_closed, 0);
        assert!(ledger.verify().expect("verify").is_intact(), "[{backend}]");
    }
}

/// The client and therapist rejoin on the new node before the old one is judged: the old
/// stays still end at the old node's last heartbeat, and the new stays are left running.
#[test]
fn stays_of_a_gone_node_end_at_its_heartbeat_even_after_a_rejoin_elsewhere() {
    for (backend, location, _dir) in locations() {
        let (one, two) = (
            NodeId::parse("node-a").expect("id"),
            NodeId::parse("node-b").expect("id"),
        );
        let mut s = Script::new("sess-rejoin", "iop-adult", NINE, 60);
        node_killed(&location, &one, &mut s, 15);

        let mut ledger = Ledger::open_at(&location).expect("reopen");
        ledger.recover(&two).expect("start-up recovery");
        quiet_heartbeats(&mut ledger, &two, &s, &[17], backend);
        for who in [("t-01", T), ("p-01", C)] {
            record(&mut ledger, &s, who.0, who.1, 20, EventKind::Admitted);
            record(&mut ledger, &s, who.0, who.1, 20, EventKind::MediaConnected);
        }
        quiet_heartbeats(&mut ledger, &two, &s, &[22, 27, 32, 37, 42], backend);
        let recovered = ledger.heartbeat_at(&two, sec(&s, 47)).expect("heartbeat");
        assert_eq!(recovered.len(), 1, "[{backend}] {recovered:?}");
        assert_eq!(recovered[0].1.stays_closed, 2, "[{backend}]");

        // The stays on node-b are still open: nothing closed them.
        assert_eq!(
            recovered_at(&mut ledger, &s),
            [sec(&s, 15), sec(&s, 15)],
            "[{backend}]"
        );
        assert!(in_room(&mut ledger, &s, "p-01"), "[{backend}]");
        assert!(in_room(&mut ledger, &s, "t-01"), "[{backend}]");

        record(&mut ledger, &s, "p-01", C, 90, left());
        record(&mut ledger, &s, "t-01", T, 100, left());
        let (credited, _, stays) = outcome(&mut ledger, &s, "p-01");
        // 0 to 15 s on node-a, 20 to 90 s on node-b; not the 5 s between.
        assert_eq!(credited, 85.0, "[{backend}]");
        assert_eq!(
            stays,
            [Some(LeaveReason::NodeRecovered), Some(LEFT)],
            "[{backend}]"
        );
        assert!(ledger.verify().expect("verify").is_intact(), "[{backend}]");
    }
}

/// A node sharing the ledger that keeps its heartbeat fresh keeps its stays, however long
/// another node watches.
#[test]
fn stays_of_a_node_with_a_fresh_heartbeat_are_left_alone() {
    for (backend, location, _dir) in locations() {
        let (a, b) = (
            NodeId::parse("node-a").expect("id"),
            NodeId::parse("node-b").expect("id"),
        );
        let mut s = Script::new("sess-live", "iop-adult", NINE, 60);
        s.stay("t-01", T, 0.0, 60.0)
            .p("p-01", C, 0.0, EventKind::Admitted)
            .p("p-01", C, 0.0, EventKind::MediaConnected);
        let mut on_a = Ledger::open_at(&location).expect("open");
        on_a.recover(&a).expect("recover a");
        s.write(&mut on_a);
        let mut on_b = Ledger::open_at(&location).expect("open");
        on_b.recover(&b).expect("recover b");
        for x in (0..=300).step_by(5) {
            quiet_heartbeats(&mut on_a, &a, &s, &[x], backend);
            quiet_heartbeats(&mut on_b, &b, &s, &[x + 2], backend);
        }
        // node-b restarting closes nothing of node-a's either.
        let mut b_again = Ledger::open_at(&location).expect("open");
        assert_eq!(b_again.recover(&b).expect("recover").stays_closed, 0);
        assert!(in_room(&mut on_b, &s, "p-01"), "[{backend}]");
        assert_eq!(outcome(&mut on_b, &s, "p-01").2, [None], "[{backend}]");
        assert!(recovered_at(&mut on_b, &s).is_empty(), "[{backend}]");
    }
}

/// After an outage of the ledger every node's heartbeat is old; a node judges others only
/// once it has itself been heartbeating again for the stale threshold.
#[test]
fn after_an_outage_no_node_is_judged_until_the_threshold_passes_again() {
    for (backend, location, _dir) in locations() {
        let (a, b) = (
            NodeId::parse("node-a").expect("id"),
            NodeId::parse("node-b").expect("id"),
        );
        let mut s = Script::new("sess-outage", "iop-adult", NINE, 60);
        s.p("t-01", T, 0.0, EventKind::Admitted)
            .p("t-01", T, 0.0, EventKind::MediaConnected);
        let mut on_a = Ledger::open_at(&location).expect("open");
        on_a.recover(&a).expect("recover a");
        s.write(&mut on_a);
        let mut on_b = Ledger::open_at(&location).expect("open");
        on_b.recover(&b).expect("recover b");
        for x in (0..=20).step_by(5) {
            quiet_heartbeats(&mut on_a, &a, &s, &[x], backend);
            quiet_heartbeats(&mut on_b, &b, &s, &[x + 1], backend);
        }
        // No heartbeat from 21 s to 80 s. node-a's is 60 s old, but node-b was silent too.
        quiet_heartbeats(&mut on_b, &b, &s, &[81], backend);
        quiet_heartbeats(&mut on_a, &a, &s, &[83], backend);
        // node-a is killed after 83 s; node-b judges it at 83 + 30 s.
        quiet_heartbeats(&mut on_b, &b, &s, &[86, 91, 96, 101, 106, 111], backend);
        let recovered = on_b.heartbeat_at(&b, sec(&s, 116)).expect("heartbeat");
        assert_eq!(recovered.len(), 1, "[{backend}] {recovered:?}");
        assert_eq!(recovered_at(&mut on_b, &s), [sec(&s, 83)], "[{backend}]");
    }
}

/// A node restarted under its own id closes its own stays in a session that another node
/// took over, and not the other node's.
#[test]
fn restart_under_the_same_id_closes_only_its_own_stays() {
    for (backend, location, _dir) in locations() {
        let (a, b) = (
            NodeId::parse("node-a").expect("id"),
            NodeId::parse("node-b").expect("id"),
        );
        let mut s = Script::new("sess-shared", "iop-adult", NINE, 60);
        node_killed(&location, &a, &mut s, 15);

        let mut on_b = Ledger::open_at(&location).expect("open");
        on_b.recover(&b).expect("recover b");
        quiet_heartbeats(&mut on_b, &b, &s, &[17], backend);
        record(&mut on_b, &s, "p-01", C, 20, EventKind::Admitted);
        record(&mut on_b, &s, "p-01", C, 20, EventKind::MediaConnected);

        let mut on_a = Ledger::open_at(&location).expect("open");
        let report = on_a.recover(&a).expect("recover a");
        assert_eq!(report.stays_closed, 2, "[{backend}]");
        assert_eq!(
            recovered_at(&mut on_a, &s),
            [sec(&s, 15), sec(&s, 15)],
            "[{backend}]"
        );
        assert!(in_room(&mut on_a, &s, "p-01"), "[{backend}] node-b's stay");
    }
}
