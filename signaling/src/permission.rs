//! Who may do what: the one permission table of the signaling server.
//!
//! `docs/tokens.md` shows the same table. Every action a participant asks for goes through
//! [`allowed`], so a new action cannot be added without deciding who may take it.

use haven_ids::Role;

/// Something a participant asks the session to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Enter the media room (directly, or once admitted).
    JoinMedia,
    /// Send and receive audio and video.
    Media,
    Admit,
    Deny,
    Mute,
    Remove,
    EndSession,
    /// Read attendance through the compliance API.
    ReadAttendance,
}

/// The permission table.
pub fn allowed(role: Role, action: Action) -> bool {
    use Action::*;
    match role {
        Role::Therapist => matches!(
            action,
            JoinMedia | Media | Admit | Deny | Mute | Remove | EndSession
        ),
        Role::Client | Role::Sponsor => matches!(action, JoinMedia | Media),
        Role::Auditor => matches!(action, ReadAttendance),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_therapists_run_the_session_and_only_auditors_read_attendance() {
        for action in [
            Action::Admit,
            Action::Deny,
            Action::Mute,
            Action::Remove,
            Action::EndSession,
        ] {
            assert!(allowed(Role::Therapist, action));
            for role in [Role::Client, Role::Sponsor, Role::Auditor] {
                assert!(!allowed(role, action), "{role} must not {action:?}");
            }
        }
        for role in [Role::Client, Role::Sponsor, Role::Therapist] {
            assert!(!allowed(role, Action::ReadAttendance));
            assert!(allowed(role, Action::Media));
        }
        assert!(allowed(Role::Auditor, Action::ReadAttendance));
        assert!(!allowed(Role::Auditor, Action::JoinMedia));
    }
}
