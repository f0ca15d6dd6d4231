//! Three-node clusters on 127.0.0.1: replication, forwarding, linearizable reads on every
//! node, failover, restart, catch-up by snapshot, and a minority that answers UNAVAILABLE
//! within the caller's deadline.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tally_proto::tally::v1::admin_client::AdminClient;
use tally_proto::tally::v1::{AddLearnerRequest, GetStatusRequest, PromoteRequest};
use tally_server::node::ManualClock;
use tally_server::server::{LimitsSource, ServerConfig};
use tonic::transport::Channel;

const LIMITS: &str = r#"
domains:
  - domain: test
    limits:
      - name: per-user
        match: { kind: req }
        by: [user]
        capacity: 5
        window: 1h
      - name: hot
        match: { kind: hot }
        by: [user]
        capacity: 1000
        window: 1h
"#;

fn base() -> ServerConfig {
    ServerConfig {
        limits: LimitsSource::Inline {
            origin: "test limits".into(),
            text: LIMITS.into(),
        },
        timings: fast_timings(),
        ..ServerConfig::default()
    }
}

async fn ask(
    rls: &mut RateLimitServiceClient<Channel>,
    kind: &str,
    user: &str,
) -> Result<Code, tonic::Status> {
    let r = rls
        .should_rate_limit(req(
            "test",
            vec![desc(&[("kind", kind), ("user", user)])],
            0,
        ))
        .await?;
    Ok(code(&r.into_inner()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_followers_forward() {
    let c = Cluster::three(base(), Arc::new(ManualClock::new(T0_MS))).await;
    let status = c.status_from(2).await;
    assert_eq!(status.members.len(), 3);
    assert!(status.members.iter().all(|m| m.voter));
    assert_eq!(
        status.answered_by,
        status.leader_id.unwrap(),
        "a follower passes status on"
    );
    // 5 per hour per user, asked of all three nodes: exactly 5 admitted.
    let mut admitted = 0;
    for round in 0..3 {
        for i in 1..=3 {
            let _ = round;
            if ask(&mut c.rls(i).await, "req", "u").await.unwrap() == Code::Ok {
                admitted += 1;
            }
        }
    }
    assert_eq!(admitted, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_never_over_admits_or_loses_an_ack() {
    let mut c = Cluster::three(base(), Arc::new(ManualClock::new(T0_MS))).await;
    let leader = c.leader(None).await as usize;
    let followers: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
    let mut clients = Vec::new();
    for k in 0..64 {
        // Clients spread over all three nodes, as Envoy pointed at all of them would be.
        clients.push(c.rls(1 + k % 3).await);
    }
    let mut tasks = Vec::new();
    for mut rls in clients {
        tasks.push(tokio::spawn(async move {
            let mut acked = 0u32;
            let stop_at = Instant::now() + Duration::from_secs(4);
            for _ in 0..40 {
                if Instant::now() > stop_at {
                    break;
                }
                match ask(&mut rls, "hot", "h").await {
                    Ok(Code::Ok) => acked += 1,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.stop(leader).await;
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    assert!(acked <= 1000, "admitted {acked} > 1000");
    // Every acknowledged hit is in the new leader's counter: a check-only request sees
    // exactly 1000 - used remaining, and used >= acked.
    let new_leader = c.leader(Some(leader as u64)).await as usize;
    assert!(followers.contains(&new_leader));
    let mut rls = c.rls(new_leader).await;
    let probe = with_hits(desc(&[("kind", "hot"), ("user", "h")]), 0);
    let r = rls
        .should_rate_limit(req("test", vec![probe], 0))
        .await
        .unwrap()
        .into_inner();
    let used = 1000 - r.statuses[0].limit_remaining;
    assert!(
        used >= acked,
        "acknowledged {acked} but the counter holds {used}"
    );
    assert!(acked > 0, "some traffic got through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_of_every_node_keeps_counters() {
    let mut c = Cluster::three(base(), Arc::new(ManualClock::new(T0_MS))).await;
    let mut rls = c.rls(1).await;
    for _ in 0..3 {
        assert_eq!(ask(&mut rls, "req", "r").await.unwrap(), Code::Ok);
    }
    for i in 1..=3 {
        c.stop(i).await;
    }
    for i in 1..=3 {
        c.start_node(i, false).await;
    }
    for i in 1..=3 {
        c.node(i).wait_ready(Duration::from_secs(15)).await.unwrap();
    }
    let mut rls = c.rls(2).await;
    assert_eq!(ask(&mut rls, "req", "r").await.unwrap(), Code::Ok);
    assert_eq!(ask(&mut rls, "req", "r").await.unwrap(), Code::Ok);
    assert_eq!(
        ask(&mut rls, "req", "r").await.unwrap(),
        Code::OverLimit,
        "3 before + 2 after = 5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_catches_up_by_snapshot() {
    let mut c = Cluster::three(base(), Arc::new(ManualClock::new(T0_MS))).await;
    let leader = c.leader(None).await as usize;
    let victim = if leader == 3 { 2 } else { 3 };
    c.stop(victim).await;
    std::fs::remove_dir_all(c.dir.path().join(format!("node-{victim}"))).unwrap();
    // Enough entries for snapshots (every 500) and log purges on the leader.
    let mut rls = c.rls(leader).await;
    for n in 0..1_200 {
        let user = format!("s{n}");
        assert_eq!(ask(&mut rls, "req", &user).await.unwrap(), Code::Ok);
    }
    c.start_node(victim, false).await;
    c.node(victim)
        .wait_ready(Duration::from_secs(15))
        .await
        .unwrap();
    // The wiped node holds counters it never saw as log entries: the leader purged those
    // entries behind its snapshots (no entries are kept behind a snapshot in these tests), so
    // they can only have come in a snapshot. The engine's apply count, which a snapshot does
    // not carry, tells the two apart.
    let mut admin = AdminClient::new(connect(c.node(victim).grpc_addr).await);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let s = admin
            .get_status(GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.live_counters >= 1_200 {
            break s;
        }
        assert!(Instant::now() < deadline, "caught up within 15 s: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.applied_commands < 1_000,
        "caught up by snapshot, not by replaying 1200 commands: {status:?}"
    );
    // And it decides with them once it leads.
    c.stop(leader).await;
    let new_leader = c.leader(Some(leader as u64)).await as usize;
    let mut rls = c.rls(new_leader).await;
    let probe = with_hits(desc(&[("kind", "req"), ("user", "s7")]), 0);
    let r = rls
        .should_rate_limit(req("test", vec![probe], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_answers_unavailable_within_the_deadline() {
    let mut c = Cluster::three(base(), Arc::new(ManualClock::new(T0_MS))).await;
    let leader = c.leader(None).await as usize;
    let others: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
    // Keep one follower; stop the leader and the other follower: no quorum.
    c.stop(leader).await;
    c.stop(others[1]).await;
    let survivor = others[0];
    let mut rls = c.rls(survivor).await;
    for _ in 0..3 {
        let mut r = tonic::Request::new(req(
            "test",
            vec![desc(&[("kind", "req"), ("user", "m")])],
            0,
        ));
        r.set_timeout(Duration::from_millis(200));
        r.metadata_mut()
            .insert("x-envoy-expected-rq-timeout-ms", "200".parse().unwrap());
        let started = Instant::now();
        let status = rls
            .should_rate_limit(r)
            .await
            .expect_err("no quorum, no decision");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
    }
}

/// Waits until node `i`'s engine holds at least `counters` counters.
async fn wait_counters(
    c: &Cluster,
    i: usize,
    counters: u64,
) -> tally_proto::tally::v1::GetStatusResponse {
    let mut admin = AdminClient::new(connect(c.node(i).grpc_addr).await);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = admin
            .get_status(GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.live_counters >= counters {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "node {i} caught up within 15 s: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_write_recovers_the_prefix_and_catches_up() {
    let mut c = Cluster::three(base(), Arc::new(ManualClock::new(T0_MS))).await;
    let leader = c.leader(None).await as usize;
    let victim = if leader == 3 { 2 } else { 3 };
    let mut rls = c.rls(leader).await;
    for n in 0..50 {
        assert_eq!(
            ask(&mut rls, "req", &format!("t{n}")).await.unwrap(),
            Code::Ok
        );
    }
    wait_counters(&c, victim, 50).await;
    c.stop(victim).await;
    // Tear the newest log file mid-record, as a crash during a write would.
    let log_dir = c.dir.path().join(format!("node-{victim}/log"));
    let newest = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && std::fs::metadata(p).unwrap().len() > 0)
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .expect("a log file");
    let len = std::fs::metadata(&newest).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    for n in 50..80 {
        assert_eq!(
            ask(&mut rls, "req", &format!("t{n}")).await.unwrap(),
            Code::Ok
        );
    }
    c.start_node(victim, false).await;
    c.node(victim)
        .wait_ready(Duration::from_secs(15))
        .await
        .unwrap();
    wait_counters(&c, victim, 80).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_never_rejoins_and_a_new_one_is_added_under_load() {
    let mut c = Cluster::three(base(), Arc::new(ManualClock::new(T0_MS))).await;
    let mut admin = c.cluster_client(1).await;
    admin
        .remove(tally_proto::tally::v1::RemoveRequest { id: 3 })
        .await
        .unwrap();
    c.stop(3).await;
    // Its id is retired everywhere, and its old state refuses to start.
    let refused = admin
        .add_learner(AddLearnerRequest {
            id: 3,
            addr: c.raft_addrs[2].to_string(),
        })
        .await
        .expect_err("a removed id is never reused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    // Back with its old state: it either refuses to start (it applied its own retirement)
    // or the cluster refuses it (its votes and forwarded commands are turned away), so it
    // never becomes ready.
    c.start_node(3, false).await;
    let outcome = c.node(3).wait_ready(Duration::from_secs(3)).await;
    assert!(outcome.is_err(), "a removed node must not rejoin");
    let _ = c.nodes[2].take().unwrap().stop().await;

    // A new node (id 4, empty directory) joins under load, catches up and is promoted.
    let load = {
        let mut rls = c.rls(1).await;
        tokio::spawn(async move {
            for n in 0..400 {
                let _ = ask(&mut rls, "req", &format!("l{n}")).await;
            }
        })
    };
    c.start_node_as(3, 4, false).await;
    admin
        .add_learner(AddLearnerRequest {
            id: 4,
            addr: c.raft_addrs[2].to_string(),
        })
        .await
        .unwrap();
    admin.promote(PromoteRequest { id: 4 }).await.unwrap();
    load.await.unwrap();
    let status = c.status_from(1).await;
    let member = status
        .members
        .iter()
        .find(|m| m.id == 4)
        .expect("node 4 is a member");
    assert!(member.voter);
    assert!(status.members.iter().all(|m| m.id != 3));
    wait_counters(&c, 3, 400).await;
}

/// `fast` limits are answered from the leader's speculative state before commit; `strict`
/// ones only after. A leader cut off from its followers shows the difference: it answers fast
/// requests until its in-flight window and the batch being gathered (the documented loss
/// bound) are full, while strict ones get UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_limits_answer_before_commit_and_strict_ones_wait() {
    let mixed = r#"
domains:
  - domain: test
    limits:
      - name: fast-requests
        match: { kind: fast }
        by: [user]
        ack: fast
        capacity: 3
        window: 1h
      - name: strict-requests
        match: { kind: req }
        by: [user]
        capacity: 100
        window: 1h
"#;
    let mut config = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "mixed".into(),
            text: mixed.into(),
        },
        ..base()
    };
    // A window of four uncommitted batches plus the one being gathered, of two commands at
    // most: the bound on what fast acks can lose.
    config.batch.max_inflight_batches = 4;
    config.batch.max_batch_commands = 2;
    let mut c = Cluster::three(config, Arc::new(ManualClock::new(T0_MS))).await;
    let leader = c.leader(None).await as usize;
    // Give the new term's speculative engine a committed batch to start from.
    let mut rls = c.rls(leader).await;
    assert_eq!(ask(&mut rls, "req", "warm").await.unwrap(), Code::Ok);
    for i in (1..=3).filter(|i| *i != leader) {
        c.stop(i).await;
    }
    // As Envoy calls: its expected timeout in a header, our client a little more patient.
    let request = |kind: &str, user: &str| {
        let mut r = tonic::Request::new(req(
            "test",
            vec![desc(&[("kind", kind), ("user", user)])],
            0,
        ));
        r.set_timeout(Duration::from_millis(600));
        r.metadata_mut()
            .insert("x-envoy-expected-rq-timeout-ms", "300".parse().unwrap());
        r
    };
    // Fast: decided and answered with no quorum, exactly as a committed decision would be.
    for expected in [Code::Ok, Code::Ok, Code::Ok, Code::OverLimit] {
        let r = request("fast", "f");
        let answer = rls
            .should_rate_limit(r)
            .await
            .expect("fast limits answer without quorum");
        assert_eq!(code(&answer.into_inner()), expected);
    }
    // The in-flight window is full (four one-command batches): the next batch gathers
    // commands and answers fast ones at once, up to its two commands...
    for _ in 0..2 {
        let r = request("fast", "g");
        let answer = rls
            .should_rate_limit(r)
            .await
            .expect("the gathering batch answers fast limits");
        assert_eq!(code(&answer.into_inner()), Code::Ok);
    }
    // ...and once it is full, even a fast request waits for a commit.
    let r = request("fast", "g");
    let status = rls.should_rate_limit(r).await.expect_err("window full");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // Strict: no commit, no answer within the deadline.
    let r = request("req", "s");
    let status = rls
        .should_rate_limit(r)
        .await
        .expect_err("strict waits for a quorum");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

/// Every usage report is sent twice (a retry after a lost answer) and retried on another
/// node until answered, while the leader is killed: each counts exactly once, and every
/// retry is answered with the first outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reports_retried_across_a_leader_failover_count_once() {
    use tally_server::engine::usage::{Attribution, ReportUsage, Tokens, UsageResult};
    use tally_server::engine::{Command, Outcome};
    const TASKS: usize = 16;
    const REPORTS: usize = 25;
    let mut c = Cluster::three(base(), Arc::new(ManualClock::new(T0_MS))).await;
    let leader = c.leader(None).await as usize;
    let nodes: Vec<_> = (1..=3).map(|i| c.node(i).node().unwrap()).collect();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let nodes = nodes.clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for j in 0..REPORTS {
                let cmd = Command::ReportUsage(ReportUsage {
                    request_id: format!("req-{t}-{j}"),
                    who: Attribution {
                        subject: format!("key-{t}"),
                        ..Attribution::default()
                    },
                    tokens: Tokens {
                        input: 10,
                        output: j as u64,
                        ..Tokens::default()
                    },
                });
                let (mut sent, mut attempt) = (0, 0);
                let stop_at = Instant::now() + Duration::from_secs(20);
                while sent < 2 {
                    assert!(Instant::now() < stop_at, "answered within 20 s");
                    // Each attempt goes to the next node: a dead one is left behind.
                    attempt += 1;
                    let node = &nodes[(t + j + attempt) % 3];
                    let answer =
                        tokio::time::timeout(Duration::from_secs(1), node.propose(cmd.clone()))
                            .await;
                    match answer {
                        Ok(Ok(Outcome::Usage(r))) => {
                            answers.push(r);
                            sent += 1;
                        }
                        Ok(Ok(other)) => panic!("{other:?}"),
                        Ok(Err(_)) | Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.stop(leader).await;
    let mut first: std::collections::HashMap<String, UsageResult> = Default::default();
    let mut duplicates = 0;
    for task in tasks {
        for r in task.await.unwrap() {
            match first.get(&r.request_id) {
                None => {
                    // The first answer seen may itself be a retry's, if the first send's
                    // answer was lost with the leader.
                    first.insert(r.request_id.clone(), r.result);
                }
                Some(f) => {
                    assert!(
                        r.duplicate,
                        "second answer for {} not a duplicate",
                        r.request_id
                    );
                    assert_eq!(
                        &r.result, f,
                        "retry of {} answered differently",
                        r.request_id
                    );
                    duplicates += 1;
                }
            }
        }
    }
    assert_eq!(first.len(), TASKS * REPORTS);
    assert!(
        duplicates >= TASKS * REPORTS - TASKS,
        "retries answered as duplicates"
    );
    let new_leader = c.leader(Some(leader as u64)).await as usize;
    let records = c
        .node(new_leader)
        .node()
        .unwrap()
        .read_linearizable(|e| e.export_usage(0, 10_000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(records.len(), TASKS * REPORTS, "one record per request id");
    let ids: std::collections::BTreeSet<_> = records.iter().map(|r| &r.request_id).collect();
    assert_eq!(ids.len(), TASKS * REPORTS);
    for r in &records {
        let Some(UsageResult::Recorded { seq, .. }) = first.get(&r.request_id) else {
            panic!("{} recorded but never answered as recorded", r.request_id)
        };
        assert_eq!(*seq, r.seq, "answer and ledger agree on {}", r.request_id);
    }
}

/// 64 concurrent streams, spread over all three nodes, reserve an estimate against a hard
/// token budget while none has settled: exactly as many are admitted as the budget holds
/// (never more). Then they commit (actual ≤ estimate) or release, concurrently: every hold
/// is freed and exactly the committed usage is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_reservations_never_exceed_a_hard_budget() {
    use tally_server::engine::usage::{Attribution, Commit, Reserve, Tokens, UsageResult};
    use tally_server::engine::{Command, Outcome};
    const STREAMS: usize = 64;
    const BUDGET: u64 = 2_000;
    const ESTIMATE: u64 = 150;
    let text = format!(
        "{LIMITS}\nmetering:\n  quotas:\n    - name: budget\n      per: [subject]\n      metric: total_tokens\n      limit: {BUDGET}\n      window: 1h\n"
    );
    let config = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "test limits".into(),
            text,
        },
        ..base()
    };
    let c = Cluster::three(config, Arc::new(ManualClock::new(T0_MS))).await;
    let nodes: Vec<_> = (1..=3).map(|i| c.node(i).node().unwrap()).collect();
    let propose = |s: usize, cmd: Command| {
        let node = nodes[s % 3].clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(Duration::from_secs(10), node.propose(cmd))
                .await
                .expect("answered in time")
                .expect("proposed");
            match answer {
                Outcome::Usage(r) => r.result,
                other => panic!("{other:?}"),
            }
        })
    };
    let reserves: Vec<_> = (0..STREAMS)
        .map(|s| {
            let cmd = Command::Reserve(Reserve {
                request_id: format!("stream-{s}"),
                who: Attribution {
                    subject: "key".into(),
                    ..Attribution::default()
                },
                estimate: Tokens {
                    input: ESTIMATE,
                    ..Tokens::default()
                },
                ttl_ms: 60_000,
                charge_on_expiry: false,
            });
            propose(s, cmd)
        })
        .collect();
    let mut admitted = Vec::new();
    for (s, t) in reserves.into_iter().enumerate() {
        match t.await.unwrap() {
            UsageResult::Reserved { .. } => admitted.push(s),
            UsageResult::Denied { standing } => {
                assert!(
                    standing.used + standing.reserved + ESTIMATE > BUDGET,
                    "{standing:?}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        admitted.len() as u64,
        BUDGET / ESTIMATE,
        "admitted {admitted:?}"
    );
    // Even streams finish having used 100 tokens; odd ones are cancelled.
    let settles: Vec<_> = admitted
        .iter()
        .map(|&s| {
            let request_id = format!("stream-{s}");
            let cmd = if s % 2 == 0 {
                Command::Commit(Commit {
                    request_id,
                    tokens: Tokens {
                        input: 50,
                        output: 50,
                        ..Tokens::default()
                    },
                })
            } else {
                Command::Release { request_id }
            };
            propose(s, cmd)
        })
        .collect();
    for t in settles {
        let r = t.await.unwrap();
        assert!(
            matches!(
                r,
                UsageResult::Recorded { .. } | UsageResult::Released { found: true }
            ),
            "{r:?}"
        );
    }
    let committed = admitted.iter().filter(|s| *s % 2 == 0).count() as u64;
    let leader = c.leader(None).await as usize;
    let standing = c
        .node(leader)
        .node()
        .unwrap()
        .read_linearizable(|e| e.usage_overview("key", ""))
        .await
        .unwrap();
    assert_eq!(standing.len(), 1);
    assert_eq!(standing[0].reserved, 0, "every hold was settled");
    assert_eq!(standing[0].used, committed * 100);
}

/// Linearizable reads on any node, through a leader change: once a report is acknowledged (by
/// whichever node took it), every running node's `read_linearizable` holds it — followers take
/// the leader's read index and apply up to it — and after the leader is killed, the survivors
/// read through the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_on_every_node_see_every_acknowledged_write() {
    use tally_server::engine::usage::{Attribution, ReportUsage, Tokens};
    use tally_server::engine::{Command, Outcome};
    let mut c = Cluster::three(base(), Arc::new(ManualClock::new(T0_MS))).await;
    let leader = c.leader(None).await as usize;
    let report = |n: usize| {
        Command::ReportUsage(ReportUsage {
            request_id: format!("r-{n}"),
            who: Attribution {
                subject: "key".into(),
                ..Attribution::default()
            },
            tokens: Tokens {
                input: 1,
                ..Tokens::default()
            },
        })
    };
    let mut running: Vec<usize> = vec![1, 2, 3];
    let mut acknowledged = 0;
    for round in 0..2 {
        if round == 1 {
            c.stop(leader).await;
            running.retain(|i| *i != leader);
            c.leader(Some(leader as u64)).await;
        }
        let nodes: Vec<_> = running
            .iter()
            .map(|i| (*i, c.node(*i).node().unwrap()))
            .collect();
        for k in 0..9 {
            let (by, writer) = &nodes[k % nodes.len()];
            let answer = tokio::time::timeout(Duration::from_secs(5), async {
                // Proposals may fail while a new leader settles in; retried until acknowledged.
                loop {
                    match writer.propose(report(acknowledged + 1)).await {
                        Ok(outcome) => return outcome,
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("node {by} acknowledges a report"));
            assert!(matches!(answer, Outcome::Usage(_)), "{answer:?}");
            acknowledged += 1;
            for (i, node) in &nodes {
                let records = tokio::time::timeout(
                    Duration::from_secs(3),
                    node.read_linearizable(|e| e.export_usage(0, 10_000)),
                )
                .await
                .unwrap_or_else(|_| panic!("node {i} reads within its bound"))
                .unwrap_or_else(|e| panic!("node {i} reads: {e}"))
                .unwrap();
                assert_eq!(
                    records.len(),
                    acknowledged,
                    "node {i} holds every acknowledged report"
                );
            }
        }
    }
}
