//! Every way a join token can be refused: each gets its stable code, the socket closes, and
//! nothing reaches the attendance ledger.

mod common;

use std::time::Duration;

use common::{Server, Signal};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("formattable")
}

/// Claims like the scheduling system's, for a session that started a minute ago.
fn claims() -> serde_json::Value {
    let now = OffsetDateTime::now_utc();
    json!({
        "iss": "haven-dev",
        "aud": "haven",
        "sub": "p-tok-01",
        "role": "client",
        "jti": "tok-test-1",
        "nbf": now.unix_timestamp() - 60,
        "exp": now.unix_timestamp() + 3600,
        "session": {
            "id": "sess-tok",
            "kind": "individual",
            "starts_at": rfc3339(now - time::Duration::minutes(1)),
            "ends_at": rfc3339(now + time::Duration::minutes(59)),
        }
    })
}

fn sign(key: &EncodingKey, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, key).expect("sign")
}

/// Sends `join` with `token` and returns the error message, checking the socket closes.
async fn refused(server: &Server, token: &str) -> serde_json::Value {
    let mut s = Signal::connect(server).await;
    s.join(token).await;
    let msg = s.recv().await;
    assert_eq!(msg["type"], "error", "expected an error, got {msg}");
    assert!(
        msg["message"].as_str().is_some_and(|m| m.len() > 10),
        "a sentence a person can act on: {msg}"
    );
    assert!(
        s.closed_within(Duration::from_secs(5)).await,
        "socket closes after a join error"
    );
    msg
}

#[tokio::test]
async fn every_token_failure_has_its_code_and_writes_nothing() {
    let server = Server::start();
    let key = server.dev_key();
    let now = OffsetDateTime::now_utc();

    // token_invalid: garbage, a forged signature, a token signed by another key, a missing claim.
    assert_eq!(refused(&server, "not-a-jwt").await["code"], "token_invalid");

    let good = sign(&key, &claims());
    let forged = format!("{}AAAA", &good[..good.len() - 4]);
    assert_eq!(refused(&server, &forged).await["code"], "token_invalid");

    let other_key = tempfile::tempdir().expect("temp dir");
    let other = Server::start_in(other_key.path());
    let foreign = sign(&other.dev_key(), &claims());
    drop(other);
    assert_eq!(refused(&server, &foreign).await["code"], "token_invalid");

    let mut no_session = claims();
    no_session
        .as_object_mut()
        .expect("object")
        .remove("session");
    assert_eq!(
        refused(&server, &sign(&key, &no_session)).await["code"],
        "token_invalid"
    );

    // An HS256 token must not be accepted even if it names the right issuer: the algorithm
    // is pinned by the key, never taken from the header.
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(b"guess"),
    )
    .expect("sign");
    assert_eq!(refused(&server, &hs).await["code"], "token_invalid");

    // Oversized tokens are refused before parsing.
    assert_eq!(
        refused(&server, &"a".repeat(20_000)).await["code"],
        "token_invalid"
    );

    // token_expired
    let mut expired = claims();
    expired["exp"] = json!(now.unix_timestamp() - 3600);
    assert_eq!(
        refused(&server, &sign(&key, &expired)).await["code"],
        "token_expired"
    );

    // too_early: the session starts in two hours; the waiting room opens 15 minutes before.
    let starts = now + time::Duration::hours(2);
    let early = server.token(
        "sess-tok",
        "client",
        "p-tok-01",
        &[
            "--starts-at",
            &rfc3339(starts),
            "--ends-at",
            &rfc3339(starts + time::Duration::hours(1)),
        ],
    );
    let msg = refused(&server, &early).await;
    assert_eq!(msg["code"], "too_early");
    let opens_at = OffsetDateTime::parse(msg["opens_at"].as_str().expect("opens_at"), &Rfc3339)
        .expect("RFC 3339");
    assert_eq!(opens_at, starts - time::Duration::minutes(15));

    // session_over: ended an hour ago, token still valid, overrun (15 minutes) long past.
    let ended = now - time::Duration::hours(1);
    let over = server.token(
        "sess-tok",
        "client",
        "p-tok-01",
        &[
            "--starts-at",
            &rfc3339(ended - time::Duration::hours(1)),
            "--ends-at",
            &rfc3339(ended),
            "--valid-after-end-minutes",
            "120",
        ],
    );
    assert_eq!(refused(&server, &over).await["code"], "session_over");

    // token_invalid: a session window of years (a room open for ever), and times at the
    // edge of the calendar, where adding the overrun would overflow.
    let mut endless = claims();
    endless["session"]["ends_at"] = json!("9999-12-31T23:59:59Z");
    assert_eq!(
        refused(&server, &sign(&key, &endless)).await["code"],
        "token_invalid"
    );
    let mut edge = claims();
    edge["session"]["starts_at"] = json!("9999-12-31T22:00:00Z");
    edge["session"]["ends_at"] = json!("9999-12-31T23:59:59Z");
    assert_eq!(
        refused(&server, &sign(&key, &edge)).await["code"],
        "token_invalid"
    );
    let mut before = claims();
    before["session"]["starts_at"] = json!("-9999-01-01T00:00:00Z");
    before["session"]["ends_at"] = json!("-9999-01-01T01:00:00Z");
    let code = refused(&server, &sign(&key, &before)).await["code"].clone();
    assert!(
        code == "token_invalid" || code == "session_over",
        "a session before the calendar: {code}"
    );

    // token_invalid: an expiry past the calendar (milliseconds given as seconds), which
    // would otherwise be remembered as 1970 and make a removal of the token not last.
    let mut millis = claims();
    millis["exp"] = json!((now.unix_timestamp() + 3600) * 1000);
    assert_eq!(
        refused(&server, &sign(&key, &millis)).await["code"],
        "token_invalid"
    );

    // wrong_audience
    let mut aud = claims();
    aud["aud"] = json!("another-service");
    assert_eq!(
        refused(&server, &sign(&key, &aud)).await["code"],
        "wrong_audience"
    );

    let mut others = claims();
    others["aud"] = json!(["another-service", "a-third"]);
    assert_eq!(
        refused(&server, &sign(&key, &others)).await["code"],
        "wrong_audience"
    );

    // role_not_allowed: auditors never join media, unknown roles are refused.
    let auditor = server.token("sess-tok", "auditor", "a-tok-01", &[]);
    assert_eq!(refused(&server, &auditor).await["code"], "role_not_allowed");
    let mut admin = claims();
    admin["role"] = json!("admin");
    assert_eq!(
        refused(&server, &sign(&key, &admin)).await["code"],
        "role_not_allowed"
    );

    // join_required: anything else as the first message.
    let mut s = Signal::connect(&server).await;
    s.send(json!({"type": "ping"})).await;
    assert_eq!(s.recv().await["code"], "join_required");
    assert!(s.closed_within(Duration::from_secs(5)).await);

    // Nothing of the above reached the ledger.
    assert_eq!(server.ledger_entries(), 0);

    // The same server still admits a good token, which proves the refusals above were about
    // the tokens, and that writes do reach the ledger. Its audience is a list naming Haven
    // among others, as RFC 7519 allows.
    let mut therapist = claims();
    therapist["sub"] = json!("t-tok-01");
    therapist["role"] = json!("therapist");
    therapist["jti"] = json!("tok-test-aud-list");
    therapist["aud"] = json!(["another-service", "haven"]);
    let therapist = sign(&key, &therapist);
    let mut s = Signal::connect(&server).await;
    s.join(&therapist).await;
    let joined = s.expect("joined").await;
    assert_eq!(joined["role"], "therapist");
    assert!(
        server.ledger_entries() >= 2,
        "session opened and therapist admitted"
    );
}

