//! The checker against hand-made histories: it must report a resurrection,
//! a lost write, lost increments and each other rule's violation, and must
//! not report what a correct system may do (a request concurrent with a
//! logout, a read concurrent with a write, an unknown outcome either way).

use std::time::Duration;

use serde_json::{Value, json};

use super::{Class, Rule, Violation, check, class};
use crate::history::{
    Action, AuditEvent, CookieChange, DamageCheck, DbFacts, DeadLetter, FaultKind, FaultRecord,
    History, Injected, Op, ProcessExit, Reply, SnapshotRow, VerifyRun,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn http(status: u16) -> Reply {
    Reply::Http {
        status,
        cookie: CookieChange::Absent,
        body: Value::Null,
    }
}

fn http_body(status: u16, body: Value) -> Reply {
    Reply::Http {
        status,
        cookie: CookieChange::Absent,
        body,
    }
}

fn error(status: u16, code: &str) -> Reply {
    http_body(status, json!({"error": code, "message": "…"}))
}

fn me(platform: Option<&str>) -> Reply {
    http_body(200, json!({"user_id": 1, "platform_name": platform}))
}

/// A history and its database facts, built step by step.
#[derive(Default)]
struct Case {
    h: History,
    facts: DbFacts,
}

impl Case {
    fn new() -> Self {
        let mut c = Case::default();
        c.facts.verify = Some(VerifyRun {
            code: Some(0),
            stdout: "{\"ok\": true}".to_owned(),
        });
        c
    }

    fn op(
        &mut self,
        actor: &str,
        action: Action,
        session: Option<&str>,
        t: (u64, u64),
        reply: Reply,
    ) -> usize {
        let id = self.h.ops.len();
        self.h.ops.push(Op {
            id,
            actor: actor.to_owned(),
            action,
            session: session.map(str::to_owned),
            invoke: ms(t.0),
            complete: ms(t.1),
            reply,
            final_read: false,
        });
        id
    }

    /// A login of `user` that carried `carried` and got the session `new`;
    /// its `created` event is audited.
    fn login(&mut self, actor: &str, user: i64, carried: Option<&str>, new: &str, t: (u64, u64)) {
        self.op(
            actor,
            Action::Login { user_id: user },
            carried,
            t,
            Reply::Http {
                status: 200,
                cookie: CookieChange::New(new.to_owned()),
                body: json!({"csrf_token": "t"}),
            },
        );
        self.event(new, "created", json!({"fields": {"user_id": user}}));
    }

    fn put(&mut self, actor: &str, sid: &str, key: &str, value: &str, t: (u64, u64), reply: Reply) {
        self.op(
            actor,
            Action::Put {
                key: key.to_owned(),
                value: value.to_owned(),
            },
            Some(sid),
            t,
            reply,
        );
    }

    fn get(&mut self, actor: &str, sid: &str, key: &str, t: (u64, u64), reply: Reply) -> usize {
        self.op(
            actor,
            Action::Get {
                key: key.to_owned(),
            },
            Some(sid),
            t,
            reply,
        )
    }

    fn incr(&mut self, actor: &str, sid: &str, t: (u64, u64), reply: Reply) {
        self.op(
            actor,
            Action::Incr {
                key: "ctr".to_owned(),
                by: 1,
                via_modify: false,
            },
            Some(sid),
            t,
            reply,
        );
    }

    /// Appends an audited event with the next seq of its session.
    fn event(&mut self, sid: &str, event_type: &str, payload: Value) {
        let seq = self
            .facts
            .events
            .iter()
            .filter(|e| e.session_id == sid)
            .count() as i64
            + 1;
        self.event_at(sid, seq, event_type, payload);
    }

    fn event_at(&mut self, sid: &str, seq: i64, event_type: &str, payload: Value) {
        self.facts.events.push(AuditEvent {
            session_id: sid.to_owned(),
            seq,
            event_type: event_type.to_owned(),
            payload: payload.to_string(),
            source: "stream".to_owned(),
            user_id: None,
            occurred_at: chrono::DateTime::from_timestamp_millis(1_800_000_000_000 + seq * 1000)
                .expect("a time"),
            schema_version: 1,
        });
    }

    fn set(&mut self, sid: &str, key: &str, value: Value) {
        self.event(sid, "updated", json!({"set": {key: value}, "unset": []}));
    }

    fn fault(&mut self, kind: FaultKind, start: u64, end: u64, settled: Option<u64>) {
        self.h.faults.push(FaultRecord {
            kind,
            target: None,
            start: ms(start),
            end: ms(end),
            settled: settled.map(ms),
        });
    }

    fn check(&self) -> Vec<Violation> {
        check(&self.h, &self.facts)
    }
}

fn kinds(v: &[Violation]) -> Vec<&'static str> {
    v.iter().map(|v| v.kind).collect()
}

