//! Behaviour of Envoy's ShouldRateLimit and Kuadrant's CheckRateLimit/Report, through gRPC
//! against an in-process server on port 0.

mod common;

use common::*;

behaviour_suite!(
    admits_up_to_capacity_then_429_with_body_and_statuses,
    request_hits_addend_zero_means_one_and_n_means_n,
    per_descriptor_hits_override_and_present_zero_checks_only,
    descriptor_limit_override_replaces_configured_limit,
    all_descriptors_must_pass_and_none_is_debited_on_denial,
    draft03_headers_on_request,
    kuadrant_check_does_not_debit_and_report_always_does,
    sixty_four_concurrent_clients_admit_exactly_the_limit,
    bad_input_is_invalid_argument_naming_the_field,
    a_full_counter_table_refuses_new_counters_without_half_applying,
    usage_descriptors_are_recorded_as_usage_once_per_request_id,
    a_used_up_token_budget_refuses_the_next_request_time_check,
    request_time_reservations_hold_the_budget_and_settle_at_stream_end_or_ttl,
);
use std::time::{Duration, Instant};
use tally_proto::envoy::r#type::v3::RateLimitUnit;
use tonic::Code as GrpcCode;

const LIMITS: &str = r#"
domains:
  - domain: test
    limits:
      - name: per-user
        match: { kind: req }
        by: [user]
        capacity: 3
        window: 1m
      - name: per-org
        match: { kind: org }
        by: [org]
        capacity: 5
        window: 1m
      - name: big
        match: { kind: big }
        by: [user]
        capacity: 1000
        window: 1h
      - name: tokens
        match: { kind: tokens }
        by: [user]
        capacity: 100
        window: { rolling: 60s, resolution: 1s }
"#;

fn user(u: &str) -> tally_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor {
    desc(&[("kind", "req"), ("user", u)])
}

async fn admits_up_to_capacity_then_429_with_body_and_statuses(topology: Topology) {
    let mut t = start_on(topology, LIMITS, |_| {}).await;
    for expected_remaining in [2, 1, 0] {
        let r = t.should(req("test", vec![user("alice")], 0)).await;
        assert_eq!(code(&r), Code::Ok);
        let s = &r.statuses[0];
        assert_eq!(s.limit_remaining, expected_remaining);
        let limit = s.current_limit.as_ref().expect("limit reported");
        assert_eq!(limit.requests_per_unit, 3);
        assert_eq!(limit.name, "per-user");
        assert_eq!(limit.unit, 2, "MINUTE");
        // T0 is aligned to a minute: the window resets in exactly 60 s.
        assert_eq!(s.duration_until_reset.unwrap().seconds, 60);
        assert!(r.raw_body.is_empty(), "no body on OK");
        assert!(
            header(&r, "content-type").is_none(),
            "no content-type on OK"
        );
    }
    let r = t.should(req("test", vec![user("alice")], 0)).await;
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(
        String::from_utf8(r.raw_body.clone()).unwrap(),
        r#"{"error":{"message":"Rate limit exceeded","type":"rate_limit_error","code":"rate_limit_exceeded"}}"#
    );
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    // Another key has its own counter.
    let r = t.should(req("test", vec![user("bob")], 0)).await;
    assert_eq!(code(&r), Code::Ok);
    // The window resets at the next minute.
    t.clock.advance_ms(60_000);
    let r = t.should(req("test", vec![user("alice")], 0)).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 2);
    t.stop().await;
}

async fn request_hits_addend_zero_means_one_and_n_means_n(topology: Topology) {
    let mut t = start_on(topology, LIMITS, |_| {}).await;
    let r = t.should(req("test", vec![user("a")], 2)).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 1));
    // 2 more do not fit in the 1 left: denied, nothing debited.
    let r = t.should(req("test", vec![user("a")], 2)).await;
    assert_eq!(
        (code(&r), r.statuses[0].limit_remaining),
        (Code::OverLimit, 1)
    );
    let r = t.should(req("test", vec![user("a")], 0)).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 0));
    t.stop().await;
}