#[tokio::test]
async fn client_waits_until_the_therapist_admits_and_errors_keep_the_socket_open() {
    let server = Server::start();
    let mut therapist = Signal::connect(&server).await;
    therapist
        .join(&server.token("sess-wait", "therapist", "t-w-01", &["--kind", "group"]))
        .await;
    therapist.expect("joined").await;

    let mut client = Signal::connect(&server).await;
    client
        .join(&server.token("sess-wait", "client", "p-w-01", &["--kind", "group"]))
        .await;
    let waiting = client.expect("waiting").await;
    assert_eq!(waiting["therapist_present"], true);

    // A waiting client may not publish, nor admit anyone; the socket stays usable.
    client
        .send(json!({"type": "publish_offer", "sdp": "v=0"}))
        .await;
    assert_eq!(client.expect("error").await["code"], "not_admitted");
    client
        .send(json!({"type": "admit", "participant_id": "p-w-01"}))
        .await;
    assert_eq!(client.expect("error").await["code"], "forbidden");
    client.send(json!({"type": "dance"})).await;
    assert_eq!(client.expect("error").await["code"], "unknown_type");
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.expect("pong").await["type"], "pong");
    let before = server.ledger_entries();

    let list = therapist.waiting_list_with("p-w-01").await;
    assert_eq!(list["waiting"].as_array().map(Vec::len), Some(1));
    therapist
        .send(json!({"type": "admit", "participant_id": "nobody"}))
        .await;
    assert_eq!(
        therapist.expect("error").await["code"],
        "unknown_participant"
    );
    therapist
        .send(json!({"type": "admit", "participant_id": "p-w-01"}))
        .await;

    let joined = client.expect("joined").await;
    assert_eq!(joined["participants"][0]["participant_id"], "t-w-01");
    let seen = therapist.expect("participant_joined").await;
    assert_eq!(seen["participant_id"], "p-w-01");
    assert_eq!(server.ledger_entries(), before + 1, "one Admitted entry");

    client.send(json!({"type": "leave"})).await;
    let left = client.expect("left").await;
    assert_eq!(left["reason"], "left");
    // No media flowed, so nothing is credited, and the client is told so.
    assert_eq!(left["credited_minutes"], 0.0);
    let gone = therapist.expect("participant_left").await;
    assert_eq!(gone["participant_id"], "p-w-01");
    assert_eq!(server.ledger_entries(), before + 2, "and one Left entry");
}