/// One session's life, all of it correct: login, a write read back, a
/// platform switch seen by `/me`, a logout, then a 401.
fn clean_life() -> Case {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.put("c0", "s1", "k", "v1", (20, 30), http(204));
    c.set("s1", "k", json!("v1"));
    c.get("c0", "s1", "k", (40, 50), http_body(200, json!("v1")));
    c.op("c0", Action::Me, Some("s1"), (60, 70), me(None));
    c.op(
        "c0",
        Action::Platform {
            name: "p1".to_owned(),
        },
        Some("s1"),
        (80, 90),
        me(Some("p1")),
    );
    c.event(
        "s1",
        "platform_switched",
        json!({"platform_connection_id": 1, "platform_name": "p1"}),
    );
    c.op("c0", Action::Me, Some("s1"), (100, 110), me(Some("p1")));
    c.op("c0", Action::Logout, Some("s1"), (120, 130), http(204));
    c.event("s1", "destroyed", json!({"reason": "logout"}));
    c
}

#[test]
fn a_clean_history_has_no_violations() {
    let mut c = clean_life();
    c.op(
        "c0",
        Action::Me,
        Some("s1"),
        (140, 150),
        error(401, "unauthenticated"),
    );
    assert_eq!(c.check(), vec![]);
}

#[test]
fn classification_follows_what_the_client_was_told() {
    let mut c = Case::new();
    let cases = [
        (Action::Me, http(200), Class::Ok),
        (Action::Me, error(401, "unauthenticated"), Class::Fail),
        (Action::Logout, http(204), Class::Ok),
        (Action::Logout, error(403, "csrf"), Class::Fail),
        (
            Action::Logout,
            error(503, "session_store_unavailable"),
            Class::Unknown,
        ),
        (Action::Logout, error(503, "session_busy"), Class::Fail),
        (
            Action::Logout,
            Reply::Lost("timeout".to_owned()),
            Class::Unknown,
        ),
        (
            Action::Logout,
            Reply::NotSent("refused".to_owned()),
            Class::Fail,
        ),
        (Action::Destroy, Reply::Exit { code: 0 }, Class::Ok),
        (Action::Destroy, Reply::Exit { code: 1 }, Class::Fail),
        (Action::Destroy, Reply::Exit { code: 2 }, Class::Unknown),
    ];
    for (i, (action, reply, expected)) in cases.into_iter().enumerate() {
        let id = c.op("c0", action, Some("s1"), (i as u64, i as u64 + 1), reply);
        assert_eq!(class(&c.h.ops[id]), expected, "{:?}", c.h.ops[id]);
    }
    // A data write that answered 204 with a new token went into a new
    // session, not the cookie's.
    c.put(
        "c0",
        "s1",
        "k",
        "v",
        (50, 60),
        Reply::Http {
            status: 204,
            cookie: CookieChange::New("s2".to_owned()),
            body: Value::Null,
        },
    );
    assert_eq!(class(c.h.ops.last().expect("op")), Class::Fail);
}

#[test]
fn a_resurrection_after_logout_is_reported() {
    let mut c = clean_life();
    c.op("c0", Action::Me, Some("s1"), (140, 150), me(Some("p1")));
    let v = c.check();
    assert_eq!(kinds(&v), vec!["resurrection"], "{v:#?}");
    assert_eq!(v[0].rule, Rule::A);
    assert_eq!(v[0].session.as_deref(), Some("s1"));
}

#[test]
fn a_request_concurrent_with_the_logout_is_not_a_resurrection() {
    let mut c = clean_life();
    // Invoked before the logout was acknowledged (at 130).
    c.op("c0", Action::Me, Some("s1"), (125, 135), me(Some("p1")));
    c.get("c1", "s1", "k", (129, 140), http_body(200, json!("v1")));
    assert_eq!(c.check(), vec![]);
}