async fn per_descriptor_hits_override_and_present_zero_checks_only(topology: Topology) {
    let mut t = start_on(topology, LIMITS, |_| {}).await;
    let tokens = || desc(&[("kind", "tokens"), ("user", "u")]);
    // Check only: nothing debited, remaining stays at capacity.
    for _ in 0..3 {
        let r = t.should(req("test", vec![with_hits(tokens(), 0)], 7)).await;
        assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 100));
    }
    // Stream end: 60 tokens (overrides the request's 7).
    let r = t
        .should(req("test", vec![with_hits(tokens(), 60)], 7))
        .await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 40));
    // Without a per-descriptor value, the request's hits apply.
    let r = t.should(req("test", vec![tokens()], 40)).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 0));
    // Exhausted: a check-only request is now denied.
    let r = t.should(req("test", vec![with_hits(tokens(), 0)], 0)).await;
    assert_eq!(code(&r), Code::OverLimit);
    // The rolling window frees the hits 60 s after they were made.
    t.clock.advance_ms(59_999);
    let r = t.should(req("test", vec![with_hits(tokens(), 0)], 0)).await;
    assert_eq!(code(&r), Code::OverLimit);
    t.clock.advance_ms(1);
    let r = t.should(req("test", vec![with_hits(tokens(), 0)], 0)).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 100));
    t.stop().await;
}

async fn descriptor_limit_override_replaces_configured_limit(topology: Topology) {
    let mut t = start_on(topology, LIMITS, |_| {}).await;
    let d = || with_override(user("o"), 1, RateLimitUnit::Hour as i32);
    let r = t.should(req("test", vec![d()], 0)).await;
    assert_eq!(code(&r), Code::Ok);
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!((limit.requests_per_unit, limit.unit), (1, 3), "1 per HOUR");
    assert_eq!(
        code(&t.should(req("test", vec![d()], 0)).await),
        Code::OverLimit
    );
    // The configured per-user limit (3/min) was not touched.
    let r = t.should(req("test", vec![user("o")], 0)).await;
    assert_eq!(r.statuses[0].limit_remaining, 2);
    // Overrides work in a domain with no configured limits too.
    let other = || with_override(desc(&[("x", "y")]), 2, RateLimitUnit::Second as i32);
    assert_eq!(
        code(&t.should(req("nowhere", vec![other()], 0)).await),
        Code::Ok
    );
    assert_eq!(
        code(&t.should(req("nowhere", vec![other()], 0)).await),
        Code::Ok
    );
    assert_eq!(
        code(&t.should(req("nowhere", vec![other()], 0)).await),
        Code::OverLimit
    );
    t.stop().await;
}

async fn all_descriptors_must_pass_and_none_is_debited_on_denial(topology: Topology) {
    let mut t = start_on(topology, LIMITS, |_| {}).await;
    let org = || desc(&[("kind", "org"), ("org", "acme")]);
    // Use up the per-user limit of 3 while the org (5) has room.
    for _ in 0..3 {
        let r = t.should(req("test", vec![org(), user("z")], 0)).await;
        assert_eq!(code(&r), Code::Ok);
    }
    let r = t.should(req("test", vec![org(), user("z")], 0)).await;
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(r.statuses[0].code, Code::Ok as i32, "org had room");
    assert_eq!(r.statuses[1].code, Code::OverLimit as i32);
    // The denied request did not debit the org: 2 left, not 1.
    let r = t.should(req("test", vec![org()], 0)).await;
    assert_eq!(
        r.statuses[0].limit_remaining, 1,
        "5 - 3 admitted - this one"
    );
    // Unmatched descriptors report OK without a limit.
    let r = t
        .should(req("test", vec![desc(&[("nothing", "here")])], 0))
        .await;
    assert_eq!(code(&r), Code::Ok);
    assert!(r.statuses[0].current_limit.is_none());
    t.stop().await;
}

async fn draft03_headers_on_request(topology: Topology) {
    let mut t = start_on(topology, LIMITS, |c| c.response.draft03_headers = true).await;
    let org = || desc(&[("kind", "org"), ("org", "h")]);
    let r = t.should(req("test", vec![org(), user("h")], 0)).await;
    assert_eq!(
        header(&r, "x-ratelimit-limit"),
        Some(r#"3, 5;w=60;name="per-org", 3;w=60;name="per-user""#)
    );
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("2"));
    assert_eq!(header(&r, "x-ratelimit-reset"), Some("60"));
    t.clock.advance_ms(15_500);
    let r = t.should(req("test", vec![user("h")], 0)).await;
    assert_eq!(
        header(&r, "x-ratelimit-reset"),
        Some("45"),
        "44.5 s rounds up"
    );
    t.stop().await;
}

