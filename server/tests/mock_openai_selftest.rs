//! The OpenAI-compatible mock upstream the Envoy end-to-end tests proxy to
//! (`common::mock_openai`), tested on its own over raw HTTP/1.1 on 127.0.0.1.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::http1 as client;
use common::mock_openai::{Ending, MockOpenAi, Usage};
use serde_json::{Value, json};

/// Every test finishes within this, or fails.
const LIMIT: Duration = Duration::from_secs(20);

async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test finishes within 20 s");
}

fn chat(stream: bool) -> Value {
    let mut body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 64,
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn usage(p: u64, c: u64) -> Value {
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

#[tokio::test]
async fn json_reply_carries_the_configured_usage() {
    bounded(async {
        let mock = MockOpenAi::start().await;
        mock.set_tokens(7, 11);
        let r = client::post_json(mock.addr(), "/v1/chat/completions", &[], &chat(false))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v = r.json().await.unwrap();
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
        assert_eq!(v["object"], "chat.completion");
        assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
        assert_eq!(v["model"], "gpt-4o-mini");
        assert_eq!(v["choices"][0]["index"], 0);
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert!(v["choices"][0]["message"]["content"].is_string());
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"], usage(7, 11));

        // The configuration changes between requests.
        mock.set_tokens(100, 1);
        let v = client::post_json(mock.addr(), "/v1/chat/completions", &[], &chat(false))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["usage"], usage(100, 1));

        let served = mock.requests();
        assert_eq!(served.len(), 2);
        assert_eq!(mock.count(), 2);
        let s = &served[0];
        assert_eq!(
            (s.seq, s.method.as_str(), s.path.as_str()),
            (0, "POST", "/v1/chat/completions")
        );
        assert_eq!(s.model.as_deref(), Some("gpt-4o-mini"));
        assert!(!s.stream);
        assert_eq!(s.max_tokens, Some(64));
        assert_eq!(s.status, 200);
        assert_eq!(s.ending, Ending::Complete);
        assert_eq!(
            s.usage,
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 11,
                total_tokens: 18
            })
        );
        assert_eq!(s.header("content-type"), Some("application/json"));
        mock.stop().await;
    })
    .await
}

#[tokio::test]
async fn request_headers_override_counts_and_are_recorded() {
    bounded(async {
        let mock = MockOpenAi::start().await;
        mock.set_tokens(5, 5);
        let headers = [
            ("x-mock-prompt-tokens", "123"),
            ("x-mock-completion-tokens", "456"),
            ("x-tally-user", "alice"),
            ("X-Tally-Key-Id", "k1"),
        ];
        let v = client::post_json(mock.addr(), "/v1/chat/completions", &headers, &chat(false))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["usage"], usage(123, 456));
        // Only the prompt count overridden: the completion count is the configured one.
        let v = client::post_json(
            mock.addr(),
            "/v1/chat/completions",
            &[("x-mock-prompt-tokens", "1")],
            &chat(false),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        assert_eq!(v["usage"], usage(1, 5));

        let served = mock.chat_requests();
        assert_eq!(served[0].header("x-tally-user"), Some("alice"));
        assert_eq!(served[0].header("x-tally-key-id"), Some("k1"));
        assert_eq!(
            served[0].headers_with_prefix("X-Tally-"),
            vec![("x-tally-user", "alice"), ("x-tally-key-id", "k1")]
        );
        assert_eq!(served[1].header("x-tally-user"), None);

        // A malformed control header is a 400, recorded as such.
        let r = client::post_json(
            mock.addr(),
            "/v1/chat/completions",
            &[("x-mock-completion-tokens", "lots")],
            &chat(false),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 400);
        let v = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(mock.last().unwrap().status, 400);

        // A forced upstream error.
        let r = client::post_json(
            mock.addr(),
            "/v1/chat/completions",
            &[("x-mock-status", "503")],
            &chat(true),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.json().await.unwrap()["error"]["type"], "server_error");
        let last = mock.last().unwrap();
        assert_eq!((last.status, last.usage), (503, None));
        mock.stop().await;
    })
    .await
}

