//! ext_authz wire ⇄ domain: what a `CheckRequest` presents (credential, model, data
//! classification, path) and the `CheckResponse` each answer becomes.
//!
//! Nothing here proposes or decides: `authz` does, with these.

use std::collections::BTreeMap;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use tally_proto::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use tally_proto::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use tally_proto::envoy::service::auth::v3::attribute_context::HttpRequest;
use tally_proto::envoy::service::auth::v3::check_response::HttpResponse;
use tally_proto::envoy::service::auth::v3::{CheckResponse, DeniedHttpResponse, OkHttpResponse};
use tally_proto::envoy::r#type::v3::{HttpStatus, StatusCode};
use tally_proto::google::rpc::Status as RpcStatus;

use super::key_secret;
use crate::engine::access::{CLASSIFICATIONS, Denial, Grant, MAX_TEXT_BYTES};

/// Request header naming the model (when the body does not, or is not forwarded).
pub const MODEL_HEADER: &str = "x-tally-model";
/// Request header naming the request's data classification (one of [`CLASSIFICATIONS`]).
pub const CLASSIFICATION_HEADER: &str = "x-data-classification";
/// Headers an allowed request gets (what the rate-limit filter's descriptors read).
pub const KEY_ID_HEADER: &str = "x-tally-key-id";
pub const SUBSCRIPTION_HEADER: &str = "x-tally-subscription";
pub const LABELS_HEADER: &str = "x-tally-labels";
/// Every header Tally sets on an allowed request: a public path's request loses any the
/// client sent, so they always come from Tally.
const TALLY_HEADERS: [&str; 4] = [
    KEY_ID_HEADER,
    SUBSCRIPTION_HEADER,
    MODEL_HEADER,
    LABELS_HEADER,
];
/// Dynamic metadata (namespace `envoy.filters.http.ext_authz`) of an allowed request.
pub const METADATA_KEY_ID: &str = "key_id";
pub const METADATA_SUBSCRIPTION: &str = "subscription";
pub const METADATA_MODEL: &str = "model";

/// google.rpc codes of a CheckResponse's status.
const RPC_OK: i32 = 0;
const RPC_PERMISSION_DENIED: i32 = 7;
const RPC_UNAUTHENTICATED: i32 = 16;

/// The request's headers, read from `headers` (Envoy lower-cases their names and merges
/// repeated ones with commas) and from `header_map` (`encode_raw_headers`: `raw_value`, not
/// merged); names compared case-insensitively.
pub struct Headers<'a>(&'a HttpRequest);

impl<'a> Headers<'a> {
    pub fn new(http: &'a HttpRequest) -> Headers<'a> {
        Headers(http)
    }

    /// The first value of `name` that is valid UTF-8, trimmed; `None` when absent or empty.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        let http = self.0;
        let mapped = http
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str());
        let raw = http
            .header_map
            .iter()
            .flat_map(|m| &m.headers)
            .filter(|h| h.key.eq_ignore_ascii_case(name))
            .filter_map(|h| {
                if h.raw_value.is_empty() {
                    Some(h.value.as_str())
                } else {
                    std::str::from_utf8(&h.raw_value).ok()
                }
            });
        mapped.chain(raw).map(str::trim).find(|v| !v.is_empty())
    }
}

/// The API key a request presents.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    /// Neither `authorization: Bearer` nor `x-api-key`.
    Missing,
    /// Something was presented, but not a Tally key.
    Malformed,
    /// A well-formed Tally secret, and the key id it names.
    Key { secret: &'a str, key_id: &'a str },
}

