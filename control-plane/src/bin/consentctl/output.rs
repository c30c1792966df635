//! consentctl's output: aligned tables for people, JSON for scripts.

use anyhow::bail;
use consent_core::wire::v1;
use serde_json::{Value, json};

use crate::{Output, now_secs};

pub(crate) fn permission_name(p: i32) -> &'static str {
    match v1::Permission::try_from(p) {
        Ok(v1::Permission::Access) => "access",
        Ok(v1::Permission::Process) => "process",
        Ok(v1::Permission::Share) => "share",
        _ => "?",
    }
}

/// The status an admin sees: an active grant past its expiry is expired.
pub(crate) fn status_name(g: &v1::Grant) -> &'static str {
    match v1::GrantStatus::try_from(g.status) {
        Ok(v1::GrantStatus::Active) if g.expires_at <= now_secs() => "expired",
        Ok(v1::GrantStatus::Active) => "active",
        Ok(v1::GrantStatus::Revoked) => "revoked",
        Ok(v1::GrantStatus::Expired) => "expired",
        _ => "?",
    }
}

/// UTC `YYYY-MM-DDTHH:MM:SSZ` from Unix seconds (civil-from-days).
pub(crate) fn utc(secs: i64) -> String {
    if secs == 0 {
        return "-".into();
    }
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub(crate) fn utc_ms(ms: i64) -> String {
    if ms == 0 { "-".into() } else { utc(ms / 1000) }
}

pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub(crate) fn grant_json(g: &v1::Grant) -> Value {
    json!({
        "id": g.id, "subject": g.subject, "grantee": g.grantee, "issued_by": g.issued_by,
        "owner": g.owner, "purposes": g.purposes, "datasets": g.datasets, "actions": g.actions,
        "permissions": g.permissions.iter().map(|p| permission_name(*p)).collect::<Vec<_>>(),
        "not_before": g.not_before, "expires_at": g.expires_at,
        "parent": if g.parent.is_empty() { Value::Null } else { json!(g.parent) },
        "status": status_name(g),
        "revocation": g.revocation.as_ref().map(|r| json!({
            "revoked_by": r.revoked_by, "revoked_at": r.revoked_at, "reason": r.reason,
            "cascaded_from": if r.cascaded_from.is_empty() { Value::Null } else { json!(r.cascaded_from) },
        })),
        "revision": g.revision,
    })
}

pub(crate) fn print_grants(output: Output, grants: &[v1::Grant], next: Option<&str>) {
    if output == Output::Json {
        let list: Vec<Value> = grants.iter().map(grant_json).collect();
        let value = match next {
            Some(n) => json!({ "grants": list, "next_page_token": n }),
            None if grants.len() == 1 => list.into_iter().next().unwrap_or(Value::Null),
            None => json!(list),
        };
        println!("{value:#}");
        return;
    }
    let rows: Vec<Vec<String>> = grants
        .iter()
        .map(|g| {
            vec![
                g.id.clone(),
                status_name(g).into(),
                g.subject.clone(),
                g.grantee.clone(),
                g.datasets.join(","),
                g.actions.join(","),
                g.purposes.join(","),
                g.permissions
                    .iter()
                    .map(|p| permission_name(*p))
                    .collect::<Vec<_>>()
                    .join(","),
                utc(g.expires_at),
                if g.parent.is_empty() {
                    "-".into()
                } else {
                    g.parent.clone()
                },
                g.revision.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATUS",
            "SUBJECT",
            "GRANTEE",
            "DATASETS",
            "ACTIONS",
            "PURPOSES",
            "PERMISSIONS",
            "EXPIRES",
            "PARENT",
            "REV",
        ],
        &rows,
    );
    for g in grants {
        if let Some(r) = &g.revocation {
            let cascade = if r.cascaded_from.is_empty() {
                String::new()
            } else {
                format!(", cascaded from {}", r.cascaded_from)
            };
            println!(
                "{}: revoked by {} at {}: {}{cascade}",
                g.id,
                r.revoked_by,
                utc(r.revoked_at),
                r.reason
            );
        }
    }
    if let Some(n) = next.filter(|n| !n.is_empty()) {
        println!("more: --page-token {n}");
    }
}

/// Prints who acknowledged; fails when a subscribed sidecar did not.
pub(crate) fn print_propagation(output: Output, p: &v1::PropagationResponse) -> anyhow::Result<()> {
    if output == Output::Json {
        let acks: Vec<Value> = p
            .sidecars
            .iter()
            .map(|s| json!({
                "node_id": s.node_id, "acknowledged": s.acknowledged, "acked_revision": s.acked_revision,
                "acked_at_ms": s.acked_at_ms, "latency_ms": s.latency_ms, "connected": s.connected,
            }))
            .collect();
        println!(
            "{:#}",
            json!({ "revision": p.revision, "complete": p.complete, "sidecars": acks })
        );
    } else {
        let rows: Vec<Vec<String>> = p
            .sidecars
            .iter()
            .map(|s| {
                vec![
                    s.node_id.clone(),
                    if s.acknowledged {
                        "yes".into()
                    } else {
                        "NO".into()
                    },
                    s.acked_revision.to_string(),
                    if s.acknowledged {
                        format!("{} ms", s.latency_ms)
                    } else {
                        "-".into()
                    },
                    utc_ms(s.acked_at_ms),
                    if s.connected {
                        "connected".into()
                    } else {
                        "disconnected".into()
                    },
                ]
            })
            .collect();
        println!(
            "revision {}: {} sidecar(s) subscribed",
            p.revision,
            p.sidecars.len()
        );
        if !rows.is_empty() {
            table(
                &["NODE", "ACKED", "ACKED_REV", "LATENCY", "ACKED_AT", "STATE"],
                &rows,
            );
        }
    }
    let missing: Vec<&str> = p
        .sidecars
        .iter()
        .filter(|s| !s.acknowledged)
        .map(|s| s.node_id.as_str())
        .collect();
    if !p.complete || !missing.is_empty() {
        bail!(
            "{} of {} subscribed sidecar(s) did not acknowledge revision {}: {}",
            missing.len(),
            p.sidecars.len(),
            p.revision,
            missing.join(", ")
        );
    }
    Ok(())
}

pub(crate) fn print_audit(out: Output, records: &[v1::AuditRecord]) {
    use v1::audit_record::Record;
    if out == Output::Json {
        let list: Vec<Value> = records
            .iter()
            .map(|r| match &r.record {
                Some(Record::Change(c)) => json!({
                    "seq": r.seq, "time_ms": r.time_ms, "type": "change", "kind": c.kind, "actor": c.actor,
                    "grant_id": c.grant_id, "revision": c.revision, "detail": c.detail,
                }),
                Some(Record::Decision(d)) => json!({
                    "seq": r.seq, "time_ms": r.time_ms, "type": "decision", "event_id": d.event_id,
                    "node_id": d.node_id, "grant_id": d.grant_id, "token_jti": d.token_jti,
                    "request_id": d.request_id, "caller": d.caller, "subject": d.subject, "route": d.route,
                    "dataset": d.dataset, "action": d.action, "purpose": d.purpose,
                    "outcome": if d.outcome == v1::Outcome::Allow as i32 { "allow" } else { "deny" },
                    "reason": d.reason, "snapshot_revision": d.snapshot_revision, "dry_run": d.dry_run,
                }),
                None => json!({ "seq": r.seq, "time_ms": r.time_ms }),
            })
            .collect();
        println!("{:#}", json!(list));
        return;
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let time = utc_ms(r.time_ms);
            match &r.record {
                Some(Record::Change(c)) => vec![
                    r.seq.to_string(),
                    time,
                    c.kind.clone(),
                    c.actor.clone(),
                    c.grant_id.clone(),
                    if c.revision == 0 {
                        "-".into()
                    } else {
                        c.revision.to_string()
                    },
                    c.detail.clone(),
                ],
                Some(Record::Decision(d)) => vec![
                    r.seq.to_string(),
                    time,
                    if d.outcome == v1::Outcome::Allow as i32 {
                        "allow".into()
                    } else {
                        "deny".into()
                    },
                    d.caller.clone(),
                    d.grant_id.clone(),
                    d.snapshot_revision.to_string(),
                    format!(
                        "{} {} {} request={} node={} {}",
                        d.route, d.dataset, d.action, d.request_id, d.node_id, d.reason
                    ),
                ],
                None => vec![
                    r.seq.to_string(),
                    time,
                    "?".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                ],
            }
        })
        .collect();
    table(
        &["SEQ", "TIME", "KIND", "ACTOR", "GRANT", "REV", "DETAIL"],
        &rows,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_unix_seconds() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1), "1970-01-01T00:00:01Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