#[tokio::test]
async fn stream_arrives_chunk_by_chunk_and_ends_with_usage_and_done() {
    bounded(async {
        let mock = MockOpenAi::start().await;
        mock.set_tokens(3, 4);
        let started = Instant::now();
        let mut r = client::post_json(
            mock.addr(),
            "/v1/chat/completions",
            &[
                ("x-mock-delay-ms", "150"),
                ("x-mock-chunk-delay-ms", "120"),
                ("x-mock-chunks", "4"),
                ("x-mock-completion-tokens", "9"),
            ],
            &chat(true),
        )
        .await
        .unwrap();
        let first_byte = started.elapsed();
        assert!(first_byte >= Duration::from_millis(150), "{first_byte:?}");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));

        // One HTTP chunk per event, the k-th no sooner than 150 + k × 120 ms after the request
        // (the mock waits between events; lower bounds only, so a loaded machine passes).
        let mut chunks = Vec::new();
        while let Some(c) = r.next_chunk().await.unwrap() {
            let k = chunks.len() as u32;
            let at = started.elapsed();
            assert!(
                at >= Duration::from_millis(150) + k * Duration::from_millis(120),
                "event {k} at {at:?}"
            );
            chunks.push(String::from_utf8(c).unwrap());
        }
        assert_eq!(chunks.len(), 4 + 2, "{chunks:?}");
        let mut id = None;
        for (i, c) in chunks[..4].iter().enumerate() {
            let data = c
                .strip_prefix("data: ")
                .and_then(|c| c.strip_suffix("\n\n"))
                .unwrap_or_else(|| panic!("{c:?}"));
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["object"], "chat.completion.chunk");
            assert_eq!(v["model"], "gpt-4o-mini");
            assert_eq!(*id.get_or_insert(v["id"].clone()), v["id"]);
            assert_eq!(v["choices"][0]["index"], 0);
            assert!(v["choices"][0]["delta"]["content"].is_string(), "{v}");
            let finish = if i == 3 { json!("stop") } else { Value::Null };
            assert_eq!(v["choices"][0]["finish_reason"], finish);
            assert!(v.get("usage").is_none());
        }
        let data = chunks[4]
            .strip_prefix("data: ")
            .and_then(|c| c.strip_suffix("\n\n"))
            .unwrap();
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["id"], id.unwrap());
        assert_eq!(v["choices"], json!([]));
        assert_eq!(v["usage"], usage(3, 9));
        assert_eq!(chunks[5], "data: [DONE]\n\n");

        let served = mock
            .wait_until(Duration::from_secs(5), |r| {
                r.len() == 1 && r[0].ending == Ending::Complete
            })
            .await;
        let s = &served[0];
        assert!(s.stream && s.include_usage);
        assert_eq!(s.events_sent, 6);
        assert_eq!(s.usage.unwrap().total_tokens, 12);
        mock.stop().await;
    })
    .await
}

#[tokio::test]
async fn stream_has_usage_even_without_include_usage() {
    bounded(async {
        let mock = MockOpenAi::start().await;
        mock.set_tokens(2, 3);
        mock.set_chunks(1);
        let mut body = chat(false);
        body["stream"] = json!(true);
        let mut r = client::post_json(mock.addr(), "/v1/chat/completions", &[], &body)
            .await
            .unwrap();
        let mut events = Vec::new();
        while let Some(e) = r.next_event().await.unwrap() {
            events.push(e);
        }
        assert_eq!(events.len(), 3, "{events:?}");
        let v: Value = serde_json::from_str(&events[1]).unwrap();
        assert_eq!(v["usage"], usage(2, 3));
        assert_eq!(events[2], "[DONE]");
        let s = mock
            .wait_until(Duration::from_secs(5), |r| {
                r.first().is_some_and(|s| s.ending == Ending::Complete)
            })
            .await;
        assert!(s[0].stream && !s[0].include_usage);
        mock.stop().await;
    })
    .await
}

