//! Program rules as configuration: requirements by level of care and age group, daily floor,
//! step-down allowance, time zone; and the rounding options for payers.
//!
//! Read from the `[attendance]` table of a TOML file, for example:
//!
//! ```toml
//! grace_seconds = 30
//! overrun_minutes = 15
//! rounding = "none"            # or "fifteen_minute_units", "midpoint_bands"
//!
//! [requirements."2.1"]         # ASAM level of care
//! adult_hours = 9
//! adolescent_hours = 6
//!
//! [programs.iop-adult]
//! level = "2.1"
//! time_zone = "America/New_York"
//! daily_floor_hours = 3        # optional
//! step_down_weeks = 2          # short weeks after a met week that count as step-down
//! ```
//!
//! Every rule and its reason is in `docs/attendance.md`.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};
use time::Duration;

use crate::{AgeGroup, CountingRules};

/// Everything the attendance reports are configured with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttendanceRules {
    /// The longest media drop that keeps one stay.
    pub grace_seconds: u32,
    /// How long after the scheduled end still counts.
    pub overrun_minutes: u32,
    /// How reports round each session's credited minutes for payers.
    pub rounding: Rounding,
    /// Weekly hours by level of care.
    pub requirements: BTreeMap<String, Requirement>,
    /// Rules of programs not listed in `programs`, and of sessions without a program.
    pub default_program: ProgramRules,
    pub programs: BTreeMap<String, ProgramRules>,
}

/// Weekly hours at one level of care.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub adult_hours: f64,
    pub adolescent_hours: f64,
}

/// The rules of one program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProgramRules {
    /// ASAM level of care, a key of `requirements`.
    pub level: String,
    /// IANA name; days and ISO weeks are the program's local ones.
    pub time_zone: String,
    /// Hours each service day must reach, if the program sets a floor.
    pub daily_floor_hours: Option<f64>,
    /// How many consecutive short weeks after a met week count as step-down.
    pub step_down_weeks: u32,
}

impl Default for ProgramRules {
    fn default() -> Self {
        ProgramRules {
            level: "2.1".into(),
            time_zone: "UTC".into(),
            daily_floor_hours: None,
            step_down_weeks: 0,
        }
    }
}

impl Default for AttendanceRules {
    fn default() -> Self {
        let mut requirements = BTreeMap::new();
        requirements.insert(
            "2.1".into(),
            Requirement {
                adult_hours: 9.0,
                adolescent_hours: 6.0,
            },
        );
        AttendanceRules {
            grace_seconds: 30,
            overrun_minutes: 15,
            rounding: Rounding::None,
            requirements,
            default_program: ProgramRules::default(),
            programs: BTreeMap::new(),
        }
    }
}

impl AttendanceRules {
    /// Every problem at once: unknown time zones, unknown levels, negative hours.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let programs = std::iter::once(("default_program", &self.default_program))
            .chain(self.programs.iter().map(|(k, v)| (k.as_str(), v)));
        for (name, p) in programs {
            if TimeZone::get(&p.time_zone).is_err() {
                problems.push(format!("{name}: unknown time zone {:?}", p.time_zone));
            }
            if !self.requirements.contains_key(&p.level) {
                problems.push(format!("{name}: no requirement for level {:?}", p.level));
            }
            if p.daily_floor_hours
                .is_some_and(|h| !(0.0..=24.0).contains(&h))
            {
                problems.push(format!("{name}: daily_floor_hours must be 0 to 24"));
            }
        }
        for (level, r) in &self.requirements {
            for h in [r.adult_hours, r.adolescent_hours] {
                if !(0.0..=168.0).contains(&h) {
                    problems.push(format!("requirement {level}: hours must be 0 to 168"));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The counting rules for one session.
    pub fn counting(&self) -> CountingRules {
        CountingRules {
            overrun_allowance: Duration::minutes(self.overrun_minutes.into()),
            grace: Duration::seconds(self.grace_seconds.into()),
        }
    }

    /// The rules of a program (the defaults for an unknown or missing one).
    pub fn program(&self, program: Option<&str>) -> &ProgramRules {
        program
            .and_then(|p| self.programs.get(p))
            .unwrap_or(&self.default_program)
    }

    /// The program's time zone; UTC if the name is unknown (`validate` reports that).
    pub fn time_zone(&self, program: Option<&str>) -> TimeZone {
        TimeZone::get(&self.program(program).time_zone).unwrap_or(TimeZone::UTC)
    }

    /// Weekly requirement in seconds. A client whose age group was never recorded is held to
    /// the adult requirement, the higher one, so a missing record never shows a week as met.
    pub fn weekly_seconds(&self, program: Option<&str>, age: Option<AgeGroup>) -> f64 {
        let level = &self.program(program).level;
        let Some(r) = self.requirements.get(level) else {
            return 0.0;
        };
        let hours = match age.unwrap_or(AgeGroup::Adult) {
            AgeGroup::Adult => r.adult_hours,
            AgeGroup::Adolescent => r.adolescent_hours,
        };
        hours * 3600.0
    }
}

/// How a payer wants each session's credited time rounded. Stored data is never rounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// Raw minutes.
    #[default]
    None,
    /// 15-minute units; a unit counts when at least 8 minutes of it were given (the
    /// "8-minute rule" for timed codes).
    FifteenMinuteUnits,
    /// Psychotherapy time bands by midpoint: 16 to 37 minutes bill as 30, 38 to 52 as 45,
    /// 53 or more as 60; under 16 minutes does not bill.
    MidpointBands,
}

impl Rounding {
    pub fn as_str(self) -> &'static str {
        match self {
            Rounding::None => "none",
            Rounding::FifteenMinuteUnits => "fifteen_minute_units",
            Rounding::MidpointBands => "midpoint_bands",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Rounding::None),
            "fifteen_minute_units" => Some(Rounding::FifteenMinuteUnits),
            "midpoint_bands" => Some(Rounding::MidpointBands),
            _ => None,
        }
    }