/// The credential of a request: the bearer token of `authorization`, else `x-api-key`; the
/// first that is a well-formed Tally secret wins (so an upstream's own bearer token may travel
/// alongside an `x-api-key`).
pub fn credential<'a>(headers: &Headers<'a>) -> Credential<'a> {
    let bearer = headers.get("authorization").and_then(bearer_token);
    let api_key = headers.get("x-api-key");
    for secret in [bearer, api_key].into_iter().flatten() {
        if let Some(key_id) = key_secret::parse(secret) {
            return Credential::Key { secret, key_id };
        }
    }
    if bearer.is_some() || api_key.is_some() {
        Credential::Malformed
    } else {
        Credential::Missing
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive); `None` for other schemes.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The request's path without its query string or fragment.
pub fn path_only(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

/// Largest body scanned for its model: every body a Check call can carry (Envoy's
/// `max_request_bytes` should stay below the gRPC message bound).
pub const MAX_BODY_SCAN_BYTES: usize = super::MAX_GRPC_MESSAGE_BYTES;

/// Why a request is refused before (or after) its key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 401 or 403.
    pub http: u16,
    /// OpenAI's `error.type`.
    pub kind: &'static str,
    /// OpenAI's `error.code`.
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    fn unauthenticated(code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            http: 401,
            kind: "authentication_error",
            code,
            message: message.into(),
        }
    }

    /// A request Tally cannot judge (bad classification or model): 403, after its key was
    /// found valid, so an unauthenticated caller still gets 401 first.
    pub fn invalid_request(code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            http: 403,
            kind: "invalid_request_error",
            code,
            message: message.into(),
        }
    }

    pub fn missing_key() -> Refusal {
        Refusal::unauthenticated(
            "missing_api_key",
            "no API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`",
        )
    }

    pub fn malformed_key() -> Refusal {
        Refusal::unauthenticated("invalid_api_key", "malformed API key")
    }
}

impl From<&Denial> for Refusal {
    fn from(d: &Denial) -> Refusal {
        let message = d.to_string();
        let permission = |code| Refusal {
            http: 403,
            kind: "permission_error",
            code,
            message: message.clone(),
        };
        match d {
            Denial::UnknownKey | Denial::BadSecret => {
                Refusal::unauthenticated("invalid_api_key", message)
            }
            Denial::DeletedKey => Refusal::unauthenticated("key_deleted", message),
            Denial::ExpiredKey => Refusal::unauthenticated("key_expired", message),
            Denial::Disabled => permission("key_disabled"),
            Denial::ModelNotAllowed { .. } => permission("model_not_allowed"),
            Denial::ClassificationTooHigh { .. } => permission("classification_not_allowed"),
        }
    }
}

/// The request's data classification: `None` without the header, `Err` (the name, for the
/// message) for a name that is not a level.
pub fn classification(headers: &Headers<'_>) -> Option<Result<u8, String>> {
    let name = headers.get(CLASSIFICATION_HEADER)?;
    Some(
        CLASSIFICATIONS
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .map(|i| i as u8)
            .ok_or_else(|| name.chars().take(64).collect()),
    )
}

/// The refusal for a classification name that is not a level.
pub fn unknown_classification(name: &str) -> Refusal {
    Refusal::invalid_request(
        "invalid_classification",
        format!(
            "{CLASSIFICATION_HEADER}: {name:?} is not a data classification; one of {}",
            CLASSIFICATIONS.join(", ")
        ),
    )
}

/// The model a request names: the [`MODEL_HEADER`] header, else the top-level `"model"` of a
/// forwarded JSON body. `Ok(None)`: none is named (the request is not model-checked). `Err`: it
/// names one ambiguously (header and body disagree, two body models, a non-string or
/// over-long model), refused after the key is checked.
pub fn model(headers: &Headers<'_>, http: &HttpRequest) -> Result<Option<String>, Refusal> {
    let body = if http.raw_body.is_empty() {
        http.body.as_bytes()
    } else {
        &http.raw_body
    };
    let from_body = body_model(&body[..body.len().min(MAX_BODY_SCAN_BYTES)]);
    let named = match (headers.get(MODEL_HEADER), from_body) {
        (_, BodyModel::Invalid(why)) => {
            return Err(Refusal::invalid_request("invalid_model", why));
        }
        (Some(h), BodyModel::Named(b)) if h != b => {
            return Err(Refusal::invalid_request(
                "model_mismatch",
                format!("the {MODEL_HEADER} header and the body's \"model\" name different models"),
            ));
        }
        (Some(h), _) => Some(h.to_owned()),
        (None, BodyModel::Named(b)) => Some(b),
        (None, BodyModel::None) => None,
    };
    match named {
        Some(m) if m.len() > MAX_TEXT_BYTES => Err(Refusal::invalid_request(
            "invalid_model",
            format!("model name of {} bytes; at most {MAX_TEXT_BYTES}", m.len()),
        )),
        Some(m) if m.chars().any(char::is_control) => Err(Refusal::invalid_request(
            "invalid_model",
            "model name with control characters",
        )),
        other => Ok(other),
    }
}