/// Base64url without padding, as JWTs use it.
fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn forged_and_incomplete_tokens_are_refused_and_other_rooms_carry_on() {
    let server = Server::start();
    let key = server.dev_key();
    let now = OffsetDateTime::now_utc();

    // A live session in another room, which must not notice any of this.
    let mut other = Signal::connect(&server).await;
    other
        .join(&server.token("sess-other", "therapist", "t-oth-01", &[]))
        .await;
    other.expect("joined").await;

    // alg: none, with no signature at all.
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims().to_string().as_bytes())
    );
    assert_eq!(refused(&server, &none).await["code"], "token_invalid");

    // HS256 "signed" with the server's public key as the secret (the classic key confusion).
    let pem = std::fs::read(server.data_dir.join("dev-signing-key.pem")).expect("key");
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(&pem),
    )
    .expect("sign");
    assert_eq!(refused(&server, &hs).await["code"], "token_invalid");

    // Missing aud, wrong issuer, missing jti.
    for field in ["aud", "jti"] {
        let mut c = claims();
        c.as_object_mut().expect("object").remove(field);
        assert_eq!(
            refused(&server, &sign(&key, &c)).await["code"],
            "token_invalid",
            "without {field}"
        );
    }
    let mut iss = claims();
    iss["iss"] = json!("someone-else");
    assert_eq!(
        refused(&server, &sign(&key, &iss)).await["code"],
        "token_invalid"
    );

    // Not yet valid (nbf in the future, beyond the leeway).
    let mut nbf = claims();
    nbf["nbf"] = json!(now.unix_timestamp() + 3600);
    assert_eq!(
        refused(&server, &sign(&key, &nbf)).await["code"],
        "too_early"
    );

    // Malformed JSON as the first message, and a join with the wrong field type.
    let mut s = Signal::connect(&server).await;
    s.send_text("{not json").await;
    assert_eq!(s.recv().await["code"], "join_required");
    let mut s = Signal::connect(&server).await;
    s.send(json!({"type": "join", "token": 42})).await;
    assert_eq!(s.recv().await["code"], "join_required");

    // The other room never noticed.
    other.send(json!({"type": "ping"})).await;
    other.expect("pong").await;
    assert_eq!(
        server.ledger_entries(),
        2,
        "only the other room's opening and admission"
    );
}

#[tokio::test]
async fn configured_issuer_keys_are_pinned_by_kid_and_the_dev_key_is_no_longer_trusted() {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};

    let dir = tempfile::tempdir().expect("temp dir");
    let doc = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).expect("key");
    let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).expect("key");
    let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64url(pair.public_key().as_ref()), "kid": "k-2026", "alg": "EdDSA", "use": "sig"}]});
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).expect("write jwks");
    let config = format!(
        "[[issuers]]\nissuer = \"scheduler-test\"\njwks_file = \"{}\"\n",
        dir.path().join("jwks.json").display()
    );
    std::fs::write(dir.path().join("haven.toml"), config).expect("write config");
    let config_path = dir.path().join("haven.toml");
    let server =
        Server::start_with_env(&[("HAVEN_CONFIG", config_path.to_str().expect("utf-8 path"))]);

    let issuer_key = EncodingKey::from_ed_der(doc.as_ref());
    let mut c = claims();
    c["iss"] = json!("scheduler-test");
    let with_kid = |kid: Option<&str>| {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&h, &c, &issuer_key).expect("sign")
    };

    assert_eq!(
        refused(&server, &with_kid(Some("k-unknown"))).await["code"],
        "token_invalid"
    );
    assert_eq!(
        refused(&server, &with_kid(None)).await["code"],
        "token_invalid"
    );
    // Production mode: the generated development key is not trusted.
    assert!(
        !server.data_dir.join("dev-signing-key.pem").exists(),
        "no development key is made"
    );
    let elsewhere = Server::start();
    let dev = elsewhere.token("sess-tok", "therapist", "t-tok-09", &[]);
    assert_eq!(refused(&server, &dev).await["code"], "token_invalid");

    let mut s = Signal::connect(&server).await;
    s.join(&with_kid(Some("k-2026"))).await;
    assert_eq!(s.recv().await["type"], "waiting");
}