#[test]
fn a_resurrection_after_logout_all_reaches_the_users_other_sessions() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.login("c1", 1, None, "s2", (0, 12));
    c.login("c3", 2, None, "s4", (0, 12));
    c.op("c1", Action::LogoutAll, Some("s2"), (20, 30), http(204));
    c.event("s1", "destroyed", json!({"reason": "logout_all"}));
    c.event("s2", "destroyed", json!({"reason": "logout_all"}));
    // Logged in while the logout-all ran: not necessarily ended.
    c.login("c2", 1, None, "s3", (25, 35));
    c.op("c2", Action::Me, Some("s3"), (40, 50), me(None));
    // Another user's session: untouched.
    c.op("c3", Action::Me, Some("s4"), (40, 50), me(None));
    // The user's other session, logged in before: must be over.
    c.op("c0", Action::Me, Some("s1"), (40, 50), me(None));
    let v = c.check();
    assert_eq!(kinds(&v), vec!["resurrection"], "{v:#?}");
    assert_eq!(v[0].session.as_deref(), Some("s1"));
}

#[test]
fn a_rotation_and_an_admin_destroy_end_sessions() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.login("c0", 1, Some("s1"), "s2", (20, 30));
    c.event("s1", "destroyed", json!({"reason": "rotated"}));
    c.put("c9", "s1", "k", "v1", (40, 50), http(204));
    c.set("s1", "k", json!("v1"));
    c.op(
        "admin",
        Action::Destroy,
        Some("s2"),
        (60, 70),
        Reply::Exit { code: 0 },
    );
    c.event("s2", "destroyed", json!({"reason": "admin"}));
    c.op(
        "c0",
        Action::Incr {
            key: "n".to_owned(),
            by: 1,
            via_modify: true,
        },
        Some("s2"),
        (80, 90),
        http_body(200, json!(1)),
    );
    c.set("s2", "n", json!(1));
    let v = c.check();
    assert_eq!(kinds(&v), vec!["resurrection", "resurrection"], "{v:#?}");
}

#[test]
fn an_end_with_an_unknown_outcome_is_no_end_but_explains_a_401() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.op(
        "c0",
        Action::Logout,
        Some("s1"),
        (20, 30),
        Reply::Lost("timeout".to_owned()),
    );
    c.op("c0", Action::Me, Some("s1"), (40, 50), me(None));
    c.op(
        "c1",
        Action::Me,
        Some("s1"),
        (60, 70),
        error(401, "unauthenticated"),
    );
    assert_eq!(c.check(), vec![]);
}

#[test]
fn a_logout_all_explains_a_401_and_a_missing_key_on_the_users_other_session() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.login("c1", 1, None, "s2", (0, 10));
    c.put("c0", "s1", "k", "v1", (20, 30), http(204));
    c.set("s1", "k", json!("v1"));
    // Its outcome unknown: it may have ended s1 at any time after 40.
    c.op(
        "c1",
        Action::LogoutAll,
        Some("s2"),
        (40, 50),
        Reply::Lost("reset".to_owned()),
    );
    c.op(
        "c0",
        Action::Me,
        Some("s1"),
        (60, 70),
        error(401, "unauthenticated"),
    );
    c.get("c0", "s1", "k", (60, 70), error(404, "not_found"));
    assert_eq!(c.check(), vec![]);
}

#[test]
fn a_lost_session_is_reported() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    let unknown = error(401, "unauthenticated");
    c.op("c0", Action::Me, Some("s1"), (20, 30), unknown);
    let v = c.check();
    assert_eq!(kinds(&v), vec!["lost session"], "{v:#?}");
    assert_eq!(v[0].rule, Rule::B);
    // Served again later: it was refused while it lived.
    c.op("c0", Action::Me, Some("s1"), (40, 50), me(None));
    let v = c.check();
    assert_eq!(kinds(&v), vec!["session refused while live"], "{v:#?}");
}

#[test]
fn a_lost_write_is_reported() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.put("c0", "s1", "k", "v1", (20, 30), http(204));
    c.set("s1", "k", json!("v1"));
    c.get("c1", "s1", "k", (40, 50), error(404, "not_found"));
    let v = c.check();
    assert_eq!(kinds(&v), vec!["lost write"], "{v:#?}");
    assert_eq!(v[0].rule, Rule::B);
}