/// What a body says about its model.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyModel {
    /// Not JSON, no top-level `"model"`, or a `"model": null`.
    None,
    Named(String),
    /// A non-string model, or two top-level `"model"` keys that disagree (which one the
    /// upstream would use is not known).
    Invalid(String),
}

/// The top-level `"model"` of a JSON object body; never panics. A body that does not start
/// with `{` names no model. A truncated one (`allow_partial_message`) names what appeared
/// before the cut. One that starts as an object but is not valid JSON is invalid: what the
/// upstream's parser would make of it is not known, so it is not waved through unchecked.
/// Work is linear in the body; values other than the model are skipped without recursion
/// (serde_json's `IgnoredAny`), and the model's own nesting is bounded by serde_json's
/// recursion limit.
pub fn body_model(body: &[u8]) -> BodyModel {
    let start = body.iter().position(|b| !b.is_ascii_whitespace());
    if start.is_none_or(|i| body[i] != b'{') {
        return BodyModel::None;
    }
    let mut found = Found::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let scanned =
        de::Deserializer::deserialize_map(&mut de, TopLevel(&mut found)).and_then(|()| de.end());
    if let Err(e) = scanned
        && !e.is_eof()
    {
        // Only the position: serde_json's messages may quote the body.
        return BodyModel::Invalid(format!(
            "the body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ));
    }
    match found {
        Found {
            invalid: Some(why), ..
        } => BodyModel::Invalid(why),
        Found { model: Some(m), .. } => BodyModel::Named(m),
        Found { model: None, .. } => BodyModel::None,
    }
}

#[derive(Default)]
struct Found {
    model: Option<String>,
    invalid: Option<String>,
}

struct TopLevel<'a>(&'a mut Found);

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key != "model" {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            match map.next_value::<serde_json::Value>()? {
                serde_json::Value::Null => {}
                serde_json::Value::String(m) => match &self.0.model {
                    Some(first) if *first != m => {
                        self.0.invalid = Some("the body names two different models".into());
                    }
                    _ => self.0.model = Some(m),
                },
                _ => self.0.invalid = Some("the body's \"model\" is not a string".into()),
            }
        }
        Ok(())
    }
}

/// A header value safe to hand to Envoy: control characters (and in labels `,`, `=` and `%`,
/// which separate or escape) are percent-encoded.
fn header_safe(value: &str, extra: &[char]) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c.is_control() || extra.contains(&c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `k=v,k=v` in key order (each part [`header_safe`]).
pub fn labels_value(labels: &[(String, String)]) -> String {
    let sorted: BTreeMap<&str, &str> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let special = [',', '=', '%'];
    sorted
        .into_iter()
        .map(|(k, v)| format!("{}={}", header_safe(k, &special), header_safe(v, &special)))
        .collect::<Vec<_>>()
        .join(",")
}

/// A header that replaces any of the same name (the client's included), kept even empty.
fn set_header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            raw_value: Vec::new(),
        }),
        append: Some(false),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: true,
    }
}

fn string_value(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.to_owned())),
    }
}

/// OK for an allowed key: the headers its rate-limit descriptors use (replacing any the
/// client sent), and the same as dynamic metadata. The credential headers are left for the
/// upstream.
pub fn allowed(grant: &Grant) -> CheckResponse {
    let subscription = grant.subscription.as_deref().unwrap_or("");
    let mut headers = vec![
        set_header(KEY_ID_HEADER, grant.key_id.clone()),
        set_header(SUBSCRIPTION_HEADER, header_safe(subscription, &[])),
        set_header(LABELS_HEADER, labels_value(&grant.labels)),
    ];
    let mut headers_to_remove = Vec::new();
    match &grant.model {
        Some(m) => headers.push(set_header(MODEL_HEADER, header_safe(m, &[]))),
        None => headers_to_remove.push(MODEL_HEADER.to_owned()),
    }
    let mut fields = BTreeMap::from([
        (METADATA_KEY_ID.to_owned(), string_value(&grant.key_id)),
        (METADATA_SUBSCRIPTION.to_owned(), string_value(subscription)),
    ]);
    if let Some(m) = &grant.model {
        fields.insert(METADATA_MODEL.to_owned(), string_value(m));
    }
    CheckResponse {
        status: Some(RpcStatus {
            code: RPC_OK,
            message: String::new(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove,
            ..OkHttpResponse::default()
        })),
        dynamic_metadata: Some(prost_types::Struct { fields }),
    }
}

