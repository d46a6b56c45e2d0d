//! The compliance API: only auditors read attendance, in JSON or CSV, and every read is
//! written to the ledger's audit log.

mod common;

use common::{Server, Signal};
use serde_json::json;

async fn get(server: &Server, path: &str, bearer: Option<&str>) -> (u16, String, String) {
    common::http(server, "GET", path, bearer, "").await
}

#[tokio::test]
async fn auditors_read_reports_others_are_refused_and_reads_are_logged() {
    let server = Server::start();
    let args = [
        "--kind",
        "group",
        "--program",
        "iop-adult",
        "--age-group",
        "adult",
    ];
    let mut t = Signal::connect(&server).await;
    t.join(&server.token("sess-aud", "therapist", "t-au-01", &args))
        .await;
    t.expect("joined").await;
    let mut c = Signal::connect(&server).await;
    c.join(&server.token("sess-aud", "client", "p-au-01", &args))
        .await;
    t.waiting_list_with("p-au-01").await;
    t.send(json!({"type": "admit", "participant_id": "p-au-01"}))
        .await;
    c.expect("joined").await;
    c.send(json!({"type": "leave"})).await;
    t.expect("participant_left").await;

    let auditor = server.token("sess-aud", "auditor", "a-au-01", &[]);
    let client = server.token("sess-aud", "client", "p-au-01", &[]);
    let path = "/api/v1/attendance/sessions/sess-aud";

    assert_eq!(get(&server, path, None).await.0, 401);
    assert_eq!(get(&server, path, Some("garbage")).await.0, 401);
    assert_eq!(get(&server, path, Some(&client)).await.0, 403);

    let (status, ctype, body) = get(&server, path, Some(&auditor)).await;
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    assert!(
        body.contains("p-au-01") && body.contains("t-au-01"),
        "{body}"
    );

    let (status, ctype, body) = get(&server, &format!("{path}?format=csv"), Some(&auditor)).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/csv"), "{ctype}");
    assert!(body.contains("p-au-01"), "{body}");

    let week = attendance_week();
    let (status, _, body) = get(
        &server,
        &format!("/api/v1/attendance/clients/p-au-01/weeks?from={week}&to={week}"),
        Some(&auditor),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = get(
        &server,
        &format!("/api/v1/attendance/programs/iop-adult/weeks/{week}"),
        Some(&auditor),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Without media nobody was credited, so the week has no lines yet; the report is still
    // the program's, for the week asked.
    assert!(
        body.contains("\"program\":\"iop-adult\"") && body.contains(&week),
        "{body}"
    );
    let (status, _, _) = get(
        &server,
        "/api/v1/attendance/clients/p-au-01/weeks?from=yesterday&to=today",
        Some(&auditor),
    )
    .await;
    assert_eq!(status, 400);

    // Four successful reads, each in the audit log; the refused ones are not reads.
    let mut server = server;
    server.stop();
    let out = std::process::Command::new(common::BIN)
        .args(["attendance", "verify", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .expect("verify");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("and 4 logged reads"), "{said}");
}

/// The current ISO week as `YYYY-Www` in UTC (the default program time zone may differ by a
/// day at the edges; the test runs mid-session, so the week is the same).
fn attendance_week() -> String {
    let now = time::OffsetDateTime::now_utc();
    let (year, week, _) = now.to_iso_week_date();
    format!("{year}-W{week:02}")
}