    /// Billable minutes for one session's credited seconds.
    pub fn minutes(self, seconds: f64) -> f64 {
        let minutes = seconds / 60.0;
        match self {
            Rounding::None => minutes,
            Rounding::FifteenMinuteUnits => {
                let whole = minutes.floor();
                let units = (whole / 15.0).floor();
                let rest = whole - units * 15.0;
                (units + if rest >= 8.0 { 1.0 } else { 0.0 }) * 15.0
            }
            Rounding::MidpointBands => match minutes.floor() as i64 {
                m if m >= 53 => 60.0,
                m if m >= 38 => 45.0,
                m if m >= 16 => 30.0,
                _ => 0.0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_minute_rule_rounds_at_eight() {
        let r = Rounding::FifteenMinuteUnits;
        assert_eq!(r.minutes(7.0 * 60.0 + 59.0), 0.0);
        assert_eq!(r.minutes(8.0 * 60.0), 15.0);
        assert_eq!(r.minutes(22.0 * 60.0 + 59.0), 15.0);
        assert_eq!(r.minutes(23.0 * 60.0), 30.0);
        assert_eq!(r.minutes(60.0 * 60.0), 60.0);
    }

    #[test]
    fn midpoint_bands_follow_the_code_boundaries() {
        let r = Rounding::MidpointBands;
        let at = |m: f64| r.minutes(m * 60.0);
        assert_eq!(
            [
                at(15.9),
                at(16.0),
                at(37.9),
                at(38.0),
                at(52.9),
                at(53.0),
                at(90.0)
            ],
            [0.0, 30.0, 30.0, 45.0, 45.0, 60.0, 60.0]
        );
    }

    #[test]
    fn no_rounding_keeps_fractions() {
        assert_eq!(Rounding::None.minutes(90.0), 1.5);
    }

    #[test]
    fn defaults_are_asam_2_1_and_valid() {
        let rules = AttendanceRules::default();
        assert_eq!(
            rules.weekly_seconds(None, Some(AgeGroup::Adult)),
            9.0 * 3600.0
        );
        assert_eq!(
            rules.weekly_seconds(None, Some(AgeGroup::Adolescent)),
            6.0 * 3600.0
        );
        assert_eq!(rules.weekly_seconds(None, None), 9.0 * 3600.0);
        assert_eq!(rules.validate(), Ok(()));
    }

    #[test]
    fn every_bad_setting_is_reported_together() {
        let mut rules = AttendanceRules::default();
        rules.programs.insert(
            "iop-x".into(),
            ProgramRules {
                level: "9.9".into(),
                time_zone: "Mars/Olympus".into(),
                daily_floor_hours: Some(30.0),
                step_down_weeks: 0,
            },
        );
        let problems = rules.validate().expect_err("invalid");
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = serde_json::from_str::<AttendanceRules>(r#"{"grace_secs": 5}"#);
        assert!(err.is_err());
    }
}