#[test]
fn an_absent_read_that_an_end_may_explain_is_not_a_lost_write() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.put("c0", "s1", "k", "v1", (20, 30), http(204));
    c.set("s1", "k", json!("v1"));
    c.op(
        "admin",
        Action::Destroy,
        Some("s1"),
        (32, 60),
        Reply::Lost("timeout".to_owned()),
    );
    c.get("c1", "s1", "k", (40, 50), error(404, "not_found"));
    assert_eq!(c.check(), vec![]);
}

#[test]
fn a_stale_read_is_reported_and_a_concurrent_one_is_not() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.put("c0", "s1", "k", "v1", (20, 30), http(204));
    c.set("s1", "k", json!("v1"));
    c.put("c0", "s1", "k", "v2", (40, 50), http(204));
    c.set("s1", "k", json!("v2"));
    // Began while v2 was being written: either value.
    c.get("c1", "s1", "k", (45, 70), http_body(200, json!("v1")));
    assert_eq!(c.check(), vec![]);
    // Began after v2 was acknowledged.
    c.get("c1", "s1", "k", (60, 70), http_body(200, json!("v1")));
    let v = c.check();
    assert_eq!(kinds(&v), vec!["stale read"], "{v:#?}");
}

#[test]
fn values_that_no_acknowledged_write_explains_are_reported() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.login("c1", 1, None, "s2", (0, 10));
    c.put("c0", "s1", "k", "v1", (20, 30), error(409, "session_ended"));
    c.put("c1", "s2", "k", "v2", (20, 30), http(204));
    c.set("s2", "k", json!("v2"));
    c.get("c0", "s1", "k", (40, 50), http_body(200, json!("v1")));
    c.get("c0", "s1", "k", (40, 50), http_body(200, json!("v2")));
    c.get("c0", "s1", "k", (40, 50), http_body(200, json!("zzz")));
    let v = c.check();
    assert_eq!(
        kinds(&v),
        vec![
            "phantom write",
            "session refused while live",
            "value never written",
            "value of another session",
        ],
        "{v:#?}"
    );
}

#[test]
fn a_value_carried_over_by_a_rotation_is_not_foreign() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.op(
        "c0",
        Action::Platform {
            name: "p1".to_owned(),
        },
        Some("s1"),
        (20, 30),
        me(Some("p1")),
    );
    c.event("s1", "platform_switched", json!({"platform_name": "p1"}));
    c.login("c0", 1, Some("s1"), "s2", (40, 50));
    c.event("s1", "destroyed", json!({"reason": "rotated"}));
    c.op("c0", Action::Me, Some("s2"), (60, 70), me(Some("p1")));
    assert_eq!(c.check(), vec![]);
}

/// A shared counter incremented three times, each acknowledged in turn.
fn three_increments(results: [i64; 3]) -> Case {
    let mut c = Case::new();
    c.login("ctr0", 4, None, "s9", (0, 10));
    for (i, r) in results.into_iter().enumerate() {
        let t = 20 + 20 * i as u64;
        c.incr(
            &format!("ctr{i}"),
            "s9",
            (t, t + 10),
            http_body(200, json!(r)),
        );
        c.set("s9", "ctr", json!(r));
    }
    c
}

fn final_read(c: &mut Case, value: Value) {
    let id = c.get("ctr0", "s9", "ctr", (1000, 1010), http_body(200, value));
    c.h.ops[id].final_read = true;
}

#[test]
fn increments_that_add_up_pass() {
    let mut c = three_increments([1, 2, 3]);
    c.get("ctr1", "s9", "ctr", (55, 56), http_body(200, json!(2)));
    final_read(&mut c, json!(3));
    assert_eq!(c.check(), vec![]);
}

#[test]
fn a_lost_increment_is_reported() {
    let mut c = three_increments([1, 2, 3]);
    final_read(&mut c, json!(2));
    let v = c.check();
    assert_eq!(kinds(&v), vec!["lost increments"], "{v:#?}");
    assert_eq!(v[0].rule, Rule::B);
}

#[test]
fn a_lost_increment_shows_as_a_repeated_result_and_a_read_that_goes_back() {
    // The second increment was lost: the third started from its base.
    let mut c = three_increments([1, 2, 2]);
    c.get("ctr1", "s9", "ctr", (65, 70), http_body(200, json!(1)));
    final_read(&mut c, json!(2));
    let v = c.check();
    assert_eq!(
        kinds(&v),
        vec![
            "counter read lost increments",
            "duplicate increment result",
            "increment not audited once",
            "increment went backwards",
            "lost increments",
        ],
        "{v:#?}"
    );
}

