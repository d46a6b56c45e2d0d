//! Prometheus metrics on `/metrics`: each participant's connection as the rooms last reported
//! it, and node totals.
//!
//! Labels carry only the pseudonymous session and participant ids, never display names or
//! addresses. The endpoint answers requests from loopback only, as a scraper running beside
//! the server would make them; anything else gets 403, because even pseudonymous ids tell who
//! attended what.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use haven_ids::{ParticipantId, SessionId};
use sfu::{Layer, ParticipantQuality};

#[derive(Debug, Default)]
pub struct Metrics {
    sessions: Mutex<HashMap<SessionId, Vec<ParticipantQuality>>>,
}

impl Metrics {
    /// Replaces what is known about a session's room with its latest report.
    pub fn update_session(&self, session: &SessionId, report: &[ParticipantQuality]) {
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(session.clone(), report.to_vec());
        }
    }

    pub fn remove_session(&self, session: &SessionId) {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(session);
        }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let sessions = match self.sessions.lock() {
            Ok(s) => s.clone(),
            Err(_) => HashMap::new(),
        };
        let mut rows: Vec<(&SessionId, &ParticipantQuality)> = sessions
            .iter()
            .flat_map(|(s, ps)| ps.iter().map(move |p| (s, p)))
            .collect();
        rows.sort_by(|a, b| {
            (a.0.as_str(), a.1.participant.as_str()).cmp(&(b.0.as_str(), b.1.participant.as_str()))
        });

        let mut out = String::new();
        gauge(
            &mut out,
            "haven_sessions",
            "Sessions with a room open on this node.",
            sessions.len() as f64,
        );
        gauge(
            &mut out,
            "haven_participants",
            "Participants in rooms on this node.",
            rows.len() as f64,
        );
        let audio_only = rows.iter().filter(|(_, p)| p.audio_only.is_some()).count();
        gauge(
            &mut out,
            "haven_participants_audio_only",
            "Participants receiving no video (asked for audio only, or too little bandwidth).",
            audio_only as f64,
        );

        type Field = fn(&ParticipantQuality) -> Option<f64>;
        let per_participant: [(&str, &str, Field); 8] = [
            (
                "haven_participant_bitrate_in_bps",
                "Bits per second the participant sends to the server.",
                |p| p.bitrate_in_bps.map(|v| v as f64),
            ),
            (
                "haven_participant_bitrate_out_bps",
                "Bits per second the server sends to the participant.",
                |p| p.bitrate_out_bps.map(|v| v as f64),
            ),
            (
                "haven_participant_loss_in_ratio",
                "Fraction of the participant's packets lost on the way in.",
                |p| p.loss_in.map(f64::from),
            ),
            (
                "haven_participant_loss_out_ratio",
                "Fraction of packets to the participant lost on the way out.",
                |p| p.loss_out.map(f64::from),
            ),
            (
                "haven_participant_rtt_seconds",
                "Round-trip time to the participant.",
                |p| p.rtt.map(|d| d.as_secs_f64()),
            ),
            (
                "haven_participant_estimate_bps",
                "Bandwidth estimate toward the participant.",
                |p| p.estimate_bps.map(|v| v as f64),
            ),
            (
                "haven_participant_layer",
                "Best simulcast layer received: 0 none, 1 low, 2 medium, 3 high.",
                |p| {
                    Some(match p.layer {
                        None => 0.0,
                        Some(Layer::Low) => 1.0,
                        Some(Layer::Medium) => 2.0,
                        Some(Layer::High) => 3.0,
                    })
                },
            ),
            (
                "haven_participant_audio_only",
                "1 when the participant receives no video.",
                |p| Some(if p.audio_only.is_some() { 1.0 } else { 0.0 }),
            ),
        ];
        for (name, help, field) in per_participant {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (session, p) in &rows {
                if let Some(v) = field(p) {
                    let _ = writeln!(
                        out,
                        "{name}{{session_id=\"{}\",participant_id=\"{}\"}} {v}",
                        escape(session.as_str()),
                        escape(p.participant.as_str())
                    );
                }
            }
        }
        out
    }

    /// The participants currently reported, for tests.
    pub fn participants(&self) -> Vec<ParticipantId> {
        match self.sessions.lock() {
            Ok(s) => s
                .values()
                .flatten()
                .map(|p| p.participant.clone())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn renders_participants_without_names_or_addresses() {
        let m = Metrics::default();
        let s = SessionId::parse("s-001").expect("valid id");
        let q = ParticipantQuality {
            participant: ParticipantId::parse("p-02").expect("valid id"),
            bitrate_in_bps: Some(812_000),
            bitrate_out_bps: None,
            loss_in: Some(0.25),
            loss_out: None,
            rtt: Some(Duration::from_millis(12)),
            estimate_bps: Some(2_000_000),
            layer: Some(Layer::Medium),
            audio_only: None,
        };
        m.update_session(&s, &[q]);
        let text = m.render();
        assert!(text.contains(
            "haven_participant_bitrate_in_bps{session_id=\"s-001\",participant_id=\"p-02\"} 812000"
        ));
        assert!(text
            .contains("haven_participant_layer{session_id=\"s-001\",participant_id=\"p-02\"} 2"));
        assert!(text.contains(
            "haven_participant_rtt_seconds{session_id=\"s-001\",participant_id=\"p-02\"} 0.012"
        ));
        assert!(
            !text.contains("haven_participant_bitrate_out_bps{"),
            "unknown values are left out"
        );
        assert!(text.contains("haven_participants 1\n"));
        m.remove_session(&s);
        assert!(m.render().contains("haven_participants 0\n"));
    }
}