#[tokio::test]
async fn the_documented_node_script_mints_a_token_haven_accepts() {
    let server = Server::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/examples/mint-token.mjs");
    let out = std::process::Command::new("node")
        .arg(script)
        .arg(server.data_dir.join("dev-signing-key.pem"))
        .args(["sess-doc", "therapist", "t-doc-01"])
        .output()
        .expect("node runs (the test command installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).expect("utf-8");

    let mut s = Signal::connect(&server).await;
    s.join(token.trim()).await;
    let joined = s.expect("joined").await;
    assert_eq!(joined["session"]["id"], "sess-doc");
}

#[tokio::test]
async fn a_rotated_jwks_file_is_picked_up_and_the_old_key_retired() {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};

    let dir = tempfile::tempdir().expect("temp dir");
    let new_key =
        || Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).expect("key");
    let jwk = |doc: &aws_lc_rs::pkcs8::Document, kid: &str| {
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).expect("key");
        json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(pair.public_key().as_ref()), "kid": kid, "alg": "EdDSA"})
    };
    let (old, new) = (new_key(), new_key());
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [jwk(&old, "k-old")]}).to_string()).expect("write");
    let config = dir.path().join("haven.toml");
    std::fs::write(
        &config,
        format!(
            "[[issuers]]\nissuer = \"rotating\"\njwks_file = \"{}\"\n",
            jwks.display()
        ),
    )
    .expect("write");
    let server = Server::start_with_env(&[
        ("HAVEN_CONFIG", config.to_str().expect("utf-8 path")),
        ("HAVEN_KEYS_REFRESH_SECONDS", "1"),
    ]);

    let signed = |doc: &aws_lc_rs::pkcs8::Document, kid: &str, sub: &str| {
        let mut c = claims();
        c["iss"] = json!("rotating");
        c["sub"] = json!(sub);
        c["jti"] = json!(format!("jti-{sub}"));
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&h, &c, &EncodingKey::from_ed_der(doc.as_ref())).expect("sign")
    };
    let mut s = Signal::connect(&server).await;
    s.join(&signed(&old, "k-old", "p-rot-01")).await;
    assert_eq!(s.recv().await["type"], "waiting");

    // The scheduling system rotates: only the new key is published now.
    std::fs::write(&jwks, json!({"keys": [jwk(&new, "k-new")]}).to_string()).expect("write");
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut s = Signal::connect(&server).await;
    s.join(&signed(&new, "k-new", "p-rot-02")).await;
    assert_eq!(s.recv().await["type"], "waiting", "the new key is trusted");
    assert_eq!(
        refused(&server, &signed(&old, "k-old", "p-rot-03")).await["code"],
        "token_invalid"
    );

    // A broken file keeps the keys in use.
    std::fs::write(&jwks, "{ not json").expect("write");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut s = Signal::connect(&server).await;
    s.join(&signed(&new, "k-new", "p-rot-04")).await;
    assert_eq!(s.recv().await["type"], "waiting");
}

#[tokio::test]
async fn a_token_for_the_same_person_in_another_role_never_takes_over_their_stay() {
    let server = Server::start();
    let key = server.dev_key();
    let therapist = server.token("sess-tok-id", "therapist", "t-tok-09", &[]);
    let mut t = Signal::connect(&server).await;
    t.join(&therapist).await;
    assert_eq!(t.expect("joined").await["role"], "therapist");

    // A client token whose subject is the therapist's: refused, the therapist stays.
    let mut as_client = claims();
    as_client["sub"] = json!("t-tok-09");
    as_client["jti"] = json!("tok-test-id-1");
    as_client["session"]["id"] = json!("sess-tok-id");
    let msg = refused(&server, &sign(&key, &as_client)).await;
    assert_eq!(msg["code"], "identity_conflict");

    // The therapist's connection was not replaced: it still answers and can admit.
    t.send(json!({"type": "ping"})).await;
    assert_eq!(t.expect("pong").await["type"], "pong");
    let client = server.token("sess-tok-id", "client", "p-tok-09", &[]);
    let mut c = Signal::connect(&server).await;
    c.join(&client).await;
    c.expect("waiting").await;
    t.send(json!({"type": "admit", "participant_id": "p-tok-09"}))
        .await;
    assert_eq!(c.expect("joined").await["role"], "client");
}