#[test]
fn an_unknown_increment_may_or_may_not_count() {
    for (final_value, expected) in [
        (2, vec![]),
        (3, vec![]),
        (4, vec!["phantom increments"]),
        (1, vec!["lost increments"]),
    ] {
        let mut c = Case::new();
        c.login("ctr0", 4, None, "s9", (0, 10));
        c.incr("ctr0", "s9", (20, 30), http_body(200, json!(1)));
        c.set("s9", "ctr", json!(1));
        c.incr("ctr1", "s9", (40, 50), Reply::Lost("timeout".to_owned()));
        c.incr("ctr2", "s9", (60, 70), error(503, "session_busy"));
        c.incr(
            "ctr0",
            "s9",
            (80, 90),
            http_body(200, json!(final_value.max(2))),
        );
        c.set("s9", "ctr", json!(final_value.max(2)));
        final_read(&mut c, json!(final_value));
        let v = c.check();
        let expected: Vec<&str> = expected;
        assert_eq!(kinds(&v), expected, "final {final_value}: {v:#?}");
    }
}

#[test]
fn a_missing_increment_route_is_reported() {
    let mut c = Case::new();
    c.login("ctr0", 4, None, "s9", (0, 10));
    c.incr("ctr0", "s9", (20, 30), http(404));
    let v = c.check();
    assert_eq!(kinds(&v), vec!["increment route missing"], "{v:#?}");
}

#[test]
fn an_acknowledged_write_must_be_audited_exactly_once() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.put("c0", "s1", "k", "v1", (20, 30), http(204));
    // Not audited at all.
    c.put("c0", "s1", "k", "v2", (40, 50), http(204));
    c.set("s1", "k", json!("v2"));
    c.set("s1", "k", json!("v2"));
    // A failed write must leave no trace; an unknown one at most one.
    c.put("c0", "s1", "j", "v3", (60, 70), error(403, "csrf"));
    c.set("s1", "j", json!("v3"));
    c.put(
        "c0",
        "s1",
        "i",
        "v4",
        (80, 90),
        Reply::Lost("reset".to_owned()),
    );
    c.set("s1", "i", json!("v4"));
    let v = c.check();
    assert_eq!(
        kinds(&v),
        vec![
            "acknowledged write not audited once",
            "acknowledged write not audited once",
            "failed write audited",
            "lost session",
        ],
        "{v:#?}"
    );
}

#[test]
fn the_audit_trail_rules_catch_gaps_dead_letters_and_a_failed_verify() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.put("c0", "s1", "k", "v1", (20, 30), http(204));
    c.event_at("s1", 3, "updated", json!({"set": {"k": "v1"}, "unset": []}));
    c.facts.dead_letters.push(DeadLetter {
        stream_id: "1-0".to_owned(),
        fields: r#"{"payload":"{\"set\":{\"k\":\"v1\"}}"}"#.to_owned(),
        reason: "seq 2 of session s1 is already held by another event".to_owned(),
    });
    c.facts.verify = Some(VerifyRun {
        code: Some(1),
        stdout: "{\"ok\": false}".to_owned(),
    });
    let v = c.check();
    assert_eq!(
        kinds(&v),
        vec![
            "acknowledged write in dead letters",
            "dead letter not injected",
            "seq not contiguous",
            "verify failed"
        ],
        "{v:#?}"
    );
    assert!(v.iter().all(|v| v.rule == Rule::C));
}

#[test]
fn a_failure_while_only_the_database_is_down_is_reported() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.fault(FaultKind::DbCut, 100, 300, Some(300));
    c.fault(FaultKind::RedisCut, 200, 250, Some(260));
    // Only the database is down.
    c.get(
        "c0",
        "s1",
        "k",
        (110, 120),
        error(503, "session_store_unavailable"),
    );
    c.put(
        "c0",
        "s1",
        "k",
        "v1",
        (130, 140),
        error(503, "session_store_unavailable"),
    );
    // Redis was cut too: not this rule's business.
    c.put(
        "c0",
        "s1",
        "k",
        "v2",
        (240, 255),
        Reply::Lost("timeout".to_owned()),
    );
    let v = c.check();
    assert_eq!(
        kinds(&v),
        vec![
            "read failed during a database outage",
            "write failed during a database outage"
        ],
        "{v:#?}"
    );
    assert!(v.iter().all(|v| v.rule == Rule::D));
}