async fn kuadrant_check_does_not_debit_and_report_always_does(topology: Topology) {
    let mut t = start_on(topology, LIMITS, |_| {}).await;
    let tokens = || desc(&[("kind", "tokens"), ("user", "k")]);
    for _ in 0..5 {
        let r = t
            .kuadrant
            .check_rate_limit(req("test", vec![tokens()], 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 100));
    }
    // A check for more than is left is denied.
    let r = t
        .kuadrant
        .check_rate_limit(req("test", vec![tokens()], 101))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::OverLimit);
    // Report 90, then 30: the second overshoots (reports are never refused) and says so.
    let r = t
        .kuadrant
        .report(req("test", vec![tokens()], 90))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 10));
    let r = t
        .kuadrant
        .report(req("test", vec![tokens()], 30))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (code(&r), r.statuses[0].limit_remaining),
        (Code::OverLimit, 0)
    );
    // A report of 0 adds nothing.
    let r = t
        .kuadrant
        .report(req("test", vec![user("k")], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 3);
    // Now checks are denied.
    let r = t
        .kuadrant
        .check_rate_limit(req("test", vec![tokens()], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::OverLimit);
    assert!(!r.raw_body.is_empty());
    t.stop().await;
}

async fn sixty_four_concurrent_clients_admit_exactly_the_limit(topology: Topology) {
    let t = start_on(topology, LIMITS, |_| {}).await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        // One connection per client, like 64 Envoy workers.
        let mut rls = tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient::new(
            connect(t.server.grpc_addr).await,
        );
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u32;
            for _ in 0..25 {
                let d = desc(&[("kind", "big"), ("user", "hot")]);
                let r = rls
                    .should_rate_limit(req("test", vec![d], 0))
                    .await
                    .unwrap()
                    .into_inner();
                if r.overall_code == Code::Ok as i32 {
                    admitted += 1;
                }
            }
            admitted
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    // 64 x 25 = 1600 attempts against a limit of 1000.
    assert_eq!(total, 1000);
    t.stop().await;
}

async fn bad_input_is_invalid_argument_naming_the_field(topology: Topology) {
    let mut t = start_on(topology, LIMITS, |_| {}).await;
    let long = "x".repeat(2_000);
    let cases: Vec<(
        tally_proto::envoy::service::ratelimit::v3::RateLimitRequest,
        &str,
    )> = vec![
        (req("", vec![user("a")], 0), "domain"),
        (req(&long, vec![user("a")], 0), "domain"),
        (req("test", vec![], 0), "descriptors"),
        (req("test", vec![desc(&[])], 0), "descriptors[0].entries"),
        (
            req("test", vec![user("a"), desc(&[("", "v")])], 0),
            "descriptors[1].entries[0].key",
        ),
        (
            req("test", vec![desc(&[(long.as_str(), "v")])], 0),
            "descriptors[0].entries[0].key",
        ),
        (
            req("test", vec![desc(&[("k", long.as_str())])], 0),
            "descriptors[0].entries[0].value",
        ),
        (
            req("test", (0..65).map(|_| user("a")).collect(), 0),
            "descriptors",
        ),
        (
            req(
                "test",
                vec![desc(&(0..33).map(|_| ("k", "v")).collect::<Vec<_>>())],
                0,
            ),
            "descriptors[0].entries",
        ),
        (
            req("test", vec![with_override(user("a"), 1, 0)], 0),
            "descriptors[0].limit.unit",
        ),
        (
            req("test", vec![with_override(user("a"), 1, 42)], 0),
            "descriptors[0].limit.unit",
        ),
    ];
    for (r, field) in cases {
        let status = t.should_err(r.clone()).await;
        assert_eq!(
            status.code(),
            GrpcCode::InvalidArgument,
            "{field}: {status:?}"
        );
        assert!(
            status.message().starts_with(&format!("invalid {field}:")),
            "message {:?} names {field}",
            status.message()
        );
        // Kuadrant's services validate alike.
        let status = t.kuadrant.report(r).await.expect_err("refused");
        assert_eq!(status.code(), GrpcCode::InvalidArgument);
    }
    // Nothing of the refused requests was counted.
    let r = t.should(req("test", vec![user("a")], 0)).await;
    assert_eq!(r.statuses[0].limit_remaining, 2);
    t.stop().await;
}

async fn a_full_counter_table_refuses_new_counters_without_half_applying(topology: Topology) {
    let mut t = start_on(topology, LIMITS, |c| c.engine.max_counters = 2).await;
    assert_eq!(
        code(&t.should(req("test", vec![user("1")], 0)).await),
        Code::Ok
    );
    assert_eq!(
        code(&t.should(req("test", vec![user("2")], 0)).await),
        Code::Ok
    );
    let org = desc(&[("kind", "org"), ("org", "new")]);
    let status = t.should_err(req("test", vec![user("1"), org], 0)).await;
    assert_eq!(status.code(), GrpcCode::ResourceExhausted);
    // user 1 was not debited by the refused request.
    let r = t.should(req("test", vec![user("1")], 0)).await;
    assert_eq!(r.statuses[0].limit_remaining, 1);
    // Once the windows pass, idle counters are reclaimed and new keys fit again.
    t.clock.advance_ms(120_000);
    assert_eq!(
        code(&t.should(req("test", vec![user("3")], 0)).await),
        Code::Ok
    );
    t.stop().await;
}

/// Envoy's stream-done call: an input and an output usage descriptor of one request (with
/// its `x-request-id` as a `request_id` entry) make one usage record, however often the call
/// comes; a call without a request id counts once per call; Kuadrant's Report with its
/// request-level hits records too; a present 0 checks only and records nothing. The token
/// limit matching the same descriptors is debited as before.
async fn usage_descriptors_are_recorded_as_usage_once_per_request_id(topology: Topology) {
    let mut t = start_on(topology, LIMITS, |_| {}).await;
    let usage = |kind: &str, rid: Option<&str>, n: u64| {
        let mut entries = vec![
            ("kind", "tokens"),
            ("user", "alice"),
            ("usage", kind),
            ("api_key", "key-1"),
            ("model", "m1"),
            ("tag.team", "red"),
        ];
        if let Some(r) = rid {
            entries.push(("request_id", r));
        }
        with_hits(desc(&entries), n)
    };
    for _ in 0..3 {
        let r = t
            .should(req(
                "test",
                vec![
                    usage("input_tokens", Some("rq-1"), 20),
                    usage("output_tokens", Some("rq-1"), 5),
                ],
                0,
            ))
            .await;
        assert_eq!(code(&r), Code::Ok);
    }
    for _ in 0..2 {
        t.should(req("test", vec![usage("output_tokens", None, 1)], 0))
            .await;
    }
    // Check only: records nothing.
    t.should(req("test", vec![usage("output_tokens", None, 0)], 0))
        .await;
    let mut report = req(
        "test",
        vec![desc(&[("usage", "total_tokens"), ("subject", "key-2")])],
        7,
    );
    report.descriptors[0].hits_addend = None;
    t.kuadrant.report(report).await.unwrap();
    // This node's applied state (a follower's, with three nodes) once it holds the four.
    let node = t.server.node().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.read(|e| e.last_usage_seq()).await.unwrap() < 4 {
        assert!(Instant::now() < deadline, "four records applied within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let records = node
        .read(|e| e.export_usage(0, 100))
        .await
        .unwrap()
        .unwrap();
    let summary: Vec<(String, u64, u64, String)> = records
        .iter()
        .map(|r| {
            (
                r.who.subject.clone(),
                r.tokens.input,
                r.tokens.output,
                r.who.tags.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("key-1".into(), 20, 5, "team=red".into()),
            ("key-1".into(), 0, 1, "team=red".into()),
            ("key-1".into(), 0, 1, "team=red".into()),
            ("key-2".into(), 7, 0, String::new()),
        ]
    );
    assert_eq!(records[0].request_id, "rls:test:rq-1");
    assert_eq!(records[0].who.model, "m1");
    // The token limit (100 per rolling minute) saw every call's hits: 3 x 25 + 2 x 1.
    let probe = with_hits(desc(&[("kind", "tokens"), ("user", "alice")]), 0);
    let r = t.should(req("test", vec![probe], 0)).await;
    assert_eq!(r.statuses[0].limit_remaining, 100 - 77);
    // A usage descriptor without a subject is refused, naming it.
    let bad = with_hits(desc(&[("usage", "input_tokens")]), 3);
    let err = t.should_err(req("test", vec![bad], 0)).await;
    assert_eq!(err.code(), GrpcCode::InvalidArgument);
    assert!(
        err.message().contains("descriptors[0].entries"),
        "{}",
        err.message()
    );
    t.stop().await;
}

/// [`LIMITS`] with a hard daily token budget per subject and a soft request quota.
fn metered_limits() -> String {
    format!(
        "{LIMITS}metering:
  quotas:
    - name: soft-requests
      per: [subject]
      metric: requests
      limit: 1
      window: 1d
      enforcement: soft
    - name: daily-tokens
      per: [subject]
      metric: total_tokens
      limit: 100
      window: {{ fixed: day, time_zone: UTC }}
"
    )
}

/// Token budget exhausted → 429 on the next request: a request-time usage descriptor
/// (`hits_addend` 0) is checked against the hard quotas of its attribution; usage reported
/// through the stream-done call uses the budget up; the next check is OVER_LIMIT, with the
/// quota as the descriptor's limit. Soft quotas never refuse; Kuadrant's CheckRateLimit
/// checks alike and records nothing.
async fn a_used_up_token_budget_refuses_the_next_request_time_check(topology: Topology) {
    let mut t = start_on(topology, &metered_limits(), |c| {
        c.response.draft03_headers = true
    })
    .await;
    let usage = |subject: &str, hits: Option<u64>| {
        let mut d = desc(&[
            ("usage", "total_tokens"),
            ("subject", subject),
            ("model", "m1"),
        ]);
        d.hits_addend = hits;
        d
    };
    let r = t
        .should(req("test", vec![usage("key-q", Some(0))], 0))
        .await;
    assert_eq!(code(&r), Code::Ok);
    let limit = r.statuses[0].current_limit.as_ref().expect("the budget");
    assert_eq!(
        (limit.name.as_str(), limit.requests_per_unit),
        ("daily-tokens", 100)
    );
    assert_eq!(r.statuses[0].limit_remaining, 100);
    // Stream done: 60 tokens. The soft request quota (1 a day) is now full: no refusal.
    let r = t
        .should(req("test", vec![usage("key-q", Some(60))], 0))
        .await;
    assert_eq!(code(&r), Code::Ok);
    let r = t
        .should(req("test", vec![usage("key-q", Some(0))], 0))
        .await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 40));
    // 40 more: used up exactly.
    t.should(req("test", vec![usage("key-q", Some(40))], 0))
        .await;
    let r = t
        .should(req("test", vec![usage("key-q", Some(0))], 0))
        .await;
    assert_eq!(code(&r), Code::OverLimit);
    let s = &r.statuses[0];
    assert_eq!((s.code, s.limit_remaining), (Code::OverLimit as i32, 0));
    let limit = s.current_limit.as_ref().expect("the quota is named");
    assert_eq!(
        (limit.name.as_str(), limit.requests_per_unit, limit.unit),
        ("daily-tokens", 100, RateLimitUnit::Day as i32)
    );
    // T0 is noon UTC: the day's budget comes back at midnight.
    assert_eq!(s.duration_until_reset.unwrap().seconds, 12 * 3_600);
    assert!(!r.raw_body.is_empty());
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));
    // Another subject has its own budget; other descriptors keep their own status.
    let r = t
        .should(req("test", vec![user("q"), usage("key-r", Some(0))], 0))
        .await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(
        r.statuses[0].current_limit.as_ref().unwrap().name,
        "per-user"
    );
    // Kuadrant's CheckRateLimit checks every usage descriptor and records nothing.
    for (subject, expected) in [("key-q", Code::OverLimit), ("key-r", Code::Ok)] {
        let r = t
            .kuadrant
            .check_rate_limit(req("test", vec![usage(subject, None)], 5))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&r), expected, "{subject}");
    }
    let r = t
        .should(req("test", vec![usage("key-r", Some(0))], 0))
        .await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 100));
    // The next day the budget is back.
    t.clock.advance_ms(12 * 3_600_000);
    let r = t
        .should(req("test", vec![usage("key-q", Some(0))], 0))
        .await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 100));
    t.stop().await;
}

