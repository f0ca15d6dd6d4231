//! `tally.v1.Audit` calls, and how audit records are shown to people.

use crate::proto::tally::v1::audit_client::AuditClient;
use crate::proto::tally::v1::{AuditRecord, ListAuditRequest, ListAuditResponse};
use crate::{ClientError, TallyClient, format_time_ms, table};

impl TallyClient {
    /// `tally.v1.Audit/ListAudit`: one page of the audit log, oldest first.
    pub async fn list_audit(
        &self,
        request: ListAuditRequest,
    ) -> Result<ListAuditResponse, ClientError> {
        let mut client = AuditClient::new(self.channel.clone());
        self.call(client.list_audit(self.request(request))).await
    }
}

/// Audit records as a table: seq, time, who, what, target, result.
pub fn render_audit(records: &[AuditRecord]) -> String {
    let header: Vec<String> = ["SEQ", "TIME", "ACTOR", "ROLE", "ACTION", "TARGET", "RESULT"]
        .map(String::from)
        .to_vec();
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.seq.to_string(),
                format_time_ms(r.at_ms),
                r.actor.clone(),
                r.role.clone(),
                r.action.clone(),
                r.target.clone(),
                if r.error.is_empty() {
                    "applied".into()
                } else {
                    format!("refused: {}", r.error)
                },
            ]
        })
        .collect();
    table(&header, &rows)
}

/// One audit record as JSON, its before/after objects parsed (kept as text if they are not
/// JSON).
pub fn audit_json(r: &AuditRecord) -> serde_json::Value {
    let object = |o: &Option<String>| match o {
        None => serde_json::Value::Null,
        Some(text) => {
            serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.clone()))
        }
    };
    serde_json::json!({
        "seq": r.seq,
        "at_ms": r.at_ms,
        "actor": r.actor,
        "role": r.role,
        "action": r.action,
        "target": r.target,
        "before": object(&r.before_json),
        "after": object(&r.after_json),
        "error": if r.error.is_empty() { serde_json::Value::Null } else { r.error.clone().into() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AuditRecord {
        AuditRecord {
            seq: 7,
            at_ms: 0,
            actor: "ops".into(),
            role: "admin".into(),
            action: "keys.disable".into(),
            target: "abcdefghijklmnop".into(),
            before_json: Some(r#"{"enabled":true}"#.into()),
            after_json: Some(r#"{"enabled":false}"#.into()),
            error: String::new(),
        }
    }

    #[test]
    fn records_render_as_a_table_and_as_json() {
        let text = render_audit(&[record()]);
        assert!(text.lines().next().unwrap().starts_with("SEQ"), "{text}");
        assert!(
            text.contains("keys.disable") && text.contains("applied"),
            "{text}"
        );
        let v = audit_json(&record());
        assert_eq!(v["before"]["enabled"], true);
        assert_eq!(v["after"]["enabled"], false);
        assert!(v["error"].is_null());
        let mut refused = record();
        refused.error = "invalid id".into();
        refused.after_json = Some("not json".into());
        assert!(render_audit(&[refused.clone()]).contains("refused: invalid id"));
        assert_eq!(audit_json(&refused)["after"], "not json");
    }
}