#[test]
fn a_fault_that_never_settled_a_crash_and_a_dead_final_read_are_reported() {
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.fault(FaultKind::RedisRestart, 100, 200, None);
    let id = c.get(
        "c0",
        "s1",
        "k",
        (900, 910),
        Reply::Lost("timeout".to_owned()),
    );
    c.h.ops[id].final_read = true;
    for started in [true, false] {
        c.h.exits.push(ProcessExit {
            who: "worker".to_owned(),
            at: ms(150),
            started,
            status: "exit status: 1".to_owned(),
        });
    }
    let v = c.check();
    assert_eq!(
        kinds(&v),
        vec![
            "fault did not settle",
            "process exited by itself",
            "read failed at quiescence"
        ],
        "{v:#?}"
    );
    assert!(v.iter().all(|v| v.rule == Rule::E));
}

/// A session id of the real form (the fold parses it).
fn hex_sid(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn injected(stream_id: &str, sid: &str, at: u64) -> Injected {
    Injected {
        what: "seq above the i64 range".to_owned(),
        stream_id: stream_id.to_owned(),
        session_id: sid.to_owned(),
        at: ms(at),
    }
}

fn dead_letter(stream_id: &str, fields: &str, reason: &str) -> DeadLetter {
    DeadLetter {
        stream_id: stream_id.to_owned(),
        fields: fields.to_owned(),
        reason: reason.to_owned(),
    }
}

#[test]
fn only_injected_invalid_input_may_be_a_dead_letter() {
    // An acknowledged write in the dead letters, a dead letter the harness
    // did not inject, an injected entry without a reason, one that is not a
    // dead letter and one that was audited are each reported; an injected
    // entry that a later flush may have lost is not.
    let mut c = Case::new();
    c.login("c0", 1, None, "s1", (0, 10));
    c.put("c0", "s1", "k", "v1", (20, 30), http(204));
    c.facts.dead_letters.push(dead_letter(
        "5-0",
        r#"{"payload":"{\"set\":{\"k\":\"v1\"},\"unset\":[]}"}"#,
        "the audit database refused it (SQLSTATE 23505)",
    ));
    let (p1, p2, p3, p4) = (hex_sid(1), hex_sid(2), hex_sid(3), hex_sid(4));
    c.h.injected.push(injected("6-0", &p1, 300));
    c.facts.dead_letters.push(dead_letter("6-0", "{}", " "));
    c.h.injected.push(injected("7-0", &p2, 300));
    c.h.injected.push(injected("8-0", &p3, 300));
    c.facts
        .dead_letters
        .push(dead_letter("8-0", "{}", "invalid seq"));
    c.event(&p3, "touched", json!({}));
    // Injected, then Redis flushed before the worker read it.
    c.h.injected.push(injected("9-0", &p4, 100));
    c.fault(FaultKind::RedisFlush, 110, 110, Some(200));
    let v = c.check();
    let mut found = kinds(&v);
    found.retain(|k| *k != "acknowledged write not audited once");
    assert_eq!(
        found,
        vec![
            "acknowledged write in dead letters",
            "dead letter not injected",
            "dead letter without a reason",
            "invalid input audited",
            "invalid input not a dead letter",
        ],
        "{v:#?}"
    );
    assert!(
        v.iter()
            .filter(|v| v.kind == "invalid input not a dead letter")
            .all(|v| v.session.as_deref() == Some(p2.as_str())),
        "{v:#?}"
    );
}

/// A session's events (created, updated, destroyed) and the snapshot the
/// library folds them to.
fn folded_session(c: &mut Case, sid: &str) -> (String, i64) {
    c.event(
        sid,
        "created",
        json!({"fields": {"user_id": "1", "username": "u1"}, "rotated_from": null}),
    );
    c.event(sid, "updated", json!({"set": {"k": "v1"}, "unset": []}));
    let events: Vec<&AuditEvent> = c
        .facts
        .events
        .iter()
        .filter(|e| e.session_id == sid)
        .collect();
    let state = super::fold(&events).expect("the events fold");
    (state.to_json(), state.version() as i64)
}

#[test]
fn a_snapshot_that_is_not_the_fold_of_its_events_is_reported() {
    // The right snapshot passes; one with other JSON, one behind its events
    // and one with another status are each reported.
    let mut c = Case::new();
    let sids: Vec<String> = (1..=4).map(hex_sid).collect();
    for (i, sid) in sids.iter().enumerate() {
        let (state, seq) = folded_session(&mut c, sid);
        assert_eq!(seq, 2);
        assert!(state.contains("\"k\":\"v1\""), "{state}");
        let (state, seq, status) = match i {
            0 => (state, seq, "live"),
            1 => (state.replace("v1", "v0"), seq, "live"),
            2 => (state, seq - 1, "live"),
            _ => (state, seq, "destroyed"),
        };
        c.facts.snapshots.push(SnapshotRow {
            session_id: sid.clone(),
            seq,
            status: status.to_owned(),
            state,
        });
    }
    let v = c.check();
    assert_eq!(
        kinds(&v),
        vec!["snapshot not the fold of its events"; 3],
        "{v:#?}"
    );
    let named: Vec<&str> = v.iter().filter_map(|v| v.session.as_deref()).collect();
    assert_eq!(named, vec![&sids[1], &sids[2], &sids[3]], "{v:#?}");
    assert!(v.iter().all(|v| v.rule == Rule::C));
}

fn damage(detected: (i32, &str), after: i32) -> DamageCheck {
    DamageCheck {
        damaged: vec![
            ("key made persistent".to_owned(), hex_sid(1)),
            ("JSON changed".to_owned(), hex_sid(2)),
        ],
        detected: VerifyRun {
            code: Some(detected.0),
            stdout: detected.1.to_owned(),
        },
        repair: VerifyRun {
            code: Some(0),
            stdout: "{}".to_owned(),
        },
        after: VerifyRun {
            code: Some(after),
            stdout: "{}".to_owned(),
        },
    }
}

#[test]
fn verify_must_detect_the_damage_name_each_session_and_pass_after_repair() {
    // Detected, named and repaired: nothing to report.
    let both = format!(
        "[{{\"session_id\": \"{}\"}}, {{\"session_id\": \"{}\"}}]",
        hex_sid(1),
        hex_sid(2)
    );
    let mut c = Case::new();
    c.facts.damage = Some(damage((1, &both), 0));
    assert_eq!(c.check(), vec![]);
    // verify passed although Redis was damaged.
    c.facts.damage = Some(damage((0, "{\"ok\": true}"), 0));
    let v = c.check();
    assert_eq!(kinds(&v), vec!["verify missed damage"], "{v:#?}");
    // verify failed but did not name one of the damaged sessions.
    let one = format!("[{{\"session_id\": \"{}\"}}]", hex_sid(1));
    c.facts.damage = Some(damage((1, &one), 0));
    let v = c.check();
    assert_eq!(kinds(&v), vec!["verify missed damage"], "{v:#?}");
    assert_eq!(v[0].session.as_deref(), Some(hex_sid(2).as_str()));
    // The repair did not make verify pass.
    c.facts.damage = Some(damage((1, &both), 1));
    let v = c.check();
    assert_eq!(kinds(&v), vec!["verify fails after repair"], "{v:#?}");
    // No damage could be done.
    let mut d = damage((1, &both), 0);
    d.damaged.clear();
    c.facts.damage = Some(d);
    assert_eq!(kinds(&c.check()), vec!["no damage done"]);
    assert!(c.check().iter().all(|v| v.rule == Rule::C));
}

#[test]
fn a_failure_while_the_database_is_slow_or_locked_is_reported() {
    // Rule (d) covers the database slowed and its snapshot table locked as
    // it covers a cut.
    for kind in [FaultKind::DbSlow, FaultKind::DbLock] {
        let mut c = Case::new();
        c.login("c0", 1, None, "s1", (0, 10));
        c.fault(kind, 100, 400, Some(400));
        c.op(
            "c0",
            Action::Me,
            Some("s1"),
            (150, 350),
            Reply::Lost("timed out".to_owned()),
        );
        let v = c.check();
        assert_eq!(
            kinds(&v),
            vec!["read failed during a database outage"],
            "{kind:?}: {v:#?}"
        );
    }
}