#[tokio::test]
async fn client_dropping_mid_stream_is_recorded_as_gone() {
    bounded(async {
        let mock = MockOpenAi::start().await;
        let mut r = client::post_json(
            mock.addr(),
            "/v1/chat/completions",
            &[("x-mock-chunk-delay-ms", "200"), ("x-mock-chunks", "20")],
            &chat(true),
        )
        .await
        .unwrap();
        let first = r.next_event().await.unwrap().unwrap();
        assert!(first.contains("chat.completion.chunk"), "{first}");
        assert_eq!(mock.last().unwrap().ending, Ending::InProgress);
        drop(r);
        let served = mock
            .wait_until(Duration::from_secs(5), |r| r[0].disconnected())
            .await;
        assert!(served[0].events_sent < 22, "{:?}", served[0]);

        // Gone during the first-byte delay, too.
        let r = tokio::time::timeout(
            Duration::from_millis(200),
            client::post_json(
                mock.addr(),
                "/v1/chat/completions",
                &[("x-mock-delay-ms", "5000")],
                &chat(false),
            ),
        )
        .await;
        assert!(r.is_err(), "no answer during the delay");
        let served = mock
            .wait_until(Duration::from_secs(5), |r| {
                r.len() == 2 && r[1].ending == Ending::ClientGone
            })
            .await;
        assert!(!served[1].stream);
        mock.stop().await;
    })
    .await
}

#[tokio::test]
async fn unknown_paths_are_404_json_and_the_rest_answers() {
    bounded(async {
        let mock = MockOpenAi::start().await;
        let r = client::get(mock.addr(), "/v1/embeddings?x=1")
            .await
            .unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("/v1/embeddings"),
            "{v}"
        );
        let r = client::get(mock.addr(), "/v1/chat/completions")
            .await
            .unwrap();
        assert_eq!(r.status, 404);

        let r = client::get(mock.addr(), "/v1/models").await.unwrap();
        assert_eq!(r.status, 200);
        let v = r.json().await.unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["object"], "model");

        let r = client::get(mock.addr(), "/healthz").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text().await.unwrap(), "ok");

        let served = mock.requests();
        assert_eq!(
            served
                .iter()
                .map(|s| (s.method.as_str(), s.path.as_str(), s.status))
                .collect::<Vec<_>>(),
            vec![
                ("GET", "/v1/embeddings", 404),
                ("GET", "/v1/chat/completions", 404),
                ("GET", "/v1/models", 200),
                ("GET", "/healthz", 200),
            ]
        );
        assert_eq!(served[0].query.as_deref(), Some("x=1"));
        mock.clear();
        assert!(mock.requests().is_empty());
        assert_eq!(mock.count(), 4);
        mock.stop().await;
    })
    .await
}

#[tokio::test]
async fn bad_bodies_are_refused() {
    bounded(async {
        let mock = MockOpenAi::start().await;
        let big = vec![b' '; (1 << 20) + 1];
        let r = client::send(mock.addr(), "POST", "/v1/chat/completions", &[], &big)
            .await
            .unwrap();
        assert_eq!(r.status, 413);
        let r = client::send(mock.addr(), "POST", "/v1/chat/completions", &[], b"{nope")
            .await
            .unwrap();
        assert_eq!(r.status, 400);
        let r = client::post_json(
            mock.addr(),
            "/v1/chat/completions",
            &[],
            &json!({"messages": []}),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 400);
        assert!(
            r.json().await.unwrap()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("model")
        );
        let statuses: Vec<u16> = mock.requests().iter().map(|s| s.status).collect();
        assert_eq!(statuses, vec![413, 400, 400]);
        mock.stop().await;
    })
    .await
}

#[tokio::test]
async fn stop_closes_the_listener() {
    bounded(async {
        let mock = MockOpenAi::start().await;
        let addr = mock.addr();
        assert_eq!(client::get(addr, "/healthz").await.unwrap().status, 200);
        mock.stop().await;
        assert!(client::get(addr, "/healthz").await.is_err());

        let mock = MockOpenAi::start().await;
        let addr = mock.addr();
        drop(mock);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(client::get(addr, "/healthz").await.is_err());
    })
    .await
}
