//! The shipped Limitador and envoyproxy/ratelimit example files load and decide as those
//! projects document, through gRPC.

mod common;

use std::path::PathBuf;

use common::*;
use tally_server::server::LimitsSource;

fn example(path: &str) -> LimitsSource {
    LimitsSource::File(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(path),
    )
}

async fn start_file(path: &str) -> TestServer {
    start_with("", |c| c.limits = example(path)).await
}

/// Sends `n` identical requests and returns how many were admitted.
async fn admitted(t: &mut TestServer, domain: &str, entries: &[(&str, &str)], n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        if code(&t.should(req(domain, vec![desc(entries)], 0)).await) == Code::Ok {
            ok += 1;
        }
    }
    ok
}

#[tokio::test]
async fn limitador_file_decides_as_limitador() {
    let mut t = start_file("limitador/limits.yaml").await;
    let free = [("tier", "free"), ("api_key", "k1")];
    // The window opens at the first hit, not at a clock boundary.
    t.clock.advance_ms(10_000);
    assert_eq!(admitted(&mut t, "ai-gateway", &free, 7).await, 5);
    let r = t.should(req("ai-gateway", vec![desc(&free)], 0)).await;
    assert_eq!(r.statuses[0].duration_until_reset.unwrap().seconds, 60);
    t.clock.advance_ms(59_999);
    assert_eq!(admitted(&mut t, "ai-gateway", &free, 1).await, 0);
    t.clock.advance_ms(1);
    assert_eq!(admitted(&mut t, "ai-gateway", &free, 1).await, 1);
    // Another key has its own counter; premium has its own limit.
    assert_eq!(
        admitted(
            &mut t,
            "ai-gateway",
            &[("tier", "free"), ("api_key", "k2")],
            6
        )
        .await,
        5
    );
    assert_eq!(
        admitted(
            &mut t,
            "ai-gateway",
            &[("tier", "premium"), ("api_key", "k1")],
            25
        )
        .await,
        20
    );
    // max_value 0: always limited.
    assert_eq!(
        admitted(&mut t, "ai-gateway", &[("tier", "suspended")], 1).await,
        0
    );
    // A limit whose variable does not evaluate (no api_key) does not apply.
    assert_eq!(
        admitted(&mut t, "ai-gateway", &[("tier", "free")], 10).await,
        10
    );
    // The toystore example: 2 GETs per user per 30 s, health checks and POSTs unlimited.
    let get = |user| {
        [
            ("req.method", "GET"),
            ("req.path", "/toys"),
            ("user_id", user),
        ]
    };
    assert_eq!(admitted(&mut t, "toystore", &get("alice"), 3).await, 2);
    assert_eq!(admitted(&mut t, "toystore", &get("bob"), 3).await, 2);
    let health = [
        ("req.method", "GET"),
        ("req.path", "/health"),
        ("user_id", "alice"),
    ];
    assert_eq!(admitted(&mut t, "toystore", &health, 5).await, 5);
    let post = [
        ("req.method", "POST"),
        ("req.path", "/toys"),
        ("user_id", "alice"),
    ];
    assert_eq!(admitted(&mut t, "toystore", &post, 5).await, 5);
    t.stop().await;
}

#[tokio::test]
async fn envoy_ratelimit_file_decides_as_envoyproxy_ratelimit() {
    let mut t = start_file("envoy-ratelimit/config.yaml").await;
    let d = "ai-gateway";
    // Key-only node: 60 per minute per key value.
    assert_eq!(admitted(&mut t, d, &[("api_key", "k1")], 61).await, 60);
    assert_eq!(admitted(&mut t, d, &[("api_key", "k2")], 1).await, 1);
    // An exact value wins over the key-only node: unlimited.
    let r = t
        .should(req(d, vec![desc(&[("api_key", "internal-batch")])], 0))
        .await;
    assert_eq!(code(&r), Code::Ok);
    assert!(r.statuses[0].current_limit.is_none());
    assert_eq!(r.statuses[0].limit_remaining, u32::MAX);
    assert_eq!(
        admitted(&mut t, d, &[("api_key", "internal-batch")], 100).await,
        100
    );
    // A wildcard wins over the key-only node: 5 per minute per key.
    assert_eq!(admitted(&mut t, d, &[("api_key", "trial-abc")], 7).await, 5);
    let r = t
        .should(req(d, vec![desc(&[("api_key", "trial-abc")])], 0))
        .await;
    assert_eq!(
        r.statuses[0].current_limit.as_ref().unwrap().name,
        "trial-keys"
    );
    // Depth 2: the (key, model) limit alone applies, not the depth-1 per-key limit.
    let r = t
        .should(req(d, vec![desc(&[("api_key", "k1"), ("model", "m")])], 0))
        .await;
    assert_eq!(
        code(&r),
        Code::Ok,
        "k1's per-key minute is used up, but depth 2 is another limit"
    );
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        600
    );
    // Exact value beats key-only at depth 2 as well.
    let r = t
        .should(req(
            d,
            vec![desc(&[("tier", "free"), ("model", "gpt-4o")])],
            0,
        ))
        .await;
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        50
    );
    let r = t
        .should(req(
            d,
            vec![desc(&[("tier", "free"), ("model", "llama")])],
            0,
        ))
        .await;
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        100
    );
    // A descriptor deeper or shallower than any limit matches nothing.
    let r = t.should(req(d, vec![desc(&[("tier", "free")])], 0)).await;
    assert!(r.statuses[0].current_limit.is_none());
    // `replaces`: with the enterprise descriptor present, per-key no longer applies.
    let ent = || vec![desc(&[("tier", "enterprise")]), desc(&[("api_key", "k3")])];
    let mut ok = 0;
    for _ in 0..70 {
        if code(&t.should(req(d, ent(), 0)).await) == Code::Ok {
            ok += 1;
        }
    }
    assert_eq!(
        ok, 70,
        "per-key (60/min) was replaced by enterprise (1000/min)"
    );
    let r = t.should(req(d, ent(), 0)).await;
    assert!(
        r.statuses[1].current_limit.is_none(),
        "the replaced limit is not reported"
    );
    // Minute windows are aligned to the clock.
    t.clock.advance_ms(60_000);
    assert_eq!(admitted(&mut t, d, &[("api_key", "k1")], 1).await, 1);
    t.stop().await;
}

#[tokio::test]
async fn shadow_mode_counts_and_reports_but_never_denies() {
    let yaml = r#"
domains:
  - domain: d
    limits:
      - name: trial
        match: { kind: req }
        by: [user]
        capacity: 1
        window: 1m
        shadow: true
"#;
    let mut t = start(yaml).await;
    for _ in 0..3 {
        let r = t
            .should(req("d", vec![desc(&[("kind", "req"), ("user", "u")])], 0))
            .await;
        assert_eq!(code(&r), Code::Ok);
        assert_eq!(r.statuses[0].code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, 0);
    }
    t.stop().await;
}