/// OK for a public path: no key needed; any Tally header the client sent is removed.
pub fn public() -> CheckResponse {
    CheckResponse {
        status: Some(RpcStatus {
            code: RPC_OK,
            message: String::new(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers_to_remove: TALLY_HEADERS.iter().map(|h| (*h).to_owned()).collect(),
            ..OkHttpResponse::default()
        })),
        dynamic_metadata: None,
    }
}

/// The OpenAI-style error body: `{"error":{"message":..,"type":..,"code":..}}`.
pub fn error_body(r: &Refusal) -> String {
    serde_json::json!({
        "error": {
            "message": r.message,
            "type": r.kind,
            "code": r.code,
        }
    })
    .to_string()
}

/// A refusal as Envoy sends it downstream: 401 or 403 with a JSON body.
pub fn denied(r: &Refusal) -> CheckResponse {
    let (http, rpc) = if r.http == 401 {
        (StatusCode::Unauthorized, RPC_UNAUTHENTICATED)
    } else {
        (StatusCode::Forbidden, RPC_PERMISSION_DENIED)
    };
    let mut headers = vec![set_header("content-type", "application/json".into())];
    if r.http == 401 {
        headers.push(set_header(
            "www-authenticate",
            "Bearer realm=\"tally\"".into(),
        ));
    }
    CheckResponse {
        status: Some(RpcStatus {
            code: rpc,
            message: r.message.clone(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: http as i32 }),
            headers,
            body: error_body(r),
        })),
        dynamic_metadata: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_proto::envoy::config::core::v3::HeaderMap;

    fn http(headers: &[(&str, &str)], body: &str) -> HttpRequest {
        HttpRequest {
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            body: body.into(),
            ..HttpRequest::default()
        }
    }

    const SECRET: &str = "tly_abcdefghijklmnop_0123456789ABCDEFGHIJabcdefghijkl";

    #[test]
    fn credentials_from_either_header_any_case() {
        let bearer = format!("Bearer {SECRET}");
        let key = Credential::Key {
            secret: SECRET,
            key_id: "abcdefghijklmnop",
        };
        for h in [
            http(&[("authorization", &bearer)], ""),
            http(&[("Authorization", &format!("bearer  {SECRET} "))], ""),
            http(&[("x-api-key", SECRET)], ""),
            http(
                &[
                    ("authorization", "Bearer upstream-token"),
                    ("x-api-key", SECRET),
                ],
                "",
            ),
            http(&[("authorization", "Basic dXNlcjpwdw==")], "").with_raw("X-Api-Key", SECRET),
        ] {
            assert_eq!(credential(&Headers::new(&h)), key, "{h:?}");
        }
        assert_eq!(
            credential(&Headers::new(&http(&[], ""))),
            Credential::Missing
        );
        let basic = http(&[("authorization", "Basic dXNlcjpwdw==")], "");
        assert_eq!(credential(&Headers::new(&basic)), Credential::Missing);
        for bad in [
            http(&[("authorization", "Bearer sk-123")], ""),
            http(&[("x-api-key", "tly_short")], ""),
            http(&[("x-api-key", &SECRET.replace('a', "A"))], ""),
        ] {
            assert_eq!(
                credential(&Headers::new(&bad)),
                Credential::Malformed,
                "{bad:?}"
            );
        }
    }

    trait WithRaw {
        fn with_raw(self, k: &str, v: &str) -> Self;
    }

    impl WithRaw for HttpRequest {
        fn with_raw(mut self, k: &str, v: &str) -> Self {
            self.header_map
                .get_or_insert_with(HeaderMap::default)
                .headers
                .push(HeaderValue {
                    key: k.into(),
                    value: String::new(),
                    raw_value: v.as_bytes().to_vec(),
                });
            self
        }
    }

    #[test]
    fn body_models_never_panic_and_never_guess() {
        assert_eq!(
            body_model(br#"{"model":"gpt-4o","messages":[]}"#),
            BodyModel::Named("gpt-4o".into())
        );
        assert_eq!(
            body_model(br#" {"messages":[{"model":"inner"}],"model":"outer"}"#),
            BodyModel::Named("outer".into())
        );
        // Truncated (allow_partial_message): what came before the cut.
        assert_eq!(
            body_model(br#"{"model":"m","messages":[{"role":"us"#),
            BodyModel::Named("m".into())
        );
        for none in [
            &b""[..],
            b"not json",
            b"[1,2]",
            b"{",
            br#"{"model":null}"#,
            b"{\"x\":",
            b"\xff\xfe",
        ] {
            assert_eq!(
                body_model(none),
                BodyModel::None,
                "{:?}",
                String::from_utf8_lossy(none)
            );
        }
        for invalid in [
            &br#"{"model":1}"#[..],
            br#"{"model":"a","model":"b"}"#,
            br#"{"model":"small"} {"model":"large"}"#,
            br#"{"model":"small",,}"#,
            b"{\"model\":\"\xff\"}",
        ] {
            let got = body_model(invalid);
            assert!(
                matches!(got, BodyModel::Invalid(_)),
                "{:?}: {got:?}",
                String::from_utf8_lossy(invalid)
            );
        }
        assert_eq!(
            body_model(br#"{"model":"a","model":"a"}"#),
            BodyModel::Named("a".into())
        );
        // Values other than the model are skipped without recursion: depth costs no stack.
        let deep = format!(
            "{{\"x\":{}{}, \"model\":\"m\"}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(body_model(deep.as_bytes()), BodyModel::Named("m".into()));
        let deep_model = format!("{{\"model\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(matches!(
            body_model(deep_model.as_bytes()),
            BodyModel::Invalid(_)
        ));
    }

    #[test]
    fn the_header_wins_only_when_the_body_agrees() {
        let h = http(&[("x-tally-model", "small")], r#"{"model":"small"}"#);
        assert_eq!(model(&Headers::new(&h), &h), Ok(Some("small".into())));
        let h = http(&[("x-tally-model", "small")], r#"{"model":"large"}"#);
        assert_eq!(
            model(&Headers::new(&h), &h).unwrap_err().code,
            "model_mismatch"
        );
        let h = http(&[], r#"{"model":"large"}"#);
        assert_eq!(model(&Headers::new(&h), &h), Ok(Some("large".into())));
        let mut h = http(&[], "");
        h.raw_body = br#"{"model":"raw"}"#.to_vec();
        assert_eq!(model(&Headers::new(&h), &h), Ok(Some("raw".into())));
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(300));
        let h = http(&[], &long);
        assert_eq!(
            model(&Headers::new(&h), &h).unwrap_err().code,
            "invalid_model"
        );
    }

    #[test]
    fn classifications_are_level_names_in_any_case() {
        let h = http(&[("x-data-classification", " Confidential ")], "");
        assert_eq!(classification(&Headers::new(&h)), Some(Ok(2)));
        let h = http(&[("x-data-classification", "secret")], "");
        assert_eq!(
            classification(&Headers::new(&h)),
            Some(Err("secret".into()))
        );
        assert_eq!(classification(&Headers::new(&http(&[], ""))), None);
    }

    #[test]
    fn paths_lose_their_query() {
        assert_eq!(path_only("/healthz?verbose=1"), "/healthz");
        assert_eq!(path_only("/v1/chat#x"), "/v1/chat");
        assert_eq!(path_only(""), "");
    }

    #[test]
    fn labels_are_sorted_and_escaped() {
        let labels = vec![
            ("team".to_owned(), "red,blue".to_owned()),
            ("env".to_owned(), "prod\n".to_owned()),
        ];
        assert_eq!(labels_value(&labels), "env=prod%0A,team=red%2Cblue");
        assert_eq!(labels_value(&[]), "");
    }

    #[test]
    fn denials_map_to_401_and_403_with_openai_bodies() {
        let r = Refusal::from(&Denial::Disabled);
        let resp = denied(&r);
        assert_eq!(resp.status.as_ref().unwrap().code, RPC_PERMISSION_DENIED);
        let Some(HttpResponse::DeniedResponse(d)) = resp.http_response else {
            panic!("denied")
        };
        assert_eq!(d.status.unwrap().code, 403);
        let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(body["error"]["code"], "key_disabled");
        assert_eq!(body["error"]["type"], "permission_error");
        assert_eq!(body["error"]["message"], "this API key is disabled");
        for d in [
            Denial::UnknownKey,
            Denial::DeletedKey,
            Denial::ExpiredKey,
            Denial::BadSecret,
        ] {
            assert_eq!(Refusal::from(&d).http, 401, "{d:?}");
        }
    }
}