/// Envoy's reservation flow: a request-time `usage=reserve` descriptor holds its estimate under
/// `x-request-id`; the stream-done call with the same id settles it with the actual usage; a
/// stream whose end never comes is charged its estimate at the TTL; a call refused anyway
/// releases what it reserved.
async fn request_time_reservations_hold_the_budget_and_settle_at_stream_end_or_ttl(
    topology: Topology,
) {
    let mut t = start_on(topology, &metered_limits(), |_| {}).await;
    let reserve = |id: &str, estimate: u64| {
        let mut d = desc(&[
            ("usage", "reserve"),
            ("subject", "key-v"),
            ("request_id", id),
            ("reserve_ttl_s", "30"),
        ]);
        d.hits_addend = Some(estimate);
        d
    };
    let done = |id: &str, tokens: u64| {
        let mut d = desc(&[
            ("usage", "total_tokens"),
            ("subject", "key-v"),
            ("request_id", id),
        ]);
        d.hits_addend = Some(tokens);
        d
    };
    // 40 + 40 of the daily 100 held; a third 40 does not fit.
    for id in ["a", "b"] {
        let r = t.should(req("test", vec![reserve(id, 40)], 0)).await;
        assert_eq!(code(&r), Code::Ok, "{id}: {r:?}");
    }
    let r = t.should(req("test", vec![reserve("c", 40)], 0)).await;
    assert_eq!(code(&r), Code::OverLimit);
    let s = &r.statuses[0];
    assert_eq!(s.current_limit.as_ref().unwrap().name, "daily-tokens");
    assert_eq!(s.limit_remaining, 20);
    // a's stream ends having used 10: 10 used + 40 held by b leaves room for c.
    t.should(req("test", vec![done("a", 10)], 0)).await;
    // (A new request: a new x-request-id. Under "c" the first answer, a denial, repeats.)
    let r = t.should(req("test", vec![reserve("c", 40)], 0)).await;
    assert_eq!(
        code(&r),
        Code::OverLimit,
        "a retried id gets its first answer"
    );
    let r = t.should(req("test", vec![reserve("c2", 40)], 0)).await;
    assert_eq!(code(&r), Code::Ok);
    // A call refused by a rate limit releases its reservation: `alice` is over per-user.
    for _ in 0..3 {
        t.should(req("test", vec![user("alice")], 0)).await;
    }
    let r = t
        .should(req("test", vec![user("alice"), reserve("d", 10)], 0))
        .await;
    assert_eq!(code(&r), Code::OverLimit);
    // b and c never end: 31 s later both are charged their estimates (d, released, is not).
    t.clock.advance_ms(31_000);
    t.should(req("test", vec![done("tick", 1)], 0)).await;
    let node = t.server.node().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.read(|e| e.last_usage_seq()).await.unwrap() < 4 {
        assert!(Instant::now() < deadline, "four records applied within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let records = node
        .read(|e| e.export_usage(0, 100))
        .await
        .unwrap()
        .unwrap();
    let summary: Vec<(String, u64)> = records
        .iter()
        .map(|r| (r.request_id.clone(), r.tokens.total()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("rls:test:a".to_string(), 10),
            ("rls:test:b".to_string(), 40),
            ("rls:test:c2".to_string(), 40),
            ("rls:test:tick".to_string(), 1),
        ]
    );
    // A reserve descriptor without a request id is refused, naming the descriptor.
    let mut bad = desc(&[("usage", "reserve"), ("subject", "key-v")]);
    bad.hits_addend = Some(5);
    let e = t.should_err(req("test", vec![bad], 0)).await;
    assert_eq!(e.code(), GrpcCode::InvalidArgument);
    assert!(
        e.message().contains("descriptors[0]") && e.message().contains("request_id"),
        "{e:?}"
    );
    t.stop().await;
}
